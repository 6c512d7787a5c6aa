//! The delta bundle: one stream that carries everything a worker needs to run an image. First a
//! header (manifest, config, the flattened filesystem, and the table of contents that follow, in
//! order), then content chunks (each a standard zstd frame, as stored in seekable blobs, so the
//! gateway forwards stored frames without recompressing), then a trailer that says the stream ended
//! complete. See the crate README for the byte layout.
//!
//! A content the worker holds an older version of may come instead as one patch: a zstd frame
//! compressed with the older content (the *base*) as its prefix, so only the difference travels.
//!
//! [`Decoder`] is sans-I/O: feed it bytes as they arrive, in any split, and it yields verified
//! events. A content is reported done only once its bytes match its digest. For a patch, the
//! caller applies it to the base it holds ([`apply_patch`]) and hands the result back
//! ([`Decoder::patched`]), which verifies it.

use std::collections::HashMap;

use crate::toc::Entry;
use crate::wire::{Reader, Writer};
use crate::{CHUNK_SIZE, Digest, FormatError, Hasher, Platform};

pub const BUNDLE_MAGIC: &[u8; 6] = b"SLBNDL";
pub const BUNDLE_VERSION: u16 = 1;
/// Largest header record (the flattened filesystem of a very large image fits well below this).
pub const MAX_HEADER: u64 = 256 << 20;
/// Largest chunk record: a zstd frame of at most `CHUNK_SIZE` bytes, with room for its overhead.
pub const MAX_CHUNK_RECORD: u64 = CHUNK_SIZE + (CHUNK_SIZE >> 7) + 1024;
const MAX_CONTENTS: u64 = 10_000_000;
/// Largest content (and largest base) sent as a patch.
pub const MAX_PATCH_CONTENT: u64 = 32 << 20;
/// Largest patch record.
pub const MAX_PATCH_RECORD: u64 = MAX_PATCH_CONTENT + (MAX_PATCH_CONTENT >> 7) + 1024;

const REC_HEADER: u8 = b'H';
const REC_CHUNK: u8 = b'C';
const REC_TRAILER: u8 = b'T';
const REC_PATCH: u8 = b'P';
const REC_HEADER_ZSTD: u8 = b'Z';
const REC_BATCH: u8 = b'B';
/// Largest batch: the contents of one batch record together, uncompressed.
pub const MAX_BATCH: u64 = CHUNK_SIZE;
/// Most contents in one batch record.
pub const MAX_BATCH_CONTENTS: u64 = 65_536;

/// A content the bundle carries, in stream order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ContentRef {
    pub digest: Digest,
    pub size: u64,
}

/// Everything known before the first content byte.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub manifest_digest: Digest,
    pub manifest: Vec<u8>,
    pub config: Vec<u8>,
    pub platform: Platform,
    /// The flattened filesystem, parents before children (see [`crate::flatten`]).
    pub entries: Vec<Entry>,
    /// The contents that follow, in the order they are sent. Contents the worker said it has are
    /// not here; the entries still name them by digest.
    pub contents: Vec<ContentRef>,
}

/// A header's entries, encoded once and reused for every bundle of an image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EncodedEntries(Vec<u8>);

