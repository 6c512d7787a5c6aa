//! The gateway under hostile clients and failing upstreams: malformed paths, oversized or trickled
//! headers, an upstream that is down or silent, a client that leaves mid-download, overload, and
//! graceful shutdown.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http_body_util::StreamBody;
use hyper::body::Frame;
use starlight_conformance::servers::Registry;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

fn oci_code(body: &str) -> String {
    let v: serde_json::Value =
        serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"));
    v["errors"][0]["code"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn malformed_paths_get_oci_errors_and_never_reach_the_upstream() {
    let reg = Registry::start();
    let gw = Gateway::start(config(&format!("http://{}", reg.addr()))).await;
    // Raw requests: an HTTP library would normalize `..` and `%2e%2e` away before sending.
    for (path, status, code) in [
        ("/v2/../../etc/passwd/manifests/x", 400, "UNSUPPORTED"),
        ("/v2/a/../b/manifests/x", 400, "UNSUPPORTED"),
        ("/v2/a/%2e%2e/manifests/latest", 400, "UNSUPPORTED"),
        ("/v2/UPPER/manifests/latest", 400, "NAME_INVALID"),
        ("/v2/a//b/manifests/latest", 400, "NAME_INVALID"),
        ("/v2/a/nonsense/x", 404, "NOT_FOUND"),
        ("/etc/passwd", 404, "NOT_FOUND"),
    ] {
        let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        let ans = raw(gw.addr, req.as_bytes(), Duration::from_secs(2)).await;
        assert!(ans.starts_with(&format!("HTTP/1.1 {status}")), "{path}: {ans}");
        assert!(ans.to_ascii_lowercase().contains("x-request-id:"), "{path}: {ans}");
        let body = &ans[ans.find("\r\n\r\n").unwrap() + 4..];
        assert_eq!(oci_code(body), code, "{path}");
    }
    // The registry saw none of them: its log has no request for these paths.
    let log = reg.log();
    assert!(!log.contains("etc/passwd") && !log.contains("UPPER") && !log.contains("nonsense"), "{log}");
    gw.stop().await;
}

#[tokio::test]
async fn oversized_headers_get_431() {
    let reg = Registry::start();
    let gw = Gateway::start(config(&format!("http://{}", reg.addr()))).await;
    let big = format!("GET /v2/ HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n", "a".repeat(100 * 1024));
    let ans = raw(gw.addr, big.as_bytes(), Duration::from_secs(3)).await;
    assert!(ans.starts_with("HTTP/1.1 431"), "{}", &ans[..ans.len().min(200)]);
    gw.stop().await;
}

#[tokio::test]
async fn headers_sent_one_byte_at_a_time_still_work_and_a_stalled_head_is_cut() {
    let reg = Registry::start();
    let gw = Gateway::start(config(&format!("http://{}", reg.addr()))).await;
    let req = b"GET /v2/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    for b in req {
        s.write_all(&[*b]).await.unwrap();
        s.flush().await.unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let ans = read_all(&mut s, Duration::from_secs(3)).await;
    assert!(ans.starts_with("HTTP/1.1 200"), "{ans}");

    // A head that stops arriving is cut after the header-read timeout (2 s in tests).
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    let start = Instant::now();
    let ans = read_all(&mut s, Duration::from_secs(10)).await;
    assert!(start.elapsed() < Duration::from_secs(6), "stalled head kept open {:?}", start.elapsed());
    assert!(ans.is_empty() || ans.starts_with("HTTP/1.1 408"), "{ans}");
    gw.stop().await;
}

#[tokio::test]
async fn upstream_down_is_502_with_an_oci_error() {
    // A port nobody listens on.
    let port = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap().port();
    let gw = Gateway::start(config(&format!("http://127.0.0.1:{port}"))).await;
    let r = http().get(format!("{}/v2/a/manifests/latest", gw.url())).send().await.unwrap();
    assert_eq!(r.status(), 502);
    let body = r.text().await.unwrap();
    assert_eq!(oci_code(&body), "UNAVAILABLE");
    assert!(body.contains("upstream registry unreachable"), "{body}");
    let ready = http().get(format!("{}/readyz", gw.url())).send().await.unwrap();
    assert_eq!(ready.status(), 503);
    let live = http().get(format!("{}/healthz", gw.url())).send().await.unwrap();
    assert_eq!(live.status(), 200);
    gw.stop().await;
}

#[tokio::test]
async fn silent_upstream_is_504() {
    let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = silent.local_addr().unwrap();
    let held = tokio::spawn(async move {
        let mut conns = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            conns.push(s); // accept and never answer
        }
    });
    let gw = Gateway::start(config(&format!("http://{addr}"))).await;
    let start = Instant::now();
    let r = http().get(format!("{}/v2/a/manifests/latest", gw.url())).send().await.unwrap();
    assert_eq!(r.status(), 504);
    assert!(start.elapsed() >= Duration::from_secs(2) && start.elapsed() < Duration::from_secs(5));
    assert_eq!(oci_code(&r.text().await.unwrap()), "UNAVAILABLE");
    gw.stop().await;
    held.abort();
}

/// An upstream that streams an endless blob slowly and reports when its connection is released.
async fn endless_upstream(released: Arc<AtomicBool>, requests: Arc<AtomicUsize>) -> std::net::SocketAddr {
    struct Flag(Arc<AtomicBool>);
    impl Drop for Flag {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let released = released.clone();
            let requests = requests.clone();
            let svc = hyper::service::service_fn(move |_req| {
                requests.fetch_add(1, Ordering::SeqCst);
                let flag = Flag(released.clone());
                let stream = futures::stream::unfold(flag, |flag| async move {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    Some((Ok::<_, std::io::Error>(Frame::data(Bytes::from(vec![7u8; 64 * 1024]))), flag))
                });
                async move { Ok::<_, std::convert::Infallible>(hyper::Response::new(StreamBody::new(stream))) }
            });
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn client_leaving_mid_download_releases_the_upstream_connection() {
    let released = Arc::new(AtomicBool::new(false));
    let requests = Arc::new(AtomicUsize::new(0));
    let up = endless_upstream(released.clone(), requests.clone()).await;
    let gw = Gateway::start(config(&format!("http://{up}"))).await;
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(b"GET /v2/a/blobs/sha256:0000000000000000000000000000000000000000000000000000000000000000 HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0;
    while got < 200 * 1024 {
        use tokio::io::AsyncReadExt;
        got += s.read(&mut buf).await.unwrap();
    }
    assert!(!released.load(Ordering::SeqCst));
    drop(s); // the client goes away mid-download
    let deadline = Instant::now() + Duration::from_secs(5);
    while !released.load(Ordering::SeqCst) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(released.load(Ordering::SeqCst), "the upstream response was not released after the client left");
    let metrics = http().get(format!("{}/metrics", gw.url())).send().await.unwrap().text().await.unwrap();
    assert!(
        metrics.contains("starlight_gateway_http_responses_cut_short_total{route=\"blobs\"} 1"),
        "{metrics}"
    );
    gw.stop().await;
}

#[tokio::test]
async fn overload_is_shed_with_503() {
    let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = silent.local_addr().unwrap();
    let held = tokio::spawn(async move {
        let mut conns = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            conns.push(s);
        }
    });
    let mut cfg = config(&format!("http://{addr}"));
    cfg.max_concurrency = 1;
    let gw = Gateway::start(cfg).await;
    let url = format!("{}/v2/a/manifests/latest", gw.url());
    let first = tokio::spawn(async move { http().get(url).send().await.unwrap().status() });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = http().get(format!("{}/v2/a/manifests/other", gw.url())).send().await.unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(oci_code(&r.text().await.unwrap()), "TOOMANYREQUESTS");
    assert_eq!(first.await.unwrap(), 504);
    gw.stop().await;
    held.abort();
}

#[tokio::test]
async fn graceful_shutdown_lets_in_flight_downloads_finish() {
    let reg = Registry::start();
    let mut gw = Gateway::start(config(&format!("http://{}", reg.addr()))).await;
    // Push a 32 MiB blob directly to the registry, then download it through the gateway slowly.
    let data = vec![42u8; 32 << 20];
    let digest = format!("sha256:{}", starlight_format::Digest::of(&data).hex());
    let c = http();
    let r = c.post(format!("http://{}/v2/big/blobs/uploads/", reg.addr())).send().await.unwrap();
    assert_eq!(r.status(), 202);
    let location = r.headers()["location"].to_str().unwrap().to_string();
    let sep = if location.contains('?') { '&' } else { '?' };
    let r = c.put(format!("{location}{sep}digest={digest}")).body(data.clone()).send().await.unwrap();
    assert_eq!(r.status(), 201);
    let mut resp = c.get(format!("{}/v2/big/blobs/{digest}", gw.url())).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let first = resp.chunk().await.unwrap().unwrap();
    let done = gw.begin_stop();
    tokio::time::sleep(Duration::from_millis(200)).await;
    // New connections are refused once shutdown began...
    assert!(TcpStream::connect(gw.addr).await.is_err());
    // ...but the download in flight completes.
    let mut total = first.len();
    while let Some(chunk) = resp.chunk().await.unwrap() {
        total += chunk.len();
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert_eq!(total, data.len());
    done.await.unwrap().unwrap();
}

/// Regression: a response read to its end is logged and counted as complete, not cut short
/// (hyper drops a Content-Length body without polling it past its last byte).
#[tokio::test]
async fn complete_responses_are_not_counted_as_cut_short() {
    let reg = Registry::start();
    let gw = Gateway::start(config(&format!("http://{}", reg.addr()))).await;
    for _ in 0..3 {
        let r = http().get(format!("{}/v2/", gw.url())).send().await.unwrap();
        assert_eq!(r.status(), 200);
        r.bytes().await.unwrap();
        let r = http().get(format!("{}/v2/x/manifests/missing", gw.url())).send().await.unwrap();
        assert_eq!(r.status(), 404);
        r.bytes().await.unwrap();
    }
    let metrics = http().get(format!("{}/metrics", gw.url())).send().await.unwrap().text().await.unwrap();
    assert!(
        metrics.contains(
            "starlight_gateway_http_requests_total{method=\"GET\",route=\"manifests\",status=\"404\"} 3"
        ),
        "{metrics}"
    );
    assert!(!metrics.contains("cut_short_total{"), "{metrics}");
    gw.stop().await;
}
