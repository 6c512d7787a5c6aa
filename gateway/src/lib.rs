//! The Starlight gateway: a hyper + tower stack in front of any OCI registry. Ordinary `/v2/`
//! traffic passes through untouched; Starlight endpoints live under `/v2/<name>/_starlight/`.
//!
//! # Layout
//! - [`run`]: builds everything from a [`Config`] and serves a bound listener until shutdown.
//! - [`stack`]: the middleware stack, assembled top to bottom in one function.
//! - [`layers`]: one middleware per module (route classification, access log, metrics, errors).
//! - [`router`]: internal endpoints, the Starlight branch, and the pass-through for the rest.
//! - [`proxy`]: the streaming pass-through proxy ([`proxy::Proxy`]).
//! - [`route`]: path classification and repository-name validation.
//! - [`error`]: [`GatewayError`] and the one mapping to OCI error JSON.
//! - [`server`]: connections, limits, graceful shutdown.
//! - [`tls`]: the TLS listener's certificate (reloaded when its files change) and ALPN.
//! - [`starlight`]: the Starlight endpoints: delta bundles, traces, push notifications.

pub mod body;
pub mod config;
pub mod error;
pub mod layers;
pub mod proxy;
pub mod route;
pub mod router;
pub mod server;
pub mod stack;
pub mod starlight;
pub mod tls;

use std::future::Future;
use std::sync::Arc;

pub use config::Config;
pub use error::GatewayError;
use tokio::net::TcpListener;

/// Serves the gateway described by `config` on `listener` until `shutdown` resolves.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> Result<(), String> {
    run_with(listener, config, None, shutdown).await
}

/// [`run`], with the Starlight store and index already open (tests, embedders) instead of opened
/// from `config.store` and `config.index` on first use.
pub async fn run_with(
    listener: TcpListener,
    config: Config,
    backends: Option<starlight::Backends>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), String> {
    config.validate().map_err(|e| e.to_string())?;
    let upstream = proxy::Upstream::parse(&config.upstream)?;
    let proxy = proxy::Proxy::new(
        upstream,
        Config::secs(config.connect_timeout),
        Config::secs(config.upstream_timeout),
    )?;
    let metrics = Arc::new(layers::Metrics::default());
    let starlight = Arc::new(starlight::Starlight::new(&config, proxy.clone(), metrics.clone(), backends));
    let shared = Arc::new(router::Shared {
        proxy,
        metrics: metrics.clone(),
        max_manifest_bytes: config.max_manifest_bytes,
        body_read_timeout: Config::secs(config.body_read_timeout),
        starlight,
    });
    let service = stack::build(
        shared,
        &stack::StackConfig {
            max_concurrency: config.max_concurrency,
            max_starlight_concurrency: config.max_starlight_concurrency,
            // A backstop above the proxy's upstream timeout and the conversion timeout, so that
            // their more precise answers win.
            request_timeout: Config::secs(
                (config.upstream_timeout + config.connect_timeout).max(config.convert_timeout) + 5.0,
            ),
        },
    );
    let tls = match (&config.tls_cert, &config.tls_key) {
        (Some(cert), Some(key)) => Some(
            tls::TlsAcceptor::new(&tls::TlsSettings {
                cert: cert.clone(),
                key: key.clone(),
                // The handshake is part of sending the request head.
                handshake_timeout: Config::secs(config.header_read_timeout),
                reload_every: tls::RELOAD_EVERY,
            })
            .map_err(|e| e.to_string())?,
        ),
        _ => None,
    };
    let server_cfg = server::ServerConfig {
        max_header_bytes: config.max_header_bytes,
        header_read_timeout: Config::secs(config.header_read_timeout),
        shutdown_grace: Config::secs(config.shutdown_grace),
        idle_timeout: Config::secs(config.idle_timeout),
        write_stall_timeout: Config::secs(config.write_stall_timeout),
        max_connections: config.max_connections,
        tls,
    };
    server::serve(listener, service, server_cfg, metrics, shutdown).await;
    Ok(())
}
