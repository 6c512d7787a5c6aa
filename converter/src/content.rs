//! Reads contents back out of seekable blobs: coalesced range reads, frame-by-frame decompression,
//! and a digest check before any byte is handed out.

use std::io::Write;

use starlight_format::{ContentLocation, Digest, Frame, Hasher, blob_key};

use crate::ConvertError;
use crate::store::ObjectStore;

/// Frames fetched per range read: large enough to amortize a request, small enough to bound memory.
const READ_BATCH: u64 = 16 << 20;

/// Writes the content `digest`, stored at `loc`, to `out`, verifying it against its digest.
/// Bytes reach `out` before the check completes, so write to a temporary place and publish only on
/// success.
pub async fn copy_content(
    store: &impl ObjectStore,
    digest: &Digest,
    loc: &ContentLocation,
    out: &mut impl Write,
) -> Result<(), ConvertError> {
    let key = blob_key(&loc.blob);
    let mut hasher = Hasher::new();
    let mut size = 0u64;
    for group in coalesce(&loc.frames) {
        let first = group[0];
        let last = group[group.len() - 1];
        let len = last.offset + u64::from(last.clen) - first.offset;
        let data = store.get_range(&key, first.offset, len).await?;
        for f in group {
            let start = (f.offset - first.offset) as usize;
            let frame = &data[start..start + f.clen as usize];
            let plain = zstd::bulk::decompress(frame, f.ulen as usize).map_err(|e| {
                ConvertError::Content { digest: *digest, why: format!("frame at {} of {key}: {e}", f.offset) }
            })?;
            if plain.len() != f.ulen as usize {
                return Err(ConvertError::Content {
                    digest: *digest,
                    why: format!(
                        "frame at {} of {key} holds {} bytes, not {}",
                        f.offset,
                        plain.len(),
                        f.ulen
                    ),
                });
            }
            hasher.update(&plain);
            size += plain.len() as u64;
            out.write_all(&plain).map_err(ConvertError::io("content output"))?;
        }
    }
    let got = hasher.finish();
    if got != *digest || size != loc.size {
        return Err(ConvertError::Content {
            digest: *digest,
            why: format!("stored bytes hash to {got} ({size} bytes)"),
        });
    }
    Ok(())
}

/// Reads a whole content into memory (small contents and tests).
pub async fn read_content(
    store: &impl ObjectStore,
    digest: &Digest,
    loc: &ContentLocation,
) -> Result<Vec<u8>, ConvertError> {
    let mut out = Vec::with_capacity(loc.size.min(64 << 20) as usize);
    copy_content(store, digest, loc, &mut out).await?;
    Ok(out)
}

/// Splits frames into runs that are adjacent in the blob and at most `READ_BATCH` long.
fn coalesce(frames: &[Frame]) -> Vec<&[Frame]> {
    let mut groups = Vec::new();
    let mut start = 0;
    for i in 1..=frames.len() {
        let split = i == frames.len() || {
            let (a, b) = (frames[i - 1], frames[i]);
            b.offset != a.offset + u64::from(a.clen)
                || b.offset + u64::from(b.clen) - frames[start].offset > READ_BATCH
        };
        if split {
            groups.push(&frames[start..i]);
            start = i;
        }
    }
    groups
}
