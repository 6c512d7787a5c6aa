//! Snapshots of directory trees, attribute for attribute, and their differences: how tests check
//! that what Starlight materializes equals what a standard unpack gives.

use std::collections::{BTreeMap, HashMap};
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use sha2::{Digest as _, Sha256};

/// Everything compared about one path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    /// `f` file, `d` directory, `l` symlink, `c`/`b` devices, `p` fifo, `s` socket.
    pub kind: char,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub mtime: (i64, i64),
    pub rdev: u64,
    pub target: Option<Vec<u8>>,
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    /// SHA-256 of a regular file's bytes.
    pub content: Option<[u8; 32]>,
    /// For files with more than one link: the smallest path sharing the inode.
    pub link_group: Option<Vec<u8>>,
}

/// What to leave out of a comparison.
#[derive(Clone, Copy, Debug, Default)]
pub struct Options {
    /// Skip the root directory's own attributes (an unpack's root is created by the tool).
    pub skip_root: bool,
    /// Skip directory mtimes (a tool that creates parents implicitly cannot know them).
    pub skip_dir_mtimes: bool,
}

/// Walks `root` (without following symlinks) and records every path relative to it.
pub fn snapshot(root: &Path) -> std::io::Result<BTreeMap<Vec<u8>, Node>> {
    let mut out = BTreeMap::new();
    let mut inodes: HashMap<(u64, u64), Vec<u8>> = HashMap::new();
    let mut stack = vec![Vec::<u8>::new()];
    while let Some(rel) = stack.pop() {
        let path = root.join(std::ffi::OsStr::from_bytes(&rel));
        let m = std::fs::symlink_metadata(&path)?;
        let ft = m.file_type();
        use std::os::unix::fs::FileTypeExt;
        let kind = if ft.is_file() {
            'f'
        } else if ft.is_dir() {
            'd'
        } else if ft.is_symlink() {
            'l'
        } else if ft.is_char_device() {
            'c'
        } else if ft.is_block_device() {
            'b'
        } else if ft.is_fifo() {
            'p'
        } else {
            's'
        };
        let content = if kind == 'f' {
            use std::io::Read;
            let mut h = Sha256::new();
            let mut f = std::fs::File::open(&path)?;
            let mut buf = vec![0u8; 1 << 16];
            loop {
                let n = f.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                h.update(&buf[..n]);
            }
            Some(h.finalize().into())
        } else {
            None
        };
        let target = (kind == 'l')
            .then(|| std::fs::read_link(&path).map(|t| t.as_os_str().as_bytes().to_vec()))
            .transpose()?;
        if kind != 'd' && m.nlink() > 1 {
            inodes.entry((m.dev(), m.ino())).or_insert_with(|| rel.clone());
        }
        out.insert(
            rel.clone(),
            Node {
                kind,
                mode: m.mode() & 0o7777,
                uid: m.uid(),
                gid: m.gid(),
                size: if kind == 'd' { 0 } else { m.size() },
                mtime: (m.mtime(), m.mtime_nsec()),
                rdev: if kind == 'c' || kind == 'b' { m.rdev() } else { 0 },
                target,
                xattrs: xattrs(&path)?,
                content,
                link_group: None,
            },
        );
        if kind == 'd' {
            for child in std::fs::read_dir(&path)? {
                let name = child?.file_name();
                let mut r = rel.clone();
                if !r.is_empty() {
                    r.push(b'/');
                }
                r.extend_from_slice(name.as_bytes());
                stack.push(r);
            }
        }
    }
    // Name each hardlink group by its smallest path, so that groups compare across trees.
    let mut groups: HashMap<(u64, u64), Vec<u8>> = HashMap::new();
    for (rel, _) in out.iter() {
        let m = std::fs::symlink_metadata(root.join(std::ffi::OsStr::from_bytes(rel)))?;
        if inodes.contains_key(&(m.dev(), m.ino())) {
            let e = groups.entry((m.dev(), m.ino())).or_insert_with(|| rel.clone());
            if rel < e {
                *e = rel.clone();
            }
        }
    }
    for (rel, node) in out.iter_mut() {
        let m = std::fs::symlink_metadata(root.join(std::ffi::OsStr::from_bytes(rel)))?;
        node.link_group = groups.get(&(m.dev(), m.ino())).cloned();
    }
    Ok(out)
}

fn xattrs(path: &Path) -> std::io::Result<BTreeMap<Vec<u8>, Vec<u8>>> {
    let c = CString::new(path.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    let mut names = vec![0u8; 64 * 1024];
    // SAFETY: `c` is a valid path and `names` a writable buffer of the given length.
    let n = unsafe { libc::llistxattr(c.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    if n < 0 {
        let e = std::io::Error::last_os_error();
        return if e.raw_os_error() == Some(libc::ENOTSUP) { Ok(BTreeMap::new()) } else { Err(e) };
    }
    names.truncate(n as usize);
    let mut out = BTreeMap::new();
    for name in names.split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let cn = CString::new(name).map_err(std::io::Error::other)?;
        let mut value = vec![0u8; 64 * 1024];
        // SAFETY: valid strings and a writable buffer of the given length.
        let len = unsafe { libc::lgetxattr(c.as_ptr(), cn.as_ptr(), value.as_mut_ptr().cast(), value.len()) };
        if len < 0 {
            return Err(std::io::Error::last_os_error());
        }
        value.truncate(len as usize);
        out.insert(name.to_vec(), value);
    }
    Ok(out)
}

/// Lists every difference between two snapshots, one line each; empty when they are equal.
pub fn diff(want: &BTreeMap<Vec<u8>, Node>, got: &BTreeMap<Vec<u8>, Node>, opts: Options) -> Vec<String> {
    let mut out = Vec::new();
    let show = |p: &[u8]| String::from_utf8_lossy(p).into_owned();
    for (path, w) in want {
        if opts.skip_root && path.is_empty() {
            continue;
        }
        let Some(g) = got.get(path) else {
            out.push(format!("{}: missing", show(path)));
            continue;
        };
        let mut w = w.clone();
        let mut g = g.clone();
        if opts.skip_dir_mtimes && w.kind == 'd' {
            w.mtime = (0, 0);
            g.mtime = (0, 0);
        }
        if w != g {
            out.push(format!("{}: want {w:?}, got {g:?}", show(path)));
        }
    }
    for path in got.keys() {
        if !(want.contains_key(path) || opts.skip_root && path.is_empty()) {
            out.push(format!("{}: unexpected", show(path)));
        }
    }
    out
}

/// Snapshots both trees and fails with the list of differences if they differ.
pub fn assert_same_tree(want: &Path, got: &Path, opts: Options) {
    let a = snapshot(want).unwrap_or_else(|e| panic!("snapshot of {}: {e}", want.display()));
    let b = snapshot(got).unwrap_or_else(|e| panic!("snapshot of {}: {e}", got.display()));
    let d = diff(&a, &b, opts);
    assert!(
        d.is_empty(),
        "trees differ ({} vs {}), {} differences:\n{}",
        want.display(),
        got.display(),
        d.len(),
        d.iter().take(50).cloned().collect::<Vec<_>>().join("\n")
    );
    assert!(a.len() > 1, "the tree {} is empty: nothing was compared", want.display());
}
