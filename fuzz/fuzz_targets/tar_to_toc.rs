//! Tar to TOC: any bytes, as an uncompressed layer, convert or fail with an error, never panic or
//! hang; the caps (layer size, entries) hold.
#![no_main]

use libfuzzer_sys::fuzz_target;
use starlight_converter::layer::{Compression, Expect, Options, convert_layer};

fuzz_target!(|data: &[u8]| {
    let tmp = std::env::temp_dir();
    let expect = Expect { name: "fuzz".into(), compression: Compression::None, digest: None, diff_id: None };
    let opts = Options { max_layer_bytes: 64 << 20, max_entries: 10_000, zstd_level: 1, workers: 1 };
    if let Ok(layer) = convert_layer(std::io::Cursor::new(data), &expect, &opts, &tmp) {
        assert!(layer.toc.entries.len() <= 10_000);
        for e in &layer.toc.entries {
            assert!(starlight_format::path::is_normal(&e.path), "{:?}", e.path);
        }
    }
});
