//! The converter suite, run against each backend pair on real servers: fidelity against GNU tar,
//! dedup within and across layers, no second conversion of a layer, and bad input that publishes
//! nothing.

mod common;

use std::collections::HashSet;
use std::io::Write;

use common::*;
use starlight_conformance::fstree::{Options as TreeOptions, assert_same_tree};
use starlight_converter::Index;
use starlight_converter::layer::Compression;
use starlight_format::{Digest, Kind};

#[tokio::test(flavor = "multi_thread")]
async fn local_dir_and_redb() {
    run_suite(local_redb().await).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn s3_and_redis() {
    run_suite(s3_redis().await).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn s3_and_redis_cluster() {
    run_suite(s3_redis_cluster().await).await;
}

async fn run_suite(b: Backend) {
    eprintln!("suite on {}", b.name);
    let work = tempfile::tempdir().unwrap();
    let v1 = fidelity(&b, work.path()).await;
    dedup_and_skip(&b, work.path(), &v1).await;
    bad_input_publishes_nothing(&b).await;
}

/// Every tar feature survives conversion: TOC + contents extract to exactly what GNU tar extracts.
async fn fidelity(b: &Backend, work: &std::path::Path) -> Vec<u8> {
    let tree = work.join("tree-v1");
    build_tree(&tree, 0);
    let mut pax_tar = Vec::new();
    for ((format, tar_path), compression) in
        make_tars(&tree, work).into_iter().zip([Compression::Gzip, Compression::Zstd])
    {
        let tar = std::fs::read(&tar_path).unwrap();
        let blob = compress(&tar, compression);
        let outcome =
            convert(&b.conv, blob.clone(), expect(&format, compression, &blob, &tar)).await.unwrap();
        assert!(outcome.converted);
        let ours = work.join(format!("ours-{format}"));
        let reference = work.join(format!("ref-{format}"));
        std::fs::create_dir_all(&ours).unwrap();
        std::fs::create_dir_all(&reference).unwrap();
        let toc = extract(&b.conv, &outcome, &ours).await;
        gnu_tar(&[
            "--xattrs",
            "--xattrs-include=*",
            "--numeric-owner",
            "-xpf",
            tar_path.to_str().unwrap(),
            "-C",
            reference.to_str().unwrap(),
        ]);
        assert_same_tree(&reference, &ours, TreeOptions::default());

        // The TOC names whiteouts and opaque directories by what they hide.
        assert!(toc.entries.iter().any(|e| e.kind == Kind::Whiteout && e.path == b"removed"), "{format}");
        assert!(toc.entries.iter().any(|e| e.kind == Kind::Opaque && e.path == b"opaque"), "{format}");
        let big = toc.entries.iter().find(|e| e.path == b"usr/lib/big.bin").unwrap();
        assert_eq!(
            big.kind,
            Kind::File { size: 9 << 20 | 12345, digest: Some(Digest::of(&noise(9 << 20 | 12345, 7))) }
        );
        if format == "pax" {
            pax_tar = tar;
            let hello = toc.entries.iter().find(|e| e.path == b"etc/hello").unwrap();
            assert_eq!(hello.xattrs, vec![(b"user.starlight".to_vec(), b"yes".to_vec())]);
            assert_eq!((hello.uid, hello.gid, hello.mtime_nsec), (1234, 5678, 123_456_789));
        }
    }
    pax_tar
}

/// Contents are stored once across and within layers; a layer is never converted twice.
async fn dedup_and_skip(b: &Backend, work: &std::path::Path, v1_tar: &[u8]) {
    let v1_diff = Digest::of(v1_tar);
    let v1 = b.conv.index.get_layer(&v1_diff).await.unwrap().expect("v1 layer published");

    // The same layer again, compressed differently: same diffID but another blob, so converted
    // again (a converted layer is reused only for the blob that produced it: a diffID is merely
    // claimed by a config); its contents are all stored already.
    let blob = compress(v1_tar, Compression::None);
    let again =
        convert(&b.conv, blob.clone(), expect("v1-again", Compression::None, &blob, v1_tar)).await.unwrap();
    assert!(again.converted, "a layer known only by its diffID must be converted again");
    assert_eq!((again.record.diff_id, again.record.toc), (v1.diff_id, v1.toc));
    assert_eq!(again.stored_bytes, 0, "no content stored twice");
    // The same blob once more: not converted again.
    let once_more =
        convert(&b.conv, blob.clone(), expect("v1-again", Compression::None, &blob, v1_tar)).await.unwrap();
    assert!(!once_more.converted, "a layer converted from the same blob must not be converted again");
    assert_eq!(once_more.record, again.record);
    // A blob that claims v1's diffID but holds something else is converted, and refused.
    let other_tar = starlight_conformance::layout::Layer::new().file("decoy", b"not v1\n").finish();
    let claim = starlight_converter::layer::Expect {
        diff_id: Some(v1_diff),
        ..expect("claims-v1", Compression::None, &other_tar, &other_tar)
    };
    let err = convert(&b.conv, other_tar.clone(), claim).await.unwrap_err();
    assert!(err.to_string().contains("diffID mismatch"), "{err}");

    // v2 changes two small files; everything else is already stored.
    let tree = work.join("tree-v2");
    build_tree(&tree, 1);
    let v2_tar_path = work.join("v2.tar");
    pax_tar(&tree, &v2_tar_path);
    let v2_tar = std::fs::read(&v2_tar_path).unwrap();
    let blob = compress(&v2_tar, Compression::Gzip);
    let v2 = convert(&b.conv, blob.clone(), expect("v2", Compression::Gzip, &blob, &v2_tar)).await.unwrap();
    assert!(v2.converted);
    let toc = b.conv.load_toc(&v2.record).await.unwrap();
    let digests: Vec<Digest> = toc.content_digests().collect();
    let unique: HashSet<Digest> = digests.iter().copied().collect();
    assert!(unique.len() < digests.len(), "the tree has one content under two paths");
    let locs = b.conv.index.get_contents(&digests).await.unwrap();
    let in_v2: HashSet<Digest> = digests
        .iter()
        .zip(&locs)
        .filter(|(_, l)| Some(l.as_ref().unwrap().blob) == v2.record.blob)
        .map(|(d, _)| *d)
        .collect();
    let expected: HashSet<Digest> =
        [Digest::of(b"variant 1\n"), Digest::of(b"kept 1\n")].into_iter().collect();
    assert_eq!(in_v2, expected, "v2's blob holds exactly the two new contents");
    let big = locs[digests.iter().position(|d| *d == Digest::of(&noise(9 << 20 | 12345, 7))).unwrap()]
        .as_ref()
        .unwrap();
    // The PAX layer has the same contents as the GNU layer converted before it: it stored nothing.
    assert_eq!(v1.blob, None, "contents already stored by another layer are not stored again");
    assert_ne!(Some(big.blob), v2.record.blob, "unchanged contents stay where they were first stored");
    assert_eq!(big.frames.len(), 3, "a 9 MiB file is three 4 MiB chunks");
    assert!(v2.stored_bytes < 1024, "v2 stored {} bytes for two tiny files", v2.stored_bytes);
}

/// A tar entry written byte by byte, so that hostile names get through unvalidated.
fn raw_entry(out: &mut Vec<u8>, name: &[u8], kind: u8, data: &[u8]) {
    let mut h = tar::Header::new_old();
    h.as_old_mut().name[..name.len()].copy_from_slice(name);
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1_600_000_000);
    h.set_entry_type(tar::EntryType::new(kind));
    if kind == b'1' {
        let target = b"../../etc/shadow";
        h.as_old_mut().linkname[..target.len()].copy_from_slice(target);
    }
    h.set_cksum();
    out.extend_from_slice(h.as_bytes());
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(512) * 512, 0);
}

