//! The delta bundle endpoint, end to end: a real registry, the gateway in front of it, both backend
//! pairs. What a bundle's header and contents describe must equal `umoci unpack` of the same image.

mod common;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::{Duration, Instant};

use common::bundle::{fetch, fetch_as, fetch_with, materialize};
use common::{gateway, local_redb, metric, s3_redis};
use starlight_conformance::fstree::{Options, assert_same_tree};
use starlight_conformance::images::skopeo_copy;
use starlight_conformance::layout::umoci_unpack;
use starlight_conformance::servers::{Redis, Registry, S3Server, TokenServer, User};
use starlight_converter::index::{AnyIndex, RedisIndex};
use starlight_converter::store::{AnyStore, LocalStore};
use starlight_format::Digest;
use starlight_gateway::starlight::Backends;
use tokio::net::TcpListener;

/// Builds the corpus into a layout, pushes both tags to `registry` as `corpus`.
fn push_corpus(dir: &Path, registry: &Registry, creds: Option<&str>) -> std::path::PathBuf {
    let layout = dir.join("layout");
    starlight_conformance::layout::corpus(&layout);
    for tag in ["v1", "v2"] {
        skopeo_copy(
            &format!("oci:{}:{tag}", layout.display()),
            &format!("docker://{}/corpus:{tag}", registry.addr()),
            creds,
        );
    }
    layout
}

fn unpack(layout: &Path, tag: &str, dir: &Path) -> std::path::PathBuf {
    let bundle = dir.join(format!("umoci-{tag}"));
    umoci_unpack(layout, tag, &bundle);
    bundle.join("rootfs")
}

fn same_as_umoci(
    want: &Path,
    header: &starlight_format::bundle::Header,
    contents: &HashMap<Digest, Vec<u8>>,
    dir: &Path,
    name: &str,
) {
    let ours = dir.join(name);
    std::fs::create_dir(&ours).unwrap();
    materialize(header, contents, &ours);
    assert_same_tree(want, &ours, Options { skip_root: true, skip_dir_mtimes: false });
}

fn all_contents(h: &starlight_format::bundle::Header) -> HashSet<Digest> {
    starlight_format::Toc { diff_id: Digest([0; 32]), entries: h.entries.clone() }.content_digests().collect()
}

async fn conversions(gw: &common::Gateway) -> u64 {
    metric(gw, "starlight_gateway_conversions_total{result=\"ok\"}").await
}

