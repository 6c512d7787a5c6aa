//! Bundle decoding: any byte stream, fed in pieces whose sizes come from the input, gives events
//! or an error, never a panic. Patches are answered with the patch applied to an empty base.
#![no_main]

use libfuzzer_sys::fuzz_target;
use starlight_format::bundle::{Decoder, Event};

fuzz_target!(|data: &[u8]| {
    let Some((&step, stream)) = data.split_first() else { return };
    let step = usize::from(step).max(1);
    let mut d = Decoder::new();
    for piece in stream.chunks(step) {
        let Ok(events) = d.feed(piece) else { return };
        for ev in events {
            match ev {
                Event::Patch { index, size, frame, .. } => {
                    let Ok(bytes) = starlight_format::bundle::apply_patch(&[], &frame, size) else { return };
                    if d.patched(index, &bytes).is_err() {
                        return;
                    }
                }
                Event::Chunk { data, .. } => d.recycle(data),
                _ => {}
            }
        }
    }
    let _ = d.finish();
});