impl EncodedEntries {
    pub fn new(entries: &[Entry]) -> EncodedEntries {
        let mut w = Writer::new();
        w.varint(entries.len() as u64);
        for e in entries {
            crate::toc::encode_entry(e, &mut w);
        }
        EncodedEntries(w.buf)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Encodes the preamble and the header record.
pub fn encode_header(h: &Header) -> Vec<u8> {
    let entries = EncodedEntries::new(&h.entries);
    encode_header_with(&h.manifest_digest, &h.manifest, &h.config, &h.platform, &entries, &h.contents)
}

/// [`encode_header`] with the entries already encoded.
pub fn encode_header_with(
    manifest_digest: &Digest,
    manifest: &[u8],
    config: &[u8],
    platform: &Platform,
    entries: &EncodedEntries,
    contents: &[ContentRef],
) -> Vec<u8> {
    let mut body = Writer::new();
    body.digest(manifest_digest);
    body.bytes(manifest);
    body.bytes(config);
    body.bytes(platform.to_string().as_bytes());
    body.raw(&entries.0);
    body.varint(contents.len() as u64);
    for c in contents {
        body.digest(&c.digest);
        body.varint(c.size);
    }
    let mut w = Writer::new();
    w.raw(BUNDLE_MAGIC);
    w.raw(&BUNDLE_VERSION.to_le_bytes());
    w.u8(REC_HEADER);
    w.bytes(&body.buf);
    w.buf
}

/// Re-encodes an encoded header (as [`encode_header`] makes it) with the header record's payload
/// as one zstd frame: the flattened filesystem compresses well, and it is all metadata the worker
/// waits for.
pub fn compress_header(encoded: &[u8], level: i32) -> Result<Vec<u8>, FormatError> {
    let bad = FormatError::Malformed { what: "encoded bundle header", offset: 8 };
    if encoded.len() < 9 || encoded[8] != REC_HEADER {
        return Err(bad);
    }
    let mut r = Reader::new(&encoded[9..]);
    let len = r.varint_max(MAX_HEADER, "header length")? as usize;
    let payload = encoded.get(9 + r.position()..9 + r.position() + len).ok_or(bad)?;
    let frame = zstd::bulk::compress(payload, level)
        .map_err(|_| FormatError::Malformed { what: "header compression", offset: 0 })?;
    let mut w = Writer::new();
    w.raw(&encoded[..8]);
    w.u8(REC_HEADER_ZSTD);
    w.bytes(&frame);
    Ok(w.buf)
}

/// The bytes that precede a chunk's zstd frame: the gateway writes these, then the stored frame as is.
/// `offset` is the chunk's position in the uncompressed content.
pub fn chunk_prefix(index: u64, offset: u64, frame_len: usize) -> Vec<u8> {
    let mut inner = Writer::new();
    inner.varint(index);
    inner.varint(offset);
    let mut w = Writer::new();
    w.u8(REC_CHUNK);
    w.varint((inner.buf.len() + frame_len) as u64);
    w.raw(&inner.buf);
    w.buf
}

/// The bytes that precede a patch's zstd frame: content `index` comes as a patch against the
/// content `base`.
pub fn patch_prefix(index: u64, base: &Digest, frame_len: usize) -> Vec<u8> {
    let mut inner = Writer::new();
    inner.varint(index);
    inner.digest(base);
    let mut w = Writer::new();
    w.u8(REC_PATCH);
    w.varint((inner.buf.len() + frame_len) as u64);
    w.raw(&inner.buf);
    w.buf
}

/// The zstd window a patch of `content` against `base` needs: both must fit in it.
fn patch_window_log(base: usize, content: usize) -> u32 {
    let span = (base + content).max(1 << 10) as u64;
    (64 - (span - 1).leading_zeros()).clamp(10, 27)
}

/// Compresses `content` as a patch against `base` (a zstd frame with `base` as its prefix).
pub fn make_patch(base: &[u8], content: &[u8], level: i32) -> Result<Vec<u8>, String> {
    use zstd::zstd_safe::{CCtx, CParameter};
    if base.len() as u64 > MAX_PATCH_CONTENT || content.len() as u64 > MAX_PATCH_CONTENT {
        return Err(format!("patches are limited to {MAX_PATCH_CONTENT} bytes"));
    }
    let window = patch_window_log(base.len(), content.len());
    let mut cctx = CCtx::create();
    let err = |e| format!("zstd: {}", zstd::zstd_safe::get_error_name(e));
    cctx.set_parameter(CParameter::CompressionLevel(level)).map_err(err)?;
    cctx.set_parameter(CParameter::WindowLog(window)).map_err(err)?;
    // As `zstd --patch-from` does: long-distance matching finds the base's runs wherever they are.
    cctx.set_parameter(CParameter::EnableLongDistanceMatching(true)).map_err(err)?;
    cctx.ref_prefix(base).map_err(err)?;
    let mut out = Vec::with_capacity(zstd::zstd_safe::compress_bound(content.len()));
    cctx.compress2(&mut out, content).map_err(err)?;
    Ok(out)
}

/// Applies a patch made by [`make_patch`] to `base`; the result must be `size` bytes.
pub fn apply_patch(base: &[u8], frame: &[u8], size: u64) -> Result<Vec<u8>, String> {
    use zstd::zstd_safe::DCtx;
    if size > MAX_PATCH_CONTENT {
        return Err(format!("a patched content of {size} bytes is above the {MAX_PATCH_CONTENT}-byte limit"));
    }
    let err = |e| format!("patch does not apply: {}", zstd::zstd_safe::get_error_name(e));
    let mut dctx = DCtx::create();
    dctx.ref_prefix(base).map_err(err)?;
    let mut out = Vec::with_capacity(size as usize);
    dctx.decompress(&mut out, frame).map_err(err)?;
    if out.len() as u64 != size {
        return Err(format!("patch gives {} bytes, expected {size}", out.len()));
    }
    Ok(out)
}

/// The bytes that precede a batch's zstd frame: contents `first` .. `first + count` (in the
/// content table's order), concatenated, are the frame's content.
pub fn batch_prefix(first: u64, count: u64, frame_len: usize) -> Vec<u8> {
    let mut inner = Writer::new();
    inner.varint(first);
    inner.varint(count);
    let mut w = Writer::new();
    w.u8(REC_BATCH);
    w.varint((inner.buf.len() + frame_len) as u64);
    w.raw(&inner.buf);
    w.buf
}

/// The trailer: how many contents and content bytes the stream carried.
pub fn encode_trailer(contents: u64, bytes: u64) -> Vec<u8> {
    let mut body = Writer::new();
    body.varint(contents);
    body.varint(bytes);
    let mut w = Writer::new();
    w.u8(REC_TRAILER);
    w.bytes(&body.buf);
    w.buf
}

/// What the decoder has verified so far.
#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    Header(Box<Header>),
    /// Decompressed bytes of content `index` at `offset`. Not yet verified against the digest:
    /// keep them out of sight until [`Event::ContentDone`].
    Chunk {
        index: u64,
        offset: u64,
        data: Vec<u8>,
    },
    /// Content `index` arrived whole and matches its digest.
    ContentDone {
        index: u64,
        digest: Digest,
    },
    /// Content `index` comes as a patch against the content `base`: apply it with [`apply_patch`]
    /// to the base the worker holds, and hand the result to [`Decoder::patched`].
    Patch {
        index: u64,
        base: Digest,
        size: u64,
        frame: Vec<u8>,
    },
    /// The trailer arrived and agrees with what came: the bundle is complete (once every patch
    /// is handed back).
    End,
}

/// Why a bundle stream is rejected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BundleError {
    #[error(transparent)]
    Format(#[from] FormatError),
    #[error("bundle record at byte {offset}: {why}")]
    Bad { offset: u64, why: String },
    #[error("content {digest} (index {index}) does not match its digest")]
    DigestMismatch { index: u64, digest: Digest },
    #[error("the bundle stream ended early, at byte {offset}{}", if *.header_seen { "" } else { ", before its header" })]
    Truncated { offset: u64, header_seen: bool },
    #[error("patch for content {index}: {why}")]
    Patch { index: u64, why: String },
}

struct Progress {
    received: u64,
    hasher: Hasher,
}

/// Incremental, verifying bundle decoder.
#[derive(Default)]
pub struct Decoder {
    buf: Vec<u8>,
    /// Bytes of `buf` already decoded.
    start: usize,
    /// Stream offset of `buf[start]`.
    base: u64,
    preamble: bool,
    header: Option<Vec<ContentRef>>,
    progress: HashMap<u64, Progress>,
    /// Patches announced and not yet handed back.
    patches: HashMap<u64, ContentRef>,
    /// Contents complete (by chunks or patch).
    complete: std::collections::HashSet<u64>,
    done: u64,
    done_bytes: u64,
    ended: bool,
    /// One decompression context for every record.
    dctx: Option<zstd::bulk::Decompressor<'static>>,
    /// Buffers handed back with [`Decoder::recycle`], reused for the next records.
    spare: Vec<Vec<u8>>,
}

impl std::fmt::Debug for Decoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Decoder").field("offset", &self.base).field("done", &self.done).finish()
    }
}

