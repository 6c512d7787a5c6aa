//! The gateway's TLS listener (issue item 9): real clients (reqwest, skopeo) verify it with a test
//! CA, HTTP/2 is chosen by ALPN, a replaced certificate is served without a restart (a bad one is
//! not), the listener speaks only TLS, and a client that never starts its handshake is cut.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use starlight_conformance::images::skopeo_copy;
use starlight_conformance::layout::{Layer, write_image};
use starlight_conformance::servers::{Registry, TestCa, TokenServer, User};

/// A gateway in front of `upstream` serving TLS with `cert` and `key`.
async fn tls_gateway(upstream: &str, cert: &Path, key: &Path) -> Gateway {
    let cfg = starlight_gateway::Config {
        tls_cert: Some(cert.to_path_buf()),
        tls_key: Some(key.to_path_buf()),
        ..config(upstream)
    };
    Gateway::start(cfg).await
}

/// A client trusting only the CA certificate at `ca`, without connection reuse (every request
/// makes its own handshake, so it sees the certificate served now).
fn client(ca: &Path, http1_only: bool) -> reqwest::Client {
    let ca = reqwest::Certificate::from_pem(&std::fs::read(ca).unwrap()).unwrap();
    let b = reqwest::Client::builder()
        .tls_certs_only([ca])
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(10));
    let b = if http1_only { b.http1_only() } else { b };
    b.build().unwrap()
}

/// Replaces `dest` with a copy of `src` at once (by rename), as certificate tools do.
fn replace(src: &Path, dest: &Path) {
    let tmp = dest.with_extension("new");
    std::fs::copy(src, &tmp).unwrap();
    std::fs::rename(&tmp, dest).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_listener_negotiates_h2_by_alpn_and_serves_http1_to_clients_without_it() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path(), "gw");
    let (cert, key) = ca.server(dir.path(), "server");
    let reg = Registry::start();
    let gw = tls_gateway(&format!("http://{}", reg.addr()), &cert, &key).await;

    for (host, http1_only, version) in [
        (format!("127.0.0.1:{}", gw.addr.port()), false, reqwest::Version::HTTP_2),
        (format!("localhost:{}", gw.addr.port()), false, reqwest::Version::HTTP_2),
        (format!("127.0.0.1:{}", gw.addr.port()), true, reqwest::Version::HTTP_11),
    ] {
        for path in ["/v2/", "/healthz"] {
            let url = format!("https://{host}{path}");
            let resp = client(&ca.cert(), http1_only).get(&url).send().await.unwrap();
            assert_eq!(resp.status(), 200, "{url}");
            assert_eq!(resp.version(), version, "{url} (http1_only: {http1_only})");
        }
    }
    // A client that does not trust the test CA refuses the gateway's certificate.
    let e = reqwest::Client::new().get(format!("https://{}/v2/", gw.addr)).send().await.unwrap_err();
    assert!(format!("{e:?}").contains("UnknownIssuer"), "{e:?}");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_listener_speaks_only_tls_and_cuts_a_client_that_never_starts_its_handshake() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path(), "gw");
    let (cert, key) = ca.server(dir.path(), "server");
    let reg = Registry::start();
    // header_read_timeout is 2 s in `config`: the handshake gets as long.
    let gw = tls_gateway(&format!("http://{}", reg.addr()), &cert, &key).await;

    // Plain HTTP gets no HTTP answer.
    let answer = raw(gw.addr, b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n", Duration::from_secs(5)).await;
    assert!(!answer.starts_with("HTTP/"), "a plain-HTTP request was answered: {answer:?}");

    // A silent client is closed after the handshake timeout, not held open.
    let started = Instant::now();
    let mut silent = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let got = read_all(&mut silent, Duration::from_secs(10)).await;
    let waited = started.elapsed();
    assert!(got.is_empty(), "{got:?}");
    assert!(
        waited >= Duration::from_millis(1500) && waited < Duration::from_secs(6),
        "a silent connection was closed after {waited:?}, want about 2 s"
    );
    // Meanwhile and after, others are served.
    let resp = client(&ca.cert(), false).get(format!("https://{}/healthz", gw.addr)).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_certificate_files_replaced_are_served_without_a_restart_and_a_bad_pair_is_not() {
    let dir = tempfile::tempdir().unwrap();
    let (old_ca, new_ca) = (TestCa::new(dir.path(), "old"), TestCa::new(dir.path(), "new"));
    let (old_cert, old_key) = old_ca.server(&dir.path().join("old"), "server");
    let (new_cert, new_key) = new_ca.server(&dir.path().join("new"), "server");
    let live = dir.path().join("live");
    std::fs::create_dir(&live).unwrap();
    let (cert, key) = (live.join("server.crt"), live.join("server.key"));
    replace(&old_cert, &cert);
    replace(&old_key, &key);
    let reg = Registry::start();
    let gw = tls_gateway(&format!("http://{}", reg.addr()), &cert, &key).await;
    let url = format!("https://{}/healthz", gw.addr);
    let trusts = |ca: &TestCa| {
        let (c, url) = (client(&ca.cert(), false), url.clone());
        async move { c.get(&url).send().await.map(|r| r.status().as_u16()) }
    };
    assert_eq!(trusts(&old_ca).await.unwrap(), 200);
    assert!(trusts(&new_ca).await.is_err(), "the new CA's client accepted the old certificate");

    // Half a replacement (a certificate without its key) does not load: the old pair stays.
    replace(&new_cert, &cert);
    tokio::time::sleep(starlight_gateway::tls::RELOAD_EVERY * 3).await;
    assert_eq!(trusts(&old_ca).await.unwrap(), 200, "a mismatched pair replaced the one in use");

    // With its key, the new pair is served, on new connections, without a restart.
    replace(&new_key, &key);
    let deadline = Instant::now() + starlight_gateway::tls::RELOAD_EVERY * 5;
    while trusts(&new_ca).await.is_err() {
        assert!(Instant::now() < deadline, "the replaced certificate was not served");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(trusts(&old_ca).await.is_err(), "the old certificate is still served");
    gw.stop().await;
}

#[test]
fn tls_settings_go_in_pairs_and_unusable_files_are_named() {
    let mut cfg = config("http://127.0.0.1:1");
    cfg.tls_cert = Some(PathBuf::from("/nonexistent/cert.pem"));
    let e = cfg.validate().unwrap_err().to_string();
    assert!(e.contains("tls_cert") && e.contains("tls_key"), "{e}");
    cfg.tls_key = Some(PathBuf::from("/nonexistent/key.pem"));
    cfg.validate().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let e = rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        starlight_gateway::run(listener, cfg, async {}).await.unwrap_err()
    });
    assert!(e.contains("/nonexistent/cert.pem"), "{e}");
}

