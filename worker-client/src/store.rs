//! The worker's content-addressed store.
//!
//! ```text
//! STORE/lock                         flock: shared while pulling or mounted, exclusive for rm and gc
//! STORE/contents/sha256/<hex>        verified contents, read-only, named by their SHA-256
//! STORE/tmp/<pid>-<n>                contents still arriving (never under their final name)
//! STORE/images/sha256/<hex>.header   an image's bundle header (all of its metadata)
//! STORE/images/sha256/<hex>.json     the image record: name, tags, size
//! STORE/partial/<key>.header         the header of a pull not finished yet (resume)
//! STORE/traces/sha256/<hex>          the recorded start-up trace of an image
//! ```
//!
//! A content gets its final name only after the decoder has checked it against its digest, by an
//! atomic rename, so a crash leaves at most stray temporary files (removed at the next open). An
//! image record is written (atomically too) only after every content it needs is in place and the
//! filesystem has been synced, so a recorded image is always whole.

use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};
use starlight_format::Digest;
use starlight_format::bundle::{Decoder, Event, Header, compress_header, encode_header};

/// A store operation that failed, with the path it was about.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store {path}: {op}: {source}")]
    Io {
        path: String,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("store {path}: {why}")]
    Corrupt { path: String, why: String },
    #[error("no image {0} in the store")]
    NotFound(String),
}

fn io(path: &Path, op: &'static str) -> impl FnOnce(std::io::Error) -> StoreError {
    let path = path.display().to_string();
    move |source| StoreError::Io { path, op, source }
}

/// What the store knows about a whole image.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ImageMeta {
    /// Repository name, as pulled (`library/debian`).
    pub name: String,
    /// Tags of `name` that point at this image, as last pulled.
    pub tags: Vec<String>,
    /// Manifest digest.
    pub digest: String,
    pub platform: String,
    /// Distinct contents and their total size.
    pub contents: u64,
    pub content_bytes: u64,
    /// When it was last pulled (seconds since the epoch).
    pub pulled: u64,
}

/// An image reference: `NAME:TAG` or `NAME@DIGEST` (`NAME` alone means `NAME:latest`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reference {
    pub name: String,
    /// A tag or a `sha256:` digest.
    pub reference: String,
}

impl Reference {
    pub fn parse(s: &str) -> Result<Reference, String> {
        let (name, reference) = if let Some((n, d)) = s.split_once('@') {
            d.parse::<Digest>().map_err(|e| format!("image {s:?}: bad digest: {e}"))?;
            (n, d.to_string())
        } else {
            // A tag follows the last ':' after the last '/' (a registry port is not a tag).
            let slash = s.rfind('/').map_or(0, |i| i + 1);
            match s[slash..].rfind(':') {
                Some(i) => (&s[..slash + i], s[slash + i + 1..].to_string()),
                None => (s, "latest".to_string()),
            }
        };
        let name_ok = !name.is_empty()
            && name.split('/').all(|c| {
                !c.is_empty()
                    && c.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
            });
        let tag_ok = reference.starts_with("sha256:")
            || (!reference.is_empty()
                && reference.len() <= 128
                && reference.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)));
        if !name_ok {
            return Err(format!(
                "image {s:?}: {name:?} is not a repository name (lowercase a-z0-9._- and /)"
            ));
        }
        if !tag_ok {
            return Err(format!("image {s:?}: {reference:?} is not a tag or a digest"));
        }
        Ok(Reference { name: name.to_string(), reference })
    }

    pub fn digest(&self) -> Option<Digest> {
        self.reference.parse().ok()
    }
}

impl std::fmt::Display for Reference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.reference.starts_with("sha256:") {
            write!(f, "{}@{}", self.name, self.reference)
        } else {
            write!(f, "{}:{}", self.name, self.reference)
        }
    }
}

