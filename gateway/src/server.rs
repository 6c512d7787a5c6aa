//! The HTTP server: accepts connections on a bound listener (tests bind port 0), serves HTTP/1.1
//! and HTTP/2 (h2c) with head-size and head-time limits, and shuts down gracefully. No client may
//! hold a connection for nothing: past `max_connections` a new one is refused at once, a
//! connection that sends nothing with no request in flight is closed after `idle_timeout`, and one
//! whose client takes none of its response for `write_stall_timeout` is cut.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::{debug, info, warn};

use crate::body::Body;
use crate::layers::Metrics;
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
    /// A connection with no request in flight that sends nothing for this long is closed.
    pub idle_timeout: Duration,
    /// A connection whose client takes none of the bytes written to it for this long is cut.
    pub write_stall_timeout: Duration,
    /// Connections open at once; a new one past this gets 503 and is closed.
    pub max_connections: usize,
    /// With this, the listener speaks only TLS (the handshake runs in each connection's task).
    pub tls: Option<crate::tls::TlsAcceptor>,
}

/// The address of the client a request came from, in the request's extensions.
#[derive(Clone, Copy, Debug)]
pub struct Peer(pub SocketAddr);

/// What every connection is served with.
struct Connections {
    builder: auto::Builder<TokioExecutor>,
    service: GatewayService,
    cfg: ServerConfig,
    metrics: Arc<Metrics>,
}

/// Serves `service` on `listener` until `shutdown` resolves, then lets in-flight requests finish
/// (up to the grace period) and returns.
pub async fn serve(
    listener: TcpListener,
    service: GatewayService,
    cfg: ServerConfig,
    metrics: Arc<Metrics>,
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
    let slots = Arc::new(Semaphore::new(cfg.max_connections));
    let graceful = GracefulShutdown::new();
    let conns = Arc::new(Connections { builder, service, cfg, metrics });
    let mut last_warned: Option<Instant> = None;
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
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            conns.metrics.conn.refused.inc();
            // One line a second at most: a flood of connections must not become a flood of logs.
            if last_warned.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                last_warned = Some(Instant::now());
                warn!(%peer, max_connections = conns.cfg.max_connections, "connection limit reached; refusing");
            }
            // A TLS client could not read a plain refusal: it is only closed.
            if conns.cfg.tls.is_none() {
                refuse(stream, conns.cfg.max_connections);
            }
            continue;
        };
        let _ = stream.set_nodelay(true);
        let watcher = graceful.watcher();
        let Some(tls) = conns.cfg.tls.clone() else {
            serve_connection(stream, peer, slot, watcher, &conns);
            continue;
        };
        // The handshake runs in the connection's own task, bounded in time, holding its slot.
        let conns = conns.clone();
        tokio::spawn(async move {
            match tls.accept(stream).await {
                Ok(stream) => serve_connection(stream, peer, slot, watcher, &conns),
                Err(e) => debug!(%peer, error = %e, "TLS handshake failed"),
            }
        });
    }
    drop(listener);
    info!("shutting down: waiting for in-flight requests");
    tokio::select! {
        () = graceful.shutdown() => info!("all connections closed"),
        () = tokio::time::sleep(conns.cfg.shutdown_grace) => warn!("grace period over; closing remaining connections"),
    }
}

/// Answers a connection past the limit with 503 and closes it, in its own short-lived task.
fn refuse(mut stream: TcpStream, max: usize) {
    tokio::spawn(async move {
        let body = format!(
            "{{\"errors\":[{{\"code\":\"TOOMANYREQUESTS\",\"message\":\"the gateway has its maximum of {max} connections open; retry later\"}}]}}"
        );
        let resp = format!(
            "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        // The refusal fits in the socket's buffer; a client that takes nothing still goes at once.
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            stream.write_all(resp.as_bytes()).await?;
            stream.shutdown().await
        })
        .await;
    });
}

