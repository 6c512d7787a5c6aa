//! What a bundle sends is verified before it leaves: every content's stored frames are
//! decompressed and hashed against the content's digest as its units go out, a batch's contents
//! are checked one by one, and a patch is applied to its base and checked. A mismatch cuts the
//! bundle (the worker resumes) and is reported, so that the bad object is dropped and rebuilt
//! instead of being served again.
//!
//! The work runs on the blocking pool, one unit at a time in stream order, on the bytes the unit
//! already holds: nothing is read twice and nothing more is held than the unit's own data.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use futures::future::BoxFuture;
use starlight_format::bundle::{apply_patch, batch_prefix, patch_prefix};
use starlight_format::{CHUNK_SIZE, ContentLocation, Digest, Hasher, blob_key};

use super::{Plan, Step, offsets};
use crate::body::BoxError;

/// A stored object found bad, and where.
#[derive(Clone, Debug)]
pub enum Bad {
    /// A content's frames in a seekable blob; `offset` is the frame's offset in the blob.
    Frames { blob: Digest, content: Digest, offset: u64 },
    /// A stored batch (`content` is the first content of it found wrong).
    Batch { key: String, content: Digest },
    /// A stored patch.
    Patch { key: String, content: Digest },
    /// An object the bundle's plan names is not in the store.
    Missing { key: String },
    /// Contents of an image have no location in the index (dropped with a corrupt blob).
    Unlocated,
    /// Not the store's fault: the check itself could not run.
    Unchecked,
}

impl Bad {
    /// The object-store key of the bad object.
    pub fn key(&self) -> String {
        match self {
            Bad::Frames { blob, .. } => blob_key(blob),
            Bad::Batch { key, .. } | Bad::Patch { key, .. } | Bad::Missing { key } => key.clone(),
            Bad::Unlocated | Bad::Unchecked => String::new(),
        }
    }

    /// The metric label of the object's kind.
    pub fn kind(&self) -> &'static str {
        match self {
            Bad::Frames { .. } => "blob",
            Bad::Batch { .. } => "batch",
            Bad::Patch { .. } => "patch",
            Bad::Missing { .. } | Bad::Unlocated => "missing",
            Bad::Unchecked => "unchecked",
        }
    }
}

/// A bad object and what was wrong with it.
#[derive(Clone, Debug, thiserror::Error)]
#[error("stored object {} is corrupt: {why}", .bad.key())]
pub struct Corrupt {
    pub bad: Bad,
    pub why: String,
}

/// Reports a corrupt object: logs and counts it, and drops it and what points to it. Awaited
/// before the bundle is cut, so that the next request finds the object gone.
pub type Report = Arc<dyn Fn(Corrupt) -> BoxFuture<'static, ()> + Send + Sync>;

/// How a bundle verifies what it sends.
#[derive(Clone)]
pub struct Verify {
    /// False: send stored bytes as they are (the worker still verifies).
    pub enabled: bool,
    pub report: Report,
}

impl std::fmt::Debug for Verify {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verify").field("enabled", &self.enabled).finish_non_exhaustive()
    }
}

/// A patch to check once its base is read.
struct PendingPatch {
    key: String,
    content: Digest,
    size: u64,
    base: Digest,
    base_loc: ContentLocation,
    frame: Bytes,
}

/// The verification state of one bundle: contents whose frames are partly sent.
pub struct Check {
    partial: HashMap<u64, (Hasher, u64)>,
    dctx: Option<zstd::bulk::Decompressor<'static>>,
    buf: Vec<u8>,
}

impl Check {
    pub fn new() -> Check {
        Check { partial: HashMap::new(), dctx: None, buf: Vec::new() }
    }

    /// Verifies the pieces made for `plan.steps[unit]`, on the blocking pool; gives the pieces
    /// back when they are sound.
    pub async fn unit(
        &mut self,
        store: &starlight_converter::AnyStore,
        plan: &Arc<Plan>,
        unit: std::ops::Range<usize>,
        pieces: Vec<Bytes>,
    ) -> Result<Vec<Bytes>, Corrupt> {
        let mut me = std::mem::replace(self, Check::new());
        let plan2 = plan.clone();
        let (me, pieces, out) = tokio::task::spawn_blocking(move || {
            let out = me.steps(&plan2, &plan2.steps[unit], &pieces);
            (me, pieces, out)
        })
        .await
        .map_err(|e| Corrupt { bad: Bad::Unchecked, why: format!("verification task failed: {e}") })?;
        *self = me;
        for p in out? {
            check_patch(store, p).await?;
        }
        Ok(pieces)
    }

