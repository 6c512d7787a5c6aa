//! Shared fixtures for the converter's integration tests: backends on real servers, a source tree
//! covering every tar feature, tars written by GNU tar, and layer round trips.
#![allow(dead_code)]

use std::collections::HashMap;
use std::ffi::CString;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::process::Command;

use starlight_conformance::servers::{Redis, RedisCluster, S3Server};
use starlight_converter::content::copy_content;
use starlight_converter::convert::load_toc;
use starlight_converter::index::{AnyIndex, Index, RedbIndex, RedisIndex};
use starlight_converter::layer::{Compression, Expect, Options};
use starlight_converter::store::{AnyStore, LocalStore, S3Store};
use starlight_converter::{Converter, LayerOutcome};
use starlight_format::{Digest, Toc};

pub type Conv = Converter<AnyStore, AnyIndex>;

/// A converter and the servers behind it (kept alive as long as this lives).
pub struct Backend {
    pub conv: Conv,
    pub name: &'static str,
    _servers: (Option<S3Server>, Option<Redis>, Option<RedisCluster>),
    _dir: tempfile::TempDir,
}

pub async fn local_redb() -> Backend {
    let dir = tempfile::tempdir().unwrap();
    let store = AnyStore::Local(LocalStore::open(dir.path().join("store")).unwrap());
    let index = AnyIndex::Redb(RedbIndex::open(dir.path().join("index.redb")).unwrap());
    backend("local dir + redb", store, index, dir, (None, None, None))
}

async fn s3_store(s3: &S3Server) -> AnyStore {
    let store = S3Store::with_config(
        "starlight",
        "test",
        &s3.endpoint(),
        s3.access_key(),
        s3.secret_key(),
        "us-east-1",
    )
    .await
    .unwrap();
    store.ensure_bucket().await.unwrap();
    AnyStore::S3(store)
}

pub async fn s3_redis() -> Backend {
    let (s3, redis) = (S3Server::start(), Redis::start());
    let store = s3_store(&s3).await;
    let index = AnyIndex::Redis(RedisIndex::single(&redis.url()).await.unwrap());
    backend("S3 + Redis", store, index, tempfile::tempdir().unwrap(), (Some(s3), Some(redis), None))
}

pub async fn s3_redis_cluster() -> Backend {
    let (s3, cluster) = (S3Server::start(), RedisCluster::start());
    let store = s3_store(&s3).await;
    let index = AnyIndex::Redis(RedisIndex::cluster(&cluster.urls()).await.unwrap());
    backend("S3 + Redis Cluster", store, index, tempfile::tempdir().unwrap(), (Some(s3), None, Some(cluster)))
}

fn backend(
    name: &'static str,
    store: AnyStore,
    index: AnyIndex,
    dir: tempfile::TempDir,
    servers: (Option<S3Server>, Option<Redis>, Option<RedisCluster>),
) -> Backend {
    let mut conv = Converter::new(store, index, Options::default());
    conv.tmp_dir = dir.path().to_path_buf();
    Backend { conv, name, _servers: servers, _dir: dir }
}

fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

fn set_mtime(p: &Path, sec: i64, nsec: i64) {
    let ts = libc::timespec { tv_sec: sec, tv_nsec: nsec };
    let rc = unsafe {
        libc::utimensat(libc::AT_FDCWD, cpath(p).as_ptr(), [ts, ts].as_ptr(), libc::AT_SYMLINK_NOFOLLOW)
    };
    assert_eq!(rc, 0, "utimensat {}", p.display());
}

fn chown(p: &Path, uid: u32, gid: u32) {
    assert_eq!(unsafe { libc::lchown(cpath(p).as_ptr(), uid, gid) }, 0, "lchown {}", p.display());
}

fn mode(p: &Path, m: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap();
}

