//! The innermost routing: internal endpoints (health, readiness, metrics), the Starlight extension
//! branch, and everything else to the pass-through proxy.

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::BoxFuture;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Limited};

use crate::body::{Body, BoxError, boxed, empty, full};
use crate::error::GatewayError;
use crate::layers::Metrics;
use crate::layers::classify::Classified;
use crate::proxy::Proxy;
use crate::route::{Kind, Route, classify};

/// Shared state of the branches.
#[derive(Debug)]
pub struct Shared {
    pub proxy: Proxy,
    pub metrics: Arc<Metrics>,
    pub max_manifest_bytes: u64,
    /// A request body that sends nothing for this long fails its request with 408.
    pub body_read_timeout: Duration,
    pub starlight: Arc<crate::starlight::Starlight>,
}

/// Routes each request to its branch.
#[derive(Clone, Debug)]
pub struct Router {
    shared: Arc<Shared>,
}

impl Router {
    pub fn new(shared: Arc<Shared>) -> Self {
        Router { shared }
    }
}

impl<B> tower::Service<Request<B>> for Router
where
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<Response<Body>, BoxError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let shared = self.shared.clone();
        let route = req.extensions().get::<Classified>().map(|c| c.0.clone());
        Box::pin(async move {
            let route = match route {
                Some(r) => r,
                // Classification failed above; classify again to say why (malformed requests only).
                None => {
                    return Err(classify(req.uri().path()).err().unwrap_or(GatewayError::NotFound).into());
                }
            };
            let (parts, body) = req.into_parts();
            let body = crate::body::ReadTimeout::new(boxed(body), shared.body_read_timeout);
            let stalled = body.fired();
            let req = Request::from_parts(parts, boxed(body));
            let answer = branch(&shared, route, req).await;
            // Whatever a branch made of its body's failure (the proxy: upstream unreachable), a
            // stalled body is the client's doing and says so.
            if stalled.load(std::sync::atomic::Ordering::Relaxed) {
                shared.metrics.conn.timed_out("body_read");
                return Err(GatewayError::BodyReadTimeout(shared.body_read_timeout).into());
            }
            answer
        })
    }
}

/// Answers `req` in the branch of `route`.
async fn branch(shared: &Shared, route: Route, req: Request<Body>) -> Result<Response<Body>, BoxError> {
    match route {
        Route::Live => Ok(text(StatusCode::OK, "ok\n")),
        Route::Ready => Ok(ready(&shared.proxy).await),
        Route::Metrics => {
            let mut r = text(StatusCode::OK, &shared.metrics.render());
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
            );
            Ok(r)
        }
        Route::Starlight { name, rest } => Ok(shared.starlight.clone().handle(&name, &rest, req).await?),
        Route::Notifications => Ok(shared.starlight.clone().notifications(req).await?),
        Route::Registry { kind: Kind::Manifest, .. } if req.method() == Method::PUT => {
            let req = limit_body(req, shared.max_manifest_bytes)?;
            Ok(shared.proxy.forward(req).await?)
        }
        Route::Base | Route::Catalog | Route::Registry { .. } => Ok(shared.proxy.forward(req).await?),
    }
}

fn text(status: StatusCode, s: &str) -> Response<Body> {
    let mut r = Response::new(full(s.to_string()));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    r
}

/// Refuses a body larger than `max`: at once when its length says so, else when it grows too big.
fn limit_body(req: Request<Body>, max: u64) -> Result<Request<Body>, GatewayError> {
    let declared =
        req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max) {
        return Err(GatewayError::BodyTooLarge(max as usize));
    }
    Ok(req.map(|b| Limited::new(b, max as usize).map_err(Into::into).boxed_unsync()))
}

/// Ready when the upstream answers `/v2/` at all (401 included: it is up).
async fn ready(proxy: &Proxy) -> Response<Body> {
    let probe = Request::get("/v2/").body(empty()).unwrap_or_default();
    match tokio::time::timeout(Duration::from_secs(2), proxy.forward(probe)).await {
        Ok(Ok(r)) if r.status().as_u16() < 500 => text(StatusCode::OK, "ready\n"),
        Ok(Ok(r)) => text(StatusCode::SERVICE_UNAVAILABLE, &format!("upstream answered {}\n", r.status())),
        Ok(Err(e)) => text(StatusCode::SERVICE_UNAVAILABLE, &format!("{e}\n")),
        Err(_) => text(StatusCode::SERVICE_UNAVAILABLE, "upstream did not answer within 2s\n"),
    }
}
