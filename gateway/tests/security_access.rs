//! Who may read what through the Starlight endpoints, against a registry behind a token service
//! with two tenants: `alice` pushes only to her repositories, `bob` only to his. Converted data is
//! reused only for the compressed blob that produced it and only after the registry says the caller
//! may read that blob in that repository; traces reorder only their own repository's bundles; a
//! `have` that cannot be resolved is ignored, never fatal.

mod common;

use std::path::Path;

use common::bundle::{Fetched, Refused, fetch_as};
use common::{gateway, local_redb};
use starlight_conformance::images::skopeo_copy;
use starlight_conformance::layout::{Layer, host_arch, noise};
use starlight_conformance::servers::{Redis, Registry, TokenServer, User};
use starlight_converter::index::{AnyIndex, RedisIndex};
use starlight_converter::store::{AnyStore, LocalStore};
use starlight_format::Digest;
use starlight_gateway::starlight::Backends;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SECRET: &[u8] = b"alice's private signing key: 7f3c9a1e-not-for-bob\n";

/// The token service: alice and bob each push to their own repositories only; `pub/*` is alice's
/// and everyone may pull it.
fn tenants() -> TokenServer {
    const RW: &[&str] = &["pull", "push", "delete"];
    const R: &[&str] = &["pull"];
    TokenServer::start(vec![
        User::new("alice", "alice-pw", &[("alice/secret", RW), ("pub/base", RW), ("pub/other", RW)]),
        User::new(
            "bob",
            "bob-pw",
            &[("bob/evil", RW), ("bob/own", RW), ("bob/copy", RW), ("pub/base", R), ("pub/other", R)],
        ),
    ])
}

/// A bearer token for `user` with `scopes` (`repository:NAME:ACTIONS` each), as Docker clients get.
async fn token(tokens: &TokenServer, user: &str, scopes: &[&str]) -> String {
    let scope: String = scopes.iter().map(|s| format!("&scope={s}")).collect();
    let url = format!("{}?service={}{scope}", tokens.realm(), starlight_conformance::servers::token::SERVICE);
    let r = common::http().get(url).basic_auth(user, Some(&format!("{user}-pw"))).send().await.unwrap();
    assert_eq!(r.status(), 200);
    r.json::<serde_json::Value>().await.unwrap()["token"].as_str().unwrap().to_string()
}

async fn bundle(gw: &common::Gateway, name: &str, query: &str, token: &str) -> Result<Fetched, Refused> {
    let t = token.to_string();
    fetch_as(&gw.url(), name, query, None, &Default::default(), &move |r| r.bearer_auth(&t)).await
}

/// A compressed layer blob (zstd: the gateway's own dependency).
fn compress(tar: &[u8]) -> Vec<u8> {
    zstd::bulk::compress(tar, 3).unwrap()
}

fn put_blob(layout: &Path, data: &[u8]) -> Digest {
    let d = Digest::of(data);
    let dir = layout.join("blobs/sha256");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(d.hex()), data).unwrap();
    d
}

/// Writes an image into the OCI layout `layout` as `tag`: `layers` are zstd blobs, and its config
/// claims `diff_ids` (whatever the layers hold: registries do not check). Returns the manifest
/// digest.
fn oci_image(layout: &Path, tag: &str, layers: &[Vec<u8>], diff_ids: &[Digest]) -> Digest {
    let descs: Vec<serde_json::Value> = layers
        .iter()
        .map(|blob| {
            serde_json::json!({
                "mediaType": "application/vnd.oci.image.layer.v1.tar+zstd",
                "digest": put_blob(layout, blob).to_string(),
                "size": blob.len(),
            })
        })
        .collect();
    let config = serde_json::json!({
        "architecture": host_arch(),
        "os": "linux",
        "config": {"Cmd": ["/bin/true"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids.iter().map(Digest::to_string).collect::<Vec<_>>()},
    })
    .to_string();
    let config_digest = put_blob(layout, config.as_bytes());
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest.to_string(),
            "size": config.len(),
        },
        "layers": descs,
    })
    .to_string();
    let digest = put_blob(layout, manifest.as_bytes());
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": digest.to_string(),
        "size": manifest.len(),
        "annotations": {"org.opencontainers.image.ref.name": tag},
    }]});
    std::fs::write(layout.join("index.json"), index.to_string()).unwrap();
    std::fs::write(layout.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    digest
}

/// Builds an image of one layer `tar` (its true diffID) and pushes it to `dest` as `user`.
fn push(dir: &Path, registry: &Registry, dest: &str, tar: &[u8], user: &str) -> Digest {
    let layout = dir.join(format!("layout-{}", dest.replace(['/', ':'], "-")));
    let d = oci_image(&layout, "t", &[compress(tar)], &[Digest::of(tar)]);
    push_layout(&layout, registry, dest, user);
    d
}

