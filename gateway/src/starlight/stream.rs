//! The bundle body: the header at once, then the contents in order, then the trailer. Stored zstd
//! frames are read from the object store with coalesced range reads (adjacent frames of one blob
//! in one read), a few steps in flight, and a byte budget that bounds what is read but not yet
//! sent. Small files go in batches (one zstd frame for many files, which gives them the shared
//! context that one frame per file lacks), and a content the worker holds an older version of goes
//! as a patch against it. Both are made once, kept in the store, and sent only when smaller than
//! the stored frames they replace.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use http_body::{Frame, SizeHint};
use starlight_converter::ObjectStore;
use starlight_converter::content::read_content;
use starlight_converter::store::AnyStore;
use starlight_format::bundle::{
    MAX_BATCH, MAX_BATCH_CONTENTS, MAX_PATCH_CONTENT, batch_prefix, chunk_prefix, encode_trailer, make_patch,
    patch_prefix,
};
use starlight_format::{ContentLocation, Digest, Hasher, blob_key};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tracing::{debug, warn};

use crate::body::BoxError;

mod verify;
pub use verify::{Bad, Corrupt, Report, Verify, content_stream};

/// Adjacent frames are read together up to this many bytes.
const READ_MAX: u64 = 2 << 20;
/// Steps in flight per bundle (reads matter for S3, whose every read is a round trip).
const STEPS_IN_FLIGHT: usize = 8;
/// Budget units: KiB.
const UNIT: u64 = 1024;
/// A patch or a batch is sent only if it is at most this fraction (in 1/16) of the stored frames.
const WORTH: u64 = 14;
/// Contents up to this size go in batches.
pub const BATCH_FILE_MAX: u64 = 256 << 10;
/// Stored frames read together when making a batch.
const BATCH_READ_MAX: u64 = 8 << 20;

/// One range read and the frames it carries: (content index, offset in the content, frame start
/// within the read, frame length).
#[derive(Debug)]
struct Read {
    key: String,
    offset: u64,
    len: u64,
    frames: Vec<(u64, u64, u64, u64)>,
}

/// A content that may go as a patch against `base`, else as its stored frames.
#[derive(Debug)]
struct PatchStep {
    index: u64,
    content: Digest,
    loc: ContentLocation,
    base: Digest,
    base_loc: ContentLocation,
    /// Size of the patch in the store once known (0: it does not pay, the frames go), and its key.
    stored: Option<u64>,
    key: String,
}

/// Consecutive small contents that may go as one batch, else as their stored frames.
#[derive(Debug)]
struct BatchStep {
    first: u64,
    items: Vec<(Digest, ContentLocation)>,
    size: u64,
    /// Size of the batch in the store once known (0: it does not pay, the frames go), and its key.
    stored: Option<u64>,
    key: String,
}

#[derive(Debug)]
enum Step {
    Read(Read),
    Patch(PatchStep),
    Batch(BatchStep),
}

impl Step {
    /// Bytes this step holds in memory until sent (a patch at most what it replaces).
    fn budget(&self) -> u64 {
        match self {
            Step::Read(r) => r.len,
            Step::Patch(p) => stored_len(&p.loc),
            Step::Batch(b) => b.items.iter().map(|(_, l)| stored_len(l)).sum(),
        }
    }
}

impl Step {
    /// The ranges this step reads, when nothing has to be made first.
    fn ranges(&self) -> Option<Vec<(String, u64, u64)>> {
        match self {
            Step::Read(r) => Some(vec![(r.key.clone(), r.offset, r.len)]),
            Step::Batch(BatchStep { stored, key, .. }) | Step::Patch(PatchStep { stored, key, .. }) => {
                match (*stored)? {
                    0 => Some(self.frame_ranges()),
                    n => Some(vec![(key.clone(), 0, n)]),
                }
            }
        }
    }

    /// The ranges of the stored frames this step's contents go as when not as one object.
    fn frame_ranges(&self) -> Vec<(String, u64, u64)> {
        match self {
            Step::Read(r) => vec![(r.key.clone(), r.offset, r.len)],
            Step::Batch(b) => frame_ranges(b.items.iter().map(|(_, l)| l)),
            Step::Patch(p) => frame_ranges(std::iter::once(&p.loc)),
        }
    }

    /// The records of this step from the data of its [`Step::ranges`], in order.
    fn pieces(&self, data: &mut impl Iterator<Item = Bytes>, metrics: &crate::layers::Metrics) -> Pieces {
        let object = match self {
            Step::Batch(BatchStep { stored: Some(n), .. })
            | Step::Patch(PatchStep { stored: Some(n), .. })
                if *n > 0 =>
            {
                data.next()
            }
            _ => None,
        };
        self.records(object, data, metrics)
    }