/// Serves one accepted connection (plain TCP, or a TLS stream over it) in its own task, holding
/// `slot` of the connection limit until it closes.
fn serve_connection<IO>(
    io: IO,
    peer: SocketAddr,
    slot: OwnedSemaphorePermit,
    watcher: Watcher,
    conns: &Connections,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let activity = Arc::new(Activity::new());
    let io = Tracked { inner: io, activity: activity.clone() };
    let service = PerConnection { inner: conns.service.clone(), peer, activity: activity.clone() };
    let conn = conns.builder.serve_connection(TokioIo::new(io), TowerToHyperService::new(service));
    let conn = watcher.watch(conn.into_owned());
    let (metrics, idle, stall) =
        (conns.metrics.clone(), conns.cfg.idle_timeout, conns.cfg.write_stall_timeout);
    metrics.conn.open.inc();
    tokio::spawn(async move {
        let _slot = slot;
        tokio::select! {
            ended = conn => if let Err(e) = ended {
                debug!(%peer, error = %e, "connection ended with an error");
            },
            // Dropping the connection closes it and drops its response bodies, which return
            // whatever they held (a bundle's read-ahead budget).
            reason = activity.expired(idle, stall) => {
                metrics.conn.timed_out(reason);
                debug!(%peer, reason, "closing the connection");
            }
        }
        metrics.conn.open.dec();
    });
}

/// When a connection last made progress, and whether it has requests in flight.
#[derive(Debug)]
struct Activity {
    start: Instant,
    /// Milliseconds since `start`: the last byte read, or the end of the last response.
    last: AtomicU64,
    /// Milliseconds since `start` plus one at which a write found the socket full; 0: none.
    blocked_since: AtomicU64,
    in_flight: AtomicUsize,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            start: Instant::now(),
            last: AtomicU64::new(0),
            blocked_since: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
        }
    }

    fn now(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    fn touch(&self) {
        self.last.store(self.now(), Ordering::Relaxed);
    }

    fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    /// Resolves with the reason once the connection has been idle or unable to write too long.
    async fn expired(&self, idle: Duration, stall: Duration) -> &'static str {
        let tick = (idle.min(stall) / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
        let (idle, stall) = (idle.as_millis() as u64, stall.as_millis() as u64);
        loop {
            tokio::time::sleep(tick).await;
            let now = self.now();
            let blocked = self.blocked_since.load(Ordering::Relaxed);
            if blocked != 0 && now.saturating_sub(blocked - 1) >= stall {
                return "write_stall";
            }
            if self.in_flight.load(Ordering::Relaxed) == 0
                && now.saturating_sub(self.last.load(Ordering::Relaxed)) >= idle
            {
                return "idle";
            }
        }
    }
}

/// A request in flight on its connection, until its response body ends or is dropped.
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.touch();
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The connection's I/O, noting progress both ways.
struct Tracked<IO> {
    inner: IO,
    activity: Arc<Activity>,
}

impl<IO> Tracked<IO> {
    fn wrote<T>(&self, polled: &Poll<std::io::Result<T>>, progressed: impl Fn(&T) -> bool) {
        match polled {
            Poll::Pending => {
                let at = self.activity.now() + 1;
                let _ =
                    self.activity.blocked_since.compare_exchange(0, at, Ordering::Relaxed, Ordering::Relaxed);
            }
            Poll::Ready(Ok(n)) if progressed(n) => {
                self.activity.blocked_since.store(0, Ordering::Relaxed);
            }
            Poll::Ready(_) => {}
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Tracked<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.touch();
        }
        polled
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Tracked<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.wrote(&polled, |n| *n > 0);
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.wrote(&polled, |n| *n > 0);
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let polled = Pin::new(&mut self.inner).poll_flush(cx);
        self.wrote(&polled, |_| true);
        polled
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The gateway's service as one connection runs it: each request learns its peer and counts as
/// in flight until its response body ends.
#[derive(Clone)]
struct PerConnection {
    inner: GatewayService,
    peer: SocketAddr,
    activity: Arc<Activity>,
}

impl tower::Service<Request<Incoming>> for PerConnection {
    type Response = Response<Body>;
    type Error = std::convert::Infallible;
    type Future = BoxFuture<'static, Result<Response<Body>, std::convert::Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<Incoming>) -> Self::Future {
        req.extensions_mut().insert(Peer(self.peer));
        let in_flight = self.activity.begin();
        let response = self.inner.call(req);
        Box::pin(async move {
            let resp = response.await?;
            Ok(resp.map(|b| crate::body::boxed(crate::body::Observed::new(b, move |_, _| drop(in_flight)))))
        })
    }
}
