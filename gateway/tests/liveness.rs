//! Liveness under slow, silent and departing clients: no client may hold a connection, a
//! concurrency slot, read-ahead memory or recompression work past a bounded time, and shared work
//! completes whatever any one client does. Each test sets short limits through the config.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use common::metric;
use starlight_conformance::images::skopeo_copy;
use starlight_conformance::layout::{Layer, noise, write_image};
use starlight_conformance::servers::Registry;
use starlight_converter::index::{AnyIndex, RedbIndex};
use starlight_converter::store::{AnyStore, LocalStore};
use starlight_gateway::Config;
use starlight_gateway::starlight::Backends;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

async fn gateway(registry: &Registry, dir: &Path, tune: impl FnOnce(&mut Config)) -> common::Gateway {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut config = common::config(&format!("http://{}", registry.addr()));
    config.upstream_timeout = 30.0;
    config.work_dir = Some(dir.to_path_buf());
    tune(&mut config);
    let backends = Backends {
        store: AnyStore::Local(LocalStore::open(dir.join("store")).unwrap()),
        index: AnyIndex::Redb(RedbIndex::open(dir.join("index.redb")).unwrap()),
    };
    common::start_on(listener, config, Some(backends)).await
}

/// Pushes an image of `files` files of `size` bytes each (distinct for each `seed`) as `name:v1`.
/// The first half of every file is the same, so that batches of them pay.
fn push_image(dir: &Path, registry: &Registry, name: &str, files: usize, size: usize, seed: u64) {
    let layout = dir.join(format!("layout-{name}"));
    let mut layer = Layer::new().dir("data", 0o755);
    let common = noise(size / 2, seed * 100_000);
    for i in 0..files {
        let mut data = common.clone();
        data.extend(noise(size - size / 2, seed * 100_000 + 1 + i as u64));
        layer = layer.file(&format!("data/f{i:04}"), &data);
    }
    write_image(&layout, "v1", &[layer.finish()], &["/data/f0000"]);
    skopeo_copy(
        &format!("oci:{}:v1", layout.display()),
        &format!("docker://{}/{name}:v1", registry.addr()),
        None,
    );
}

/// Reads until the server closes the connection; `None` if it is still open after `wait`.
async fn closed_within(s: &mut TcpStream, wait: Duration) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    match tokio::time::timeout(wait, s.read_to_end(&mut out)).await {
        Ok(_) => Some(out),
        Err(_) => None,
    }
}

/// A connection from `ip` (any 127.0.0.0/8 address) that takes at most a few KiB at a time.
async fn reluctant(ip: [u8; 4], to: SocketAddr) -> TcpStream {
    let s = TcpSocket::new_v4().unwrap();
    s.set_recv_buffer_size(4096).unwrap();
    s.bind(SocketAddr::from((ip, 0))).unwrap();
    s.connect(to).await.unwrap()
}

