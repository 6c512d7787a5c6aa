//! One contract, every backend: each object store and index runs the same checks against a real
//! server on loopback (SeaweedFS for S3, redis-server single and cluster).

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use starlight_conformance::servers::{Redis, RedisCluster, S3Server, free_port};
use starlight_converter::index::{AnyIndex, Index, IndexError, RedbIndex, RedisIndex};
use starlight_converter::store::{AnyStore, LocalStore, ObjectStore, S3Store, StoreError};
use starlight_format::{ContentLocation, Digest, Frame, ImageLayer, ImageRecord, LayerRecord, Platform};

/// Over the S3 store's 64 MiB multipart threshold, and not a whole number of 16 MiB parts.
const BIG: u64 = 70 << 20;
const PART: u64 = 16 << 20;
const CONTENTS: usize = 2500;

/// The byte at offset `i` of the big test file: position-dependent, so a part stored in the
/// wrong place or twice shows up as a mismatch.
fn big_byte(i: u64) -> u8 {
    (i.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 56) as u8 ^ (i >> 20) as u8
}

fn big_range(offset: u64, len: u64) -> Vec<u8> {
    (offset..offset + len).map(big_byte).collect()
}

fn write_big_file(path: &Path) {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    for chunk in (0..BIG).step_by(1 << 20) {
        f.write_all(&big_range(chunk, 1 << 20)).unwrap();
    }
    f.into_inner().unwrap().sync_all().unwrap();
}

async fn store_contract(store: &impl ObjectStore, scratch: &Path) {
    let key = "tocs/sha256/small";
    store.put_bytes(key, Bytes::from_static(b"hello, starlight")).await.unwrap();
    assert_eq!(store.get(key, 1024).await.unwrap(), &b"hello, starlight"[..]);
    assert!(store.get(key, 4).await.is_err(), "get over max must fail");
    assert_eq!(store.get_range(key, 7, 9).await.unwrap(), &b"starlight"[..]);
    assert!(store.get_range(key, 3, 0).await.unwrap().is_empty());
    assert!(matches!(store.get_range(key, 7, 10).await, Err(StoreError::ShortRead { want: 10, got: 9, .. })));
    assert!(matches!(store.get_range(key, 100, 1).await, Err(StoreError::ShortRead { .. })));
    assert_eq!(store.size(key).await.unwrap(), Some(16));
    // Overwrite replaces the whole object.
    store.put_bytes(key, Bytes::from_static(b"v2")).await.unwrap();
    assert_eq!(store.get(key, 1024).await.unwrap(), &b"v2"[..]);

    let missing = "tocs/sha256/missing";
    assert_eq!(store.size(missing).await.unwrap(), None);
    assert!(matches!(store.get(missing, 10).await, Err(StoreError::NotFound { .. })));
    assert!(matches!(store.get_range(missing, 0, 1).await, Err(StoreError::NotFound { .. })));
    store.delete(key).await.unwrap();
    assert_eq!(store.size(key).await.unwrap(), None);
    store.delete(key).await.unwrap();

    let path = scratch.join("big");
    write_big_file(&path);
    let big = "blobs/sha256/big";
    let started = Instant::now();
    store.put_file(big, &path).await.unwrap();
    eprintln!("put_file of {} MiB took {:?}", BIG >> 20, started.elapsed());
    assert_eq!(store.size(big).await.unwrap(), Some(BIG));
    for (offset, len) in [(0, 4096), (PART - 1000, 5000), (4 * PART - 7, 1 << 20), (BIG - 333, 333)] {
        let got = store.get_range(big, offset, len).await.unwrap();
        assert!(got == big_range(offset, len), "range {offset}+{len} differs");
    }
    assert!(matches!(store.get_range(big, BIG - 10, 20).await, Err(StoreError::ShortRead { got: 10, .. })));
    // Several ranges of several objects at once, in order.
    store.put_bytes("tocs/sha256/other", Bytes::from_static(b"0123456789")).await.unwrap();
    let ranges = vec![
        (big.to_string(), PART - 5, 10),
        ("tocs/sha256/other".to_string(), 2, 3),
        (big.to_string(), 0, 7),
        ("tocs/sha256/other".to_string(), 9, 1),
    ];
    let got = store.get_ranges(ranges).await.unwrap();
    assert!(got[0] == big_range(PART - 5, 10) && got[2] == big_range(0, 7));
    assert_eq!((&got[1][..], &got[3][..]), (&b"234"[..], &b"9"[..]));
    let short = vec![(big.to_string(), BIG - 1, 2)];
    assert!(matches!(store.get_ranges(short).await, Err(StoreError::ShortRead { .. })));
    let missing = vec![("tocs/sha256/missing".to_string(), 0, 1)];
    assert!(matches!(store.get_ranges(missing).await, Err(StoreError::NotFound { .. })));
    store.delete("tocs/sha256/other").await.unwrap();
    store.delete(big).await.unwrap();
}

