//! Pulling an image: one bundle request, its stream verified and written into the store.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use starlight_format::Digest;
use starlight_format::bundle::{BundleError, Decoder, Event, Header, apply_patch};

use crate::client::{BundleInfo, ClientError, Gateway};
use crate::store::{Reference, Store, StoreError};

/// The most `have` images one request carries (the gateway's limit).
const MAX_HAVE: usize = 32;

/// Why a pull failed. Nothing unverified is ever stored.
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("bundle of {image} from {gateway}: {source}")]
    Bundle {
        image: String,
        gateway: String,
        #[source]
        source: BundleError,
    },
    #[error("bundle of {image} from {gateway}: reading the stream after {bytes} bytes: {why}")]
    Stream { image: String, gateway: String, bytes: u64, why: String },
    #[error("writing content {digest} into the store: {source}")]
    Write {
        digest: String,
        #[source]
        source: std::io::Error,
    },
    #[error("content {digest}: {why}")]
    Content { digest: Digest, why: String },
}

/// Counters of one pull.
#[derive(Clone, Debug, Default)]
pub struct Stats {
    /// Bytes of the bundle received.
    pub wire_bytes: u64,
    /// Bundle length, when the gateway knew it.
    pub wire_total: Option<u64>,
    /// Contents written, and their bytes.
    pub contents: u64,
    pub content_bytes: u64,
    /// What the bundle carries in all.
    pub contents_total: Option<u64>,
    pub content_bytes_total: Option<u64>,
    /// Contents that came as patches against an older version in the store.
    pub patched: u64,
    /// Contents the store already held, so not asked for.
    pub held: u64,
}

/// Told what a pull does as it happens (a progress display, the FUSE filesystem).
pub trait Observer: Send + Sync {
    /// The header arrived: every file is known from now on.
    fn header(&self, _header: &Arc<Header>) {}
    /// Content `digest` is in the store, at `path`.
    fn content(&self, _digest: &Digest, _path: &Path) {}
    fn progress(&self, _stats: &Stats) {}
}

/// An observer that observes nothing.
#[derive(Debug)]
pub struct Quiet;
impl Observer for Quiet {}

/// How a pull went.
#[derive(Clone, Debug)]
pub struct Report {
    pub digest: Digest,
    pub stats: Stats,
    /// The store had the image whole already: nothing was asked.
    pub up_to_date: bool,
    pub elapsed: std::time::Duration,
}

/// Options of a pull.
#[derive(Clone, Debug, Default)]
pub struct PullOptions {
    /// `os/arch[/variant]`; the gateway's own platform when unset.
    pub platform: Option<String>,
}

/// Decodes a bundle stream into the store: contents go to temporary files as they arrive and get
/// their final names once verified.
pub struct Applier<'a> {
    store: &'a Store,
    observer: &'a dyn Observer,
    dec: Decoder,
    header: Option<Arc<Header>>,
    open: HashMap<u64, (File, PathBuf)>,
    pub stats: Stats,
}

impl std::fmt::Debug for Applier<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Applier").field("stats", &self.stats).finish()
    }
}

impl Drop for Applier<'_> {
    fn drop(&mut self) {
        for (_, (_, p)) in self.open.drain() {
            let _ = std::fs::remove_file(p);
        }
    }
}

