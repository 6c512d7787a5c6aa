//! `starlight-bench`: benchmarks that print ratios measured side by side in one run.
//!
//! - `convert`: conversion throughput of each layer of an image vs `gzip -dc` of the same layer
//!   (the decompression a plain pull pays anyway), and stored size vs the original layers.
//! - `gateway`: pass-through throughput and latency through `starlight-gateway` vs the registry
//!   directly, beside reference relays (a minimal copy relay, and nginx when installed), and the
//!   gateway's peak memory under 100 concurrent downloads.
//! - `bundle`: delta bundle sizes vs a plain pull, time to first byte as images grow, and
//!   streaming throughput from the local store.
//! - `load`: many workers pulling one unconverted image at once: one conversion, every tree
//!   correct, time to first byte, gateway memory.
//! - `attack`: idle, slow-body and non-reading clients against one gateway while `skopeo copy` and
//!   `starlight-pull` must complete; their times quiet and under attack, the gateway's RSS and fds.
//! - `wan`: real application images over an emulated WAN, pull start to ready line, Starlight
//!   against containerd (see `sweep`); `wan-report` re-renders a run's table and plot.
//! - `wan-check`: the emulated WAN's self-check: measured RTT and throughput against the settings.

mod attack;
mod bundle;
mod gateway;
mod load;
mod relay;
mod sweep;
mod wan;
mod worker;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use starlight_converter::index::RedbIndex;
use starlight_converter::layer::{Compression, Expect, Options};
use starlight_converter::store::LocalStore;
use starlight_converter::{AnyIndex, AnyStore, Converter};
use starlight_format::Digest;

