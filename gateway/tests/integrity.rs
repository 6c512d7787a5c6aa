//! Integrity of what the gateway stores and serves: a corrupt stored frame or batch is caught as
//! it is sent, counted, dropped and rebuilt; a conversion that failed for good is answered at once
//! from memory; two gateways sharing one index convert an image once.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use common::{gateway, metric, s3_redis};
use futures::StreamExt;
use starlight_conformance::layout::{Layer, host_arch, noise};
use starlight_conformance::servers::{Redis, Registry, S3Server};
use starlight_converter::Index;
use starlight_converter::index::AnyIndex;
use starlight_format::Digest;
use starlight_format::bundle::{Decoder, Event};
use starlight_gateway::starlight::Backends;
use tokio::net::TcpListener;

const LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";

/// Pushes an image of uncompressed tar `layers` to `registry` as `name:tag`; the config claims
/// `diff_ids` (the layers' own digests when `None`). Returns the layer digests.
async fn push(
    registry: &Registry,
    name: &str,
    tag: &str,
    layers: &[Vec<u8>],
    diff_ids: Option<Vec<Digest>>,
) -> Vec<Digest> {
    let base = format!("http://{}", registry.addr());
    let client = common::http();
    let blob = |data: Vec<u8>| {
        let (client, base) = (client.clone(), base.clone());
        async move {
            let digest = Digest::of(&data);
            let r = client.post(format!("{base}/v2/{name}/blobs/uploads/")).send().await.unwrap();
            assert_eq!(r.status(), 202, "upload start");
            let loc = r.headers()["location"].to_str().unwrap().to_string();
            let loc = if loc.starts_with("http") { loc } else { format!("{base}{loc}") };
            let sep = if loc.contains('?') { '&' } else { '?' };
            let r = client.put(format!("{loc}{sep}digest={digest}")).body(data).send().await.unwrap();
            assert_eq!(r.status(), 201, "upload of {digest}: {}", r.text().await.unwrap_or_default());
            digest
        }
    };
    let mut descs = Vec::new();
    let mut digests = Vec::new();
    for l in layers {
        let d = blob(l.clone()).await;
        descs.push(serde_json::json!({"mediaType": LAYER_TAR, "digest": d.to_string(), "size": l.len()}));
        digests.push(d);
    }
    let diff_ids = diff_ids.unwrap_or_else(|| digests.clone());
    let config = serde_json::json!({
        "architecture": host_arch(),
        "os": "linux",
        "config": {"Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids.iter().map(|d| d.to_string()).collect::<Vec<_>>()},
    })
    .to_string();
    let config_digest = blob(config.clone().into_bytes()).await;
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest.to_string(), "size": config.len()},
        "layers": descs,
    })
    .to_string();
    let r = client
        .put(format!("{base}/v2/{name}/manifests/{tag}"))
        .header("content-type", "application/vnd.oci.image.manifest.v1+json")
        .body(manifest)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "manifest push: {}", r.text().await.unwrap_or_default());
    digests
}

/// Local store and redb index under `dir`; the index is returned too, for the test to look in.
fn local_redb(dir: &Path) -> (Backends, AnyIndex) {
    let b = common::local_redb(dir);
    let index = b.index.clone();
    (b, index)
}

/// A bundle's contents by digest, or why it was refused or cut.
async fn bundle(gw: &common::Gateway, name: &str, query: &str) -> Result<HashMap<Digest, Vec<u8>>, String> {
    let url = format!("{}/v2/{name}/_starlight/bundle?{query}", gw.url());
    let resp = common::http().get(&url).send().await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    if status != 200 {
        return Err(format!("{status} {}", resp.text().await.unwrap_or_default()));
    }
    let mut dec = Decoder::new();
    let (mut partial, mut contents): (HashMap<u64, Vec<u8>>, _) = (HashMap::new(), HashMap::new());
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| format!("body cut: {e}"))?;
        for ev in dec.feed(&chunk).map_err(|e| format!("bad bundle: {e}"))? {
            match ev {
                Event::Chunk { index, data, .. } => {
                    partial.entry(index).or_default().extend_from_slice(&data)
                }
                Event::ContentDone { index, digest } => {
                    contents.insert(digest, partial.remove(&index).unwrap_or_default());
                }
                Event::Patch { .. } => return Err("unexpected patch".into()),
                Event::Header(_) | Event::End => {}
            }
        }
    }
    dec.finish().map_err(|e| format!("incomplete bundle: {e}"))?;
    Ok(contents)
}

fn flip(path: &Path, at: u64) {
    let mut data = std::fs::read(path).unwrap();
    data[at as usize] ^= 0x20;
    std::fs::write(path, data).unwrap();
}

