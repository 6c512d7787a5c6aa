//! The HTTP server: accepts connections on a bound listener (tests bind port 0), serves HTTP/1.1
//! and HTTP/2 (h2c) with head-size and head-time limits, and shuts down gracefully.

use std::future::Future;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tracing::{debug, info, warn};

use crate::stack::GatewayService;

/// Connection-level limits.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Largest request head, in bytes (HTTP/1.1: larger gets 431).
    pub max_header_bytes: usize,
    /// A client must send its request head within this time.
    pub header_read_timeout: Duration,
    /// In-flight requests get this long to finish after shutdown starts.
    pub shutdown_grace: Duration,
    /// With this, the listener speaks only TLS (the handshake runs in each connection's task).
    pub tls: Option<crate::tls::TlsAcceptor>,
}

/// Serves `service` on `listener` until `shutdown` resolves, then lets in-flight requests finish
/// (up to the grace period) and returns.
pub async fn serve(
    listener: TcpListener,
    service: GatewayService,
    cfg: ServerConfig,
    shutdown: impl Future<Output = ()>,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(cfg.header_read_timeout)
        .max_buf_size(cfg.max_header_bytes)
        .keep_alive(true);
    builder.http2().timer(TokioTimer::new()).max_header_list_size(cfg.max_header_bytes as u32);
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let svc = TowerToHyperService::new(service.clone());
        let ended = move |e: Box<dyn std::error::Error + Send + Sync>| {
            debug!(%peer, error = %e, "connection ended with an error");
        };
        let Some(tls) = cfg.tls.clone() else {
            let conn = graceful.watch(builder.serve_connection(TokioIo::new(stream), svc).into_owned());
            tokio::spawn(async move { conn.await.unwrap_or_else(ended) });
            continue;
        };
        let (builder, watcher) = (builder.clone(), graceful.watcher());
        tokio::spawn(async move {
            match tls.accept(stream).await {
                Ok(stream) => {
                    let conn = builder.serve_connection(TokioIo::new(stream), svc).into_owned();
                    watcher.watch(conn).await.unwrap_or_else(ended);
                }
                Err(e) => debug!(%peer, error = %e, "TLS handshake failed"),
            }
        });
    }
    drop(listener);
    info!("shutting down: waiting for in-flight requests");
    tokio::select! {
        () = graceful.shutdown() => info!("all connections closed"),
        () = tokio::time::sleep(cfg.shutdown_grace) => warn!("grace period over; closing remaining connections"),
    }
}