fn push_layout(layout: &Path, registry: &Registry, dest: &str, user: &str) {
    let creds = format!("{user}:{user}-pw");
    skopeo_copy(
        &format!("oci:{}:t", layout.display()),
        &format!("docker://{}/{dest}", registry.addr()),
        Some(&creds),
    );
}

/// Pushes image `manifest` of the OCI layout `layout` to `repo:tag` with plain registry calls as
/// the holder of `token`: each distinct blob once (monolithic uploads), then the manifest. (skopeo
/// checks every layer of a 4,097-layer image one by one, which takes minutes.)
async fn push_direct(
    layout: &Path,
    registry: &Registry,
    token: &str,
    repo: &str,
    tag: &str,
    manifest: Digest,
) {
    let base = format!("http://{}", registry.addr());
    let read = |d: &str| std::fs::read(layout.join("blobs/sha256").join(&d["sha256:".len()..])).unwrap();
    let manifest_bytes = read(&manifest.to_string());
    let m: serde_json::Value = serde_json::from_slice(&manifest_bytes).unwrap();
    let mut blobs: Vec<String> =
        m["layers"].as_array().unwrap().iter().map(|l| l["digest"].as_str().unwrap().to_string()).collect();
    blobs.push(m["config"]["digest"].as_str().unwrap().to_string());
    blobs.sort();
    blobs.dedup();
    let http = common::http();
    for d in blobs {
        let d = d.as_str();
        let r =
            http.post(format!("{base}/v2/{repo}/blobs/uploads/")).bearer_auth(token).send().await.unwrap();
        assert_eq!(r.status(), 202, "{}", r.text().await.unwrap());
        let loc = r.headers()["location"].to_str().unwrap().to_string();
        let loc = if loc.starts_with('/') { format!("{base}{loc}") } else { loc };
        let sep = if loc.contains('?') { '&' } else { '?' };
        let r =
            http.put(format!("{loc}{sep}digest={d}")).bearer_auth(token).body(read(d)).send().await.unwrap();
        assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    }
    let r = http
        .put(format!("{base}/v2/{repo}/manifests/{tag}"))
        .bearer_auth(token)
        .header("content-type", "application/vnd.oci.image.manifest.v1+json")
        .body(manifest_bytes)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
}

fn holds_secret(f: &Fetched) -> bool {
    f.contents.values().any(|c| c.windows(SECRET.len()).any(|w| w == SECRET))
}

/// Regression (security issue, item 1): bob's config claims the diffID of alice's private layer
/// while his manifest names a decoy blob. Neither his bundle, nor an out-of-band content, nor a
/// `have` of alice's image hands him anything of hers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claimed_diff_id_reads_nothing_of_another_tenant() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = tenants();
    let registry = Registry::start_with_token(&tokens);
    let secret_tar = Layer::new().dir("keys", 0o700).file("keys/signing.pem", SECRET).finish();
    let alice_image = push(dir.path(), &registry, "alice/secret:v1", &secret_tar, "alice");

    // Bob's image: a decoy layer, a config that claims alice's layer.
    let decoy_tar = Layer::new().file("decoy.txt", b"nothing to see\n").finish();
    let evil = dir.path().join("layout-evil");
    oci_image(&evil, "t", &[compress(&decoy_tar)], &[Digest::of(&secret_tar)]);
    push_layout(&evil, &registry, "bob/evil:x", "bob");
    push(dir.path(), &registry, "bob/own:v1", &Layer::new().file("own.txt", b"bob's own\n").finish(), "bob");

    let gw = gateway(&registry, dir.path(), local_redb(dir.path())).await;
    // Alice's image is converted: her layer is in the index under its diffID.
    let alice = token(&tokens, "alice", &["repository:alice/secret:pull"]).await;
    let a = bundle(&gw, "alice/secret", "to=v1", &alice).await.unwrap();
    assert!(holds_secret(&a), "alice's own bundle holds her file");
    let secret_content = Digest::of(SECRET);

    let bob = token(
        &tokens,
        "bob",
        &["repository:bob/evil:pull", "repository:bob/own:pull", "repository:alice/secret:pull"],
    )
    .await;
    match bundle(&gw, "bob/evil", "to=x", &bob).await {
        Ok(f) => panic!("bob's claimed diffID was served (alice's file: {})", holds_secret(&f)),
        Err(r) => {
            assert_eq!(r.status, 422, "{}", r.body);
            assert!(r.body.contains("diffID mismatch"), "{}", r.body);
        }
    }
    let url = format!("{}/v2/bob/evil/_starlight/content/{secret_content}?to=x", gw.url());
    let r = common::http().get(&url).bearer_auth(&bob).send().await.unwrap();
    let status = r.status();
    let body = r.bytes().await.unwrap();
    assert_ne!(status, 200, "alice's content served to bob out of band");
    assert!(!body.windows(SECRET.len()).any(|w| w == SECRET));

    // A `have` naming alice's image: ignored, and bob's own bundle is served whole.
    let have = format!("to=v1&have=alice/secret@{alice_image}");
    let own = bundle(&gw, "bob/own", &have, &bob).await.unwrap();
    assert_eq!(own.headers["starlight-have-ignored"], "1");
    assert_eq!(own.headers["starlight-have-used"], "0");
    assert!(!holds_secret(&own));
    assert_eq!(own.contents.len(), 1);
    gw.stop().await;
}

