//! Converts one layer tar stream into a seekable blob (in a local temporary file) and its TOC.
//!
//! Four stages run at once so that conversion uses every core: a decompressor thread (which also
//! hashes the compressed bytes and the diffID), this thread parsing tar and hashing file contents,
//! a pool of zstd workers, and a writer that puts frames into the blob file in order. Channels
//! between them are bounded, so memory stays below roughly `(2 * workers + QUEUE) * CHUNK_SIZE`.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};

use crossbeam_channel::{Receiver, Sender, bounded};
use starlight_format::{CHUNK_SIZE, Digest, Entry, Frame, Hasher, Kind, Toc, path};

use crate::{BlobReadError, ConvertError};

/// Writer queue depth, in frames: bounds memory held by compressed-but-unwritten frames.
const QUEUE: usize = 16;
/// Size of the buffers the decompressor hands to the tar parser.
const PIPE_BUF: usize = 256 * 1024;

/// How a layer blob is compressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

/// Caps that protect the converter from hostile layers, and the zstd level.
#[derive(Clone, Debug)]
pub struct Options {
    /// Largest uncompressed layer accepted (decompression bombs stop here).
    pub max_layer_bytes: u64,
    /// Most tar entries accepted in one layer.
    pub max_entries: u64,
    /// zstd level for content frames.
    pub zstd_level: i32,
    /// Compression worker threads (default: all cores).
    pub workers: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            max_layer_bytes: 16 << 30,
            max_entries: 1_000_000,
            zstd_level: 3,
            workers: std::thread::available_parallelism().map_or(2, |n| n.get()),
        }
    }
}

/// What a layer is expected to be; mismatches fail the conversion.
#[derive(Clone, Debug)]
pub struct Expect {
    /// Human-readable name used in errors (the layer digest, usually).
    pub name: String,
    pub compression: Compression,
    pub digest: Option<Digest>,
    pub diff_id: Option<Digest>,
}

/// A content written to the temporary blob, with frame offsets relative to that file.
#[derive(Clone, Debug)]
pub struct PendingContent {
    pub digest: Digest,
    pub size: u64,
    pub frames: Vec<Frame>,
}

/// The result of converting a layer: the TOC, the temporary blob and what it holds.
#[derive(Debug)]
pub struct ConvertedLayer {
    pub toc: Toc,
    pub blob: tempfile::NamedTempFile,
    pub contents: Vec<PendingContent>,
    pub compressed_digest: Digest,
    pub compressed_size: u64,
    pub uncompressed_size: u64,
}

/// Converts the layer read from `input`. Blocking: call it from a blocking thread.
pub fn convert_layer(
    input: impl Read + Send,
    expect: &Expect,
    opts: &Options,
    tmp_dir: &std::path::Path,
) -> Result<ConvertedLayer, ConvertError> {
    let blob = tempfile::NamedTempFile::new_in(tmp_dir).map_err(ConvertError::io(tmp_dir.display()))?;
    let blob_file = blob.reopen().map_err(ConvertError::io(blob.path().display()))?;
    let bad = |entry: Option<&[u8]>, why: String| ConvertError::BadLayer {
        layer: expect.name.clone(),
        entry: entry.map(|e| String::from_utf8_lossy(e).into_owned()),
        why,
    };

    std::thread::scope(|s| {
        let (pipe_tx, pipe_rx) = bounded::<Vec<u8>>(8);
        let decompressor = s.spawn(move || decompress(input, expect, opts, pipe_tx));

        let (job_tx, job_rx) = bounded::<Job>(2 * opts.workers);
        for _ in 0..opts.workers.max(1) {
            let job_rx = job_rx.clone();
            let level = opts.zstd_level;
            s.spawn(move || compress_worker(job_rx, level));
        }
        drop(job_rx);
        let (write_tx, write_rx) = bounded::<WriteItem>(QUEUE);
        let writer = s.spawn(move || write_frames(write_rx, blob_file));

        let parsed = parse_tar(PipeReader::new(pipe_rx), opts, &job_tx, &write_tx, &bad);
        drop(job_tx);
        drop(write_tx);
        let written = writer.join().map_err(|_| bad(None, "writer thread panicked".into()))?;
        let stream = decompressor.join().map_err(|_| bad(None, "decompressor panicked".into()))?;
        // A stream error explains a parse error (a truncated gzip truncates the tar), so it wins;
        // a source that failed (a cut connection) is not the layer's fault.
        let stream = stream.map_err(|e| match e {
            StreamError::Bad(why) => bad(None, why),
            StreamError::Blob(b) => b.into_convert_error(&expect.name),
        })?;
        let entries = parsed?;
        let stream = stream.ok_or_else(|| bad(None, "tar parser stopped early".into()))?;
        let contents = written.map_err(|e| ConvertError::io(blob.path().display())(e))?;

        if let Some(want) = &expect.digest
            && *want != stream.compressed_digest
        {
            return Err(bad(
                None,
                format!("blob digest mismatch: expected {want}, got {}", stream.compressed_digest),
            ));
        }
        if let Some(want) = &expect.diff_id
            && *want != stream.diff_id
        {
            return Err(bad(
                None,
                format!("diffID mismatch: config says {want}, content is {}", stream.diff_id),
            ));
        }
        Ok(ConvertedLayer {
            toc: Toc { diff_id: stream.diff_id, entries },
            blob,
            contents,
            compressed_digest: stream.compressed_digest,
            compressed_size: stream.compressed_size,
            uncompressed_size: stream.uncompressed_size,
        })
    })
}

