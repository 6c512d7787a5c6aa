//! The table of contents (TOC) of a converted layer: every tar entry's metadata, in tar order, with
//! regular files naming their content by digest. See the crate README for the byte layout.

use crate::wire::{Reader, Writer};
use crate::{Digest, FormatError, path};

/// Magic bytes that open an encoded TOC.
pub const TOC_MAGIC: &[u8; 6] = b"SLTOC\0";
/// The TOC version this crate writes; decoders reject any other.
pub const TOC_VERSION: u16 = 1;

/// Decoder caps: far above any real layer, low enough that hostile input cannot exhaust memory.
pub const MAX_ENTRIES: u64 = 10_000_000;
pub const MAX_XATTRS: u64 = 1024;
pub const MAX_XATTR_NAME: usize = 255;
pub const MAX_XATTR_VALUE: usize = 64 * 1024;

/// The table of contents of one layer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Toc {
    /// The layer's diffID: the SHA-256 of its uncompressed tar stream.
    pub diff_id: Digest,
    pub entries: Vec<Entry>,
}

/// One tar entry, with the metadata every kind shares.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Normalized path (see [`path::normalize`]); may be any bytes, not only UTF-8. For a whiteout
    /// it is the path being hidden (`.wh.` removed); for an opaque marker, the directory.
    pub path: Vec<u8>,
    pub kind: Kind,
    /// Permission bits including setuid, setgid and sticky (`0o7777` at most).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: i64,
    pub mtime_nsec: u32,
    /// Extended attributes, sorted by name, names unique.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

/// What an entry is, with the fields only that kind has.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A regular file. `digest` is `None` exactly when `size` is 0: empty contents are never stored.
    File {
        size: u64,
        digest: Option<Digest>,
    },
    Dir,
    Symlink {
        target: Vec<u8>,
    },
    /// A hard link to `target`, a normalized path in this layer or a lower one.
    Hardlink {
        target: Vec<u8>,
    },
    Char {
        major: u32,
        minor: u32,
    },
    Block {
        major: u32,
        minor: u32,
    },
    Fifo,
    /// An OCI whiteout (`.wh.NAME`): `path` is deleted from the layers below.
    Whiteout,
    /// An OCI opaque marker (`DIR/.wh..wh..opq`): `path` is the directory whose lower contents are hidden.
    Opaque,
}

impl Kind {
    fn tag(&self) -> u8 {
        match self {
            Kind::File { .. } => 0,
            Kind::Dir => 1,
            Kind::Symlink { .. } => 2,
            Kind::Hardlink { .. } => 3,
            Kind::Char { .. } => 4,
            Kind::Block { .. } => 5,
            Kind::Fifo => 6,
            Kind::Whiteout => 7,
            Kind::Opaque => 8,
        }
    }
}

impl Toc {
    /// Encodes the TOC. The encoding is canonical: equal TOCs give equal bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new();
        w.raw(TOC_MAGIC);
        w.raw(&TOC_VERSION.to_le_bytes());
        w.digest(&self.diff_id);
        w.varint(self.entries.len() as u64);
        for e in &self.entries {
            e.encode(&mut w);
        }
        w.buf
    }

    /// Decodes and validates a TOC.
    pub fn decode(data: &[u8]) -> Result<Toc, FormatError> {
        let mut r = Reader::new(data);
        if r.raw(6, "magic")? != TOC_MAGIC {
            return Err(FormatError::BadMagic { what: "TOC" });
        }
        let version = u16::from_le_bytes([r.u8("version")?, r.u8("version")?]);
        if version != TOC_VERSION {
            return Err(FormatError::UnsupportedVersion { what: "TOC", version });
        }
        let diff_id = r.digest("diff_id")?;
        let n = r.varint_max(MAX_ENTRIES, "entry count")?;
        // Each entry takes at least 9 bytes, which bounds the allocation by the input size.
        let mut entries = Vec::with_capacity((n as usize).min(r.remaining() / 9));
        for _ in 0..n {
            entries.push(Entry::decode(&mut r)?);
        }
        r.finish()?;
        Ok(Toc { diff_id, entries })
    }

    /// The content digests of the regular files with content, in entry order (repeats included).
    pub fn content_digests(&self) -> impl Iterator<Item = Digest> + '_ {
        self.entries.iter().filter_map(|e| match e.kind {
            Kind::File { digest, .. } => digest,
            _ => None,
        })
    }

    /// The digest of the encoded TOC, which names it in the object store.
    pub fn digest(&self) -> Digest {
        Digest::of(&self.encode())
    }
}

