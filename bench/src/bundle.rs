//! The bundle benchmark: bundle sizes against what a plain pull downloads, time to the first byte
//! of a bundle as images grow, and streaming throughput from the local store against reading the
//! same stored blobs from disk. The gateway runs as its own process (local store, redb index) in
//! front of docker-registry; everything is on loopback.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use starlight_conformance::images::skopeo_copy;
use starlight_conformance::layout::{Layer, write_image};
use starlight_conformance::servers::Registry;

use crate::gateway::{curl_download, percentile, start_gateway};
use crate::median;

/// Sum of the layer sizes of `tag` in `layout`, and the layer digests.
fn layer_sizes(layout: &Path, tag: &str) -> anyhow::Result<Vec<(String, u64)>> {
    Ok(crate::layers_of(layout, tag)?.into_iter().map(|l| (l.digest.to_string(), l.size)).collect())
}

/// Deterministic bytes: distinct per seed, compressible like text when `text`, else noise.
pub(crate) fn bytes(seed: u64, len: usize, text: bool) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        if text {
            out.extend_from_slice(
                format!("line {} of file {seed}: value {}\n", out.len(), x % 1000).as_bytes(),
            );
        } else {
            out.extend_from_slice(&x.to_le_bytes());
        }
    }
    out.truncate(len);
    out
}

/// An image of `files` small text files, 100 per directory.
fn many_files(layout: &Path, tag: &str, files: usize) {
    let mut layer = Layer::new();
    for d in 0..files.div_ceil(100) {
        layer = layer.dir(&format!("d{d}"), 0o755);
        for f in 0..100.min(files - d * 100) {
            let n = (d * 100 + f) as u64;
            layer = layer.file(&format!("d{d}/f{f}"), &bytes(n, 300 + (n as usize % 700), true));
        }
    }
    write_image(layout, tag, &[layer.finish()], &["/bin/true"]);
}

/// An image of `mib` MiB of incompressible contents in 16 MiB files.
fn big_image(layout: &Path, tag: &str, mib: usize) {
    let mut layer = Layer::new().dir("big", 0o755);
    for i in 0..mib.div_ceil(16) {
        layer = layer.file(&format!("big/{i}"), &bytes(1_000_000 + i as u64, 16 << 20, false));
    }
    write_image(layout, tag, &[layer.finish()], &["/bin/true"]);
}

/// One bundle request: time to the response head, time to the first body byte, body bytes (the
/// first chunk only when `first_only`), total time, and the number of contents sent.
async fn request(
    c: &reqwest::Client,
    url: &str,
    first_only: bool,
) -> anyhow::Result<(f64, f64, u64, f64, String)> {
    let t = Instant::now();
    let mut r = c.get(url).send().await?;
    if r.status() != 200 {
        bail!("{url}: HTTP {}: {}", r.status(), r.text().await.unwrap_or_default());
    }
    let head = t.elapsed().as_secs_f64();
    let contents = header_value(r.headers(), "starlight-contents");
    let first = r.chunk().await?.context("empty bundle")?;
    let ttfb = t.elapsed().as_secs_f64();
    let mut n = first.len() as u64;
    if !first_only {
        while let Some(c) = r.chunk().await? {
            n += c.len() as u64;
        }
    }
    Ok((head, ttfb, n, t.elapsed().as_secs_f64(), contents))
}

fn header_value(h: &reqwest::header::HeaderMap, k: &str) -> String {
    h.get(k).and_then(|v| v.to_str().ok()).unwrap_or("").to_string()
}

/// Reads every file under `dir` to /dev/null with cat; returns bytes and seconds.
fn cat_dir(dir: &Path) -> anyhow::Result<(u64, f64)> {
    let mut files = Vec::new();
    let mut bytes = 0;
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        bytes += std::fs::metadata(&p)?.len();
        files.push(p);
    }
    let t = Instant::now();
    let st = Command::new("cat").args(&files).stdout(std::process::Stdio::null()).status()?;
    if !st.success() {
        bail!("cat failed");
    }
    Ok((bytes, t.elapsed().as_secs_f64()))
}