struct StreamSums {
    compressed_digest: Digest,
    compressed_size: u64,
    diff_id: Digest,
    uncompressed_size: u64,
}

/// Why the decompressor stage stopped.
enum StreamError {
    /// The layer's bytes are bad (they end up in a `BadLayer`).
    Bad(String),
    /// The blob stream itself failed: its source, or its declared size.
    Blob(BlobReadError),
}

/// Hashes and counts what passes through it, and keeps what a failure of the blob stream was:
/// decompressors may wrap or replace the error they pass on, this sees it as the source sent it.
struct HashingReader<R> {
    inner: R,
    hasher: Hasher,
    count: u64,
    failed: Option<BlobReadError>,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = match self.inner.read(buf) {
            Ok(n) => n,
            Err(e) => {
                if self.failed.is_none() {
                    self.failed = BlobReadError::find(&e).cloned();
                }
                return Err(e);
            }
        };
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
}

/// The decompressor stage. Returns `None` when the parser stopped reading (it failed): there is
/// no point going on.
fn decompress<R: Read>(
    input: R,
    expect: &Expect,
    opts: &Options,
    out: Sender<Vec<u8>>,
) -> Result<Option<StreamSums>, StreamError> {
    let hashing = HashingReader { inner: input, hasher: Hasher::new(), count: 0, failed: None };
    let mut decoder: Box<dyn ReadInto<_>> = match expect.compression {
        Compression::None => Box::new(Plain(hashing)),
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(hashing)),
        Compression::Zstd => Box::new(
            zstd::stream::read::Decoder::new(hashing)
                .map_err(|e| StreamError::Bad(format!("zstd decoder: {e}")))?,
        ),
    };
    let what = match expect.compression {
        Compression::None => "reading layer",
        Compression::Gzip => "corrupt or truncated gzip stream",
        Compression::Zstd => "corrupt or truncated zstd stream",
    };
    let mut diff = Hasher::new();
    let mut total: u64 = 0;
    loop {
        let mut buf = vec![0u8; PIPE_BUF];
        let n = match read_full(&mut *decoder, &mut buf) {
            Ok(n) => n,
            Err(e) => {
                // The blob stream's own failure, if it was one, explains the decoder's.
                let failed = BlobReadError::find(&e).cloned().or_else(|| decoder.into_hashing().failed);
                return Err(
                    failed.map_or_else(|| StreamError::Bad(format!("{what}: {e}")), StreamError::Blob)
                );
            }
        };
        if n == 0 {
            break;
        }
        buf.truncate(n);
        total += n as u64;
        if total > opts.max_layer_bytes {
            return Err(StreamError::Bad(format!(
                "uncompressed size exceeds the cap of {} bytes (max_layer_bytes; decompression bomb?)",
                opts.max_layer_bytes
            )));
        }
        diff.update(&buf);
        if out.send(buf).is_err() {
            return Ok(None);
        }
    }
    let mut hashing = decoder.into_hashing();
    // Bytes after the compressed stream's end are part of the blob digest too.
    if let Err(e) = std::io::copy(&mut hashing, &mut std::io::sink()) {
        let failed = BlobReadError::find(&e).cloned().or(hashing.failed);
        return Err(failed.map_or_else(|| StreamError::Bad(format!("reading layer: {e}")), StreamError::Blob));
    }
    Ok(Some(StreamSums {
        compressed_digest: hashing.hasher.finish(),
        compressed_size: hashing.count,
        diff_id: diff.finish(),
        uncompressed_size: total,
    }))
}