    /// The records of this step: as `object` (a batch or a patch) when there is one, else as the
    /// stored frames in `data` (the data of [`Step::frame_ranges`]).
    fn records(
        &self,
        object: Option<Bytes>,
        data: &mut dyn Iterator<Item = Bytes>,
        metrics: &crate::layers::Metrics,
    ) -> Pieces {
        let mut out = Vec::new();
        let mut chunks = |index: u64, loc: &ContentLocation, out: &mut Pieces| {
            for (at, f) in offsets(loc) {
                out.push(Bytes::from(chunk_prefix(index, at, f.clen as usize)));
                out.push(data.next().unwrap_or_default());
            }
        };
        match (self, object) {
            (Step::Read(r), _) => {
                let d = data.next().unwrap_or_default();
                for &(index, at, start, clen) in &r.frames {
                    out.push(Bytes::from(chunk_prefix(index, at, clen as usize)));
                    out.push(d.slice(start as usize..(start + clen) as usize));
                }
            }
            (Step::Batch(b), Some(d)) => {
                metrics.bundle_batches.inc();
                out.push(Bytes::from(batch_prefix(b.first, b.items.len() as u64, d.len())));
                out.push(d);
            }
            (Step::Batch(b), None) => {
                for (k, (_, l)) in b.items.iter().enumerate() {
                    chunks(b.first + k as u64, l, &mut out);
                }
            }
            (Step::Patch(p), Some(d)) => {
                metrics.bundle_patches.inc();
                out.push(Bytes::from(patch_prefix(p.index, &p.base, d.len())));
                out.push(d);
            }
            (Step::Patch(p), None) => chunks(p.index, &p.loc, &mut out),
        }
        out
    }
}

/// The ranges of the stored frames of `locs`, in order.
fn frame_ranges<'a>(locs: impl Iterator<Item = &'a ContentLocation>) -> Vec<(String, u64, u64)> {
    locs.flat_map(|l| {
        let key = blob_key(&l.blob);
        l.frames.iter().map(move |f| (key.clone(), f.offset, u64::from(f.clen)))
    })
    .collect()
}

/// Steps whose ranges are known are read together, up to this many bytes per store call.
const GROUP_MAX: u64 = 2 << 20;

/// Consecutive steps run as one unit: known ranges read in one store call, or one step that may
/// have to make its batch or patch first.
fn units(steps: &[Step]) -> Vec<std::ops::Range<usize>> {
    let mut out: Vec<std::ops::Range<usize>> = Vec::new();
    let mut bytes = 0;
    let mut open = false;
    for (i, s) in steps.iter().enumerate() {
        let known = s.ranges().is_some();
        let len = s.budget();
        match out.last_mut() {
            Some(u) if known && open && bytes + len <= GROUP_MAX => {
                u.end = i + 1;
                bytes += len;
            }
            _ => {
                out.push(i..i + 1);
                bytes = len;
                open = known;
            }
        }
    }
    out
}

async fn run_unit(store: &AnyStore, rc: &Recompressor, steps: &[Step]) -> Result<Pieces, BoxError> {
    let ranges: Option<Vec<Vec<(String, u64, u64)>>> = steps.iter().map(Step::ranges).collect();
    match ranges {
        Some(ranges) => {
            let all: Vec<(String, u64, u64)> = ranges.into_iter().flatten().collect();
            let data = store.get_ranges(all).await.inspect_err(|e| {
                warn!(error = %e, "bundle read failed; cutting the stream");
            })?;
            let mut data = data.into_iter();
            Ok(steps.iter().flat_map(|s| s.pieces(&mut data, &rc.metrics)).collect())
        }
        None => {
            // A batch or patch not known to exist: found or made first, else the frames go.
            let mut out = Vec::new();
            for s in steps {
                let object = match s {
                    Step::Read(_) => None,
                    Step::Batch(b) => batch_of(store, rc, b).await,
                    Step::Patch(p) => patch_of(store, rc, p).await,
                };
                let frames = if object.is_none() { s.frame_ranges() } else { Vec::new() };
                let data = store.get_ranges(frames).await.inspect_err(|e| {
                    warn!(error = %e, "bundle read failed; cutting the stream");
                })?;
                out.extend(s.records(object, &mut data.into_iter(), &rc.metrics));
            }
            Ok(out)
        }
    }
}

fn stored_len(loc: &ContentLocation) -> u64 {
    loc.frames.iter().map(|f| u64::from(f.clen)).sum()
}

/// A content to send and, when the worker holds an older version of it, that version.
#[derive(Debug)]
pub struct Send {
    pub content: Digest,
    pub loc: ContentLocation,
    pub base: Option<(Digest, ContentLocation)>,
}

/// Everything a bundle body needs before it starts: the header, the steps, the length (exact
/// unless patches may replace frames). Built once per distinct request (see the plan cache) and
/// shared by the bodies that send it.
#[derive(Debug)]
pub struct Plan {
    header: Bytes,
    steps: Vec<Step>,
    trailer: Bytes,
    total: Option<u64>,
    pub contents: u64,
    pub content_bytes: u64,
    /// Each content sent and where it is stored, by index (for verification).
    table: Vec<(Digest, ContentLocation)>,
}

