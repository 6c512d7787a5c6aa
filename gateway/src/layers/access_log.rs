//! Middleware that gives every request a tracing span (method, route, repository, request id) and
//! records, when the response body ends, its status, bytes and duration; then logs one line.

use std::task::{Context, Poll};
use std::time::Instant;

use futures::future::BoxFuture;
use http::{Request, Response};
use tower::{Layer, Service};
use tracing::{Instrument, field::Empty, info, info_span};

use crate::body::{Body, Observed};
use crate::layers::classify::Classified;

#[derive(Clone, Copy, Debug, Default)]
pub struct AccessLogLayer;

impl<S> Layer<S> for AccessLogLayer {
    type Service = AccessLog<S>;
    fn layer(&self, inner: S) -> AccessLog<S> {
        AccessLog { inner }
    }
}

#[derive(Clone, Debug)]
pub struct AccessLog<S> {
    inner: S,
}

impl<S, B> Service<Request<B>> for AccessLog<S>
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
        let route = req.extensions().get::<Classified>().map(|c| c.0.clone());
        let request_id = req.headers().get("x-request-id").and_then(|v| v.to_str().ok()).unwrap_or("");
        let span = info_span!(
            "request",
            method = %req.method(),
            route = route.as_ref().map_or("invalid", |r| r.label()),
            repository = route.as_ref().and_then(|r| r.repository()).unwrap_or(""),
            request_id,
            status = Empty,
            bytes = Empty,
            duration_ms = Empty,
        );
        let start = Instant::now();
        let fut = self.inner.call(req).instrument(span.clone());
        Box::pin(async move {
            let resp = fut.await?;
            span.record("status", resp.status().as_u16());
            let (parts, body) = resp.into_parts();
            let body = Observed::new(body, move |bytes, complete| {
                span.record("bytes", bytes);
                span.record("duration_ms", start.elapsed().as_secs_f64() * 1e3);
                let _enter = span.enter();
                if complete {
                    info!("served");
                } else {
                    info!("response cut short (client gone or upstream error)");
                }
            });
            Ok(Response::from_parts(parts, crate::body::boxed(body)))
        })
    }
}
