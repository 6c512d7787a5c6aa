//! The delta bundle stream: round trips in any byte split, and every way a stream can lie.

use proptest::prelude::*;
use starlight_format::bundle::*;
use starlight_format::{CHUNK_SIZE, Digest, Entry, Kind};

fn header(contents: &[Vec<u8>]) -> Header {
    let manifest = br#"{"schemaVersion":2}"#.to_vec();
    let entries = contents
        .iter()
        .enumerate()
        .map(|(i, c)| Entry {
            path: format!("f{i}").into_bytes(),
            kind: Kind::File { size: c.len() as u64, digest: Some(Digest::of(c)) },
            mode: 0o644,
            uid: 0,
            gid: 0,
            mtime: 0,
            mtime_nsec: 0,
            xattrs: vec![],
        })
        .collect();
    Header {
        manifest_digest: Digest::of(&manifest),
        manifest,
        config: b"{}".to_vec(),
        platform: "linux/amd64".parse().unwrap(),
        entries,
        contents: contents
            .iter()
            .map(|c| ContentRef { digest: Digest::of(c), size: c.len() as u64 })
            .collect(),
    }
}

/// A bundle as the gateway writes it: stored zstd frames behind chunk prefixes.
fn encode(contents: &[Vec<u8>]) -> Vec<u8> {
    let mut out = encode_header(&header(contents));
    let mut bytes = 0;
    for (i, c) in contents.iter().enumerate() {
        for (k, chunk) in c.chunks(CHUNK_SIZE as usize).enumerate() {
            let frame = zstd::bulk::compress(chunk, 1).unwrap();
            out.extend(chunk_prefix(i as u64, (k as u64) * CHUNK_SIZE, frame.len()));
            out.extend(frame);
        }
        bytes += c.len() as u64;
    }
    out.extend(encode_trailer(contents.len() as u64, bytes));
    out
}

/// Decodes in pieces of `step` bytes and reassembles the verified contents.
fn decode(stream: &[u8], step: usize) -> Result<(Header, Vec<Vec<u8>>), BundleError> {
    let mut d = Decoder::new();
    let mut header = None;
    let mut contents: Vec<Vec<u8>> = Vec::new();
    let mut done = 0;
    for piece in stream.chunks(step.max(1)) {
        for ev in d.feed(piece)? {
            match ev {
                Event::Header(h) => {
                    contents = vec![Vec::new(); h.contents.len()];
                    header = Some(*h);
                }
                Event::Chunk { index, offset, data } => {
                    assert_eq!(contents[index as usize].len() as u64, offset);
                    contents[index as usize].extend(data);
                }
                Event::ContentDone { .. } => done += 1,
                Event::Patch { .. } => panic!("no patches here"),
                Event::End => assert_eq!(done, contents.len()),
            }
        }
    }
    d.finish()?;
    Ok((header.unwrap(), contents))
}

fn sample() -> Vec<Vec<u8>> {
    let big: Vec<u8> = (0..(CHUNK_SIZE as usize * 2 + 777)).map(|i| (i * 31 % 253) as u8).collect();
    vec![b"hello\n".to_vec(), big, b"x".to_vec()]
}

#[test]
fn round_trips_whole_and_byte_by_byte() {
    let contents = sample();
    let stream = encode(&contents);
    for step in [stream.len(), 65536, 4097, 1] {
        if step == 1 {
            // Byte by byte over the small contents only, to keep the test fast.
            let small = vec![b"hello\n".to_vec(), b"x".to_vec()];
            let (h, got) = decode(&encode(&small), 1).unwrap();
            assert_eq!((h, got), (header(&small), small.clone()));
            continue;
        }
        let (h, got) = decode(&stream, step).unwrap();
        assert_eq!(h, header(&contents));
        assert_eq!(got, contents);
    }
}

#[test]
fn an_empty_bundle_is_a_header_and_a_trailer() {
    let (h, got) = decode(&encode(&[]), 3).unwrap();
    assert!(h.contents.is_empty() && got.is_empty());
}

#[test]
fn tampered_content_is_rejected() {
    let contents = vec![b"the real bytes".to_vec()];
    let mut h = header(&contents);
    h.contents[0].digest = Digest::of(b"something else");
    let mut stream = encode_header(&h);
    let frame = zstd::bulk::compress(&contents[0], 1).unwrap();
    stream.extend(chunk_prefix(0, 0, frame.len()));
    stream.extend(frame);
    let err = decode(&stream, 100).unwrap_err();
    assert!(matches!(err, BundleError::DigestMismatch { index: 0, .. }), "{err}");
}