    fn steps(&mut self, plan: &Plan, steps: &[Step], pieces: &[Bytes]) -> Result<Vec<PendingPatch>, Corrupt> {
        let mut at = 0;
        let mut patches = Vec::new();
        for s in steps {
            let rest = pieces.get(at..).unwrap_or_default();
            at += self.step(plan, s, rest, &mut patches)?;
        }
        Ok(patches)
    }

    /// Verifies one step whose pieces start `pieces`; returns how many pieces it took.
    fn step(
        &mut self,
        plan: &Plan,
        step: &Step,
        pieces: &[Bytes],
        patches: &mut Vec<PendingPatch>,
    ) -> Result<usize, Corrupt> {
        let data = |k: usize| pieces.get(2 * k + 1).cloned().unwrap_or_default();
        match step {
            Step::Read(r) => {
                for (k, &(index, at, start, _)) in r.frames.iter().enumerate() {
                    let offset = r.offset + start;
                    self.frame(plan, index, at, offset, &data(k))?;
                }
                Ok(2 * r.frames.len())
            }
            Step::Batch(b) => {
                let object = pieces.len() >= 2
                    && pieces[0][..] == batch_prefix(b.first, b.items.len() as u64, pieces[1].len())[..];
                if object {
                    self.batch(b, &pieces[1])?;
                    return Ok(2);
                }
                let mut n = 0;
                for (k, (_, loc)) in b.items.iter().enumerate() {
                    n += self.frames(plan, b.first + k as u64, loc, &pieces[n.min(pieces.len())..])?;
                }
                Ok(n)
            }
            Step::Patch(p) => {
                let object =
                    pieces.len() >= 2 && pieces[0][..] == patch_prefix(p.index, &p.base, pieces[1].len())[..];
                if object {
                    patches.push(PendingPatch {
                        key: p.key.clone(),
                        content: p.content,
                        size: p.loc.size,
                        base: p.base,
                        base_loc: p.base_loc.clone(),
                        frame: pieces[1].clone(),
                    });
                    return Ok(2);
                }
                self.frames(plan, p.index, &p.loc, pieces)
            }
        }
    }

    /// Verifies the frames of one content sent as chunks; returns the pieces taken.
    fn frames(
        &mut self,
        plan: &Plan,
        index: u64,
        loc: &ContentLocation,
        pieces: &[Bytes],
    ) -> Result<usize, Corrupt> {
        let mut n = 0;
        for (at, f) in offsets(loc) {
            let d = pieces.get(n + 1).cloned().unwrap_or_default();
            self.frame(plan, index, at, f.offset, &d)?;
            n += 2;
        }
        Ok(n)
    }

    /// Decompresses and hashes one stored frame of content `index` (at `at` in the content, at
    /// `offset` in its blob); checks the content when it is the last.
    fn frame(&mut self, plan: &Plan, index: u64, at: u64, offset: u64, frame: &[u8]) -> Result<(), Corrupt> {
        let Some((digest, loc)) = plan.table.get(index as usize) else {
            return Err(Corrupt {
                bad: Bad::Unchecked,
                why: format!("content index {index} is not in the plan"),
            });
        };
        let bad =
            |why: String| Corrupt { bad: Bad::Frames { blob: loc.blob, content: *digest, offset }, why };
        let want = (loc.size.saturating_sub(at)).min(CHUNK_SIZE) as usize;
        let got = self.inflate(frame, want).map_err(|e| bad(format!("frame does not decompress: {e}")))?;
        if got != want {
            return Err(bad(format!("frame holds {got} bytes, expected {want}")));
        }
        let (hasher, done) = self.partial.entry(index).or_insert_with(|| (Hasher::new(), 0));
        if *done != at {
            return Err(bad(format!("frame at {at} of the content, expected {done}")));
        }
        hasher.update(&self.buf);
        *done += got as u64;
        if *done >= loc.size {
            let (hasher, _) = self.partial.remove(&index).unwrap_or_else(|| (Hasher::new(), 0));
            let got = hasher.finish();
            if got != *digest {
                return Err(bad(format!("content hashes to {got}")));
            }
        }
        Ok(())
    }

    fn batch(&mut self, b: &super::BatchStep, frame: &[u8]) -> Result<(), Corrupt> {
        let first = b.items.first().map_or_else(Digest::empty, |(d, _)| *d);
        let bad =
            |content: Digest, why: String| Corrupt { bad: Bad::Batch { key: b.key.clone(), content }, why };
        let total: u64 = b.items.iter().map(|(_, l)| l.size).sum();
        let got = self
            .inflate(frame, total as usize)
            .map_err(|e| bad(first, format!("does not decompress: {e}")))?;
        if got as u64 != total {
            return Err(bad(first, format!("holds {got} bytes, expected {total}")));
        }
        let mut at = 0usize;
        for (d, l) in &b.items {
            let part = &self.buf[at..at + l.size as usize];
            at += l.size as usize;
            if Digest::of(part) != *d {
                return Err(bad(*d, "a content in it does not match its digest".into()));
            }
        }
        Ok(())
    }

