//! Writes an image's root filesystem from the store into a directory, as a standard unpack does.
//!
//! Every entry is created relative to a directory file descriptor whose path was resolved with
//! `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`: a symlink in the image (`etc -> /`) can never
//! send a later entry outside the target directory. Contents are reflinked from the store where
//! the filesystem can, and copied (`copy_file_range`) where it cannot.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

use starlight_format::bundle::Header;
use starlight_format::{Entry, Kind};

use crate::store::Store;

/// Why an export stopped, and at which entry.
#[derive(Debug, thiserror::Error)]
#[error("export {path}: {op}: {source}")]
pub struct ExportError {
    pub path: String,
    pub op: &'static str,
    #[source]
    pub source: std::io::Error,
}

/// How the contents were placed.
#[derive(Clone, Copy, Debug, Default)]
pub struct ExportStats {
    pub files: u64,
    pub reflinked: u64,
    pub copied: u64,
    pub bytes: u64,
}

fn cstr(b: &[u8]) -> std::io::Result<CString> {
    CString::new(b).map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "NUL in a name"))
}

fn check(rc: libc::c_int) -> std::io::Result<()> {
    if rc < 0 { Err(std::io::Error::last_os_error()) } else { Ok(()) }
}

/// Opens directory `rel` beneath `root` without following any symlink.
fn open_beneath(root: RawFd, rel: &[u8]) -> std::io::Result<OwnedFd> {
    let path = cstr(if rel.is_empty() { b"." } else { rel })?;
    // SAFETY: open_how is plain data; all zeroes is a valid value.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (libc::O_DIRECTORY | libc::O_RDONLY | libc::O_CLOEXEC) as u64;
    how.resolve = libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: valid C string and a properly sized open_how; the kernel returns a new fd or -1.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            root,
            path.as_ptr(),
            &how as *const libc::open_how,
            size_of_val(&how),
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just gave us this fd.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Writes the filesystem of `header` under `dest`, which must be missing or empty.
pub fn export(store: &Store, header: &Header, dest: &Path) -> Result<ExportStats, ExportError> {
    let top = |op: &'static str| {
        let p = dest.display().to_string();
        move |source| ExportError { path: p, op, source }
    };
    std::fs::create_dir_all(dest).map_err(top("create"))?;
    if std::fs::read_dir(dest).map_err(top("list"))?.next().is_some() {
        return Err(top("check")(std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            "the target directory is not empty",
        )));
    }
    let root = File::open(dest).map_err(top("open"))?;
    let mut stats = ExportStats::default();
    let mut dirs: Vec<&Entry> = Vec::new();
    for e in &header.entries {
        let err = |op: &'static str| {
            let p = String::from_utf8_lossy(&e.path).into_owned();
            move |source| ExportError { path: p, op, source }
        };
        if !starlight_format::path::is_normal(&e.path) {
            return Err(err("check path")(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "not a normalized relative path",
            )));
        }
        if e.path.is_empty() {
            if matches!(e.kind, Kind::Dir) {
                dirs.push(e);
            }
            continue;
        }
        let parent = open_beneath(root.as_raw_fd(), starlight_format::path::parent(&e.path))
            .map_err(err("open parent directory"))?;
        let pfd = parent.as_raw_fd();
        let name = cstr(starlight_format::path::file_name(&e.path)).map_err(err("name"))?;
        match &e.kind {
            Kind::Dir => {
                // SAFETY: valid fd and C string.
                check(unsafe { libc::mkdirat(pfd, name.as_ptr(), 0o700) }).map_err(err("mkdir"))?;
                dirs.push(e);
                continue;
            }
            Kind::File { size, digest } => {
                // SAFETY: valid fd and C string; O_EXCL|O_NOFOLLOW never reuses what is there.
                let fd = unsafe {
                    libc::openat(
                        pfd,
                        name.as_ptr(),
                        libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                        0o600,
                    )
                };
                check(fd).map_err(err("create file"))?;
                // SAFETY: the fd was just opened.
                let mut out = unsafe { File::from_raw_fd(fd) };
                stats.files += 1;
                if let Some(d) = digest {
                    let src = store.content_path(d);
                    let mut input = File::open(&src).map_err(err("open content in the store"))?;
                    // SAFETY: FICLONE on two fds we own.
                    if unsafe { libc::ioctl(out.as_raw_fd(), libc::FICLONE, input.as_raw_fd()) } == 0 {
                        stats.reflinked += 1;
                    } else {
                        let n = std::io::copy(&mut input, &mut out).map_err(err("copy content"))?;
                        if n != *size {
                            return Err(err("copy content")(std::io::Error::new(
                                std::io::ErrorKind::InvalidData,
                                format!("the store holds {n} bytes of content {d}, not {size}"),
                            )));
                        }
                        stats.copied += 1;
                    }
                    stats.bytes += size;
                }
            }
            Kind::Symlink { target } => {
                let t = cstr(target).map_err(err("symlink"))?;
                // SAFETY: valid C strings and fd.
                check(unsafe { libc::symlinkat(t.as_ptr(), pfd, name.as_ptr()) }).map_err(err("symlink"))?;
            }
            Kind::Hardlink { target } => {
                let tparent = open_beneath(root.as_raw_fd(), starlight_format::path::parent(target))
                    .map_err(err("open link target's directory"))?;
                let tname = cstr(starlight_format::path::file_name(target)).map_err(err("link"))?;
                // SAFETY: valid fds and C strings; flags 0 does not follow a symlink source.
                check(unsafe { libc::linkat(tparent.as_raw_fd(), tname.as_ptr(), pfd, name.as_ptr(), 0) })
                    .map_err(err("hard link"))?;
                continue; // shares its target's metadata
            }
            Kind::Char { major, minor } | Kind::Block { major, minor } => {
                let t = if matches!(e.kind, Kind::Char { .. }) { libc::S_IFCHR } else { libc::S_IFBLK };
                // SAFETY: valid fd and C string.
                check(unsafe { libc::mknodat(pfd, name.as_ptr(), t | 0o600, libc::makedev(*major, *minor)) })
                    .map_err(err("mknod"))?;
            }
            Kind::Fifo => {
                // SAFETY: valid fd and C string.
                check(unsafe { libc::mknodat(pfd, name.as_ptr(), libc::S_IFIFO | 0o600, 0) })
                    .map_err(err("mkfifo"))?;
            }
            Kind::Whiteout | Kind::Opaque => continue, // not in a flattened filesystem
        }
        metadata(pfd, &name, e).map_err(err("set metadata"))?;
    }
    // Directories last, deepest first: their children changed their times.
    for e in dirs.iter().rev() {
        let err = |op: &'static str| {
            let p = String::from_utf8_lossy(&e.path).into_owned();
            move |source| ExportError { path: p, op, source }
        };
        if e.path.is_empty() {
            metadata(root.as_raw_fd(), c".", e).map_err(err("set metadata"))?;
        } else {
            let parent = open_beneath(root.as_raw_fd(), starlight_format::path::parent(&e.path))
                .map_err(err("open parent directory"))?;
            let name = cstr(starlight_format::path::file_name(&e.path)).map_err(err("name"))?;
            metadata(parent.as_raw_fd(), &name, e).map_err(err("set metadata"))?;
        }
    }
    Ok(stats)
}