impl Plan {
    /// The plan for sending `header`, then `contents` in this order, then the trailer.
    pub fn new(header: Vec<u8>, contents: Vec<Send>) -> Plan {
        let count = contents.len() as u64;
        let bytes: u64 = contents.iter().map(|c| c.loc.size).sum();
        let table = contents.iter().map(|c| (c.content, c.loc.clone())).collect();
        let (steps, chunks) = plan(contents);
        let trailer = Bytes::from(encode_trailer(count, bytes));
        let remade = steps.iter().any(|s| !matches!(s, Step::Read(_)));
        let total = (!remade).then(|| header.len() as u64 + chunks + trailer.len() as u64);
        let header = Bytes::from(header);
        Plan { header, steps, trailer, total, contents: count, content_bytes: bytes, table }
    }

    /// The exact body length, unless batches or patches not yet made make it unknown.
    pub fn len(&self) -> Option<u64> {
        self.total
    }

    /// Looks up the batches and patches the store already holds (made at `level`), so that the
    /// exact length is known and the body reads them without asking again.
    pub async fn resolve(&mut self, store: &AnyStore, level: i32) {
        for step in &mut self.steps {
            match step {
                Step::Read(_) => {}
                Step::Batch(b) => b.key = batch_key(level, &b.items),
                Step::Patch(p) => p.key = patch_key(&p.base, &p.content),
            }
        }
        let keys: Vec<Option<String>> = self
            .steps
            .iter()
            .map(|s| match s {
                Step::Read(_) => None,
                Step::Batch(b) => Some(b.key.clone()),
                Step::Patch(p) => Some(p.key.clone()),
            })
            .collect();
        let sizes: Vec<Option<u64>> = futures::stream::iter(keys)
            .map(|k| async move {
                match k {
                    Some(k) => store.size(&k).await.ok().flatten(),
                    None => None,
                }
            })
            .buffered(16)
            .collect()
            .await;
        let mut total = (self.header.len() + self.trailer.len()) as u64;
        let mut known = true;
        for (step, size) in self.steps.iter_mut().zip(sizes) {
            match step {
                Step::Read(r) => {
                    total += r.frames.iter().map(|&(i, at, _, clen)| chunk_len(i, at, clen)).sum::<u64>();
                }
                Step::Batch(b) => {
                    b.stored = size;
                    total += match size {
                        Some(0) => b
                            .items
                            .iter()
                            .enumerate()
                            .map(|(k, (_, l))| frames_len(b.first + k as u64, l))
                            .sum(),
                        Some(n) => batch_prefix(b.first, b.items.len() as u64, n as usize).len() as u64 + n,
                        None => {
                            known = false;
                            0
                        }
                    };
                }
                Step::Patch(p) => {
                    p.stored = size;
                    total += match size {
                        Some(0) => frames_len(p.index, &p.loc),
                        Some(n) => patch_prefix(p.index, &p.base, n as usize).len() as u64 + n,
                        None => {
                            known = false;
                            0
                        }
                    };
                }
            }
        }
        self.total = known.then_some(total);
    }
}

/// Length of one chunk record.
fn chunk_len(index: u64, at: u64, clen: u64) -> u64 {
    chunk_prefix(index, at, clen as usize).len() as u64 + clen
}

/// Length of a content's chunk records.
fn frames_len(index: u64, loc: &ContentLocation) -> u64 {
    offsets(loc).map(|(at, f)| chunk_len(index, at, u64::from(f.clen))).sum()
}

/// Plans the steps for `contents` (in stream order) and the length of their chunk records if all
/// went as stored frames.
fn plan(contents: Vec<Send>) -> (Vec<Step>, u64) {
    let mut steps: Vec<Step> = Vec::new();
    let mut body = 0u64;
    for (i, c) in contents.into_iter().enumerate() {
        let i = i as u64;
        for (at, f) in offsets(&c.loc) {
            body += chunk_prefix(i, at, f.clen as usize).len() as u64 + u64::from(f.clen);
        }
        if let Some((base, base_loc)) = c.base
            && c.loc.size <= MAX_PATCH_CONTENT
            && base_loc.size <= MAX_PATCH_CONTENT
        {
            steps.push(Step::Patch(PatchStep {
                index: i,
                content: c.content,
                loc: c.loc,
                base,
                base_loc,
                stored: None,
                key: String::new(),
            }));
            continue;
        }
        if c.loc.size <= BATCH_FILE_MAX {
            let joins = matches!(steps.last(), Some(Step::Batch(b))
                if b.size + c.loc.size <= MAX_BATCH && (b.items.len() as u64) < MAX_BATCH_CONTENTS);
            if !joins {
                steps.push(Step::Batch(BatchStep {
                    first: i,
                    items: Vec::new(),
                    size: 0,
                    stored: None,
                    key: String::new(),
                }));
            }
            let Some(Step::Batch(b)) = steps.last_mut() else { unreachable!() };
            b.size += c.loc.size;
            b.items.push((c.content, c.loc));
            continue;
        }
        let key = blob_key(&c.loc.blob);
        for (at, f) in offsets(&c.loc) {
            let clen = u64::from(f.clen);
            let joins = matches!(steps.last(), Some(Step::Read(r))
                if r.key == key && r.offset + r.len == f.offset && r.len + clen <= READ_MAX);
            if !joins {
                steps.push(Step::Read(Read {
                    key: key.clone(),
                    offset: f.offset,
                    len: 0,
                    frames: Vec::new(),
                }));
            }
            let Some(Step::Read(r)) = steps.last_mut() else { unreachable!() };
            r.frames.push((i, at, r.len, clen));
            r.len += clen;
        }
    }
    (steps, body)
}