/// GETs of `blob` in `name` the registry logged.
fn blob_gets(registry: &Registry, name: &str, blob: &Digest) -> usize {
    registry.log().matches(&format!("\"GET /v2/{name}/blobs/{blob} ")).count()
}

/// Distinct small text files that compress far better together than one by one.
fn small_texts(n: usize) -> Vec<(String, Vec<u8>)> {
    const WORDS: [&str; 16] = [
        "layer", "image", "gateway", "bundle", "content", "frame", "digest", "worker", "registry", "index",
        "store", "batch", "patch", "trace", "order", "start",
    ];
    let mut x = 12345u64;
    let paragraph: String = (0..400)
        .map(|_| {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            WORDS[(x >> 60) as usize]
        })
        .collect::<Vec<_>>()
        .join(" ");
    (0..n).map(|i| (format!("etc/small-{i}.txt"), format!("file {i}\n{paragraph}\n").into_bytes())).collect()
}

#[tokio::test]
async fn a_flipped_byte_in_a_stored_frame_is_caught_counted_and_the_image_converted_again() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start();
    let big = noise(1 << 20, 7);
    let layer = Layer::new().file("opt/big.bin", &big).file("etc/hello", b"hello\n").finish();
    let layers = push(&registry, "flip", "v1", &[layer], None).await;
    let (backends, index) = local_redb(dir.path());
    let gw = gateway(&registry, dir.path(), backends).await;

    let first = bundle(&gw, "flip", "to=v1").await.unwrap();
    let big_digest = Digest::of(&big);
    assert_eq!(first[&big_digest], big);

    // One byte of the big content's first stored frame, flipped on disk.
    let loc = index.get_contents(&[big_digest]).await.unwrap().pop().flatten().unwrap();
    let f = loc.frames[0];
    let blob = dir.path().join("store/blobs/sha256").join(loc.blob.hex());
    flip(&blob, f.offset + u64::from(f.clen) / 2);

    let cut = bundle(&gw, "flip", "to=v1").await;
    assert!(cut.is_err(), "a bundle with a corrupt frame is cut, not completed");
    assert_eq!(metric(&gw, "starlight_gateway_corrupt_objects_total{kind=\"blob\"}").await, 1);
    assert!(!blob.exists(), "the corrupt blob is dropped");

    // The next request converts the image again from the registry and is whole and correct.
    let again = bundle(&gw, "flip", "to=v1").await.unwrap();
    assert_eq!(again[&big_digest], big);
    assert_eq!(again.len(), first.len());
    assert_eq!(metric(&gw, "starlight_gateway_conversions_total{result=\"ok\"}").await, 2);
    assert_eq!(blob_gets(&registry, "flip", &layers[0]), 2, "fetched once per conversion");
    gw.stop().await;
}

#[tokio::test]
async fn the_out_of_band_content_endpoint_checks_what_it_sends() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start();
    let big = noise(1 << 20, 5);
    let layer = Layer::new().file("opt/big.bin", &big).finish();
    push(&registry, "oob", "v1", &[layer], None).await;
    let (backends, index) = local_redb(dir.path());
    let gw = gateway(&registry, dir.path(), backends).await;
    let big_digest = Digest::of(&big);
    let url = format!("{}/v2/oob/_starlight/content/{big_digest}?to=v1", gw.url());
    let get = || async {
        let r = common::http().get(&url).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let body = r.bytes().await.map_err(|e| e.to_string())?;
        zstd::stream::decode_all(&body[..]).map_err(|e| e.to_string())
    };
    assert_eq!(get().await.unwrap(), big);

    let loc = index.get_contents(&[big_digest]).await.unwrap().pop().flatten().unwrap();
    let f = loc.frames[0];
    flip(&dir.path().join("store/blobs/sha256").join(loc.blob.hex()), f.offset + u64::from(f.clen) / 2);
    let cut = get().await;
    assert!(cut.as_ref().is_err(), "the corrupt content is cut, not sent whole: {:?}", cut.map(|b| b.len()));
    assert_eq!(metric(&gw, "starlight_gateway_corrupt_objects_total{kind=\"blob\"}").await, 1);
    assert_eq!(get().await.unwrap(), big, "converted again");
    gw.stop().await;
}

