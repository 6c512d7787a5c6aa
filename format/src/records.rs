//! Index records: what the file-hash index maps images, layers and contents to. Each record opens
//! with a type byte and a version byte, so a reader can tell records apart and refuse newer ones.

use std::fmt;
use std::str::FromStr;

use crate::wire::{Reader, Writer};
use crate::{Digest, FormatError};

/// Regular files larger than this are split into chunks of this many bytes, each its own zstd frame.
pub const CHUNK_SIZE: u64 = 4 << 20;

const MAX_FRAMES: u64 = 1 << 24;
const MAX_TEXT: usize = 4096;
const MAX_BLOB: usize = 16 << 20;
/// Layers an image record may hold; the converter refuses larger images before fetching a layer.
pub const MAX_LAYERS: u64 = 4096;

/// Fails with [`FormatError::OverLimit`] if `count` exceeds `max`: the check every encoder makes
/// for each limit its decoder enforces.
fn limit(what: &'static str, count: u64, max: u64) -> Result<(), FormatError> {
    if count > max {
        return Err(FormatError::OverLimit { what, count, max });
    }
    Ok(())
}

/// One zstd frame of a seekable blob.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Frame {
    /// Byte offset of the frame in the blob.
    pub offset: u64,
    /// Compressed length of the frame.
    pub clen: u32,
    /// Uncompressed length: [`CHUNK_SIZE`] for every frame but a content's last.
    pub ulen: u32,
}

/// Where the bytes of one content live: frames of one seekable blob, in content order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContentLocation {
    pub blob: Digest,
    pub size: u64,
    pub frames: Vec<Frame>,
}

/// A converted layer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerRecord {
    pub diff_id: Digest,
    /// Digest of the encoded TOC; the TOC is stored at [`toc_key`].
    pub toc: Digest,
    /// The seekable blob with this layer's new contents; `None` when every content was already stored.
    pub blob: Option<Digest>,
    pub blob_size: u64,
    pub entries: u64,
    /// Regular files with content, and the sum of their sizes.
    pub files: u64,
    pub content_bytes: u64,
}

/// An OS/architecture pair as in OCI image indexes (`linux/arm64/v8`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
}

/// A layer of a converted image, as its manifest and config describe it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageLayer {
    pub diff_id: Digest,
    /// Digest, size and media type of the original (compressed) layer blob.
    pub digest: Digest,
    pub size: u64,
    pub media_type: String,
}

/// A converted image: published only once every layer in it is converted and durable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageRecord {
    pub manifest_digest: Digest,
    pub name: String,
    pub tag: Option<String>,
    pub platform: Platform,
    pub media_type: String,
    pub manifest: Vec<u8>,
    pub config_digest: Digest,
    pub config: Vec<u8>,
    pub layers: Vec<ImageLayer>,
}

/// Object-store key of a seekable blob.
pub fn blob_key(d: &Digest) -> String {
    format!("blobs/sha256/{}", d.hex())
}

/// Object-store key of a TOC (zstd-compressed encoded TOC, named by the digest of the encoding).
pub fn toc_key(d: &Digest) -> String {
    format!("tocs/sha256/{}", d.hex())
}

fn header(r: &mut Reader<'_>, tag: u8, what: &'static str) -> Result<(), FormatError> {
    if r.u8("record type")? != tag {
        return Err(FormatError::BadMagic { what });
    }
    let version = r.u8("record version")?;
    if version != 1 {
        return Err(FormatError::UnsupportedVersion { what, version: u16::from(version) });
    }
    Ok(())
}

impl ContentLocation {
    /// Encodes the location; fails on what [`ContentLocation::decode`] would refuse.
    pub fn encode(&self) -> Result<Vec<u8>, FormatError> {
        limit("content location frame count", self.frames.len() as u64, MAX_FRAMES)?;
        if self.frames.is_empty() {
            return Err(FormatError::OverLimit {
                what: "content location frame count (minimum 1)",
                count: 0,
                max: 0,
            });
        }
        let mut total = 0u64;
        for f in &self.frames {
            limit("content location frame ulen", u64::from(f.ulen), CHUNK_SIZE)?;
            total = total.saturating_add(u64::from(f.ulen));
        }
        if total != self.size {
            return Err(FormatError::Malformed { what: "frames do not add up to size", offset: 0 });
        }
        let mut w = Writer::new();
        w.raw(&[b'C', 1]);
        w.digest(&self.blob);
        w.varint(self.size);
        w.varint(self.frames.len() as u64);
        for f in &self.frames {
            w.varint(f.offset);
            w.varint(u64::from(f.clen));
            w.varint(u64::from(f.ulen));
        }
        Ok(w.buf)
    }

