//! The worker benchmark: how fast `starlight-pull` applies a bundle on loopback and how much memory
//! it takes doing it, and how a complete image served by the FUSE filesystem compares with the same
//! tree on the local disk (`find -exec stat` and `tar c`, cold and warm caches).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, bail};
use starlight_conformance::images::skopeo_copy;
use starlight_conformance::layout::{Layer, write_image};
use starlight_conformance::servers::Registry;

use crate::bundle::bytes;
use crate::gateway::{curl_download, start_gateway};
use crate::median;

/// `mib` MiB: three quarters incompressible in 16 MiB files, a quarter text in 64 KiB files.
fn mixed_image(layout: &Path, tag: &str, mib: usize) {
    let mut layer = Layer::new().dir("big", 0o755).dir("text", 0o755);
    for i in 0..(mib * 3 / 4).div_ceil(16) {
        layer = layer.file(&format!("big/{i}"), &bytes(2_000_000 + i as u64, 16 << 20, false));
    }
    let small = (mib / 4) * 16;
    for d in 0..small.div_ceil(256) {
        layer = layer.dir(&format!("text/{d}"), 0o755);
        for f in 0..256.min(small - d * 256) {
            let n = (d * 256 + f) as u64;
            layer = layer.file(&format!("text/{d}/{f}"), &bytes(3_000_000 + n, 64 << 10, true));
        }
    }
    write_image(layout, tag, &[layer.finish()], &["/bin/true"]);
}

/// User + system CPU seconds of a running process.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    // SAFETY: sysconf has no memory effects.
    Some(ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64)
}

/// Runs a command to its end; returns seconds, its CPU seconds and its peak RSS in KiB (VmHWM, read every 5 ms
/// until it exits: wait4's ru_maxrss would count the forked copy of this process before exec).
fn timed(cmd: &mut Command) -> anyhow::Result<(f64, u64, String, f64)> {
    let t = Instant::now();
    let child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
    let pid = child.id();
    // Drain the pipes on threads so the child never blocks on them.
    let mut child = child;
    let (mut so, mut se) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut so, &mut s).ok();
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut se, &mut s).ok();
        s
    });
    let (mut peak, mut cpu) = (0, 0.0);
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        peak = peak.max(crate::gateway::rss_kib(pid).1);
        cpu = cpu_seconds(pid).unwrap_or(cpu);
        std::thread::sleep(std::time::Duration::from_millis(5));
    };
    let secs = t.elapsed().as_secs_f64();
    let (out, err) = (out.join().unwrap_or_default(), err.join().unwrap_or_default());
    if !status.success() {
        bail!("{cmd:?} failed:\n{out}\n{err}");
    }
    Ok((secs, peak, out, cpu))
}

fn drop_caches() -> anyhow::Result<()> {
    // SAFETY: sync has no arguments.
    unsafe { libc::sync() };
    std::fs::write("/proc/sys/vm/drop_caches", "3").context("drop caches (needs root)")
}

/// `find DIR -exec stat {} +` and `tar cf - DIR | wc -c`: seconds each.
fn walk(dir: &Path) -> anyhow::Result<(f64, f64)> {
    let t = Instant::now();
    let st =
        Command::new("find").arg(dir).args(["-exec", "stat", "{}", "+"]).stdout(Stdio::null()).status()?;
    if !st.success() {
        bail!("find -exec stat on {} failed", dir.display());
    }
    let stat = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let out =
        Command::new("sh").arg("-c").arg("tar -C \"$1\" -cf - . | wc -c").arg("sh").arg(dir).output()?;
    if !out.status.success() {
        bail!("tar c of {} failed", dir.display());
    }
    Ok((stat, t.elapsed().as_secs_f64()))
}

fn is_mounted(dir: &Path) -> bool {
    let m = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    m.lines().any(|l| l.split(' ').nth(4) == dir.to_str())
}