#[tokio::test]
async fn a_corrupt_blob_shared_with_another_image_heals_both() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start();
    let big = noise(1 << 20, 9);
    // The other image's layer holds the same big content, stored once: in the owner's blob.
    let owner = Layer::new().file("opt/big.bin", &big).file("etc/owner", b"owner\n").finish();
    let other = Layer::new().file("opt/big.bin", &big).file("etc/other", b"other\n").finish();
    push(&registry, "owner", "v1", &[owner], None).await;
    push(&registry, "other", "v1", &[other], None).await;
    let (backends, index) = local_redb(dir.path());
    let gw = gateway(&registry, dir.path(), backends).await;
    bundle(&gw, "owner", "to=v1").await.unwrap();
    bundle(&gw, "other", "to=v1").await.unwrap();

    let big_digest = Digest::of(&big);
    let loc = index.get_contents(&[big_digest]).await.unwrap().pop().flatten().unwrap();
    let f = loc.frames[0];
    flip(&dir.path().join("store/blobs/sha256").join(loc.blob.hex()), f.offset + u64::from(f.clen) / 2);

    assert!(bundle(&gw, "other", "to=v1").await.is_err(), "the corrupt frame is caught");
    assert_eq!(metric(&gw, "starlight_gateway_corrupt_objects_total{kind=\"blob\"}").await, 1);
    // Each image heals: at most one more failed request each (naming the dropped blob).
    for name in ["other", "owner"] {
        let got = match bundle(&gw, name, "to=v1").await {
            Ok(got) => got,
            Err(first) => bundle(&gw, name, "to=v1").await.unwrap_or_else(|e| panic!("{name}: {first}; {e}")),
        };
        assert_eq!(got[&big_digest], big, "{name}");
    }
    gw.stop().await;
}

#[tokio::test]
async fn a_corrupt_stored_batch_is_caught_counted_and_made_again() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start();
    let files = small_texts(40);
    let mut layer = Layer::new();
    for (p, d) in &files {
        layer = layer.file(p, d);
    }
    push(&registry, "batched", "v1", &[layer.finish()], None).await;
    let (backends, _) = local_redb(dir.path());
    let gw = gateway(&registry, dir.path(), backends).await;

    // The first bundle makes and keeps the batches, the second sends them from the store.
    let first = bundle(&gw, "batched", "to=v1").await.unwrap();
    bundle(&gw, "batched", "to=v1").await.unwrap();
    assert!(metric(&gw, "starlight_gateway_bundle_batches_total").await > 0, "batches were sent");

    let batches: Vec<_> = std::fs::read_dir(dir.path().join("store/batches/sha256"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| std::fs::metadata(p).unwrap().len() > 0)
        .collect();
    assert!(!batches.is_empty(), "a batch is stored");
    for b in &batches {
        flip(b, std::fs::metadata(b).unwrap().len() / 2);
    }

    let cut = bundle(&gw, "batched", "to=v1").await;
    assert!(cut.is_err(), "a bundle with a corrupt batch is cut, not completed");
    assert_eq!(metric(&gw, "starlight_gateway_corrupt_objects_total{kind=\"batch\"}").await, 1);

    let again = bundle(&gw, "batched", "to=v1").await.unwrap();
    assert_eq!(again, first, "the batch made again carries the right contents");
    for (_, d) in &files {
        assert_eq!(again[&Digest::of(d)], *d);
    }
    gw.stop().await;
}

#[tokio::test]
async fn a_conversion_that_failed_for_good_is_answered_at_once_without_fetching_again() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start();
    let layer = Layer::new().file("etc/hello", b"hello\n").finish();
    // The config claims a diffID the layer does not have.
    let layers = push(&registry, "baddiff", "v1", &[layer], Some(vec![Digest::of(b"not the layer")])).await;
    let (backends, _) = local_redb(dir.path());
    let gw = gateway(&registry, dir.path(), backends).await;

    let first = bundle(&gw, "baddiff", "to=v1").await.unwrap_err();
    assert!(first.starts_with("422 "), "{first}");
    assert_eq!(blob_gets(&registry, "baddiff", &layers[0]), 1, "{}", registry.log());

    let second = bundle(&gw, "baddiff", "to=v1").await.unwrap_err();
    assert_eq!(second, first, "the same error");
    assert_eq!(blob_gets(&registry, "baddiff", &layers[0]), 1, "the layer is not fetched again");
    assert_eq!(metric(&gw, "starlight_gateway_conversions_total{result=\"error\"}").await, 1);
    gw.stop().await;
}

