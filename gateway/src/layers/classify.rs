//! Middleware that classifies the request path once and stores the [`Route`] in the request's
//! extensions, for the layers below (logs, metrics) and the router. A path that does not classify
//! gets no extension; the router answers it with the classification error.

use std::task::{Context, Poll};

use http::Request;
use tower::{Layer, Service};

use crate::route::{Route, classify};

/// The route of a request, as classified at the top of the stack.
#[derive(Clone, Debug)]
pub struct Classified(pub Route);

#[derive(Clone, Copy, Debug, Default)]
pub struct ClassifyLayer;

impl<S> Layer<S> for ClassifyLayer {
    type Service = Classify<S>;
    fn layer(&self, inner: S) -> Classify<S> {
        Classify { inner }
    }
}

#[derive(Clone, Debug)]
pub struct Classify<S> {
    inner: S,
}

impl<S, B> Service<Request<B>> for Classify<S>
where
    S: Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> S::Future {
        if let Ok(route) = classify(req.uri().path()) {
            req.extensions_mut().insert(Classified(route));
        }
        self.inner.call(req)
    }
}