/// Owner, then mode (chown clears setuid), xattrs, then times, as tar does; never following a
/// symlink.
fn metadata(pfd: RawFd, name: &std::ffi::CStr, e: &Entry) -> std::io::Result<()> {
    // SAFETY (all calls below): valid fd and C strings; AT_SYMLINK_NOFOLLOW where it applies.
    check(unsafe { libc::fchownat(pfd, name.as_ptr(), e.uid, e.gid, libc::AT_SYMLINK_NOFOLLOW) })?;
    let symlink = matches!(e.kind, Kind::Symlink { .. });
    if !symlink {
        check(unsafe { libc::fchmodat(pfd, name.as_ptr(), e.mode as libc::mode_t, 0) })?;
    }
    if !e.xattrs.is_empty() {
        // The parent fd's /proc link is the directory itself; the name is not followed (l*xattr).
        let mut p = format!("/proc/self/fd/{pfd}/").into_bytes();
        p.extend_from_slice(name.to_bytes());
        let p = cstr(&p)?;
        for (k, v) in &e.xattrs {
            let k = cstr(k)?;
            check(unsafe { libc::lsetxattr(p.as_ptr(), k.as_ptr(), v.as_ptr().cast(), v.len(), 0) })?;
        }
    }
    let ts = libc::timespec { tv_sec: e.mtime as libc::time_t, tv_nsec: e.mtime_nsec as libc::c_long };
    let times = [ts, ts];
    check(unsafe { libc::utimensat(pfd, name.as_ptr(), times.as_ptr(), libc::AT_SYMLINK_NOFOLLOW) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{entry, header};
    use starlight_format::Digest;

    /// A hostile header: a symlink to a directory outside, then entries written "through" it.
    /// Nothing may land outside the target.
    #[test]
    fn entries_through_symlinks_never_leave_the_target() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join("store")).unwrap();
        let data = b"owned".to_vec();
        let d = Digest::of(&data);
        store.put(&d, &data).unwrap();
        let outside = dir.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        let file = |p: &str| entry(p, Kind::File { size: 5, digest: Some(d) });
        let cases = [
            vec![entry("etc", Kind::Symlink { target: outside.to_str().unwrap().into() }), file("etc/evil")],
            vec![entry("up", Kind::Symlink { target: b"../outside".to_vec() }), file("up/evil")],
            vec![
                entry("etc", Kind::Symlink { target: outside.to_str().unwrap().into() }),
                entry("etc/d", Kind::Dir),
            ],
            vec![
                entry("etc", Kind::Symlink { target: outside.to_str().unwrap().into() }),
                entry("h", Kind::Hardlink { target: b"etc/victim".to_vec() }),
            ],
        ];
        std::fs::write(outside.join("victim"), b"keep").unwrap();
        for (i, entries) in cases.into_iter().enumerate() {
            let target = dir.path().join(format!("t{i}"));
            let err = export(&store, &header(entries), &target).unwrap_err();
            assert!(err.to_string().contains("open"), "case {i}: {err}");
            let left: Vec<_> =
                std::fs::read_dir(&outside).unwrap().flatten().map(|e| e.file_name()).collect();
            assert_eq!(left, vec![std::ffi::OsString::from("victim")], "case {i} wrote outside");
            assert_eq!(std::fs::read(outside.join("victim")).unwrap(), b"keep");
        }
        // Paths that are not normalized are refused before anything is written.
        let err = export(&store, &header(vec![file("../evil")]), &dir.path().join("t9")).unwrap_err();
        assert!(err.to_string().contains("not a normalized relative path"), "{err}");
        assert!(!dir.path().join("evil").exists());
    }
}