/// Each frame of a content with its offset in the content.
fn offsets(loc: &ContentLocation) -> impl Iterator<Item = (u64, starlight_format::Frame)> + '_ {
    loc.frames.iter().scan(0u64, |at, f| {
        let here = *at;
        *at += u64::from(f.ulen);
        Some((here, *f))
    })
}

/// Object-store key of the patch from `base` to `content` (empty when a patch does not pay).
pub fn patch_key(base: &Digest, content: &Digest) -> String {
    format!("patches/sha256/{}/{}", base.hex(), content.hex())
}

/// Object-store key of the batch of `items` made at `level` (empty when a batch does not pay).
pub fn batch_key(level: i32, items: &[(Digest, ContentLocation)]) -> String {
    let mut h = Hasher::new();
    h.update(&level.to_le_bytes());
    for (d, _) in items {
        h.update(&d.0);
    }
    format!("batches/sha256/{}", h.finish().hex())
}

/// A batch or patch still being made after this long is given up (its slot freed); its bundles
/// send the stored frames instead.
const MAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(300);

type Making = futures::future::Shared<futures::future::BoxFuture<'static, Option<Bytes>>>;

/// How batches and patches are made: the zstd level, how many may be made at once (each holds
/// up to two contents of 32 MiB, or a batch of 4 MiB), and those being made, so that bundles
/// asking for the same one at once wait for one making.
#[derive(Clone, Debug)]
pub struct Recompressor {
    pub level: i32,
    pub slots: Arc<Semaphore>,
    pub metrics: Arc<crate::layers::Metrics>,
    pub making: Arc<std::sync::Mutex<std::collections::HashMap<String, Making>>>,
}

impl Recompressor {
    pub fn new(level: i32, workers: usize, metrics: Arc<crate::layers::Metrics>) -> Recompressor {
        Recompressor {
            level,
            slots: Arc::new(Semaphore::new(workers.max(1))),
            metrics,
            making: Arc::default(),
        }
    }

    /// Runs `make` for `key`, or waits for the run already under way.
    async fn once(
        &self,
        key: &str,
        make: futures::future::BoxFuture<'static, Option<Bytes>>,
    ) -> Option<Bytes> {
        use futures::FutureExt;
        let flight = {
            let Ok(mut m) = self.making.lock() else { return None };
            match m.get(key) {
                Some(f) => f.clone(),
                None => {
                    let (making, k) = (self.making.clone(), key.to_string());
                    // The making runs in its own task, holding its slot: it finishes (or times out)
                    // and frees the slot whether or not anyone still waits for it. A future that ran
                    // only while awaited would keep the slot when its last waiter left, and stall
                    // every bundle that needs another batch or patch.
                    let task = tokio::spawn(async move {
                        let r = match tokio::time::timeout(MAKE_TIMEOUT, make).await {
                            Ok(r) => r,
                            Err(_) => {
                                warn!(key = %k, timeout = ?MAKE_TIMEOUT, "making took too long; sending frames");
                                None
                            }
                        };
                        // The lock is held while the task is spawned and registered, so this
                        // removal always follows the insertion.
                        if let Ok(mut m) = making.lock() {
                            m.remove(&k);
                        }
                        r
                    });
                    let f = async move { task.await.ok().flatten() }.boxed().shared();
                    m.insert(key.to_string(), f.clone());
                    f
                }
            }
        };
        flight.await
    }
}

/// A batch or patch in the store: `Some(Some(bytes))` found, `Some(None)` known not to pay (or
/// not to be looked up: send the frames), `None` not made yet.
async fn stored_object(store: &AnyStore, key: &str, known: Option<u64>, max: u64) -> Option<Option<Bytes>> {
    let size = match known {
        Some(n) => Ok(Some(n)),
        None => store.size(key).await,
    };
    match size {
        Ok(Some(0)) => Some(None),
        Ok(Some(_)) => match store.get(key, max).await {
            Ok(b) => Some(Some(b)),
            Err(e) => {
                warn!(%key, error = %e, "stored object unreadable; making it again");
                None
            }
        },
        Ok(None) => None,
        Err(e) => {
            warn!(%key, error = %e, "lookup failed; sending frames");
            Some(None)
        }
    }
}