/// The corpus through one backend pair: fresh bundle, update, resume.
async fn corpus_on(dir: tempfile::TempDir, backends: Backends) {
    let registry = Registry::start();
    let layout = push_corpus(dir.path(), &registry, None);
    let gw = gateway(&registry, dir.path(), backends).await;

    // Fresh: everything, and the tree equals umoci's.
    let v1 = fetch(&gw.url(), "corpus", "to=v1", None, None).await.unwrap();
    let want_v1 = all_contents(&v1.header);
    assert_eq!(
        v1.contents.keys().copied().collect::<HashSet<_>>(),
        want_v1,
        "a fresh bundle carries every content"
    );
    assert_eq!(v1.order.len(), want_v1.len(), "each content exactly once");
    let umoci_v1 = unpack(&layout, "v1", dir.path());
    same_as_umoci(&umoci_v1, &v1.header, &v1.contents, dir.path(), "ours-v1");
    // The 9 MiB file came in several chunks (it is stored as three frames); the small files came
    // in batches.
    assert!(v1.header.contents.iter().any(|c| c.size == 9 << 20));
    assert!(metric(&gw, "starlight_gateway_bundle_batches_total").await >= 1, "no batch sent");

    // Update: only contents v1 lacks, and v1's contents + the update give v2.
    let v1_digest = v1.header.manifest_digest;
    let v2 = fetch_with(&gw.url(), "corpus", &format!("to=v2&have={v1_digest}"), None, None, &v1.contents)
        .await
        .unwrap();
    assert_eq!(v2.headers["starlight-have-used"], "1");
    let want_v2 = all_contents(&v2.header);
    let sent: HashSet<Digest> = v2.contents.keys().copied().collect();
    assert_eq!(
        sent,
        want_v2.difference(&want_v1).copied().collect(),
        "the update carries exactly what v1 lacks"
    );
    assert_eq!(sent.len(), 3, "data/big, bin/tool and new/thing changed; new/copy's content is in v1");
    // data/big (9 MiB) changed in 16 bytes: it comes as a patch against v1's data/big.
    assert!(v2.patched >= 1, "no patch used");
    assert!(metric(&gw, "starlight_gateway_bundle_patches_total").await >= 1);
    assert!(v2.wire_bytes < 1 << 20, "the update weighs {} bytes", v2.wire_bytes);
    let mut union = v1.contents.clone();
    union.extend(v2.contents.clone());
    let umoci_v2 = unpack(&layout, "v2", dir.path());
    same_as_umoci(&umoci_v2, &v2.header, &union, dir.path(), "ours-v2");

    // Resume: half of v1 held already; the rest comes, and together they make v1.
    let held: Vec<Digest> = v1.order.iter().step_by(2).copied().collect();
    let rest = fetch(&gw.url(), "corpus", "to=v1", None, Some(&held)).await.unwrap();
    let got: HashSet<Digest> = rest.contents.keys().copied().collect();
    let expect: HashSet<Digest> = want_v1.difference(&held.iter().copied().collect()).copied().collect();
    assert_eq!(got, expect);
    assert_eq!(conversions(&gw).await, 2, "v1 and v2 were each converted once");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corpus_equals_umoci_unpack_on_local_dir_and_redb() {
    let dir = tempfile::tempdir().unwrap();
    let backends = local_redb(dir.path());
    corpus_on(dir, backends).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corpus_equals_umoci_unpack_on_s3_and_redis() {
    let (s3, redis) = (S3Server::start(), Redis::start());
    corpus_on(tempfile::tempdir().unwrap(), s3_redis(&s3, &redis).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_first_requests_convert_once() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start();
    push_corpus(dir.path(), &registry, None);
    let gw = gateway(&registry, dir.path(), local_redb(dir.path())).await;
    let url = gw.url();
    let all = futures::future::join_all((0..8).map(|_| fetch(&url, "corpus", "to=v1", None, None))).await;
    let first = all[0].as_ref().unwrap();
    for b in &all {
        let b = b.as_ref().unwrap();
        assert_eq!(b.header, first.header);
        assert_eq!(b.contents.len(), first.contents.len());
    }
    assert_eq!(conversions(&gw).await, 1, "eight concurrent first requests, one conversion");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthorized_callers_get_the_registrys_challenge() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start_with_htpasswd("alice", "wonderland");
    push_corpus(dir.path(), &registry, Some("alice:wonderland"));
    let gw = gateway(&registry, dir.path(), local_redb(dir.path())).await;
    for creds in [None, Some(("alice", "wrong")), Some(("mallory", "wonderland"))] {
        let r = fetch(&gw.url(), "corpus", "to=v1", creds, None).await.unwrap_err();
        assert_eq!(r.status, 401, "{creds:?}: {}", r.body);
        let challenge = r.headers["www-authenticate"].to_str().unwrap();
        assert!(challenge.starts_with("Basic realm="), "{challenge}");
    }
    assert_eq!(conversions(&gw).await, 0, "nothing converted for unauthorized callers");
    let ok = fetch(&gw.url(), "corpus", "to=v1", Some(("alice", "wonderland")), None).await.unwrap();
    assert!(!ok.contents.is_empty());

    // Trace upload needs push rights: refused without credentials, merged with them, and the
    // traced files lead the next bundle.
    let image = ok.header.manifest_digest;
    let url = format!("{}/v2/corpus/_starlight/traces?image={image}", gw.url());
    let trace = "/dup/a\n/data/big2\n/etc/hosts\n";
    let r = common::http().post(&url).body(trace).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let r =
        common::http().post(&url).basic_auth("alice", Some("wonderland")).body(trace).send().await.unwrap();
    assert_eq!(r.status(), 202, "{}", r.text().await.unwrap());
    let again = fetch(&gw.url(), "corpus", "to=v1", Some(("alice", "wonderland")), None).await.unwrap();
    let by_path = |p: &str| {
        let e = again.header.entries.iter().find(|e| e.path == p.as_bytes()).unwrap();
        match &e.kind {
            starlight_format::Kind::File { digest, .. } => digest.unwrap(),
            other => panic!("{p}: {other:?}"),
        }
    };
    let lead: Vec<Digest> = again.header.contents.iter().take(3).map(|c| c.digest).collect();
    assert_eq!(lead, vec![by_path("dup/a"), by_path("data/big2"), by_path("etc/hosts")]);
    assert_eq!(again.order[..3], lead[..], "contents arrive in the header's order");
    gw.stop().await;
}

/// A bearer token from `tokens` for `user` with `scope` (`repository:NAME:ACTIONS`), the way
/// Docker clients get one.
async fn token(tokens: &TokenServer, user: &str, password: &str, scope: &str) -> String {
    let url = format!(
        "{}?service={}&scope={scope}",
        tokens.realm(),
        starlight_conformance::servers::token::SERVICE
    );
    let r = common::http().get(url).basic_auth(user, Some(password)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    r.json::<serde_json::Value>().await.unwrap()["token"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_a_token_service_callers_get_only_their_repositories() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = TokenServer::start(vec![
        User::new("admin", "admin-pw", &[("*", &["pull", "push"])]),
        User::new("alice", "alice-pw", &[("team-a/app", &["pull"])]),
        User::new("bob", "bob-pw", &[("team-a/app", &["pull", "push"])]),
    ]);
    let registry = Registry::start_with_token(&tokens);
    // Repository A holds v1, repository B holds v2 (which shares most contents with v1).
    let layout = dir.path().join("layout");
    starlight_conformance::layout::corpus(&layout);
    for (tag, repo) in [("v1", "team-a/app"), ("v2", "team-b/app")] {
        let (src, dest) =
            (format!("oci:{}:{tag}", layout.display()), format!("docker://{}/{repo}:{tag}", registry.addr()));
        skopeo_copy(&src, &dest, Some("admin:admin-pw"));
    }
    let gw = gateway(&registry, dir.path(), local_redb(dir.path())).await;
    let none = HashMap::new();
    let bearer = |t: String| move |r: reqwest::RequestBuilder| r.bearer_auth(&t);

    // No credentials, or a token for nothing: 401 with the registry's own challenge.
    let r = fetch(&gw.url(), "team-a/app", "to=v1", None, None).await.unwrap_err();
    assert_eq!(r.status, 401, "{}", r.body);
    let challenge = r.headers["www-authenticate"].to_str().unwrap();
    assert!(challenge.starts_with(&format!("Bearer realm=\"{}\"", tokens.realm())), "{challenge}");
    let nothing = token(&tokens, "alice", "alice-pw", "repository:team-b/app:pull").await;
    let r = fetch_as(&gw.url(), "team-b/app", "to=v2", None, &none, &bearer(nothing)).await.unwrap_err();
    assert_eq!(r.status, 401, "{}", r.body);
    assert_eq!(conversions(&gw).await, 0, "nothing converted for unauthorized callers");

    // Alice, with her token for A: A's bundle. Her token opens nothing of B.
    let alice = token(&tokens, "alice", "alice-pw", "repository:team-a/app:pull").await;
    let a = fetch_as(&gw.url(), "team-a/app", "to=v1", None, &none, &bearer(alice.clone())).await.unwrap();
    assert!(!a.contents.is_empty());
    let r =
        fetch_as(&gw.url(), "team-b/app", "to=v2", None, &none, &bearer(alice.clone())).await.unwrap_err();
    assert_eq!(r.status, 401, "{}", r.body);

    // B converted (by its admin), so its contents are in the index: naming it as `have` still gets
    // Alice nothing of it. The `have` is ignored and A's bundle is the same as without it.
    let admin =
        token(&tokens, "admin", "admin-pw", "repository:team-b/app:pull&scope=repository:team-a/app:pull")
            .await;
    let b = fetch_as(&gw.url(), "team-b/app", "to=v2", None, &none, &bearer(admin.clone())).await.unwrap();
    let have = format!("to=v1&have=team-b/app@{}", b.header.manifest_digest);
    let a_have = fetch_as(&gw.url(), "team-a/app", &have, None, &none, &bearer(alice.clone())).await.unwrap();
    assert_eq!(a_have.headers["starlight-have-ignored"], "1");
    assert_eq!(a_have.headers["starlight-have-used"], "0");
    let keys = |f: &common::bundle::Fetched| f.contents.keys().copied().collect::<HashSet<Digest>>();
    assert_eq!(keys(&a_have), keys(&a), "a have Alice may not pull changed what she got");
    assert_eq!(a_have.patched, 0);
    // The same `have` from someone allowed on both is used.
    // (Patches need their bases: this caller holds B's contents.)
    let admin_have =
        fetch_as(&gw.url(), "team-a/app", &have, None, &b.contents, &bearer(admin)).await.unwrap();
    assert_eq!(admin_have.headers["starlight-have-used"], "1");
    assert!(admin_have.contents.len() < a.contents.len());

    // Trace upload needs push rights: Alice (pull) is refused, Bob (push) is heard.
    let image = a.header.manifest_digest;
    let url = format!("{}/v2/team-a/app/_starlight/traces?image={image}", gw.url());
    let r = common::http().post(&url).bearer_auth(&alice).body("/etc/hosts\n").send().await.unwrap();
    assert_eq!(r.status(), 401, "{}", r.text().await.unwrap());
    let bob = token(&tokens, "bob", "bob-pw", "repository:team-a/app:pull,push").await;
    let r = common::http().post(&url).bearer_auth(&bob).body("/etc/hosts\n").send().await.unwrap();
    assert_eq!(r.status(), 202, "{}", r.text().await.unwrap());
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_notifications_convert_before_the_first_pull() {
    let dir = tempfile::tempdir().unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let gw_url = format!("http://{}", listener.local_addr().unwrap());
    let registry =
        Registry::start_with_notifications(&format!("{gw_url}/v2/_starlight/notifications"), "s3cret");
    let mut config = common::config(&format!("http://{}", registry.addr()));
    config.upstream_timeout = 30.0;
    config.webhook_token = Some("s3cret".into());
    config.work_dir = Some(dir.path().to_path_buf());
    let gw = common::start_on(listener, config, Some(local_redb(dir.path()))).await;

    // A notification without the token is refused.
    let r =
        common::http().post(format!("{gw_url}/v2/_starlight/notifications")).body("{}").send().await.unwrap();
    assert_eq!(r.status(), 401);

    push_corpus(dir.path(), &registry, None);
    let deadline = Instant::now() + Duration::from_secs(120);
    while conversions(&gw).await < 2 {
        assert!(Instant::now() < deadline, "pushes not converted; registry log:\n{}", registry.log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Each pushed image is also prepared: its start-up order is in the store before any pull.
    let startup = dir.path().join("store/startup/sha256");
    while std::fs::read_dir(&startup).map(|d| d.count()).unwrap_or(0) < 2 {
        assert!(Instant::now() < deadline, "start-up orders not stored");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let b = fetch(&gw.url(), "corpus", "to=v2", None, None).await.unwrap();
    assert!(!b.contents.is_empty());
    assert_eq!(conversions(&gw).await, 2, "the first pull found v2 converted");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start();
    push_corpus(dir.path(), &registry, None);
    let gw = gateway(&registry, dir.path(), local_redb(dir.path())).await;
    for (q, status, says) in [
        ("", 400, "missing to"),
        ("to=v1&to=v2", 400, "twice"),
        ("to=v1&have=nope", 400, "have"),
        ("to=v1&platform=linux", 400, "platform"),
        ("to=v1&what=1", 400, "unknown parameter"),
        ("to=v9", 404, "MANIFEST_UNKNOWN"),
        ("to=v1&platform=plan9/mips", 200, ""),
    ] {
        match fetch(&gw.url(), "corpus", q, None, None).await {
            Ok(_) => assert_eq!(status, 200, "{q}"),
            Err(r) => {
                assert_eq!(r.status, status, "{q}: {}", r.body);
                assert!(r.body.contains(says), "{q}: {}", r.body);
            }
        }
    }
    let r = fetch(&gw.url(), "corpus", "to=v1", None, Some(&[])).await.unwrap();
    assert!(!r.contents.is_empty());
    let bad_held = common::http()
        .post(format!("{}/v2/corpus/_starlight/bundle?to=v1", gw.url()))
        .body("not a digest\n")
        .send()
        .await
        .unwrap();
    assert_eq!(bad_held.status(), 400);
    assert!(bad_held.text().await.unwrap().contains("line 1"));
    let r = common::http().get(format!("{}/v2/corpus/_starlight/nothing", gw.url())).send().await.unwrap();
    assert_eq!(r.status(), 404);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_debian_app_starts_with_its_program_its_loader_and_libraries() {
    let layout = starlight_conformance::images::debian_layout();
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start();
    skopeo_copy(
        &format!("oci:{}:app", layout.display()),
        &format!("docker://{}/app:v1", registry.addr()),
        None,
    );
    let gw = gateway(&registry, dir.path(), local_redb(dir.path())).await;
    let b = fetch(&gw.url(), "app", "to=v1", None, None).await.unwrap();
    let path_of: HashMap<Digest, String> = b
        .header
        .entries
        .iter()
        .filter_map(|e| match &e.kind {
            starlight_format::Kind::File { digest: Some(d), .. } => {
                Some((*d, String::from_utf8_lossy(&e.path).into_owned()))
            }
            _ => None,
        })
        .collect();
    let sent: Vec<&str> = b.header.contents.iter().map(|c| path_of[&c.digest].as_str()).collect();
    assert_eq!(sent[0], "usr/bin/redis-check-rdb", "redis-server is a symlink to redis-check-rdb: {sent:?}");
    assert_eq!(sent[1], "usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2", "then the loader: {sent:?}");
    // Then the libraries it needs, transitively (libc through libssl, ...), all before /etc.
    let pos =
        |want: &str| sent.iter().position(|p| p.ends_with(want)).unwrap_or_else(|| panic!("{want} not sent"));
    let first_etc = sent.iter().position(|p| p.starts_with("etc/")).unwrap();
    for lib in ["libc.so.6", "libssl.so.3", "libcrypto.so.3", "libjemalloc.so.2", "libm.so.6"] {
        assert!(
            pos(lib) < first_etc,
            "{lib} at {} after /etc at {first_etc}: {:?}",
            pos(lib),
            &sent[..first_etc]
        );
    }
    assert!(first_etc < 40, "{:?}", &sent[..first_etc]);
    // The order is kept in the store: no later bundle reads a program before its header.
    let key = dir.path().join("store/startup/sha256").join(b.header.manifest_digest.hex());
    let kept = starlight_gateway::starlight::order::decode_paths(&std::fs::read(&key).unwrap()).unwrap();
    assert_eq!(kept[0], b"usr/bin/redis-check-rdb");
    assert_eq!(b.order, b.header.contents.iter().map(|c| c.digest).collect::<Vec<_>>());
    gw.stop().await;
}

/// Asks for `corpus?QUERY` until a whole bundle comes, for at most `limit`.
async fn recovers(gw: &common::Gateway, query: &str, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        match fetch(&gw.url(), "corpus", query, None, None).await {
            Ok(b) => {
                assert!(!b.contents.is_empty());
                return;
            }
            Err(r) => assert!(Instant::now() < deadline, "no recovery: {} {}", r.status, r.body),
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_s3_slow_bundles_wait_with_s3_down_they_fail_clearly_and_recover() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start();
    let layout = push_corpus(dir.path(), &registry, None);
    let mut s3 = S3Server::start();
    let redis = Redis::start();
    let gw = gateway(&registry, dir.path(), s3_redis(&s3, &redis).await).await;
    fetch(&gw.url(), "corpus", "to=v1", None, None).await.unwrap();

    // Slow: the S3 server freezes for 3 s in the middle of v2's conversion; the SDK's bounded
    // timeouts and retries outlast it and the bundle comes whole.
    let url = gw.url();
    let slow = tokio::spawn(async move { fetch(&url, "corpus", "to=v2", None, None).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    s3.pause();
    tokio::time::sleep(Duration::from_secs(3)).await;
    s3.resume();
    let v2 = slow.await.unwrap().expect("v2 through a slow S3");
    same_as_umoci(&unpack(&layout, "v2", dir.path()), &v2.header, &v2.contents, dir.path(), "v2");

    // Down: a new image needs S3 (its conversion writes there). After bounded retries with backoff
    // the caller gets 503 with an OCI error saying what failed, and nothing hangs.
    s3.stop();
    let layout3 = dir.path().join("layout3");
    let layer = starlight_conformance::layout::Layer::new().file("etc/only-in-v3", b"new\n").finish();
    starlight_conformance::layout::write_image(&layout3, "v3", &[layer], &["/bin/sh"]);
    skopeo_copy(
        &format!("oci:{}:v3", layout3.display()),
        &format!("docker://{}/corpus:v3", registry.addr()),
        None,
    );
    let started = Instant::now();
    let refused = fetch(&gw.url(), "corpus", "to=v3", None, None).await.unwrap_err();
    let took = started.elapsed();
    eprintln!("bundle with S3 down answered {} in {took:?}: {}", refused.status, refused.body);
    assert_eq!(refused.status, 503, "{}", refused.body);
    assert!(refused.body.contains("UNAVAILABLE") && refused.body.contains("S3"), "{}", refused.body);
    assert!(took < Duration::from_secs(60), "retries must be bounded ({took:?})");

    // Back: the same request succeeds.
    s3.restart();
    recovers(&gw, "to=v3", Duration::from_secs(60)).await;
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_down_bundles_get_503_the_pass_through_works_and_both_recover() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start();
    push_corpus(dir.path(), &registry, None);
    let mut redis = Redis::start();
    let backends = Backends {
        store: AnyStore::Local(LocalStore::open(dir.path().join("store")).unwrap()),
        index: AnyIndex::Redis(RedisIndex::single(&redis.url()).await.unwrap()),
    };
    let gw = gateway(&registry, dir.path(), backends).await;
    fetch(&gw.url(), "corpus", "to=v1", None, None).await.unwrap();

    redis.stop();
    let manifest = common::http()
        .get(format!("{}/v2/corpus/manifests/v1", gw.url()))
        .header("accept", "application/vnd.oci.image.manifest.v1+json")
        .send()
        .await
        .unwrap();
    assert_eq!(manifest.status(), 200, "the pass-through does not need Redis");
    let started = Instant::now();
    let refused = fetch(&gw.url(), "corpus", "to=v1", None, None).await.unwrap_err();
    let took = started.elapsed();
    eprintln!("bundle with Redis down answered {} in {took:?}", refused.status);
    assert_eq!(refused.status, 503, "{}", refused.body);
    assert!(
        refused.body.contains("UNAVAILABLE") && refused.body.contains("storage unavailable"),
        "{}",
        refused.body
    );
    assert!(took < Duration::from_secs(1), "a down index must not hold bundles up ({took:?})");

    // Redis comes back empty: the image is converted again and served.
    redis.restart();
    recovers(&gw, "to=v1", Duration::from_secs(30)).await;
    gw.stop().await;
}
