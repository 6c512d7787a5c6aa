//! The WAN benchmark: real application images over an emulated WAN, from "pull starts" to "the
//! container printed its ready line", Starlight against containerd's own pull.
//!
//! The worker namespace runs containerd (its own root per measurement) and, for the Starlight
//! arms, `starlight-snapshotter`; the server namespace runs docker-registry and the gateway
//! (`10.78.0.2:8080`). Arms:
//! - A: `ctr images pull --plain-http` + `ctr run` (overlayfs) through the gateway's pass-through;
//! - B: `starlight-pull --containerd` + `ctr run --snapshotter starlight`, fresh;
//! - C: the same for v2 with v1 present (pulled whole beforehand);
//! - D: A for v2 with v1 pulled and unpacked beforehand;
//! - E: the bundle B asks for, downloaded with curl (the paper's "wget" bound).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde::{Deserialize, Serialize};
use starlight_conformance::images::skopeo_copy;
use starlight_conformance::servers::{Containerd, Registry};

use crate::gateway::Server;
use crate::wan::{Link, SERVER_ADDR, Wan};

const NS: &str = "bench";

/// Set by SIGINT or SIGTERM: the run stops after the current measurement and cleans up.
static STOP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, std::sync::atomic::Ordering::Relaxed);
}

fn stop_requested() -> Result<()> {
    ensure!(!STOP.load(std::sync::atomic::Ordering::Relaxed), "interrupted");
    Ok(())
}
const GW_PORT: u16 = 8080;
/// Longest a measurement may take before it counts as failed.
const ARM_TIMEOUT: Duration = Duration::from_secs(900);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
pub enum Arm {
    A,
    B,
    C,
    D,
    E,
}

impl Arm {
    pub const ALL: [Arm; 5] = [Arm::A, Arm::B, Arm::C, Arm::D, Arm::E];

    fn what(self) -> &'static str {
        match self {
            Arm::A => "containerd pull + run (overlayfs), fresh",
            Arm::B => "Starlight, fresh",
            Arm::C => "Starlight update v1 -> v2",
            Arm::D => "containerd update v1 -> v2",
            Arm::E => "curl of the fresh bundle (download only)",
        }
    }
}

pub struct Opts {
    pub apps: Vec<String>,
    pub rtts_ms: Vec<f64>,
    pub mbit: f64,
    /// Per RTT.
    pub rounds: Vec<usize>,
    pub images_dir: PathBuf,
    pub out: PathBuf,
    pub arms: Vec<Arm>,
}

/// One measurement.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Sample {
    pub rtt_ms: f64,
    pub app: String,
    pub arm: Arm,
    pub round: usize,
    pub secs: f64,
}

#[derive(Serialize, Deserialize)]
pub struct Report {
    pub command: String,
    pub mbit: f64,
    /// Per RTT.
    pub rounds: Vec<usize>,
    pub self_checks: Vec<(f64, f64, f64, f64)>,
    pub images: Vec<ImageInfo>,
    pub samples: Vec<Sample>,
    /// Measurements that failed, with their errors.
    #[serde(default)]
    pub failures: Vec<String>,
}

#[derive(Clone, Serialize, Deserialize)]
pub struct ImageInfo {
    pub app: String,
    pub ready: String,
    /// Compressed layer bytes of v1 and v2.
    pub v1_bytes: u64,
    pub v2_bytes: u64,
    /// Bundle bytes: v1 fresh, v2 with v1 held.
    pub bundle_bytes: u64,
    pub update_bytes: u64,
}

fn exe(name: &str) -> Result<PathBuf> {
    let p = std::env::current_exe()?.with_file_name(name);
    ensure!(
        p.exists(),
        "{} not found: build it (cargo build --release -p starlight-worker -p starlight-gateway)",
        p.display()
    );
    Ok(p)
}

