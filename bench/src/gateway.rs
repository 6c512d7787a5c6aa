//! The gateway benchmark: the same requests to docker-registry directly and through the gateway
//! (a separate process, so that its memory can be read from /proc), alternating, side by side.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::median;
use futures::StreamExt;
use starlight_conformance::servers::{Registry, free_port};
use starlight_format::Digest;

/// A server process this bench started (the gateway, a reference relay), killed when dropped.
pub(crate) struct Server {
    pub(crate) name: &'static str,
    pub(crate) addr: String,
    pub(crate) child: Child,
    /// Its config and logs, if it has any: removed when the server is dropped.
    pub(crate) _dir: Option<tempfile::TempDir>,
}

impl Server {
    /// Waits (up to 10 s) until the server accepts connections on its address.
    pub(crate) fn listening(self) -> anyhow::Result<Server> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(&self.addr).is_err() {
            if Instant::now() > deadline {
                bail!("{} did not start listening on {}", self.name, self.addr);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(self)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The gateway binary: the one given, else `starlight-gateway` next to this binary.
pub(crate) fn gateway_bin(bin: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    match bin {
        Some(b) => Ok(b),
        None => Ok(std::env::current_exe()?.with_file_name("starlight-gateway")),
    }
}

/// Starts the gateway binary in front of `upstream`, with `extra` arguments.
pub(crate) fn start_gateway(bin: &PathBuf, upstream: &str, extra: &[&str]) -> anyhow::Result<Server> {
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let child = Command::new(bin)
        .args(["--upstream", upstream, "--listen", &addr])
        .args(extra)
        .env("STARLIGHT_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    Server { name: "gateway", addr, child, _dir: None }.listening()
}

/// VmRSS and VmHWM (peak) of a process, in KiB.
pub(crate) fn rss_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Writes `mib` MiB of incompressible bytes and returns their digest.
fn make_blob(path: &std::path::Path, mib: u64) -> anyhow::Result<Digest> {
    use std::io::Write;
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut hasher = starlight_format::Hasher::new();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut buf = vec![0u8; 1 << 20];
    for _ in 0..mib {
        for chunk in buf.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            chunk.copy_from_slice(&x.to_le_bytes());
        }
        hasher.update(&buf);
        f.write_all(&buf)?;
    }
    f.flush()?;
    Ok(hasher.finish())
}

async fn push_blob(
    c: &reqwest::Client,
    reg: &str,
    repo: &str,
    path: &std::path::Path,
    d: &Digest,
) -> anyhow::Result<()> {
    let r = c.post(format!("http://{reg}/v2/{repo}/blobs/uploads/")).send().await?;
    let loc = r.headers().get("location").context("no Location")?.to_str()?.to_string();
    let sep = if loc.contains('?') { '&' } else { '?' };
    let file = tokio::fs::File::open(path).await?;
    let len = file.metadata().await?.len();
    let body = reqwest::Body::wrap_stream(tokio_util_stream(file));
    let r = c.put(format!("{loc}{sep}digest={d}")).header("content-length", len).body(body).send().await?;
    if r.status() != 201 {
        bail!("blob push: HTTP {}", r.status());
    }
    Ok(())
}

fn tokio_util_stream(file: tokio::fs::File) -> impl futures::Stream<Item = std::io::Result<bytes::Bytes>> {
    futures::stream::unfold(file, |mut f| async move {
        use tokio::io::AsyncReadExt;
        let mut buf = vec![0u8; 1 << 20];
        match f.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok(bytes::Bytes::from(buf)), f))
            }
            Err(e) => Some((Err(e), f)),
        }
    })
}