/// A decoder that can give back the hashing reader underneath it.
trait ReadInto<R>: Read {
    fn into_hashing(self: Box<Self>) -> R;
}
struct Plain<R>(R);
impl<R: Read> Read for Plain<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf)
    }
}
impl<R: Read> ReadInto<R> for Plain<R> {
    fn into_hashing(self: Box<Self>) -> R {
        self.0
    }
}
impl<R: Read> ReadInto<R> for flate2::read::MultiGzDecoder<R> {
    fn into_hashing(self: Box<Self>) -> R {
        (*self).into_inner()
    }
}
impl<R: Read> ReadInto<R> for zstd::stream::read::Decoder<'static, BufReader<R>> {
    fn into_hashing(self: Box<Self>) -> R {
        (*self).finish().into_inner()
    }
}

fn read_full(r: &mut dyn Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Reads the decompressed stream from the decompressor's channel.
struct PipeReader {
    rx: Receiver<Vec<u8>>,
    cur: Vec<u8>,
    pos: usize,
}

impl PipeReader {
    fn new(rx: Receiver<Vec<u8>>) -> Self {
        PipeReader { rx, cur: Vec::new(), pos: 0 }
    }
}

impl Read for PipeReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.pos == self.cur.len() {
            match self.rx.recv() {
                Ok(next) => {
                    self.cur = next;
                    self.pos = 0;
                }
                Err(_) => return Ok(0),
            }
        }
        let n = buf.len().min(self.cur.len() - self.pos);
        buf[..n].copy_from_slice(&self.cur[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// One chunk to compress; the result goes back through `done`.
struct Job {
    data: Vec<u8>,
    done: Sender<std::io::Result<Vec<u8>>>,
}

enum WriteItem {
    Frame { ulen: u32, compressed: Receiver<std::io::Result<Vec<u8>>> },
    End { digest: Digest, size: u64 },
}

fn compress_worker(jobs: Receiver<Job>, level: i32) {
    let mut compressor = match zstd::bulk::Compressor::new(level) {
        Ok(c) => c,
        Err(e) => {
            for job in jobs {
                let _ = job.done.send(Err(std::io::Error::other(e.to_string())));
            }
            return;
        }
    };
    // Frame headers record the content size so that each frame decompresses alone in one call.
    let _ = compressor.include_contentsize(true);
    let _ = compressor.include_checksum(false);
    for job in jobs {
        let _ = job.done.send(compressor.compress(&job.data));
    }
}

/// The writer stage: appends frames in order and drops repeats of a content already in this blob.
fn write_frames(items: Receiver<WriteItem>, file: File) -> std::io::Result<Vec<PendingContent>> {
    let mut out = BufWriter::with_capacity(1 << 20, file);
    let mut pos: u64 = 0;
    let mut start: u64 = 0;
    let mut frames = Vec::new();
    let mut seen: HashSet<Digest> = HashSet::new();
    let mut contents = Vec::new();
    let mut rewound = false;
    for item in items {
        match item {
            WriteItem::Frame { ulen, compressed } => {
                let data = compressed.recv().map_err(std::io::Error::other)??;
                out.write_all(&data)?;
                frames.push(Frame { offset: pos, clen: data.len() as u32, ulen });
                pos += data.len() as u64;
            }
            WriteItem::End { digest, size } => {
                let frames = std::mem::take(&mut frames);
                if seen.insert(digest) {
                    contents.push(PendingContent { digest, size, frames });
                    start = pos;
                } else {
                    // A repeat within the layer: forget its frames by writing over them.
                    out.seek(SeekFrom::Start(start))?;
                    pos = start;
                    rewound = true;
                }
            }
        }
    }
    let file = out.into_inner().map_err(|e| e.into_error())?;
    if rewound {
        file.set_len(pos)?;
    }
    Ok(contents)
}

/// The tar parsing stage, on the calling thread.
fn parse_tar(
    input: PipeReader,
    opts: &Options,
    jobs: &Sender<Job>,
    writes: &Sender<WriteItem>,
    bad: &dyn Fn(Option<&[u8]>, String) -> ConvertError,
) -> Result<Vec<Entry>, ConvertError> {
    // Huge PAX headers and GNU long names are refused before the parser reads them into memory.
    let mut archive = tar::Archive::new(crate::guard::MetaGuard::new(input));
    let iter = archive.entries().map_err(|e| bad(None, format!("reading tar: {e}")))?;
    let mut entries: Vec<Entry> = Vec::new();
    let mut seen: HashSet<Vec<u8>> = HashSet::new();
    // Kinds of entries seen in this layer, so a hardlink to a directory or to itself is caught.
    let mut kinds: HashMap<Vec<u8>, bool> = HashMap::new();
    let mut last_path: Vec<u8> = Vec::new();
    for item in iter {
        let mut e = item.map_err(|err| {
            let after = (!last_path.is_empty())
                .then(|| format!(" (after entry {:?})", String::from_utf8_lossy(&last_path)));
            bad(None, format!("corrupt tar header{}: {err}", after.unwrap_or_default()))
        })?;
        let raw_path = e.path_bytes().into_owned();
        let ty = e.header().entry_type();
        if matches!(ty, tar::EntryType::XGlobalHeader) {
            continue;
        }
        if entries.len() as u64 >= opts.max_entries {
            return Err(bad(
                Some(&raw_path),
                format!("more than {} entries in one layer (max_entries)", opts.max_entries),
            ));
        }
        let entry_err = |why: String| bad(Some(&raw_path), why);
        let norm = path::normalize(&raw_path).map_err(|e| entry_err(e.to_string()))?;
        if !seen.insert(norm.clone()) {
            return Err(entry_err("duplicate path in one layer".into()));
        }
        last_path = raw_path.clone();
        let meta = Meta::read(&mut e).map_err(&entry_err)?;

        let name = path::file_name(&norm);
        let (entry_path, whiteout) = if name == b".wh..wh..opq" {
            (path::parent(&norm).to_vec(), Some(Kind::Opaque))
        } else if let Some(hidden) = name.strip_prefix(b".wh.") {
            if hidden.is_empty() || hidden == b"." || hidden == b".." {
                return Err(entry_err("whiteout names no file".into()));
            }
            let parent = path::parent(&norm);
            let mut p = parent.to_vec();
            if !p.is_empty() {
                p.push(b'/');
            }
            p.extend_from_slice(hidden);
            (p, Some(Kind::Whiteout))
        } else {
            (norm.clone(), None)
        };

        let is_whiteout = whiteout.is_some();
        let kind = match (whiteout, ty) {
            (Some(k), _) => k,
            (None, tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse) => {
                if norm.is_empty() {
                    return Err(entry_err("a regular file at the root path".into()));
                }
                let hint = e.header().size().unwrap_or(0);
                let (digest, size) = copy_content(&mut e, hint, jobs, writes).map_err(|err| {
                    entry_err(format!("reading file content (truncated or corrupt layer?): {err}"))
                })?;
                Kind::File { size, digest }
            }
            (None, tar::EntryType::Directory) => Kind::Dir,
            (None, tar::EntryType::Symlink) => {
                let target = e.link_name_bytes().ok_or_else(|| entry_err("symlink without target".into()))?;
                if target.is_empty() || target.len() > path::MAX_PATH || target.contains(&0) {
                    return Err(entry_err("symlink target empty, too long or with NUL".into()));
                }
                Kind::Symlink { target: target.into_owned() }
            }
            (None, tar::EntryType::Link) => {
                let raw = e.link_name_bytes().ok_or_else(|| entry_err("hardlink without target".into()))?;
                let target =
                    path::normalize(&raw).map_err(|err| entry_err(format!("hardlink target: {err}")))?;
                if target.is_empty() || target == norm {
                    return Err(entry_err("hardlink to the root or to itself".into()));
                }
                if kinds.get(&target) == Some(&true) {
                    return Err(entry_err("hardlink to a directory".into()));
                }
                Kind::Hardlink { target }
            }
            (None, tar::EntryType::Char | tar::EntryType::Block) => {
                let h = e.header();
                let major = h.device_major().ok().flatten().unwrap_or(0);
                let minor = h.device_minor().ok().flatten().unwrap_or(0);
                if ty == tar::EntryType::Char {
                    Kind::Char { major, minor }
                } else {
                    Kind::Block { major, minor }
                }
            }
            (None, tar::EntryType::Fifo) => Kind::Fifo,
            (None, other) => {
                return Err(entry_err(format!("unsupported tar entry type {:?}", other.as_byte() as char)));
            }
        };
        if entry_path.is_empty() && !matches!(kind, Kind::Dir | Kind::Opaque) {
            return Err(entry_err("only a directory may be the root".into()));
        }
        if !is_whiteout {
            kinds.insert(norm, matches!(kind, Kind::Dir));
        }
        entries.push(Entry {
            path: entry_path,
            kind,
            mode: meta.mode,
            uid: meta.uid,
            gid: meta.gid,
            mtime: meta.mtime,
            mtime_nsec: meta.mtime_nsec,
            xattrs: meta.xattrs,
        });
    }
    // Read past the end-of-archive marker so that the decompressor hashes the padding too.
    std::io::copy(&mut archive.into_inner(), &mut std::io::sink())
        .map_err(|e| bad(None, format!("reading after the end of the tar: {e}")))?;
    Ok(entries)
}

/// Reads a file's bytes in chunks, hashes them, and queues each chunk for compression.
/// `size_hint` (the header's size) sizes the first buffer, so small files cost small allocations.
fn copy_content(
    r: &mut impl Read,
    size_hint: u64,
    jobs: &Sender<Job>,
    writes: &Sender<WriteItem>,
) -> std::io::Result<(Option<Digest>, u64)> {
    let mut hasher = Hasher::new();
    let mut size = 0u64;
    let closed = || std::io::Error::other("pipeline stopped");
    loop {
        let hint = size_hint.saturating_sub(size).clamp(64, CHUNK_SIZE);
        let mut buf = Vec::with_capacity(hint as usize);
        let n = r.by_ref().take(CHUNK_SIZE).read_to_end(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf);
        size += n as u64;
        let (done, compressed) = bounded(1);
        writes.send(WriteItem::Frame { ulen: n as u32, compressed }).map_err(|_| closed())?;
        jobs.send(Job { data: buf, done }).map_err(|_| closed())?;
        if n < CHUNK_SIZE as usize {
            break;
        }
    }
    if size == 0 {
        return Ok((None, 0));
    }
    let digest = hasher.finish();
    writes.send(WriteItem::End { digest, size }).map_err(|_| closed())?;
    Ok((Some(digest), size))
}

/// Metadata of a tar entry, with PAX overrides applied.
struct Meta {
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: i64,
    mtime_nsec: u32,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

impl Meta {
    fn read<R: Read>(e: &mut tar::Entry<'_, R>) -> Result<Meta, String> {
        let h = e.header();
        let num = |v: std::io::Result<u64>, what: &str| v.map_err(|err| format!("bad {what} field: {err}"));
        let mode = h.mode().map_err(|err| format!("bad mode field: {err}"))? & 0o7777;
        let mut uid = num(h.uid(), "uid")?;
        let mut gid = num(h.gid(), "gid")?;
        let mut mtime = num(h.mtime(), "mtime")? as i64;
        let mut mtime_nsec = 0u32;
        let mut xattrs: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        if let Some(exts) = e.pax_extensions().map_err(|err| format!("bad PAX header: {err}"))? {
            for ext in exts {
                let ext = ext.map_err(|err| format!("bad PAX record: {err}"))?;
                let key = ext.key_bytes();
                let value = ext.value_bytes();
                let text = || std::str::from_utf8(value).map_err(|_| "PAX value is not UTF-8".to_string());
                match key {
                    b"uid" => uid = text()?.trim().parse().map_err(|_| "bad PAX uid".to_string())?,
                    b"gid" => gid = text()?.trim().parse().map_err(|_| "bad PAX gid".to_string())?,
                    b"mtime" => (mtime, mtime_nsec) = parse_pax_time(text()?)?,
                    k if k.starts_with(b"SCHILY.xattr.") => {
                        let name = &k[b"SCHILY.xattr.".len()..];
                        if name.is_empty() || name.len() > starlight_format::toc::MAX_XATTR_NAME {
                            return Err("xattr name empty or longer than 255 bytes".into());
                        }
                        if value.len() > starlight_format::toc::MAX_XATTR_VALUE {
                            return Err("xattr value longer than 64 KiB".into());
                        }
                        xattrs.retain(|(n, _)| n != name);
                        xattrs.push((name.to_vec(), value.to_vec()));
                    }
                    k if k.starts_with(b"GNU.sparse.") => {
                        return Err(
                            "PAX-format sparse files are not supported; use GNU sparse headers".into()
                        );
                    }
                    _ => {}
                }
            }
        }
        if xattrs.len() as u64 > starlight_format::toc::MAX_XATTRS {
            return Err("more than 1024 xattrs".into());
        }
        xattrs.sort();
        let id = |v: u64, what: &str| u32::try_from(v).map_err(|_| format!("{what} {v} out of range"));
        Ok(Meta { mode, uid: id(uid, "uid")?, gid: id(gid, "gid")?, mtime, mtime_nsec, xattrs })
    }
}

/// Parses a PAX time (`123.456`, possibly negative) into seconds and nanoseconds.
fn parse_pax_time(s: &str) -> Result<(i64, u32), String> {
    let bad = || format!("bad PAX mtime {s:?}");
    let (int, frac) = s.trim().split_once('.').unwrap_or((s.trim(), ""));
    let secs: i64 = int.parse().map_err(|_| bad())?;
    if !frac.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let mut digits: String = frac.chars().take(9).collect();
    while digits.len() < 9 {
        digits.push('0');
    }
    let mut nsec: u32 = digits.parse().map_err(|_| bad())?;
    // `-1.5` means half a second before -1, i.e. -2 s + 0.5 s.
    if int.starts_with('-') && nsec > 0 {
        return Ok((secs - 1, 1_000_000_000 - nsec));
    }
    if nsec >= 1_000_000_000 {
        nsec = 999_999_999;
    }
    Ok((secs, nsec))
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::{Compression, Expect, Options, convert_layer, parse_pax_time};

    /// A tar of `n` empty files, generated as it is read (a million headers are 512 MB).
    struct EmptyFiles {
        n: u64,
        next: u64,
        block: [u8; 512],
        pos: usize,
        trailer: usize,
    }

    impl Read for EmptyFiles {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            if self.pos == 512 {
                if self.next < self.n {
                    let mut h = tar::Header::new_old();
                    let name = format!("d{}/f{}", self.next / 1000, self.next % 1000);
                    h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
                    h.set_size(0);
                    h.set_mode(0o644);
                    h.set_uid(0);
                    h.set_gid(0);
                    h.set_mtime(0);
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_cksum();
                    self.block.copy_from_slice(h.as_bytes());
                    self.next += 1;
                } else if self.trailer < 2 {
                    self.block = [0; 512];
                    self.trailer += 1;
                } else {
                    return Ok(0);
                }
                self.pos = 0;
            }
            let k = buf.len().min(512 - self.pos);
            buf[..k].copy_from_slice(&self.block[self.pos..self.pos + k]);
            self.pos += k;
            Ok(k)
        }
    }

    #[test]
    fn a_million_empty_files_is_the_limit() {
        let tmp = tempfile::tempdir().unwrap();
        let expect =
            Expect { name: "many".into(), compression: Compression::None, digest: None, diff_id: None };
        let opts = Options::default();
        assert_eq!(opts.max_entries, 1_000_000);
        let files = |n| EmptyFiles { n, next: 0, block: [0; 512], pos: 512, trailer: 0 };
        let e = convert_layer(files(1_000_001), &expect, &opts, tmp.path()).unwrap_err().to_string();
        assert!(e.contains("layer many") && e.contains("more than 1000000 entries in one layer"), "{e}");
        // Up to the limit they are taken: all the same (empty) content, one entry each.
        let small = Options { max_entries: 50_000, ..Options::default() };
        let ok = convert_layer(files(50_000), &expect, &small, tmp.path()).unwrap();
        assert_eq!(ok.toc.entries.len(), 50_000);
        assert!(ok.contents.len() <= 1, "{} contents for empty files", ok.contents.len());
    }

    #[test]
    fn pax_times() {
        assert_eq!(parse_pax_time("1700000000").unwrap(), (1_700_000_000, 0));
        assert_eq!(parse_pax_time("1700000000.5").unwrap(), (1_700_000_000, 500_000_000));
        assert_eq!(parse_pax_time("1.123456789123").unwrap(), (1, 123_456_789));
        assert_eq!(parse_pax_time("-1.5").unwrap(), (-2, 500_000_000));
        assert!(parse_pax_time("1.2x").is_err());
    }
}
