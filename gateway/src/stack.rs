//! The whole middleware stack, assembled in one function that reads top to bottom: the first layer
//! sees the request first and the response last.

use std::sync::Arc;
use std::time::Duration;

use http::Request;
use hyper::body::Incoming;
use tower::ServiceBuilder;
use tower::util::BoxCloneSyncService;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::sensitive_headers::SetSensitiveRequestHeadersLayer;

use crate::body::Body;
use crate::layers::{AccessLogLayer, ClassifyLayer, LimitLayer, MetricsLayer, OciErrorLayer};
use crate::router::{Router, Shared};

/// The service the server runs for every connection.
pub type GatewayService =
    BoxCloneSyncService<Request<Incoming>, http::Response<Body>, std::convert::Infallible>;

/// Settings the stack's layers take through their constructors.
#[derive(Clone, Debug)]
pub struct StackConfig {
    pub max_concurrency: usize,
    pub max_starlight_concurrency: usize,
    pub request_timeout: Duration,
}

/// Builds the gateway's service.
pub fn build(shared: Arc<Shared>, cfg: &StackConfig) -> GatewayService {
    let metrics = shared.metrics.clone();
    let stack = ServiceBuilder::new()
        // Credentials never reach logs or traces.
        .layer(SetSensitiveRequestHeadersLayer::new([http::header::AUTHORIZATION, http::header::COOKIE]))
        // Every request gets an id (or keeps the caller's), echoed in the response.
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
        .layer(PropagateRequestIdLayer::x_request_id())
        // Classify the path once; everything below reads the route from the extensions.
        .layer(ClassifyLayer)
        // One span per request: method, route, repository, then status, bytes and duration.
        .layer(AccessLogLayer)
        // Prometheus metrics by route family and status, exposed at /metrics.
        .layer(MetricsLayer::new(metrics))
        // Every error below becomes an OCI error response; nothing below can fail a connection.
        .layer(OciErrorLayer { request_timeout: cfg.request_timeout })
        // Past a concurrency limit, answer 503 at once rather than queue without bound; the
        // pass-through and the Starlight endpoints have a limit each, so neither starves the other.
        .layer(LimitLayer::new(cfg.max_concurrency, cfg.max_starlight_concurrency))
        // No response head may take longer than this (the proxy's upstream timeout is shorter).
        .timeout(cfg.request_timeout)
        // Health, metrics, Starlight endpoints, and the pass-through proxy for the rest.
        .service(Router::new(shared));
    BoxCloneSyncService::new(stack)
}