/// `skopeo copy` with the test CA in `--src-cert-dir` (or without it), as `creds`.
fn skopeo_pull(from: &str, to: &str, cert_dir: Option<&Path>, creds: &str) -> std::process::Output {
    let mut cmd = Command::new("skopeo");
    cmd.args(["copy", "--quiet", "--src-creds", creds]);
    match cert_dir {
        Some(d) => cmd.arg("--src-cert-dir").arg(d),
        None => cmd.arg("--src-tls-verify=true"),
    };
    cmd.arg(from).arg(to).output().unwrap_or_else(|e| panic!("skopeo (apt-get install -y skopeo): {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skopeo_pulls_through_the_tls_gateway_verified_with_the_test_ca() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(&dir.path().join("ca"), "gw");
    let (cert, key) = ca.server(dir.path(), "server");
    // skopeo trusts every `*.crt` of its cert dir as a CA.
    let cert_dir = dir.path().join("certs");
    std::fs::create_dir(&cert_dir).unwrap();
    std::fs::copy(ca.cert(), cert_dir.join("ca.crt")).unwrap();

    let tokens = TokenServer::start(vec![
        User::new("alice", "alice-pw", &[("alice/app", &["pull", "push"])]),
        User::new("bob", "bob-pw", &[("bob/app", &["pull", "push"])]),
    ]);
    let reg = Registry::start_with_token(&tokens);
    let layout = dir.path().join("layout");
    let layer = Layer::new().dir("etc", 0o755).file("etc/secret", b"alice's only").finish();
    write_image(&layout, "v1", &[layer], &["/bin/true"]);
    let src = format!("oci:{}:v1", layout.display());
    skopeo_copy(&src, &format!("docker://{}/alice/app:v1", reg.addr()), Some("alice:alice-pw"));
    let gw = tls_gateway(&format!("http://{}", reg.addr()), &cert, &key).await;

    let from = format!("docker://127.0.0.1:{}/alice/app:v1", gw.addr.port());
    let out_dir = dir.path().join("pulled");
    let (f, o) = (from.clone(), out_dir.clone());
    let (verified, unverified, other_tenant) = tokio::task::spawn_blocking(move || {
        let to = format!("oci:{}:v1", o.display());
        (
            skopeo_pull(&f, &to, Some(&cert_dir), "alice:alice-pw"),
            skopeo_pull(&f, &to, None, "alice:alice-pw"),
            skopeo_pull(&f, &to, Some(&cert_dir), "bob:bob-pw"),
        )
    })
    .await
    .unwrap();
    let err = String::from_utf8_lossy(&verified.stderr);
    assert!(verified.status.success(), "skopeo copy {from} with the test CA: {err}");
    assert!(out_dir.join("index.json").is_file());
    let err = String::from_utf8_lossy(&unverified.stderr);
    assert!(!unverified.status.success() && err.contains("certificate"), "without the CA: {err}");
    // The registry, not TLS, decides who reads what: bob is refused alice's image.
    let err = String::from_utf8_lossy(&other_tenant.stderr);
    assert!(!other_tenant.status.success(), "bob pulled alice's image: {err}");
    gw.stop().await;
}
