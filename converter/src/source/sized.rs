//! A layer blob's byte stream held to the size its manifest declares: it never reads past that
//! size (a registry serving a huge blob for a small declared size costs one byte more), fails a
//! blob that is shorter or longer, and types every failure of the source underneath as
//! [`BlobReadError::Source`] so that a cut connection is not taken for a corrupt layer.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use starlight_format::Digest;
use tokio::io::{AsyncRead, ReadBuf};

use super::BlobReader;
use crate::BlobReadError;

/// Reads exactly `declared` bytes of `inner`, then checks that nothing follows.
pub(super) struct SizedBlob {
    inner: BlobReader,
    source_name: String,
    digest: Digest,
    declared: u64,
    read: u64,
    done: bool,
}

impl SizedBlob {
    pub(super) fn new(inner: BlobReader, source_name: String, digest: Digest, declared: u64) -> Self {
        SizedBlob { inner, source_name, digest, declared, read: 0, done: false }
    }

    /// The error for a failure of the source: kept as it is when it already says what it is.
    fn source_error(&self, e: std::io::Error) -> std::io::Error {
        if BlobReadError::find(&e).is_some() {
            return e;
        }
        let why = e.to_string();
        std::io::Error::new(
            e.kind(),
            BlobReadError::Source { source_name: self.source_name.clone(), digest: self.digest, why },
        )
    }

    fn fail(&mut self, e: BlobReadError) -> Poll<std::io::Result<()>> {
        self.done = true;
        Poll::Ready(Err(std::io::Error::new(std::io::ErrorKind::InvalidData, e)))
    }
}

impl AsyncRead for SizedBlob {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.done || buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        if this.read == this.declared {
            // At the declared size: one byte more means the blob is longer than declared.
            let mut probe = [0u8; 1];
            let mut probe_buf = ReadBuf::new(&mut probe);
            if let Err(e) = ready!(this.inner.as_mut().poll_read(cx, &mut probe_buf)) {
                this.done = true;
                return Poll::Ready(Err(this.source_error(e)));
            }
            if probe_buf.filled().is_empty() {
                this.done = true;
                return Poll::Ready(Ok(()));
            }
            let declared = this.declared;
            return this.fail(BlobReadError::Long { declared, actual: None });
        }
        let want = (this.declared - this.read).min(buf.remaining() as u64) as usize;
        let dst = buf.initialize_unfilled_to(want);
        let mut sub = ReadBuf::new(&mut dst[..want]);
        if let Err(e) = ready!(this.inner.as_mut().poll_read(cx, &mut sub)) {
            this.done = true;
            return Poll::Ready(Err(this.source_error(e)));
        }
        let n = sub.filled().len();
        if n == 0 {
            let (declared, actual) = (this.declared, this.read);
            return this.fail(BlobReadError::Short { declared, actual });
        }
        buf.advance(n);
        this.read += n as u64;
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncReadExt;

    use super::*;

    fn sized(data: &'static [u8], declared: u64) -> SizedBlob {
        SizedBlob::new(Box::pin(data), "test".into(), Digest::of(data), declared)
    }

    async fn read_all(mut r: SizedBlob) -> Result<Vec<u8>, std::io::Error> {
        let mut out = Vec::new();
        r.read_to_end(&mut out).await.map(|_| out)
    }

    #[tokio::test]
    async fn the_declared_size_is_held() {
        assert_eq!(read_all(sized(b"hello", 5)).await.unwrap(), b"hello");
        assert_eq!(read_all(sized(b"", 0)).await.unwrap(), b"");

        let e = read_all(sized(b"hello", 9)).await.unwrap_err();
        let b = BlobReadError::find(&e).unwrap();
        assert!(matches!(b, BlobReadError::Short { declared: 9, actual: 5 }), "{b:?}");
        assert_eq!(e.to_string(), "blob is 5 bytes, shorter than the 9 bytes the manifest declares");

        let e = read_all(sized(b"hello world", 5)).await.unwrap_err();
        let b = BlobReadError::find(&e).unwrap();
        assert!(matches!(b, BlobReadError::Long { declared: 5, actual: None }), "{b:?}");
    }

    /// A huge blob behind a small declared size: the reader stops one byte past the declared size.
    #[tokio::test]
    async fn nothing_past_the_declared_size_is_read() {
        let endless = tokio::io::repeat(7);
        let counted = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        struct Counting<R>(R, std::sync::Arc<std::sync::atomic::AtomicU64>);
        impl<R: AsyncRead + Unpin> AsyncRead for Counting<R> {
            fn poll_read(
                mut self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &mut ReadBuf<'_>,
            ) -> Poll<std::io::Result<()>> {
                let before = buf.filled().len();
                let r = Pin::new(&mut self.0).poll_read(cx, buf);
                let n = buf.filled().len() - before;
                self.1.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
                r
            }
        }
        let r =
            SizedBlob::new(Box::pin(Counting(endless, counted.clone())), "t".into(), Digest::of(b""), 1000);
        let e = read_all(r).await.unwrap_err();
        assert!(matches!(BlobReadError::find(&e), Some(BlobReadError::Long { declared: 1000, .. })), "{e}");
        assert_eq!(counted.load(std::sync::atomic::Ordering::Relaxed), 1001);
    }

    /// A failure of the source underneath is typed as such (a cut is not a corrupt layer).
    #[tokio::test]
    async fn source_failures_are_typed() {
        struct Broken;
        impl AsyncRead for Broken {
            fn poll_read(
                self: Pin<&mut Self>,
                _: &mut Context<'_>,
                _: &mut ReadBuf<'_>,
            ) -> Poll<std::io::Result<()>> {
                Poll::Ready(Err(std::io::Error::new(std::io::ErrorKind::ConnectionReset, "connection reset")))
            }
        }
        let r = SizedBlob::new(Box::pin(Broken), "docker://h/x".into(), Digest::of(b"x"), 10);
        let e = read_all(r).await.unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset);
        match BlobReadError::find(&e) {
            Some(BlobReadError::Source { source_name, why, .. }) => {
                assert_eq!((source_name.as_str(), why.as_str()), ("docker://h/x", "connection reset"));
            }
            other => panic!("{other:?}"),
        }
    }
}
