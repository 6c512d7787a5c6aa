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
    /// Requests processed at once; beyond this, requests are shed with 503.
    pub max_concurrency: usize,
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
    /// Images whose flattened metadata is kept in memory.
    pub cache_images: usize,
    /// Bytes of stored frames read ahead per bundle.
    pub bundle_read_ahead: u64,
    /// Bytes read ahead for all bundles together: bounds the gateway's memory under load.
    pub bundle_memory: u64,
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
            max_concurrency: 1024,
            max_header_bytes: 64 * 1024,
            max_manifest_bytes: 4 << 20,
            shutdown_grace: 30.0,
            upstream_credentials: None,
            webhook_token: None,
            platforms: Vec::new(),
            convert_timeout: 1800.0,
            work_dir: None,
            cache_images: 64,
            bundle_read_ahead: 8 << 20,
            bundle_memory: 48 << 20,
            recompress_level: 9,
            recompress_workers: 2,
            otlp_endpoint: None,
            log_format: "text".into(),
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
            ("shutdown_grace", self.shutdown_grace),
            ("convert_timeout", self.convert_timeout),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return invalid(key, "must be a positive number of seconds");
            }
        }
        if !(self.failure_ttl.is_finite() && self.failure_ttl >= 0.0) {
            return invalid("failure_ttl", "must be zero or a positive number of seconds");
        }
        if self.max_concurrency == 0 {
            return invalid("max_concurrency", "must be at least 1");
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
        if self.bundle_read_ahead < (1 << 20) {
            return invalid("bundle_read_ahead", "must be at least 1 MiB (1048576)");
        }
        if self.log_format != "text" && self.log_format != "json" {
            return invalid("log_format", "must be text or json");
        }
        Ok(())
    }

    pub fn secs(v: f64) -> Duration {
        Duration::from_secs_f64(v)
    }
}
