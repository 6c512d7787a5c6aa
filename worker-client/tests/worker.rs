//! `starlight-pull` end to end: a real registry, the gateway in front of it, the worker binary, and
//! FUSE. What the worker exports must equal `umoci unpack` of the same image.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use starlight_conformance::fstree::{Options, assert_same_tree};
use starlight_conformance::images::skopeo_copy;
use starlight_conformance::layout::{corpus, umoci_unpack};
use starlight_conformance::servers::{Registry, TokenServer, User};
use starlight_conformance::throttle::Throttle;
use starlight_format::Digest;

mod common;
use common::{Gw, is_mounted, lines, push, signal};

const PULL: &str = env!("CARGO_BIN_EXE_starlight-pull");

fn pull_cmd(gateway: &str, store: &Path) -> Command {
    let mut c = Command::new(PULL);
    c.arg("--gateway").arg(gateway).arg("--store").arg(store);
    c
}

/// Runs `starlight-pull ARGS` to its end (off the async runtime's threads).
async fn run(gateway: &str, store: &Path, args: &[&str]) -> Output {
    let mut c = pull_cmd(gateway, store);
    c.args(args);
    tokio::task::spawn_blocking(move || c.output().unwrap()).await.unwrap()
}

fn ok(out: &Output) -> String {
    let (so, se) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "starlight-pull failed ({}):\n{so}\n{se}", out.status);
    so.into_owned()
}

/// `N` in "... N <word>" of a summary line.
fn count(line: &str, word: &str) -> u64 {
    let words: Vec<&str> = line.split_whitespace().collect();
    let i = words.iter().position(|w| w.trim_matches(|c| c == '(' || c == ',') == word).unwrap();
    words[i - 1].trim_matches(|c| c == '(' || c == ',').parse().unwrap()
}

fn unpack(layout: &Path, tag: &str, dir: &Path) -> PathBuf {
    let bundle = dir.join(format!("umoci-{tag}"));
    umoci_unpack(layout, tag, &bundle);
    bundle.join("rootfs")
}

/// A temporary directory, a registry, and the edge-case corpus built in `DIR/layout` with `tags`
/// pushed as `corpus`.
fn corpus_in_registry(tags: &[&str]) -> (tempfile::TempDir, Registry, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start();
    let layout = dir.path().join("layout");
    corpus(&layout);
    push(&layout, &registry, "corpus", tags);
    (dir, registry, layout)
}

