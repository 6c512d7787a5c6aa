//! `starlight-gateway`: the Starlight gateway in front of an OCI registry.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use starlight_gateway::Config;

mod telemetry;

/// Serves the OCI distribution API of UPSTREAM, unchanged, plus the Starlight endpoints.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// The registry behind the gateway, http[s]://HOST[:PORT].
    #[arg(long)]
    upstream: Option<String>,
    /// Address to listen on (default 0.0.0.0:8080).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Object store: a directory or s3://BUCKET[/PREFIX].
    #[arg(long)]
    store: Option<String>,
    /// Index: a redb file, redis://HOST:PORT or redis+cluster://HOST:PORT,...
    #[arg(long)]
    index: Option<String>,
    /// TOML file with any of the settings (flags win).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Seconds to wait for the upstream's response head.
    #[arg(long)]
    upstream_timeout: Option<f64>,
    /// Requests processed at once before shedding load with 503.
    #[arg(long)]
    max_concurrency: Option<usize>,
    /// Starlight requests processed at once before shedding load with 503.
    #[arg(long)]
    max_starlight_concurrency: Option<usize>,
    /// Connections open at once; beyond this, new ones get 503 and are closed.
    #[arg(long)]
    max_connections: Option<usize>,
    /// Log format: text or json.
    #[arg(long)]
    log_format: Option<String>,
    /// PEM certificate chain: serve only TLS (with --tls-key); reloaded when the file changes.
    #[arg(long, value_name = "FILE")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, value_name = "FILE")]
    tls_key: Option<PathBuf>,
    /// Conversions refuse a layer larger than this many bytes uncompressed (default 16 GiB).
    #[arg(long)]
    convert_max_layer_bytes: Option<u64>,
    /// Conversions refuse a layer with more tar entries than this (default 1000000).
    #[arg(long)]
    convert_max_entries: Option<u64>,
}

/// glibc's malloc, tuned for a server with many short-lived buffers on many threads: few arenas
/// (each thread otherwise keeps its own, and the conversion's and bundles' threads leave them full
/// of freed memory), and large buffers (content chunks, batches) mapped and unmapped on their own
/// instead of fragmenting the heap. Measured with `starlight-bench load` (bench/RESULTS.md).
fn tune_allocator() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets allocator parameters; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
    }
}

fn main() -> ExitCode {
    tune_allocator();
    let args = Args::parse();
    let mut config = match &args.config {
        Some(p) => match Config::from_file(p) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("starlight-gateway: error: {e}");
                return ExitCode::FAILURE;
            }
        },
        None => Config::default(),
    };
    if let Some(v) = args.upstream {
        config.upstream = v;
    }
    if let Some(v) = args.listen {
        config.listen = v;
    }
    if let Some(v) = args.store {
        config.store = v;
    }
    if let Some(v) = args.index {
        config.index = v;
    }
    if let Some(v) = args.upstream_timeout {
        config.upstream_timeout = v;
    }
    if let Some(v) = args.max_concurrency {
        config.max_concurrency = v;
    }
    if let Some(v) = args.max_starlight_concurrency {
        config.max_starlight_concurrency = v;
    }
    if let Some(v) = args.max_connections {
        config.max_connections = v;
    }
    if let Some(v) = args.log_format {
        config.log_format = v;
    }
    if let Some(v) = args.tls_cert {
        config.tls_cert = Some(v);
    }
    if let Some(v) = args.tls_key {
        config.tls_key = Some(v);
    }
    if let Some(v) = args.convert_max_layer_bytes {
        config.convert_max_layer_bytes = v;
    }
    if let Some(v) = args.convert_max_entries {
        config.convert_max_entries = v;
    }
    if config.otlp_endpoint.is_none() {
        config.otlp_endpoint = std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").ok().filter(|v| !v.is_empty());
    }
    if let Err(e) = config.validate() {
        eprintln!("starlight-gateway: error: {e}");
        return ExitCode::FAILURE;
    }
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("starlight-gateway: error: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async move {
        let _telemetry = match telemetry::init(&config) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("starlight-gateway: error: telemetry: {e}");
                return ExitCode::FAILURE;
            }
        };
        let listener = match tokio::net::TcpListener::bind(config.listen).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("starlight-gateway: error: listening on {}: {e}", config.listen);
                return ExitCode::FAILURE;
            }
        };
        let addr = listener.local_addr().map(|a| a.to_string()).unwrap_or_default();
        let tls = config.tls_cert.is_some();
        tracing::info!(listen = %addr, tls, upstream = %config.upstream, "starlight-gateway serving");
        match starlight_gateway::run(listener, config, shutdown_signal()).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("starlight-gateway: error: {e}");
                ExitCode::FAILURE
            }
        }
    })
}

/// SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    tracing::info!("shutdown signal received");
}