impl<'a> Applier<'a> {
    pub fn new(store: &'a Store, observer: &'a dyn Observer) -> Applier<'a> {
        Applier {
            store,
            observer,
            dec: Decoder::new(),
            header: None,
            open: HashMap::new(),
            stats: Stats::default(),
        }
    }

    pub fn header(&self) -> Option<&Arc<Header>> {
        self.header.as_ref()
    }

    /// Decodes `data` and writes what it completes. `on_header` runs once, before any content.
    pub fn feed(
        &mut self,
        data: &[u8],
        on_header: &mut dyn FnMut(&Header) -> Result<(), PullError>,
    ) -> Result<(), BundleOrPull> {
        self.stats.wire_bytes += data.len() as u64;
        let mut events = self.dec.feed(data).map_err(BundleOrPull::Bundle)?;
        let mut i = 0;
        while i < events.len() {
            let ev = std::mem::replace(&mut events[i], Event::End);
            i += 1;
            match ev {
                Event::Header(h) => {
                    on_header(&h).map_err(BundleOrPull::Pull)?;
                    let h = Arc::new(*h);
                    self.observer.header(&h);
                    self.header = Some(h);
                }
                Event::Chunk { index, data, .. } => {
                    let (f, _) = match self.open.entry(index) {
                        std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
                        std::collections::hash_map::Entry::Vacant(v) => {
                            v.insert(self.store.temp_file().map_err(|e| BundleOrPull::Pull(e.into()))?)
                        }
                    };
                    f.write_all(&data).map_err(|source| {
                        BundleOrPull::Pull(PullError::Write { digest: format!("#{index}"), source })
                    })?;
                    self.dec.recycle(data);
                }
                Event::ContentDone { index, digest } => {
                    let (f, tmp) = match self.open.remove(&index) {
                        Some(x) => x,
                        // A content whose bytes came whole through `patched`.
                        None => continue,
                    };
                    drop(f);
                    let path = self.store.commit(&tmp, &digest).map_err(|e| BundleOrPull::Pull(e.into()))?;
                    let size = self
                        .header
                        .as_ref()
                        .and_then(|h| h.contents.get(index as usize))
                        .map_or(0, |c| c.size);
                    self.done(&digest, &path, size);
                }
                Event::Patch { index, base, size, frame } => {
                    let bp = self.store.content_path(&base);
                    let old = std::fs::read(&bp).map_err(|e| {
                        BundleOrPull::Pull(PullError::Content {
                            digest: base,
                            why: format!("the base of a patch is not readable in the store: {e}"),
                        })
                    })?;
                    let new = apply_patch(&old, &frame, size)
                        .map_err(|why| BundleOrPull::Bundle(BundleError::Patch { index, why }))?;
                    let ev = self.dec.patched(index, &new).map_err(BundleOrPull::Bundle)?;
                    let Event::ContentDone { digest, .. } = ev else {
                        unreachable!("patched yields ContentDone")
                    };
                    let path = self.store.put(&digest, &new).map_err(|e| BundleOrPull::Pull(e.into()))?;
                    self.stats.patched += 1;
                    self.done(&digest, &path, new.len() as u64);
                }
                Event::End => {}
            }
        }
        self.observer.progress(&self.stats);
        Ok(())
    }

    fn done(&mut self, digest: &Digest, path: &Path, size: u64) {
        self.stats.contents += 1;
        self.stats.content_bytes += size;
        self.observer.content(digest, path);
    }

    /// The stream ended: the header, if the bundle was whole.
    pub fn finish(&mut self) -> Result<Arc<Header>, BundleError> {
        self.dec.finish()?;
        Ok(self.header.clone().expect("a finished bundle has a header"))
    }
}

/// A failure inside the stream (the bundle's fault) or outside it (the worker's).
#[derive(Debug)]
pub enum BundleOrPull {
    Bundle(BundleError),
    Pull(PullError),
}

/// The `have` list for a pull of `r`: whole images in the store, the same repository's first.
pub fn have_list(store: &Store, r: &Reference) -> Result<Vec<String>, StoreError> {
    let mut imgs = store.images()?;
    imgs.sort_by_key(|m| m.name != r.name);
    Ok(imgs
        .into_iter()
        .filter(|m| m.digest != r.reference)
        .take(MAX_HAVE)
        .map(|m| if m.name == r.name { m.digest } else { format!("{}@{}", m.name, m.digest) })
        .collect())
}