/// A held flock on the store's lock file; released on drop.
#[derive(Debug)]
pub struct Lock(#[allow(dead_code)] File);

/// The content-addressed store under one directory.
#[derive(Debug)]
pub struct Store {
    root: PathBuf,
    next_tmp: AtomicU64,
}

impl Store {
    /// Opens (creating) the store at `root`, and removes temporary files of processes gone.
    pub fn open(root: impl Into<PathBuf>) -> Result<Store, StoreError> {
        let root = root.into();
        for d in ["contents/sha256", "tmp", "images/sha256", "partial", "traces/sha256"] {
            let p = root.join(d);
            std::fs::create_dir_all(&p).map_err(io(&p, "create directory"))?;
        }
        let store = Store { root, next_tmp: AtomicU64::new(0) };
        store.clean_tmp()?;
        Ok(store)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn clean_tmp(&self) -> Result<(), StoreError> {
        let dir = self.root.join("tmp");
        for e in std::fs::read_dir(&dir).map_err(io(&dir, "list"))?.flatten() {
            let name = e.file_name();
            let pid = name.to_str().and_then(|n| n.split('-').next()).and_then(|p| p.parse::<i32>().ok());
            // SAFETY: kill with signal 0 only checks whether the process exists.
            let alive = pid.is_some_and(|p| unsafe { libc::kill(p, 0) } == 0 || errno() == libc::EPERM);
            if !alive {
                let _ = std::fs::remove_file(e.path());
            }
        }
        Ok(())
    }

    fn lock(&self, op: libc::c_int) -> Result<Lock, StoreError> {
        let p = self.root.join("lock");
        let f = File::options().create(true).append(true).open(&p).map_err(io(&p, "open lock"))?;
        // SAFETY: flock on an fd we own.
        if unsafe { libc::flock(f.as_raw_fd(), op) } != 0 {
            return Err(io(&p, "lock")(std::io::Error::last_os_error()));
        }
        Ok(Lock(f))
    }

    /// Held while pulling or serving a mount: `gc` and `rm` wait for it.
    pub fn lock_shared(&self) -> Result<Lock, StoreError> {
        self.lock(libc::LOCK_SH)
    }

    pub fn lock_exclusive(&self) -> Result<Lock, StoreError> {
        self.lock(libc::LOCK_EX)
    }

    pub fn content_path(&self, d: &Digest) -> PathBuf {
        self.root.join("contents/sha256").join(d.hex())
    }

    /// Whether the store holds content `d` of `size` bytes.
    pub fn has(&self, d: &Digest, size: u64) -> bool {
        std::fs::metadata(self.content_path(d)).is_ok_and(|m| m.len() == size)
    }

    /// A new temporary file for a content on its way in.
    pub fn temp_file(&self) -> Result<(File, PathBuf), StoreError> {
        let n = self.next_tmp.fetch_add(1, Ordering::Relaxed);
        let p = self.root.join("tmp").join(format!("{}-{n}", std::process::id()));
        // Read-only from the start: the final name needs no chmod.
        let f = std::os::unix::fs::OpenOptionsExt::mode(File::options().write(true).create_new(true), 0o444)
            .open(&p)
            .map_err(io(&p, "create"))?;
        Ok((f, p))
    }

    /// Gives a verified temporary file its final name.
    pub fn commit(&self, tmp: &Path, d: &Digest) -> Result<PathBuf, StoreError> {
        let dest = self.content_path(d);
        std::fs::rename(tmp, &dest).map_err(io(&dest, "rename into place"))?;
        Ok(dest)
    }

    /// Stores verified bytes as content `d`.
    pub fn put(&self, d: &Digest, data: &[u8]) -> Result<PathBuf, StoreError> {
        let (mut f, tmp) = self.temp_file()?;
        if let Err(e) = f.write_all(data) {
            let _ = std::fs::remove_file(&tmp);
            return Err(io(&tmp, "write")(e));
        }
        drop(f);
        self.commit(&tmp, d)
    }

    /// Flushes everything written to the store's filesystem to disk.
    pub fn sync(&self) -> Result<(), StoreError> {
        let f = File::open(&self.root).map_err(io(&self.root, "open"))?;
        // SAFETY: syncfs on an fd we own.
        if unsafe { libc::syncfs(f.as_raw_fd()) } != 0 {
            return Err(io(&self.root, "sync")(std::io::Error::last_os_error()));
        }
        Ok(())
    }

    fn write_atomic(&self, dest: &Path, data: &[u8]) -> Result<(), StoreError> {
        let (mut f, tmp) = self.temp_file()?;
        let written = f
            .write_all(data)
            .map_err(io(&tmp, "write"))
            .and_then(|()| f.sync_all().map_err(io(&tmp, "sync")));
        drop(f);
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        std::fs::rename(&tmp, dest).map_err(io(dest, "rename into place"))
    }

    fn image_path(&self, d: &Digest, ext: &str) -> PathBuf {
        self.root.join("images/sha256").join(format!("{}.{ext}", d.hex()))
    }

    fn partial_path(&self, r: &Reference) -> PathBuf {
        self.root.join("partial").join(format!("{}.header", Digest::of(r.to_string().as_bytes()).hex()))
    }

    /// Keeps the header of a pull in progress, so that a new run resumes it.
    pub fn save_partial(&self, r: &Reference, header: &Header) -> Result<(), StoreError> {
        let data = encode_saved(header);
        self.write_atomic(&self.partial_path(r), &data)
    }

    /// The header of an unfinished pull of `r`, if any.
    pub fn partial(&self, r: &Reference) -> Result<Option<Header>, StoreError> {
        let p = self.partial_path(r);
        match std::fs::read(&p) {
            Ok(data) => decode_saved(&data)
                .map(Some)
                .map_err(|why| StoreError::Corrupt { path: p.display().to_string(), why }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(&p, "read")(e)),
        }
    }

    /// Records a whole image (its contents must all be in the store) and moves `r`'s tag to it.
    pub fn save_image(&self, r: &Reference, header: &Header) -> Result<ImageMeta, StoreError> {
        let all = image_contents(header);
        let mut bytes = 0;
        for (d, size) in &all {
            if !self.has(d, *size) {
                return Err(StoreError::Corrupt {
                    path: self.content_path(d).display().to_string(),
                    why: format!("content {d} of image {} is missing", header.manifest_digest),
                });
            }
            bytes += size;
        }
        let digest = header.manifest_digest;
        let mut meta = match self.image(&digest)? {
            Some(m) => m,
            None => ImageMeta {
                name: r.name.clone(),
                tags: vec![],
                digest: digest.to_string(),
                platform: header.platform.to_string(),
                contents: all.len() as u64,
                content_bytes: bytes,
                pulled: 0,
            },
        };
        meta.pulled =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        if r.digest().is_none() {
            // The tag moves: no other image of this repository keeps it.
            for mut other in self.images()? {
                if other.name == r.name && other.digest != meta.digest && other.tags.contains(&r.reference) {
                    other.tags.retain(|t| t != &r.reference);
                    self.write_meta(&other)?;
                }
            }
            if !meta.tags.contains(&r.reference) {
                meta.tags.push(r.reference.clone());
            }
        }
        self.sync()?;
        self.write_atomic(&self.image_path(&digest, "header"), &encode_saved(header))?;
        self.write_meta(&meta)?;
        let _ = std::fs::remove_file(self.partial_path(r));
        Ok(meta)
    }

    fn write_meta(&self, m: &ImageMeta) -> Result<(), StoreError> {
        let d: Digest = m.digest.parse().map_err(|e| StoreError::Corrupt {
            path: self.root.display().to_string(),
            why: format!("image record digest {}: {e}", m.digest),
        })?;
        let json = serde_json::to_vec_pretty(m).expect("image records serialize");
        self.write_atomic(&self.image_path(&d, "json"), &json)
    }

    /// The record of image `d`, if whole in the store.
    pub fn image(&self, d: &Digest) -> Result<Option<ImageMeta>, StoreError> {
        let p = self.image_path(d, "json");
        match std::fs::read(&p) {
            Ok(data) => serde_json::from_slice(&data)
                .map(Some)
                .map_err(|e| StoreError::Corrupt { path: p.display().to_string(), why: e.to_string() }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(&p, "read")(e)),
        }
    }

    /// Every whole image, newest first.
    pub fn images(&self) -> Result<Vec<ImageMeta>, StoreError> {
        let dir = self.root.join("images/sha256");
        let mut out = Vec::new();
        for e in std::fs::read_dir(&dir).map_err(io(&dir, "list"))?.flatten() {
            let name = e.file_name();
            let Some(hex) = name.to_str().and_then(|n| n.strip_suffix(".json")) else { continue };
            let Ok(d) = format!("sha256:{hex}").parse::<Digest>() else { continue };
            out.extend(self.image(&d)?);
        }
        out.sort_by(|a, b| b.pulled.cmp(&a.pulled).then(a.digest.cmp(&b.digest)));
        Ok(out)
    }

    /// The whole image `r` names, if the store has it.
    pub fn find(&self, r: &Reference) -> Result<Option<ImageMeta>, StoreError> {
        Ok(self
            .images()?
            .into_iter()
            .find(|m| m.name == r.name && (m.digest == r.reference || m.tags.contains(&r.reference))))
    }

    /// The header of a whole image.
    pub fn header(&self, d: &Digest) -> Result<Header, StoreError> {
        let p = self.image_path(d, "header");
        let data = std::fs::read(&p).map_err(io(&p, "read"))?;
        decode_saved(&data).map_err(|why| StoreError::Corrupt { path: p.display().to_string(), why })
    }

    /// Forgets image `r` (its contents stay until `gc`). With a tag, only that tag goes, and the
    /// image with it when no tag is left.
    pub fn remove(&self, r: &Reference) -> Result<ImageMeta, StoreError> {
        let _lock = self.lock_exclusive()?;
        let mut meta = self.find(r)?.ok_or_else(|| StoreError::NotFound(r.to_string()))?;
        let d: Digest = meta.digest.parse().map_err(|e| StoreError::Corrupt {
            path: self.root.display().to_string(),
            why: format!("image record digest {}: {e}", meta.digest),
        })?;
        if r.digest().is_none() {
            meta.tags.retain(|t| t != &r.reference);
            if !meta.tags.is_empty() {
                self.write_meta(&meta)?;
                return Ok(meta);
            }
        }
        for ext in ["json", "header"] {
            let p = self.image_path(&d, ext);
            std::fs::remove_file(&p).map_err(io(&p, "remove"))?;
        }
        let _ = std::fs::remove_file(self.trace_path(&d));
        Ok(meta)
    }

    /// Removes every content no image (whole or partly pulled) refers to. Returns the number of
    /// contents removed and their bytes.
    pub fn gc(&self) -> Result<(u64, u64), StoreError> {
        let _lock = self.lock_exclusive()?;
        self.gc_locked()
    }

    /// [`Store::gc`] when no pull or mount holds the store; `None` (and nothing done) when one does.
    pub fn try_gc(&self) -> Result<Option<(u64, u64)>, StoreError> {
        match self.lock(libc::LOCK_EX | libc::LOCK_NB) {
            Ok(_lock) => self.gc_locked().map(Some),
            Err(StoreError::Io { source, .. }) if source.raw_os_error() == Some(libc::EWOULDBLOCK) => {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// Drops the resume state of an unfinished pull of `r` (its contents go at the next gc).
    pub fn forget_partial(&self, r: &Reference) {
        let _ = std::fs::remove_file(self.partial_path(r));
    }

    fn gc_locked(&self) -> Result<(u64, u64), StoreError> {
        let mut live = std::collections::HashSet::new();
        for m in self.images()? {
            let d: Digest = m.digest.parse().map_err(|e| StoreError::Corrupt {
                path: self.root.display().to_string(),
                why: format!("image record digest {}: {e}", m.digest),
            })?;
            live.extend(image_contents(&self.header(&d)?).into_keys());
        }
        let pdir = self.root.join("partial");
        for e in std::fs::read_dir(&pdir).map_err(io(&pdir, "list"))?.flatten() {
            let data = std::fs::read(e.path()).map_err(io(&e.path(), "read"))?;
            match decode_saved(&data) {
                Ok(h) => live.extend(image_contents(&h).into_keys()),
                Err(_) => {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        let dir = self.root.join("contents/sha256");
        let (mut n, mut bytes) = (0, 0);
        for e in std::fs::read_dir(&dir).map_err(io(&dir, "list"))?.flatten() {
            let keep = e
                .file_name()
                .to_str()
                .and_then(|h| format!("sha256:{h}").parse::<Digest>().ok())
                .is_some_and(|d| live.contains(&d));
            if !keep {
                bytes += e.metadata().map_or(0, |m| m.len());
                std::fs::remove_file(e.path()).map_err(io(&e.path(), "remove"))?;
                n += 1;
            }
        }
        Ok((n, bytes))
    }

    pub fn trace_path(&self, d: &Digest) -> PathBuf {
        self.root.join("traces/sha256").join(d.hex())
    }
}

/// Every content an image's files refer to, with its size (the bundle's content table lists only
/// the contents that bundle carried).
pub fn image_contents(h: &Header) -> std::collections::HashMap<Digest, u64> {
    h.entries
        .iter()
        .filter_map(|e| match e.kind {
            starlight_format::Kind::File { size, digest: Some(d) } => Some((d, size)),
            _ => None,
        })
        .collect()
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// A header as the store keeps it: the bundle preamble and the compressed header record, which
/// the verifying decoder reads back.
fn encode_saved(h: &Header) -> Vec<u8> {
    let encoded = encode_header(h);
    compress_header(&encoded, 3).unwrap_or(encoded)
}

fn decode_saved(data: &[u8]) -> Result<Header, String> {
    let mut dec = Decoder::new();
    for ev in dec.feed(data).map_err(|e| e.to_string())? {
        if let Event::Header(h) = ev {
            return Ok(*h);
        }
    }
    Err("no bundle header in it".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references() {
        let r = Reference::parse("library/debian:12").unwrap();
        assert_eq!((r.name.as_str(), r.reference.as_str()), ("library/debian", "12"));
        assert_eq!(Reference::parse("app").unwrap().reference, "latest");
        let d = Digest::of(b"x");
        let r = Reference::parse(&format!("a/b@{d}")).unwrap();
        assert_eq!(r.digest(), Some(d));
        assert_eq!(r.to_string(), format!("a/b@{d}"));
        assert!(Reference::parse("Bad/Name:1").unwrap_err().contains("not a repository name"));
        assert!(Reference::parse("a@sha256:zz").unwrap_err().contains("bad digest"));
        assert!(Reference::parse("a:b c").unwrap_err().contains("not a tag"));
    }

    #[test]
    fn contents_appear_only_whole_and_gc_keeps_what_images_use() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let (a, b) = (b"alpha".to_vec(), b"beta".to_vec());
        let (da, db) = (Digest::of(&a), Digest::of(&b));
        s.put(&da, &a).unwrap();
        s.put(&db, &b).unwrap();
        assert!(s.has(&da, 5) && !s.has(&da, 4));
        let mut header = crate::testing::header(vec![crate::testing::entry(
            "a",
            starlight_format::Kind::File { size: 5, digest: Some(da) },
        )]);
        header.contents = vec![starlight_format::bundle::ContentRef { digest: da, size: 5 }];
        let r = Reference::parse("x/y:1").unwrap();
        let meta = s.save_image(&r, &header).unwrap();
        assert_eq!(meta.tags, vec!["1".to_string()]);
        assert_eq!(s.find(&r).unwrap().unwrap().digest, header.manifest_digest.to_string());
        assert_eq!(s.header(&header.manifest_digest).unwrap(), header);
        assert_eq!(s.gc().unwrap(), (1, 4));
        assert!(s.has(&da, 5) && !s.has(&db, 4));
        s.remove(&r).unwrap();
        assert!(s.find(&r).unwrap().is_none());
        assert_eq!(s.gc().unwrap(), (1, 5));
    }
}
