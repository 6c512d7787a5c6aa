//! Round-trip property tests and golden files for the TOC and index records.

use proptest::prelude::*;
use starlight_format::*;

fn arb_digest() -> impl Strategy<Value = Digest> {
    any::<[u8; 32]>().prop_map(Digest)
}

fn arb_path() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(
        prop::collection::vec(any::<u8>().prop_filter("no / or NUL", |b| *b != b'/' && *b != 0), 1..12)
            .prop_filter("not . or ..", |c| c != b"." && c != b".."),
        1..5,
    )
    .prop_map(|comps| comps.join(&b'/'))
}

fn arb_kind() -> impl Strategy<Value = Kind> {
    prop_oneof![
        (1..u64::MAX, arb_digest()).prop_map(|(size, d)| Kind::File { size, digest: Some(d) }),
        Just(Kind::File { size: 0, digest: None }),
        Just(Kind::Dir),
        prop::collection::vec(any::<u8>(), 0..64).prop_map(|target| Kind::Symlink { target }),
        arb_path().prop_map(|target| Kind::Hardlink { target }),
        (any::<u32>(), any::<u32>()).prop_map(|(major, minor)| Kind::Char { major, minor }),
        (any::<u32>(), any::<u32>()).prop_map(|(major, minor)| Kind::Block { major, minor }),
        Just(Kind::Fifo),
        Just(Kind::Whiteout),
        Just(Kind::Opaque),
    ]
}

fn arb_entry() -> impl Strategy<Value = Entry> {
    (
        arb_path(),
        arb_kind(),
        0u32..=0o7777,
        any::<u32>(),
        any::<u32>(),
        any::<i64>(),
        0u32..1_000_000_000,
        prop::collection::btree_map(
            prop::collection::vec(any::<u8>(), 1..20),
            prop::collection::vec(any::<u8>(), 0..40),
            0..4,
        ),
    )
        .prop_map(|(path, kind, mode, uid, gid, mtime, mtime_nsec, xattrs)| Entry {
            path,
            kind,
            mode,
            uid,
            gid,
            mtime,
            mtime_nsec,
            xattrs: xattrs.into_iter().collect(),
        })
}

proptest! {
    #[test]
    fn toc_round_trips(diff_id in arb_digest(), entries in prop::collection::vec(arb_entry(), 0..20)) {
        let toc = Toc { diff_id, entries };
        let bytes = toc.encode();
        prop_assert_eq!(Toc::decode(&bytes).unwrap(), toc);
    }

    #[test]
    fn toc_decoder_never_panics(data in prop::collection::vec(any::<u8>(), 0..512)) {
        let mut framed = b"SLTOC\0\x01\x00".to_vec();
        framed.extend_from_slice(&data);
        let _ = Toc::decode(&framed);
        let _ = Toc::decode(&data);
    }

    #[test]
    fn truncated_tocs_are_errors(entries in prop::collection::vec(arb_entry(), 1..5), cut in 1usize..64) {
        let bytes = Toc { diff_id: Digest([7; 32]), entries }.encode();
        let cut = cut.min(bytes.len());
        prop_assert!(Toc::decode(&bytes[..bytes.len() - cut]).is_err());
    }

    #[test]
    fn locations_round_trip(blob in arb_digest(), ulens in prop::collection::vec(1u32..=(4 << 20), 1..10)) {
        let mut offset = 0;
        let frames: Vec<Frame> = ulens.iter().map(|&ulen| {
            let f = Frame { offset, clen: ulen / 2 + 1, ulen };
            offset += u64::from(f.clen);
            f
        }).collect();
        let loc = ContentLocation { blob, size: ulens.iter().map(|&u| u64::from(u)).sum(), frames };
        prop_assert_eq!(ContentLocation::decode(&loc.encode().unwrap()).unwrap(), loc);
    }
}

