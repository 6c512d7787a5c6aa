//! The attack bench: while idle, slow-body and non-reading clients attack one gateway, a normal
//! `skopeo copy` through the pass-through and a normal `starlight-pull` must both complete. Their
//! times are measured first without the attack, then under it, side by side; the gateway's RSS
//! and open descriptors are sampled from /proc throughout.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use starlight_conformance::images::skopeo_copy;
use starlight_conformance::servers::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use crate::gateway::{rss_kib, start_gateway};

/// How many of each attacker.
#[derive(Clone, Copy, Debug)]
pub struct Attackers {
    pub idle: usize,
    pub slow_body: usize,
    pub non_reading: usize,
}

/// The gateway's settings for the run: the protections' timeouts short enough to act within it.
const CONFIG: &str = "idle_timeout = 10.0\nbody_read_timeout = 10.0\nwrite_stall_timeout = 10.0\n";

/// Attackers come from 127.0.0.2, the measured clients from 127.0.0.1.
const ATTACKER: [u8; 4] = [127, 0, 0, 2];

/// What the attackers did, counted as they go.
#[derive(Default)]
struct Counts {
    connections: AtomicU64,
    refused: AtomicU64,
    cut: AtomicU64,
}

/// Raises this process's open-file limit to its hard limit (the children inherit it).
fn raise_nofile() -> u64 {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit write and read only the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
    lim.rlim_cur
}

fn open_fds(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count() as u64).unwrap_or(0)
}

async fn connect_from(ip: [u8; 4], to: SocketAddr, small_window: bool) -> std::io::Result<TcpStream> {
    let s = TcpSocket::new_v4()?;
    if small_window {
        s.set_recv_buffer_size(4096)?;
    }
    s.bind(SocketAddr::from((ip, 0)))?;
    s.connect(to).await
}

/// Reads what the server sends until it closes; counts a refusal (503 before anything asked).
async fn until_closed(mut s: TcpStream, counts: &Counts) {
    let mut buf = [0u8; 256];
    if let Ok(n) = s.read(&mut buf).await
        && buf[..n].starts_with(b"HTTP/1.1 503")
    {
        counts.refused.fetch_add(1, Ordering::Relaxed);
    }
    let _ = s.read_to_end(&mut Vec::new()).await;
}