    pub fn decode(data: &[u8]) -> Result<Self, FormatError> {
        let mut r = Reader::new(data);
        header(&mut r, b'C', "content location")?;
        let blob = r.digest("blob")?;
        let size = r.varint("size")?;
        let n = r.varint_max(MAX_FRAMES, "frame count")?;
        let mut frames = Vec::with_capacity((n as usize).min(r.remaining() / 3));
        let mut total = 0u64;
        for _ in 0..n {
            let offset = r.varint("frame offset")?;
            let clen = r.varint_max(u64::from(u32::MAX), "frame clen")? as u32;
            let ulen = r.varint_max(CHUNK_SIZE, "frame ulen")? as u32;
            total = total.saturating_add(u64::from(ulen));
            frames.push(Frame { offset, clen, ulen });
        }
        r.finish()?;
        if total != size || frames.is_empty() {
            return Err(FormatError::Malformed { what: "frames do not add up to size", offset: 0 });
        }
        Ok(ContentLocation { blob, size, frames })
    }
}

impl LayerRecord {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new();
        w.raw(&[b'L', 1]);
        w.digest(&self.diff_id);
        w.digest(&self.toc);
        match &self.blob {
            Some(b) => {
                w.u8(1);
                w.digest(b);
            }
            None => w.u8(0),
        }
        for v in [self.blob_size, self.entries, self.files, self.content_bytes] {
            w.varint(v);
        }
        w.buf
    }

    pub fn decode(data: &[u8]) -> Result<Self, FormatError> {
        let mut r = Reader::new(data);
        header(&mut r, b'L', "layer record")?;
        let diff_id = r.digest("diff_id")?;
        let toc = r.digest("toc")?;
        let blob = match r.u8("blob flag")? {
            0 => None,
            1 => Some(r.digest("blob")?),
            _ => return Err(FormatError::Malformed { what: "blob flag", offset: r.position() }),
        };
        let rec = LayerRecord {
            diff_id,
            toc,
            blob,
            blob_size: r.varint("blob_size")?,
            entries: r.varint("entries")?,
            files: r.varint("files")?,
            content_bytes: r.varint("content_bytes")?,
        };
        r.finish()?;
        Ok(rec)
    }
}

impl ImageRecord {
    /// Checks every limit [`ImageRecord::decode`] enforces, so that what is written can be read.
    pub fn check_limits(&self) -> Result<(), FormatError> {
        limit("image layer count", self.layers.len() as u64, MAX_LAYERS)?;
        let text = MAX_TEXT as u64;
        limit("image name length", self.name.len() as u64, text)?;
        limit("image tag length", self.tag.as_deref().unwrap_or("").len() as u64, text)?;
        limit("image platform length", self.platform.to_string().len() as u64, text)?;
        limit("image media type length", self.media_type.len() as u64, text)?;
        limit("image manifest size", self.manifest.len() as u64, MAX_BLOB as u64)?;
        limit("image config size", self.config.len() as u64, MAX_BLOB as u64)?;
        for l in &self.layers {
            limit("layer media type length", l.media_type.len() as u64, text)?;
        }
        // The platform must parse back.
        self.platform.to_string().parse::<Platform>()?;
        Ok(())
    }

    /// Encodes the record; fails on what [`ImageRecord::decode`] would refuse.
    pub fn encode(&self) -> Result<Vec<u8>, FormatError> {
        self.check_limits()?;
        let mut w = Writer::new();
        w.raw(&[b'I', 1]);
        w.digest(&self.manifest_digest);
        w.bytes(self.name.as_bytes());
        w.bytes(self.tag.as_deref().unwrap_or("").as_bytes());
        w.bytes(self.platform.to_string().as_bytes());
        w.bytes(self.media_type.as_bytes());
        w.bytes(&self.manifest);
        w.digest(&self.config_digest);
        w.bytes(&self.config);
        w.varint(self.layers.len() as u64);
        for l in &self.layers {
            w.digest(&l.diff_id);
            w.digest(&l.digest);
            w.varint(l.size);
            w.bytes(l.media_type.as_bytes());
        }
        Ok(w.buf)
    }