/// What one step sends.
type Pieces = Vec<Bytes>;

/// The patch for `p`: from the store if made before, else made now (and kept). `None` when a
/// patch does not pay or cannot be made; the content then goes as its frames.
async fn patch_of(store: &AnyStore, rc: &Recompressor, p: &PatchStep) -> Option<Bytes> {
    let key = patch_key(&p.base, &p.content);
    const MAX: u64 = MAX_PATCH_CONTENT + (1 << 20);
    if let Some(found) = stored_object(store, &key, p.stored, MAX).await {
        return found;
    }
    let (store, slots, level, k) = (store.clone(), rc.slots.clone(), rc.level, key.clone());
    let (base, base_loc, content, loc) = (p.base, p.base_loc.clone(), p.content, p.loc.clone());
    let make = async move {
        // Made meanwhile by another bundle, or another gateway?
        if let Some(found) = stored_object(&store, &k, None, MAX).await {
            return found;
        }
        let _slot = slots.acquire().await.ok()?;
        let old = read_content(&store, &base, &base_loc).await;
        let new = read_content(&store, &content, &loc).await;
        let (old, new) = match (old, new) {
            (Ok(b), Ok(n)) => (b, n),
            (Err(e), _) | (_, Err(e)) => {
                warn!(key = %k, error = %e, "cannot read the contents to patch; sending frames");
                return None;
            }
        };
        let patch = match tokio::task::spawn_blocking(move || make_patch(&old, &new, level)).await.ok()? {
            Ok(p) => p,
            Err(e) => {
                warn!(key = %k, error = %e, "patch failed; sending frames");
                return None;
            }
        };
        let worth = (patch.len() as u64) * 16 <= stored_len(&loc) * WORTH;
        debug!(key = %k, patch = patch.len(), stored = stored_len(&loc), worth, "patch made");
        let keep = if worth { Bytes::from(patch) } else { Bytes::new() };
        if let Err(e) = store.put_bytes(&k, keep.clone()).await {
            warn!(key = %k, error = %e, "patch not kept");
        }
        worth.then_some(keep)
    };
    rc.once(&key, Box::pin(make)).await
}

/// The contents of a batch, read with coalesced range reads and verified.
async fn batch_contents(store: &AnyStore, items: &[(Digest, ContentLocation)]) -> Result<Vec<u8>, BoxError> {
    // Every frame, by blob and offset; adjacent ones are read together.
    let mut frames: Vec<(Digest, u64, u32)> =
        items.iter().flat_map(|(_, l)| l.frames.iter().map(|f| (l.blob, f.offset, f.clen))).collect();
    frames.sort();
    frames.dedup();
    let mut data: std::collections::HashMap<(Digest, u64), Bytes> = std::collections::HashMap::new();
    let mut i = 0;
    while i < frames.len() {
        let (blob, start, _) = frames[i];
        let mut j = i;
        let mut end = start;
        while j < frames.len()
            && frames[j].0 == blob
            && frames[j].1 == end
            && end - start + u64::from(frames[j].2) <= BATCH_READ_MAX.max(u64::from(frames[i].2))
        {
            end += u64::from(frames[j].2);
            j += 1;
        }
        let range = store.get_range(&blob_key(&blob), start, end - start).await?;
        for &(b, off, clen) in &frames[i..j] {
            data.insert(
                (b, off),
                range.slice((off - start) as usize..(off - start) as usize + clen as usize),
            );
        }
        i = j;
    }
    let total: u64 = items.iter().map(|(_, l)| l.size).sum();
    let mut out = Vec::with_capacity(total as usize);
    for (d, l) in items {
        let mut h = Hasher::new();
        let at = out.len();
        for f in &l.frames {
            let frame = data.get(&(l.blob, f.offset)).ok_or("a batch frame went missing")?;
            let plain = zstd::bulk::decompress(frame, f.ulen as usize)?;
            out.extend_from_slice(&plain);
        }
        h.update(&out[at..]);
        if h.finish() != *d || (out.len() - at) as u64 != l.size {
            return Err(format!("stored content {d} does not match its digest").into());
        }
    }
    Ok(out)
}

