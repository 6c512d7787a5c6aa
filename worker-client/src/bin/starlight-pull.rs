//! `starlight-pull`: pulls images through a Starlight gateway into a local content-addressed store,
//! exports and mounts them.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use starlight_format::Digest;
use starlight_worker::pull::{Observer, Stats};
use starlight_worker::store::ImageMeta;
use starlight_worker::{Gateway, GatewayOptions, MountOptions, PullOptions, Reference, Store};

#[derive(Parser, Debug)]
#[command(
    name = "starlight-pull",
    version,
    about = "Pull images through a Starlight gateway: only what the store lacks, in start-up order",
    override_usage = "starlight-pull [OPTIONS] IMAGE\n       starlight-pull [OPTIONS] <COMMAND>"
)]
struct Cli {
    /// The gateway's URL.
    #[arg(long, global = true, env = "STARLIGHT_GATEWAY", default_value = "http://127.0.0.1:8080")]
    gateway: String,
    /// The local content-addressed store.
    #[arg(long, global = true, env = "STARLIGHT_STORE", default_value = "/var/lib/starlight")]
    store: PathBuf,
    /// USER:PASSWORD for the registry behind the gateway (HTTP Basic).
    #[arg(long, global = true, env = "STARLIGHT_CREDENTIALS", hide_env_values = true)]
    user: Option<String>,
    /// PEM file of CA certificates to trust for an https:// gateway, besides the system's roots.
    #[arg(long, global = true, env = "STARLIGHT_CA_FILE", value_name = "FILE")]
    ca_file: Option<PathBuf>,
    /// Send --user's credentials even over plain http:// to a gateway that is not loopback
    /// (anyone on the path can read them); refused otherwise.
    #[arg(long, global = true)]
    allow_plain_http_credentials: bool,
    /// Seconds a transfer may receive nothing before it counts as cut (and can be resumed).
    #[arg(long, global = true, default_value_t = 60)]
    stall_timeout: u64,
    /// Platform of an image index to pull (os/arch[/variant]); the gateway's by default.
    #[arg(long, global = true)]
    platform: Option<String>,
    /// Pull into containerd at this socket instead of the store: the image gets its record and a
    /// snapshot served by the Starlight snapshotter, and `ctr run --snapshotter starlight` runs it
    /// while its bundle streams.
    #[arg(long, global = true, value_name = "SOCKET")]
    containerd: Option<PathBuf>,
    /// containerd namespace (with --containerd).
    #[arg(long, global = true, env = "CONTAINERD_NAMESPACE", default_value = "default")]
    namespace: String,
    /// The name containerd knows the Starlight snapshotter by (with --containerd).
    #[arg(long, global = true, default_value = "starlight")]
    snapshotter: String,
    /// The containerd image name (with --containerd); GATEWAY_HOST/NAME:TAG by default.
    #[arg(long, global = true)]
    name: Option<String>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Pull an image: NAME:TAG or NAME@DIGEST (the default command: `starlight-pull IMAGE`).
    Pull { image: String },
    /// Write an image's root filesystem into DIR (missing or empty).
    Export { image: String, dir: PathBuf },
    /// List the images in the store.
    List,
    /// Forget an image (a tag, or the image by digest); `gc` frees its contents.
    Rm { image: String },
    /// Remove contents no image refers to.
    Gc,
    /// Mount an image read-only at DIR, serving it while it arrives; runs until SIGINT/SIGTERM.
    Mount {
        image: String,
        dir: PathBuf,
        /// Seconds a read may wait for its content before it fails (EIO).
        #[arg(long, default_value_t = 120)]
        read_timeout: u64,
        /// Let every user, overlayfs and containers use the mount.
        #[arg(long)]
        allow_other: bool,
        /// Send the recorded start-up trace to the gateway at unmount.
        #[arg(long)]
        upload_trace: bool,
    },
    /// Start-up traces recorded by mounts.
    Trace {
        #[command(subcommand)]
        cmd: TraceCmd,
    },
}