impl Decoder {
    pub fn new() -> Decoder {
        Decoder::default()
    }

    /// Adds bytes and returns the events they complete.
    pub fn feed(&mut self, data: &[u8]) -> Result<Vec<Event>, BundleError> {
        // Drop decoded bytes before growing the buffer, so it holds about one record at most.
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(data);
        let mut events = Vec::new();
        while let Some(mut evs) = self.step()? {
            events.append(&mut evs);
        }
        Ok(events)
    }

    fn pending(&self) -> &[u8] {
        &self.buf[self.start..]
    }

    /// Gives back the buffer of a [`Event::Chunk`] once its bytes are written, so that the next
    /// record decompresses into memory already mapped.
    pub fn recycle(&mut self, mut buf: Vec<u8>) {
        if self.spare.len() < 2 && buf.capacity() <= CHUNK_SIZE as usize {
            buf.clear();
            self.spare.push(buf);
        }
    }

    /// Decompresses one zstd frame of `want` bytes at most.
    fn inflate(&mut self, frame: &[u8], want: usize) -> Result<Vec<u8>, String> {
        let mut out = self.spare.pop().unwrap_or_default();
        out.clear();
        out.reserve_exact(want);
        let dctx = match &mut self.dctx {
            Some(d) => d,
            None => self.dctx.insert(zstd::bulk::Decompressor::new().map_err(|e| e.to_string())?),
        };
        dctx.decompress_to_buffer(frame, &mut out).map_err(|e| e.to_string())?;
        Ok(out)
    }