/// One attacker: connects, does its kind of harm until the gateway closes the connection, and
/// starts again until `stop`.
async fn attacker(kind: &'static str, gw: SocketAddr, counts: Arc<Counts>, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Relaxed) {
        let Ok(mut s) = connect_from(ATTACKER, gw, kind == "non_reading").await else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        counts.connections.fetch_add(1, Ordering::Relaxed);
        match kind {
            // Never a byte.
            "idle" => until_closed(s, &counts).await,
            // An upload session, then a chunk announcing 1 MiB that comes a byte a second.
            "slow_body" => {
                if let Some(location) = start_upload(&mut s).await {
                    let head = format!(
                        "PATCH {location} HTTP/1.1\r\nhost: gw\r\ncontent-type: application/octet-stream\r\ncontent-length: 1048576\r\n\r\n"
                    );
                    if s.write_all(head.as_bytes()).await.is_ok() {
                        while !stop.load(Ordering::Relaxed) && s.write_all(b"x").await.is_ok() {
                            let mut probe = [0u8; 1];
                            // An answer (408) or the end means the gateway cut it.
                            if let Ok(Ok(_)) =
                                tokio::time::timeout(Duration::from_secs(1), s.read(&mut probe)).await
                            {
                                break;
                            }
                        }
                    }
                }
            }
            // A bundle, then nothing read (a 4 KiB receive window).
            _ => {
                let req = "GET /v2/app/_starlight/bundle?to=v1 HTTP/1.1\r\nhost: gw\r\n\r\n";
                if s.write_all(req.as_bytes()).await.is_ok() {
                    // Poll the socket for its end without reading data: a peek of one byte.
                    loop {
                        let mut b = [0u8; 1];
                        match s.peek(&mut b).await {
                            Ok(0) | Err(_) => break,
                            Ok(_) => tokio::time::sleep(Duration::from_millis(500)).await,
                        }
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                    }
                }
            }
        }
        if !stop.load(Ordering::Relaxed) {
            counts.cut.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Starts a blob upload on `s` (keep-alive) and returns its location's path and query.
async fn start_upload(s: &mut TcpStream) -> Option<String> {
    let req = "POST /v2/attack/blobs/uploads/ HTTP/1.1\r\nhost: gw\r\ncontent-length: 0\r\n\r\n";
    s.write_all(req.as_bytes()).await.ok()?;
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = s.read(&mut buf).await.ok()?;
        if n == 0 {
            return None;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let location = head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case("location").then(|| v.trim().to_string())
    })?;
    // Absolute (the gateway's own address) or a path.
    Some(match location.split_once("://") {
        Some((_, rest)) => rest[rest.find('/')?..].to_string(),
        None => location,
    })
}

/// Times `cmd`, failing with its stderr.
fn timed(cmd: &mut Command) -> anyhow::Result<f64> {
    let t = Instant::now();
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(t.elapsed().as_secs_f64())
}

/// The two measured clients, one after the other: (skopeo copy s, starlight-pull s).
fn clients(base: &str, pull: &Path, work: &Path, round: &str) -> anyhow::Result<(f64, f64)> {
    let host = base.trim_start_matches("http://");
    let dest = work.join(format!("copy-{round}"));
    let copy = timed(
        Command::new("skopeo")
            .args(["copy", "--quiet", "--src-tls-verify=false"])
            .args([format!("docker://{host}/app:v1"), format!("dir:{}", dest.display())]),
    )?;
    let store = work.join(format!("pull-{round}"));
    let pulled = timed(Command::new(pull).args(["--gateway", base, "--store"]).arg(&store).arg("app:v1"))?;
    Ok((copy, pulled))
}

fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find(|l| l.strip_prefix(name).is_some_and(|r| r.starts_with(' ')))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0)
}