#[derive(Parser, Debug)]
#[command(about = "Starlight benchmarks")]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Conversion throughput and stored size vs gzip, per layer of an OCI layout image.
    Convert {
        /// OCI image layout directory.
        #[arg(long)]
        layout: PathBuf,
        /// Tag in the layout.
        #[arg(long, default_value = "app")]
        tag: String,
        /// Rounds per measurement (the median is reported).
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// zstd level.
        #[arg(long, default_value_t = Options::default().zstd_level)]
        level: i32,
    },
    /// Pass-through throughput, added latency and memory of the gateway in front of docker-registry.
    Gateway {
        /// The gateway binary (default: `starlight-gateway` next to this binary).
        #[arg(long)]
        gateway_bin: Option<PathBuf>,
        /// Size of the large blob, in MiB.
        #[arg(long, default_value_t = 1024)]
        blob_mib: u64,
        /// Rounds of the throughput comparison.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Concurrent clients in the memory test.
        #[arg(long, default_value_t = 100)]
        clients: usize,
    },
    /// The gateway benchmark's reference relay (started by `gateway`, as its own process).
    #[command(hide = true)]
    Relay {
        #[arg(long)]
        listen: String,
        /// The registry, `HOST:PORT`.
        #[arg(long)]
        upstream: String,
    },
    /// Bundle sizes vs plain pulls, time to first byte, streaming throughput.
    Bundle {
        /// The gateway binary (default: `starlight-gateway` next to this binary).
        #[arg(long)]
        gateway_bin: Option<PathBuf>,
        /// OCI layout with the Debian images `app` and `app-v2` (scripts/debian-image.sh).
        #[arg(long, default_value = "/var/tmp/starlight-images/oci")]
        layout: PathBuf,
        /// Rounds of the latency measurement (throughput uses at most 5).
        #[arg(long, default_value_t = 50)]
        rounds: usize,
        /// Size of the synthetic streaming image, in MiB.
        #[arg(long, default_value_t = 1024)]
        stream_mib: usize,
        /// File counts of the synthetic latency images.
        #[arg(long, value_delimiter = ',', default_value = "5000,20000,50000")]
        sizes: Vec<usize>,
        /// zstd levels of batches and patches to measure bundle sizes with (the first one is
        /// used for the rest of the run).
        #[arg(long, value_delimiter = ',', default_value = "9,3,19")]
        levels: Vec<i32>,
        /// A gateway setting for every gateway of the run, as a line of its TOML config
        /// (`verify_bundles = false`); repeatable.
        #[arg(long = "gateway-setting", value_name = "TOML")]
        settings: Vec<String>,
    },
    /// The worker: apply throughput and memory of `starlight-pull`, FUSE vs local disk.
    Worker {
        /// The gateway binary (default: `starlight-gateway` next to this binary).
        #[arg(long)]
        gateway_bin: Option<PathBuf>,
        /// The worker binary (default: `starlight-pull` next to this binary).
        #[arg(long)]
        pull_bin: Option<PathBuf>,
        /// OCI layout with the Debian image `app` (scripts/debian-image.sh).
        #[arg(long, default_value = "/var/tmp/starlight-images/oci")]
        layout: PathBuf,
        /// Size of the synthetic image, in MiB.
        #[arg(long, default_value_t = 1024)]
        mib: usize,
        #[arg(long, default_value_t = 3)]
        rounds: usize,
    },
    /// Many workers pull the same unconverted image at once.
    Load {
        /// The gateway binary (default: `starlight-gateway` next to this binary).
        #[arg(long)]
        gateway_bin: Option<PathBuf>,
        /// OCI layout holding the image (scripts/debian-image.sh).
        #[arg(long, default_value = "/var/tmp/starlight-images/oci")]
        layout: PathBuf,
        #[arg(long, default_value = "app")]
        tag: String,
        #[arg(long, default_value_t = 50)]
        workers: usize,
        /// A gateway configuration file (TOML) to run the gateway with.
        #[arg(long)]
        gateway_config: Option<PathBuf>,
    },
    /// Idle, slow-body and non-reading clients attack one gateway while a `skopeo copy` and a
    /// `starlight-pull` must complete.
    Attack {
        /// The gateway binary (default: `starlight-gateway` next to this binary).
        #[arg(long)]
        gateway_bin: Option<PathBuf>,
        /// The worker binary (default: `starlight-pull` next to this binary).
        #[arg(long)]
        pull_bin: Option<PathBuf>,
        /// OCI layout with the Debian image `app` (scripts/debian-image.sh).
        #[arg(long, default_value = "/var/tmp/starlight-images/oci")]
        layout: PathBuf,
        /// Connections that never send a byte.
        #[arg(long, default_value_t = 1000)]
        idle: usize,
        /// Uploads whose body comes a byte a second.
        #[arg(long, default_value_t = 1000)]
        slow_body: usize,
        /// Bundle requests whose response is never read.
        #[arg(long, default_value_t = 20)]
        non_reading: usize,
    },
    /// Application images over an emulated WAN: Starlight against containerd, fresh and update.
    Wan {
        /// A few images at one RTT, one round (within 10 minutes once the images are built).
        #[arg(long)]
        quick: bool,
        /// The images (default: all ten; with --quick: redis, nginx, python).
        #[arg(long, value_delimiter = ',')]
        apps: Vec<String>,
        /// Round-trip times, in milliseconds (with --quick: 150).
        #[arg(long, value_delimiter = ',', default_value = "2,50,150,300")]
        rtt: Vec<f64>,
        /// Bandwidth, in Mbit/s.
        #[arg(long, default_value_t = 100.0)]
        mbit: f64,
        /// Rounds per RTT (medians are reported; with --quick: 1): one number for all, or one per
        /// RTT in the order of --rtt.
        #[arg(long, value_delimiter = ',', default_value = "3")]
        rounds: Vec<usize>,
        /// Arms to run (default all: A B C D E).
        #[arg(long, value_delimiter = ',')]
        arms: Vec<sweep::Arm>,
        /// Where the images are built and cached (scripts/bench-images.sh).
        #[arg(long, default_value = "/var/tmp/starlight-bench-images")]
        images: PathBuf,
        /// Where wan.json, wan.md and wan.svg are written.
        #[arg(long, default_value = "bench/wan")]
        out: PathBuf,
    },
    /// Renders the table and plot of a `wan` run again from its wan.json; with --merge, first adds
    /// the measurements of other runs (other RTTs, other images) to it.
    WanReport {
        #[arg(long, default_value = "bench/wan")]
        out: PathBuf,
        /// Result directories of other runs to merge into OUT/wan.json.
        #[arg(long, value_delimiter = ',')]
        merge: Vec<PathBuf>,
    },
    /// The emulated WAN's self-check at each RTT: RTT within 5%, link throughput within 10%.
    WanCheck {
        /// Round-trip times, in milliseconds.
        #[arg(long, value_delimiter = ',', default_value = "2,50,150,300")]
        rtt: Vec<f64>,
        /// Bandwidth, in Mbit/s.
        #[arg(long, default_value_t = 100.0)]
        mbit: f64,
    },
}