fn digest(what: &str, i: usize) -> Digest {
    Digest::of(format!("{what}-{i}").as_bytes())
}

fn location(i: usize, generation: u64) -> ContentLocation {
    let size = 100 + i as u64;
    ContentLocation {
        blob: digest("blob", generation as usize),
        size,
        frames: vec![Frame { offset: generation * 1_000_000 + i as u64 * 64, clen: 50, ulen: size as u32 }],
    }
}

fn layer(i: usize) -> LayerRecord {
    LayerRecord {
        diff_id: digest("diff", i),
        toc: digest("toc", i),
        blob: Some(digest("layer-blob", i)),
        blob_size: 12345,
        entries: 10,
        files: 7,
        content_bytes: 9999,
    }
}

fn image(tag: Option<&str>) -> ImageRecord {
    ImageRecord {
        manifest_digest: digest("manifest", 1),
        name: "127.0.0.1:5000/library/app".into(),
        tag: tag.map(str::to_string),
        platform: Platform { os: "linux".into(), architecture: "arm64".into(), variant: Some("v8".into()) },
        media_type: "application/vnd.oci.image.manifest.v1+json".into(),
        manifest: br#"{"schemaVersion":2}"#.to_vec(),
        config_digest: digest("config", 1),
        config: br#"{"architecture":"arm64"}"#.to_vec(),
        layers: vec![ImageLayer {
            diff_id: digest("diff", 1),
            digest: digest("gz", 1),
            size: 4242,
            media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
        }],
    }
}

async fn index_contract(index: &impl Index) {
    let digests: Vec<Digest> = (0..CONTENTS).map(|i| digest("content", i)).collect();
    // Every third content is missing; the rest are written in two calls, the second of which
    // tries to move contents the first already placed.
    let present = |i: usize| !i.is_multiple_of(3);
    let first: Vec<(Digest, ContentLocation)> =
        (0..CONTENTS).filter(|&i| present(i) && i < 2000).map(|i| (digests[i], location(i, 1))).collect();
    index.put_contents(&first).await.unwrap();
    let second: Vec<(Digest, ContentLocation)> =
        (0..CONTENTS).filter(|&i| present(i) && i >= 1000).map(|i| (digests[i], location(i, 2))).collect();
    index.put_contents(&second).await.unwrap();
    index.put_contents(&[]).await.unwrap();

    let started = Instant::now();
    let got = index.get_contents(&digests).await.unwrap();
    eprintln!("get_contents of {CONTENTS} took {:?}", started.elapsed());
    assert_eq!(got.len(), CONTENTS);
    for (i, loc) in got.iter().enumerate() {
        let want = present(i).then(|| location(i, if i < 2000 { 1 } else { 2 }));
        assert_eq!(loc.as_ref(), want.as_ref(), "content {i}");
    }
    assert!(index.get_contents(&[]).await.unwrap().is_empty());

    assert_eq!(index.get_layer(&layer(1).diff_id).await.unwrap(), None);
    index.put_layer(&layer(1)).await.unwrap();
    assert_eq!(index.get_layer(&layer(1).diff_id).await.unwrap(), Some(layer(1)));
    // Reuse goes by the compressed blob that produced a layer, never by its diffID alone.
    let blob = digest("compressed", 1);
    assert_eq!(index.get_layer_from_blob(&blob).await.unwrap(), None);
    assert_eq!(index.get_layer_from_blob(&layer(1).diff_id).await.unwrap(), None);
    index.put_layer_from_blob(&blob, &layer(1)).await.unwrap();
    assert_eq!(index.get_layer_from_blob(&blob).await.unwrap(), Some(layer(1)));
    assert_eq!(index.get_layer_from_blob(&digest("compressed", 2)).await.unwrap(), None);

    let untagged = image(None);
    assert_eq!(index.get_image(&untagged.manifest_digest).await.unwrap(), None);
    // A record its decoder would refuse is not written.
    let mut too_many = image(None);
    too_many.manifest_digest = digest("too many layers", 1);
    too_many.layers = vec![too_many.layers[0].clone(); starlight_format::MAX_LAYERS as usize + 1];
    let err = index.put_image(&too_many).await.unwrap_err();
    assert!(matches!(err, IndexError::Unwritable { .. }), "{err}");
    assert!(err.to_string().contains("4097"), "{err}");
    assert_eq!(index.get_image(&too_many.manifest_digest).await.unwrap(), None);
    index.put_image(&untagged).await.unwrap();
    assert_eq!(index.get_image(&untagged.manifest_digest).await.unwrap(), Some(untagged.clone()));
    assert_eq!(index.resolve_tag(&untagged.name, "v1").await.unwrap(), None);
    let tagged = image(Some("v1"));
    index.put_image(&tagged).await.unwrap();
    assert_eq!(index.get_image(&tagged.manifest_digest).await.unwrap(), Some(tagged.clone()));
    assert_eq!(index.resolve_tag(&tagged.name, "v1").await.unwrap(), Some(tagged.manifest_digest));
    assert_eq!(index.resolve_tag(&tagged.name, "v2").await.unwrap(), None);
    assert_eq!(index.resolve_tag("127.0.0.1:5000/library/other", "v1").await.unwrap(), None);
}

