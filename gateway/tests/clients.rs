//! Real clients through the gateway in front of a real registry: skopeo pushes and pulls, a real
//! containerd pulls with `ctr`, auth challenges pass through, ranges and redirects are preserved.

mod common;

use common::*;
use starlight_conformance::images::{debian_layout, skopeo_copy};
use starlight_conformance::servers::{Containerd, Registry};

/// The tests' configuration with room for a registry slowed down by a busy machine: these tests
/// check what passes through, not timeouts (`faults.rs` does; a 2 s limit gave a spurious 504 on
/// a loaded 2-core machine).
fn config(upstream: &str) -> starlight_gateway::Config {
    let mut c = common::config(upstream);
    c.upstream_timeout = 30.0;
    c
}

fn inspect_raw(reference: &str, creds: Option<&str>) -> Vec<u8> {
    let mut cmd = std::process::Command::new("skopeo");
    cmd.args(["inspect", "--raw", "--tls-verify=false"]);
    if let Some(c) = creds {
        cmd.args(["--creds", c]);
    }
    let out = cmd.arg(reference).output().unwrap();
    assert!(out.status.success(), "skopeo inspect {reference}: {}", String::from_utf8_lossy(&out.stderr));
    out.stdout
}

#[tokio::test(flavor = "multi_thread")]
async fn skopeo_pushes_and_pulls_through_the_gateway() {
    let layout = debian_layout();
    let reg = Registry::start();
    let gw = Gateway::start(config(&format!("http://{}", reg.addr()))).await;
    let through = format!("docker://{}/debian/redis:app", gw.addr);
    skopeo_copy(&format!("oci:{}:app", layout.display()), &through, None);

    // The registry itself has exactly what was pushed through the gateway.
    let direct = inspect_raw(&format!("docker://{}/debian/redis:app", reg.addr()), None);
    let original = inspect_raw(&format!("oci:{}:app", layout.display()), None);
    assert_eq!(direct, original, "the manifest arrived changed");

    // Pull back through the gateway into a fresh layout: same manifest, every blob intact
    // (skopeo verifies each blob's digest as it copies).
    let out = tempfile::tempdir().unwrap();
    let pulled = format!("oci:{}:pulled", out.path().display());
    skopeo_copy(&through, &pulled, None);
    assert_eq!(inspect_raw(&pulled, None), original);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn containerd_pulls_through_the_gateway() {
    let layout = debian_layout();
    let reg = Registry::start();
    skopeo_copy(
        &format!("oci:{}:app", layout.display()),
        &format!("docker://{}/debian/redis:app", reg.addr()),
        None,
    );
    let gw = Gateway::start(config(&format!("http://{}", reg.addr()))).await;
    let ctrd = Containerd::start("");
    let image = format!("{}/debian/redis:app", gw.addr);
    let out = ctrd.ctr(&["images", "pull", "--plain-http", &image]);
    assert!(
        out.status.success(),
        "ctr pull: {}{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        ctrd.log()
    );
    let list = ctrd.ctr(&["images", "ls", "-q"]);
    assert!(String::from_utf8_lossy(&list.stdout).lines().any(|l| l == image));
    // Unpacked: the image's rootfs is usable (the redis binary is in a snapshot).
    let check = ctrd.ctr(&["images", "check"]);
    let check = String::from_utf8_lossy(&check.stdout);
    assert!(check.lines().any(|l| l.starts_with(&image) && l.contains("complete")), "{check}");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn auth_challenges_and_credentials_pass_through() {
    let layout = debian_layout();
    let reg = Registry::start_with_htpasswd("alice", "s3cret");
    let gw = Gateway::start(config(&format!("http://{}", reg.addr()))).await;
    let c = http();
    let r = c.get(format!("{}/v2/", gw.url())).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let challenge = r.headers()["www-authenticate"].to_str().unwrap().to_string();
    assert!(challenge.starts_with("Basic realm=\"starlight-test\""), "{challenge}");
    let r = c.get(format!("{}/v2/", gw.url())).basic_auth("alice", Some("s3cret")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let r = c.get(format!("{}/v2/", gw.url())).basic_auth("alice", Some("wrong")).send().await.unwrap();
    assert_eq!(r.status(), 401);

    // A real client authenticating through the gateway, both ways.
    let through = format!("docker://{}/debian/base:1", gw.addr);
    skopeo_copy(&format!("oci:{}:base", layout.display()), &through, Some("alice:s3cret"));
    assert_eq!(
        inspect_raw(&through, Some("alice:s3cret")),
        inspect_raw(&format!("oci:{}:base", layout.display()), None)
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn ranges_headers_and_locations_are_preserved() {
    let reg = Registry::start();
    let gw = Gateway::start(config(&format!("http://{}", reg.addr()))).await;
    let c = http();
    let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let digest = format!("sha256:{}", starlight_format::Digest::of(&data).hex());

    // Upload through the gateway: Location points back at the gateway (relative), never at the
    // registry's own address.
    let r = c.post(format!("{}/v2/r/blobs/uploads/", gw.url())).send().await.unwrap();
    assert_eq!(r.status(), 202);
    let location = r.headers()["location"].to_str().unwrap().to_string();
    assert!(location.starts_with("/v2/r/blobs/uploads/"), "{location}");
    assert!(!location.contains(&reg.addr()), "{location}");
    assert!(r.headers().contains_key("docker-upload-uuid"));
    let sep = if location.contains('?') { '&' } else { '?' };
    let r =
        c.put(format!("{}{location}{sep}digest={digest}", gw.url())).body(data.clone()).send().await.unwrap();
    assert_eq!(r.status(), 201);

    // HEAD keeps the registry's headers; a Range GET is a 206 with exactly those bytes.
    let head = c.head(format!("{}/v2/r/blobs/{digest}", gw.url())).send().await.unwrap();
    assert_eq!(head.status(), 200);
    assert_eq!(head.headers()["content-length"], data.len().to_string().as_str());
    assert_eq!(head.headers()["docker-content-digest"], digest.as_str());
    let r = c
        .get(format!("{}/v2/r/blobs/{digest}", gw.url()))
        .header("range", "bytes=1000-1999")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(r.headers()["content-range"], format!("bytes 1000-1999/{}", data.len()).as_str());
    assert_eq!(r.bytes().await.unwrap().as_ref(), &data[1000..2000]);

    // Unknown blobs: the registry's own 404 and OCI error body, untouched.
    let r = c.get(format!("{}/v2/r/blobs/sha256:{}", gw.url(), "0".repeat(64))).send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert!(r.text().await.unwrap().contains("BLOB_UNKNOWN"));

    // The request id is echoed, and metrics count what passed.
    let r = c.get(format!("{}/v2/", gw.url())).header("x-request-id", "abc-123").send().await.unwrap();
    assert_eq!(r.headers()["x-request-id"], "abc-123");
    let metrics = c.get(format!("{}/metrics", gw.url())).send().await.unwrap().text().await.unwrap();
    assert!(
        metrics.contains(
            "starlight_gateway_http_requests_total{method=\"HEAD\",route=\"blobs\",status=\"200\"} 1"
        ),
        "{metrics}"
    );
    gw.stop().await;
}
