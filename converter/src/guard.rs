//! A reader between the decompressor and the tar parser that walks the tar stream's block
//! structure and stops metadata headers too large to hold in memory.
//!
//! The `tar` crate reads a PAX extended header (`x`, `g`) or a GNU long name (`L`, `K`) whole into
//! memory before the entry it describes. A hostile layer can declare one of gigabytes. This guard
//! sees each 512-byte header before the parser does; when a metadata header declares more than
//! [`MAX_META`] bytes, the bytes before it are handed on and the next read fails with an error
//! saying so, so the parser never allocates for it.
//!
//! It follows the stream exactly as the parser does: header, data rounded up to 512 bytes, GNU
//! sparse extension blocks, and a PAX `size` record overriding the size of the next entry.

use std::io::Read;

/// The largest PAX extended header or GNU long name accepted (paths are at most 4 KiB; this leaves
/// room for large extended attributes).
pub const MAX_META: u64 = 1 << 20;

const BLOCK: usize = 512;

#[derive(Debug)]
enum State {
    /// Collecting a header block (this many bytes of it seen).
    Header(usize),
    /// GNU sparse extension blocks follow the header.
    Sparse(usize),
    /// Entry data: bytes left, and whether it is PAX data to read for a `size` record.
    Data { left: u64, pad: u64, pax: bool },
    /// Two zero blocks ended the archive (or a zero block was seen): nothing more is checked.
    End,
}

/// See the module documentation.
#[derive(Debug)]
pub struct MetaGuard<R> {
    inner: R,
    state: State,
    header: [u8; BLOCK],
    /// PAX data of the current `x` header, for its `size` record.
    pax: Vec<u8>,
    /// A `size` from the last PAX header, for the next entry.
    next_size: Option<u64>,
    /// Data size of the entry being read.
    current_size: u64,
    /// Bytes of the current read the parser may take before the failure; then the failure.
    failure: Option<String>,
    zero_blocks: u32,
    offset: u64,
}

impl<R> MetaGuard<R> {
    pub fn new(inner: R) -> MetaGuard<R> {
        MetaGuard {
            inner,
            state: State::Header(0),
            header: [0; BLOCK],
            pax: Vec::new(),
            next_size: None,
            current_size: 0,
            failure: None,
            zero_blocks: 0,
            offset: 0,
        }
    }

    pub fn into_inner(self) -> R {
        self.inner
    }
}

/// A tar number field: octal text, or base-256 when the high bit of the first byte is set.
fn number(field: &[u8]) -> Option<u64> {
    if field.first().is_some_and(|b| b & 0x80 != 0) {
        let mut v: u64 = u64::from(field[0] & 0x7f);
        for &b in &field[1..] {
            v = v.checked_mul(256)?.checked_add(u64::from(b))?;
        }
        return Some(v);
    }
    let text: Vec<u8> = field.iter().copied().take_while(|b| *b != 0).collect();
    let text = std::str::from_utf8(&text).ok()?.trim();
    if text.is_empty() {
        return Some(0);
    }
    u64::from_str_radix(text, 8).ok()
}

/// The `size` record of PAX data (`LEN size=N\n` records), if any.
fn pax_size(data: &[u8]) -> Option<u64> {
    let mut rest = data;
    let mut size = None;
    while !rest.is_empty() {
        let sp = rest.iter().position(|b| *b == b' ')?;
        let len: usize = std::str::from_utf8(&rest[..sp]).ok()?.parse().ok()?;
        if len <= sp || len > rest.len() {
            return size;
        }
        let record = &rest[sp + 1..len];
        if let Some(v) = record.strip_prefix(b"size=") {
            let v = v.strip_suffix(b"\n").unwrap_or(v);
            size = std::str::from_utf8(v).ok().and_then(|s| s.parse().ok());
        }
        rest = &rest[len..];
    }
    size
}