/// The batch for `b`: from the store if made before, else made now (and kept). `None` when a
/// batch does not pay or cannot be made.
async fn batch_of(store: &AnyStore, rc: &Recompressor, b: &BatchStep) -> Option<Bytes> {
    let key = batch_key(rc.level, &b.items);
    const MAX: u64 = MAX_BATCH + (1 << 20);
    if let Some(found) = stored_object(store, &key, b.stored, MAX).await {
        return found;
    }
    let (store, slots, level, k, items) =
        (store.clone(), rc.slots.clone(), rc.level, key.clone(), b.items.clone());
    let make = async move {
        if let Some(found) = stored_object(&store, &k, None, MAX).await {
            return found;
        }
        let _slot = slots.acquire().await.ok()?;
        let plain = match batch_contents(&store, &items).await {
            Ok(p) => p,
            Err(e) => {
                warn!(key = %k, error = %e, "cannot read the contents to batch; sending frames");
                return None;
            }
        };
        let frame =
            tokio::task::spawn_blocking(move || zstd::bulk::compress(&plain, level)).await.ok()?.ok()?;
        let stored: u64 = items.iter().map(|(_, l)| stored_len(l)).sum();
        let worth = (frame.len() as u64) * 16 <= stored * WORTH;
        debug!(key = %k, batch = frame.len(), stored, contents = items.len(), worth, "batch made");
        let keep = if worth { Bytes::from(frame) } else { Bytes::new() };
        if let Err(e) = store.put_bytes(&k, keep.clone()).await {
            warn!(key = %k, error = %e, "batch not kept");
        }
        worth.then_some(keep)
    };
    rc.once(&key, Box::pin(make)).await
}

/// Bytes read ahead for all bundles together (KiB permits), and for all bundles of one client: a
/// client (by IP address) holds at most its share, so a few clients that read nothing cannot take
/// the whole budget from the others.
#[derive(Clone, Debug)]
pub struct SharedBudget {
    pub semaphore: Arc<Semaphore>,
    per_client: u32,
    clients: Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, std::sync::Weak<Semaphore>>>>,
    /// This client's budget (see [`SharedBudget::for_client`]).
    client: Option<Arc<Semaphore>>,
}

impl SharedBudget {
    /// `bytes` for all bundles, `per_client` of them for the bundles of one client.
    pub fn new(bytes: u64, per_client: u64) -> SharedBudget {
        let units = (bytes / UNIT).clamp(1, u64::from(u32::MAX >> 3)) as u32;
        let per_client = (per_client / UNIT).clamp(1, u64::from(units)) as u32;
        SharedBudget {
            semaphore: Arc::new(Semaphore::new(units as usize)),
            per_client,
            clients: Arc::default(),
            client: None,
        }
    }

    /// The budget as seen by the bundles of the client at `ip` (none known: the shared one only).
    pub fn for_client(&self, ip: Option<std::net::IpAddr>) -> SharedBudget {
        let client = ip.and_then(|ip| {
            let mut clients = self.clients.lock().ok()?;
            if let Some(c) = clients.get(&ip).and_then(std::sync::Weak::upgrade) {
                return Some(c);
            }
            // Clients without a bundle in flight hold nothing; forget them now and then.
            if clients.len() >= 1024 {
                clients.retain(|_, c| c.strong_count() > 0);
            }
            let c = Arc::new(Semaphore::new(self.per_client as usize));
            clients.insert(ip, Arc::downgrade(&c));
            Some(c)
        });
        SharedBudget { client, ..self.clone() }
    }
}

/// Budget a unit holds until its last bytes leave: the bundle's, its client's, the gateway's.
type Permits = (OwnedSemaphorePermit, Option<OwnedSemaphorePermit>, OwnedSemaphorePermit);

/// A piece of the body; the last one of a unit carries the unit's budget permits, the trailer
/// says the stream is complete.
enum Piece {
    Bytes(Bytes, Option<Permits>),
    Trailer(Bytes),
    Failed(BoxError),
}

/// When a bundle whose client takes none of it is cut, and where that is counted.
#[derive(Clone, Debug)]
pub struct Stall {
    /// The body not polled this long while it has bytes ready: the bundle stops.
    pub after: Duration,
    pub metrics: Arc<crate::layers::Metrics>,
}

/// What a bundle body and its producer share.
#[derive(Debug)]
struct Shared {
    /// Taken (and dropped, with the budget its pieces hold) by the producer when it cuts the bundle.
    rx: std::sync::Mutex<Option<mpsc::Receiver<Piece>>>,
    start: Instant,
    /// Milliseconds since `start` at which the body was last polled.
    polled: AtomicU64,
}

