//! Synthetic images for tests: layers written entry by entry (so that any OCI edge case can be
//! expressed: whiteouts, opaque directories, hardlinks to lower layers, xattrs), gzipped, and
//! written as an OCI image layout that skopeo can push and umoci can unpack.

use std::io::Write;
use std::path::Path;

use sha2::{Digest as _, Sha256};

/// Every entry's mtime (a fixed time keeps images reproducible).
pub const MTIME: u64 = 1_700_000_000;

/// One layer, built entry by entry as a tar stream.
pub struct Layer {
    tar: tar::Builder<Vec<u8>>,
}

impl std::fmt::Debug for Layer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Layer")
    }
}

impl Default for Layer {
    fn default() -> Self {
        Layer::new()
    }
}

fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(MTIME);
    h.set_size(size);
    h
}

impl Layer {
    pub fn new() -> Layer {
        Layer { tar: tar::Builder::new(Vec::new()) }
    }

    fn append(&mut self, mut h: tar::Header, path: &str, data: &[u8]) {
        self.tar.append_data(&mut h, path, data).unwrap_or_else(|e| panic!("tar entry {path}: {e}"));
    }

    pub fn dir(mut self, path: &str, mode: u32) -> Self {
        self.append(header(tar::EntryType::Directory, mode, 0), path, &[][..]);
        self
    }

    pub fn file(self, path: &str, data: &[u8]) -> Self {
        self.file_with(path, data, 0o644, 0, &[])
    }

    /// A regular file with a mode, an owner (uid = gid) and extended attributes.
    pub fn file_with(
        mut self,
        path: &str,
        data: &[u8],
        mode: u32,
        owner: u32,
        xattrs: &[(&str, &[u8])],
    ) -> Self {
        if !xattrs.is_empty() {
            let pax: Vec<(String, &[u8])> =
                xattrs.iter().map(|(k, v)| (format!("SCHILY.xattr.{k}"), *v)).collect();
            self.tar
                .append_pax_extensions(pax.iter().map(|(k, v)| (k.as_str(), *v)))
                .unwrap_or_else(|e| panic!("pax header for {path}: {e}"));
        }
        let mut h = header(tar::EntryType::Regular, mode, data.len() as u64);
        h.set_uid(u64::from(owner));
        h.set_gid(u64::from(owner));
        self.append(h, path, data);
        self
    }

    pub fn symlink(mut self, path: &str, target: &str) -> Self {
        let mut h = header(tar::EntryType::Symlink, 0o777, 0);
        self.tar.append_link(&mut h, path, target).unwrap_or_else(|e| panic!("symlink {path}: {e}"));
        self
    }

    /// A hard link to `target`, in this layer or a lower one.
    pub fn hardlink(mut self, path: &str, target: &str) -> Self {
        let mut h = header(tar::EntryType::Link, 0o644, 0);
        self.tar.append_link(&mut h, path, target).unwrap_or_else(|e| panic!("hardlink {path}: {e}"));
        self
    }

    /// Deletes `path` from the layers below.
    pub fn whiteout(self, path: &str) -> Self {
        let (dir, name) = path.rsplit_once('/').map_or(("", path), |(d, n)| (d, n));
        let wh = if dir.is_empty() { format!(".wh.{name}") } else { format!("{dir}/.wh.{name}") };
        self.file(&wh, b"")
    }

    /// Hides what the layers below put in `dir`.
    pub fn opaque(self, dir: &str) -> Self {
        self.file(&format!("{dir}/.wh..wh..opq"), b"")
    }

    /// The uncompressed tar stream.
    pub fn finish(self) -> Vec<u8> {
        self.tar.into_inner().unwrap_or_else(|e| panic!("finishing tar: {e}"))
    }
}

/// Deterministic pseudo-random bytes (incompressible, unlike zeros): distinct for each seed.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn sha256(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

fn write_blob(layout: &Path, data: &[u8]) -> String {
    let digest = sha256(data);
    let dir = layout.join("blobs/sha256");
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
    let path = dir.join(&digest[7..]);
    std::fs::write(&path, data).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    digest
}

