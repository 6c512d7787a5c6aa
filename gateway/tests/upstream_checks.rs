//! What the gateway checks of what the upstream serves and declares (issue "Security and liveness",
//! item 8): a blob cut mid-conversion is the upstream's failure (502), not a corrupt layer (422);
//! a layer blob of another size than its manifest declares fails, naming both sizes; the
//! converter's caps are settings, and a layer past one is a 422 naming it.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use common::bundle::fetch;
use starlight_conformance::images::skopeo_copy;
use starlight_conformance::servers::Registry;
use starlight_converter::index::{AnyIndex, RedbIndex};
use starlight_converter::store::{AnyStore, LocalStore};
use starlight_gateway::Config;
use starlight_gateway::starlight::Backends;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

/// The corpus image pushed to `registry` as `corpus:v1`.
fn push_corpus(dir: &Path, registry: &Registry) {
    let layout = dir.join("layout");
    starlight_conformance::layout::corpus(&layout);
    skopeo_copy(
        &format!("oci:{}:v1", layout.display()),
        &format!("docker://{}/corpus:v1", registry.addr()),
        None,
    );
}

/// A gateway in front of `upstream` (`HOST:PORT`) on fresh local backends under `dir`.
async fn gateway(upstream: &str, dir: &Path, tune: impl FnOnce(&mut Config)) -> common::Gateway {
    std::fs::create_dir_all(dir).unwrap();
    let backends = Backends {
        store: AnyStore::Local(LocalStore::open(dir.join("store")).unwrap()),
        index: AnyIndex::Redb(RedbIndex::open(dir.join("index.redb")).unwrap()),
    };
    let mut config = common::config(&format!("http://{upstream}"));
    config.upstream_timeout = 30.0;
    config.work_dir = Some(dir.to_path_buf());
    tune(&mut config);
    common::start_on(TcpListener::bind("127.0.0.1:0").await.unwrap(), config, Some(backends)).await
}

/// `corpus:v1`'s manifest, straight from the registry.
async fn manifest(registry: &Registry) -> serde_json::Value {
    let url = format!("http://{}/v2/corpus/manifests/v1", registry.addr());
    let r = common::http().get(url).header("Accept", OCI_MANIFEST).send().await.unwrap();
    assert_eq!(r.status(), 200);
    serde_json::from_slice(&r.bytes().await.unwrap()).unwrap()
}

/// The index in `manifest["layers"]` of its largest layer.
fn largest_layer(manifest: &serde_json::Value) -> usize {
    let layers = manifest["layers"].as_array().unwrap();
    (0..layers.len()).max_by_key(|&i| layers[i]["size"].as_u64().unwrap()).unwrap()
}

/// A TCP relay on loopback in front of the registry that, while `cut` is set, passes the response
/// to a GET of blob `digest` only up to `allow` bytes (its head and part of its body), then
/// closes the connection: an upstream failing mid-blob.
struct CuttingRelay {
    addr: std::net::SocketAddr,
    cut: Arc<AtomicBool>,
    cuts: Arc<AtomicUsize>,
}

async fn cutting_relay(upstream: String, digest: String, allow: u64) -> CuttingRelay {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (cut, cuts) = (Arc::new(AtomicBool::new(true)), Arc::new(AtomicUsize::new(0)));
    let (cut2, cuts2) = (cut.clone(), cuts.clone());
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let server = TcpStream::connect(&upstream).await.unwrap();
            let (mut cr, mut cw) = client.into_split();
            let (mut sr, mut sw) = server.into_split();
            // Set once the client has asked for the blob on this connection: HTTP/1.1 without
            // pipelining, so every response byte after that belongs to the blob.
            let armed = Arc::new(AtomicBool::new(false));
            let armed2 = armed.clone();
            let (cut, cuts) = (cut2.clone(), cuts2.clone());
            let wanted = format!("GET /v2/corpus/blobs/{digest} ");
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 << 10];
                let mut tail = String::new();
                while let Ok(n) = cr.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    tail.push_str(&String::from_utf8_lossy(&buf[..n]));
                    if cut.load(Ordering::SeqCst) && tail.contains(&wanted) {
                        armed2.store(true, Ordering::SeqCst);
                    }
                    tail = tail.split_off(tail.len().saturating_sub(wanted.len()));
                    if sw.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 << 10];
                let mut sent = 0u64;
                while let Ok(n) = sr.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    let mut n = n as u64;
                    if armed.load(Ordering::SeqCst) {
                        n = n.min(allow - sent);
                        sent += n;
                    }
                    if cw.write_all(&buf[..n as usize]).await.is_err() {
                        break;
                    }
                    if armed.load(Ordering::SeqCst) && sent >= allow {
                        cuts.fetch_add(1, Ordering::SeqCst);
                        // Dropping both halves closes the client's connection mid-body.
                        break;
                    }
                }
            });
        }
    });
    CuttingRelay { addr, cut, cuts }
}