/// Every content in the store hashes to its name.
fn store_is_sound(store: &Path) -> usize {
    let dir = store.join("contents/sha256");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap().flatten() {
        let data = std::fs::read(e.path()).unwrap();
        assert_eq!(Digest::of(&data).hex(), e.file_name().to_str().unwrap(), "corrupt content stored");
        n += 1;
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_and_export_equal_umoci_unpack_and_updates_come_as_deltas() {
    let (dir, registry, layout) = corpus_in_registry(&["v1", "v2"]);
    let gw = Gw::start(&registry, &dir.path().join("gw")).await;
    let store = dir.path().join("worker");

    let out = ok(&run(&gw.url(), &store, &["corpus:v1"]).await);
    assert!(out.starts_with("pulled corpus:v1"), "{out}");
    ok(&run(&gw.url(), &store, &["export", "corpus:v1", dir.path().join("v1").to_str().unwrap()]).await);
    let opts = Options { skip_root: true, skip_dir_mtimes: false };
    assert_same_tree(&unpack(&layout, "v1", dir.path()), &dir.path().join("v1"), opts);

    // The update: only what v1 lacks (three contents), data/big as a patch.
    let out = ok(&run(&gw.url(), &store, &["pull", "corpus:v2"]).await);
    assert_eq!(count(&out, "contents"), 3, "{out}");
    assert!(count(&out, "patched") >= 1, "{out}");
    ok(&run(&gw.url(), &store, &["export", "corpus:v2", dir.path().join("v2").to_str().unwrap()]).await);
    let umoci_v2 = unpack(&layout, "v2", dir.path());
    assert_same_tree(&umoci_v2, &dir.path().join("v2"), opts);

    // Exporting into a directory that is not empty is refused, and changes nothing there.
    let out = run(&gw.url(), &store, &["export", "corpus:v1", dir.path().join("v2").to_str().unwrap()]).await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not empty"), "{out:?}");

    // A digest already whole is not asked for again.
    let list = ok(&run(&gw.url(), &store, &["list"]).await);
    assert_eq!(list.lines().count(), 3, "{list}");
    let v1_digest = {
        let meta: Vec<_> = std::fs::read_dir(store.join("images/sha256")).unwrap().flatten().collect();
        assert_eq!(meta.len(), 4, "two images, each a header and a record");
        let m = std::fs::read_to_string(
            meta.iter()
                .map(|e| e.path())
                .find(|p| {
                    p.extension().is_some_and(|x| x == "json")
                        && std::fs::read_to_string(p).unwrap().contains("\"v1\"")
                })
                .unwrap(),
        )
        .unwrap();
        serde_json::from_str::<serde_json::Value>(&m).unwrap()["digest"].as_str().unwrap().to_string()
    };
    let out = ok(&run(&gw.url(), &store, &[&format!("corpus@{v1_digest}")]).await);
    assert!(out.contains("is whole in the store"), "{out}");

    // rm + gc: the contents only v1 used go; v2 stays whole.
    let before = store_is_sound(&store);
    ok(&run(&gw.url(), &store, &["rm", "corpus:v1"]).await);
    let out = ok(&run(&gw.url(), &store, &["gc"]).await);
    // v1's data/big and bin/tool: v2 replaced both.
    assert_eq!(count(&out, "contents"), 2, "{out}");
    assert_eq!(store_is_sound(&store), before - 2);
    std::fs::remove_dir_all(dir.path().join("v2")).unwrap();
    ok(&run(&gw.url(), &store, &["export", "corpus:v2", dir.path().join("v2").to_str().unwrap()]).await);
    assert_same_tree(&umoci_v2, &dir.path().join("v2"), opts);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_a_token_service_the_users_credentials_buy_the_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = TokenServer::start(vec![
        User::new("admin", "admin-pw", &[("*", &["pull", "push"])]),
        User::new("alice", "alice-pw", &[("corpus", &["pull"])]),
    ]);
    let registry = Registry::start_with_token(&tokens);
    let layout = dir.path().join("layout");
    corpus(&layout);
    let (src, dest) =
        (format!("oci:{}:v1", layout.display()), format!("docker://{}/corpus:v1", registry.addr()));
    skopeo_copy(&src, &dest, Some("admin:admin-pw"));
    let gw = Gw::start(&registry, &dir.path().join("gw")).await;
    let store = dir.path().join("worker");

    // Anonymous: the registry's token gives no access, and the pull says so.
    let out = run(&gw.url(), &store, &["corpus:v1"]).await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("answered 401"), "{err}");
    // A wrong password: the token service refuses, and the pull names it.
    let out = run(&gw.url(), &store, &["--user", "alice:wrong", "corpus:v1"]).await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains(&format!("token service {}", tokens.realm())), "{err}");
    // Alice's credentials buy a token for `corpus`; the image is pulled whole and exports right.
    ok(&run(&gw.url(), &store, &["--user", "alice:alice-pw", "corpus:v1"]).await);
    let target = dir.path().join("v1");
    ok(&run(&gw.url(), &store, &["export", "corpus:v1", target.to_str().unwrap()]).await);
    let opts = Options { skip_root: true, skip_dir_mtimes: false };
    assert_same_tree(&unpack(&layout, "v1", dir.path()), &target, opts);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_killed_midway_resumes_with_only_what_is_missing() {
    let (dir, registry, layout) = corpus_in_registry(&["v1"]);
    let gw = Gw::start(&registry, &dir.path().join("gw")).await;
    // Converted first, so that the slow link is the only wait.
    let warm = tempfile::tempdir().unwrap();
    let all = count(&ok(&run(&gw.url(), warm.path(), &["corpus:v1"]).await), "contents");

    let slow = Throttle::start(gw.addr, 1 << 20);
    let store = dir.path().join("worker");
    let mut child = pull_cmd(&slow.url(), &store).arg("corpus:v1").stdout(Stdio::null()).spawn().unwrap();
    let contents = store.join("contents/sha256");
    let t = Instant::now();
    while std::fs::read_dir(&contents).map_or(0, |d| d.count()) < 3 {
        assert!(t.elapsed() < Duration::from_secs(30), "nothing stored after 30 s");
        assert!(child.try_wait().unwrap().is_none(), "the pull ended before it could be killed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    signal(&child, libc::SIGKILL);
    child.wait().unwrap();
    let kept = store_is_sound(&store);
    assert!(kept >= 3 && (kept as u64) < all, "kept {kept} of {all}");

    let out = ok(&run(&gw.url(), &store, &["corpus:v1"]).await);
    let (got, held) = (count(&out, "contents"), count(&out, "held"));
    assert_eq!(held, kept as u64, "{out}");
    assert_eq!(got + held, all, "{out}");
    ok(&run(&gw.url(), &store, &["export", "corpus:v1", dir.path().join("v1").to_str().unwrap()]).await);
    let opts = Options { skip_root: true, skip_dir_mtimes: false };
    assert_same_tree(&unpack(&layout, "v1", dir.path()), &dir.path().join("v1"), opts);

    // A network cut mid-stream: a clear error, a non-zero exit, nothing corrupt; then a resume.
    let store2 = dir.path().join("worker2");
    let before = slow.down_bytes();
    let mut cmd = pull_cmd(&slow.url(), &store2);
    cmd.arg("corpus:v1");
    let cutter = async {
        while slow.down_bytes() < before + (3 << 20) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        slow.cut();
    };
    let (out, ()) = tokio::join!(tokio::task::spawn_blocking(move || cmd.output().unwrap()), cutter);
    let out = out.unwrap();
    assert!(!out.status.success(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("corpus:v1"), "{err}");
    store_is_sound(&store2);
    let out = ok(&run(&gw.url(), &store2, &["corpus:v1"]).await);
    assert!(count(&out, "held") > 0, "{out}");

    // A link that stalls (nothing more arrives, nothing is closed): cut after --stall-timeout.
    let stalling = Throttle::start(gw.addr, 1 << 20);
    let store3 = dir.path().join("worker3");
    let mut cmd = pull_cmd(&stalling.url(), &store3);
    cmd.args(["--stall-timeout", "2", "corpus:v1"]);
    let t = Instant::now();
    let pull = tokio::task::spawn_blocking(move || cmd.output().unwrap());
    while stalling.down_bytes() < 1 << 20 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stalling.set_rate(1);
    let out = pull.await.unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("nothing received for 2 s"), "{err}");
    assert!(t.elapsed() < Duration::from_secs(20), "{:?}", t.elapsed());
    store_is_sound(&store3);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_tampered_with_in_the_gateway_store_is_rejected() {
    let (dir, registry, _) = corpus_in_registry(&["v1"]);
    let gw_dir = dir.path().join("gw");
    let gw = Gw::start(&registry, &gw_dir).await;
    ok(&run(&gw.url(), &dir.path().join("warm"), &["corpus:v1"]).await);
    // Flip bytes in the middle of the largest stored layer: the 9 MiB file's frames.
    let blobs = gw_dir.join("store/blobs/sha256");
    let biggest = std::fs::read_dir(&blobs)
        .unwrap()
        .flatten()
        .max_by_key(|e| e.metadata().unwrap().len())
        .unwrap()
        .path();
    let mut data = std::fs::read(&biggest).unwrap();
    let mid = data.len() / 2;
    for b in &mut data[mid..mid + 64] {
        *b ^= 0x5a;
    }
    std::fs::write(&biggest, &data).unwrap();

    let store = dir.path().join("worker");
    let out = run(&gw.url(), &store, &["corpus:v1"]).await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a tampered bundle was accepted");
    assert!(err.contains("bundle of corpus:v1"), "{err}");
    store_is_sound(&store);
    assert!(
        std::fs::read_dir(store.join("images/sha256")).unwrap().next().is_none(),
        "an image was recorded"
    );
    gw.stop().await;
}

fn run_in(root: &Path, argv: &[&str]) -> Output {
    Command::new("chroot").arg(root).args(argv).output().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_program_starts_from_the_fuse_mount_before_its_bundle_completes() {
    let layout = starlight_conformance::images::debian_layout();
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start();
    push(&layout, &registry, "app", &["app"]);
    let gw = Gw::start(&registry, &dir.path().join("gw")).await;
    // Converted (and its start-up order found) before the timed part.
    let warm = dir.path().join("warm");
    ok(&run(&gw.url(), &warm, &["app:app"]).await);
    let digest = std::fs::read_dir(warm.join("images/sha256"))
        .unwrap()
        .flatten()
        .find_map(|e| e.file_name().to_str()?.strip_suffix(".json").map(str::to_string))
        .unwrap();

    // 4 MiB/s: the bundle (~30 MiB) takes several seconds.
    let slow = Throttle::start(gw.addr, 4 << 20);
    let store = dir.path().join("worker");
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let mut child = pull_cmd(&slow.url(), &store)
        .args(["mount", "app:app", mnt.to_str().unwrap(), "--allow-other", "--read-timeout", "60"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let rx = lines(&mut child);
    let first = rx.recv_timeout(Duration::from_secs(60)).expect("the mount never came up");
    assert!(first.starts_with("mounted app:app"), "{first}");
    assert!(is_mounted(&mnt));
    let whole = store.join("images/sha256").join(format!("{digest}.json"));

    // Metadata at once; the program starts and answers while the bundle is still coming.
    assert!(mnt.join("usr/bin/redis-server").symlink_metadata().unwrap().file_type().is_symlink());
    let out = tokio::task::spawn_blocking({
        let mnt = mnt.clone();
        move || run_in(&mnt, &["/usr/bin/redis-server", "--version"])
    })
    .await
    .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("Redis server v="), "{out:?}");
    assert!(!whole.exists(), "the bundle was complete before the program answered: throttle too fast");

    // A file far down the stream is fetched out of band: it comes before the bundle ends.
    let header = {
        let warm = starlight_worker::Store::open(&warm).unwrap();
        warm.header(&format!("sha256:{digest}").parse().unwrap()).unwrap()
    };
    let last = header.contents.last().unwrap().digest;
    let far = header
        .entries
        .iter()
        .find(|e| matches!(e.kind, starlight_format::Kind::File { digest: Some(d), .. } if d == last))
        .unwrap();
    let want = std::fs::read(warm.join("contents/sha256").join(last.hex())).unwrap();
    let far_path = mnt.join(std::ffi::OsStr::new(std::str::from_utf8(&far.path).unwrap()));
    let got = tokio::task::spawn_blocking(move || std::fs::read(far_path).unwrap()).await.unwrap();
    assert_eq!(got, want);
    assert!(!whole.exists(), "the bundle was complete before the far file was read");

    // It works as an overlayfs lower directory.
    let (upper, work, merged) =
        (dir.path().join("upper"), dir.path().join("work"), dir.path().join("merged"));
    for d in [&upper, &work, &merged] {
        std::fs::create_dir(d).unwrap();
    }
    let opts = format!("lowerdir={},upperdir={},workdir={}", mnt.display(), upper.display(), work.display());
    let st =
        Command::new("mount").args(["-t", "overlay", "overlay", "-o", &opts]).arg(&merged).status().unwrap();
    assert!(st.success(), "overlay mount over the FUSE mount");
    std::fs::write(merged.join("etc/written"), b"upper").unwrap();
    assert!(std::fs::read_to_string(merged.join("etc/os-release")).unwrap().contains("bookworm"));
    assert_eq!(std::fs::read(upper.join("etc/written")).unwrap(), b"upper");
    assert!(Command::new("umount").arg(&merged).status().unwrap().success());

    // The pull completes; the trace is kept at unmount and the gateway takes it.
    let done = rx.recv_timeout(Duration::from_secs(120)).expect("the pull never finished");
    assert!(done.starts_with("pulled app:app"), "{done}");
    assert!(whole.exists());
    signal(&child, libc::SIGTERM);
    assert!(child.wait().unwrap().success());
    assert!(!is_mounted(&mnt));
    let trace = ok(&run(&gw.url(), &store, &["trace", "show", "app:app"]).await);
    assert_eq!(trace.lines().next(), Some("/usr/bin/redis-check-rdb"), "{trace}");
    let sent = ok(&run(&gw.url(), &store, &["trace", "upload", "app:app"]).await);
    assert!(sent.contains("\"traces\":1"), "{sent}");

    // Whole now: a new mount is served from the store alone, with no gateway at all.
    let mut child = pull_cmd("http://127.0.0.1:9", &store)
        .args(["mount", "app:app", mnt.to_str().unwrap()])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let rx = lines(&mut child);
    assert!(rx.recv_timeout(Duration::from_secs(30)).unwrap().starts_with("mounted app:app"));
    let out = run_in(&mnt, &["/usr/bin/redis-server", "--version"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("Redis server v="), "{out:?}");
    signal(&child, libc::SIGTERM);
    assert!(child.wait().unwrap().success());
    drop(slow);
    gw.stop().await;
}

/// The gateway binary, built next to this test's binary by `cargo build --workspace`.
fn gateway_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let bin = exe.parent().unwrap().parent().unwrap().join("starlight-gateway");
    assert!(bin.exists(), "{} missing: run `cargo build --workspace` first", bin.display());
    bin
}

fn spawn_gateway(registry: &Registry, dir: &Path, port: u16) -> Child {
    let child = Command::new(gateway_bin())
        .args(["--upstream", &format!("http://{}", registry.addr())])
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .arg("--store")
        .arg(dir.join("store"))
        .arg("--index")
        .arg(dir.join("index.redb"))
        .env("STARLIGHT_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(t.elapsed() < Duration::from_secs(10), "the gateway did not come up");
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_killed_mid_bundle_then_back_the_pull_resumes() {
    let (dir, registry, layout) = corpus_in_registry(&["v1"]);
    let port = starlight_conformance::servers::free_port();
    let gw_dir = dir.path().join("gw");
    let mut gw = spawn_gateway(&registry, &gw_dir, port);
    let url = format!("http://127.0.0.1:{port}");
    let all = count(&ok(&run(&url, &dir.path().join("warm"), &["corpus:v1"]).await), "contents");

    let slow = Throttle::start(([127, 0, 0, 1], port).into(), 1 << 20);
    let store = dir.path().join("worker");
    let mut cmd = pull_cmd(&slow.url(), &store);
    cmd.arg("corpus:v1");
    let pull = tokio::task::spawn_blocking(move || cmd.output().unwrap());
    let before = slow.down_bytes();
    while slow.down_bytes() < before + (2 << 20) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    signal(&gw, libc::SIGKILL);
    gw.wait().unwrap();
    let out = pull.await.unwrap();
    assert!(!out.status.success(), "the pull survived its gateway's death: {out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("corpus:v1"), "{err}");
    let kept = store_is_sound(&store);

    let mut gw = spawn_gateway(&registry, &gw_dir, port);
    let out = ok(&run(&url, &store, &["corpus:v1"]).await);
    assert_eq!(count(&out, "held"), kept as u64, "{out}");
    assert_eq!(count(&out, "contents") + kept as u64, all, "{out}");
    ok(&run(&url, &store, &["export", "corpus:v1", dir.path().join("v1").to_str().unwrap()]).await);
    let opts = Options { skip_root: true, skip_dir_mtimes: false };
    assert_same_tree(&unpack(&layout, "v1", dir.path()), &dir.path().join("v1"), opts);
    signal(&gw, libc::SIGTERM);
    gw.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_is_a_clear_error_and_the_store_stays_consistent() {
    let (dir, registry, layout) = corpus_in_registry(&["v1"]);
    let gw = Gw::start(&registry, &dir.path().join("gw")).await;
    // The store on a 6 MiB filesystem: the corpus needs about 14 MiB.
    let small = dir.path().join("small");
    std::fs::create_dir(&small).unwrap();
    let st =
        Command::new("mount").args(["-t", "tmpfs", "-o", "size=6m", "tmpfs"]).arg(&small).status().unwrap();
    assert!(st.success(), "mount a tmpfs");
    let store = small.join("store");
    let out = run(&gw.url(), &store, &["corpus:v1"]).await;
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    let full = !out.status.success();
    let kept = store_is_sound(&store);
    // Space returns: the pull resumes, the result is whole.
    let st = Command::new("mount").args(["-o", "remount,size=64m"]).arg(&small).status().unwrap();
    assert!(st.success());
    let again = run(&gw.url(), &store, &["corpus:v1"]).await;
    let export =
        run(&gw.url(), &store, &["export", "corpus:v1", dir.path().join("v1").to_str().unwrap()]).await;
    let leftovers = std::fs::read_dir(store.join("tmp")).unwrap().count();
    Command::new("umount").arg(&small).status().unwrap();
    assert!(full, "14 MiB fit in 6 MiB?");
    assert!(err.contains("No space left on device"), "{err}");
    assert_eq!(leftovers, 0, "temporary files left behind");
    let again = ok(&again);
    assert_eq!(count(&again, "held"), kept as u64, "{again}");
    ok(&export);
    let opts = Options { skip_root: true, skip_dir_mtimes: false };
    assert_same_tree(&unpack(&layout, "v1", dir.path()), &dir.path().join("v1"), opts);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mount_stopped_while_its_pull_runs_unmounts_and_the_next_mount_resumes() {
    let (dir, registry, _) = corpus_in_registry(&["v1"]);
    let gw = Gw::start(&registry, &dir.path().join("gw")).await;
    ok(&run(&gw.url(), &dir.path().join("warm"), &["corpus:v1"]).await);
    let slow = Throttle::start(gw.addr, 1 << 20);
    let (store, mnt) = (dir.path().join("worker"), dir.path().join("mnt"));
    std::fs::create_dir(&mnt).unwrap();
    let mount = |url: &str| {
        pull_cmd(url, &store)
            .args(["mount", "corpus:v1", mnt.to_str().unwrap()])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let mut child = mount(&slow.url());
    let rx = lines(&mut child);
    assert!(rx.recv_timeout(Duration::from_secs(30)).unwrap().starts_with("mounted corpus:v1"));
    assert_eq!(std::fs::read(mnt.join("etc/hosts")).unwrap(), b"127.0.0.1 localhost\n::1 localhost\n");
    signal(&child, libc::SIGTERM);
    let t = Instant::now();
    let st = tokio::task::spawn_blocking(move || child.wait().unwrap()).await.unwrap();
    assert!(st.success(), "{st}");
    assert!(t.elapsed() < Duration::from_secs(5), "stopping took {:?}", t.elapsed());
    assert!(!is_mounted(&mnt));
    assert!(std::fs::read_dir(store.join("images/sha256")).unwrap().next().is_none());

    let mut child = mount(&gw.url());
    let rx = lines(&mut child);
    assert!(rx.recv_timeout(Duration::from_secs(30)).unwrap().starts_with("mounted corpus:v1"));
    let done = rx.recv_timeout(Duration::from_secs(60)).unwrap();
    assert!(done.starts_with("pulled corpus:v1"), "{done}");
    let big = std::fs::read(mnt.join("data/big")).unwrap();
    assert_eq!(big.len(), 9 << 20);
    signal(&child, libc::SIGTERM);
    assert!(tokio::task::spawn_blocking(move || child.wait().unwrap()).await.unwrap().success());
    drop(slow);
    gw.stop().await;
}
