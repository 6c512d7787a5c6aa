//! Layers whose conversion failed for good, remembered for a bounded time so that another image
//! naming the same layer fails at once instead of fetching and decompressing it again.
//!
//! A layer is keyed by everything its manifest and config say of it: the compressed blob digest,
//! the declared size and media type, and the claimed diffID. The outcome of a conversion depends
//! on nothing else, so a remembered failure never refuses a layer that could convert: the same
//! blob named with its true diffID by another image is a different key.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use starlight_format::{Digest, ImageLayer};

/// Layers remembered at most; beyond this the oldest goes.
const MAX_LAYERS: usize = 4096;

type Key = (Digest, u64, String, Digest);

fn key(l: &ImageLayer) -> Key {
    (l.digest, l.size, l.media_type.clone(), l.diff_id)
}

/// Failed layers and why, each for `ttl`.
#[derive(Debug)]
pub struct FailedLayers {
    ttl: Duration,
    map: Mutex<HashMap<Key, (Instant, String)>>,
}

impl FailedLayers {
    /// Failures are remembered for `ttl` (zero: not at all).
    pub fn new(ttl: Duration) -> FailedLayers {
        FailedLayers { ttl, map: Mutex::default() }
    }

    /// Why `layer` failed, if it did within the time to live.
    pub fn get(&self, layer: &ImageLayer) -> Option<String> {
        let mut map = self.map.lock().ok()?;
        let k = key(layer);
        match map.get(&k) {
            Some((at, why)) if at.elapsed() < self.ttl => Some(why.clone()),
            Some(_) => {
                map.remove(&k);
                None
            }
            None => None,
        }
    }

    pub fn remember(&self, layer: &ImageLayer, why: &str) {
        if self.ttl.is_zero() {
            return;
        }
        let Ok(mut map) = self.map.lock() else { return };
        if map.len() >= MAX_LAYERS {
            map.retain(|_, (at, _)| at.elapsed() < self.ttl);
            if map.len() >= MAX_LAYERS
                && let Some(oldest) = map.iter().min_by_key(|(_, (at, _))| *at).map(|(k, _)| k.clone())
            {
                map.remove(&oldest);
            }
        }
        map.insert(key(layer), (Instant::now(), why.to_string()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(diff_id: &[u8]) -> ImageLayer {
        ImageLayer {
            digest: Digest::of(b"blob"),
            size: 10,
            media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
            diff_id: Digest::of(diff_id),
        }
    }

    #[test]
    fn a_failure_is_kept_for_its_layer_claims_only_and_only_for_the_ttl() {
        let f = FailedLayers::new(Duration::from_millis(200));
        f.remember(&layer(b"wrong"), "diffID mismatch");
        assert_eq!(f.get(&layer(b"wrong")).as_deref(), Some("diffID mismatch"));
        assert_eq!(f.get(&layer(b"true")), None, "the same blob with another diffID is not refused");
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(f.get(&layer(b"wrong")), None, "expired");
        let off = FailedLayers::new(Duration::ZERO);
        off.remember(&layer(b"wrong"), "x");
        assert_eq!(off.get(&layer(b"wrong")), None);
    }
}
