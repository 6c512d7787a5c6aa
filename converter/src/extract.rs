//! Writes a layer's entries into a directory exactly as extracting the original tar (GNU tar as
//! root, with `--xattrs --numeric-owner -p`) would: whiteouts and opaque markers stay as the
//! `.wh.` files they were. Used to check conversion fidelity and to materialize layers.

use std::ffi::CString;
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use starlight_format::{Digest, Entry, Kind, Toc};

/// Why an entry could not be written.
#[derive(Debug, thiserror::Error)]
#[error("extracting {path}: {op}: {source}")]
pub struct ExtractError {
    pub path: String,
    pub op: &'static str,
    #[source]
    pub source: std::io::Error,
}

/// Writes the entries of `toc` under `root`. `fetch` writes a content's bytes into an open file.
/// Directory metadata is applied last (children would change the mtimes), deepest first.
pub fn extract_layer(
    toc: &Toc,
    root: &Path,
    fetch: &mut dyn FnMut(&Digest, &mut File) -> std::io::Result<()>,
) -> Result<(), ExtractError> {
    let mut dirs: Vec<&Entry> = Vec::new();
    for e in &toc.entries {
        let (rel, is_marker) = tar_name(e);
        let dest = root.join(std::ffi::OsStr::from_bytes(&rel));
        let err = |op: &'static str| {
            let p = String::from_utf8_lossy(&rel).into_owned();
            move |source| ExtractError { path: p, op, source }
        };
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent).map_err(err("create parent directories"))?;
        }
        if !matches!(e.kind, Kind::Dir) || is_marker {
            // Like tar, replace what is there (a file from an earlier entry or layer).
            match std::fs::symlink_metadata(&dest) {
                Ok(m) if m.is_dir() => std::fs::remove_dir_all(&dest).map_err(err("replace directory"))?,
                Ok(_) => std::fs::remove_file(&dest).map_err(err("replace file"))?,
                Err(_) => {}
            }
        }
        match &e.kind {
            _ if is_marker => {
                File::create(&dest).map_err(err("create whiteout"))?;
            }
            Kind::File { digest, .. } => {
                let mut f = File::create(&dest).map_err(err("create file"))?;
                if let Some(d) = digest {
                    fetch(d, &mut f).map_err(err("write content"))?;
                }
            }
            Kind::Dir => {
                if !dest.is_dir() {
                    std::fs::create_dir(&dest).map_err(err("create directory"))?;
                }
                dirs.push(e);
                continue;
            }
            Kind::Symlink { target } => {
                std::os::unix::fs::symlink(std::ffi::OsStr::from_bytes(target), &dest)
                    .map_err(err("symlink"))?
            }
            Kind::Hardlink { target } => {
                let src = root.join(std::ffi::OsStr::from_bytes(target));
                std::fs::hard_link(&src, &dest).map_err(err("hard link"))?;
                continue; // a hard link shares its target's inode and metadata
            }
            Kind::Char { major, minor } => {
                mknod(&dest, libc::S_IFCHR, *major, *minor).map_err(err("mknod"))?
            }
            Kind::Block { major, minor } => {
                mknod(&dest, libc::S_IFBLK, *major, *minor).map_err(err("mknod"))?
            }
            Kind::Fifo => mknod(&dest, libc::S_IFIFO, 0, 0).map_err(err("mkfifo"))?,
            Kind::Whiteout | Kind::Opaque => unreachable!("markers handled above"),
        }
        apply_metadata(&dest, e, !matches!(e.kind, Kind::Symlink { .. })).map_err(err("set metadata"))?;
    }
    for e in dirs.iter().rev() {
        let (rel, _) = tar_name(e);
        let dest = root.join(std::ffi::OsStr::from_bytes(&rel));
        apply_metadata(&dest, e, true).map_err(|source| ExtractError {
            path: String::from_utf8_lossy(&rel).into_owned(),
            op: "set directory metadata",
            source,
        })?;
    }
    Ok(())
}

/// The name the entry had in the tar, and whether it is a whiteout or opaque marker file.
pub fn tar_name(e: &Entry) -> (Vec<u8>, bool) {
    let join = |dir: &[u8], name: &[u8]| {
        let mut p = dir.to_vec();
        if !p.is_empty() {
            p.push(b'/');
        }
        p.extend_from_slice(name);
        p
    };
    match e.kind {
        Kind::Opaque => (join(&e.path, b".wh..wh..opq"), true),
        Kind::Whiteout => {
            let parent = starlight_format::path::parent(&e.path);
            let mut name = b".wh.".to_vec();
            name.extend_from_slice(starlight_format::path::file_name(&e.path));
            (join(parent, &name), true)
        }
        _ => (e.path.clone(), false),
    }
}

fn cpath(p: &Path) -> std::io::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(std::io::Error::other)
}

fn check(rc: libc::c_int) -> std::io::Result<()> {
    if rc == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}

fn mknod(p: &Path, kind: libc::mode_t, major: u32, minor: u32) -> std::io::Result<()> {
    let c = cpath(p)?;
    // SAFETY: `c` is a valid NUL-terminated path; mknod has no other memory effects.
    check(unsafe { libc::mknod(c.as_ptr(), kind | 0o600, libc::makedev(major, minor)) })
}

/// Owner, then mode (chown clears setuid), xattrs, then times, as tar does.
fn apply_metadata(p: &Path, e: &Entry, chmod: bool) -> std::io::Result<()> {
    let c = cpath(p)?;
    // SAFETY: valid NUL-terminated path; lchown does not follow symlinks.
    check(unsafe { libc::lchown(c.as_ptr(), e.uid, e.gid) })?;
    if chmod {
        // SAFETY: valid path; the entry is not a symlink, so chmod acts on the entry itself.
        check(unsafe { libc::chmod(c.as_ptr(), e.mode as libc::mode_t) })?;
    }
    for (name, value) in &e.xattrs {
        let n = CString::new(name.clone()).map_err(std::io::Error::other)?;
        // SAFETY: valid NUL-terminated strings; `value` outlives the call.
        check(unsafe { libc::lsetxattr(c.as_ptr(), n.as_ptr(), value.as_ptr().cast(), value.len(), 0) })?;
    }
    let ts = libc::timespec { tv_sec: e.mtime as libc::time_t, tv_nsec: e.mtime_nsec as libc::c_long };
    let times = [ts, ts];
    // SAFETY: valid path and a two-element timespec array, as utimensat requires.
    check(unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), times.as_ptr(), libc::AT_SYMLINK_NOFOLLOW) })
}

/// A path under `root` for a normalized TOC path (for callers that compare trees).
pub fn host_path(root: &Path, rel: &[u8]) -> PathBuf {
    root.join(std::ffi::OsStr::from_bytes(rel))
}