impl<R: Read> Read for MetaGuard<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let refused = |why: &String| std::io::Error::new(std::io::ErrorKind::InvalidData, why.clone());
        if let Some(why) = &self.failure {
            return Err(refused(why));
        }
        let n = self.inner.read(buf)?;
        let ok = self.scan(&buf[..n]);
        self.offset += ok as u64;
        match &self.failure {
            Some(why) if ok == 0 => Err(refused(why)),
            _ => Ok(ok),
        }
    }
}

impl<R> MetaGuard<R> {
    /// Advances over `bytes`; returns how many of them may go to the parser: fewer when a header
    /// in them is refused (`self.failure` then says why).
    fn scan(&mut self, bytes: &[u8]) -> usize {
        let mut i = 0;
        while i < bytes.len() {
            match &mut self.state {
                State::End => return bytes.len(),
                State::Header(seen) | State::Sparse(seen) => {
                    let began = i as i64 - *seen as i64;
                    let take = (BLOCK - *seen).min(bytes.len() - i);
                    self.header[*seen..*seen + take].copy_from_slice(&bytes[i..i + take]);
                    *seen += take;
                    i += take;
                    if *seen < BLOCK {
                        continue;
                    }
                    if matches!(self.state, State::Sparse(_)) {
                        // More extension blocks follow while byte 504 is set.
                        self.state =
                            if self.header[504] != 0 { State::Sparse(0) } else { self.data_state(false) };
                        continue;
                    }
                    let at = self.offset + i as u64 - BLOCK as u64;
                    if let Err(why) = self.header_done(at) {
                        self.failure = Some(why);
                        // The parser gets nothing of this header.
                        return began.max(0) as usize;
                    }
                }
                State::Data { left, pad, pax } => {
                    let room = (bytes.len() - i) as u64;
                    if *left > 0 {
                        let take = (*left).min(room) as usize;
                        if *pax {
                            self.pax.extend_from_slice(&bytes[i..i + take]);
                        }
                        *left -= take as u64;
                        i += take;
                    } else {
                        let take = (*pad).min(room) as usize;
                        *pad -= take as u64;
                        i += take;
                    }
                    if let State::Data { left: 0, pad: 0, pax } = self.state {
                        if pax {
                            self.next_size = pax_size(&self.pax);
                            self.pax.clear();
                        }
                        self.state = State::Header(0);
                    }
                }
            }
        }
        bytes.len()
    }

    /// The data of the entry whose header (and sparse blocks) were just read.
    fn data_state(&self, pax: bool) -> State {
        let size = self.current_size;
        let pad = (BLOCK as u64 - size % BLOCK as u64) % BLOCK as u64;
        let state = State::Data { left: size, pad, pax };
        if size == 0 { State::Header(0) } else { state }
    }

