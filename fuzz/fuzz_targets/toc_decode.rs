//! TOC decoding: any bytes give a TOC or an error, never a panic, a hang or a huge allocation; a
//! decoded TOC encodes back to bytes that decode to the same TOC.
#![no_main]

use libfuzzer_sys::fuzz_target;
use starlight_format::Toc;

fuzz_target!(|data: &[u8]| {
    if let Ok(toc) = Toc::decode(data) {
        let again = Toc::decode(&toc.encode()).expect("an encoded TOC decodes");
        assert_eq!(again.encode(), toc.encode());
    }
});
