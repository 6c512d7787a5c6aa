//! Middleware that records Prometheus metrics per route family and status: request counts, latency
//! to the response head, response bytes, requests in flight, and responses cut short.

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use futures::future::BoxFuture;
use http::{Request, Response};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tower::{Layer, Service};

use crate::body::{Body, Observed};
use crate::layers::classify::Classified;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub method: String,
    pub route: &'static str,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: &'static str,
}

/// The kind of a stored object (`blob`, `batch`, `patch`, `missing`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct KindLabel {
    pub kind: &'static str,
}

/// The gateway's metrics and the registry they are exposed from.
#[derive(Debug)]
pub struct Metrics {
    pub registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub head_seconds: Family<RouteLabels, Histogram>,
    pub response_bytes: Family<RouteLabels, Counter>,
    pub cut_short: Family<RouteLabels, Counter>,
    pub in_flight: Gauge,
    /// Conversions on demand or on push, by result.
    pub conversions: Family<crate::starlight::ResultLabel, Counter>,
    pub bundles: Counter,
    pub bundle_contents: Counter,
    /// Batch and patch records sent (small files together; updated files as differences).
    pub bundle_batches: Counter,
    pub bundle_patches: Counter,
    /// Stored objects found corrupt (or missing) and dropped, by kind.
    pub corrupt_objects: Family<KindLabel, Counter>,
    /// Connection limits and timeouts.
    pub conn: ConnMetrics,
}

/// Why a connection or a request was cut short by a limit.
#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

/// What the connection limits and timeouts did.
#[derive(Debug, Default)]
pub struct ConnMetrics {
    pub open: Gauge,
    /// Connections refused at once because `max_connections` were open.
    pub refused: Counter,
    /// Connections closed or requests failed by a timeout: `idle`, `write_stall`, `body_read`;
    /// `bundle_stall`: a bundle (an HTTP/2 stream too) its client took none of.
    pub timeouts: Family<ReasonLabel, Counter>,
}

impl ConnMetrics {
    fn register(&self, registry: &mut Registry) {
        registry.register("connections_open", "Client connections open", self.open.clone());
        registry.register(
            "connections_refused",
            "Connections refused because max_connections were open",
            self.refused.clone(),
        );
        registry.register(
            "timeouts",
            "Connections closed (idle, write_stall) or requests failed (body_read, bundle_stall) by a timeout",
            self.timeouts.clone(),
        );
    }

    /// Counts one timeout of this kind.
    pub fn timed_out(&self, reason: &'static str) {
        self.timeouts.get_or_create(&ReasonLabel { reason }).inc();
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("starlight_gateway");
        let requests = Family::<RequestLabels, Counter>::default();
        let head_seconds = Family::<RouteLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0005, 2.0, 16))
        });
        let response_bytes = Family::<RouteLabels, Counter>::default();
        let cut_short = Family::<RouteLabels, Counter>::default();
        let in_flight = Gauge::default();
        registry.register(
            "http_requests",
            "Requests answered, by method, route and status",
            requests.clone(),
        );
        registry.register(
            "http_response_head_seconds",
            "Time to the response head, by route",
            head_seconds.clone(),
        );
        registry.register(
            "http_response_bytes",
            "Response body bytes sent, by route",
            response_bytes.clone(),
        );
        registry.register(
            "http_responses_cut_short",
            "Responses whose body ended early (client gone, upstream error)",
            cut_short.clone(),
        );
        registry.register(
            "http_requests_in_flight",
            "Requests whose response has not ended",
            in_flight.clone(),
        );
        let conversions = Family::<crate::starlight::ResultLabel, Counter>::default();
        let (bundles, bundle_contents) = (Counter::default(), Counter::default());
        registry.register(
            "conversions",
            "Image conversions run by the gateway, by result",
            conversions.clone(),
        );
        registry.register("bundles", "Bundles served", bundles.clone());
        registry.register("bundle_contents", "Contents sent in bundles", bundle_contents.clone());
        let (bundle_batches, bundle_patches) = (Counter::default(), Counter::default());
        registry.register(
            "bundle_batches",
            "Batches of small contents sent in bundles",
            bundle_batches.clone(),
        );
        registry.register("bundle_patches", "Contents sent as patches in bundles", bundle_patches.clone());
        let conn = ConnMetrics::default();
        conn.register(&mut registry);
        let corrupt_objects = Family::<KindLabel, Counter>::default();
        registry.register(
            "corrupt_objects",
            "Stored objects found corrupt or missing while serving, dropped to be rebuilt, by kind",
            corrupt_objects.clone(),
        );
        Metrics {
            registry,
            requests,
            head_seconds,
            response_bytes,
            cut_short,
            in_flight,
            conversions,
            bundles,
            bundle_contents,
            bundle_batches,
            bundle_patches,
            conn,
            corrupt_objects,
        }
    }
}

impl Metrics {
    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[derive(Clone, Debug)]
pub struct MetricsLayer {
    metrics: Arc<Metrics>,
}

impl MetricsLayer {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        MetricsLayer { metrics }
    }
}

impl<S> Layer<S> for MetricsLayer {
    type Service = MetricsService<S>;
    fn layer(&self, inner: S) -> MetricsService<S> {
        MetricsService { inner, metrics: self.metrics.clone() }
    }
}

#[derive(Clone, Debug)]
pub struct MetricsService<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

impl<S, B> Service<Request<B>> for MetricsService<S>
where
    S: Service<Request<B>, Response = Response<Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Response<Body>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let route = req.extensions().get::<Classified>().map_or("invalid", |c| c.0.label());
        let method = req.method().as_str().to_string();
        let metrics = self.metrics.clone();
        metrics.in_flight.inc();
        let start = Instant::now();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let resp = match fut.await {
                Ok(r) => r,
                Err(e) => {
                    metrics.in_flight.dec();
                    return Err(e);
                }
            };
            let labels = RouteLabels { route };
            metrics.head_seconds.get_or_create(&labels).observe(start.elapsed().as_secs_f64());
            metrics
                .requests
                .get_or_create(&RequestLabels { method, route, status: resp.status().as_u16() })
                .inc();
            let (parts, body) = resp.into_parts();
            let body = Observed::new(body, move |bytes, complete| {
                metrics.response_bytes.get_or_create(&labels).inc_by(bytes);
                if !complete {
                    metrics.cut_short.get_or_create(&labels).inc();
                }
                metrics.in_flight.dec();
            });
            Ok(Response::from_parts(parts, crate::body::boxed(body)))
        })
    }
}