pub fn run(o: Opts) -> Result<()> {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic.
        unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
    }
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/bench-images.sh");
    let st = Command::new("bash").arg(script).arg(&o.images_dir).args(&o.apps).status()?;
    ensure!(st.success(), "{script} failed");
    let layout = o.images_dir.join("oci");
    let rate = (o.mbit * 1e6) as u64;
    let link = |ms: f64| Link::new(Duration::from_secs_f64(ms / 1e3), rate);

    let wan = Wan::create("slbench", link(2.0))?;
    let mut checks = Vec::new();
    for &ms in &o.rtts_ms {
        wan.set_link(link(ms));
        let c = wan.self_check()?;
        checks.push((ms, c.rtt.as_secs_f64() * 1e3, c.udp_bps / 1e6, c.goodput_bps / 1e6));
    }

    // The server side: registry and gateway.
    let registry = wan.server.run(Registry::start);
    let work = tempfile::Builder::new().prefix("starlight-wan-").tempdir_in("/var/tmp")?;
    let gw_bin = exe("starlight-gateway")?;
    let gw_listen = format!("{SERVER_ADDR}:{GW_PORT}");
    let upstream = format!("http://{}", registry.addr());
    let gw_log = std::fs::File::create(work.path().join("gateway.log"))?;
    let gateway = wan.server.run(|| {
        Command::new(&gw_bin)
            .args(["--upstream", &upstream, "--listen", &gw_listen, "--store"])
            .arg(work.path().join("gw-store"))
            .arg("--index")
            .arg(work.path().join("gw-index.redb"))
            .env("STARLIGHT_LOG", "warn")
            .stdout(gw_log.try_clone().unwrap())
            .stderr(gw_log)
            .spawn()
    })?;
    // Killed however this function ends, panics included.
    let gateway = Server { name: "gateway", addr: gw_listen.clone(), child: gateway, _dir: None };
    let gw = format!("http://{gw_listen}");
    let server_ok = wan.server.run(|| {
        let t = Instant::now();
        while std::net::TcpStream::connect((SERVER_ADDR, GW_PORT)).is_err() {
            if t.elapsed() > Duration::from_secs(20) {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        true
    });
    ensure!(
        server_ok,
        "the gateway did not listen on {gw_listen}: {}",
        std::fs::read_to_string(work.path().join("gateway.log")).unwrap_or_default()
    );

    let result = (|| -> Result<Report> {
        let mut images = Vec::new();
        for app in &o.apps {
            stop_requested()?;
            for v in ["v1", "v2"] {
                let src = format!("oci:{}:{app}-{v}", layout.display());
                let dst = format!("docker://{}/bench/{app}:{v}", registry.addr());
                wan.server.run(|| skopeo_copy(&src, &dst, None));
            }
            images.push(prepare(&wan, &layout, &gw, app)?);
        }
        let mut samples = Vec::new();
        let mut failures = Vec::new();
        'sweep: for (&ms, &rounds) in o.rtts_ms.iter().zip(&o.rounds) {
            wan.set_link(link(ms));
            println!("\n== {} ==", wan.link());
            for round in 0..rounds {
                for img in &images {
                    // Each round starts with another arm (the cyclic order stays), so that no arm
                    // always runs first on a fresh link.
                    let n = o.arms.len();
                    for k in 0..n {
                        let arm = o.arms[(k + round) % n];
                        if stop_requested().is_err() {
                            // Interrupted: what was measured is still written, and says so.
                            failures.push(format!("interrupted at RTT {ms} ms, round {round}, {}", img.app));
                            break 'sweep;
                        }
                        // A failed measurement is reported and left out; the run goes on.
                        match measure(&wan, &gw, img, arm) {
                            Ok(secs) => {
                                println!("  round {round} {:<10} {arm:?} {secs:8.2} s", img.app);
                                samples.push(Sample { rtt_ms: ms, app: img.app.clone(), arm, round, secs });
                            }
                            Err(e) => {
                                println!("  round {round} {:<10} {arm:?} FAILED: {e:#}", img.app);
                                failures.push(format!(
                                    "RTT {ms} ms, {} arm {arm:?}, round {round}: {e:#}",
                                    img.app
                                ));
                            }
                        }
                    }
                }
            }
        }
        Ok(Report {
            command: std::env::args().collect::<Vec<_>>().join(" "),
            mbit: o.mbit,
            rounds: o.rounds.clone(),
            self_checks: checks,
            images,
            samples,
            failures,
        })
    })();
    drop(gateway);
    let report = match result {
        Ok(r) => r,
        Err(e) => {
            let log = std::fs::read_to_string(work.path().join("gateway.log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            eprintln!("gateway log (last lines):\n{}", tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
            return Err(e);
        }
    };
    drop(registry);
    std::fs::create_dir_all(&o.out)?;
    std::fs::write(o.out.join("wan.json"), serde_json::to_vec_pretty(&report)?)?;
    let (table, svg) = summarize(&report);
    println!("\n{table}");
    std::fs::write(o.out.join("wan.md"), &table)?;
    std::fs::write(o.out.join("wan.svg"), svg)?;
    println!("written: {0}/wan.json, {0}/wan.md, {0}/wan.svg", o.out.display());
    Ok(())
}

/// The image's ready line and sizes; converts it and records its start-up traces (one run of v1
/// and of v2 through a snapshotter that uploads them), as a registry does once per image.
fn prepare(wan: &Wan, layout: &Path, gw: &str, app: &str) -> Result<ImageInfo> {
    let config = crate::layout_config(layout, &format!("{app}-v1"))?;
    let ready = config["config"]["Labels"]["org.starlight.bench.ready"]
        .as_str()
        .with_context(|| format!("{app}-v1 has no label org.starlight.bench.ready"))?
        .to_string();
    let size = |tag: &str| -> Result<u64> { Ok(crate::layers_of(layout, tag)?.iter().map(|l| l.size).sum()) };
    let t = Instant::now();
    let fresh = bundle_url(gw, app, "v1", None);
    let (bundle_bytes, _) = wan.worker.run(|| crate::gateway::curl_download(&fresh))?;
    let (_, _) = wan.worker.run(|| crate::gateway::curl_download(&bundle_url(gw, app, "v2", None)))?;
    println!("{app}: converted v1 and v2 in {:.1}s", t.elapsed().as_secs_f64());
    for v in ["v1", "v2"] {
        let w = WorkerSide::start(wan, gw, true, true)?;
        w.starlight_pull(app, v)?;
        w.run_until_ready(app, v, &ready, true)?;
        let out = w.ctr(&["images", "rm", "--sync", &image_name(app, v)])?;
        ensure!(out.status.success(), "ctr images rm: {}", String::from_utf8_lossy(&out.stderr));
        w.wait_mounts_gone(Duration::from_secs(60))?;
        println!("{app}: start-up trace of {v} recorded");
    }
    let digest = manifest_digest(wan, gw, app, "v1")?;
    let upd = bundle_url(gw, app, "v2", Some(&digest));
    let (update_bytes, _) = wan.worker.run(|| crate::gateway::curl_download(&upd))?;
    Ok(ImageInfo {
        app: app.into(),
        ready,
        v1_bytes: size(&format!("{app}-v1"))?,
        v2_bytes: size(&format!("{app}-v2"))?,
        bundle_bytes,
        update_bytes,
    })
}

fn bundle_url(gw: &str, app: &str, tag: &str, have: Option<&str>) -> String {
    let mut u = format!("{gw}/v2/bench/{app}/_starlight/bundle?to={tag}");
    if let Some(h) = have {
        u.push_str(&format!("&have={h}"));
    }
    u
}

fn manifest_digest(wan: &Wan, gw: &str, app: &str, tag: &str) -> Result<String> {
    let url = format!("{gw}/v2/bench/{app}/manifests/{tag}");
    let out = wan.worker.run(|| {
        Command::new("curl")
            .args(["-sS", "--fail", "-I", "-H"])
            .arg("Accept: application/vnd.oci.image.manifest.v1+json")
            .arg(&url)
            .output()
    })?;
    ensure!(out.status.success(), "HEAD {url}: {}", String::from_utf8_lossy(&out.stderr));
    let head = String::from_utf8_lossy(&out.stdout);
    head.lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("docker-content-digest").then(|| v.trim().to_string())
        })
        .with_context(|| format!("HEAD {url}: no Docker-Content-Digest"))
}

