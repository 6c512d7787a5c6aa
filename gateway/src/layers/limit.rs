//! Middleware that sheds load past a concurrency limit, with one limit for the pass-through and
//! another for the Starlight endpoints, so that neither can starve the other. A request past its
//! limit fails at once with [`GatewayError::Overloaded`] (503) instead of waiting in a queue;
//! health and metrics are never limited. A request holds its slot until its response head.
//!
//! ```
//! # use starlight_gateway::layers::LimitLayer;
//! let layer = LimitLayer::new(1024, 256);
//! ```

use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use http::Request;
use tokio::sync::Semaphore;
use tower::{Layer, Service};

use crate::body::BoxError;
use crate::error::GatewayError;
use crate::layers::classify::Classified;
use crate::route::Route;

#[derive(Clone, Debug)]
pub struct LimitLayer {
    pass_through: Arc<Semaphore>,
    starlight: Arc<Semaphore>,
}

impl LimitLayer {
    /// `pass_through` requests and `starlight` requests at once.
    pub fn new(pass_through: usize, starlight: usize) -> Self {
        LimitLayer {
            pass_through: Arc::new(Semaphore::new(pass_through)),
            starlight: Arc::new(Semaphore::new(starlight)),
        }
    }
}

impl<S> Layer<S> for LimitLayer {
    type Service = Limit<S>;
    fn layer(&self, inner: S) -> Limit<S> {
        Limit { inner, limits: self.clone() }
    }
}

#[derive(Clone, Debug)]
pub struct Limit<S> {
    inner: S,
    limits: LimitLayer,
}

impl<S, B> Service<Request<B>> for Limit<S>
where
    S: Service<Request<B>, Error = BoxError>,
    S::Future: Send + 'static,
    S::Response: Send + 'static,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<S::Response, BoxError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let limit = match req.extensions().get::<Classified>().map(|c| &c.0) {
            Some(Route::Live | Route::Ready | Route::Metrics) => None,
            Some(Route::Starlight { .. } | Route::Notifications) => Some(&self.limits.starlight),
            _ => Some(&self.limits.pass_through),
        };
        let slot = match limit.map(|l| l.clone().try_acquire_owned()) {
            Some(Err(_)) => return Box::pin(async { Err(GatewayError::Overloaded.into()) }),
            Some(Ok(slot)) => Some(slot),
            None => None,
        };
        let response = self.inner.call(req);
        Box::pin(async move {
            let r = response.await;
            drop(slot);
            r
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::ServiceExt;

    fn request(path: &str) -> Request<()> {
        let mut r = Request::get(path).body(()).unwrap();
        if let Ok(route) = crate::route::classify(path) {
            r.extensions_mut().insert(Classified(route));
        }
        r
    }

    #[tokio::test]
    async fn a_full_branch_sheds_its_own_requests_only() {
        // The inner service never answers: every call holds its slot.
        let inner = tower::service_fn(|_: Request<()>| futures::future::pending::<Result<(), BoxError>>());
        let svc = LimitLayer::new(1, 1).layer(inner);
        let held = svc.clone().oneshot(request("/v2/a/blobs/uploads/"));
        let held = tokio::spawn(held);
        tokio::task::yield_now().await;
        let shed = svc.clone().oneshot(request("/v2/a/manifests/x")).await.unwrap_err();
        assert!(matches!(shed.downcast_ref::<GatewayError>(), Some(GatewayError::Overloaded)));
        // The Starlight branch and health still have room.
        let starlight = tokio::spawn(svc.clone().oneshot(request("/v2/a/_starlight/bundle")));
        tokio::task::yield_now().await;
        assert!(!starlight.is_finished());
        let health =
            tokio::time::timeout(std::time::Duration::from_millis(100), svc.oneshot(request("/healthz")));
        assert!(health.await.is_err(), "health is not shed (it waits on the inner service here)");
        held.abort();
        starlight.abort();
    }
}
