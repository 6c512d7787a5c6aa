//! The bundle body: the header at once, then stored zstd frames read from the object store with
//! coalesced range reads (adjacent frames of one blob in one read), a few reads in flight, and a
//! byte budget that bounds what is read but not yet sent; then the trailer.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures::StreamExt;
use http_body::{Frame, SizeHint};
use starlight_converter::ObjectStore;
use starlight_converter::store::AnyStore;
use starlight_format::bundle::{chunk_prefix, encode_trailer};
use starlight_format::{ContentLocation, blob_key};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tracing::warn;

use crate::body::BoxError;

/// Adjacent frames are read together up to this many bytes.
const READ_MAX: u64 = 2 << 20;
/// Range reads in flight per bundle (they matter for S3, whose every read is a round trip).
const READS_IN_FLIGHT: usize = 4;
/// Budget units: KiB.
const UNIT: u64 = 1024;

/// One range read and the frames it carries: (content index, offset in the content, frame start
/// within the read, frame length).
#[derive(Debug)]
struct Read {
    key: String,
    offset: u64,
    len: u64,
    frames: Vec<(u64, u64, u64, u64)>,
}

/// Everything a bundle body needs before it starts: the header, the reads, the exact length.
/// Built once per distinct request (see the plan cache) and shared by the bodies that send it.
#[derive(Debug)]
pub struct Plan {
    header: Bytes,
    reads: Vec<Read>,
    trailer: Bytes,
    total: u64,
    pub contents: u64,
    pub content_bytes: u64,
}

impl Plan {
    /// The plan for sending `header`, then `contents` in this order, then the trailer.
    pub fn new(header: Vec<u8>, contents: &[ContentLocation]) -> Plan {
        let (reads, chunks) = plan(contents);
        let count = contents.len() as u64;
        let bytes: u64 = contents.iter().map(|c| c.size).sum();
        let trailer = Bytes::from(encode_trailer(count, bytes));
        let total = header.len() as u64 + chunks + trailer.len() as u64;
        Plan { header: Bytes::from(header), reads, trailer, total, contents: count, content_bytes: bytes }
    }
}

/// Plans the reads for `contents` (in stream order) and the exact length of the chunk records.
fn plan(contents: &[ContentLocation]) -> (Vec<Read>, u64) {
    let mut reads: Vec<Read> = Vec::new();
    let mut body = 0u64;
    for (i, loc) in contents.iter().enumerate() {
        let key = blob_key(&loc.blob);
        let mut at = 0u64;
        for f in &loc.frames {
            let clen = u64::from(f.clen);
            body += chunk_prefix(i as u64, at, f.clen as usize).len() as u64 + clen;
            let joins = reads
                .last()
                .is_some_and(|r| r.key == key && r.offset + r.len == f.offset && r.len + clen <= READ_MAX);
            if !joins {
                reads.push(Read { key: key.clone(), offset: f.offset, len: 0, frames: Vec::new() });
            }
            let r = reads.last_mut().unwrap_or_else(|| unreachable!());
            r.frames.push((i as u64, at, r.len, clen));
            r.len += clen;
            at += u64::from(f.ulen);
        }
    }
    (reads, body)
}

type Piece = Result<(Bytes, Option<OwnedSemaphorePermit>), BoxError>;

/// A bundle response body; its length is known up front.
#[derive(Debug)]
pub struct BundleBody {
    rx: mpsc::Receiver<Piece>,
    remaining: u64,
}