/// Pulls `r` into the store through the gateway. A pull cut short and run again asks only for
/// what is missing.
pub async fn pull(
    store: &Store,
    gw: &Gateway,
    r: &Reference,
    opts: &PullOptions,
    observer: &dyn Observer,
) -> Result<Report, PullError> {
    let started = Instant::now();
    let _lock = store.lock_shared()?;
    if let Some(d) = r.digest()
        && store.image(&d)?.is_some()
    {
        let h = Arc::new(store.header(&d)?);
        observer.header(&h);
        return Ok(Report {
            digest: d,
            stats: Stats::default(),
            up_to_date: true,
            elapsed: started.elapsed(),
        });
    }
    let have = have_list(store, r)?;
    // Contents of an earlier, unfinished pull of the same image.
    let held: Vec<Digest> = match store.partial(r)? {
        Some(h) => crate::store::image_contents(&h)
            .into_iter()
            .filter(|(d, size)| store.has(d, *size))
            .map(|(d, _)| d)
            .collect(),
        None => vec![],
    };
    let (resp, info) = gw.bundle(r, &have, &held, opts.platform.as_deref()).await?;
    let BundleInfo { contents, content_bytes, length, .. } = info;
    let mut applier = Applier::new(store, observer);
    applier.stats.held = held.len() as u64;
    applier.stats.wire_total = length;
    applier.stats.contents_total = contents;
    applier.stats.content_bytes_total = content_bytes;
    let image = r.to_string();
    let bundle_err =
        |source| PullError::Bundle { image: image.clone(), gateway: gw.base().to_string(), source };
    let mut on_header = |h: &Header| -> Result<(), PullError> { Ok(store.save_partial(r, h)?) };
    // The network is read on its own task, so that receiving overlaps decoding and writing
    // (on a multi-threaded runtime); a bounded channel keeps what waits in between small.
    let (tx, mut rx) = tokio::sync::mpsc::channel(8);
    let stall = gw.stall_timeout();
    let reader = tokio::spawn(async move {
        let mut stream = resp.bytes_stream();
        while let Some(chunk) = crate::client::next_chunk(&mut stream, stall).await {
            let failed = chunk.is_err();
            if tx.send(chunk).await.is_err() || failed {
                break;
            }
        }
    });
    let _reader = AbortOnDrop(reader);
    while let Some(chunk) = rx.recv().await {
        let chunk = chunk.map_err(|why| PullError::Stream {
            image: image.clone(),
            gateway: gw.base().to_string(),
            bytes: applier.stats.wire_bytes,
            why,
        })?;
        match applier.feed(&chunk, &mut on_header) {
            Ok(()) => {}
            Err(BundleOrPull::Bundle(e)) => return Err(bundle_err(e)),
            Err(BundleOrPull::Pull(e)) => return Err(e),
        }
    }
    let header = applier.finish().map_err(bundle_err)?;
    store.save_image(r, &header)?;
    Ok(Report {
        digest: header.manifest_digest,
        stats: applier.stats.clone(),
        up_to_date: false,
        elapsed: started.elapsed(),
    })
}

/// Fetches one content of `r` out of band, verifies it and stores it.
pub async fn fetch_content(
    store: &Store,
    gw: &Gateway,
    r: &Reference,
    digest: &Digest,
    size: u64,
    platform: Option<&str>,
) -> Result<PathBuf, PullError> {
    let resp = gw.content(r, digest, platform).await?;
    let (file, tmp) = store.temp_file()?;
    let cleanup = TempGuard(Some(tmp.clone()));
    let sink = Verify { file, hasher: starlight_format::Hasher::new(), written: 0, limit: size };
    let mut dec = zstd::stream::write::Decoder::new(sink)
        .map_err(|source| PullError::Write { digest: digest.to_string(), source })?;
    let (mut stream, stall) = (resp.bytes_stream(), gw.stall_timeout());
    while let Some(chunk) = crate::client::next_chunk(&mut stream, stall).await {
        let chunk = chunk.map_err(|why| PullError::Stream {
            image: r.to_string(),
            gateway: gw.base().to_string(),
            bytes: 0,
            why,
        })?;
        dec.write_all(&chunk).map_err(|e| PullError::Content { digest: *digest, why: e.to_string() })?;
    }
    dec.flush().map_err(|e| PullError::Content { digest: *digest, why: e.to_string() })?;
    let sink = dec.into_inner();
    if sink.written != size {
        return Err(PullError::Content {
            digest: *digest,
            why: format!("{} bytes, not {size}", sink.written),
        });
    }
    let got = sink.hasher.finish();
    if got != *digest {
        return Err(PullError::Content { digest: *digest, why: format!("the bytes received hash to {got}") });
    }
    drop(sink.file);
    let path = store.commit(&tmp, digest)?;
    std::mem::forget(cleanup);
    Ok(path)
}

/// Stops the network task when the pull ends early.
struct AbortOnDrop(tokio::task::JoinHandle<()>);
impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

struct TempGuard(Option<PathBuf>);
impl Drop for TempGuard {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Writes decompressed bytes to a file while hashing them; refuses more than `limit`.
struct Verify {
    file: File,
    hasher: starlight_format::Hasher,
    written: u64,
    limit: u64,
}

impl Write for Verify {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.written + buf.len() as u64 > self.limit {
            return Err(std::io::Error::other(format!("more than the {} bytes announced", self.limit)));
        }
        self.file.write_all(buf)?;
        self.hasher.update(buf);
        self.written += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