/// Downloads a URL to /dev/null with curl (a lean C client, so that the 2 cores go to the servers
/// being compared, not to the client); returns bytes and seconds.
pub(crate) fn curl_download(url: &str) -> anyhow::Result<(u64, f64)> {
    let out = Command::new("curl")
        .args(["-sS", "--fail", "-o", "/dev/null", "-w", "%{size_download} %{time_total}", url])
        .output()
        .context("curl (apt-get install -y curl)")?;
    if !out.status.success() {
        bail!("curl {url}: {}", String::from_utf8_lossy(&out.stderr));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut parts = text.split_whitespace();
    let n: u64 = parts.next().context("curl output")?.parse()?;
    let s: f64 = parts.next().context("curl output")?.parse()?;
    Ok((n, s))
}

/// CPU seconds a process has used (user + system).
pub(crate) fn cpu_of(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = after.split_whitespace().filter_map(|x| x.parse().ok()).collect();
    // Fields 14 and 15 (utime, stime) are at 11 and 12 after the state field is dropped.
    let ticks = f.get(10).copied().unwrap_or(0) + f.get(11).copied().unwrap_or(0);
    ticks as f64 / 100.0
}

/// Downloads a URL to nowhere; returns bytes and seconds.
async fn download(c: &reqwest::Client, url: &str) -> anyhow::Result<(u64, f64)> {
    let t = Instant::now();
    let r = c.get(url).send().await?;
    if !r.status().is_success() {
        bail!("GET {url}: HTTP {}", r.status());
    }
    let mut n = 0u64;
    let mut s = r.bytes_stream();
    while let Some(chunk) = s.next().await {
        n += chunk?.len() as u64;
    }
    Ok((n, t.elapsed().as_secs_f64()))
}

pub(crate) fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

pub fn run(bin: Option<PathBuf>, blob_mib: u64, rounds: usize, clients: usize) -> anyhow::Result<()> {
    let bin = gateway_bin(bin)?;
    let rt = tokio::runtime::Runtime::new()?;
    let reg = Registry::start();
    let gw = start_gateway(&bin, &format!("http://{}", reg.addr()), &[])?;
    let dir = tempfile::tempdir()?;
    rt.block_on(async {
        let c = reqwest::Client::builder().pool_max_idle_per_host(256).build()?;
        // The large blob, and a 100 MB one for the memory test.
        let big = dir.path().join("big");
        let big_d = make_blob(&big, blob_mib)?;
        push_blob(&c, &reg.addr(), "bench/big", &big, &big_d).await?;
        let mid = dir.path().join("mid");
        let mid_d = make_blob(&mid, 100)?;
        push_blob(&c, &reg.addr(), "bench/mid", &mid, &mid_d).await?;
        std::fs::remove_file(&big)?;
        std::fs::remove_file(&mid)?;

        // Each round fetches the blob once by every path, in the same order; the CPU each path's
        // relay process spent is read from /proc around its download.
        let relay = crate::relay::start_relay(&reg.addr())?;
        let nginx = match crate::relay::nginx_bin() {
            Some(bin) => Some(crate::relay::start_nginx(&bin, &reg.addr())?),
            None => {
                println!("(nginx is not installed, so its row is left out: apt-get install -y nginx-core)\n");
                None
            }
        };
        let mut paths = vec![
            ("registry directly", reg.addr(), None),
            ("through the gateway", gw.addr.clone(), Some(gw.child.id())),
            ("reference: minimal copy relay", relay.addr.clone(), Some(relay.child.id())),
        ];
        if let Some(n) = &nginx {
            paths.push(("reference: nginx 1 worker, unbuffered", n.addr.clone(), Some(n.child.id())));
        }
        let mut rates = vec![Vec::new(); paths.len()];
        let mut cpus = vec![Vec::new(); paths.len()];
        for _ in 0..rounds {
            for (i, (_, addr, pid)) in paths.iter().enumerate() {
                let cpu0 = pid.map(cpu_of);
                let (n, s) = curl_download(&format!("http://{addr}/v2/bench/big/blobs/{big_d}"))?;
                if n != blob_mib << 20 {
                    bail!("{addr} returned {n} bytes, not {}", blob_mib << 20);
                }
                rates[i].push(n as f64 / s / 1e6);
                if let (Some(pid), Some(c0)) = (pid, cpu0) {
                    cpus[i].push((cpu_of(*pid) - c0) / (n as f64 / (1u64 << 30) as f64));
                }
            }
        }
        let rates: Vec<f64> = rates.into_iter().map(median).collect();
        println!("## Pass-through throughput: {blob_mib} MiB blob on loopback, {rounds} rounds, medians\n");
        // A relay's CPU seconds per GiB give the rate it could sustain on a core of its own.
        println!("| path | MB/s | of direct | relay CPU s per GiB | relay alone, MB/s per core |");
        println!("|---|---|---|---|---|");
        let cpus: Vec<Option<f64>> = cpus.into_iter().map(|c| (!c.is_empty()).then(|| median(c))).collect();
        let per_core: Vec<Option<f64>> = cpus.iter().map(|c| c.map(|c| (1u64 << 30) as f64 / c / 1e6)).collect();
        for (i, (name, _, _)) in paths.iter().enumerate() {
            let (cpu, core) = match (cpus[i], per_core[i]) {
                (Some(c), Some(r)) => (format!("{c:.2}"), format!("{r:.0}")),
                _ => ("-".to_string(), "-".to_string()),
            };
            println!("| {name} | {:.0} | {:.1}% | {cpu} | {core} |", rates[i], 100.0 * rates[i] / rates[0]);
        }
        println!("\nthrough/direct: **{:.1}%** (client: curl)", 100.0 * rates[1] / rates[0]);
        if let Some(core) = per_core[1] {
            println!(
                "gateway alone, on a core of its own: **{core:.0} MB/s**, {:.0}% of the direct rate\n",
                100.0 * core / rates[0]
            );
        }
        drop((relay, nginx));

        // Manifest HEAD latency: a small image manifest, sequential requests on a warm connection.
        let config = br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
        let cd = Digest::of(config);
        let r = c.post(format!("http://{}/v2/bench/small/blobs/uploads/", reg.addr())).send().await?;
        let loc = r.headers()["location"].to_str()?.to_string();
        let sep = if loc.contains('?') { '&' } else { '?' };
        c.put(format!("{loc}{sep}digest={cd}")).body(config.to_vec()).send().await?;
        let manifest = format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{cd}","size":{}}},"layers":[]}}"#,
            config.len()
        );
        let r = c
            .put(format!("http://{}/v2/bench/small/manifests/v1", reg.addr()))
            .header("content-type", "application/vnd.oci.image.manifest.v1+json")
            .body(manifest)
            .send()
            .await?;
        if r.status() != 201 {
            bail!("manifest push: HTTP {}", r.status());
        }
        let n = 2000;
        let (mut ld, mut lg) = (Vec::with_capacity(n), Vec::with_capacity(n));
        for i in 0..n {
            for (lat, base) in [(&mut ld, reg.addr()), (&mut lg, gw.addr.clone())] {
                let t = Instant::now();
                let r = c
                    .head(format!("http://{base}/v2/bench/small/manifests/v1"))
                    .header("accept", "application/vnd.oci.image.manifest.v1+json")
                    .send()
                    .await?;
                if r.status() != 200 {
                    bail!("HEAD: HTTP {}", r.status());
                }
                if i >= 100 {
                    lat.push(t.elapsed().as_secs_f64() * 1e3);
                }
            }
        }
        let (d50, g50) = (percentile(&mut ld, 0.5), percentile(&mut lg, 0.5));
        let (d99, g99) = (percentile(&mut ld, 0.99), percentile(&mut lg, 0.99));
        println!("## Manifest HEAD latency: {} requests each after 100 warm-up, alternating\n", n - 100);
        println!("| path | p50 ms | p99 ms |\n|---|---|---|");
        println!("| registry directly | {d50:.3} | {d99:.3} |\n| through the gateway | {g50:.3} | {g99:.3} |");
        println!("\nadded p50: **{:.3} ms**\n", g50 - d50);

        // Memory: many clients download the 100 MB blob through the gateway at once.
        let pid = gw.child.id();
        let (rss0, _) = rss_kib(pid);
        let url = format!("http://{}/v2/bench/mid/blobs/{mid_d}", gw.addr);
        let t = Instant::now();
        let tasks: Vec<_> = (0..clients)
            .map(|_| {
                // One connection per client, as separate workers would have.
                let c = reqwest::Client::builder().pool_max_idle_per_host(0).build();
                let url = url.clone();
                tokio::spawn(async move { download(&c?, &url).await })
            })
            .collect();
        let mut peak_sampled = 0;
        let watcher = async {
            loop {
                peak_sampled = peak_sampled.max(rss_kib(pid).0);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        let all = futures::future::join_all(tasks);
        let results = tokio::select! { r = all => r, () = watcher => unreachable!() };
        let mut total = 0u64;
        for r in results {
            let (n, _) = r??;
            if n != 100 << 20 {
                bail!("a client got {n} bytes");
            }
            total += n;
        }
        let secs = t.elapsed().as_secs_f64();
        let (_, hwm) = rss_kib(pid);
        println!("## Gateway memory: {clients} clients download a 100 MiB blob through it at once\n");
        println!("| measure | value |\n|---|---|");
        println!("| RSS before | {:.1} MiB |", rss0 as f64 / 1024.0);
        println!("| peak RSS (VmHWM, whole run) | **{:.1} MiB** |", hwm as f64 / 1024.0);
        println!("| peak RSS sampled during the downloads | {:.1} MiB |", peak_sampled as f64 / 1024.0);
        println!("| bytes served | {total} in {secs:.1} s ({:.0} MB/s) |", total as f64 / secs / 1e6);
        Ok(())
    })
}
