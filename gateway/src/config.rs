//! The gateway's configuration: a TOML file (`--config`) whose every key a command-line flag can
//! override. Parsed once into this typed struct; nothing else reads files or the environment.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

/// Gateway settings. Durations are in seconds.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// The registry behind the gateway, `http[s]://HOST[:PORT]`.
    pub upstream: String,
    pub listen: SocketAddr,
    /// Object store and index of converted images (used by the Starlight endpoints).
    pub store: String,
    pub index: String,
    /// Wait at most this long to connect to the upstream.
    pub connect_timeout: f64,
    /// Wait at most this long for the upstream's response head (bodies stream without limit).
    pub upstream_timeout: f64,
    /// A client must send its request head within this time.
    pub header_read_timeout: f64,
    /// A connection with no request in flight that sends nothing for this long is closed (also
    /// one that never sends a byte, and an idle HTTP/2 connection).
    pub idle_timeout: f64,
    /// A request body that delivers less than 1 KiB in this long fails the request with 408 (a
    /// trickle holds a concurrency slot no longer than silence).
    pub body_read_timeout: f64,
    /// A connection whose client takes none of its response for this long is cut (and a bundle's
    /// read-ahead budget returned).
    pub write_stall_timeout: f64,
    /// Connections open at once; beyond this, a new connection gets 503 and is closed.
    pub max_connections: usize,
    /// Pass-through requests processed at once; beyond this, they are shed with 503.
    pub max_concurrency: usize,
    /// Starlight requests (bundles, traces, contents, notifications) processed at once, apart
    /// from the pass-through's so that neither can starve the other; beyond this, 503.
    pub max_starlight_concurrency: usize,
    /// Largest request head accepted (at least 8192); larger gets 431.
    pub max_header_bytes: usize,
    /// Largest manifest accepted on push.
    pub max_manifest_bytes: u64,
    /// Time in-flight requests get to finish after a shutdown signal.
    pub shutdown_grace: f64,
    /// `USER:PASSWORD` the gateway uses for conversions nobody's request pays for (push
    /// notifications); a caller's own `Authorization` is used for conversions on demand.
    pub upstream_credentials: Option<String>,
    /// Bearer token push notifications must carry (`Authorization: Bearer TOKEN`); without one,
    /// the notification endpoint is off.
    pub webhook_token: Option<String>,
    /// Platforms converted when an image index is pushed (`os/arch[/variant]`); the host's if empty.
    pub platforms: Vec<String>,
    /// A conversion taking longer than this fails (its waiters get 504).
    pub convert_timeout: f64,
    /// Directory for conversion scratch files (default: the system's temporary directory).
    pub work_dir: Option<std::path::PathBuf>,
    /// Conversions (on demand and on push) refuse a layer larger than this uncompressed.
    pub convert_max_layer_bytes: u64,
    /// Conversions refuse a layer with more tar entries than this.
    pub convert_max_entries: u64,
    /// Images whose flattened metadata is kept in memory.
    pub cache_images: usize,
    /// Bytes of stored frames read ahead per bundle.
    pub bundle_read_ahead: u64,
    /// Bytes read ahead for all bundles together: bounds the gateway's memory under load.
    pub bundle_memory: u64,
    /// Bytes read ahead for all bundles of one client (IP address) together: a few clients that
    /// read nothing cannot take the whole `bundle_memory`.
    pub bundle_memory_per_client: u64,
    /// zstd level of batches (small files compressed together) and patches (an updated file sent
    /// as its difference from the version the worker holds); each is made once and kept in the
    /// store.
    pub recompress_level: i32,
    /// Batches and patches made at once (each holds up to two contents of 32 MiB).
    pub recompress_workers: usize,
    /// OTLP gRPC endpoint for traces (else `OTEL_EXPORTER_OTLP_ENDPOINT`, read by the binary).
    pub otlp_endpoint: Option<String>,
    /// `text` or `json` logs.
    pub log_format: String,
    /// PEM certificate chain and private key (both or neither): with them the listener speaks
    /// only TLS (HTTP/2 or HTTP/1.1 by ALPN), and reloads them when the files change.
    pub tls_cert: Option<std::path::PathBuf>,
    pub tls_key: Option<std::path::PathBuf>,
    /// A conversion that failed for good (a bad layer or image) is answered with the same error,
    /// without trying again, for this long (0: always try again).
    pub failure_ttl: f64,
    /// Verify stored contents against their digests as bundles send them; a corrupt object is
    /// dropped and its image converted again.
    pub verify_bundles: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            upstream: String::new(),
            listen: SocketAddr::from(([0, 0, 0, 0], 8080)),
            store: "/var/lib/starlight/store".into(),
            index: "/var/lib/starlight/index.redb".into(),
            connect_timeout: 5.0,
            upstream_timeout: 60.0,
            header_read_timeout: 30.0,
            idle_timeout: 60.0,
            body_read_timeout: 30.0,
            write_stall_timeout: 60.0,
            max_connections: 4096,
            max_concurrency: 1024,
            max_starlight_concurrency: 256,
            max_header_bytes: 64 * 1024,
            max_manifest_bytes: 4 << 20,
            shutdown_grace: 30.0,
            upstream_credentials: None,
            webhook_token: None,
            platforms: Vec::new(),
            convert_timeout: 1800.0,
            work_dir: None,
            convert_max_layer_bytes: starlight_converter::layer::Options::default().max_layer_bytes,
            convert_max_entries: starlight_converter::layer::Options::default().max_entries,
            cache_images: 64,
            bundle_read_ahead: 8 << 20,
            bundle_memory: 48 << 20,
            bundle_memory_per_client: 16 << 20,
            recompress_level: 9,
            recompress_workers: 2,
            otlp_endpoint: None,
            log_format: "text".into(),
            tls_cert: None,
            tls_key: None,
            failure_ttl: 600.0,
            verify_bundles: true,
        }
    }
}