#[test]
fn a_stream_without_its_trailer_is_truncated() {
    let stream = encode(&sample());
    for cut in [0, 5, 9, 200, stream.len() / 2, stream.len() - 1] {
        let err = decode(&stream[..cut], 4096).unwrap_err();
        assert!(matches!(err, BundleError::Truncated { .. }), "cut {cut}: {err}");
    }
}

#[test]
fn out_of_order_and_unknown_chunks_are_rejected() {
    let contents = sample();
    let mut stream = encode_header(&header(&contents));
    let frame = zstd::bulk::compress(&contents[1][CHUNK_SIZE as usize..2 * CHUNK_SIZE as usize], 1).unwrap();
    stream.extend(chunk_prefix(1, CHUNK_SIZE, frame.len()));
    stream.extend(&frame);
    assert!(matches!(decode(&stream, 1 << 20), Err(BundleError::Bad { .. })));

    let mut stream = encode_header(&header(&contents));
    let frame = zstd::bulk::compress(b"x", 1).unwrap();
    stream.extend(chunk_prefix(9, 0, frame.len()));
    stream.extend(&frame);
    assert!(matches!(decode(&stream, 1 << 20), Err(BundleError::Bad { .. })));
}

#[test]
fn a_lying_trailer_is_rejected() {
    let contents = vec![b"a".to_vec()];
    let mut stream = encode(&contents);
    let trailer = encode_trailer(1, 1);
    stream.truncate(stream.len() - trailer.len());
    stream.extend(encode_trailer(2, 2));
    assert!(matches!(decode(&stream, 7), Err(BundleError::Bad { .. })));
}

proptest! {
    #[test]
    fn random_bytes_never_panic(data in prop::collection::vec(any::<u8>(), 0..600)) {
        let mut framed = b"SLBNDL\x01\x00".to_vec();
        framed.extend_from_slice(&data);
        let _ = Decoder::new().feed(&framed);
        let _ = Decoder::new().feed(&data);
    }

    #[test]
    fn any_split_decodes_the_same(contents in prop::collection::vec(prop::collection::vec(any::<u8>(), 1..300), 0..6), step in 1usize..200) {
        let stream = encode(&contents);
        let (h, got) = decode(&stream, step).unwrap();
        prop_assert_eq!(h, header(&contents));
        prop_assert_eq!(got, contents);
    }
}

#[test]
fn a_patch_rebuilds_a_content_from_its_base() {
    let base: Vec<u8> = (0..300_000u32).flat_map(|i| (i * 7919).to_le_bytes()).collect();
    let mut new = base.clone();
    new[1000..1010].copy_from_slice(b"0123456789");
    new.extend_from_slice(b"appended");
    let patch = make_patch(&base, &new, 3).unwrap();
    let alone = zstd::bulk::compress(&new, 3).unwrap();
    assert!(patch.len() * 20 < alone.len(), "patch {} vs alone {}", patch.len(), alone.len());

    let contents = vec![b"plain".to_vec(), new.clone()];
    let mut stream = encode_header(&header(&contents));
    let frame = zstd::bulk::compress(&contents[0], 1).unwrap();
    stream.extend(chunk_prefix(0, 0, frame.len()));
    stream.extend(frame);
    stream.extend(patch_prefix(1, &Digest::of(&base), patch.len()));
    stream.extend(&patch);
    stream.extend(encode_trailer(2, (contents[0].len() + new.len()) as u64));

    for tamper in [false, true] {
        let mut d = Decoder::new();
        let (mut done, mut ended) = (0, false);
        for ev in d.feed(&stream).unwrap() {
            match ev {
                Event::Patch { index, base: b, size, frame } => {
                    assert_eq!((index, b, size), (1, Digest::of(&base), new.len() as u64));
                    let mut rebuilt = apply_patch(&base, &frame, size).unwrap();
                    assert_eq!(rebuilt, new);
                    if tamper {
                        rebuilt[0] ^= 1;
                        assert!(matches!(
                            d.patched(index, &rebuilt),
                            Err(BundleError::DigestMismatch { .. })
                        ));
                        continue;
                    }
                    assert!(matches!(
                        d.patched(index, &rebuilt).unwrap(),
                        Event::ContentDone { index: 1, .. }
                    ));
                    done += 1;
                }
                Event::ContentDone { .. } => done += 1,
                Event::End => ended = true,
                _ => {}
            }
        }
        assert!(ended);
        if tamper {
            assert!(matches!(d.finish(), Err(BundleError::Patch { index: 1, .. })), "an unresolved patch");
        } else {
            assert_eq!(done, 2);
            d.finish().unwrap();
        }
    }
    // The wrong base does not give the content.
    let other = vec![0u8; base.len()];
    assert!(apply_patch(&other, &patch, new.len() as u64).map(|v| v != new).unwrap_or(true));
}

