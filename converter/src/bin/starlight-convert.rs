//! `starlight-convert`: converts an image into Starlight seekable layers and publishes it.

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use starlight_converter::layer::Options;
use starlight_converter::source::Credentials;
use starlight_converter::{AnyIndex, AnyStore, Converter, Source, SourceOptions};
use starlight_format::Platform;

/// Converts an OCI image into Starlight seekable layers and publishes it in the index.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Object store: a directory, or s3://BUCKET[/PREFIX] (endpoint and credentials from AWS_* variables).
    #[arg(long, env = "STARLIGHT_STORE", default_value = "/var/lib/starlight/store")]
    store: String,
    /// Index: a redb file, redis://HOST:PORT, or redis+cluster://HOST:PORT,HOST:PORT,...
    #[arg(long, env = "STARLIGHT_INDEX", default_value = "/var/lib/starlight/index.redb")]
    index: String,
    /// Platform to convert from an image index (default: this machine's).
    #[arg(long)]
    platform: Option<Platform>,
    /// Talk plain HTTP to the registry (loopback test registries).
    #[arg(long)]
    plain_http: bool,
    /// Registry credentials USER:PASSWORD (also STARLIGHT_REGISTRY_CREDS).
    #[arg(long, env = "STARLIGHT_REGISTRY_CREDS", hide_env_values = true)]
    creds: Option<Credentials>,
    /// Repository name to record for an oci: source (default: NAME of a NAME:TAG reference, else the
    /// directory name).
    #[arg(long)]
    name: Option<String>,
    /// Refuse layers larger than this many bytes uncompressed.
    #[arg(long, default_value_t = Options::default().max_layer_bytes)]
    max_layer_bytes: u64,
    /// Refuse layers with more entries than this.
    #[arg(long, default_value_t = Options::default().max_entries)]
    max_entries: u64,
    /// zstd level for content frames.
    #[arg(long, default_value_t = Options::default().zstd_level)]
    zstd_level: i32,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
    /// docker://HOST[:PORT]/NAME[:TAG|@DIGEST] or oci:DIR[:REFERENCE] (DIR ends at the first colon,
    /// as in skopeo: oci:/images:redis:v1 is redis:v1 in /images)
    source: String,
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("STARLIGHT_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Args::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("starlight-convert: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let store = AnyStore::open(&args.store).await.context("opening the object store")?;
    if let AnyStore::S3(s3) = &store {
        s3.ensure_bucket().await.context("preparing the S3 bucket")?;
    }
    let index = AnyIndex::open(&args.index).await.context("opening the index")?;
    let options = Options {
        max_layer_bytes: args.max_layer_bytes,
        max_entries: args.max_entries,
        zstd_level: args.zstd_level,
        ..Options::default()
    };
    let source = Source::parse(
        &args.source,
        SourceOptions {
            plain_http: args.plain_http,
            credentials: args.creds,
            platform: args.platform,
            name: args.name,
            ..SourceOptions::default()
        },
    )?;
    let out = Converter::new(store, index, options).convert(&source).await?;
    let converted = out.layers.iter().filter(|l| l.converted).count();
    let input: u64 = out.layers.iter().filter(|l| l.converted).map(|l| l.compressed_size).sum();
    let raw: u64 = out.layers.iter().map(|l| l.uncompressed_size).sum();
    let stored: u64 = out.layers.iter().map(|l| l.stored_bytes + l.toc_bytes).sum();
    if args.json {
        let layers: Vec<serde_json::Value> = out
            .layers
            .iter()
            .map(|l| {
                serde_json::json!({
                    "diff_id": l.record.diff_id.to_string(), "converted": l.converted,
                    "compressed_bytes": l.compressed_size, "uncompressed_bytes": l.uncompressed_size,
                    "stored_bytes": l.stored_bytes, "toc_bytes": l.toc_bytes, "entries": l.record.entries,
                })
            })
            .collect();
        let doc = serde_json::json!({
            "manifest": out.image.manifest_digest.to_string(), "name": out.image.name,
            "tag": out.image.tag, "platform": out.image.platform.to_string(),
            "seconds": out.seconds, "layers": layers,
        });
        println!("{doc}");
    } else {
        println!(
            "{} {}: {} layers ({} converted, {} already converted), {} -> {} bytes stored, {:.2}s",
            out.image.name,
            out.image.manifest_digest,
            out.layers.len(),
            converted,
            out.layers.len() - converted,
            input,
            stored,
            out.seconds
        );
        if raw > 0 {
            println!("  {:.1} MB/s of uncompressed layer data", raw as f64 / 1e6 / out.seconds);
        }
    }
    Ok(())
}
