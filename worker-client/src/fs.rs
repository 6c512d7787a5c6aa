//! A read-only FUSE filesystem of an image, served while its bundle is still arriving.
//!
//! Metadata comes from the bundle header, so every lookup, getattr, readdir, readlink and xattr
//! call is answered at once. A read of a file whose content has not arrived parks its reply; the
//! arrival of that content (from the bundle, or fetched out of band when it is far down the stream)
//! answers it. A parked read past its deadline, or after the pull failed, gets EIO.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, Generation, INodeNo, OpenFlags, ReplyAttr, ReplyData,
    ReplyDirectory, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyXattr, Request,
};
use starlight_format::bundle::Header;
use starlight_format::{Digest, Kind};

/// How long the kernel may cache answers: the image never changes.
const TTL: Duration = Duration::from_secs(3600);

/// Store files kept open for reads.
const MAX_OPEN_FILES: usize = 256;

/// One inode.
#[derive(Debug)]
struct Node {
    path: Vec<u8>,
    kind: FileType,
    perm: u16,
    uid: u32,
    gid: u32,
    mtime: SystemTime,
    size: u64,
    nlink: u32,
    rdev: u32,
    digest: Option<Digest>,
    target: Vec<u8>,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    parent: u64,
    /// Sorted by name.
    children: Vec<(Vec<u8>, u64)>,
}

/// The inode table of an image (inode 1 is the root).
#[derive(Debug)]
pub struct Tree {
    nodes: Vec<Node>,
}

fn time(sec: i64, nsec: u32) -> SystemTime {
    if sec >= 0 {
        UNIX_EPOCH + Duration::new(sec as u64, nsec)
    } else {
        UNIX_EPOCH - Duration::from_secs(sec.unsigned_abs())
    }
}

impl Tree {
    /// Builds the inode table from a header's flattened entries (parents before children).
    pub fn new(header: &Header) -> Result<Tree, String> {
        let root = Node {
            path: vec![],
            kind: FileType::Directory,
            perm: 0o755,
            uid: 0,
            gid: 0,
            mtime: UNIX_EPOCH,
            size: 0,
            nlink: 2,
            rdev: 0,
            digest: None,
            target: vec![],
            xattrs: vec![],
            parent: 1,
            children: vec![],
        };
        let mut nodes = vec![root];
        let mut by_path: HashMap<&[u8], u64> = HashMap::from([(&b""[..], 1)]);
        for e in &header.entries {
            let show = || String::from_utf8_lossy(&e.path).into_owned();
            if !starlight_format::path::is_normal(&e.path) {
                return Err(format!("entry {:?}: not a normalized path", show()));
            }
            let (kind, size, digest, target, rdev) = match &e.kind {
                Kind::File { size, digest } => (FileType::RegularFile, *size, *digest, vec![], 0),
                Kind::Dir => (FileType::Directory, 0, None, vec![], 0),
                Kind::Symlink { target } => (FileType::Symlink, target.len() as u64, None, target.clone(), 0),
                Kind::Char { major, minor } => {
                    (FileType::CharDevice, 0, None, vec![], libc::makedev(*major, *minor) as u32)
                }
                Kind::Block { major, minor } => {
                    (FileType::BlockDevice, 0, None, vec![], libc::makedev(*major, *minor) as u32)
                }
                Kind::Fifo => (FileType::NamedPipe, 0, None, vec![], 0),
                Kind::Hardlink { target } => {
                    let ino = *by_path
                        .get(target.as_slice())
                        .ok_or_else(|| format!("entry {:?}: hard link to a missing path", show()))?;
                    let parent = *by_path
                        .get(starlight_format::path::parent(&e.path))
                        .ok_or_else(|| format!("entry {:?}: no parent directory", show()))?;
                    nodes[ino as usize - 1].nlink += 1;
                    nodes[parent as usize - 1]
                        .children
                        .push((starlight_format::path::file_name(&e.path).to_vec(), ino));
                    by_path.insert(&e.path, ino);
                    continue;
                }
                Kind::Whiteout | Kind::Opaque => continue,
            };
            let node = Node {
                path: e.path.clone(),
                kind,
                perm: (e.mode & 0o7777) as u16,
                uid: e.uid,
                gid: e.gid,
                mtime: time(e.mtime, e.mtime_nsec),
                size,
                nlink: if kind == FileType::Directory { 2 } else { 1 },
                rdev,
                digest,
                target,
                xattrs: e.xattrs.clone(),
                parent: 1,
                children: vec![],
            };
            if e.path.is_empty() {
                let children = std::mem::take(&mut nodes[0].children);
                nodes[0] = Node { parent: 1, children, ..node };
                continue;
            }
            let parent = *by_path
                .get(starlight_format::path::parent(&e.path))
                .ok_or_else(|| format!("entry {:?}: no parent directory", show()))?;
            if nodes[parent as usize - 1].kind != FileType::Directory {
                return Err(format!("entry {:?}: its parent is not a directory", show()));
            }
            let ino = nodes.len() as u64 + 1;
            if kind == FileType::Directory {
                nodes[parent as usize - 1].nlink += 1;
            }
            nodes.push(Node { parent, ..node });
            nodes[parent as usize - 1]
                .children
                .push((starlight_format::path::file_name(&e.path).to_vec(), ino));
            by_path.insert(&e.path, ino);
        }
        for n in &mut nodes {
            n.children.sort();
            if n.children.windows(2).any(|w| w[0].0 == w[1].0) {
                return Err(format!("directory {:?} lists a name twice", String::from_utf8_lossy(&n.path)));
            }
        }
        Ok(Tree { nodes })
    }