    /// Call at the end of the stream: an error unless the trailer arrived and every patch was
    /// handed back.
    pub fn finish(&self) -> Result<(), BundleError> {
        if let Some(index) = self.patches.keys().next() {
            return Err(BundleError::Patch { index: *index, why: "never handed back".into() });
        }
        if self.ended {
            Ok(())
        } else {
            Err(BundleError::Truncated {
                offset: self.base + self.pending().len() as u64,
                header_seen: self.header.is_some(),
            })
        }
    }

    fn bad(&self, why: impl Into<String>) -> BundleError {
        BundleError::Bad { offset: self.base, why: why.into() }
    }

    fn consume(&mut self, n: usize) {
        self.start += n;
        self.base += n as u64;
    }

    /// Decodes one record if it is all here; `None` when more bytes are needed.
    fn step(&mut self) -> Result<Option<Vec<Event>>, BundleError> {
        // The buffer is lent out while its record is decoded, so that the payload is not copied.
        let all = std::mem::take(&mut self.buf);
        let r = self.step_in(&all);
        self.buf = all;
        r
    }

    fn step_in(&mut self, all: &[u8]) -> Result<Option<Vec<Event>>, BundleError> {
        let buf = &all[self.start..];
        if self.ended {
            if !buf.is_empty() {
                return Err(self.bad("bytes after the trailer"));
            }
            return Ok(None);
        }
        if !self.preamble {
            if buf.len() < 8 {
                return Ok(None);
            }
            if &buf[..6] != BUNDLE_MAGIC {
                return Err(FormatError::BadMagic { what: "bundle" }.into());
            }
            let version = u16::from_le_bytes([buf[6], buf[7]]);
            if version != BUNDLE_VERSION {
                return Err(FormatError::UnsupportedVersion { what: "bundle", version }.into());
            }
            self.preamble = true;
            self.consume(8);
            return Ok(Some(Vec::new()));
        }
        // Record: type, length, payload. Wait for the whole record.
        let Some(&kind) = buf.first() else { return Ok(None) };
        let max = match kind {
            REC_HEADER | REC_HEADER_ZSTD => MAX_HEADER,
            REC_CHUNK => MAX_CHUNK_RECORD,
            REC_TRAILER => 64,
            REC_PATCH => MAX_PATCH_RECORD,
            REC_BATCH => MAX_CHUNK_RECORD,
            other => return Err(self.bad(format!("unknown record type {other:#04x}"))),
        };
        let mut r = Reader::new(&buf[1..]);
        let len = match r.varint_max(max, "record length") {
            Ok(l) => l as usize,
            // A length varint cut by the end of the buffer: wait for the rest.
            Err(_) if buf.len() < 12 => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let head = 1 + r.position();
        if buf.len() < head + len {
            return Ok(None);
        }
        let payload = &buf[head..head + len];
        let events = match kind {
            REC_HEADER => self.header_record(payload)?,
            REC_HEADER_ZSTD => {
                let plain = zstd::bulk::decompress(payload, MAX_HEADER as usize)
                    .map_err(|e| self.bad(format!("compressed header does not decompress: {e}")))?;
                self.header_record(&plain)?
            }
            REC_CHUNK => self.chunk_record(payload)?,
            REC_PATCH => self.patch_record(payload)?,
            REC_BATCH => self.batch_record(payload)?,
            _ => self.trailer_record(payload)?,
        };
        self.consume(head + len);
        Ok(Some(events))
    }

    fn header_record(&mut self, p: &[u8]) -> Result<Vec<Event>, BundleError> {
        if self.header.is_some() {
            return Err(self.bad("a second header"));
        }
        let mut r = Reader::new(p);
        let manifest_digest = r.digest("manifest digest")?;
        let manifest = r.bytes(16 << 20, "manifest")?.to_vec();
        let config = r.bytes(16 << 20, "config")?.to_vec();
        let platform: Platform = r.string(4096, "platform")?.parse()?;
        if Digest::of(&manifest) != manifest_digest {
            return Err(self.bad("the manifest does not match its digest"));
        }
        let n = r.varint_max(crate::toc::MAX_ENTRIES, "entry count")?;
        let mut entries = Vec::with_capacity((n as usize).min(r.remaining() / 9));
        for _ in 0..n {
            entries.push(crate::toc::decode_entry(&mut r)?);
        }
        let n = r.varint_max(MAX_CONTENTS, "content count")?;
        let mut contents = Vec::with_capacity((n as usize).min(r.remaining() / 33));
        for _ in 0..n {
            let digest = r.digest("content digest")?;
            let size = r.varint("content size")?;
            if size == 0 {
                return Err(self.bad("an empty content in the content table"));
            }
            contents.push(ContentRef { digest, size });
        }
        r.finish()?;
        self.header = Some(contents.clone());
        Ok(vec![Event::Header(Box::new(Header {
            manifest_digest,
            manifest,
            config,
            platform,
            entries,
            contents,
        }))])
    }

    fn chunk_record(&mut self, p: &[u8]) -> Result<Vec<Event>, BundleError> {
        let contents = self.header.as_ref().ok_or_else(|| self.bad("a chunk before the header"))?;
        let mut r = Reader::new(p);
        let index = r.varint("content index")?;
        let offset = r.varint("chunk offset")?;
        let frame = &p[r.position()..];
        let c = *contents
            .get(index as usize)
            .ok_or_else(|| self.bad(format!("content index {index} out of range")))?;
        if self.complete.contains(&index) || self.patches.contains_key(&index) {
            return Err(self.bad(format!("content {index} sent twice")));
        }
        let received = self.progress.get(&index).map_or(0, |p| p.received);
        if offset != received || received >= c.size {
            return Err(BundleError::Bad {
                offset: self.base,
                why: format!("chunk of content {index} at {offset}, expected {received}"),
            });
        }
        let want = (c.size - offset).min(CHUNK_SIZE) as usize;
        let data = self.inflate(frame, want).map_err(|e| BundleError::Bad {
            offset: self.base,
            why: format!("chunk of content {index} does not decompress: {e}"),
        })?;
        if data.len() != want {
            return Err(BundleError::Bad {
                offset: self.base,
                why: format!("chunk of content {index} holds {} bytes, expected {want}", data.len()),
            });
        }
        let prog =
            self.progress.entry(index).or_insert_with(|| Progress { received: 0, hasher: Hasher::new() });
        prog.hasher.update(&data);
        prog.received += data.len() as u64;
        let mut events = vec![Event::Chunk { index, offset, data }];
        if prog.received == c.size {
            let Progress { hasher, .. } = self.progress.remove(&index).unwrap_or_else(|| unreachable!());
            if hasher.finish() != c.digest {
                return Err(BundleError::DigestMismatch { index, digest: c.digest });
            }
            self.done += 1;
            self.done_bytes += c.size;
            self.complete.insert(index);
            events.push(Event::ContentDone { index, digest: c.digest });
        }
        Ok(events)
    }

    fn patch_record(&mut self, p: &[u8]) -> Result<Vec<Event>, BundleError> {
        let contents = self.header.as_ref().ok_or_else(|| self.bad("a patch before the header"))?;
        let mut r = Reader::new(p);
        let index = r.varint("content index")?;
        let base = r.digest("patch base")?;
        let frame = p[r.position()..].to_vec();
        let c = *contents
            .get(index as usize)
            .ok_or_else(|| self.bad(format!("content index {index} out of range")))?;
        if self.complete.contains(&index)
            || self.patches.contains_key(&index)
            || self.progress.contains_key(&index)
        {
            return Err(self.bad(format!("content {index} sent twice")));
        }
        if c.size > MAX_PATCH_CONTENT {
            return Err(self.bad(format!("a patch for content {index} of {} bytes", c.size)));
        }
        self.patches.insert(index, c);
        Ok(vec![Event::Patch { index, base, size: c.size, frame }])
    }

    fn batch_record(&mut self, p: &[u8]) -> Result<Vec<Event>, BundleError> {
        let contents = self.header.as_ref().ok_or_else(|| self.bad("a batch before the header"))?;
        let mut r = Reader::new(p);
        let first = r.varint("batch first index")?;
        let count = r.varint_max(MAX_BATCH_CONTENTS, "batch count")?;
        let frame = &p[r.position()..];
        let end = first.checked_add(count).filter(|e| *e <= contents.len() as u64 && count > 0);
        let end =
            end.ok_or_else(|| self.bad(format!("batch of {count} contents from {first} out of range")))?;
        let items: Vec<ContentRef> = contents[first as usize..end as usize].to_vec();
        let total: u64 = items.iter().map(|c| c.size).sum();
        if total > MAX_BATCH {
            return Err(self.bad(format!("a batch of {total} bytes, above {MAX_BATCH}")));
        }
        for i in first..end {
            if self.complete.contains(&i) || self.patches.contains_key(&i) || self.progress.contains_key(&i) {
                return Err(self.bad(format!("content {i} sent twice")));
            }
        }
        let data = self
            .inflate(frame, total as usize)
            .map_err(|e| self.bad(format!("batch from content {first} does not decompress: {e}")))?;
        if data.len() as u64 != total {
            return Err(
                self.bad(format!("batch from content {first} holds {} bytes, expected {total}", data.len()))
            );
        }
        let mut events = Vec::with_capacity(2 * items.len());
        let mut at = 0usize;
        for (k, c) in items.iter().enumerate() {
            let index = first + k as u64;
            let part = &data[at..at + c.size as usize];
            at += c.size as usize;
            if Digest::of(part) != c.digest {
                return Err(BundleError::DigestMismatch { index, digest: c.digest });
            }
            self.complete.insert(index);
            self.done += 1;
            self.done_bytes += c.size;
            events.push(Event::Chunk { index, offset: 0, data: part.to_vec() });
            events.push(Event::ContentDone { index, digest: c.digest });
        }
        self.recycle(data);
        Ok(events)
    }

    /// Hands back content `index`, rebuilt from its patch; verifies it and completes it.
    pub fn patched(&mut self, index: u64, data: &[u8]) -> Result<Event, BundleError> {
        let c = self
            .patches
            .get(&index)
            .copied()
            .ok_or_else(|| BundleError::Patch { index, why: "no patch is pending for it".into() })?;
        if data.len() as u64 != c.size || Digest::of(data) != c.digest {
            return Err(BundleError::DigestMismatch { index, digest: c.digest });
        }
        self.patches.remove(&index);
        self.complete.insert(index);
        self.done += 1;
        self.done_bytes += c.size;
        Ok(Event::ContentDone { index, digest: c.digest })
    }

    fn trailer_record(&mut self, p: &[u8]) -> Result<Vec<Event>, BundleError> {
        let total = self.header.as_ref().ok_or_else(|| self.bad("a trailer before the header"))?.len() as u64;
        let mut r = Reader::new(p);
        let count = r.varint("trailer count")?;
        let bytes = r.varint("trailer bytes")?;
        r.finish()?;
        // Patches not yet handed back count as arrived; `finish` insists they are handed back.
        let pending = self.patches.len() as u64;
        let pending_bytes: u64 = self.patches.values().map(|c| c.size).sum();
        let (done, done_bytes) = (self.done + pending, self.done_bytes + pending_bytes);
        if count != done || bytes != done_bytes || count != total {
            return Err(self.bad(format!(
                "trailer says {count} contents / {bytes} bytes; received {done} of {total} / {done_bytes} bytes"
            )));
        }
        self.ended = true;
        Ok(vec![Event::End])
    }
}