/// Encodes one entry as a TOC does (the bundle header reuses it).
pub(crate) fn encode_entry(e: &Entry, w: &mut Writer) {
    e.encode(w);
}

/// Decodes and validates one entry.
pub(crate) fn decode_entry(r: &mut Reader<'_>) -> Result<Entry, FormatError> {
    Entry::decode(r)
}

impl Entry {
    fn encode(&self, w: &mut Writer) {
        w.u8(self.kind.tag());
        w.bytes(&self.path);
        w.varint(u64::from(self.mode));
        w.varint(u64::from(self.uid));
        w.varint(u64::from(self.gid));
        w.zigzag(self.mtime);
        w.varint(u64::from(self.mtime_nsec));
        w.varint(self.xattrs.len() as u64);
        for (k, v) in &self.xattrs {
            w.bytes(k);
            w.bytes(v);
        }
        match &self.kind {
            Kind::File { size, digest } => {
                w.varint(*size);
                if let Some(d) = digest {
                    w.digest(d);
                }
            }
            Kind::Symlink { target } | Kind::Hardlink { target } => w.bytes(target),
            Kind::Char { major, minor } | Kind::Block { major, minor } => {
                w.varint(u64::from(*major));
                w.varint(u64::from(*minor));
            }
            Kind::Dir | Kind::Fifo | Kind::Whiteout | Kind::Opaque => {}
        }
    }

    fn decode(r: &mut Reader<'_>) -> Result<Entry, FormatError> {
        let start = r.position();
        let bad = |what| FormatError::Malformed { what, offset: start };
        let tag = r.u8("entry kind")?;
        let path = r.bytes(path::MAX_PATH, "path")?.to_vec();
        if !path::is_normal(&path) {
            return Err(bad("path not normalized"));
        }
        let mode = r.varint_max(0o7777, "mode")? as u32;
        let uid = r.varint_max(u64::from(u32::MAX), "uid")? as u32;
        let gid = r.varint_max(u64::from(u32::MAX), "gid")? as u32;
        let mtime = r.zigzag("mtime")?;
        let mtime_nsec = r.varint_max(999_999_999, "mtime_nsec")? as u32;
        let nx = r.varint_max(MAX_XATTRS, "xattr count")?;
        let mut xattrs: Vec<(Vec<u8>, Vec<u8>)> = Vec::with_capacity(nx as usize);
        for _ in 0..nx {
            let k = r.bytes(MAX_XATTR_NAME, "xattr name")?.to_vec();
            let v = r.bytes(MAX_XATTR_VALUE, "xattr value")?.to_vec();
            if k.is_empty() || xattrs.last().is_some_and(|(p, _)| *p >= k) {
                return Err(bad("xattr names empty, unsorted or repeated"));
            }
            xattrs.push((k, v));
        }
        let dev = |r: &mut Reader<'_>| -> Result<(u32, u32), FormatError> {
            Ok((
                r.varint_max(u64::from(u32::MAX), "major")? as u32,
                r.varint_max(u64::from(u32::MAX), "minor")? as u32,
            ))
        };
        let kind = match tag {
            0 => {
                let size = r.varint("size")?;
                let digest = if size > 0 { Some(r.digest("content digest")?) } else { None };
                Kind::File { size, digest }
            }
            1 => Kind::Dir,
            2 => Kind::Symlink { target: r.bytes(path::MAX_PATH, "symlink target")?.to_vec() },
            3 => {
                let target = r.bytes(path::MAX_PATH, "hardlink target")?.to_vec();
                if target.is_empty() || !path::is_normal(&target) {
                    return Err(bad("hardlink target not normalized"));
                }
                Kind::Hardlink { target }
            }
            4 => {
                let (major, minor) = dev(r)?;
                Kind::Char { major, minor }
            }
            5 => {
                let (major, minor) = dev(r)?;
                Kind::Block { major, minor }
            }
            6 => Kind::Fifo,
            7 => Kind::Whiteout,
            8 => Kind::Opaque,
            _ => return Err(bad("unknown entry kind")),
        };
        if path.is_empty() && !matches!(kind, Kind::Dir | Kind::Opaque) {
            return Err(bad("only a directory may have the root path"));
        }
        Ok(Entry { path, kind, mode, uid, gid, mtime, mtime_nsec, xattrs })
    }
}