/// Regression (security issue, item 7): a failed layer is remembered by what its manifest and
/// config claim of it, so another image naming the same bad layer (a new manifest costs an
/// attacker nothing) fails at once without fetching it; the same blob with its true diffID still
/// converts.
#[tokio::test]
async fn another_image_naming_a_failed_layer_fails_at_once_and_its_true_diff_id_still_converts() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start();
    let layer = Layer::new().file("etc/hello", b"hello\n").finish();
    let wrong = Some(vec![Digest::of(b"not the layer")]);
    let layers = push(&registry, "manybad", "v1", std::slice::from_ref(&layer), wrong.clone()).await;
    // Same layer, same wrong claim, another image (an extra layer makes another config).
    let other = Layer::new().file("etc/other", b"other\n").finish();
    let wrong2 = Some(vec![Digest::of(b"not the layer"), Digest::of(&other)]);
    push(&registry, "manybad", "v2", &[layer.clone(), other], wrong2).await;
    let (backends, _) = local_redb(dir.path());
    let gw = gateway(&registry, dir.path(), backends).await;

    let first = bundle(&gw, "manybad", "to=v1").await.unwrap_err();
    assert!(first.starts_with("422 ") && first.contains("diffID"), "{first}");
    assert_eq!(blob_gets(&registry, "manybad", &layers[0]), 1, "{}", registry.log());
    let second = bundle(&gw, "manybad", "to=v2").await.unwrap_err();
    assert!(second.starts_with("422 ") && second.contains("remembered"), "{second}");
    assert_eq!(blob_gets(&registry, "manybad", &layers[0]), 1, "the bad layer is not fetched again");

    // The same blob, named with its true diffID, is not refused.
    push(&registry, "manybad", "v3", std::slice::from_ref(&layer), None).await;
    let got = bundle(&gw, "manybad", "to=v3").await.unwrap();
    assert!(got.values().any(|c| c == b"hello\n"), "the true image converts and is served");
    gw.stop().await;
}

#[tokio::test]
async fn two_gateways_sharing_one_index_convert_an_image_once() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start();
    let (s3, redis) = (S3Server::start(), Redis::start());
    let big = noise(24 << 20, 11);
    let layer = Layer::new().file("opt/big.bin", &big).file("etc/hello", b"hello\n").finish();
    let layers = push(&registry, "shared", "v1", &[layer], None).await;
    let (d1, d2) = (dir.path().join("one"), dir.path().join("two"));
    std::fs::create_dir_all(&d1).unwrap();
    std::fs::create_dir_all(&d2).unwrap();
    let gw1 = gateway(&registry, &d1, s3_redis(&s3, &redis).await).await;
    let gw2 = gateway(&registry, &d2, s3_redis(&s3, &redis).await).await;

    let (a, b) = tokio::join!(bundle(&gw1, "shared", "to=v1"), bundle(&gw2, "shared", "to=v1"));
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(a[&Digest::of(&big)], big);
    assert_eq!(a, b);
    assert_eq!(blob_gets(&registry, "shared", &layers[0]), 1, "one conversion fetched the layer");
    let converted = metric(&gw1, "starlight_gateway_conversions_total{result=\"ok\"}").await
        + metric(&gw2, "starlight_gateway_conversions_total{result=\"ok\"}").await;
    assert!(converted <= 2, "{converted}");
    tokio::time::timeout(Duration::from_secs(30), async {
        gw1.stop().await;
        gw2.stop().await;
    })
    .await
    .unwrap();
}

/// What verification costs on a real image: warm bundles of the Debian app image from two gateways
/// over the same store and index, one verifying and one not, must be equal; their times are
/// printed (the figures in docs/api.md come from here).
#[tokio::test]
async fn a_verified_real_image_bundle_equals_the_unverified_one() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start();
    let layout = starlight_conformance::images::debian_layout();
    starlight_conformance::images::skopeo_copy(
        &format!("oci:{}:app", layout.display()),
        &format!("docker://{}/debian:app", registry.addr()),
        None,
    );
    let (backends, index) = local_redb(dir.path());
    let store = backends.store.clone();
    let checked = gateway(&registry, dir.path(), backends).await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut config = common::config(&format!("http://{}", registry.addr()));
    config.upstream_timeout = 30.0;
    config.verify_bundles = false;
    let unchecked = common::start_on(listener, config, Some(Backends { store, index })).await;

    // Converted, batches made, plans kept.
    let want = bundle(&checked, "debian", "to=app").await.unwrap();
    bundle(&unchecked, "debian", "to=app").await.unwrap();
    let (mut with, mut without) = (Duration::MAX, Duration::MAX);
    for _ in 0..3 {
        let t = std::time::Instant::now();
        let got = bundle(&checked, "debian", "to=app").await.unwrap();
        with = with.min(t.elapsed());
        assert_eq!(got.len(), want.len());
        let t = std::time::Instant::now();
        let got = bundle(&unchecked, "debian", "to=app").await.unwrap();
        without = without.min(t.elapsed());
        assert_eq!(got, want);
    }
    let bytes: usize = want.values().map(Vec::len).sum();
    eprintln!(
        "debian app bundle: {} contents, {:.1} MiB; best of 3: verified {:.0} ms, unverified {:.0} ms",
        want.len(),
        bytes as f64 / f64::from(1 << 20),
        with.as_secs_f64() * 1e3,
        without.as_secs_f64() * 1e3
    );
    checked.stop().await;
    unchecked.stop().await;
}