fn image_name(app: &str, tag: &str) -> String {
    format!("{SERVER_ADDR}:{GW_PORT}/bench/{app}:{tag}")
}

/// One arm, timed from the pull's start to the ready line.
fn measure(wan: &Wan, gw: &str, img: &ImageInfo, arm: Arm) -> Result<f64> {
    let app = &img.app;
    match arm {
        Arm::E => {
            let url = bundle_url(gw, app, "v1", None);
            let (_, secs) = wan.worker.run(|| crate::gateway::curl_download(&url))?;
            Ok(secs)
        }
        Arm::A | Arm::D => {
            let w = WorkerSide::start(wan, gw, false, false)?;
            if arm == Arm::D {
                w.ctr_pull(app, "v1")?;
            }
            let v = if arm == Arm::D { "v2" } else { "v1" };
            let t = Instant::now();
            w.ctr_pull(app, v)?;
            let ready = w.run_until_ready(app, v, &img.ready, false)?;
            Ok((ready - t).as_secs_f64())
        }
        Arm::B | Arm::C => {
            let w = WorkerSide::start(wan, gw, true, false)?;
            if arm == Arm::C {
                w.starlight_pull(app, "v1")?;
                w.wait_whole(app, "v1")?;
            }
            let v = if arm == Arm::C { "v2" } else { "v1" };
            let t = Instant::now();
            w.starlight_pull(app, v)?;
            let ready = w.run_until_ready(app, v, &img.ready, true)?;
            Ok((ready - t).as_secs_f64())
        }
    }
}