fn setxattr(p: &Path, name: &str, value: &[u8]) {
    let n = CString::new(name).unwrap();
    let rc = unsafe { libc::lsetxattr(cpath(p).as_ptr(), n.as_ptr(), value.as_ptr().cast(), value.len(), 0) };
    assert_eq!(rc, 0, "setxattr {name} on {}", p.display());
}

fn mknod(p: &Path, kind: libc::mode_t, major: u32, minor: u32) {
    let rc = unsafe { libc::mknod(cpath(p).as_ptr(), kind | 0o644, libc::makedev(major, minor)) };
    assert_eq!(rc, 0, "mknod {}", p.display());
}

pub use starlight_conformance::layout::noise;

/// Builds a tree with every kind of entry and attribute a layer can carry. `variant` changes a few
/// file contents so that two trees share most but not all contents.
pub fn build_tree(root: &Path, variant: u8) {
    let p = |rel: &str| root.join(rel);
    for d in ["etc", "usr/bin", "usr/lib", "dev", "run", "srv/shared", "tmp", "opaque", "var"] {
        std::fs::create_dir_all(p(d)).unwrap();
    }
    std::fs::write(p("etc/hello"), b"hello\n").unwrap();
    std::fs::write(p("etc/version"), format!("variant {variant}\n")).unwrap();
    std::fs::write(p("etc/copy-of-hello"), b"hello\n").unwrap(); // same content, second path
    std::fs::write(p("empty"), b"").unwrap();
    std::fs::write(p("usr/lib/big.bin"), noise(9 << 20 | 12345, 7)).unwrap(); // three frames
    std::fs::write(p("usr/bin/su"), b"#!/bin/sh\necho su\n").unwrap();
    mode(&p("usr/bin/su"), 0o4755);
    std::fs::hard_link(p("usr/bin/su"), p("usr/bin/hard")).unwrap();
    mode(&p("srv/shared"), 0o2775);
    mode(&p("tmp"), 0o1777);
    std::os::unix::fs::symlink("su", p("usr/bin/sh")).unwrap();
    std::os::unix::fs::symlink("/usr/share/zoneinfo/UTC", p("etc/localtime")).unwrap();
    std::os::unix::fs::symlink("t".repeat(150), p("etc/long-target")).unwrap();
    mknod(&p("dev/null"), libc::S_IFCHR, 1, 3);
    mknod(&p("dev/loop0"), libc::S_IFBLK, 7, 0);
    mknod(&p("run/fifo"), libc::S_IFIFO, 0, 0);
    let long_dir = p(&format!("{}/{}", "a".repeat(60), "b".repeat(80)));
    std::fs::create_dir_all(&long_dir).unwrap();
    std::fs::write(long_dir.join("file-with-a-long-path"), b"long\n").unwrap();
    std::fs::write(root.join(std::ffi::OsStr::from_bytes(b"caf\xe9")), b"latin-1 name\n").unwrap();
    setxattr(&p("etc/hello"), "user.starlight", b"yes");
    setxattr(&p("srv/shared"), "user.dir", b"\x00binary\xff");
    std::fs::write(p(".wh.removed"), b"").unwrap();
    std::fs::write(p("opaque/.wh..wh..opq"), b"").unwrap();
    std::fs::write(p("opaque/kept"), format!("kept {variant}\n")).unwrap();
    // A sparse file: 8 MiB hole, then data.
    let f = std::fs::File::create(p("var/sparse")).unwrap();
    f.set_len(8 << 20).unwrap();
    drop(f);
    let mut f = std::fs::OpenOptions::new().append(true).open(p("var/sparse")).unwrap();
    f.write_all(b"end of sparse\n").unwrap();
    drop(f);
    chown(&p("etc/hello"), 1234, 5678);
    chown(&p("etc/localtime"), 42, 43);
    chown(&p("srv/shared"), 0, 100);
    // Times last, deepest first, with nanoseconds.
    let mut all: Vec<_> = walk(root);
    all.sort_by_key(|x| std::cmp::Reverse(x.as_os_str().len()));
    for (i, path) in all.iter().enumerate() {
        set_mtime(path, 1_600_000_000 + i as i64 * 1000, 123_456_789);
    }
}