impl BundleBody {
    /// Starts streaming `plan`. At most `read_ahead` bytes are read from the store ahead of what
    /// the client took.
    pub fn start(plan: Arc<Plan>, store: AnyStore, read_ahead: u64) -> Self {
        let (tx, rx) = mpsc::channel::<Piece>(64);
        let budget_units = (read_ahead / UNIT).clamp(1, u64::from(u32::MAX >> 3)) as u32;
        let budget = Arc::new(Semaphore::new(budget_units as usize));
        let total = plan.total;
        tokio::spawn(async move {
            if tx.send(Ok((plan.header.clone(), None))).await.is_err() {
                return;
            }
            // Permits are taken in read order before a read starts, so a later read never holds
            // budget an earlier one waits for.
            let reads = plan.reads.len();
            let mut results = std::pin::pin!(
                futures::stream::iter(0..reads)
                    .then(|i| {
                        let (budget, len) = (budget.clone(), plan.reads[i].len);
                        async move {
                            let units = (len.div_ceil(UNIT) as u32).clamp(1, budget_units);
                            (i, budget.acquire_many_owned(units).await)
                        }
                    })
                    .map(|(i, permit)| {
                        let (store, plan) = (store.clone(), plan.clone());
                        async move {
                            let r = &plan.reads[i];
                            (i, store.get_range(&r.key, r.offset, r.len).await, permit)
                        }
                    })
                    .buffered(READS_IN_FLIGHT)
            );
            while let Some((i, data, permit)) = results.next().await {
                let r = &plan.reads[i];
                let (data, permit) = match (data, permit) {
                    (Ok(d), Ok(p)) => (d, p),
                    (Err(e), _) => {
                        warn!(key = %r.key, offset = r.offset, error = %e, "bundle read failed; cutting the stream");
                        let _ = tx.send(Err(Box::new(e))).await;
                        return;
                    }
                    (_, Err(e)) => {
                        let _ = tx.send(Err(Box::new(e))).await;
                        return;
                    }
                };
                let mut permit = Some(permit);
                let n = r.frames.len();
                for (k, &(index, at, start, clen)) in r.frames.iter().enumerate() {
                    let prefix = Bytes::from(chunk_prefix(index, at, clen as usize));
                    let frame = data.slice(start as usize..(start + clen) as usize);
                    let last = if k + 1 == n { permit.take() } else { None };
                    if tx.send(Ok((prefix, None))).await.is_err() || tx.send(Ok((frame, last))).await.is_err()
                    {
                        return;
                    }
                }
            }
            let _ = tx.send(Ok((plan.trailer.clone(), None))).await;
        });
        BundleBody { rx, remaining: total }
    }

    pub fn len(&self) -> u64 {
        self.remaining
    }
}

impl http_body::Body for BundleBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.rx.poll_recv(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) if self.remaining == 0 => Poll::Ready(None),
            Poll::Ready(None) => Poll::Ready(Some(Err("the bundle producer stopped early".into()))),
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e))),
            // The permit goes when the bytes leave: the budget counts what waits here, not in hyper.
            Poll::Ready(Some(Ok((b, _permit)))) => {
                self.remaining = self.remaining.saturating_sub(b.len() as u64);
                Poll::Ready(Some(Ok(Frame::data(b))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use starlight_format::{Digest, Frame as ZFrame};

    fn loc(blob: u8, frames: &[(u64, u32)]) -> ContentLocation {
        let frames: Vec<ZFrame> =
            frames.iter().map(|&(offset, clen)| ZFrame { offset, clen, ulen: 100 }).collect();
        ContentLocation { blob: Digest::of(&[blob]), size: 100 * frames.len() as u64, frames }
    }

    #[test]
    fn adjacent_frames_of_one_blob_share_a_read() {
        let contents = vec![
            loc(1, &[(0, 10), (10, 20)]),
            loc(1, &[(30, 5)]),
            // A gap: a new read.
            loc(1, &[(100, 5)]),
            // Another blob: a new read.
            loc(2, &[(105, 5)]),
            // Too big to join.
            loc(2, &[(110, (READ_MAX) as u32)]),
        ];
        let (reads, _) = plan(&contents);
        let shape: Vec<(u64, u64, usize)> = reads.iter().map(|r| (r.offset, r.len, r.frames.len())).collect();
        assert_eq!(shape, vec![(0, 35, 3), (100, 5, 1), (105, 5, 1), (110, READ_MAX, 1)]);
        assert_eq!(reads[0].frames[1], (0, 100, 10, 20));
        assert_eq!(reads[0].frames[2], (1, 0, 30, 5));
    }
}