    fn node(&self, ino: INodeNo) -> Option<&Node> {
        self.nodes.get((ino.0 as usize).checked_sub(1)?)
    }

    fn attr(&self, ino: u64) -> FileAttr {
        let n = &self.nodes[ino as usize - 1];
        FileAttr {
            ino: INodeNo(ino),
            size: n.size,
            blocks: n.size.div_ceil(512),
            atime: n.mtime,
            mtime: n.mtime,
            ctime: n.mtime,
            crtime: n.mtime,
            kind: n.kind,
            perm: n.perm,
            nlink: n.nlink,
            uid: n.uid,
            gid: n.gid,
            rdev: n.rdev,
            blksize: 4096,
            flags: 0,
        }
    }

    /// The inode of `path` (relative, normalized), if any.
    pub fn lookup_path(&self, path: &[u8]) -> Option<u64> {
        let mut ino = 1u64;
        for comp in path.split(|&b| b == b'/').filter(|c| !c.is_empty()) {
            let n = &self.nodes[ino as usize - 1];
            let i = n.children.binary_search_by(|(name, _)| name.as_slice().cmp(comp)).ok()?;
            ino = n.children[i].1;
        }
        Some(ino)
    }
}

/// A read waiting for its content.
struct Waiter {
    offset: u64,
    size: u32,
    reply: ReplyData,
    deadline: Instant,
}

#[derive(Default)]
struct State {
    /// Contents in the store, by digest.
    ready: HashMap<Digest, PathBuf>,
    waiting: HashMap<Digest, Vec<Waiter>>,
    /// Asked for out of band.
    fetching: HashSet<Digest>,
    /// The pull failed: reads of what has not arrived fail at once.
    failed: Option<String>,
    /// Contents that have arrived, to tell how far down the stream a content is.
    arrived: u64,
    /// Open store files of recently read contents.
    files: HashMap<Digest, Arc<File>>,
    closed: bool,
}

/// Asks for one content out of band; calls back [`Contents::arrived`] or [`Contents::fetch_failed`].
pub type Fetcher = dyn Fn(Digest, u64) + Send + Sync;

/// Which contents the filesystem can serve, and the reads waiting for the others.
pub struct Contents {
    state: Mutex<State>,
    wake: Condvar,
    /// Position of each content in the bundle stream.
    position: HashMap<Digest, u64>,
    sizes: HashMap<Digest, u64>,
    fetcher: Option<Box<Fetcher>>,
    /// A content more than this many places ahead of the stream is fetched out of band.
    far: u64,
    timeout: Duration,
}

impl std::fmt::Debug for Contents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Contents").field("contents", &self.sizes.len()).finish()
    }
}

