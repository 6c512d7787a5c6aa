//! The worker and TLS (issue item 9): `starlight-pull` verifies an `https://` gateway with the
//! system's roots plus `--ca-file`, and refuses to send credentials over plain HTTP to anything but
//! loopback unless told to, before any connection.

mod common;

use std::process::{Command, Output};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;

use starlight_conformance::images::skopeo_copy;
use starlight_conformance::layout::corpus;
use starlight_conformance::servers::{Registry, TestCa, TokenServer, User};

const PULL: &str = env!("CARGO_BIN_EXE_starlight-pull");
const SNAPSHOTTER: &str = env!("CARGO_BIN_EXE_starlight-snapshotter");

/// Runs `starlight-pull ARGS` to its end (off the async runtime's threads), without any
/// `STARLIGHT_*` setting of the environment the test runs in.
async fn pull(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(PULL);
    for (k, _) in std::env::vars() {
        if k.starts_with("STARLIGHT_") {
            c.env_remove(k);
        }
    }
    c.args(args).envs(env.iter().copied());
    tokio::task::spawn_blocking(move || c.output().unwrap()).await.unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starlight_pull_over_tls_verifies_the_gateway_with_the_ca_file_and_sends_the_user() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path(), "gw");
    let (cert, key) = ca.server(dir.path(), "server");
    let tokens = TokenServer::start(vec![
        User::new("alice", "alice-pw", &[("alice/corpus", &["pull", "push"])]),
        User::new("bob", "bob-pw", &[("bob/corpus", &["pull", "push"])]),
    ]);
    let registry = Registry::start_with_token(&tokens);
    let layout = dir.path().join("layout");
    corpus(&layout);
    let src = format!("oci:{}:v1", layout.display());
    skopeo_copy(&src, &format!("docker://{}/alice/corpus:v1", registry.addr()), Some("alice:alice-pw"));
    let gw = common::Gw::start_with(&registry, &dir.path().join("gw"), |c| {
        c.tls_cert = Some(cert.clone());
        c.tls_key = Some(key.clone());
    })
    .await;
    let gateway = format!("https://127.0.0.1:{}", gw.addr.port());
    let store = dir.path().join("worker");
    let store = store.to_str().unwrap();
    let ca_file = ca.cert();
    let ca_file = ca_file.to_str().unwrap();

    // Without the CA, the system's roots do not know the gateway's certificate.
    let out =
        pull(&["--gateway", &gateway, "--store", store, "--user", "alice:alice-pw", "alice/corpus:v1"], &[])
            .await;
    let err = stderr(&out);
    assert!(
        !out.status.success() && err.contains("certificate") && err.contains("UnknownIssuer"),
        "pulled without the CA: {err}"
    );

    // With it (flag), alice's credentials buy her token and the image arrives.
    let args = ["--gateway", &gateway, "--store", store, "--ca-file", ca_file, "--user", "alice:alice-pw"];
    let out = pull(&[&args[..], &["alice/corpus:v1"]].concat(), &[]).await;
    assert!(out.status.success(), "pull over TLS with --ca-file: {}", stderr(&out));
    let out = pull(&["--store", store, "list"], &[]).await;
    assert!(String::from_utf8_lossy(&out.stdout).contains("alice/corpus"), "{}", stderr(&out));

    // The CA from the environment, and bob's credentials: TLS passes, the registry refuses him.
    let env = [("STARLIGHT_CA_FILE", ca_file), ("STARLIGHT_CREDENTIALS", "bob:bob-pw")];
    let other = dir.path().join("bob");
    let out =
        pull(&["--gateway", &gateway, "--store", other.to_str().unwrap(), "alice/corpus:v1"], &env).await;
    let err = stderr(&out);
    assert!(!out.status.success() && err.contains("401") && !err.contains("certificate"), "bob: {err}");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_are_refused_over_plain_http_to_a_host_that_is_not_loopback_before_connecting() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("worker");
    let store = store.to_str().unwrap();
    // 10.0.0.1:1 is only a string here: the refusal comes before any connection to it.
    let gateway = "http://10.0.0.1:1";
    for (args, env) in [
        (vec!["--user", "alice:pw", "pull", "x/y:v1"], vec![]),
        (vec!["x/y:v1"], vec![("STARLIGHT_CREDENTIALS", "alice:pw")]),
        (vec!["--user", "alice:pw", "--containerd", "/nonexistent/containerd.sock", "x/y:v1"], vec![]),
    ] {
        let started = Instant::now();
        let out = pull(&[&["--gateway", gateway, "--store", store][..], &args].concat(), &env).await;
        let err = stderr(&out);
        assert!(!out.status.success(), "{args:?}: {err}");
        assert!(
            err.contains(gateway)
                && err.contains("plain HTTP")
                && err.contains("--allow-plain-http-credentials"),
            "{args:?}: {err}"
        );
        assert!(started.elapsed() < Duration::from_secs(5), "{args:?}: took {:?}", started.elapsed());
    }

    // The snapshotter refuses at start, rather than in every mount it would run.
    let out = tokio::task::spawn_blocking({
        let dir = dir.path().to_path_buf();
        move || {
            Command::new(SNAPSHOTTER)
                .args(["--gateway", gateway, "--user", "alice:pw", "--pull-bin", PULL])
                .arg("--socket")
                .arg(dir.join("sn.sock"))
                .arg("--root")
                .arg(dir.join("sn"))
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    let err = stderr(&out);
    assert!(!out.status.success() && err.contains("--allow-plain-http-credentials"), "snapshotter: {err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_are_refused_to_a_plain_http_token_service_that_is_not_loopback() {
    // A loopback stand-in for a gateway whose registry's challenge names a token service realm on
    // another host over plain HTTP (10.0.0.1:1 is only a string: nothing connects to it).
    let realm = "http://10.0.0.1:1/token";
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut s, _)) = listener.accept().await {
            let mut buf = vec![0u8; 8192];
            let _ = s.read(&mut buf).await;
            let answer = format!(
                "HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Bearer realm=\"{realm}\",service=\"r\",\
                 scope=\"repository:x/y:pull\"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
            let _ = s.write_all(answer.as_bytes()).await;
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("worker");
    let gateway = format!("http://{addr}");
    let started = Instant::now();
    let out = pull(
        &["--gateway", &gateway, "--store", store.to_str().unwrap(), "--user", "alice:pw", "x/y:v1"],
        &[],
    )
    .await;
    let err = stderr(&out);
    assert!(
        !out.status.success()
            && err.contains(&format!("token service {realm}"))
            && err.contains("plain HTTP")
            && err.contains("--allow-plain-http-credentials"),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
}