    fn header_done(&mut self, at: u64) -> Result<(), String> {
        if self.header.iter().all(|b| *b == 0) {
            self.zero_blocks += 1;
            self.state = if self.zero_blocks >= 2 { State::End } else { State::Header(0) };
            return Ok(());
        }
        self.zero_blocks = 0;
        let kind = self.header[156];
        let declared = number(&self.header[124..136])
            .ok_or_else(|| format!("tar header at byte {at}: unreadable size field"))?;
        let meta = matches!(kind, b'x' | b'g' | b'L' | b'K');
        if meta && declared > MAX_META {
            let what = if matches!(kind, b'x' | b'g') { "PAX extended header" } else { "GNU long name" };
            return Err(format!(
                "tar header at byte {at}: a {what} of {declared} bytes (the limit is {MAX_META})"
            ));
        }
        // A PAX `size` applies to the entry after the PAX header (and its long names).
        self.current_size = if meta { declared } else { self.next_size.take().unwrap_or(declared) };
        // An old-GNU sparse header says whether extension blocks follow (byte 482).
        self.state = if kind == b'S' && self.header[482] != 0 {
            State::Sparse(0)
        } else {
            self.data_state(kind == b'x')
        };
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(name: &str, kind: u8, size: u64) -> Vec<u8> {
        let mut h = tar::Header::new_gnu();
        h.as_gnu_mut().unwrap().name[..name.len()].copy_from_slice(name.as_bytes());
        h.set_entry_type(tar::EntryType::new(kind));
        h.set_size(size);
        h.set_mode(0o644);
        h.set_cksum();
        h.as_bytes().to_vec()
    }

    fn pad(v: &mut Vec<u8>) {
        v.resize(v.len().div_ceil(BLOCK) * BLOCK, 0);
    }

    /// Reads everything through the guard in reads of `chunk` bytes.
    fn through(data: &[u8], chunk: usize) -> Result<Vec<u8>, String> {
        struct Chunks<'a>(&'a [u8], usize);
        impl Read for Chunks<'_> {
            fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
                let n = self.1.min(buf.len()).min(self.0.len());
                buf[..n].copy_from_slice(&self.0[..n]);
                self.0 = &self.0[n..];
                Ok(n)
            }
        }
        let mut g = MetaGuard::new(Chunks(data, chunk));
        let mut out = Vec::new();
        g.read_to_end(&mut out).map_err(|e| e.to_string())?;
        Ok(out)
    }

    #[test]
    fn a_normal_archive_passes_unchanged() {
        let mut t = Vec::new();
        let mut b = tar::Builder::new(&mut t);
        let mut h = tar::Header::new_ustar();
        h.set_size(700);
        h.set_mode(0o644);
        // A long path and an xattr make the builder write GNU long-name and PAX headers.
        let long = "d/".repeat(80) + "file";
        b.append_data(&mut h, &long, &[7u8; 700][..]).unwrap();
        b.append_pax_extensions([("SCHILY.xattr.user.k", &b"v"[..])]).unwrap();
        let mut h = tar::Header::new_gnu();
        h.set_size(3);
        h.set_mode(0o644);
        b.append_data(&mut h, "x", &b"abc"[..]).unwrap();
        b.finish().unwrap();
        drop(b);
        for chunk in [1, 7, 512, 4096, 1 << 20] {
            assert_eq!(through(&t, chunk).unwrap(), t, "chunk {chunk}");
        }
    }

    #[test]
    fn huge_metadata_headers_are_refused_before_the_parser_sees_them() {
        for kind in [b'x', b'g', b'L', b'K'] {
            let mut t = header("ok", b'0', 5);
            t.extend_from_slice(b"hello");
            pad(&mut t);
            let ok_len = t.len();
            t.extend(header("././@LongLink", kind, 8 << 30));
            t.extend_from_slice(&[b'a'; 1000]);
            for chunk in [1, 100, 512, 1 << 16] {
                let e = through(&t, chunk).unwrap_err();
                assert!(e.contains(&format!("at byte {ok_len}")) && e.contains("8589934592 bytes"), "{e}");
            }
        }
        // At the limit it passes.
        let mut t = header("././@LongLink", b'x', MAX_META);
        t.extend(vec![b'\n'; MAX_META as usize]);
        assert!(through(&t, 4096).is_ok());
    }

    #[test]
    fn a_pax_size_moves_the_next_header() {
        // A PAX size of 1024 on an entry whose own header says 0: the guard must skip 1024 bytes
        // of data, then find a huge PAX header there.
        let rec = "13 size=1024\n";
        let mut t = header("pax", b'x', rec.len() as u64);
        t.extend_from_slice(rec.as_bytes());
        pad(&mut t);
        t.extend(header("big", b'0', 0));
        t.extend(vec![b'z'; 1024]);
        let at = t.len();
        t.extend(header("huge", b'x', MAX_META + 1));
        let e = through(&t, 300).unwrap_err();
        assert!(e.contains(&format!("at byte {at}")), "{e}");
        assert_eq!(number(b"0000644\0"), Some(0o644));
        assert_eq!(number(&[0x80, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0]), Some(2 << 32));
    }
}