impl Contents {
    /// The contents of `header`; those `present` are served from the store at once.
    pub fn new(
        header: &Header,
        present: impl Fn(&Digest, u64) -> Option<PathBuf>,
        fetcher: Option<Box<Fetcher>>,
        timeout: Duration,
    ) -> Arc<Contents> {
        let sizes = crate::store::image_contents(header);
        let position = header.contents.iter().enumerate().map(|(i, c)| (c.digest, i as u64)).collect();
        let mut state = State::default();
        for (d, size) in &sizes {
            if let Some(p) = present(d, *size) {
                state.ready.insert(*d, p);
            }
        }
        let c = Arc::new(Contents {
            state: Mutex::new(state),
            wake: Condvar::new(),
            position,
            sizes,
            fetcher,
            far: 8,
            timeout,
        });
        let weak = Arc::downgrade(&c);
        std::thread::Builder::new()
            .name("starlight-fs-timeouts".into())
            .spawn(move || expire(weak))
            .expect("spawn a thread");
        c
    }

    /// Whether every content is in the store.
    pub fn complete(&self) -> bool {
        self.state.lock().unwrap().ready.len() == self.sizes.len()
    }

    pub fn is_ready(&self, d: &Digest) -> bool {
        self.state.lock().unwrap().ready.contains_key(d)
    }

    /// Content `d` is in the store at `path`: answer the reads waiting for it.
    pub fn arrived(&self, d: &Digest, path: &Path) {
        let waiters = {
            let mut s = self.state.lock().unwrap();
            s.arrived += 1;
            s.fetching.remove(d);
            s.ready.insert(*d, path.to_path_buf());
            s.waiting.remove(d).unwrap_or_default()
        };
        if waiters.is_empty() {
            return;
        }
        match File::open(path) {
            Ok(f) => {
                for w in waiters {
                    answer(&f, w.offset, w.size, w.reply);
                }
            }
            Err(_) => waiters.into_iter().for_each(|w| w.reply.error(Errno::EIO)),
        }
    }

    /// An out-of-band fetch of `d` failed: its waiting reads get EIO.
    pub fn fetch_failed(&self, d: &Digest, why: &str) {
        tracing::warn!(content = %d, "out-of-band fetch failed: {why}");
        let waiters = {
            let mut s = self.state.lock().unwrap();
            s.fetching.remove(d);
            s.waiting.remove(d).unwrap_or_default()
        };
        waiters.into_iter().for_each(|w| w.reply.error(Errno::EIO));
    }

    /// The pull failed: every waiting read gets EIO, and so will reads of what is missing.
    pub fn failed(&self, why: &str) {
        let waiting = {
            let mut s = self.state.lock().unwrap();
            s.failed = Some(why.to_string());
            std::mem::take(&mut s.waiting)
        };
        waiting.into_values().flatten().for_each(|w| w.reply.error(Errno::EIO));
    }

    /// Serves a read of `d` now, or parks it until `d` arrives.
    fn read(&self, d: Digest, offset: u64, size: u32, reply: ReplyData) {
        let mut s = self.state.lock().unwrap();
        if let Some(f) = s.files.get(&d).cloned() {
            drop(s);
            return answer(&f, offset, size, reply);
        }
        if let Some(p) = s.ready.get(&d).cloned() {
            drop(s);
            let f = match File::open(p) {
                Ok(f) => Arc::new(f),
                Err(_) => return reply.error(Errno::EIO),
            };
            answer(&f, offset, size, reply);
            let mut s = self.state.lock().unwrap();
            if s.files.len() >= MAX_OPEN_FILES {
                s.files.clear();
            }
            s.files.insert(d, f);
            return;
        }
        if s.failed.is_some() || s.closed {
            drop(s);
            reply.error(Errno::EIO);
            return;
        }
        let ahead = self.position.get(&d).map_or(u64::MAX, |p| p.saturating_sub(s.arrived));
        let fetch = ahead > self.far && self.fetcher.is_some() && s.fetching.insert(d);
        let first = !s.waiting.contains_key(&d);
        s.waiting.entry(d).or_default().push(Waiter {
            offset,
            size,
            reply,
            deadline: Instant::now() + self.timeout,
        });
        drop(s);
        if first {
            self.wake.notify_all();
        }
        if fetch && let Some(f) = &self.fetcher {
            f(d, self.sizes.get(&d).copied().unwrap_or(0));
        }
    }
}

impl Drop for Contents {
    fn drop(&mut self) {
        let s = self.state.get_mut().unwrap();
        s.closed = true;
        for w in std::mem::take(&mut s.waiting).into_values().flatten() {
            w.reply.error(Errno::EIO);
        }
    }
}