    pub fn decode(data: &[u8]) -> Result<Self, FormatError> {
        let mut r = Reader::new(data);
        header(&mut r, b'I', "image record")?;
        let manifest_digest = r.digest("manifest digest")?;
        let name = r.string(MAX_TEXT, "name")?;
        let tag = Some(r.string(MAX_TEXT, "tag")?).filter(|t| !t.is_empty());
        let platform = r.string(MAX_TEXT, "platform")?.parse()?;
        let media_type = r.string(MAX_TEXT, "media type")?;
        let manifest = r.bytes(MAX_BLOB, "manifest")?.to_vec();
        let config_digest = r.digest("config digest")?;
        let config = r.bytes(MAX_BLOB, "config")?.to_vec();
        let n = r.varint_max(MAX_LAYERS, "layer count")?;
        let mut layers = Vec::with_capacity(n as usize);
        for _ in 0..n {
            layers.push(ImageLayer {
                diff_id: r.digest("layer diff_id")?,
                digest: r.digest("layer digest")?,
                size: r.varint("layer size")?,
                media_type: r.string(MAX_TEXT, "layer media type")?,
            });
        }
        r.finish()?;
        Ok(ImageRecord {
            manifest_digest,
            name,
            tag,
            platform,
            media_type,
            manifest,
            config_digest,
            config,
            layers,
        })
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

impl FromStr for Platform {
    type Err = FormatError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parts: Vec<&str> = s.split('/').collect();
        let ok = |p: &&str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !(2..=3).contains(&parts.len()) || !parts.iter().all(ok) {
            return Err(FormatError::BadPlatform(s.chars().take(100).collect()));
        }
        Ok(Platform {
            os: parts[0].to_string(),
            architecture: parts[1].to_string(),
            variant: parts.get(2).map(|v| v.to_string()),
        })
    }
}

impl Platform {
    /// The platform of the machine this runs on, in OCI (Go) spelling.
    pub fn host() -> Platform {
        let architecture = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            "x86" => "386",
            "powerpc64" => "ppc64le",
            other => other,
        };
        Platform { os: "linux".into(), architecture: architecture.into(), variant: None }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(layers: usize) -> ImageRecord {
        let layer = ImageLayer {
            diff_id: Digest::of(b"tar"),
            digest: Digest::of(b"gz"),
            size: 20,
            media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
        };
        ImageRecord {
            manifest_digest: Digest::of(b"manifest"),
            name: "many".into(),
            tag: None,
            platform: Platform::host(),
            media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            manifest: b"{}".to_vec(),
            config_digest: Digest::of(b"config"),
            config: b"{}".to_vec(),
            layers: vec![layer; layers],
        }
    }

    #[test]
    fn image_records_past_the_layer_limit_are_not_written() {
        let at_limit = image(MAX_LAYERS as usize);
        assert_eq!(ImageRecord::decode(&at_limit.encode().unwrap()).unwrap(), at_limit);
        let over = image(MAX_LAYERS as usize + 1);
        assert_eq!(
            over.encode(),
            Err(FormatError::OverLimit { what: "image layer count", count: 4097, max: 4096 })
        );
    }

    #[test]
    fn every_decode_limit_is_checked_on_encode() {
        let mut long_name = image(1);
        long_name.name = "n".repeat(MAX_TEXT + 1);
        assert!(matches!(long_name.encode(), Err(FormatError::OverLimit { .. })));
        let mut big_config = image(1);
        big_config.config = vec![b' '; MAX_BLOB + 1];
        assert!(matches!(big_config.encode(), Err(FormatError::OverLimit { .. })));
        let frame = Frame { offset: 0, clen: 1, ulen: CHUNK_SIZE as u32 + 1 };
        let loc = ContentLocation { blob: Digest::of(b"b"), size: CHUNK_SIZE + 1, frames: vec![frame] };
        assert!(matches!(loc.encode(), Err(FormatError::OverLimit { .. })));
        let empty = ContentLocation { blob: Digest::of(b"b"), size: 0, frames: vec![] };
        assert!(empty.encode().is_err());
        let short = ContentLocation {
            blob: Digest::of(b"b"),
            size: 9,
            frames: vec![Frame { offset: 0, clen: 1, ulen: 8 }],
        };
        assert!(ContentLocation::decode(&short.encode().unwrap_or_default()).is_err());
        assert!(short.encode().is_err());
    }
}