fn bundle_request(name: &str) -> Vec<u8> {
    format!("GET /v2/{name}/_starlight/bundle?to=v1 HTTP/1.1\r\nhost: gw\r\n\r\n").into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_that_send_nothing_are_closed_after_the_idle_timeout() {
    let registry = Registry::start();
    let dir = tempfile::tempdir().unwrap();
    // The head timeout is long: only the idle timeout can close these.
    let gw = gateway(&registry, dir.path(), |c| {
        c.idle_timeout = 1.0;
        c.header_read_timeout = 60.0;
    })
    .await;
    // Never a byte.
    let mut silent = TcpStream::connect(gw.addr).await.unwrap();
    // One request, then nothing (HTTP/1.1 keep-alive).
    let mut kept = TcpStream::connect(gw.addr).await.unwrap();
    kept.write_all(b"GET /healthz HTTP/1.1\r\nhost: gw\r\n\r\n").await.unwrap();
    // HTTP/2 (prior knowledge): the preface and empty settings, then nothing.
    let mut h2 = TcpStream::connect(gw.addr).await.unwrap();
    h2.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00").await.unwrap();
    let started = Instant::now();
    assert!(closed_within(&mut silent, Duration::from_secs(10)).await.is_some(), "silent connection kept");
    let answered = closed_within(&mut kept, Duration::from_secs(10)).await.expect("idle keep-alive kept");
    assert!(String::from_utf8_lossy(&answered).starts_with("HTTP/1.1 200"), "{answered:?}");
    assert!(closed_within(&mut h2, Duration::from_secs(10)).await.is_some(), "idle HTTP/2 connection kept");
    assert!(started.elapsed() >= Duration::from_millis(900), "closed before the idle timeout");
    assert!(metric(&gw, "starlight_gateway_timeouts_total{reason=\"idle\"}").await >= 3);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_max_connections_new_ones_get_503_and_health_answers_once_idle_ones_go() {
    let registry = Registry::start();
    let dir = tempfile::tempdir().unwrap();
    let gw = gateway(&registry, dir.path(), |c| {
        c.max_connections = 4;
        c.idle_timeout = 2.0;
    })
    .await;
    let mut idle = Vec::new();
    for _ in 0..4 {
        idle.push(TcpStream::connect(gw.addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let refused =
        common::raw(gw.addr, b"GET /healthz HTTP/1.1\r\nhost: gw\r\n\r\n", Duration::from_secs(5)).await;
    assert!(refused.starts_with("HTTP/1.1 503"), "{refused}");
    assert!(refused.to_ascii_lowercase().contains("connection: close"), "{refused}");
    assert!(refused.contains("TOOMANYREQUESTS") && refused.contains("4 connections"), "{refused}");
    // The idle ones are closed after the idle timeout; then health answers again.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = common::raw(
            gw.addr,
            b"GET /healthz HTTP/1.1\r\nhost: gw\r\nconnection: close\r\n\r\n",
            Duration::from_secs(5),
        )
        .await;
        if r.starts_with("HTTP/1.1 200") {
            break;
        }
        assert!(Instant::now() < deadline, "health never answered: {r}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(metric(&gw, "starlight_gateway_connections_refused_total").await >= 1);
    gw.stop().await;
}

/// Starts an upload to `name` and sends a chunk announcing 1000 bytes, then 10 of them, then nothing.
async fn stalled_upload(gw: &common::Gateway, name: &str) -> TcpStream {
    let r = common::http().post(format!("{}/v2/{name}/blobs/uploads/", gw.url())).send().await.unwrap();
    assert_eq!(r.status(), 202);
    let location = r.headers()["location"].to_str().unwrap().to_string();
    let path = match location.split_once("://") {
        Some((_, rest)) => &rest[rest.find('/').unwrap()..],
        None => location.as_str(),
    };
    stalled_body(gw.addr, &format!("PATCH {path}")).await
}

/// Sends a request head announcing a 1000-byte body, then 10 bytes of it, then nothing.
async fn stalled_body(addr: SocketAddr, method_and_path: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let head = format!("{method_and_path} HTTP/1.1\r\nhost: gw\r\ncontent-length: 1000\r\n\r\n0123456789");
    s.write_all(head.as_bytes()).await.unwrap();
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_body_gets_408_and_frees_its_slot_for_uploads_and_starlight_posts() {
    let registry = Registry::start();
    let dir = tempfile::tempdir().unwrap();
    push_image(dir.path(), &registry, "img", 2, 1000, 1);
    let gw = gateway(&registry, dir.path(), |c| {
        c.body_read_timeout = 1.0;
        c.max_concurrency = 1;
        c.max_starlight_concurrency = 1;
    })
    .await;
    for what in ["an upload", "a held-contents list"] {
        let mut s = match what {
            "an upload" => stalled_upload(&gw, "img").await,
            _ => stalled_body(gw.addr, "POST /v2/img/_starlight/bundle?to=v1").await,
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        // While it stalls, it holds the branch's only slot.
        let busy = common::http().get(format!("{}/v2/", gw.url())).send().await.unwrap().status();
        if what == "an upload" {
            assert_eq!(busy, 503, "the stalled upload holds the pass-through's slot");
        }
        let answer = closed_within(&mut s, Duration::from_secs(10)).await;
        let answer = String::from_utf8_lossy(&answer.unwrap_or_default()).into_owned();
        assert!(answer.starts_with("HTTP/1.1 408"), "{what}: {answer}");
        let after = common::http().get(format!("{}/v2/", gw.url())).send().await.unwrap().status();
        assert_eq!(after, 200, "{what}: the slot is free again");
    }
    assert!(metric(&gw, "starlight_gateway_timeouts_total{reason=\"body_read\"}").await >= 2);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_pass_through_does_not_starve_the_starlight_endpoints() {
    let registry = Registry::start();
    let dir = tempfile::tempdir().unwrap();
    push_image(dir.path(), &registry, "img", 2, 1000, 2);
    let gw = gateway(&registry, dir.path(), |c| {
        c.body_read_timeout = 30.0;
        c.max_concurrency = 1;
        c.max_starlight_concurrency = 1;
    })
    .await;
    let _upload = stalled_upload(&gw, "img").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let pass = common::http().get(format!("{}/v2/", gw.url())).send().await.unwrap().status();
    assert_eq!(pass, 503, "the pass-through is full");
    let b = common::bundle::fetch(&gw.url(), "img", "to=v1", None, None).await;
    assert!(b.is_ok(), "a bundle while the pass-through is full: {:?}", b.err());
    let health = common::http().get(format!("{}/healthz", gw.url())).send().await.unwrap().status();
    assert_eq!(health, 200);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bundle_client_that_reads_nothing_is_cut_and_its_budget_returned() {
    let registry = Registry::start();
    let dir = tempfile::tempdir().unwrap();
    // 24 MiB that does not compress: more than the sockets' buffers hold.
    push_image(dir.path(), &registry, "big", 12, 2 << 20, 3);
    // The whole read-ahead budget fits one bundle.
    let gw = gateway(&registry, dir.path(), |c| {
        c.bundle_read_ahead = 1 << 20;
        c.bundle_memory_per_client = 1 << 20;
        c.bundle_memory = 1 << 20;
        c.write_stall_timeout = 1.0;
    })
    .await;
    let first = common::bundle::fetch(&gw.url(), "big", "to=v1", None, None).await.unwrap();
    let mut silent = reluctant([127, 0, 0, 2], gw.addr).await;
    silent.write_all(&bundle_request("big")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = Instant::now();
    let again = tokio::time::timeout(
        Duration::from_secs(30),
        common::bundle::fetch(&gw.url(), "big", "to=v1", None, None),
    )
    .await
    .expect("a bundle waited on a client that reads nothing")
    .unwrap();
    assert_eq!(again.contents.len(), first.contents.len());
    assert!(started.elapsed() < Duration::from_secs(30));
    // Cut by the connection's write-stall timeout or by its bundle's own, whichever fires first
    // (both use `write_stall_timeout`).
    let cuts = metric(&gw, "starlight_gateway_timeouts_total{reason=\"write_stall\"}").await
        + metric(&gw, "starlight_gateway_timeouts_total{reason=\"bundle_stall\"}").await;
    assert!(cuts >= 1, "the silent client was not cut by a timeout");
    // The silent client got part of its bundle, then the end of the connection.
    let got = closed_within(&mut silent, Duration::from_secs(10)).await.expect("the silent client is cut");
    assert!(got.len() < 24 << 20, "{} bytes", got.len());
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seven_clients_that_read_nothing_take_no_more_than_their_share() {
    let registry = Registry::start();
    let dir = tempfile::tempdir().unwrap();
    push_image(dir.path(), &registry, "big", 12, 2 << 20, 4);
    // No write-stall cut within the test: only fairness can let the reader through.
    let gw = gateway(&registry, dir.path(), |c| {
        c.bundle_read_ahead = 1 << 20;
        c.bundle_memory_per_client = 2 << 20;
        c.bundle_memory = 4 << 20;
        c.write_stall_timeout = 600.0;
    })
    .await;
    let first = common::bundle::fetch(&gw.url(), "big", "to=v1", None, None).await.unwrap();
    let mut silent = Vec::new();
    for _ in 0..7 {
        let mut s = reluctant([127, 0, 0, 2], gw.addr).await;
        s.write_all(&bundle_request("big")).await.unwrap();
        silent.push(s);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let again = tokio::time::timeout(
        Duration::from_secs(30),
        common::bundle::fetch(&gw.url(), "big", "to=v1", None, None),
    )
    .await
    .expect("seven silent clients stalled the others' bundles")
    .unwrap();
    assert_eq!(again.contents.len(), first.contents.len());
    drop(silent);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_leaving_after_the_header_does_not_stall_other_bundles() {
    let registry = Registry::start();
    let dir = tempfile::tempdir().unwrap();
    // Many small files: bundles of these need batches made first.
    push_image(dir.path(), &registry, "small1", 400, 60 << 10, 5);
    push_image(dir.path(), &registry, "small2", 400, 60 << 10, 6);
    // One making at a time, and room for a bundle to have many in flight.
    let gw = gateway(&registry, dir.path(), |c| {
        c.recompress_workers = 1;
        c.bundle_read_ahead = 32 << 20;
        c.bundle_memory_per_client = 32 << 20;
        c.bundle_memory = 64 << 20;
    })
    .await;
    let mut leaving = TcpStream::connect(gw.addr).await.unwrap();
    leaving.write_all(&bundle_request("small1")).await.unwrap();
    let mut first = [0u8; 512];
    let n = leaving.read(&mut first).await.unwrap();
    assert!(String::from_utf8_lossy(&first[..n]).starts_with("HTTP/1.1 200"));
    drop(leaving);
    for name in ["small2", "small1"] {
        let fetched = tokio::time::timeout(
            Duration::from_secs(60),
            common::bundle::fetch(&gw.url(), name, "to=v1", None, None),
        )
        .await;
        let Ok(b) = fetched else { panic!("the bundle of {name} stalled after another client left") };
        let b = b.unwrap();
        assert_eq!(b.contents.len(), 400, "{name}");
    }
    assert!(metric(&gw, "starlight_gateway_bundle_batches_total").await >= 1);
    gw.stop().await;
}

/// A bundle request on an HTTP/2 connection (`send`): the response head and its body.
async fn h2_bundle(
    send: &mut hyper::client::conn::http2::SendRequest<http_body_util::Empty<bytes::Bytes>>,
    gw: &common::Gateway,
    name: &str,
) -> hyper::Response<hyper::body::Incoming> {
    let req = hyper::Request::get(format!("{}/v2/{name}/_starlight/bundle?to=v1", gw.url()))
        .body(http_body_util::Empty::new())
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    resp
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unread_http2_bundle_stream_is_cut_while_its_connection_progresses() {
    use http_body_util::BodyExt;
    let registry = Registry::start();
    let dir = tempfile::tempdir().unwrap();
    // 24 MiB that does not compress: more than a stream's flow-control window and send buffer.
    push_image(dir.path(), &registry, "big", 12, 2 << 20, 7);
    // The client's whole share fits one bundle's read-ahead.
    let gw = gateway(&registry, dir.path(), |c| {
        c.bundle_read_ahead = 1 << 20;
        c.bundle_memory_per_client = 1 << 20;
        c.bundle_memory = 8 << 20;
        c.write_stall_timeout = 1.0;
    })
    .await;
    // Converted first, so that the bundles below only stream.
    common::bundle::fetch(&gw.url(), "big", "to=v1", None, None).await.unwrap();
    // One HTTP/2 connection (prior knowledge) carries every request below.
    let tcp = TcpStream::connect(gw.addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .unwrap();
    let conn = tokio::spawn(conn);
    let unread = h2_bundle(&mut send, &gw, "big").await;
    let len: u64 = unread.headers()["content-length"].to_str().unwrap().parse().unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    for _ in 0..2 {
        let read = h2_bundle(&mut send, &gw, "big").await;
        let body = tokio::time::timeout(Duration::from_secs(30), read.into_body().collect())
            .await
            .expect("a bundle stalled behind an unread stream of its own connection")
            .expect("the read bundle ended with an error")
            .to_bytes();
        assert_eq!(body.len() as u64, len);
    }
    assert!(metric(&gw, "starlight_gateway_timeouts_total{reason=\"bundle_stall\"}").await >= 1);
    // The connection was never cut: only the unread stream was.
    assert_eq!(metric(&gw, "starlight_gateway_timeouts_total{reason=\"write_stall\"}").await, 0);
    assert!(!conn.is_finished(), "the connection was closed");
    // The unread stream, read now, gets what was sent before the cut, then an error.
    let got = tokio::time::timeout(Duration::from_secs(10), unread.into_body().collect()).await;
    assert!(matches!(got, Ok(Err(_))), "the unread stream did not end with an error");
    drop(send);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_leaving_mid_bundle_returns_its_budget_at_once() {
    let registry = Registry::start();
    let dir = tempfile::tempdir().unwrap();
    push_image(dir.path(), &registry, "big", 12, 2 << 20, 8);
    // The client's whole share fits one bundle's read-ahead, and no stall cut within the test:
    // only the bundle's end with its client can return the share.
    let gw = gateway(&registry, dir.path(), |c| {
        c.bundle_read_ahead = 1 << 20;
        c.bundle_memory_per_client = 1 << 20;
        c.bundle_memory = 8 << 20;
        c.write_stall_timeout = 600.0;
    })
    .await;
    let first = common::bundle::fetch(&gw.url(), "big", "to=v1", None, None).await.unwrap();
    let mut leaving = TcpStream::connect(gw.addr).await.unwrap();
    leaving.write_all(&bundle_request("big")).await.unwrap();
    let mut head = [0u8; 512];
    let n = leaving.read(&mut head).await.unwrap();
    assert!(String::from_utf8_lossy(&head[..n]).starts_with("HTTP/1.1 200"));
    drop(leaving);
    let again = tokio::time::timeout(
        Duration::from_secs(30),
        common::bundle::fetch(&gw.url(), "big", "to=v1", None, None),
    )
    .await
    .expect("a bundle waited on the budget of a client that left")
    .unwrap();
    assert_eq!(again.contents.len(), first.contents.len());
    assert_eq!(metric(&gw, "starlight_gateway_timeouts_total{reason=\"bundle_stall\"}").await, 0);
    gw.stop().await;
}
