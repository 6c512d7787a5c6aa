//! Writes the seed corpus of each fuzz target under `seeds/<target>/` (run from `fuzz/`):
//! `cargo run --bin make-seeds`. The seeds are committed; this says how they were made.

use std::path::Path;

use starlight_format::bundle::{
    ContentRef, Header, batch_prefix, chunk_prefix, compress_header, encode_header, encode_trailer,
    make_patch, patch_prefix,
};
use starlight_format::{Digest, Entry, Kind, Toc};

fn write(target: &str, name: &str, data: &[u8]) {
    let dir = Path::new("seeds").join(target);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(name), data).unwrap();
}

fn entry(path: &str, kind: Kind) -> Entry {
    Entry { path: path.into(), kind, mode: 0o644, uid: 0, gid: 0, mtime: 1_700_000_000, mtime_nsec: 5, xattrs: vec![] }
}

fn entries(contents: &[Vec<u8>]) -> Vec<Entry> {
    let mut e = vec![entry("etc", Kind::Dir)];
    for (i, c) in contents.iter().enumerate() {
        e.push(entry(&format!("etc/f{i}"), Kind::File { size: c.len() as u64, digest: Some(Digest::of(c)) }));
    }
    e.push(entry("etc/link", Kind::Symlink { target: b"f0".to_vec() }));
    e.push(entry("etc/hard", Kind::Hardlink { target: b"etc/f0".to_vec() }));
    e.push(entry("dev-null", Kind::Char { major: 1, minor: 3 }));
    e.push(entry("gone", Kind::Whiteout));
    e
}

fn header(contents: &[Vec<u8>]) -> Header {
    let manifest = br#"{"schemaVersion":2}"#.to_vec();
    Header {
        manifest_digest: Digest::of(&manifest),
        manifest,
        config: b"{}".to_vec(),
        platform: "linux/amd64".parse().unwrap(),
        entries: entries(contents),
        contents: contents.iter().map(|c| ContentRef { digest: Digest::of(c), size: c.len() as u64 }).collect(),
    }
}

fn tar(build: impl FnOnce(&mut tar::Builder<&mut Vec<u8>>)) -> Vec<u8> {
    let mut out = Vec::new();
    let mut b = tar::Builder::new(&mut out);
    build(&mut b);
    b.finish().unwrap();
    drop(b);
    out
}

fn main() {
    // TOCs: the golden one and one with every kind of entry.
    write("toc_decode", "golden-v1", &std::fs::read("../format/tests/golden/toc-v1.bin").unwrap());
    let toc = Toc { diff_id: Digest::of(b"layer"), entries: entries(&[b"a".to_vec(), b"bb".to_vec()]) };
    write("toc_decode", "kinds", &toc.encode());

    // Bundles: plain chunks, a compressed header, a batch, a patch.
    let contents = vec![b"hello\n".to_vec(), vec![7u8; 3000], b"x".to_vec()];
    let h = header(&contents);
    let mut plain = encode_header(&h);
    for (i, c) in contents.iter().enumerate() {
        let frame = zstd::bulk::compress(c, 1).unwrap();
        plain.extend(chunk_prefix(i as u64, 0, frame.len()));
        plain.extend(frame);
    }
    let total: u64 = contents.iter().map(|c| c.len() as u64).sum();
    plain.extend(encode_trailer(contents.len() as u64, total));
    write("bundle_decode", "plain", &[&[7u8][..], &plain].concat());
    let mut packed = compress_header(&encode_header(&h), 3).unwrap();
    let both: Vec<u8> = contents[..2].concat();
    let frame = zstd::bulk::compress(&both, 1).unwrap();
    packed.extend(batch_prefix(0, 2, frame.len()));
    packed.extend(frame);
    let base = b"hellO\n".to_vec();
    let patch = make_patch(&base, &contents[2], 3).unwrap();
    packed.extend(patch_prefix(2, &Digest::of(&base), patch.len()));
    packed.extend(patch);
    packed.extend(encode_trailer(contents.len() as u64, total));
    write("bundle_decode", "batch-and-patch", &[&[64u8][..], &packed].concat());

    // Layers: GNU and PAX headers, long names, links, devices, xattrs, a sparse-looking file.
    let gnu = tar(|b| {
        let mut h = tar::Header::new_gnu();
        h.set_size(5);
        h.set_mode(0o755);
        b.append_data(&mut h, "bin/tool", &b"\x7fELF."[..]).unwrap();
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        b.append_link(&mut h, "bin/alias", "tool").unwrap();
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Link);
        h.set_size(0);
        b.append_link(&mut h, "bin/hard", "bin/tool").unwrap();
        let long = "deep/".repeat(40) + "file";
        let mut h = tar::Header::new_gnu();
        h.set_size(2);
        b.append_data(&mut h, long, &b"hi"[..]).unwrap();
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Char);
        h.set_device_major(1).unwrap();
        h.set_device_minor(3).unwrap();
        h.set_size(0);
        b.append_data(&mut h, "dev/null", &b""[..]).unwrap();
        let mut h = tar::Header::new_gnu();
        h.set_size(0);
        b.append_data(&mut h, "etc/.wh.old", &b""[..]).unwrap();
    });
    write("tar_to_toc", "gnu", &gnu);
    let pax = tar(|b| {
        b.append_pax_extensions([("SCHILY.xattr.user.k", &b"v"[..]), ("mtime", &b"1700000000.25"[..])]).unwrap();
        let mut h = tar::Header::new_ustar();
        h.set_size(3);
        h.set_mode(0o644);
        b.append_data(&mut h, "etc/conf", &b"a=1"[..]).unwrap();
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_size(0);
        h.set_mode(0o755);
        b.append_data(&mut h, "var/", &b""[..]).unwrap();
    });
    write("tar_to_toc", "pax", &pax);
}