/// Fails parked reads past their deadline. Sleeps until the earliest deadline or a new wait.
fn expire(c: std::sync::Weak<Contents>) {
    loop {
        let Some(c) = c.upgrade() else { return };
        let mut s = c.state.lock().unwrap();
        let now = Instant::now();
        let mut expired = Vec::new();
        for ws in s.waiting.values_mut() {
            let (gone, keep): (Vec<_>, Vec<_>) =
                std::mem::take(ws).into_iter().partition(|w| w.deadline <= now);
            *ws = keep;
            expired.extend(gone);
        }
        s.waiting.retain(|_, ws| !ws.is_empty());
        let next = s.waiting.values().flatten().map(|w| w.deadline).min();
        let wait = next.map_or(Duration::from_secs(1), |d| d.saturating_duration_since(now));
        let s = c.wake.wait_timeout(s, wait).unwrap().0;
        drop(s);
        for w in expired {
            w.reply.error(Errno::EIO);
        }
    }
}

fn answer(f: &File, offset: u64, size: u32, reply: ReplyData) {
    let mut buf = vec![0u8; size as usize];
    let mut n = 0;
    while n < buf.len() {
        match f.read_at(&mut buf[n..], offset + n as u64) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return reply.error(Errno::EIO),
        }
    }
    reply.data(&buf[..n]);
}

/// The order in which files were first opened.
#[derive(Debug, Default)]
pub struct Trace {
    seen: Mutex<(HashSet<u64>, Vec<Vec<u8>>)>,
}

impl Trace {
    fn record(&self, ino: u64, path: &[u8]) {
        let mut s = self.seen.lock().unwrap();
        if s.0.insert(ino) {
            s.1.push(path.to_vec());
        }
    }

    /// Paths (relative to the root) in first-use order.
    pub fn paths(&self) -> Vec<Vec<u8>> {
        self.seen.lock().unwrap().1.clone()
    }
}

/// The FUSE filesystem of one image.
pub struct ImageFs {
    tree: Arc<Tree>,
    contents: Arc<Contents>,
    trace: Arc<Trace>,
}

impl std::fmt::Debug for ImageFs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImageFs").field("inodes", &self.tree.nodes.len()).finish()
    }
}

impl ImageFs {
    pub fn new(tree: Arc<Tree>, contents: Arc<Contents>, trace: Arc<Trace>) -> ImageFs {
        ImageFs { tree, contents, trace }
    }
}

