//! `starlight-snapshotter`: a containerd proxy snapshotter that runs Starlight images while their
//! bundles stream, and ordinary images with overlay semantics.

use std::path::PathBuf;

use clap::Parser;
use starlight_worker::snapshotter::{Config, Snapshotter, service};

#[derive(Parser, Debug)]
#[command(
    name = "starlight-snapshotter",
    version,
    about = "containerd snapshotter: Starlight images start while they stream; other images work as with overlayfs"
)]
struct Cli {
    /// The unix socket containerd connects to (its `[proxy_plugins.starlight] address`).
    #[arg(long, env = "STARLIGHT_SNAPSHOTTER_SOCKET", default_value = "/run/starlight/snapshotter.sock")]
    socket: PathBuf,
    /// Snapshots, metadata and the Starlight store.
    #[arg(long, env = "STARLIGHT_SNAPSHOTTER_ROOT", default_value = "/var/lib/starlight-snapshotter")]
    root: PathBuf,
    /// The gateway Starlight images are pulled from.
    #[arg(long, env = "STARLIGHT_GATEWAY", default_value = "http://127.0.0.1:8080")]
    gateway: String,
    /// USER:PASSWORD for the registry behind the gateway (HTTP Basic).
    #[arg(long, env = "STARLIGHT_CREDENTIALS", hide_env_values = true)]
    user: Option<String>,
    /// PEM file of CA certificates to trust for an https:// gateway, besides the system's roots
    /// (passed on to mounts).
    #[arg(long, env = "STARLIGHT_CA_FILE", value_name = "FILE")]
    ca_file: Option<PathBuf>,
    /// Send --user's credentials even over plain http:// to a gateway that is not loopback
    /// (anyone on the path can read them); refused otherwise.
    #[arg(long)]
    allow_plain_http_credentials: bool,
    /// Platform of image indexes (os/arch[/variant]); the gateway's by default.
    #[arg(long)]
    platform: Option<String>,
    /// Seconds a read may wait for a content still streaming before it fails (EIO).
    #[arg(long, default_value_t = 300)]
    read_timeout: u64,
    /// Send each image's recorded start-up trace to the gateway when its mount stops (when the
    /// image is removed): run the image once on a node with this flag, and later pulls of it
    /// everywhere stream its contents in the order the container read them.
    #[arg(long)]
    upload_traces: bool,
    /// The `starlight-pull` binary that serves mounts; the one next to this binary by default.
    #[arg(long)]
    pull_bin: Option<PathBuf>,
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("starlight-snapshotter: error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<(), String> {
    let pull_bin = match cli.pull_bin {
        Some(p) => p,
        None => std::env::current_exe()
            .map_err(|e| format!("locating this binary: {e}"))?
            .with_file_name("starlight-pull"),
    };
    if !pull_bin.exists() {
        return Err(format!("{} not found (set --pull-bin)", pull_bin.display()));
    }
    // Refused here rather than by every mount this snapshotter would start.
    if cli.user.is_some() {
        starlight_worker::client::check_credentials_transport(
            "gateway",
            &cli.gateway,
            cli.allow_plain_http_credentials,
        )?;
    }
    let cfg = Config {
        root: cli.root,
        gateway: cli.gateway,
        credentials: cli.user,
        ca_file: cli.ca_file,
        allow_plain_http_credentials: cli.allow_plain_http_credentials,
        platform: cli.platform,
        pull_bin,
        read_timeout: cli.read_timeout,
        upload_traces: cli.upload_traces,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("tokio runtime: {e}"))?;
    let sn = rt
        .block_on(async { tokio::task::spawn_blocking(move || Snapshotter::open(cfg)).await })
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    rt.block_on(service::serve(sn, &cli.socket, async {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(t) => t,
            Err(_) => return std::future::pending().await,
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("stopping; Starlight mounts keep serving running containers");
    }))
}