fn finish(mut t: Vec<u8>) -> Vec<u8> {
    t.extend_from_slice(&[0u8; 1024]);
    t
}

/// Each bad layer fails with an error naming the layer (and the entry), and publishes nothing.
async fn bad_input_publishes_nothing(b: &Backend) {
    let good = {
        let mut t = Vec::new();
        raw_entry(&mut t, b"ok", b'0', b"fine\n");
        raw_entry(&mut t, b"second", b'0', b"also fine\n");
        finish(t)
    };
    let gz = compress(&good, Compression::Gzip);
    let mut corrupt_header = good.clone();
    corrupt_header[512 + 512 + 3] ^= 0x55; // second header's name: checksum no longer matches
    let mut flipped_gz = gz.clone();
    let mid = flipped_gz.len() / 2;
    for byte in &mut flipped_gz[mid..mid + 8] {
        *byte ^= 0xa5;
    }
    let many = {
        let mut t = Vec::new();
        for i in 0..20 {
            raw_entry(&mut t, format!("f{i}").as_bytes(), b'0', b"");
        }
        finish(t)
    };
    let bomb = {
        let mut t = Vec::new();
        raw_entry(&mut t, b"zeros", b'0', &vec![0u8; 3 << 20]);
        compress(&finish(t), Compression::Gzip)
    };
    let one = |name: &[u8], kind: u8| {
        let mut t = Vec::new();
        raw_entry(&mut t, name, kind, b"x");
        finish(t)
    };
    // A metadata header (PAX `x`, GNU long name `L`) declaring `size` bytes, then `data`.
    let meta = |kind: u8, size: u64, data: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.as_gnu_mut().unwrap().name[..13].copy_from_slice(b"././@LongLink");
        h.set_entry_type(tar::EntryType::new(kind));
        h.set_size(size);
        h.set_mode(0o644);
        h.set_cksum();
        let mut t = h.as_bytes().to_vec();
        t.extend_from_slice(data);
        t.resize(t.len().div_ceil(512) * 512, 0);
        t
    };
    let huge = |kind| {
        let mut t = Vec::new();
        raw_entry(&mut t, b"ok", b'0', b"fine\n");
        t.extend(meta(kind, 8 << 30, &[b'a'; 4096]));
        finish(t)
    };
    // 10,000 nested directories: a 20 KB path in a GNU long name.
    let nested = {
        let mut name = "a/".repeat(10_000).into_bytes();
        name.extend_from_slice(b"deep");
        let mut t = meta(b'L', name.len() as u64, &name);
        raw_entry(&mut t, b"placeholder", b'0', b"x");
        finish(t)
    };
    let dup = {
        let mut t = Vec::new();
        raw_entry(&mut t, b"a", b'0', b"1");
        raw_entry(&mut t, b"./a", b'0', b"2");
        finish(t)
    };

    let small = {
        let mut c = b.conv.clone();
        c.options.max_layer_bytes = 1 << 20;
        c.options.max_entries = 10;
        c
    };
    struct Case {
        name: &'static str,
        tar: Vec<u8>,
        blob: Vec<u8>,
        compression: Compression,
        digest: Option<Digest>,
        diff_id: Option<Digest>,
        want: &'static str,
        small: bool,
    }
    let plain = |name, tar: Vec<u8>, want| Case {
        name,
        blob: tar.clone(),
        tar,
        compression: Compression::None,
        digest: None,
        diff_id: None,
        want,
        small: false,
    };
    let cases = vec![
        plain("dotdot", one(b"../escape", b'0'), "entry \"../escape\": invalid path"),
        plain("absolute", one(b"/etc/passwd", b'0'), "entry \"/etc/passwd\": invalid path"),
        plain(
            "hardlink-out",
            one(b"link", b'1'),
            "entry \"link\": hardlink target: invalid path \"../../etc/shadow\"",
        ),
        plain("duplicate", dup, "entry \"./a\": duplicate path"),
        plain("huge-pax", huge(b'x'), "a PAX extended header of 8589934592 bytes (the limit is 1048576)"),
        plain("huge-long-name", huge(b'L'), "a GNU long name of 8589934592 bytes"),
        plain("nested", nested, "longer than 4096 bytes"),
        plain("bad-header", corrupt_header, "corrupt tar header (after entry \"ok\")"),
        Case {
            name: "truncated-gz",
            blob: gz[..gz.len() / 2].to_vec(),
            tar: good.clone(),
            compression: Compression::Gzip,
            digest: None,
            diff_id: None,
            want: "gzip",
            small: false,
        },
        Case {
            name: "corrupt-gz",
            blob: flipped_gz,
            tar: good.clone(),
            compression: Compression::Gzip,
            digest: None,
            diff_id: None,
            want: "gzip",
            small: false,
        },
        Case {
            name: "bomb",
            blob: bomb,
            tar: Vec::new(),
            compression: Compression::Gzip,
            digest: None,
            diff_id: None,
            want: "decompression bomb",
            small: true,
        },
        Case {
            name: "too-many",
            tar: many.clone(),
            blob: many,
            compression: Compression::None,
            digest: None,
            diff_id: None,
            want: "more than 10 entries",
            small: true,
        },
        Case {
            name: "digest",
            tar: good.clone(),
            blob: gz.clone(),
            compression: Compression::Gzip,
            digest: Some(Digest::of(b"other")),
            diff_id: None,
            want: "blob digest mismatch",
            small: false,
        },
        Case {
            name: "diffid",
            tar: good.clone(),
            blob: gz.clone(),
            compression: Compression::Gzip,
            digest: None,
            diff_id: Some(Digest::of(b"other")),
            want: "diffID mismatch",
            small: false,
        },
    ];
    for case in cases {
        let conv = if case.small { &small } else { &b.conv };
        let expect = starlight_converter::layer::Expect {
            name: format!("layer-{}", case.name),
            compression: case.compression,
            digest: case.digest,
            diff_id: case.diff_id,
        };
        let err = convert(conv, case.blob, expect).await.expect_err(case.name).to_string();
        assert!(
            err.contains(&format!("layer layer-{}", case.name)),
            "{}: error does not name the layer: {err}",
            case.name
        );
        assert!(err.contains(case.want), "{}: error {err:?} lacks {:?}", case.name, case.want);
        if !case.tar.is_empty() {
            let published = b.conv.index.get_layer(&Digest::of(&case.tar)).await.unwrap();
            assert!(published.is_none(), "{}: a bad layer was published", case.name);
        }
    }
    // A hardlink to a directory of the same layer is refused.
    let mut t = Vec::new();
    raw_entry(&mut t, b"d", b'5', b"");
    let mut h = tar::Header::new_old();
    h.as_old_mut().name[..4].copy_from_slice(b"link");
    h.as_old_mut().linkname[..1].copy_from_slice(b"d");
    h.set_entry_type(tar::EntryType::Link);
    h.set_size(0);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h.set_cksum();
    t.write_all(h.as_bytes()).unwrap();
    let t = finish(t);
    let err = convert(&b.conv, t.clone(), expect("dirlink", Compression::None, &t, &t))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("hardlink to a directory"), "{err}");
}