fn golden_toc() -> Toc {
    let e = |path: &[u8], kind| Entry {
        path: path.to_vec(),
        kind,
        mode: 0o755,
        uid: 0,
        gid: 0,
        mtime: 1_700_000_000,
        mtime_nsec: 0,
        xattrs: vec![],
    };
    let mut file = e(b"etc/hello", Kind::File { size: 6, digest: Some(Digest::of(b"hello\n")) });
    file.mode = 0o4755;
    file.mtime_nsec = 123_456_789;
    file.xattrs = vec![(b"user.k".to_vec(), b"v".to_vec())];
    Toc {
        diff_id: Digest::of(b"layer"),
        entries: vec![
            e(b"", Kind::Dir),
            e(b"etc", Kind::Dir),
            file,
            e(b"etc/empty", Kind::File { size: 0, digest: None }),
            e(b"etc/link", Kind::Symlink { target: b"../etc/hello".to_vec() }),
            e(b"etc/hard", Kind::Hardlink { target: b"etc/hello".to_vec() }),
            e(b"dev/null", Kind::Char { major: 1, minor: 3 }),
            e(b"dev/sda", Kind::Block { major: 8, minor: 0 }),
            e(b"run/fifo", Kind::Fifo),
            e(b"caf\xe9", Kind::Whiteout),
            e(b"var", Kind::Opaque),
        ],
    }
}

/// The golden file pins the v1 byte layout: a change that alters it must bump the version.
/// Regenerate (only with a version bump) with `STARLIGHT_BLESS=1 cargo test -p starlight-format`.
#[test]
fn toc_golden_file() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden/toc-v1.bin");
    let bytes = golden_toc().encode();
    if std::env::var_os("STARLIGHT_BLESS").is_some() {
        std::fs::write(path, &bytes).unwrap();
    }
    let golden = std::fs::read(path).expect("golden file; bless with STARLIGHT_BLESS=1");
    assert_eq!(bytes, golden, "TOC v1 encoding changed");
    assert_eq!(Toc::decode(&golden).unwrap(), golden_toc());
}

#[test]
fn records_golden_file() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden/records-v1.bin");
    let image = ImageRecord {
        manifest_digest: Digest::of(b"manifest"),
        name: "library/redis".into(),
        tag: Some("7".into()),
        platform: "linux/arm64/v8".parse().unwrap(),
        media_type: "application/vnd.oci.image.manifest.v1+json".into(),
        manifest: b"{}".to_vec(),
        config_digest: Digest::of(b"config"),
        config: b"{\"a\":1}".to_vec(),
        layers: vec![ImageLayer {
            diff_id: Digest::of(b"layer"),
            digest: Digest::of(b"gz"),
            size: 42,
            media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
        }],
    };
    let layer = LayerRecord {
        diff_id: Digest::of(b"layer"),
        toc: Digest::of(b"toc"),
        blob: Some(Digest::of(b"blob")),
        blob_size: 1000,
        entries: 11,
        files: 2,
        content_bytes: 12,
    };
    let loc = ContentLocation {
        blob: Digest::of(b"blob"),
        size: CHUNK_SIZE + 5,
        frames: vec![
            Frame { offset: 0, clen: 100, ulen: CHUNK_SIZE as u32 },
            Frame { offset: 100, clen: 9, ulen: 5 },
        ],
    };
    let mut bytes = Vec::new();
    for rec in [image.encode().unwrap(), layer.encode(), loc.encode().unwrap()] {
        bytes.extend_from_slice(&(rec.len() as u32).to_le_bytes());
        bytes.extend_from_slice(&rec);
    }
    if std::env::var_os("STARLIGHT_BLESS").is_some() {
        std::fs::write(path, &bytes).unwrap();
    }
    assert_eq!(bytes, std::fs::read(path).expect("golden file"), "record encodings changed");
    assert_eq!(ImageRecord::decode(&image.encode().unwrap()).unwrap(), image);
    assert_eq!(LayerRecord::decode(&layer.encode()).unwrap(), layer);
    assert_eq!(ContentLocation::decode(&loc.encode().unwrap()).unwrap(), loc);
}

#[test]
fn rejects_wrong_version_and_magic() {
    let mut bytes = golden_toc().encode();
    bytes[6] = 2;
    assert_eq!(Toc::decode(&bytes), Err(FormatError::UnsupportedVersion { what: "TOC", version: 2 }));
    bytes[0] = b'X';
    assert_eq!(Toc::decode(&bytes), Err(FormatError::BadMagic { what: "TOC" }));
}