/// A fresh worker: containerd with its own root and, for Starlight, the snapshotter.
struct WorkerSide<'a> {
    wan: &'a Wan,
    gw: String,
    dir: tempfile::TempDir,
    snapshotter: Option<Child>,
    containerd: Option<Containerd>,
}

impl<'a> WorkerSide<'a> {
    fn start(wan: &'a Wan, gw: &str, starlight: bool, upload_traces: bool) -> Result<WorkerSide<'a>> {
        let dir = tempfile::Builder::new().prefix("starlight-wan-worker-").tempdir_in("/var/tmp")?;
        let mut w = WorkerSide { wan, gw: gw.into(), dir, snapshotter: None, containerd: None };
        let mut extra = String::new();
        if starlight {
            let socket = w.dir.path().join("snapshotter.sock");
            let log = std::fs::File::create(w.dir.path().join("snapshotter.log"))?;
            let bin = exe("starlight-snapshotter")?;
            let root = w.dir.path().join("snap");
            let child = wan.worker.run(|| {
                Command::new(&bin)
                    .arg("--root")
                    .arg(&root)
                    .arg("--socket")
                    .arg(&socket)
                    .args(["--gateway", gw])
                    .args(upload_traces.then_some("--upload-traces"))
                    .stdout(log.try_clone().unwrap())
                    .stderr(log)
                    .spawn()
            })?;
            w.snapshotter = Some(child);
            let t = Instant::now();
            while !socket.exists() {
                ensure!(
                    t.elapsed() < Duration::from_secs(30),
                    "the snapshotter never listened: {}",
                    w.log("snapshotter.log")
                );
                std::thread::sleep(Duration::from_millis(10));
            }
            extra = format!(
                "[proxy_plugins]\n  [proxy_plugins.starlight]\n    type = \"snapshot\"\n    address = \"{}\"\n",
                socket.display()
            );
        }
        // containerd's root on the same filesystem as the snapshotter's, so that neither gets a
        // faster disk (a tmpfs /tmp) than the other.
        w.containerd = Some(wan.worker.run(|| Containerd::start_under(Path::new("/var/tmp"), &extra)));
        Ok(w)
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default()
    }

    fn cd(&self) -> &Containerd {
        self.containerd.as_ref().expect("containerd runs")
    }

    /// `ctr` in the worker namespace.
    fn ctr_cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new("ctr");
        c.arg("--address").arg(self.cd().socket()).args(["--namespace", NS]).args(args);
        c
    }