/// Writes a value straight into Redis, bypassing the index (to plant corrupt records).
async fn redis_set(urls: &[String], cluster: bool, key: &str, value: &[u8]) {
    let cmd = redis::cmd("SET").arg(key).arg(value).clone();
    if cluster {
        let client = redis::cluster::ClusterClient::new(urls.to_vec()).unwrap();
        let mut conn = client.get_async_connection().await.unwrap();
        cmd.query_async::<()>(&mut conn).await.unwrap();
    } else {
        let client = redis::Client::open(urls[0].as_str()).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        cmd.query_async::<()>(&mut conn).await.unwrap();
    }
}

async fn redis_corruption(index: &RedisIndex, urls: &[String], cluster: bool) {
    let bad_layer = digest("diff", 99);
    let key = format!("sl:l:{}", bad_layer.hex());
    redis_set(urls, cluster, &key, b"not a record").await;
    match index.get_layer(&bad_layer).await {
        Err(IndexError::Corrupt { key: k, .. }) => assert_eq!(k, key),
        other => panic!("want Corrupt for {key}, got {other:?}"),
    }
    let bad_content = digest("content", 3);
    redis_set(urls, cluster, &format!("sl:c:{}", bad_content.hex()), &[b'C', 1, 0]).await;
    let err = index.get_contents(&[digest("content", 1), bad_content]).await.unwrap_err();
    assert!(matches!(err, IndexError::Corrupt { .. }), "{err}");
    redis_set(urls, cluster, "sl:t:app:bad", b"sha256:nothex").await;
    assert!(matches!(index.resolve_tag("app", "bad").await, Err(IndexError::Corrupt { .. })));
}

async fn s3_store(server: &S3Server, bucket: &str, prefix: &str) -> S3Store {
    let store = S3Store::with_config(
        bucket,
        prefix,
        &server.endpoint(),
        server.access_key(),
        server.secret_key(),
        S3Server::REGION,
    )
    .await
    .unwrap();
    store.ensure_bucket().await.unwrap();
    store.ensure_bucket().await.unwrap();
    store
}