pub fn run(
    bin: Option<PathBuf>,
    layout: &Path,
    rounds: usize,
    stream_mib: usize,
    sizes: &[usize],
    levels: &[i32],
    settings: &[String],
) -> anyhow::Result<()> {
    let bin = crate::gateway::gateway_bin(bin)?;
    let work = tempfile::tempdir()?;
    let reg = Registry::start();
    for (tag, dest) in [("app", "v1"), ("app-v2", "v2")] {
        skopeo_copy(
            &format!("oci:{}:{tag}", layout.display()),
            &format!("docker://{}/app:{dest}", reg.addr()),
            None,
        );
    }
    let synth = work.path().join("layout");
    eprintln!("building synthetic images ({sizes:?} files; {stream_mib} MiB)...");
    for &n in sizes {
        many_files(&synth, &format!("files-{n}"), n);
    }
    big_image(&synth, "big", stream_mib);
    for &n in sizes {
        let t = format!("files-{n}");
        skopeo_copy(
            &format!("oci:{}:{t}", synth.display()),
            &format!("docker://{}/synth:{t}", reg.addr()),
            None,
        );
    }
    skopeo_copy(&format!("oci:{}:big", synth.display()), &format!("docker://{}/synth:big", reg.addr()), None);

    // (a) and (b): sizes, with a fresh gateway and store per patch level.
    let v1_layers = layer_sizes(layout, "app")?;
    let v2_layers = layer_sizes(layout, "app-v2")?;
    let gzip_v1: u64 = v1_layers.iter().map(|l| l.1).sum();
    let plain_update: u64 = v2_layers.iter().filter(|l| !v1_layers.contains(l)).map(|l| l.1).sum();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let c = reqwest::Client::builder().timeout(Duration::from_secs(1800)).build()?;
    let fetch = |url: String| {
        let c = c.clone();
        async move {
            let t = Instant::now();
            let r = c.get(url).send().await?;
            let h = r.headers().clone();
            let n = r.bytes().await?.len() as u64;
            anyhow::Ok((h, n, t.elapsed().as_secs_f64()))
        }
    };
    println!("## Bundle sizes (Debian redis-server image)\n");
    println!(
        "| recompress level | (a) fresh bundle bytes | vs gzip layers ({gzip_v1}) | first request s (converts, makes batches) | \
         (b) update bytes | vs plain pull ({plain_update}) | first update s (converts, makes batches and patches) | \
         next update s |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let mut kept = None;
    for (k, &level) in levels.iter().enumerate() {
        let dir = work.path().join(format!("gateway-{level}"));
        std::fs::create_dir_all(&dir)?;
        let config = dir.join("gateway.toml");
        std::fs::write(&config, format!("recompress_level = {level}\n{}\n", settings.join("\n")))?;
        let gw = start_gateway(
            &bin,
            &format!("http://{}", reg.addr()),
            &[
                "--store",
                &dir.join("store").to_string_lossy(),
                "--index",
                &dir.join("index.redb").to_string_lossy(),
                "--config",
                &config.to_string_lossy(),
            ],
        )?;
        let base = format!("http://{}", gw.addr);
        let fresh = rt.block_on(fetch(format!("{base}/v2/app/_starlight/bundle?to=v1")))?;
        let v1_digest = header_value(&fresh.0, "starlight-image");
        let update_url = format!("{base}/v2/app/_starlight/bundle?to=v2&have={v1_digest}");
        let update = rt.block_on(fetch(update_url.clone()))?;
        let again = rt.block_on(fetch(update_url))?;
        if again.1 != update.1 {
            bail!("the update bundle changed size between requests: {} then {}", update.1, again.1);
        }
        println!(
            "| {level} | {} | **{:.1}%** | {:.1} | {} ({} contents) | **{:.1}%** | {:.1} | {:.2} |",
            fresh.1,
            100.0 * fresh.1 as f64 / gzip_v1 as f64,
            fresh.2,
            update.1,
            header_value(&update.0, "starlight-contents"),
            100.0 * update.1 as f64 / plain_update as f64,
            update.2,
            again.2
        );
        if k == 0 {
            kept = Some((gw, dir));
        }
    }
    let (gw, dir) = kept.context("no level given")?;
    let store = dir.join("store");
    let base = format!("http://{}", gw.addr);

    // (c): time to first byte, warm (converted, prepared), as images grow.
    println!("\n## Time to first byte, warm index, {rounds} rounds\n");
    println!(
        "| image | contents | first chunk bytes | p50 head ms | p50 first byte ms | p99 first byte ms |"
    );
    println!("|---|---|---|---|---|---|");
    let mut cases = vec![("app".to_string(), "v1".to_string(), "Debian redis-server".to_string())];
    for &n in sizes {
        cases.push(("synth".into(), format!("files-{n}"), format!("synthetic {n} files")));
    }
    for (repo, tag, label) in cases {
        let url = format!("{base}/v2/{repo}/_starlight/bundle?to={tag}");
        // Warm up: converts and prepares the image.
        let (_, _, header_bytes, _, contents) = rt.block_on(request(&c, &url, true))?;
        rt.block_on(request(&c, &url, false))?;
        let (mut heads, mut firsts) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            // A new connection each time; the body is abandoned after its first byte.
            let client = reqwest::Client::new();
            let (h, f, _, _, _) = rt.block_on(request(&client, &url, true))?;
            heads.push(h * 1e3);
            firsts.push(f * 1e3);
            std::thread::sleep(Duration::from_millis(20));
        }
        println!(
            "| {label} | {contents} | {header_bytes} | {:.2} | **{:.2}** | {:.2} |",
            median(heads),
            percentile(&mut firsts.clone(), 0.5),
            percentile(&mut firsts, 0.99)
        );
    }

    // (d): streaming from the local store vs reading the stored blobs from disk.
    println!("\n## Streaming from the local store ({rounds} rounds, medians)\n");
    println!(
        "| image | bundle bytes | bundle MB/s (curl) | stored blobs read by cat MB/s | ratio | target |"
    );
    println!("|---|---|---|---|---|---|");
    for (repo, tag, label) in
        [("synth", "big", format!("synthetic {stream_mib} MiB")), ("app", "v1", "Debian redis-server".into())]
    {
        let url = format!("{base}/v2/{repo}/_starlight/bundle?to={tag}");
        curl_download(&url)?;
        let (mut ours, mut disk, mut n) = (Vec::new(), Vec::new(), 0);
        for _ in 0..rounds.min(5) {
            let (bytes, s) = curl_download(&url)?;
            n = bytes;
            ours.push(bytes as f64 / s / 1e6);
            let (db, ds) = cat_dir(&store.join("blobs/sha256"))?;
            disk.push(db as f64 / ds / 1e6);
        }
        let (o, d) = (median(ours), median(disk));
        println!(
            "| {label} | {n} | **{o:.0}** | {d:.0} (all blobs) | {:.0}% | >= 1000 MB/s or >= 90% |",
            100.0 * o / d
        );
    }
    drop(gw);
    Ok(())
}