/// Regression (security issue, item 1): converted data is served only while the caller may read
/// the blobs it came from in that repository. A layer blob unlinked from alice's repository (its
/// manifest still there, its conversion still in the index) is refused as the registry refuses it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn converted_layers_are_served_only_while_the_caller_may_read_their_blobs() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = tenants();
    let registry = Registry::start_with_token(&tokens);
    let tar = Layer::new().file("keys/signing.pem", SECRET).finish();
    push(dir.path(), &registry, "alice/secret:v1", &tar, "alice");
    let gw = gateway(&registry, dir.path(), local_redb(dir.path())).await;
    let alice = token(&tokens, "alice", &["repository:alice/secret:pull,delete"]).await;
    let a = bundle(&gw, "alice/secret", "to=v1", &alice).await.unwrap();
    assert!(holds_secret(&a));

    let layer = Digest::of(&compress(&tar));
    let url = format!("http://{}/v2/alice/secret/blobs/{layer}", registry.addr());
    let r = common::http().delete(&url).bearer_auth(&alice).send().await.unwrap();
    assert_eq!(r.status(), 202, "{}", r.text().await.unwrap());

    let r = bundle(&gw, "alice/secret", "to=v1", &alice).await.unwrap_err();
    assert_eq!(r.status, 404, "{}", r.body);
    assert!(r.body.contains("BLOB_UNKNOWN") && r.body.contains(&layer.to_string()), "{}", r.body);
    let url = format!("{}/v2/alice/secret/_starlight/content/{}?to=v1", gw.url(), Digest::of(SECRET));
    let r = common::http().get(&url).bearer_auth(&alice).send().await.unwrap();
    assert_eq!(r.status(), 404);
    gw.stop().await;
}

/// Regression (security issue, item 2): bob copies alice's public image into his repository and
/// uploads a trace that reverses it. His bundles follow it; alice's bundles of the original do not
/// change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traces_reorder_only_their_own_repository() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = tenants();
    let registry = Registry::start_with_token(&tokens);
    let mut layer = Layer::new().dir("data", 0o755);
    let mut files = Vec::new();
    for i in 0..6u64 {
        // Larger than a batch's files, so each travels alone and the order is visible.
        let data = noise(300 << 10, i + 1);
        files.push((format!("/data/f{i}"), Digest::of(&data)));
        layer = layer.file(&format!("data/f{i}"), &data);
    }
    let image = push(dir.path(), &registry, "pub/base:v1", &layer.finish(), "alice");
    skopeo_copy(
        &format!("docker://{}/pub/base:v1", registry.addr()),
        &format!("docker://{}/bob/copy:v1", registry.addr()),
        Some("bob:bob-pw"),
    );
    let gw = gateway(&registry, dir.path(), local_redb(dir.path())).await;
    let alice = token(&tokens, "alice", &["repository:pub/base:pull"]).await;
    let bob =
        token(&tokens, "bob", &["repository:bob/copy:pull,push", "repository:pub/base:pull,push"]).await;
    let before = bundle(&gw, "pub/base", "to=v1", &alice).await.unwrap().order;
    assert_eq!(before.len(), files.len());

    // Bob may not trace alice's repository; he may trace his copy.
    let reversed: Vec<&(String, Digest)> = files.iter().rev().collect();
    let trace: String = reversed.iter().map(|(p, _)| format!("{p}\n")).collect();
    let url = format!("{}/v2/pub/base/_starlight/traces?image={image}", gw.url());
    let r = common::http().post(&url).bearer_auth(&bob).body(trace.clone()).send().await.unwrap();
    assert!(matches!(r.status().as_u16(), 401 | 403), "{}", r.status());
    bundle(&gw, "bob/copy", "to=v1", &bob).await.unwrap();
    let url = format!("{}/v2/bob/copy/_starlight/traces?image={image}", gw.url());
    let r = common::http().post(&url).bearer_auth(&bob).body(trace).send().await.unwrap();
    assert_eq!(r.status(), 202, "{}", r.text().await.unwrap());

    let bobs = bundle(&gw, "bob/copy", "to=v1", &bob).await.unwrap().order;
    let want: Vec<Digest> = reversed.iter().map(|(_, d)| *d).collect();
    assert_eq!(bobs, want, "bob's bundle follows his trace");
    let after = bundle(&gw, "pub/base", "to=v1", &alice).await.unwrap().order;
    assert_eq!(after, before, "bob's trace of his copy reordered alice's repository");
    gw.stop().await;
}