impl Filesystem for ImageFs {
    fn init(&mut self, _req: &Request, config: &mut fuser::KernelConfig) -> std::io::Result<()> {
        // Directory listings carry attributes (no lookup per entry), and large read-ahead.
        let _ = config.add_capabilities(fuser::InitFlags::FUSE_DO_READDIRPLUS);
        let _ = config.set_max_readahead(1 << 20);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let Some(p) = self.tree.node(parent) else { return reply.error(Errno::ENOENT) };
        match p.children.binary_search_by(|(n, _)| n.as_slice().cmp(name.as_bytes())) {
            Ok(i) => reply.entry(&TTL, &self.tree.attr(p.children[i].1), Generation(0)),
            Err(_) => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.tree.node(ino) {
            Some(_) => reply.attr(&TTL, &self.tree.attr(ino.0)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.tree.node(ino) {
            Some(n) if n.kind == FileType::Symlink => reply.data(&n.target),
            Some(_) => reply.error(Errno::EINVAL),
            None => reply.error(Errno::ENOENT),
        }
    }

    /// No open (nor release): the kernel then opens without asking (FUSE_NO_OPEN_SUPPORT) and
    /// keeps the page cache, which saves two round trips per file. The mount is read-only, so
    /// the kernel refuses writes itself; first use is recorded at the first read.
    fn open(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        reply.error(Errno::ENOSYS);
    }

    fn opendir(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        reply.error(Errno::ENOSYS);
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyData,
    ) {
        let Some(n) = self.tree.node(ino) else { return reply.error(Errno::ENOENT) };
        let Some(d) = n.digest else { return reply.data(&[]) };
        if offset >= n.size {
            return reply.data(&[]);
        }
        self.trace.record(ino.0, &n.path);
        let size = size.min((n.size - offset).min(u32::MAX as u64) as u32);
        self.contents.read(d, offset, size, reply);
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let Some(n) = self.tree.node(ino) else { return reply.error(Errno::ENOENT) };
        let mut i = offset as usize;
        loop {
            let full = match i {
                0 => reply.add(ino, 1, FileType::Directory, "."),
                1 => reply.add(INodeNo(n.parent), 2, FileType::Directory, ".."),
                _ => match n.children.get(i - 2) {
                    Some((name, child)) => reply.add(
                        INodeNo(*child),
                        i as u64 + 1,
                        self.tree.nodes[*child as usize - 1].kind,
                        OsStr::from_bytes(name),
                    ),
                    None => break,
                },
            };
            if full {
                break;
            }
            i += 1;
        }
        reply.ok();
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: fuser::ReplyDirectoryPlus,
    ) {
        let Some(n) = self.tree.node(ino) else { return reply.error(Errno::ENOENT) };
        let mut i = offset as usize;
        loop {
            let (name, child): (&[u8], u64) = match i {
                0 => (b".", ino.0),
                1 => (b"..", n.parent),
                _ => match n.children.get(i - 2) {
                    Some((name, child)) => (name, *child),
                    None => break,
                },
            };
            let attr = self.tree.attr(child);
            if reply.add(INodeNo(child), i as u64 + 1, OsStr::from_bytes(name), &TTL, &attr, Generation(0)) {
                break;
            }
            i += 1;
        }
        reply.ok();
    }

    /// Nothing to flush on a read-only filesystem: ENOSYS tells the kernel to stop asking at
    /// every close.
    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: fuser::LockOwner,
        reply: fuser::ReplyEmpty,
    ) {
        reply.error(Errno::ENOSYS);
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let Some(n) = self.tree.node(ino) else { return reply.error(Errno::ENOENT) };
        match n.xattrs.iter().find(|(k, _)| k.as_slice() == name.as_bytes()) {
            None => reply.error(Errno::from_i32(libc::ENODATA)),
            Some((_, v)) if size == 0 => reply.size(v.len() as u32),
            Some((_, v)) if v.len() > size as usize => reply.error(Errno::from_i32(libc::ERANGE)),
            Some((_, v)) => reply.data(v),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let Some(n) = self.tree.node(ino) else { return reply.error(Errno::ENOENT) };
        let mut list = Vec::new();
        for (k, _) in &n.xattrs {
            list.extend_from_slice(k);
            list.push(0);
        }
        if size == 0 {
            reply.size(list.len() as u32)
        } else if list.len() > size as usize {
            reply.error(Errno::from_i32(libc::ERANGE))
        } else {
            reply.data(&list)
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let blocks: u64 = self.contents.sizes.values().map(|s| s.div_ceil(4096)).sum();
        reply.statfs(blocks, 0, 0, self.tree.nodes.len() as u64, 0, 4096, 255, 4096);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{entry, header};

    #[test]
    fn the_tree_follows_the_header_and_refuses_what_no_filesystem_can_be() {
        let d = Digest::of(b"x");
        let t = Tree::new(&header(vec![
            entry("", Kind::Dir),
            entry("bin", Kind::Dir),
            entry("bin/a", Kind::File { size: 1, digest: Some(d) }),
            entry("bin/b", Kind::Hardlink { target: b"bin/a".to_vec() }),
            entry("lib", Kind::Symlink { target: b"bin".to_vec() }),
        ]))
        .unwrap();
        let a = t.lookup_path(b"bin/a").unwrap();
        assert_eq!(t.lookup_path(b"bin/b"), Some(a), "a hard link is the same inode");
        assert_eq!(t.attr(a).nlink, 2);
        assert_eq!(t.attr(1).nlink, 3, "root: itself, its parent link, bin");
        assert_eq!(t.lookup_path(b"lib/a"), None, "lookups never follow symlinks");
        for (bad, why) in [
            (vec![entry("../x", Kind::Dir)], "not a normalized path"),
            (vec![entry("a/b", Kind::Dir)], "no parent directory"),
            (vec![entry("f", Kind::Fifo), entry("f/x", Kind::Fifo)], "not a directory"),
            (vec![entry("h", Kind::Hardlink { target: b"nope".to_vec() })], "missing path"),
            (vec![entry("a", Kind::Fifo), entry("a", Kind::Fifo)], "lists a name twice"),
        ] {
            let e = Tree::new(&header(bad)).unwrap_err();
            assert!(e.contains(why), "{e}");
        }
    }
}