#[test]
fn a_content_sent_twice_is_rejected() {
    let contents = vec![b"once".to_vec()];
    let mut stream = encode(&contents);
    let trailer = encode_trailer(1, 4);
    stream.truncate(stream.len() - trailer.len());
    let frame = zstd::bulk::compress(&contents[0], 1).unwrap();
    stream.extend(patch_prefix(0, &Digest::of(b"x"), frame.len()));
    stream.extend(frame);
    let mut d = Decoder::new();
    let err = d.feed(&stream).unwrap_err();
    assert!(err.to_string().contains("sent twice"), "{err}");
}

#[test]
fn a_compressed_header_decodes_the_same() {
    let contents = sample();
    let plain = encode(&contents);
    let h = encode_header(&header(&contents));
    let z = compress_header(&h, 3).unwrap();
    let mut stream = z.clone();
    stream.extend_from_slice(&plain[h.len()..]);
    for step in [1, 7, 4096, usize::MAX] {
        assert_eq!(decode(&stream, step).unwrap(), decode(&plain, usize::MAX).unwrap());
    }
    assert!(compress_header(&z, 3).is_err(), "only a plain header is compressed");
    let mut bad = z;
    let n = bad.len();
    bad[n - 3] ^= 0xff;
    let mut d = Decoder::new();
    assert!(d.feed(&bad).is_err());
}

#[test]
fn a_batch_carries_small_contents_together() {
    let contents: Vec<Vec<u8>> =
        (0..50).map(|i| format!("small file number {i}\n").repeat(3).into_bytes()).collect();
    let mut stream = encode_header(&header(&contents));
    // Contents 0..40 in two batches, the rest as chunks.
    for (first, count) in [(0u64, 25u64), (25, 15)] {
        let joined: Vec<u8> = contents[first as usize..(first + count) as usize].concat();
        let frame = zstd::bulk::compress(&joined, 3).unwrap();
        stream.extend(batch_prefix(first, count, frame.len()));
        stream.extend(frame);
    }
    for (i, c) in contents.iter().enumerate().skip(40) {
        let frame = zstd::bulk::compress(c, 1).unwrap();
        stream.extend(chunk_prefix(i as u64, 0, frame.len()));
        stream.extend(frame);
    }
    let bytes: u64 = contents.iter().map(|c| c.len() as u64).sum();
    stream.extend(encode_trailer(contents.len() as u64, bytes));
    let (_, got) = decode(&stream, 13).unwrap();
    assert_eq!(got, contents);

    // A batch whose bytes do not match a digest, or that overlaps what came, is refused.
    let mut bad = encode_header(&header(&contents));
    let mut joined: Vec<u8> = contents[..2].concat();
    joined[0] ^= 1;
    let frame = zstd::bulk::compress(&joined, 3).unwrap();
    bad.extend(batch_prefix(0, 2, frame.len()));
    bad.extend(frame);
    assert!(matches!(Decoder::new().feed(&bad), Err(BundleError::DigestMismatch { index: 0, .. })));
    let mut twice = encode_header(&header(&contents));
    let frame = zstd::bulk::compress(&contents[..2].concat(), 3).unwrap();
    for _ in 0..2 {
        twice.extend(batch_prefix(0, 2, frame.len()));
        twice.extend(&frame);
    }
    assert!(Decoder::new().feed(&twice).unwrap_err().to_string().contains("sent twice"));
    let mut out_of_range = encode_header(&header(&contents));
    out_of_range.extend(batch_prefix(49, 2, frame.len()));
    out_of_range.extend(&frame);
    assert!(Decoder::new().feed(&out_of_range).is_err());
}