/// Compares the FUSE mount of `image` (whole in `store`) with its export on the local disk.
fn fuse_vs_disk(pull: &Path, store: &Path, image: &str, work: &Path, rounds: usize) -> anyhow::Result<()> {
    let name = image.replace([':', '/'], "-");
    let disk = work.join(format!("export-{name}"));
    let mnt = work.join(format!("mnt-{name}"));
    std::fs::create_dir_all(&mnt)?;
    timed(Command::new(pull).arg("--store").arg(store).args(["export", image]).arg(&disk))?;
    let mut child = Command::new(pull)
        .arg("--store")
        .arg(store)
        .args(["--gateway", "http://127.0.0.1:9", "mount", image])
        .arg(&mnt)
        .stdout(Stdio::null())
        .spawn()?;
    let t = Instant::now();
    while !is_mounted(&mnt) {
        if t.elapsed().as_secs() > 30 {
            let _ = child.kill();
            bail!("{image} did not mount");
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let mut rows = Vec::new();
    for (label, cold) in [("cold", true), ("warm", false)] {
        let (mut ds, mut dt, mut fs, mut ft) = (vec![], vec![], vec![], vec![]);
        for _ in 0..rounds {
            for (dir, s, t) in [(&disk, &mut ds, &mut dt), (&mnt, &mut fs, &mut ft)] {
                if cold {
                    drop_caches()?;
                } else {
                    walk(dir)?; // warm it up
                }
                let (a, b) = walk(dir)?;
                s.push(a);
                t.push(b);
            }
        }
        rows.push((label, median(ds), median(fs), median(dt), median(ft)));
    }
    // SAFETY: our own child; SIGTERM unmounts.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    child.wait()?;
    println!("| {image} | caches | find -exec stat: disk / FUSE (ratio) | tar c: disk / FUSE (ratio) |");
    println!("|---|---|---|---|");
    for (label, ds, fs, dt, ft) in rows {
        println!(
            "| | {label} | {:.3} s / {:.3} s ({:.2}x) | {:.3} s / {:.3} s ({:.2}x) |",
            ds,
            fs,
            fs / ds,
            dt,
            ft,
            ft / dt
        );
    }
    Ok(())
}

pub fn run(
    gateway_bin: Option<PathBuf>,
    pull_bin: Option<PathBuf>,
    layout: &Path,
    mib: usize,
    rounds: usize,
) -> anyhow::Result<()> {
    let bin = crate::gateway::gateway_bin(gateway_bin)?;
    let pull = match pull_bin {
        Some(p) => p,
        None => std::env::current_exe()?.with_file_name("starlight-pull"),
    };
    let work = tempfile::tempdir_in("/var/tmp")?;
    let reg = Registry::start();
    skopeo_copy(&format!("oci:{}:app", layout.display()), &format!("docker://{}/app:v1", reg.addr()), None);
    let synth = work.path().join("layout");
    eprintln!("building a {mib} MiB image...");
    mixed_image(&synth, "big", mib);
    skopeo_copy(&format!("oci:{}:big", synth.display()), &format!("docker://{}/big:v1", reg.addr()), None);
    std::fs::remove_dir_all(&synth)?;
    let gw_dir = work.path().join("gateway");
    std::fs::create_dir_all(&gw_dir)?;
    let gw = start_gateway(
        &bin,
        &format!("http://{}", reg.addr()),
        &[
            "--store",
            &gw_dir.join("store").to_string_lossy(),
            "--index",
            &gw_dir.join("index.redb").to_string_lossy(),
        ],
    )?;
    let base = format!("http://{}", gw.addr);
    // Converted, start-up order found, batches made: the rounds measure the worker.
    let warm = work.path().join("warm");
    eprintln!("converting...");
    for image in ["app:v1", "big:v1"] {
        timed(Command::new(&pull).args(["--gateway", &base, "--store"]).arg(&warm).arg(image))?;
    }

    println!("## Apply: `starlight-pull` into an empty store, loopback ({rounds} rounds, median)\n");
    println!(
        "| image | content | bundle | wire only (curl) | pull, store on disk | apply | pull, store on tmpfs | apply | CPU of the pull (tmpfs) | peak RSS |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    let shm = tempfile::tempdir_in("/dev/shm")?;
    for image in ["big:v1", "app:v1"] {
        let (name, tag) = image.split_once(':').unwrap();
        let url = format!("{base}/v2/{name}/_starlight/bundle?to={tag}");
        let (mut wire, mut disk, mut ram, mut rss, mut cpus) = (vec![], vec![], vec![], vec![], vec![]);
        let (mut content, mut wire_bytes) = (0u64, 0u64);
        for r in 0..rounds {
            let (n, secs) = curl_download(&url)?;
            wire.push(secs);
            wire_bytes = n;
            // Stores are kept until the end: ext4 allocates inodes slowly right after a mass delete
            // (`recently_deleted`), which would measure the last round's cleanup.
            for (root, times) in [(work.path(), &mut disk), (shm.path(), &mut ram)] {
                let store = root.join(format!("store-{name}-{r}"));
                // SAFETY: sync has no arguments. Nothing of the last round is left to write.
                unsafe { libc::sync() };
                let (secs, kib, out, cpu) =
                    timed(Command::new(&pull).args(["--gateway", &base, "--store"]).arg(&store).arg(image))?;
                if !out.starts_with("pulled") {
                    bail!("unexpected output: {out}");
                }
                if root == shm.path() {
                    cpus.push(cpu);
                }
                times.push(secs);
                rss.push(kib as f64);
                content = std::fs::read_dir(store.join("contents/sha256"))?
                    .flatten()
                    .map(|e| e.metadata().map_or(0, |m| m.len()))
                    .sum();
            }
            std::fs::remove_dir_all(shm.path().join(format!("store-{name}-{r}")))?;
        }
        let (w, d, m, peak) =
            (median(wire), median(disk), median(ram), rss.iter().copied().fold(0.0, f64::max));
        println!(
            "| {image} | {:.0} MiB | {:.0} MiB | {:.2} s | {:.2} s | {:.0} MB/s | {:.2} s | {:.0} MB/s | {:.2} s | {:.1} MiB |",
            content as f64 / 1048576.0,
            wire_bytes as f64 / 1048576.0,
            w,
            d,
            content as f64 / d / 1e6,
            m,
            content as f64 / m / 1e6,
            median(cpus),
            peak / 1024.0
        );
    }
    let probe = work.path().join("dd");
    let t = Instant::now();
    let st = Command::new("dd")
        .arg("if=/dev/zero")
        .arg(format!("of={}", probe.display()))
        .args(["bs=4M", &format!("count={}", mib / 4), "conv=fsync", "status=none"])
        .status()?;
    let secs = t.elapsed().as_secs_f64();
    std::fs::remove_file(&probe)?;
    if !st.success() {
        bail!("dd failed");
    }
    println!(
        "\nThe disk here: `dd bs=4M conv=fsync` of {mib} MiB: {:.0} MB/s. A pull ends with syncfs (an image \
         is recorded only once its contents are on disk), so a large pull is bound by it.",
        (mib << 20) as f64 / secs / 1e6
    );
    println!(
        "\n## A complete image: FUSE mount vs the same tree on the local disk ({rounds} rounds, median)\n"
    );
    for image in ["app:v1", "big:v1"] {
        fuse_vs_disk(&pull, &warm, image, work.path(), rounds)?;
        println!();
    }
    drop(gw);
    Ok(())
}