fn main() -> anyhow::Result<()> {
    match Args::parse().cmd {
        Cmd::Convert { layout, tag, rounds, level } => convert_bench(&layout, &tag, rounds, level),
        Cmd::Gateway { gateway_bin, blob_mib, rounds, clients } => {
            gateway::run(gateway_bin, blob_mib, rounds, clients)
        }
        Cmd::Relay { listen, upstream } => relay::serve(&listen, &upstream),
        Cmd::Attack { gateway_bin, pull_bin, layout, idle, slow_body, non_reading } => {
            attack::run(gateway_bin, pull_bin, &layout, attack::Attackers { idle, slow_body, non_reading })
        }
        Cmd::Load { gateway_bin, layout, tag, workers, gateway_config } => {
            load::run(gateway_bin, &layout, &tag, workers, gateway_config.as_deref())
        }
        Cmd::Worker { gateway_bin, pull_bin, layout, mib, rounds } => {
            worker::run(gateway_bin, pull_bin, &layout, mib, rounds)
        }
        Cmd::Bundle { gateway_bin, layout, rounds, stream_mib, sizes, levels, settings } => {
            bundle::run(gateway_bin, &layout, rounds, stream_mib, &sizes, &levels, &settings)
        }
        Cmd::WanCheck { rtt, mbit } => wan_check(&rtt, mbit),
        Cmd::Wan { quick, mut apps, mut rtt, mbit, mut rounds, mut arms, images, out } => {
            if quick {
                if apps.is_empty() {
                    apps = ["redis", "nginx", "python"].map(String::from).to_vec();
                }
                rtt = vec![150.0];
                rounds = vec![1];
            }
            if apps.is_empty() {
                apps = [
                    "redis",
                    "memcached",
                    "nginx",
                    "postgres",
                    "mariadb",
                    "python",
                    "node",
                    "tomcat",
                    "apache",
                    "mosquitto",
                ]
                .map(String::from)
                .to_vec();
            }
            if arms.is_empty() {
                arms = sweep::Arm::ALL.to_vec();
            }
            if rounds.len() == 1 {
                rounds = vec![rounds[0]; rtt.len()];
            }
            anyhow::ensure!(rounds.len() == rtt.len(), "--rounds: one number, or one per RTT");
            sweep::run(sweep::Opts { apps, rtts_ms: rtt, mbit, rounds, images_dir: images, out, arms })
        }
        Cmd::WanReport { out, merge } => {
            let read = |d: &Path| -> anyhow::Result<sweep::Report> {
                let p = d.join("wan.json");
                serde_json::from_slice(&std::fs::read(&p).with_context(|| format!("read {}", p.display()))?)
                    .with_context(|| format!("parse {}", p.display()))
            };
            let mut r = read(&out)?;
            for d in &merge {
                r.merge(read(d)?);
            }
            if !merge.is_empty() {
                std::fs::write(out.join("wan.json"), serde_json::to_vec_pretty(&r)?)?;
            }
            let (table, svg) = sweep::summarize(&r);
            std::fs::write(out.join("wan.md"), &table)?;
            std::fs::write(out.join("wan.svg"), svg)?;
            println!("{table}");
            Ok(())
        }
    }
}

fn wan_check(rtts: &[f64], mbit: f64) -> anyhow::Result<()> {
    let link = |ms: f64| wan::Link::new(std::time::Duration::from_secs_f64(ms / 1e3), (mbit * 1e6) as u64);
    let w = wan::Wan::create("slbench", link(rtts[0]))?;
    let mut failed = Vec::new();
    for &ms in rtts {
        w.set_link(link(ms));
        if let Err(e) = w.self_check() {
            println!("FAILED: {e:#}");
            failed.push(ms);
        }
    }
    if !failed.is_empty() {
        bail!("the self-check failed at RTT {failed:?} ms");
    }
    Ok(())
}

struct Layer {
    digest: Digest,
    size: u64,
    path: PathBuf,
}

/// The blob path of a digest in an OCI layout.
fn layout_blob(layout: &Path, digest: &str) -> PathBuf {
    layout.join("blobs/sha256").join(digest.trim_start_matches("sha256:"))
}

/// The manifest of `tag` in an OCI layout.
fn layout_manifest(layout: &Path, tag: &str) -> anyhow::Result<serde_json::Value> {
    let index: serde_json::Value = serde_json::from_slice(&std::fs::read(layout.join("index.json"))?)?;
    let desc = index["manifests"]
        .as_array()
        .and_then(|m| m.iter().find(|d| d["annotations"]["org.opencontainers.image.ref.name"] == tag))
        .with_context(|| format!("no tag {tag} in {}", layout.display()))?;
    Ok(serde_json::from_slice(&std::fs::read(layout_blob(layout, desc["digest"].as_str().unwrap_or("")))?)?)
}

/// The image config of `tag` in an OCI layout.
fn layout_config(layout: &Path, tag: &str) -> anyhow::Result<serde_json::Value> {
    let manifest = layout_manifest(layout, tag)?;
    Ok(serde_json::from_slice(&std::fs::read(layout_blob(
        layout,
        manifest["config"]["digest"].as_str().unwrap_or(""),
    ))?)?)
}

