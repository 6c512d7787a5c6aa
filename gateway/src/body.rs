//! The one body type every branch of the stack answers with: a boxed stream of `Bytes` frames.

use bytes::Bytes;

use std::pin::Pin;

use http_body_util::{BodyExt, Full, combinators::UnsyncBoxBody};

/// Errors inside bodies (an upstream reset mid-stream, a client gone).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A response or request body of any origin.
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

/// A body that holds `data` whole (small JSON answers).
pub fn full(data: impl Into<Bytes>) -> Body {
    Full::new(data.into()).map_err(|never| match never {}).boxed_unsync()
}

/// An empty body.
pub fn empty() -> Body {
    full(Bytes::new())
}

/// Boxes any body whose error converts to [`BoxError`].
pub fn boxed<B>(body: B) -> Body
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed_unsync()
}

pin_project_lite::pin_project! {
    /// A body that counts the bytes it yields and calls `done(bytes, complete)` exactly once: at
    /// its end (`complete = true`) or when dropped early (the client went away, or an error).
    pub struct Observed<F: FnOnce(u64, bool)> {
        #[pin]
        inner: Body,
        bytes: u64,
        done: Option<F>,
    }

    impl<F: FnOnce(u64, bool)> PinnedDrop for Observed<F> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let Some(done) = this.done.take() {
                // hyper stops polling once a body says it has ended (a Content-Length body after
                // its last byte, an empty body), so the end may show up only here.
                let complete = http_body::Body::is_end_stream(&*this.inner);
                done(*this.bytes, complete);
            }
        }
    }
}

impl<F: FnOnce(u64, bool)> Observed<F> {
    pub fn new(inner: Body, done: F) -> Self {
        Observed { inner, bytes: 0, done: Some(done) }
    }
}

impl<F: FnOnce(u64, bool)> http_body::Body for Observed<F> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        match &polled {
            std::task::Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    *this.bytes += d.len() as u64;
                }
            }
            std::task::Poll::Ready(None) => {
                if let Some(done) = this.done.take() {
                    done(*this.bytes, true);
                }
            }
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Reads a whole (small) body: at most `max` bytes, else an error that says so.
pub async fn collect_capped(mut body: Body, max: usize) -> Result<Bytes, String> {
    use http_body_util::BodyExt;
    let mut out = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| e.to_string())?;
        if let Ok(data) = frame.into_data() {
            if out.len() + data.len() > max {
                return Err(format!("body larger than {max} bytes"));
            }
            out.extend_from_slice(&data);
        }
    }
    Ok(out.freeze())
}

/// A request body that made no progress for its read timeout.
#[derive(Debug, thiserror::Error)]
#[error("the request body sent less than {} bytes in {:?}", MIN_PROGRESS, .0)]
pub struct BodyReadTimeout(pub std::time::Duration);

/// Bytes a request body must deliver within its read timeout to count as progress: a client that
/// trickles a byte now and then holds its slot no longer than one that sends nothing.
pub const MIN_PROGRESS: usize = 1024;

pin_project_lite::pin_project! {
    /// A request body that fails with [`BodyReadTimeout`] when, while read, less than
    /// [`MIN_PROGRESS`] bytes arrive within `timeout`; `fired` says so to whoever answers.
    pub struct ReadTimeout {
        #[pin]
        inner: Body,
        timeout: std::time::Duration,
        progress: usize,
        #[pin]
        sleep: Option<tokio::time::Sleep>,
        fired: std::sync::Arc<std::sync::atomic::AtomicBool>,
    }
}

impl ReadTimeout {
    pub fn new(inner: Body, timeout: std::time::Duration) -> Self {
        ReadTimeout { inner, timeout, progress: 0, sleep: None, fired: Default::default() }
    }

    /// Set once the timeout has failed the body.
    pub fn fired(&self) -> std::sync::Arc<std::sync::atomic::AtomicBool> {
        self.fired.clone()
    }
}

impl http_body::Body for ReadTimeout {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        use std::future::Future;
        use std::task::Poll;
        let mut this = self.project();
        match this.inner.poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                *this.progress += frame.data_ref().map_or(0, Bytes::len);
                if *this.progress >= MIN_PROGRESS {
                    // Progress: the next wait starts its own clock.
                    *this.progress = 0;
                    this.sleep.set(None);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(end) => Poll::Ready(end),
            Poll::Pending => {
                if this.sleep.is_none() {
                    this.sleep.set(Some(tokio::time::sleep(*this.timeout)));
                }
                match this.sleep.as_pin_mut().map(|s| s.poll(cx)) {
                    Some(Poll::Ready(())) => {
                        this.fired.store(true, std::sync::atomic::Ordering::Relaxed);
                        Poll::Ready(Some(Err(Box::new(BodyReadTimeout(*this.timeout)))))
                    }
                    _ => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