/// A cut from the upstream in the middle of a layer blob was answered 422 "corrupt or truncated
/// gzip stream", as if the image were bad; it is the upstream's failure: 502, naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_cut_by_the_upstream_mid_conversion_is_502_naming_the_upstream() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start();
    push_corpus(dir.path(), &registry);
    let m = manifest(&registry).await;
    let layer = &m["layers"][largest_layer(&m)];
    let (digest, size) = (layer["digest"].as_str().unwrap().to_string(), layer["size"].as_u64().unwrap());
    assert!(size > 1 << 20, "the corpus's largest layer is {size} bytes");
    let relay = cutting_relay(registry.addr(), digest.clone(), size / 2).await;
    let gw = gateway(&relay.addr.to_string(), &dir.path().join("gw"), |_| {}).await;

    let r = fetch(&gw.url(), "corpus", "to=v1", None, None).await.unwrap_err();
    assert_eq!(relay.cuts.load(Ordering::SeqCst), 1, "the relay cut the blob once");
    assert_eq!(r.status, 502, "{}", r.body);
    assert!(r.body.contains("UNAVAILABLE"), "{}", r.body);
    assert!(r.body.contains(&format!("layer blob {digest}")), "{}", r.body);
    assert!(r.body.contains(&format!("docker://{}/corpus", relay.addr)), "{}", r.body);
    assert!(!r.body.contains("gzip"), "{}", r.body);

    // Nothing about the image was held against it: with the upstream whole again, it converts.
    relay.cut.store(false, Ordering::SeqCst);
    let ok = fetch(&gw.url(), "corpus", "to=v1", None, None).await.unwrap();
    assert!(!ok.contents.is_empty());
    gw.stop().await;
}

/// Pushes `corpus:v1`'s manifest with its largest layer's `size` changed by `delta`, as `tag`.
async fn push_with_layer_size(registry: &Registry, tag: &str, delta: i64) -> (String, u64) {
    let mut m = manifest(registry).await;
    let i = largest_layer(&m);
    let real = m["layers"][i]["size"].as_u64().unwrap();
    m["layers"][i]["size"] = serde_json::json!(real.checked_add_signed(delta).unwrap());
    let url = format!("http://{}/v2/corpus/manifests/{tag}", registry.addr());
    let r = common::http()
        .put(url)
        .header("Content-Type", OCI_MANIFEST)
        .body(m.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        201,
        "the registry takes a manifest with a wrong size: {}",
        r.text().await.unwrap()
    );
    (m["layers"][i]["digest"].as_str().unwrap().to_string(), real)
}

/// Layer sizes declared in the manifest were never checked against the blob.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_layer_blob_of_another_size_than_declared_is_422_naming_the_layer_and_both_sizes() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start();
    push_corpus(dir.path(), &registry);
    let (digest, real) = push_with_layer_size(&registry, "declared-less", -4096).await;
    push_with_layer_size(&registry, "declared-more", 1).await;
    let gw = gateway(&registry.addr(), &dir.path().join("gw"), |_| {}).await;

    let r = fetch(&gw.url(), "corpus", "to=declared-less", None, None).await.unwrap_err();
    assert_eq!(r.status, 422, "{}", r.body);
    let says = format!("layer {digest}: blob is {real} bytes, longer than the {} bytes", real - 4096);
    assert!(r.body.contains(&says), "{}", r.body);

    let r = fetch(&gw.url(), "corpus", "to=declared-more", None, None).await.unwrap_err();
    assert_eq!(r.status, 422, "{}", r.body);
    let says = format!("layer {digest}: blob is {real} bytes, shorter than the {} bytes", real + 1);
    assert!(r.body.contains(&says), "{}", r.body);

    // The image as pushed converts.
    fetch(&gw.url(), "corpus", "to=v1", None, None).await.unwrap();
    gw.stop().await;
}

/// The gateway had no setting for the converter's caps (it used the defaults); a layer past a
/// configured cap is a 422 naming the cap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_converters_caps_are_settings_and_a_layer_past_one_is_422_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start();
    push_corpus(dir.path(), &registry);

    let gw = gateway(&registry.addr(), &dir.path().join("entries"), |c| c.convert_max_entries = 3).await;
    let r = fetch(&gw.url(), "corpus", "to=v1", None, None).await.unwrap_err();
    assert_eq!(r.status, 422, "{}", r.body);
    assert!(r.body.contains("more than 3 entries in one layer (max_entries)"), "{}", r.body);
    gw.stop().await;

    let gw =
        gateway(&registry.addr(), &dir.path().join("bytes"), |c| c.convert_max_layer_bytes = 1 << 20).await;
    let r = fetch(&gw.url(), "corpus", "to=v1", None, None).await.unwrap_err();
    assert_eq!(r.status, 422, "{}", r.body);
    assert!(r.body.contains("exceeds the cap of 1048576 bytes (max_layer_bytes"), "{}", r.body);
    gw.stop().await;

    // The defaults convert it.
    let gw = gateway(&registry.addr(), &dir.path().join("defaults"), |_| {}).await;
    fetch(&gw.url(), "corpus", "to=v1", None, None).await.unwrap();
    gw.stop().await;

    // Zero caps are refused when the configuration is checked.
    let mut c = common::config(&format!("http://{}", registry.addr()));
    c.convert_max_entries = 0;
    assert!(c.validate().unwrap_err().to_string().contains("convert_max_entries"));
}