#[derive(Subcommand, Debug)]
enum TraceCmd {
    /// Send the recorded trace of IMAGE to the gateway.
    Upload { image: String },
    /// Print the recorded trace of IMAGE.
    Show { image: String },
}

/// Progress on a terminal, at most ten times a second.
struct Progress {
    tty: bool,
    last: Mutex<Instant>,
    started: Instant,
}

fn mib(b: u64) -> f64 {
    b as f64 / (1 << 20) as f64
}

impl Observer for Progress {
    fn progress(&self, s: &Stats) {
        if !self.tty {
            return;
        }
        let mut last = self.last.lock().unwrap();
        if last.elapsed() < Duration::from_millis(100) {
            return;
        }
        *last = Instant::now();
        let secs = self.started.elapsed().as_secs_f64().max(1e-3);
        let rate = s.wire_bytes as f64 / secs;
        let (bar, eta) = match s.wire_total {
            Some(t) if t > 0 => {
                let f = (s.wire_bytes as f64 / t as f64).min(1.0);
                let n = (f * 30.0) as usize;
                let eta = if rate > 0.0 { (t.saturating_sub(s.wire_bytes)) as f64 / rate } else { 0.0 };
                (format!("[{}{}] ", "#".repeat(n), " ".repeat(30 - n)), format!("  ETA {eta:.0}s"))
            }
            _ => (String::new(), String::new()),
        };
        let files = match s.contents_total {
            Some(t) => format!("{}/{t}", s.contents),
            None => s.contents.to_string(),
        };
        let total = s.wire_total.map_or(String::new(), |t| format!("/{:.1}", mib(t)));
        eprint!(
            "\r{bar}{:.1}{total} MiB  {files} files  {:.1} MiB/s{eta}   ",
            mib(s.wire_bytes),
            rate / (1 << 20) as f64
        );
        let _ = std::io::stderr().flush();
    }
}

fn main() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("STARLIGHT_LOG")
        // The TLS verifier logs what the error line then says.
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,rustls_platform_verifier=off"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    let cli = Cli::parse_from(with_default_command(std::env::args().collect()));
    if let Err(e) = run(cli) {
        eprintln!("starlight-pull: error: {e:#}");
        std::process::exit(1);
    }
}

/// `starlight-pull [OPTIONS] IMAGE` means `starlight-pull [OPTIONS] pull IMAGE`.
fn with_default_command(mut args: Vec<String>) -> Vec<String> {
    const COMMANDS: &[&str] = &["pull", "export", "list", "rm", "gc", "mount", "trace", "help"];
    const TAKE_VALUE: &[&str] = &[
        "--gateway",
        "--store",
        "--user",
        "--ca-file",
        "--platform",
        "--stall-timeout",
        "--containerd",
        "--namespace",
        "--snapshotter",
        "--name",
    ];
    let mut i = 1;
    while i < args.len() {
        let a = args[i].as_str();
        if TAKE_VALUE.contains(&a) {
            i += 2;
        } else if a.starts_with('-') {
            i += 1;
        } else {
            if !COMMANDS.contains(&a) {
                args.insert(i, "pull".into());
            }
            break;
        }
    }
    args
}

fn reference(s: &str) -> anyhow::Result<Reference> {
    Reference::parse(s).map_err(anyhow::Error::msg)
}

fn gateway(cli: &Cli) -> anyhow::Result<Gateway> {
    let opts = GatewayOptions {
        credentials: cli.user.clone(),
        ca_file: cli.ca_file.clone(),
        allow_plain_http_credentials: cli.allow_plain_http_credentials,
    };
    Ok(Gateway::with_options(&cli.gateway, &opts)
        .map_err(anyhow::Error::msg)?
        .with_stall_timeout(Duration::from_secs(cli.stall_timeout)))
}

fn whole(store: &Store, image: &str) -> anyhow::Result<(ImageMeta, Digest)> {
    let r = reference(image)?;
    let meta =
        store.find(&r)?.with_context(|| format!("no image {r} in the store {}", store.root().display()))?;
    let d: Digest = meta.digest.parse().map_err(anyhow::Error::msg)?;
    Ok((meta, d))
}

