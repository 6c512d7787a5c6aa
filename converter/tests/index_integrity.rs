//! The index's integrity operations, on every backend against real servers: forgetting records
//! (a corrupt blob's contents, its layers and images) and conversion leases (one holder at a
//! time, renewable, released, lapsing when not renewed).

use std::time::Duration;

use starlight_conformance::servers::{Redis, RedisCluster};
use starlight_converter::index::{AnyIndex, Index, RedbIndex, RedisIndex};
use starlight_format::{ContentLocation, Digest, Frame, ImageRecord, LayerRecord, Platform};

fn digest(what: &str) -> Digest {
    Digest::of(what.as_bytes())
}

async fn deletes_and_leases(index: &impl Index) {
    let contents: Vec<(Digest, ContentLocation)> = (0..10)
        .map(|i| {
            let loc = ContentLocation {
                blob: digest("blob"),
                size: 10,
                frames: vec![Frame { offset: i * 10, clen: 10, ulen: 10 }],
            };
            (digest(&format!("content-{i}")), loc)
        })
        .collect();
    index.put_contents(&contents).await.unwrap();
    let gone: Vec<Digest> = contents[..4].iter().map(|(d, _)| *d).collect();
    index.delete_contents(&gone).await.unwrap();
    index.delete_contents(&[]).await.unwrap();
    let all: Vec<Digest> = contents.iter().map(|(d, _)| *d).collect();
    let found = index.get_contents(&all).await.unwrap();
    assert!(found[..4].iter().all(Option::is_none), "deleted contents are gone");
    assert!(found[4..].iter().all(Option::is_some), "the others stay");
    // A deleted content can be recorded again (put keeps only what is there).
    index.put_contents(&contents[..1]).await.unwrap();
    assert!(index.get_contents(&all[..1]).await.unwrap()[0].is_some());

    let layer = LayerRecord {
        diff_id: digest("diff"),
        toc: digest("toc"),
        blob: Some(digest("blob")),
        blob_size: 100,
        entries: 1,
        files: 1,
        content_bytes: 10,
    };
    index.put_layer(&layer).await.unwrap();
    index.delete_layer(&layer.diff_id).await.unwrap();
    assert_eq!(index.get_layer(&layer.diff_id).await.unwrap(), None);
    index.delete_layer(&layer.diff_id).await.unwrap();
    let source = digest("compressed");
    index.put_layer_from_blob(&source, &layer).await.unwrap();
    assert_eq!(index.get_layer_from_blob(&source).await.unwrap(), Some(layer.clone()));
    index.delete_layer_from_blob(&source).await.unwrap();
    assert_eq!(index.get_layer_from_blob(&source).await.unwrap(), None, "the blob's link is gone");
    index.delete_layer_from_blob(&source).await.unwrap();

    let image = ImageRecord {
        manifest_digest: digest("manifest"),
        name: "app".into(),
        tag: None,
        platform: Platform::host(),
        media_type: "application/vnd.oci.image.manifest.v1+json".into(),
        manifest: b"{}".to_vec(),
        config_digest: digest("config"),
        config: b"{}".to_vec(),
        layers: Vec::new(),
    };
    index.put_image(&image).await.unwrap();
    index.delete_image(&image.manifest_digest).await.unwrap();
    assert_eq!(index.get_image(&image.manifest_digest).await.unwrap(), None);

    let ttl = Duration::from_millis(600);
    assert!(index.try_lease("convert:x", "a", ttl).await.unwrap(), "a free lease is taken");
    assert!(!index.try_lease("convert:x", "b", ttl).await.unwrap(), "a live lease is not taken");
    assert!(index.try_lease("convert:x", "a", ttl).await.unwrap(), "the holder renews");
    assert!(index.try_lease("convert:y", "b", ttl).await.unwrap(), "leases are per key");
    index.release_lease("convert:x", "b").await.unwrap();
    assert!(!index.try_lease("convert:x", "b", ttl).await.unwrap(), "only the holder releases");
    index.release_lease("convert:x", "a").await.unwrap();
    assert!(index.try_lease("convert:x", "b", ttl).await.unwrap(), "a released lease is free");
    // "b" dies without releasing: the lease lapses.
    tokio::time::sleep(ttl + Duration::from_millis(300)).await;
    assert!(index.try_lease("convert:x", "c", ttl).await.unwrap(), "a lapsed lease is taken over");
}

#[tokio::test(flavor = "multi_thread")]
async fn redb() {
    let dir = tempfile::tempdir().unwrap();
    deletes_and_leases(&AnyIndex::Redb(RedbIndex::open(dir.path().join("index.redb")).unwrap())).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_single() {
    let redis = Redis::start();
    deletes_and_leases(&AnyIndex::Redis(RedisIndex::single(&redis.url()).await.unwrap())).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_cluster() {
    let cluster = RedisCluster::start();
    deletes_and_leases(&RedisIndex::cluster(&cluster.urls()).await.unwrap()).await;
}