/// Writes an image of `layers` (uncompressed tars, lowest first), tagged `tag`, into the OCI
/// layout at `layout` (created or extended). `cmd` is the image's command. Returns the manifest
/// digest.
pub fn write_image(layout: &Path, tag: &str, layers: &[Vec<u8>], cmd: &[&str]) -> String {
    let mut descs = Vec::new();
    let mut diff_ids = Vec::new();
    for tar in layers {
        diff_ids.push(sha256(tar));
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(tar).unwrap_or_else(|e| panic!("gzip: {e}"));
        let gz = gz.finish().unwrap_or_else(|e| panic!("gzip: {e}"));
        let digest = write_blob(layout, &gz);
        descs.push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": digest,
            "size": gz.len(),
        }));
    }
    let config = serde_json::json!({
        "architecture": host_arch(),
        "os": "linux",
        "config": {"Cmd": cmd, "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    })
    .to_string();
    let config_digest = write_blob(layout, config.as_bytes());
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest,
            "size": config.len(),
        },
        "layers": descs,
    })
    .to_string();
    let manifest_digest = write_blob(layout, manifest.as_bytes());
    let index_path = layout.join("index.json");
    let mut index: serde_json::Value = std::fs::read(&index_path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_else(|| serde_json::json!({"schemaVersion": 2, "manifests": []}));
    let list = index["manifests"]
        .as_array_mut()
        .unwrap_or_else(|| panic!("{} has no manifests", index_path.display()));
    list.retain(|m| m["annotations"]["org.opencontainers.image.ref.name"] != tag);
    list.push(serde_json::json!({
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": manifest_digest,
        "size": manifest.len(),
        "annotations": {"org.opencontainers.image.ref.name": tag},
    }));
    std::fs::write(&index_path, index.to_string()).unwrap_or_else(|e| panic!("write index.json: {e}"));
    std::fs::write(layout.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#)
        .unwrap_or_else(|e| panic!("write oci-layout: {e}"));
    manifest_digest
}

/// The host's architecture in OCI spelling.
pub fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

/// `umoci unpack`s `tag` of `layout` into `bundle`; the root filesystem is `bundle/rootfs`.
pub fn umoci_unpack(layout: &Path, tag: &str, bundle: &Path) {
    let out = std::process::Command::new("umoci")
        .args(["unpack", "--image", &format!("{}:{tag}", layout.display())])
        .arg(bundle)
        .output()
        .unwrap_or_else(|e| panic!("umoci (apt-get install -y umoci): {e}"));
    assert!(out.status.success(), "umoci unpack: {}", String::from_utf8_lossy(&out.stderr));
}

/// The edge-case corpus, tags `v1` and `v2`. v1: three layers with every OCI edge case; v2: v1 plus a layer that changes a little.
pub fn corpus(layout: &Path) {
    let l1 = Layer::new()
        .dir("etc", 0o755)
        .file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
        .file("etc/hosts", b"127.0.0.1 localhost\n")
        .dir("bin", 0o755)
        .file_with("bin/tool", b"#!/bin/sh\necho tool v1\n", 0o755, 0, &[])
        .dir("data", 0o755)
        .file("data/big", &noise(9 << 20, 1))
        .file("data/empty", b"")
        .dir("opaque-me", 0o755)
        .file("opaque-me/old1", b"old one")
        .dir("opaque-me/sub", 0o750)
        .file("opaque-me/sub/old2", b"old two")
        .dir("dir-then-file", 0o755)
        .file("dir-then-file/inner", b"inside a directory that becomes a file")
        .file("file-then-dir", b"a file that becomes a directory")
        .symlink("replaced-link", "etc/passwd")
        .dir("linked", 0o755)
        .file("linked/original", b"shared by hard links across layers")
        .hardlink("linked/alias", "linked/original")
        .file_with(
            "xattrs",
            b"with attributes",
            0o640,
            0,
            &[("user.starlight", b"yes"), ("user.bin", &[0, 1, 2, 255])],
        )
        .file_with("owned", b"owned by 1000", 0o600, 1000, &[])
        .file_with("setuid", b"setuid program", 0o4755, 0, &[])
        .dir("dup", 0o755)
        .file("dup/a", b"one content, many paths")
        .file("dup/b", b"one content, many paths")
        .file("dup/c", b"one content, many paths")
        .file("to-delete", b"deleted in layer 2")
        .finish();
    let l2 = Layer::new()
        .whiteout("to-delete")
        .dir("opaque-me", 0o755)
        .opaque("opaque-me")
        .file("opaque-me/new", b"after the opaque marker")
        .file("dir-then-file", b"a file where a directory was")
        .dir("file-then-dir", 0o711)
        .file("file-then-dir/child", b"a child where a file was")
        .symlink("replaced-link", "bin/tool")
        .dir("linked", 0o755)
        .hardlink("linked/cross", "linked/original")
        .dir("dup", 0o755)
        .file("dup/d", b"one content, many paths")
        .dir("data", 0o755)
        .file("data/big2", &noise(5 << 20, 2))
        .finish();
    let l3 = Layer::new()
        .dir("linked", 0o755)
        .whiteout("linked/original")
        .dir("etc", 0o755)
        .file("etc/hosts", b"127.0.0.1 localhost\n::1 localhost\n")
        .dir("data", 0o700)
        .finish();
    let mut big = noise(9 << 20, 1);
    big[5_000_000..5_000_016].copy_from_slice(b"patched in v2!!!");
    let l4 = Layer::new()
        .dir("data", 0o700)
        .file("data/big", &big)
        .dir("bin", 0o755)
        .file_with("bin/tool", b"#!/bin/sh\necho tool v2\n", 0o755, 0, &[])
        .dir("new", 0o755)
        .file("new/copy", b"one content, many paths")
        .file("new/thing", &noise(100_000, 3))
        .finish();
    write_image(layout, "v1", &[l1.clone(), l2.clone(), l3.clone()], &["/bin/tool"]);
    write_image(layout, "v2", &[l1, l2, l3, l4], &["/bin/tool"]);
}
