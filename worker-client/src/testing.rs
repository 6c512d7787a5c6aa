//! Headers built entry by entry, for the unit tests.

use starlight_format::bundle::Header;
use starlight_format::{Digest, Entry, Kind};

pub fn entry(path: &str, kind: Kind) -> Entry {
    Entry {
        path: path.as_bytes().to_vec(),
        kind,
        mode: 0o644,
        uid: 0,
        gid: 0,
        mtime: 0,
        mtime_nsec: 0,
        xattrs: vec![],
    }
}

/// A header of `entries` whose manifest is `{}`.
pub fn header(entries: Vec<Entry>) -> Header {
    Header {
        manifest_digest: Digest::of(b"{}"),
        manifest: b"{}".to_vec(),
        config: b"{}".to_vec(),
        platform: starlight_format::Platform::host(),
        entries,
        contents: vec![],
    }
}