fn walk(root: &Path) -> Vec<std::path::PathBuf> {
    let mut out = vec![root.to_path_buf()];
    let mut i = 0;
    while i < out.len() {
        let path = out[i].clone();
        if std::fs::symlink_metadata(&path).unwrap().is_dir() {
            for e in std::fs::read_dir(&path).unwrap() {
                out.push(e.unwrap().path());
            }
        }
        i += 1;
    }
    out
}

/// Runs GNU tar (the reference) with `args`, failing with its stderr.
pub fn gnu_tar(args: &[&str]) {
    let out = Command::new("tar").args(args).output().expect("GNU tar: apt-get install -y tar");
    assert!(out.status.success(), "tar {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// The tar formats under test: GNU (long names as `L`/`K` headers, old GNU sparse) and PAX
/// (long names, xattrs and nanosecond times in PAX headers).
pub fn make_tars(tree: &Path, out: &Path) -> Vec<(String, std::path::PathBuf)> {
    let gnu = out.join("gnu.tar");
    let pax = out.join("pax.tar");
    let src = tree.to_str().unwrap();
    gnu_tar(&["--format=gnu", "-S", "--numeric-owner", "-cf", gnu.to_str().unwrap(), "-C", src, "."]);
    pax_tar(tree, &pax);
    vec![("gnu".into(), gnu), ("pax".into(), pax)]
}

/// Tars `tree` into `out` in PAX format with xattrs, as the fidelity layers are made.
pub fn pax_tar(tree: &Path, out: &Path) {
    let (src, dst) = (tree.to_str().unwrap(), out.to_str().unwrap());
    gnu_tar(&[
        "--format=pax",
        "--xattrs",
        "--xattrs-include=*",
        "--numeric-owner",
        "-cf",
        dst,
        "-C",
        src,
        ".",
    ]);
}

/// Compresses a tar as a registry layer would be.
pub fn compress(tar: &[u8], c: Compression) -> Vec<u8> {
    match c {
        Compression::None => tar.to_vec(),
        Compression::Gzip => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            e.write_all(tar).unwrap();
            e.finish().unwrap()
        }
        Compression::Zstd => zstd::encode_all(tar, 3).unwrap(),
    }
}

pub fn expect(name: &str, compression: Compression, blob: &[u8], tar: &[u8]) -> Expect {
    Expect {
        name: name.to_string(),
        compression,
        digest: Some(Digest::of(blob)),
        diff_id: Some(Digest::of(tar)),
    }
}

/// Converts `blob` and publishes it.
pub async fn convert(
    conv: &Conv,
    blob: Vec<u8>,
    expect: Expect,
) -> Result<LayerOutcome, starlight_converter::ConvertError> {
    conv.convert_layer_from(std::io::Cursor::new(blob), expect).await
}

/// Extracts a converted layer from TOC + store into `dir`, the way extracting its tar would.
pub async fn extract(conv: &Conv, outcome: &LayerOutcome, dir: &Path) -> Toc {
    let toc = load_toc(&conv.store, &outcome.record).await.unwrap();
    let digests: Vec<Digest> = toc.content_digests().collect();
    let locs = conv.index.get_contents(&digests).await.unwrap();
    let map: HashMap<Digest, _> =
        digests.iter().copied().zip(locs.into_iter().map(|l| l.expect("every content is indexed"))).collect();
    let store = conv.store.clone();
    let (toc2, dir2) = (toc.clone(), dir.to_path_buf());
    let handle = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || {
        starlight_converter::extract::extract_layer(&toc2, &dir2, &mut |d, f| {
            let loc = &map[d];
            handle.block_on(copy_content(&store, d, loc, f)).map_err(std::io::Error::other)
        })
    })
    .await
    .unwrap()
    .unwrap();
    toc
}