/// Two threads: one receives the bundle while the other decodes and writes it.
fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?)
}

fn run(cli: Cli) -> anyhow::Result<()> {
    if let (Some(sock), Cmd::Pull { image }) = (&cli.containerd, &cli.cmd) {
        return containerd_pull(&cli, sock, image);
    }
    if cli.containerd.is_some() {
        bail!("--containerd goes with a pull only (starlight-pull --containerd SOCKET IMAGE)");
    }
    let store = Store::open(&cli.store)?;
    match &cli.cmd {
        Cmd::Pull { image } => pull_cmd(&cli, &store, image),
        Cmd::Export { image, dir } => {
            let (meta, d) = whole(&store, image)?;
            let _lock = store.lock_shared()?;
            let header = store.header(&d)?;
            let t = Instant::now();
            let s = starlight_worker::export::export(&store, &header, dir)?;
            println!(
                "exported {}@{} to {}: {} files, {:.1} MiB ({} reflinked, {} copied) in {:.2}s",
                meta.name,
                meta.digest,
                dir.display(),
                s.files,
                mib(s.bytes),
                s.reflinked,
                s.copied,
                t.elapsed().as_secs_f64()
            );
            Ok(())
        }
        Cmd::List => {
            println!("{:<40} {:<20} {:<20} {:>9} {:>10}", "NAME", "TAGS", "DIGEST", "CONTENTS", "SIZE");
            for m in store.images()? {
                println!(
                    "{:<40} {:<20} {:<20} {:>9} {:>8.1}Mi",
                    m.name,
                    if m.tags.is_empty() { "-".to_string() } else { m.tags.join(",") },
                    &m.digest[..m.digest.len().min(19)],
                    m.contents,
                    mib(m.content_bytes)
                );
            }
            Ok(())
        }
        Cmd::Rm { image } => {
            let r = reference(image)?;
            let m = store.remove(&r)?;
            println!("removed {r} ({}@{})", m.name, m.digest);
            Ok(())
        }
        Cmd::Gc => {
            let (n, bytes) = store.gc()?;
            println!("removed {n} contents, {:.1} MiB", mib(bytes));
            Ok(())
        }
        Cmd::Mount { image, dir, read_timeout, allow_other, upload_trace } => {
            let r = reference(image)?;
            let store = Arc::new(store);
            let opts = MountOptions {
                image: r.clone(),
                gateway: Some(gateway(&cli)?),
                pull: PullOptions { platform: cli.platform.clone() },
                read_timeout: Duration::from_secs(*read_timeout),
                allow_other: *allow_other,
            };
            let t = Instant::now();
            let mut m = starlight_worker::mount(store.clone(), opts, dir)?;
            println!("mounted {r} ({}) at {} in {:.3}s", m.digest, dir.display(), t.elapsed().as_secs_f64());
            std::io::stdout().flush()?;
            let rt = runtime()?;
            let digest = m.digest;
            // Serve until SIGINT or SIGTERM, which may come while the pull still runs; report the
            // pull's end when it comes.
            let pull = m.take_pull();
            let (tx, rx) = tokio::sync::oneshot::channel();
            std::thread::spawn(move || {
                let res = pull.map(|h| h.join().unwrap_or_else(|_| Err("the pull panicked".into())));
                let _ = tx.send(res);
            });
            rt.block_on(async {
                let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
                let mut pulled = Some(rx);
                loop {
                    tokio::select! {
                        _ = tokio::signal::ctrl_c() => break,
                        _ = term.recv() => break,
                        res = async { pulled.as_mut().unwrap().await }, if pulled.is_some() => {
                            pulled = None;
                            match res {
                                Ok(Some(Ok(rep))) => println!("{}", summary(&r, &rep)),
                                Ok(Some(Err(e))) => eprintln!("starlight-pull: error: pull of {r} failed: {e}"),
                                _ => println!("{r} is whole in the store"),
                            }
                            std::io::stdout().flush()?;
                        }
                    }
                }
                anyhow::Ok(())
            })?;
            let trace = m.unmount()?;
            println!("unmounted {}; trace of {} paths kept", dir.display(), trace.len());
            if *upload_trace && !trace.is_empty() {
                let gw = gateway(&cli)?;
                let v = rt.block_on(starlight_worker::trace::upload(&store, &gw, &r.name, &digest))?;
                println!("trace sent: {}", v.unwrap_or_default());
            }
            Ok(())
        }
        Cmd::Trace { cmd: TraceCmd::Upload { image } } => {
            let (meta, d) = whole(&store, image)?;
            let gw = gateway(&cli)?;
            match runtime()?.block_on(starlight_worker::trace::upload(&store, &gw, &meta.name, &d))? {
                Some(v) => println!("trace of {}@{} sent: {v}", meta.name, meta.digest),
                None => {
                    bail!("no trace recorded for {}@{} (mount it and run it first)", meta.name, meta.digest)
                }
            }
            Ok(())
        }
        Cmd::Trace { cmd: TraceCmd::Show { image } } => {
            let (meta, d) = whole(&store, image)?;
            let paths = starlight_worker::trace::load(&store, &d)?
                .with_context(|| format!("no trace recorded for {}@{}", meta.name, meta.digest))?;
            for p in paths {
                println!("/{}", String::from_utf8_lossy(&p));
            }
            Ok(())
        }
    }
}