#[tokio::test(flavor = "multi_thread")]
async fn local_dir_and_redb() {
    let dir = tempfile::tempdir().unwrap();
    let store = AnyStore::Local(LocalStore::open(dir.path().join("store")).unwrap());
    store_contract(&store, dir.path()).await;
    let index = AnyIndex::Redb(RedbIndex::open(dir.path().join("index.redb")).unwrap());
    index_contract(&index).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn s3_and_redis() {
    let s3 = S3Server::start();
    let redis = Redis::start();
    let scratch = tempfile::tempdir().unwrap();
    // A prefix with stray slashes must still give clean keys; the bucket root must work too.
    let store = AnyStore::S3(s3_store(&s3, "starlight-test", "/team/a/").await);
    store_contract(&store, scratch.path()).await;
    let root = s3_store(&s3, "starlight-root", "").await;
    root.put_bytes("x/y", Bytes::from_static(b"z")).await.unwrap();
    assert_eq!(root.get("x/y", 1).await.unwrap(), &b"z"[..]);
    // A missing bucket is a setup error, never "object not found".
    let (ak, sk, endpoint) = (s3.access_key(), s3.secret_key(), s3.endpoint());
    let nobucket = S3Store::with_config("no-such-bucket", "", &endpoint, ak, sk, S3Server::REGION);
    let err = nobucket.await.unwrap().get("x", 1).await.unwrap_err();
    assert!(matches!(err, StoreError::S3 { .. }), "{err}");
    // Wrong credentials are refused (the server checks signatures) with the server's reason.
    let forged = S3Store::with_config("starlight-test", "", &endpoint, ak, "wrong", S3Server::REGION);
    let err = forged.await.unwrap().size("x").await.unwrap_err();
    eprintln!("forged signature: {err}");
    assert!(matches!(err, StoreError::S3 { .. }), "{err}");

    let index = RedisIndex::single(&redis.url()).await.unwrap();
    index_contract(&AnyIndex::Redis(index.clone())).await;
    redis_corruption(&index, &[redis.url()], false).await;
    // The spec form used on the command line reaches the same data.
    let by_spec = AnyIndex::open(&redis.url()).await.unwrap();
    assert_eq!(by_spec.get_layer(&layer(1).diff_id).await.unwrap(), Some(layer(1)));
}

#[tokio::test(flavor = "multi_thread")]
async fn s3_and_redis_cluster() {
    let s3 = S3Server::start();
    let cluster = RedisCluster::start();
    let scratch = tempfile::tempdir().unwrap();
    let store = s3_store(&s3, "starlight-cluster", "p").await;
    store_contract(&store, scratch.path()).await;

    let index = RedisIndex::cluster(&cluster.urls()).await.unwrap();
    index_contract(&index).await;
    redis_corruption(&index, &cluster.urls(), true).await;
    let by_spec = AnyIndex::open(&cluster.spec()).await.unwrap();
    assert_eq!(by_spec.get_layer(&layer(1).diff_id).await.unwrap(), Some(layer(1)));
}

/// A backend that is down must fail in seconds with a clear error, not hang the converter.
#[tokio::test(flavor = "multi_thread")]
async fn dead_servers_fail_fast() {
    let started = Instant::now();
    let url = format!("redis://127.0.0.1:{}", free_port());
    let err = RedisIndex::single(&url).await.unwrap_err();
    assert!(matches!(err, IndexError::Backend { backend: "redis", .. }), "{err}");
    eprintln!("dead redis: {err} after {:?}", started.elapsed());
    assert!(started.elapsed() < Duration::from_secs(15));

    // A wedged server: the kernel completes the TCP handshake, nothing ever answers.
    let wedged = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let started = Instant::now();
    let url = format!("redis://{}", wedged.local_addr().unwrap());
    let err = RedisIndex::single(&url).await.unwrap_err();
    eprintln!("wedged redis: {err} after {:?}", started.elapsed());
    assert!(started.elapsed() < Duration::from_secs(20));

    let started = Instant::now();
    let endpoint = format!("http://127.0.0.1:{}", free_port());
    let store = S3Store::with_config("b", "", &endpoint, "k", "s", "us-east-1").await.unwrap();
    let err = store.put_bytes("k", Bytes::from_static(b"v")).await.unwrap_err();
    assert!(matches!(err, StoreError::S3 { .. }), "{err}");
    eprintln!("dead s3: {err} after {:?}", started.elapsed());
    assert!(started.elapsed() < Duration::from_secs(30));
}