    fn ctr(&self, args: &[&str]) -> Result<std::process::Output> {
        let mut c = self.ctr_cmd(args);
        Ok(self.wan.worker.run(|| c.output())?)
    }

    fn ctr_pull(&self, app: &str, tag: &str) -> Result<()> {
        let out = self.ctr(&["images", "pull", "--plain-http", &image_name(app, tag)])?;
        ensure!(
            out.status.success(),
            "ctr images pull {app}:{tag}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }

    fn starlight_pull(&self, app: &str, tag: &str) -> Result<()> {
        let bin = exe("starlight-pull")?;
        let mut c = Command::new(bin);
        c.args(["--gateway", &self.gw, "--store"])
            .arg(self.dir.path().join("unused-store"))
            .arg("--containerd")
            .arg(self.cd().socket())
            .args(["--namespace", NS, "--snapshotter", "starlight"])
            .arg(format!("bench/{app}:{tag}"));
        let out = self.wan.worker.run(|| c.output())?;
        ensure!(
            out.status.success(),
            "starlight-pull --containerd {app}:{tag}: {}{}",
            String::from_utf8_lossy(&out.stderr),
            self.log("snapshotter.log")
        );
        Ok(())
    }

    /// Waits until the mount of `app:tag` has its whole image (its summary line).
    fn wait_whole(&self, app: &str, tag: &str) -> Result<()> {
        // The snapshotter mounts images by digest: the only image pulled so far is this one.
        let want = format!("pulled bench/{app}");
        let t = Instant::now();
        loop {
            let mut logs = String::new();
            for e in std::fs::read_dir(self.dir.path().join("snap/snapshots"))?.flatten() {
                logs.push_str(&std::fs::read_to_string(e.path().join("mount.log")).unwrap_or_default());
            }
            if logs.lines().any(|l| l.starts_with(&want)) {
                return Ok(());
            }
            ensure!(logs.lines().all(|l| !l.contains("error")), "the mount of {app}:{tag} failed: {logs}");
            ensure!(t.elapsed() < ARM_TIMEOUT, "{app}:{tag} never arrived whole: {logs}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Runs the image until its ready line; returns when the line came. The container is killed.
    fn run_until_ready(&self, app: &str, tag: &str, ready: &str, starlight: bool) -> Result<Instant> {
        let name = image_name(app, tag);
        let id = format!("{app}-{tag}");
        let mut args = vec!["run", "--rm"];
        if starlight {
            args.extend(["--snapshotter", "starlight"]);
        }
        args.extend([name.as_str(), id.as_str()]);
        let mut c = self.ctr_cmd(&args);
        c.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = self.wan.worker.run(|| c.spawn())?;
        let (tx, rx) = mpsc::channel::<(Instant, String)>();
        for pipe in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines() {
                    let Ok(line) = line else { break };
                    if tx.send((Instant::now(), line)).is_err() {
                        break;
                    }
                }
            });
        }
        drop(tx);
        let deadline = Instant::now() + ARM_TIMEOUT;
        let mut seen = Vec::new();
        let result = loop {
            match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok((at, line)) if line.contains(ready) => break Ok(at),
                Ok((_, line)) => seen.push(line),
                Err(_) => {
                    break Err(anyhow::anyhow!(
                        "{name} never printed {ready:?}; it printed:\n{}",
                        seen.join("\n")
                    ));
                }
            }
        };
        let _ = self.ctr(&["task", "kill", "--signal", "SIGKILL", &id]);
        let t = Instant::now();
        while child.try_wait()?.is_none() {
            if t.elapsed() > Duration::from_secs(30) {
                let _ = child.kill();
                let _ = child.wait();
                bail!("ctr run of {name} did not end after its task was killed");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        result
    }

    /// The snapshotter's mount processes (their command lines name its root).
    fn mount_pids(&self) -> Vec<i32> {
        starlight_worker::snapshotter::mount_processes(&self.dir.path().join("snap"))
    }

    fn wait_mounts_gone(&self, limit: Duration) -> Result<()> {
        let t = Instant::now();
        while !self.mount_pids().is_empty() {
            ensure!(t.elapsed() < limit, "mount processes still running after the image was removed");
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }
}

impl Drop for WorkerSide<'_> {
    fn drop(&mut self) {
        // containerd first (no containers run any more), then the snapshotter and its mounts.
        self.containerd.take();
        if let Some(mut s) = self.snapshotter.take() {
            let _ = s.kill();
            let _ = s.wait();
        }
        for pid in self.mount_pids() {
            // SAFETY: a mount process of this worker's own snapshotter root.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let t = Instant::now();
        while !self.mount_pids().is_empty() && t.elapsed() < Duration::from_secs(20) {
            std::thread::sleep(Duration::from_millis(20));
        }
        // Anything still mounted below the root (a mount that died) goes before the directory.
        let root = self.dir.path().to_string_lossy().into_owned();
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        let mut below: Vec<&str> =
            mounts.lines().filter_map(|l| l.split(' ').nth(1)).filter(|m| m.starts_with(&root)).collect();
        below.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in below {
            let _ = Command::new("umount").arg("-l").arg(m).status();
        }
    }
}

impl Report {
    /// Adds another run's measurements (its commands are kept, one per line).
    pub fn merge(&mut self, other: Report) {
        self.command = format!("{}` and `{}", self.command, other.command);
        for i in other.images {
            if !self.images.iter().any(|j| j.app == i.app) {
                self.images.push(i);
            }
        }
        self.rounds.extend(other.rounds);
        self.self_checks.extend(other.self_checks);
        self.self_checks.sort_by(|a, b| a.0.total_cmp(&b.0));
        self.samples.extend(other.samples);
        self.failures.extend(other.failures);
    }
}

fn harmonic_mean(v: &[f64]) -> f64 {
    v.len() as f64 / v.iter().map(|x| 1.0 / x).sum::<f64>()
}

/// The results table (markdown) and a plot (SVG) of a report.
pub fn summarize(r: &Report) -> (String, String) {
    let rtts: Vec<f64> = {
        let mut v: Vec<f64> = r.samples.iter().map(|s| s.rtt_ms).collect();
        v.sort_by(f64::total_cmp);
        v.dedup();
        v
    };
    let med = |ms: f64, app: &str, arm: Arm| -> Option<f64> {
        let v: Vec<f64> = r
            .samples
            .iter()
            .filter(|s| s.rtt_ms == ms && s.app == app && s.arm == arm)
            .map(|s| s.secs)
            .collect();
        (!v.is_empty()).then(|| crate::median(v))
    };
    let mut t = String::new();
    use std::fmt::Write;
    let _ = writeln!(t, "Images (compressed layers; Starlight bundle bytes):\n");
    let _ = writeln!(t, "| image | ready line | v1 MB | v2 MB | fresh bundle MB | update bundle MB |");
    let _ = writeln!(t, "|---|---|---|---|---|---|");
    for i in &r.images {
        let _ = writeln!(
            t,
            "| {} | `{}` | {:.1} | {:.1} | {:.1} | {:.1} |",
            i.app,
            i.ready,
            i.v1_bytes as f64 / 1e6,
            i.v2_bytes as f64 / 1e6,
            i.bundle_bytes as f64 / 1e6,
            i.update_bytes as f64 / 1e6
        );
    }
    let _ = writeln!(
        t,
        "\nArms: {}.",
        Arm::ALL.iter().map(|a| format!("{a:?} {}", a.what())).collect::<Vec<_>>().join("; ")
    );
    let mut summary_rows = Vec::new();
    for &ms in &rtts {
        let rounds = r.samples.iter().filter(|s| s.rtt_ms == ms).map(|s| s.round + 1).max().unwrap_or(0);
        let _ = writeln!(
            t,
            "\nRTT {ms} ms, {} Mbit/s: seconds from pull start to ready line, median of {rounds} round(s)\n",
            r.mbit
        );
        let _ = writeln!(t, "| image | A | B | C | D | E | A/B | D/C | B before E |");
        let _ = writeln!(t, "|---|---|---|---|---|---|---|---|---|");
        let (mut ab, mut dc, mut before, mut n) = (Vec::new(), Vec::new(), 0, 0);
        for i in &r.images {
            let m: Vec<Option<f64>> = Arm::ALL.iter().map(|&a| med(ms, &i.app, a)).collect();
            let cell = |x: Option<f64>| x.map_or("-".into(), |x| format!("{x:.2}"));
            let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
                (Some(a), Some(b)) => Some(a / b),
                _ => None,
            };
            let (r_ab, r_dc) = (ratio(m[0], m[1]), ratio(m[3], m[2]));
            ab.extend(r_ab);
            dc.extend(r_dc);
            let be = match (m[1], m[4]) {
                (Some(b), Some(e)) => {
                    n += 1;
                    if b < e {
                        before += 1;
                    }
                    if b < e { "yes" } else { "no" }
                }
                _ => "-",
            };
            let _ = writeln!(
                t,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {be} |",
                i.app,
                cell(m[0]),
                cell(m[1]),
                cell(m[2]),
                cell(m[3]),
                cell(m[4]),
                r_ab.map_or("-".into(), |x| format!("{x:.2}x")),
                r_dc.map_or("-".into(), |x| format!("{x:.2}x")),
            );
        }
        let hm = |v: &[f64]| if v.is_empty() { "-".to_string() } else { format!("{:.2}x", harmonic_mean(v)) };
        let _ =
            writeln!(t, "| **harmonic mean** | | | | | | **{}** | **{}** | {before}/{n} |", hm(&ab), hm(&dc));
        summary_rows.push((ms, hm(&ab), hm(&dc), format!("{before}/{n}")));
    }
    let _ = writeln!(t, "\nSummary (harmonic means over images of the per-image speedups):\n");
    let _ = writeln!(t, "| RTT ms | fresh B over A | update C over D | B ready before E's download ends |");
    let _ = writeln!(t, "|---|---|---|---|");
    for (ms, ab, dc, be) in &summary_rows {
        let _ = writeln!(t, "| {ms} | {ab} | {dc} | {be} |");
    }
    let _ = writeln!(t, "\nSelf-check of the emulated link at {} Mbit/s:\n", r.mbit);
    let _ =
        writeln!(t, "| RTT set | RTT measured | link throughput Mbit/s (UDP) | one TCP flow, data Mbit/s |");
    let _ = writeln!(t, "|---|---|---|---|");
    for (ms, rtt, udp, tcp) in &r.self_checks {
        let _ = writeln!(t, "| {ms} ms | {rtt:.2} ms | {udp:.1} | {tcp:.1} |");
    }
    if !r.failures.is_empty() {
        let _ = writeln!(t, "\nFailed measurements (left out above):\n");
        for f in &r.failures {
            let _ = writeln!(t, "- {}", f.lines().next().unwrap_or(""));
        }
    }
    let _ = writeln!(t, "\nCommand(s): `{}`", r.command);
    (t, plot(r, &rtts))
}

/// Mean seconds to ready over the images, per arm, against RTT.
fn plot(r: &Report, rtts: &[f64]) -> String {
    let (w, h, left, right, top, bottom) = (700.0, 400.0, 60.0, 230.0, 40.0, 50.0);
    let colors = ["#d62728", "#1f77b4", "#2ca02c", "#ff7f0e", "#7f7f7f"];
    let mut series = Vec::new();
    for &arm in &Arm::ALL {
        let pts: Vec<(f64, f64)> = rtts
            .iter()
            .filter_map(|&ms| {
                // Only images with a result in every arm, so that the curves compare alike.
                let per_image: Vec<f64> = r
                    .images
                    .iter()
                    .filter(|i| {
                        Arm::ALL.iter().all(|&a| {
                            r.samples.iter().any(|s| s.rtt_ms == ms && s.app == i.app && s.arm == a)
                        })
                    })
                    .filter_map(|i| {
                        let v: Vec<f64> = r
                            .samples
                            .iter()
                            .filter(|s| s.rtt_ms == ms && s.app == i.app && s.arm == arm)
                            .map(|s| s.secs)
                            .collect();
                        (!v.is_empty()).then(|| crate::median(v))
                    })
                    .collect();
                (!per_image.is_empty()).then(|| (ms, per_image.iter().sum::<f64>() / per_image.len() as f64))
            })
            .collect();
        series.push((arm, pts));
    }
    let ymax = series.iter().flat_map(|(_, p)| p.iter().map(|x| x.1)).fold(1.0, f64::max) * 1.1;
    let xmax = rtts.iter().copied().fold(1.0, f64::max);
    let x = |ms: f64| left + (w - left - right) * ms / xmax;
    let y = |s: f64| top + (h - top - bottom) * (1.0 - s / ymax);
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{0}\" y=\"16\" text-anchor=\"middle\" font-size=\"14\">Seconds from pull start to ready line, {1} Mbit/s</text>\n\
         <text x=\"{0}\" y=\"30\" text-anchor=\"middle\" font-size=\"11\">at each RTT: mean over the images measured in every arm</text>\n",
        (w - right + left) / 2.0,
        r.mbit
    );
    svg += &format!(
        "<line x1=\"{left}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/>\n<line x1=\"{left}\" y1=\"{top}\" x2=\"{left}\" y2=\"{}\" stroke=\"black\"/>\n",
        h - bottom,
        w - right,
        h - bottom,
        h - bottom
    );
    for &ms in rtts {
        svg += &format!(
            "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{ms}</text>\n",
            x(ms),
            h - bottom + 16.0
        );
    }
    svg += &format!(
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">RTT (ms)</text>\n",
        (w - right + left) / 2.0,
        h - 12.0
    );
    let step = nice_step(ymax / 5.0);
    let mut s = 0.0;
    while s <= ymax {
        let digits = if step < 1.0 { 1 } else { 0 };
        svg += &format!(
            "<line x1=\"{left}\" y1=\"{0:.1}\" x2=\"{1}\" y2=\"{0:.1}\" stroke=\"#ddd\"/><text x=\"{2}\" y=\"{3:.1}\" text-anchor=\"end\">{4:.5$}</text>\n",
            y(s),
            w - right,
            left - 6.0,
            y(s) + 4.0,
            s,
            digits
        );
        s += step;
    }
    for (k, (arm, pts)) in series.iter().enumerate() {
        if pts.is_empty() {
            continue;
        }
        let path: Vec<String> = pts.iter().map(|(a, b)| format!("{:.1},{:.1}", x(*a), y(*b))).collect();
        svg += &format!(
            "<polyline fill=\"none\" stroke=\"{}\" stroke-width=\"2\" points=\"{}\"/>\n",
            colors[k],
            path.join(" ")
        );
        for (a, b) in pts {
            svg += &format!(
                "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"{}\"/>\n",
                x(*a),
                y(*b),
                colors[k]
            );
        }
        let ly = top + 20.0 + 36.0 * k as f64;
        svg += &format!(
            "<rect x=\"{}\" y=\"{}\" width=\"12\" height=\"12\" fill=\"{}\"/><text x=\"{}\" y=\"{}\">{arm:?}: {}</text>\n",
            w - right + 10.0,
            ly - 10.0,
            colors[k],
            w - right + 26.0,
            ly,
            arm.what().split(" (").next().unwrap_or("").split(',').next().unwrap_or("")
        );
    }
    svg += "</svg>\n";
    svg
}

fn nice_step(raw: f64) -> f64 {
    let p = 10f64.powf(raw.log10().floor());
    for m in [1.0, 2.0, 5.0, 10.0] {
        if m * p >= raw {
            return m * p;
        }
    }
    10.0 * p
}