impl Shared {
    fn now(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    /// Resolves with `true` once the body had pieces ready and was not polled for `after`; with
    /// `false` once the body is gone, or (when the producer is `done`) once it took every piece.
    /// Measured per bundle, not per connection: an HTTP/2 stream without flow-control window is
    /// not polled while the other streams of its connection progress.
    async fn stalled(&self, tx: &mpsc::Sender<Piece>, after: Duration, done: bool) -> bool {
        let tick = (after / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
        let after = after.as_millis() as u64;
        let mut since = None;
        loop {
            if tx.is_closed() {
                return false;
            }
            if tx.capacity() < tx.max_capacity() {
                let now = self.now();
                let ready = *since.get_or_insert(now);
                if now.saturating_sub(ready.max(self.polled.load(Ordering::Relaxed))) >= after {
                    return true;
                }
            } else if done {
                return false;
            } else {
                since = None;
            }
            tokio::time::sleep(tick).await;
        }
    }
}

/// A bundle response body.
#[derive(Debug)]
pub struct BundleBody {
    shared: Arc<Shared>,
    stall: Duration,
    remaining: Option<u64>,
    complete: bool,
}

impl std::fmt::Debug for Piece {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Piece")
    }
}

impl BundleBody {
    /// Starts streaming `plan`. At most `read_ahead` bytes are read from the store ahead of what
    /// the client took.
    pub fn start(
        plan: Arc<Plan>,
        store: AnyStore,
        recompressor: Recompressor,
        read_ahead: u64,
        shared: SharedBudget,
        verify: Verify,
        stall: Stall,
    ) -> Self {
        let (tx, rx) = mpsc::channel::<Piece>(64);
        let state = Arc::new(Shared {
            rx: std::sync::Mutex::new(Some(rx)),
            start: Instant::now(),
            polled: AtomicU64::new(0),
        });
        let (watch, after) = (state.clone(), stall.after);
        let budget_units = (read_ahead / UNIT).clamp(1, u64::from(shared.per_client)) as u32;
        let budget = Arc::new(Semaphore::new(budget_units as usize));
        let remaining = plan.total;
        tokio::spawn(async move {
            let produce = async {
                if tx.send(Piece::Bytes(plan.header.clone(), None)).await.is_err() {
                    return;
                }
                // Permits are taken in order before a unit starts, so a later unit never holds budget
                // an earlier one waits for.
                let units = units(&plan.steps);
                let mut sent = units.clone().into_iter();
                let mut results = std::pin::pin!(
                    futures::stream::iter(units)
                        .then(|u| {
                            let (budget, client, shared) =
                                (budget.clone(), shared.client.clone(), shared.semaphore.clone());
                            let len: u64 = plan.steps[u.clone()].iter().map(Step::budget).sum();
                            async move {
                                let units = (len.div_ceil(UNIT) as u32).clamp(1, budget_units);
                                // This bundle's budget first, then its client's, then the gateway's: a
                                // bundle waiting for a wider budget holds only what its client has yet
                                // to take.
                                let permits = async {
                                    let mine = budget.acquire_many_owned(units).await?;
                                    let theirs = match client {
                                        Some(c) => Some(c.acquire_many_owned(units).await?),
                                        None => None,
                                    };
                                    let ours = shared.acquire_many_owned(units).await?;
                                    Ok::<Permits, tokio::sync::AcquireError>((mine, theirs, ours))
                                };
                                (u, permits.await)
                            }
                        })
                        .map(|(u, permit)| {
                            let (store, plan, recompressor) =
                                (store.clone(), plan.clone(), recompressor.clone());
                            async move { (run_unit(&store, &recompressor, &plan.steps[u]).await, permit) }
                        })
                        .buffered(STEPS_IN_FLIGHT)
                );
                let mut check = verify::Check::new();
                while let Some((out, permit)) = results.next().await {
                    let u = sent.next().unwrap_or_default();
                    let (pieces, permit) = match (out, permit) {
                        (Ok(p), Ok(permit)) => (p, permit),
                        (Err(e), _) => {
                            if let Some(c) = verify::missing(&e) {
                                (verify.report)(c).await;
                            }
                            let _ = tx.send(Piece::Failed(e)).await;
                            return;
                        }
                        (_, Err(e)) => {
                            let _ = tx.send(Piece::Failed(Box::new(e))).await;
                            return;
                        }
                    };
                    let pieces = match verify.enabled {
                        true => match check.unit(&store, &plan, u, pieces).await {
                            Ok(p) => p,
                            Err(c) => {
                                (verify.report)(c.clone()).await;
                                let _ = tx.send(Piece::Failed(Box::new(c))).await;
                                return;
                            }
                        },
                        false => pieces,
                    };
                    let mut permit = Some(permit);
                    let last = pieces.len().saturating_sub(1);
                    for (k, b) in pieces.into_iter().enumerate() {
                        let p = if k == last { permit.take() } else { None };
                        if tx.send(Piece::Bytes(b, p)).await.is_err() {
                            return;
                        }
                    }
                }
                let _ = tx.send(Piece::Trailer(plan.trailer.clone())).await;
            };
            // The producer stops when its client takes nothing of it: dropping the receiver drops
            // the pieces waiting in it, and the budget they hold comes back at once.
            let cut = tokio::select! {
                () = produce => watch.stalled(&tx, stall.after, true).await,
                cut = watch.stalled(&tx, stall.after, false) => cut,
            };
            if cut {
                drop(watch.rx.lock().map(|mut rx| rx.take()));
                stall.metrics.conn.timed_out("bundle_stall");
                debug!(timeout = ?stall.after, "bundle cut: its client took none of it");
            }
        });
        BundleBody { shared: state, stall: after, remaining, complete: false }
    }
}

impl Drop for BundleBody {
    /// The receiver goes with the body (not with the producer's handle on it): the producer sees
    /// its client gone at once, and the pieces waiting return their budget.
    fn drop(&mut self) {
        if let Ok(mut rx) = self.shared.rx.lock() {
            rx.take();
        }
    }
}

impl http_body::Body for BundleBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.complete {
            return Poll::Ready(None);
        }
        let shared = self.shared.clone();
        shared.polled.store(shared.now(), Ordering::Relaxed);
        let polled = match shared.rx.lock() {
            Ok(mut rx) => rx.as_mut().map(|rx| rx.poll_recv(cx)),
            Err(_) => None,
        };
        let Some(polled) = polled else {
            self.complete = true;
            let e = format!("bundle cut: its client took none of it for {:?}", self.stall);
            return Poll::Ready(Some(Err(e.into())));
        };
        match polled {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => Poll::Ready(Some(Err("the bundle producer stopped early".into()))),
            Poll::Ready(Some(Piece::Failed(e))) => Poll::Ready(Some(Err(e))),
            Poll::Ready(Some(Piece::Trailer(b))) => {
                self.complete = true;
                self.remaining = Some(0);
                Poll::Ready(Some(Ok(Frame::data(b))))
            }
            // The permit goes when the bytes leave: the budget counts what waits here, not in hyper.
            Poll::Ready(Some(Piece::Bytes(b, _permit))) => {
                if let Some(r) = self.remaining.as_mut() {
                    *r = r.saturating_sub(b.len() as u64);
                }
                Poll::Ready(Some(Ok(Frame::data(b))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.complete
    }

    fn size_hint(&self) -> SizeHint {
        match self.remaining {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use starlight_format::Frame as ZFrame;

    fn loc(blob: u8, frames: &[(u64, u32)]) -> Send {
        let frames: Vec<ZFrame> =
            frames.iter().map(|&(offset, clen)| ZFrame { offset, clen, ulen: 100 }).collect();
        // Large enough not to be batched.
        let frames: Vec<ZFrame> = frames.into_iter().map(|f| ZFrame { ulen: 1 << 20, ..f }).collect();
        let loc =
            ContentLocation { blob: Digest::of(&[blob]), size: (1 << 20) * frames.len() as u64, frames };
        Send { content: Digest::of(&[blob, 0]), loc, base: None }
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
        let (steps, _) = plan(contents);
        let reads: Vec<&Read> =
            steps.iter().map(|s| if let Step::Read(r) = s { r } else { panic!("no patches here") }).collect();
        let shape: Vec<(u64, u64, usize)> = reads.iter().map(|r| (r.offset, r.len, r.frames.len())).collect();
        assert_eq!(shape, vec![(0, 35, 3), (100, 5, 1), (105, 5, 1), (110, READ_MAX, 1)]);
        assert_eq!(reads[0].frames[1], (0, 1 << 20, 10, 20));
        assert_eq!(reads[0].frames[2], (1, 0, 30, 5));
    }

    #[test]
    fn a_content_with_a_base_is_its_own_step_and_makes_the_length_open() {
        let mut with_base = loc(1, &[(35, 5)]);
        with_base.base = Some((Digest::of(b"old"), loc(3, &[(0, 9)]).loc));
        let contents = vec![loc(1, &[(0, 35)]), with_base, loc(1, &[(40, 5)])];
        let (steps, _) = plan(contents);
        let kinds: Vec<&str> =
            steps.iter().map(|s| if matches!(s, Step::Read(_)) { "read" } else { "patch" }).collect();
        assert_eq!(kinds, ["read", "patch", "read"]);
        let plan = Plan::new(vec![0; 10], vec![loc(1, &[(0, 35)])]);
        assert!(plan.len().is_some());
        let mut with_base = loc(1, &[(35, 5)]);
        with_base.base = Some((Digest::of(b"old"), loc(3, &[(0, 9)]).loc));
        assert_eq!(Plan::new(vec![0; 10], vec![with_base]).len(), None);
    }

    #[test]
    fn small_contents_are_batched_up_to_the_limit() {
        let small = |n: u8, size: u64| {
            let loc = ContentLocation {
                blob: Digest::of(b"b"),
                size,
                frames: vec![ZFrame { offset: u64::from(n) * 100, clen: 100, ulen: size as u32 }],
            };
            Send { content: Digest::of(&[n]), loc, base: None }
        };
        let mut contents: Vec<Send> = (0..20).map(|n| small(n, 200 << 10)).collect();
        contents.insert(5, loc(9, &[(0, 10)]));
        let (steps, _) = plan(contents);
        let shape: Vec<String> = steps
            .iter()
            .map(|s| match s {
                Step::Batch(b) => format!("batch {}+{}", b.first, b.items.len()),
                Step::Read(_) => "read".into(),
                Step::Patch(_) => "patch".into(),
            })
            .collect();
        // 200 KiB each: 20 fit in 4 MiB; the large content in between splits the run.
        assert_eq!(shape, ["batch 0+5", "read", "batch 6+15"]);
    }
}
