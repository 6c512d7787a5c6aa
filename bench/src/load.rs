//! The load benchmark: many workers ask the gateway at once for the bundle of an image it has not
//! converted yet. Reported: how many conversions ran (must be one), whether every worker got the
//! same complete, verified image, the time to first byte and to the end, and the gateway's peak
//! memory. One worker's tree is materialized and compared with `umoci unpack` of the image.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use starlight_conformance::fstree::{Options, assert_same_tree};
use starlight_conformance::images::skopeo_copy;
use starlight_conformance::layout::umoci_unpack;
use starlight_conformance::servers::Registry;
use starlight_format::Digest;
use starlight_format::bundle::{Decoder, Event, Header};

use crate::gateway::{percentile, rss_kib, start_gateway};

/// What one worker received.
struct Pulled {
    ttfb: f64,
    total: f64,
    header: Header,
    contents: BTreeSet<Digest>,
    /// Bytes of every content, kept only by the worker whose tree is compared.
    kept: Option<HashMap<Digest, Vec<u8>>>,
}

async fn pull(c: &reqwest::Client, url: &str, keep: bool) -> anyhow::Result<Pulled> {
    let t = Instant::now();
    let mut r = c.get(url).send().await?;
    if r.status() != 200 {
        bail!("{url}: HTTP {}: {}", r.status(), r.text().await.unwrap_or_default());
    }
    let mut dec = Decoder::new();
    let (mut ttfb, mut header, mut contents) = (None, None, BTreeSet::new());
    let mut partial: HashMap<u64, Vec<u8>> = HashMap::new();
    let mut kept = keep.then(HashMap::new);
    while let Some(chunk) = r.chunk().await? {
        ttfb.get_or_insert_with(|| t.elapsed().as_secs_f64());
        for ev in dec.feed(&chunk)? {
            match ev {
                Event::Header(h) => header = Some(*h),
                Event::Chunk { index, data, .. } => {
                    if keep {
                        partial.entry(index).or_default().extend_from_slice(&data);
                    }
                }
                Event::ContentDone { index, digest } => {
                    contents.insert(digest);
                    if let Some(k) = kept.as_mut() {
                        k.insert(digest, partial.remove(&index).unwrap_or_default());
                    }
                }
                Event::Patch { .. } => bail!("a fresh bundle holds no patches"),
                Event::End => {}
            }
        }
    }
    dec.finish()?;
    Ok(Pulled {
        ttfb: ttfb.context("empty body")?,
        total: t.elapsed().as_secs_f64(),
        header: header.context("no header")?,
        contents,
        kept,
    })
}

pub fn run(
    bin: Option<PathBuf>,
    layout: &Path,
    tag: &str,
    workers: usize,
    config: Option<&Path>,
) -> anyhow::Result<()> {
    let bin = crate::gateway::gateway_bin(bin)?;
    let work = tempfile::tempdir()?;
    let reg = Registry::start();
    skopeo_copy(
        &format!("oci:{}:{tag}", layout.display()),
        &format!("docker://{}/load:v1", reg.addr()),
        None,
    );
    let (store, index) = (work.path().join("store"), work.path().join("index.redb"));
    let mut args = vec![
        "--store".to_string(),
        store.display().to_string(),
        "--index".into(),
        index.display().to_string(),
    ];
    if let Some(c) = config {
        args.extend(["--config".to_string(), c.display().to_string()]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let gw = start_gateway(&bin, &format!("http://{}", reg.addr()), &args)?;
    let pid = gw.child.id();
    let base = format!("http://{}", gw.addr);
    let url = format!("{base}/v2/load/_starlight/bundle?to=v1");
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;

    // Sample the gateway's memory while the workers pull.
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let done = done.clone();
        std::thread::spawn(move || {
            let mut peak = 0;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                peak = peak.max(rss_kib(pid).0);
                std::thread::sleep(Duration::from_millis(20));
            }
            peak
        })
    };
    let started = Instant::now();
    let results: Vec<anyhow::Result<Pulled>> = rt.block_on(async {
        let tasks: Vec<_> = (0..workers)
            .map(|i| {
                let url = url.clone();
                tokio::spawn(async move {
                    let c = reqwest::Client::builder().timeout(Duration::from_secs(1800)).build()?;
                    pull(&c, &url, i == 0).await
                })
            })
            .collect();
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap_or_else(|e| Err(anyhow::anyhow!("worker task: {e}"))));
        }
        out
    });
    let wall = started.elapsed().as_secs_f64();
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let sampled_peak = sampler.join().unwrap_or(0);
    let (_, hwm) = rss_kib(pid);
    let metrics = rt.block_on(async { reqwest::get(format!("{base}/metrics")).await?.text().await })?;
    let conversions: u64 = metrics
        .lines()
        .find(|l| l.starts_with("starlight_gateway_conversions_total{result=\"ok\"} "))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0);

    let pulled: Vec<Pulled> = results.into_iter().collect::<anyhow::Result<_>>()?;
    let first = &pulled[0];
    let want: BTreeSet<Digest> =
        starlight_format::Toc { diff_id: Digest([0; 32]), entries: first.header.entries.clone() }
            .content_digests()
            .collect();
    let mut identical = 0;
    for p in &pulled {
        if p.header == first.header && p.contents == want {
            identical += 1;
        }
    }
    // One worker's tree against umoci's.
    let ours = work.path().join("ours");
    std::fs::create_dir(&ours)?;
    let kept = first.kept.as_ref().context("worker 0 kept its contents")?;
    let toc = starlight_format::Toc { diff_id: Digest([0; 32]), entries: first.header.entries.clone() };
    starlight_converter::extract::extract_layer(&toc, &ours, &mut |d, f| {
        use std::io::Write;
        f.write_all(kept.get(d).ok_or_else(|| std::io::Error::other(format!("content {d} missing")))?)
    })?;
    let bundle = work.path().join("umoci");
    umoci_unpack(layout, tag, &bundle);
    assert_same_tree(&bundle.join("rootfs"), &ours, Options { skip_root: true, skip_dir_mtimes: false });

    let mut ttfb: Vec<f64> = pulled.iter().map(|p| p.ttfb * 1e3).collect();
    let mut total: Vec<f64> = pulled.iter().map(|p| p.total).collect();
    println!(
        "## Load: {workers} workers pull the same unconverted image at once ({tag}, {} contents)\n",
        want.len()
    );
    println!("| measure | value | target |");
    println!("|---|---|---|");
    println!("| conversions | **{conversions}** | exactly 1 |");
    println!(
        "| workers with the complete, verified image (same header, every content) | **{identical} / {workers}** | all |"
    );
    println!("| worker 0's tree vs `umoci unpack` | identical | identical |");
    println!(
        "| time to first byte p50 / p99 (includes the conversion) | {:.0} / {:.0} ms | reported |",
        percentile(&mut ttfb.clone(), 0.5),
        percentile(&mut ttfb, 0.99)
    );
    println!(
        "| time to complete p50 / p99 | {:.1} / {:.1} s | reported |",
        percentile(&mut total.clone(), 0.5),
        percentile(&mut total, 0.99)
    );
    println!("| wall time | {wall:.1} s | |");
    println!(
        "| gateway peak RSS (VmHWM) | **{:.1} MiB** (sampled {:.1} MiB) | <= 256 MiB |",
        hwm as f64 / 1024.0,
        sampled_peak as f64 / 1024.0
    );
    if conversions != 1 || identical != workers {
        bail!("load run failed its correctness checks");
    }
    drop(gw);
    Ok(())
}