fn layers_of(layout: &Path, tag: &str) -> anyhow::Result<Vec<Layer>> {
    let manifest = layout_manifest(layout, tag)?;
    let blob = |d: &str| layout_blob(layout, d);
    let mut out = Vec::new();
    for l in manifest["layers"].as_array().context("manifest without layers")? {
        let mt = l["mediaType"].as_str().unwrap_or("");
        if !mt.ends_with("gzip") {
            bail!("layer media type {mt}: this benchmark compares against gzip layers");
        }
        let d = l["digest"].as_str().unwrap_or("");
        out.push(Layer { digest: d.parse()?, size: l["size"].as_u64().unwrap_or(0), path: blob(d) });
    }
    Ok(out)
}

/// CPU seconds (user + system) used by this process and its waited-for children so far.
fn cpu_seconds() -> f64 {
    let mut total = 0.0;
    for who in [libc::RUSAGE_SELF, libc::RUSAGE_CHILDREN] {
        // SAFETY: getrusage writes into the zeroed struct we pass.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        unsafe { libc::getrusage(who, &mut ru) };
        total += ru.ru_utime.tv_sec as f64 + ru.ru_utime.tv_usec as f64 / 1e6;
        total += ru.ru_stime.tv_sec as f64 + ru.ru_stime.tv_usec as f64 / 1e6;
    }
    total
}

/// The median; of an even count, the mean of the two middle values.
pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n.is_multiple_of(2) { (v[n / 2 - 1] + v[n / 2]) / 2.0 } else { v[n / 2] }
}

fn convert_bench(layout: &Path, tag: &str, rounds: usize, level: i32) -> anyhow::Result<()> {
    let layers = layers_of(layout, tag)?;
    let rt = tokio::runtime::Runtime::new()?;
    println!(
        "| layer | gzip bytes | raw bytes | gzip -dc s | convert s | ratio | convert MB/s | CPU util | stored bytes (blob+TOC) | stored/gzip |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    let (mut tot_gzip, mut tot_conv, mut tot_in, mut tot_stored, mut tot_raw) = (0.0, 0.0, 0u64, 0u64, 0u64);
    for layer in &layers {
        let mut gzip_t = Vec::new();
        let mut conv_t = Vec::new();
        let mut util = Vec::new();
        let mut stored = 0;
        let mut raw = 0;
        for _ in 0..rounds {
            // Alternate the two so that cache and thermal effects hit both alike.
            let t = Instant::now();
            let st = Command::new("sh")
                .arg("-c")
                .arg(format!("gzip -dc '{}' >/dev/null", layer.path.display()))
                .status()?;
            if !st.success() {
                bail!("gzip -dc failed");
            }
            gzip_t.push(t.elapsed().as_secs_f64());

            let dir = tempfile::tempdir()?;
            let store = AnyStore::Local(LocalStore::open(dir.path().join("store"))?);
            let index = AnyIndex::Redb(RedbIndex::open(dir.path().join("index.redb"))?);
            let mut conv = Converter::new(store, index, Options { zstd_level: level, ..Options::default() });
            conv.tmp_dir = dir.path().to_path_buf();
            let file = std::fs::File::open(&layer.path)?;
            let expect = Expect {
                name: layer.digest.to_string(),
                compression: Compression::Gzip,
                digest: Some(layer.digest),
                diff_id: None,
            };
            let cpu0 = cpu_seconds();
            let t = Instant::now();
            let out = rt.block_on(conv.convert_layer_from(file, expect))?;
            let secs = t.elapsed().as_secs_f64();
            conv_t.push(secs);
            util.push((cpu_seconds() - cpu0) / secs);
            stored = out.stored_bytes + out.toc_bytes;
            raw = out.uncompressed_size;
        }
        let (g, c) = (median(gzip_t), median(conv_t));
        println!(
            "| {} | {} | {} | {:.3} | {:.3} | {:.2}x | {:.0} | {:.2} cores | {} | {:.1}% |",
            &layer.digest.hex()[..12],
            layer.size,
            raw,
            g,
            c,
            c / g,
            raw as f64 / 1e6 / c,
            median(util),
            stored,
            100.0 * stored as f64 / layer.size as f64
        );
        tot_gzip += g;
        tot_conv += c;
        tot_in += layer.size;
        tot_stored += stored;
        tot_raw += raw;
    }
    println!(
        "| **total** | {tot_in} | {tot_raw} | {tot_gzip:.3} | {tot_conv:.3} | {:.2}x | {:.0} | | {tot_stored} | {:.1}% |",
        tot_conv / tot_gzip,
        tot_raw as f64 / 1e6 / tot_conv,
        100.0 * tot_stored as f64 / tot_in as f64
    );
    println!(
        "\n(each layer converted alone into an empty store: no cross-layer dedup; zstd level {level}, {rounds} rounds, medians)"
    );
    Ok(())
}