    /// Decompresses `frame` into `self.buf`; returns its length.
    fn inflate(&mut self, frame: &[u8], want: usize) -> Result<usize, String> {
        self.buf.clear();
        self.buf.reserve_exact(want);
        let dctx = match &mut self.dctx {
            Some(d) => d,
            None => self.dctx.insert(zstd::bulk::Decompressor::new().map_err(|e| e.to_string())?),
        };
        dctx.decompress_to_buffer(frame, &mut self.buf).map_err(|e| e.to_string())
    }
}

/// Applies a stored patch to its base (read and verified from the store) and checks the result.
async fn check_patch(store: &starlight_converter::AnyStore, p: PendingPatch) -> Result<(), Corrupt> {
    let bad = |why: String| Corrupt { bad: Bad::Patch { key: p.key.clone(), content: p.content }, why };
    let base = starlight_converter::content::read_content(store, &p.base, &p.base_loc)
        .await
        .map_err(|e| bad(format!("its base cannot be read: {e}")))?;
    let (frame, size, want) = (p.frame.clone(), p.size, p.content);
    let ok = tokio::task::spawn_blocking(move || {
        apply_patch(&base, &frame, size).map(|data| Digest::of(&data) == want)
    })
    .await
    .map_err(|e| bad(format!("verification task failed: {e}")))?
    .map_err(bad)?;
    if !ok {
        return Err(bad("the patched content does not match its digest".into()));
    }
    Ok(())
}

/// The missing object behind a failed store read, if that is what failed.
pub fn missing(e: &BoxError) -> Option<Corrupt> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e.as_ref());
    while let Some(s) = source {
        if let Some(starlight_converter::store::StoreError::NotFound { key }) = s.downcast_ref() {
            return Some(Corrupt { bad: Bad::Missing { key: key.clone() }, why: "not in the store".into() });
        }
        source = s.source();
    }
    None
}

/// The stored frames of one content (`(offset in the blob, frame)`, in order), checked as they
/// go: each is decompressed and hashed on the blocking pool before it is passed on, and the
/// last one only once the content matches its digest. A mismatch is reported and ends the stream
/// with an error.
pub fn content_stream<S>(
    frames: S,
    content: Digest,
    loc: ContentLocation,
    verify: Verify,
) -> impl futures::Stream<Item = Result<Bytes, BoxError>> + Send + 'static
where
    S: futures::Stream<Item = Result<(u64, Bytes), BoxError>> + Send + Unpin + 'static,
{
    use futures::StreamExt;
    struct State<S> {
        frames: S,
        hasher: Option<Hasher>,
        done: u64,
        ended: bool,
    }
    let state = State { frames, hasher: Some(Hasher::new()), done: 0, ended: false };
    futures::stream::unfold(state, move |mut st| {
        let (loc, verify) = (loc.clone(), verify.clone());
        async move {
            if st.ended {
                return None;
            }
            let (offset, frame) = match st.frames.next().await? {
                Ok(f) => f,
                Err(e) => {
                    st.ended = true;
                    if let Some(c) = missing(&e) {
                        (verify.report)(c).await;
                    }
                    return Some((Err(e), st));
                }
            };
            if !verify.enabled {
                return Some((Ok(frame), st));
            }
            let (mut hasher, at, size) = (st.hasher.take().unwrap_or_else(Hasher::new), st.done, loc.size);
            let data = frame.clone();
            let checked = tokio::task::spawn_blocking(move || {
                let want = size.saturating_sub(at).min(CHUNK_SIZE) as usize;
                let plain = zstd::bulk::decompress(&data, want)
                    .map_err(|e| format!("frame does not decompress: {e}"))?;
                if plain.len() != want {
                    return Err(format!("frame holds {} bytes, expected {want}", plain.len()));
                }
                hasher.update(&plain);
                let done = at + want as u64;
                if done >= size {
                    let got = hasher.finish();
                    if got != content {
                        return Err(format!("content hashes to {got}"));
                    }
                    return Ok((None, done));
                }
                Ok((Some(hasher), done))
            })
            .await
            .map_err(|e| format!("verification task failed: {e}"))
            .and_then(|r| r);
            match checked {
                Ok((hasher, done)) => {
                    st.hasher = hasher;
                    st.done = done;
                    Some((Ok(frame), st))
                }
                Err(why) => {
                    st.ended = true;
                    let c = Corrupt { bad: Bad::Frames { blob: loc.blob, content, offset }, why };
                    (verify.report)(c.clone()).await;
                    Some((Err(Box::new(c) as BoxError), st))
                }
            }
        }
    })
}