fn containerd_pull(cli: &Cli, socket: &std::path::Path, image: &str) -> anyhow::Result<()> {
    let r = reference(image)?;
    let gw = gateway(cli)?;
    let target = starlight_worker::containerd::pull::Target {
        socket: socket.to_path_buf(),
        namespace: cli.namespace.clone(),
        snapshotter: cli.snapshotter.clone(),
        name: cli.name.clone(),
        platform: cli.platform.clone(),
    };
    let t = Instant::now();
    let p = runtime()?
        .block_on(starlight_worker::containerd::pull::pull(&gw, &r, &target))
        .map_err(|e| anyhow::anyhow!("pull of {r} into containerd: {e}"))?;
    println!(
        "{} {} ({}) into containerd as {} in {:.2}s: snapshot {} by {}{}",
        if p.present { "found" } else { "pulled" },
        r,
        p.manifest,
        p.name,
        t.elapsed().as_secs_f64(),
        p.chain_id,
        cli.snapshotter,
        if p.present { ", present already" } else { "; its contents stream in the snapshotter" }
    );
    Ok(())
}

fn pull_cmd(cli: &Cli, store: &Store, image: &str) -> anyhow::Result<()> {
    let r = reference(image)?;
    let gw = gateway(cli)?;
    let progress = Progress {
        tty: std::io::stderr().is_terminal(),
        last: Mutex::new(Instant::now() - Duration::from_secs(1)),
        started: Instant::now(),
    };
    let opts = PullOptions { platform: cli.platform.clone() };
    let rep = runtime()?.block_on(starlight_worker::pull(store, &gw, &r, &opts, &progress))?;
    if progress.tty {
        eprintln!();
    }
    if rep.up_to_date {
        println!("{r}: {} is whole in the store", rep.digest);
        return Ok(());
    }
    println!("{}", summary(&r, &rep));
    Ok(())
}

/// One line on a finished pull: what came, how much of it on the wire, how fast.
fn summary(r: &Reference, rep: &starlight_worker::Report) -> String {
    let s = &rep.stats;
    let secs = rep.elapsed.as_secs_f64().max(1e-3);
    format!(
        "pulled {r} ({}): {} contents, {:.1} MiB ({} patched, {} held already) from {:.1} MiB on the wire in {:.2}s, {:.1} MiB/s",
        rep.digest,
        s.contents,
        mib(s.content_bytes),
        s.patched,
        s.held,
        mib(s.wire_bytes),
        secs,
        mib(s.content_bytes) / secs
    )
}
