//! The snapshotter in a real containerd 1.6 with runc: Starlight images run while they stream,
//! updates come as deltas, restarts lose nothing, and containerd's garbage collection frees the
//! store. Ordinary images run through the snapshotter, and through the default overlayfs
//! snapshotter, for comparison.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

use starlight_conformance::images::debian_layout;
use starlight_conformance::servers::{Containerd, Registry};
use starlight_conformance::throttle::Throttle;

mod common;
use common::{Gw, push, signal};

const PULL: &str = env!("CARGO_BIN_EXE_starlight-pull");
const SNAPSHOTTER: &str = env!("CARGO_BIN_EXE_starlight-snapshotter");

/// A `starlight-snapshotter` process of this test.
struct Snapshotter {
    child: Child,
    root: PathBuf,
    socket: PathBuf,
    gateway: String,
}

impl Snapshotter {
    fn start(root: &Path, socket: &Path, gateway: &str) -> Snapshotter {
        std::fs::create_dir_all(root).unwrap();
        let log =
            std::fs::OpenOptions::new().create(true).append(true).open(root.join("snapshotter.log")).unwrap();
        let child = Command::new(SNAPSHOTTER)
            .arg("--root")
            .arg(root)
            .arg("--socket")
            .arg(socket)
            .args(["--gateway", gateway, "--read-timeout", "120"])
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let t = Instant::now();
        while !socket.exists() {
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "the snapshotter never listened: {}",
                Self::log_of(root)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Snapshotter { child, root: root.to_path_buf(), socket: socket.to_path_buf(), gateway: gateway.into() }
    }

    fn log_of(root: &Path) -> String {
        std::fs::read_to_string(root.join("snapshotter.log")).unwrap_or_default()
    }

    /// SIGKILL, as a crash: its mount processes stay.
    fn kill(&mut self) {
        signal(&self.child, libc::SIGKILL);
        self.child.wait().unwrap();
        let _ = std::fs::remove_file(&self.socket);
    }

    /// Starts it again after [`Snapshotter::kill`], on the same root and socket.
    fn start_again(&mut self) {
        let new = Snapshotter::start(&self.root, &self.socket, &self.gateway);
        // The old one was killed and reaped; its drop would stop the mounts, which must stay.
        std::mem::forget(std::mem::replace(self, new));
    }

    fn restart(&mut self) {
        self.kill();
        self.start_again();
    }

    fn store(&self) -> PathBuf {
        self.root.join("store")
    }

    /// The processes serving this snapshotter's mounts (their command lines name its root).
    fn mount_pids(&self) -> Vec<i32> {
        starlight_worker::snapshotter::mount_processes(&self.root)
    }

    /// The output of every mount process so far.
    fn mount_logs(&self) -> String {
        let mut all = String::new();
        for e in std::fs::read_dir(self.root.join("snapshots")).unwrap().flatten() {
            all.push_str(&std::fs::read_to_string(e.path().join("mount.log")).unwrap_or_default());
        }
        all
    }
}

impl Drop for Snapshotter {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        for pid in self.mount_pids() {
            // SAFETY: processes serving this test's own mount points.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
    }
}

fn ctr(cd: &Containerd, args: &[&str]) -> String {
    let out = cd.ctr(args);
    assert!(
        out.status.success(),
        "ctr {}: {}\n{}\ncontainerd log tail:\n{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        tail(&cd.log(), 15)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn ok(out: &Output) -> String {
    let (so, se) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "failed ({}):\n{so}\n{se}", out.status);
    so.into_owned()
}

fn containerd_pull(gw: &str, cd: &Containerd, image: &str) -> (String, String) {
    let out = ok(&Command::new(PULL)
        .args(["--gateway", gw, "--containerd"])
        .arg(cd.socket())
        .arg(image)
        .output()
        .unwrap());
    // "pulled NAME (sha256:…) into containerd as NAME in …"
    let digest = out.split(['(', ')']).nth(1).unwrap().to_string();
    assert!(out.contains("into containerd as"), "{out}");
    (digest, out)
}

/// Whether the snapshotter's store holds image `digest` whole.
fn whole(sn: &Snapshotter, digest: &str) -> bool {
    sn.store().join("images/sha256").join(format!("{}.json", digest.trim_start_matches("sha256:"))).exists()
}

fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < limit, "timed out after {limit:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `N` in "… N <word>" of a summary line.
fn count(line: &str, word: &str) -> f64 {
    let words: Vec<&str> = line.split_whitespace().collect();
    let i = words.iter().position(|w| w.trim_matches(|c| c == '(' || c == ',') == word).unwrap();
    words[i - 1].trim_matches(|c| c == '(' || c == ',').parse().unwrap()
}

/// X in "… from X MiB on the wire …".
fn wire_mib(line: &str) -> f64 {
    let before = line.split(" MiB on the wire").next().unwrap();
    before.rsplit(' ').next().unwrap().parse().unwrap()
}

fn fuse_mounts_under(root: &Path) -> usize {
    let m = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let root = root.to_str().unwrap();
    m.lines().filter(|l| l.split(' ').nth(4).is_some_and(|p| p.starts_with(root))).count()
}

fn run_redis_version(cd: &Containerd, ns: &str, snapshotter: &str, image: &str, id: &str) -> String {
    let out = ctr(
        cd,
        &[
            "-n",
            ns,
            "run",
            "--rm",
            "--snapshotter",
            snapshotter,
            image,
            id,
            "/usr/bin/redis-server",
            "--version",
        ],
    );
    assert!(out.contains("Redis server v="), "{out}");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starlight_images_run_in_containerd_while_they_stream() {
    let layout = debian_layout();
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start();
    push(&layout, &registry, "app", &["app", "app-v2"]);
    let gw = Gw::start(&registry, &dir.path().join("gw")).await;
    let gw_url = gw.url();
    // Both versions converted before anything is timed or throttled.
    let warm = dir.path().join("warm");
    for tag in ["app:app", "app:app-v2"] {
        let mut c = Command::new(PULL);
        c.args(["--gateway", &gw_url, "--store"]).arg(&warm).arg(tag);
        ok(&tokio::task::spawn_blocking(move || c.output().unwrap()).await.unwrap());
    }
    let slow = Throttle::start(gw.addr, 4 << 20);
    let slow_url = slow.url();
    let gw_host = gw.addr.to_string();
    let root = dir.path().join("snapshotter");
    let socket = dir.path().join("snapshotter.sock");

    tokio::task::spawn_blocking(move || {
        let mut sn = Snapshotter::start(&root, &socket, &slow_url);
        let cd = Containerd::start(&format!(
            "[proxy_plugins]\n  [proxy_plugins.starlight]\n    type = \"snapshot\"\n    address = \"{}\"\n",
            socket.display()
        ));
        let v1 = format!("{gw_host}/app:app");
        let v2 = format!("{gw_host}/app:app-v2");

        // Fresh: the image record and snapshot come at once; the container runs while the
        // bundle still streams (4 MiB/s).
        let t = Instant::now();
        let (d1, out) = containerd_pull(&gw_url, &cd, "app:app");
        assert!(out.starts_with(&format!("pulled app:app ({d1}) into containerd as {v1}")), "{out}");
        assert!(ctr(&cd, &["images", "ls", "-q"]).lines().any(|l| l == v1));
        run_redis_version(&cd, "default", "starlight", &v1, "fresh");
        let started = t.elapsed();
        assert!(!whole(&sn, &d1), "the bundle was complete before the container ran: throttle too fast");
        let out = ctr(&cd, &[
            "run",
            "--rm",
            "--snapshotter",
            "starlight",
            &v1,
            "writes",
            "/bin/sh",
            "-c",
            "echo starlight > /tmp/f && cat /tmp/f /etc/debian_version",
        ]);
        assert!(out.starts_with("starlight\n12."), "{out}");
        println!("Starlight: pull + ctr run answered in {:.2}s while streaming", started.as_secs_f64());

        // A running container survives a snapshotter crash: its mount is served by its own process.
        ctr(&cd, &["run", "-d", "--snapshotter", "starlight", &v1, "long", "/bin/sleep", "600"]);
        sn.restart();
        let out = ctr(&cd, &["task", "exec", "--exec-id", "e1", "long", "/bin/cat", "/etc/debian_version"]);
        assert!(out.starts_with("12."), "{out}");
        assert!(ctr(&cd, &["task", "ls"]).lines().any(|l| l.starts_with("long") && l.contains("RUNNING")));
        ctr(&cd, &["task", "kill", "-s", "SIGKILL", "long"]);
        wait_until("the task to stop", Duration::from_secs(30), || {
            ctr(&cd, &["task", "ls"]).lines().any(|l| l.starts_with("long") && l.contains("STOPPED"))
        });
        ctr(&cd, &["task", "delete", "long"]);
        ctr(&cd, &["containers", "delete", "long"]);

        // An interrupted pull resumes: the snapshotter and the mount process die mid-bundle (a
        // crash or reboot); at restart the image is mounted again and only what is missing comes.
        slow.set_rate(1 << 20);
        assert!(!whole(&sn, &d1), "the pull ended before the interruption: throttle too fast");
        let pids = sn.mount_pids();
        assert_eq!(pids.len(), 1, "{pids:?}");
        sn.kill();
        // SAFETY: the mount process of this test's snapshotter.
        unsafe { libc::kill(pids[0], libc::SIGKILL) };
        // Meanwhile, a pull into containerd fails clearly and records no image.
        let out = Command::new(PULL).args(["--gateway", &gw_url, "--containerd"]).arg(cd.socket()).arg("app:app-v2").output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains("pull of app:app-v2 into containerd"), "{err}");
        assert!(!ctr(&cd, &["images", "ls", "-q"]).lines().any(|l| l == v2));
        sn.start_again();
        slow.set_rate(0);
        let summary1 = format!("pulled app@{d1}");
        wait_until("the resumed pull", Duration::from_secs(180), || {
            whole(&sn, &d1) && sn.mount_logs().contains(&summary1)
        });
        let logs = sn.mount_logs();
        let resumed = logs.lines().find(|l| l.starts_with(&summary1)).unwrap();
        assert!(count(resumed, "held") > 0.0, "{resumed}\n{logs}");
        run_redis_version(&cd, "default", "starlight", &v1, "after-restart");

        // The update: only the delta travels; both versions run.
        let (d2, out) = containerd_pull(&gw_url, &cd, "app:app-v2");
        assert!(out.contains(&v2), "{out}");
        let summary2 = format!("pulled app@{d2}");
        wait_until("the update", Duration::from_secs(180), || {
            whole(&sn, &d2) && sn.mount_logs().contains(&summary2)
        });
        let logs = sn.mount_logs();
        let update = logs.lines().find(|l| l.starts_with(&format!("pulled app@{d2}"))).expect("no update summary");
        let meta: serde_json::Value =
            serde_json::from_slice(&std::fs::read(sn.store().join(format!("images/sha256/{}.json", &d2[7..]))).unwrap())
                .unwrap();
        let image_mib = meta["content_bytes"].as_f64().unwrap() / (1 << 20) as f64;
        let wire = wire_mib(update);
        assert!(wire * 4.0 < image_mib, "the update carried {wire} MiB of a {image_mib:.1} MiB image: {update}");
        println!("update: {wire:.1} MiB on the wire for a {image_mib:.1} MiB image");
        let a = ctr(&cd, &["run", "--rm", "--snapshotter", "starlight", &v1, "v1", "/bin/cat", "/etc/debian_version"]);
        let b = ctr(&cd, &["run", "--rm", "--snapshotter", "starlight", &v2, "v2", "/bin/cat", "/etc/debian_version"]);
        assert!(a.starts_with("12.") && b.starts_with("12."), "{a} {b}");
        run_redis_version(&cd, "default", "starlight", &v2, "v2-redis");

        // The same image unpacked the ordinary way: through the snapshotter (overlay semantics)
        // and through containerd's own overlayfs snapshotter, both pulled through the gateway.
        let t = Instant::now();
        ctr(&cd, &["-n", "plain", "images", "pull", "--plain-http", "--snapshotter", "starlight", &v1]);
        run_redis_version(&cd, "plain", "starlight", &v1, "plain");
        let plain = t.elapsed();
        let t = Instant::now();
        ctr(&cd, &["-n", "overlay", "images", "pull", "--plain-http", &v1]);
        run_redis_version(&cd, "overlay", "overlayfs", &v1, "overlay");
        println!(
            "ordinary pull + run: {:.2}s through the Starlight snapshotter, {:.2}s with overlayfs (loopback, unthrottled)",
            plain.as_secs_f64(),
            t.elapsed().as_secs_f64()
        );
        let listed = ctr(&cd, &["-n", "plain", "snapshots", "--snapshotter", "starlight", "ls"]);
        assert!(listed.lines().filter(|l| l.contains("Committed")).count() >= 2, "{listed}");

        // Garbage collection follows containerd's: an image goes, then its snapshot, its mount and
        // the contents no other image needs.
        let contents = |sn: &Snapshotter| std::fs::read_dir(sn.store().join("contents/sha256")).unwrap().count();
        let before = contents(&sn);
        ctr(&cd, &["images", "rm", "--sync", &v1]);
        wait_until("v1 to leave the store", Duration::from_secs(30), || !whole(&sn, &d1));
        wait_until("v1's own contents to go", Duration::from_secs(30), || contents(&sn) < before);
        assert_eq!(sn.mount_pids().len(), 1, "v1's mount process should have stopped");
        assert!(whole(&sn, &d2));
        run_redis_version(&cd, "default", "starlight", &v2, "v2-after-gc");
        ctr(&cd, &["images", "rm", "--sync", &v2]);
        wait_until("the store to empty", Duration::from_secs(30), || contents(&sn) == 0);
        wait_until("the mounts to go", Duration::from_secs(30), || sn.mount_pids().is_empty());
        ctr(&cd, &["-n", "plain", "images", "rm", "--sync", &v1]);
        wait_until("every snapshot to go", Duration::from_secs(30), || {
            std::fs::read_dir(sn.root.clone().join("snapshots")).unwrap().count() == 0
        });
        assert_eq!(fuse_mounts_under(&sn.root.clone()), 0);
        println!("snapshotter log tail:\n{}", tail(&Snapshotter::log_of(&sn.root), 10));
        drop(slow);
    })
    .await
    .unwrap();
    gw.stop().await;
}