/// Why a configuration is unusable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Parse {
        path: String,
        #[source]
        source: toml::de::Error,
    },
    #[error("invalid setting {key}: {why}")]
    Invalid { key: &'static str, why: String },
}

impl Config {
    /// Reads a TOML file.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let p = path.display().to_string();
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: p.clone(), source })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse { path: p, source })
    }

    /// Checks what a type cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key, why: &str| Err(ConfigError::Invalid { key, why: why.into() });
        if let Err(why) = crate::proxy::Upstream::parse(&self.upstream) {
            return Err(ConfigError::Invalid { key: "upstream", why });
        }
        for (key, v) in [
            ("connect_timeout", self.connect_timeout),
            ("upstream_timeout", self.upstream_timeout),
            ("header_read_timeout", self.header_read_timeout),
            ("idle_timeout", self.idle_timeout),
            ("body_read_timeout", self.body_read_timeout),
            ("write_stall_timeout", self.write_stall_timeout),
            ("shutdown_grace", self.shutdown_grace),
            ("convert_timeout", self.convert_timeout),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return invalid(key, "must be a positive number of seconds");
            }
        }
        if self.convert_max_layer_bytes == 0 {
            return invalid("convert_max_layer_bytes", "must be at least 1");
        }
        if self.convert_max_entries == 0 {
            return invalid("convert_max_entries", "must be at least 1");
        }
        if !(self.failure_ttl.is_finite() && self.failure_ttl >= 0.0) {
            return invalid("failure_ttl", "must be zero or a positive number of seconds");
        }
        if self.max_concurrency == 0 {
            return invalid("max_concurrency", "must be at least 1");
        }
        if self.max_starlight_concurrency == 0 {
            return invalid("max_starlight_concurrency", "must be at least 1");
        }
        if self.max_connections == 0 {
            return invalid("max_connections", "must be at least 1");
        }
        if self.max_header_bytes < 8192 {
            return invalid("max_header_bytes", "must be at least 8192");
        }
        if let Some(c) = &self.upstream_credentials
            && !c.contains(':')
        {
            return invalid("upstream_credentials", "must be USER:PASSWORD");
        }
        for p in &self.platforms {
            if let Err(e) = p.parse::<starlight_format::Platform>() {
                return Err(ConfigError::Invalid { key: "platforms", why: e.to_string() });
            }
        }
        if !(1..=19).contains(&self.recompress_level) {
            return invalid("recompress_level", "must be a zstd level from 1 to 19");
        }
        if self.bundle_memory < self.bundle_read_ahead {
            return invalid("bundle_memory", "must be at least bundle_read_ahead");
        }
        if !(self.bundle_read_ahead..=self.bundle_memory).contains(&self.bundle_memory_per_client) {
            return invalid("bundle_memory_per_client", "must be from bundle_read_ahead to bundle_memory");
        }
        if self.bundle_read_ahead < (1 << 20) {
            return invalid("bundle_read_ahead", "must be at least 1 MiB (1048576)");
        }
        if self.log_format != "text" && self.log_format != "json" {
            return invalid("log_format", "must be text or json");
        }
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return invalid("tls_cert", "tls_cert and tls_key go together: set both or neither");
        }
        Ok(())
    }

    pub fn secs(v: f64) -> Duration {
        Duration::from_secs_f64(v)
    }

    /// The converter's options for conversions on demand and on push: its caps from this config.
    pub fn convert_options(&self) -> starlight_converter::layer::Options {
        starlight_converter::layer::Options {
            max_layer_bytes: self.convert_max_layer_bytes,
            max_entries: self.convert_max_entries,
            ..starlight_converter::layer::Options::default()
        }
    }
}