/// Sends one command to Redis over RESP and returns the first line of the reply.
async fn redis_command(redis: &Redis, args: &[&[u8]]) -> String {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", redis.port())).await.unwrap();
    let mut cmd = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        cmd.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        cmd.extend_from_slice(a);
        cmd.extend_from_slice(b"\r\n");
    }
    s.write_all(&cmd).await.unwrap();
    let mut buf = vec![0u8; 256];
    let n = s.read(&mut buf).await.unwrap();
    String::from_utf8_lossy(&buf[..n]).lines().next().unwrap_or("").to_string()
}

/// Regression (security issue, item 5): a `have` whose stored record cannot be read (garbage under
/// its key) is ignored and logged; the bundle is served as without it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_have_is_ignored_and_the_bundle_served() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = tenants();
    let registry = Registry::start_with_token(&tokens);
    let redis = Redis::start();
    let backends = Backends {
        store: AnyStore::Local(LocalStore::open(dir.path().join("store")).unwrap()),
        index: AnyIndex::Redis(RedisIndex::single(&redis.url()).await.unwrap()),
    };
    push(dir.path(), &registry, "pub/base:v1", &Layer::new().file("a.txt", b"a\n").finish(), "alice");
    let other =
        push(dir.path(), &registry, "pub/other:v1", &Layer::new().file("b.txt", b"b\n").finish(), "alice");
    let gw = gateway(&registry, dir.path(), backends).await;
    let alice = token(&tokens, "alice", &["repository:pub/base:pull", "repository:pub/other:pull"]).await;
    bundle(&gw, "pub/other", "to=v1", &alice).await.unwrap();
    // Garbage under the image record's key (version 2, and the key of earlier versions): had the
    // record been read, the `have` would be used.
    for version in ["i2", "i"] {
        let key = format!("sl:{version}:{}", other.hex());
        assert_eq!(redis_command(&redis, &[b"SET", key.as_bytes(), b"\x00garbage"]).await, "+OK");
    }

    let f = bundle(&gw, "pub/base", &format!("to=v1&have=pub/other@{other}"), &alice).await.unwrap();
    assert_eq!(f.headers["starlight-have-ignored"], "1");
    assert_eq!(f.headers["starlight-have-used"], "0");
    assert_eq!(f.contents.len(), 1);
    gw.stop().await;
}

/// Regression (security issue, item 5): an image of 4,097 layers (more than an image record holds)
/// is refused at once with a clear 422 naming the count and the limit, and the gateway goes on
/// serving other images, with the refused image as a `have` too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_past_the_layer_limit_is_refused_and_others_still_served() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = tenants();
    let registry = Registry::start_with_token(&tokens);
    let tar = Layer::new().file("same.txt", b"same\n").finish();
    let many = dir.path().join("layout-many");
    let n = starlight_format::MAX_LAYERS as usize + 1;
    let many_image = oci_image(&many, "t", &vec![compress(&tar); n], &vec![Digest::of(&tar); n]);
    let pusher = token(&tokens, "alice", &["repository:pub/other:pull,push"]).await;
    push_direct(&many, &registry, &pusher, "pub/other", "many", many_image).await;
    push(dir.path(), &registry, "pub/base:v1", &Layer::new().file("a.txt", b"a\n").finish(), "alice");
    let gw = gateway(&registry, dir.path(), local_redb(dir.path())).await;
    let alice = token(&tokens, "alice", &["repository:pub/base:pull", "repository:pub/other:pull"]).await;

    for _ in 0..2 {
        let r = bundle(&gw, "pub/other", "to=many", &alice).await.unwrap_err();
        assert_eq!(r.status, 422, "{}", r.body);
        assert!(r.body.contains("4097") && r.body.contains("4096"), "{}", r.body);
    }
    // Refused before any layer was fetched: the registry served the manifest, never the layer.
    let log = registry.log();
    assert!(log.contains("GET /v2/pub/other/manifests/many"), "{log}");
    let layer = Digest::of(&compress(&tar));
    assert!(!log.contains(&format!("GET /v2/pub/other/blobs/{layer}")), "a layer was fetched");
    let f = bundle(&gw, "pub/base", &format!("to=v1&have=pub/other@{many_image}"), &alice).await.unwrap();
    assert_eq!(f.headers["starlight-have-ignored"], "1");
    assert_eq!(f.contents.len(), 1);
    gw.stop().await;
}