pub fn run(
    bin: Option<PathBuf>,
    pull_bin: Option<PathBuf>,
    layout: &Path,
    n: Attackers,
) -> anyhow::Result<()> {
    let nofile = raise_nofile();
    let bin = crate::gateway::gateway_bin(bin)?;
    let pull = match pull_bin {
        Some(p) => p,
        None => std::env::current_exe()?.with_file_name("starlight-pull"),
    };
    let work = tempfile::tempdir()?;
    let reg = Registry::start();
    skopeo_copy(&format!("oci:{}:app", layout.display()), &format!("docker://{}/app:v1", reg.addr()), None);
    let config = work.path().join("gateway.toml");
    std::fs::write(&config, CONFIG)?;
    let (store, index) = (work.path().join("store"), work.path().join("index.redb"));
    let gw = start_gateway(
        &bin,
        &format!("http://{}", reg.addr()),
        &[
            "--store",
            &store.to_string_lossy(),
            "--index",
            &index.to_string_lossy(),
            "--config",
            &config.to_string_lossy(),
        ],
    )?;
    let pid = gw.child.id();
    let base = format!("http://{}", gw.addr);
    let addr: SocketAddr = gw.addr.parse()?;

    // Converted, start-up order found, batches made: both rounds measure serving.
    eprintln!("converting...");
    let warm = work.path().join("warm");
    timed(Command::new(&pull).args(["--gateway", &base, "--store"]).arg(&warm).arg("app:v1"))?;
    let (rss_before, _) = rss_kib(pid);
    let fds_before = open_fds(pid);
    // One discarded round (caches), then the quiet one.
    clients(&base, &pull, work.path(), "discarded")?;
    let (copy_quiet, pull_quiet) = clients(&base, &pull, work.path(), "quiet")?;

    eprintln!("attacking...");
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let (counts, stop) = (Arc::new(Counts::default()), Arc::new(AtomicBool::new(false)));
    let mut tasks = Vec::new();
    for (kind, count) in [("idle", n.idle), ("slow_body", n.slow_body), ("non_reading", n.non_reading)] {
        for _ in 0..count {
            tasks.push(rt.spawn(attacker(kind, addr, counts.clone(), stop.clone())));
        }
    }
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let sampling = sampling.clone();
        std::thread::spawn(move || {
            let (mut rss, mut fds) = (0, 0);
            while sampling.load(Ordering::Relaxed) {
                rss = rss.max(rss_kib(pid).0);
                fds = fds.max(open_fds(pid));
                std::thread::sleep(Duration::from_millis(100));
            }
            (rss, fds)
        })
    };
    // Every attacker connected, every timeout past once: the attackers are back for more.
    let attack_started = Instant::now();
    std::thread::sleep(Duration::from_secs(12));
    let attacked = clients(&base, &pull, work.path(), "attacked");
    // Two rounds of every timeout at least.
    std::thread::sleep(Duration::from_secs(25).saturating_sub(attack_started.elapsed()));
    let attack_secs = attack_started.elapsed().as_secs_f64();
    let metrics = rt.block_on(async {
        let c = reqwest::Client::builder().timeout(Duration::from_secs(10)).build()?;
        c.get(format!("{base}/metrics")).send().await?.text().await
    });
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.abort();
    }
    rt.shutdown_timeout(Duration::from_secs(2));
    sampling.store(false, Ordering::Relaxed);
    let (peak_rss, peak_fds) = sampler.join().unwrap_or((0, 0));
    let (copy_attacked, pull_attacked) = attacked?;
    let metrics = metrics.unwrap_or_default();

    println!(
        "## Attack: {} idle, {} slow-body, {} non-reading clients against one gateway\n",
        n.idle, n.slow_body, n.non_reading
    );
    println!("| measure | quiet | under attack | ratio |");
    println!("|---|---|---|---|");
    println!(
        "| `skopeo copy` of `app` through the pass-through | {copy_quiet:.2} s | {copy_attacked:.2} s | {:.2}x |",
        copy_attacked / copy_quiet
    );
    println!(
        "| `starlight-pull` of `app` (converted, into an empty store) | {pull_quiet:.2} s | {pull_attacked:.2} s | {:.2}x |",
        pull_attacked / pull_quiet
    );
    println!(
        "| gateway RSS (before / peak under attack) | {:.1} MiB | {:.1} MiB | |",
        rss_before as f64 / 1024.0,
        peak_rss as f64 / 1024.0
    );
    println!("| gateway open descriptors (before / peak) | {fds_before} | {peak_fds} | |");
    println!();
    println!("| attackers' connections | refused at once (503) | cut by the gateway |");
    println!("|---|---|---|");
    println!(
        "| {} | {} | {} |",
        counts.connections.load(Ordering::Relaxed),
        counts.refused.load(Ordering::Relaxed),
        counts.cut.load(Ordering::Relaxed)
    );
    println!();
    let pre = "starlight_gateway_timeouts_total{reason=";
    println!(
        "Attack: {attack_secs:.0} s, the measured clients after its first 12 s. Gateway counters: idle {}, \
         body_read {}, write_stall {}, connections refused {}. Settings: `{}`, other settings default; \
         open-file limit {nofile}.",
        metric(&metrics, &format!("{pre}\"idle\"}}")),
        metric(&metrics, &format!("{pre}\"body_read\"}}")),
        metric(&metrics, &format!("{pre}\"write_stall\"}}")),
        metric(&metrics, "starlight_gateway_connections_refused_total"),
        CONFIG.trim().replace('\n', "`, `"),
    );
    drop(gw);
    Ok(())
}
