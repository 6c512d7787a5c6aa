//! Middleware that turns every error from below (our [`GatewayError`]s, tower's timeout and
//! load-shed errors) into an OCI error response, so that nothing below can fail a connection.

use std::convert::Infallible;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::BoxFuture;
use http::{Request, Response};
use tower::{Layer, Service};

use crate::body::{Body, BoxError};
use crate::error::GatewayError;

/// `request_timeout` is named in the answer when a timeout layer below fires.
#[derive(Clone, Copy, Debug)]
pub struct OciErrorLayer {
    pub request_timeout: Duration,
}

impl<S> Layer<S> for OciErrorLayer {
    type Service = OciErrors<S>;
    fn layer(&self, inner: S) -> OciErrors<S> {
        OciErrors { inner, request_timeout: self.request_timeout }
    }
}

#[derive(Clone, Debug)]
pub struct OciErrors<S> {
    inner: S,
    request_timeout: Duration,
}

impl<S, B> Service<Request<B>> for OciErrors<S>
where
    S: Service<Request<B>, Response = Response<Body>>,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Response<Body>, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // A service that cannot become ready (e.g. shedding load) still answers: its error is
        // reported by `call`, which load shedding makes fail fast.
        match self.inner.poll_ready(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(_) => Poll::Ready(Ok(())),
        }
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let fut = self.inner.call(req);
        let timeout = self.request_timeout;
        Box::pin(async move {
            Ok(match fut.await {
                Ok(resp) => resp,
                Err(e) => GatewayError::classify(e.into(), timeout).into_response(),
            })
        })
    }
}
