//! Layers whose conversion failed for good, remembered for a bounded time so that another image
//! naming the same layer fails at once instead of fetching and decompressing it again.
//!
//! A layer is keyed by everything its manifest and config say of it: the compressed blob digest,
//! the declared size and media type, and the claimed diffID. The outcome of a conversion depends
//! on nothing else, so a remembered failure never refuses a layer that could convert: the same
//! blob named with its true diffID by another image is a different key.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use starlight_format::{Digest, ImageLayer};

/// Entries a [`Recent`] keeps at most by default; beyond this the oldest goes.
pub const MAX_RECENT: usize = 4096;

/// A bounded map whose entries expire: what happened lately, by key.
#[derive(Debug)]
pub struct Recent<K, V> {
    ttl: Duration,
    max: usize,
    map: Mutex<HashMap<K, (Instant, V)>>,
}

impl<K: Eq + Hash + Clone, V: Clone> Recent<K, V> {
    /// Entries live for `ttl` (zero: nothing is kept), at most `max` of them.
    pub fn new(ttl: Duration, max: usize) -> Recent<K, V> {
        Recent { ttl, max: max.max(1), map: Mutex::default() }
    }

    /// The value kept for `key`, if it has not expired.
    pub fn get(&self, key: &K) -> Option<V> {
        let mut map = self.map.lock().ok()?;
        match map.get(key) {
            Some((at, v)) if at.elapsed() < self.ttl => Some(v.clone()),
            Some(_) => {
                map.remove(key);
                None
            }
            None => None,
        }
    }

    /// Keeps `value` for `key`, dropping expired entries, then the oldest, when full.
    pub fn insert(&self, key: K, value: V) {
        if self.ttl.is_zero() {
            return;
        }
        let Ok(mut map) = self.map.lock() else { return };
        if map.len() >= self.max {
            map.retain(|_, (at, _)| at.elapsed() < self.ttl);
            if map.len() >= self.max
                && let Some(oldest) = map.iter().min_by_key(|(_, (at, _))| *at).map(|(k, _)| k.clone())
            {
                map.remove(&oldest);
            }
        }
        map.insert(key, (Instant::now(), value));
    }

    /// Entries held (expired ones included until they are dropped).
    pub fn len(&self) -> usize {
        self.map.lock().map_or(0, |m| m.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

type Key = (Digest, u64, String, Digest);

fn key(l: &ImageLayer) -> Key {
    (l.digest, l.size, l.media_type.clone(), l.diff_id)
}

/// Failed layers and why, each for a time to live.
#[derive(Debug)]
pub struct FailedLayers(Recent<Key, String>);

impl FailedLayers {
    /// Failures are remembered for `ttl` (zero: not at all).
    pub fn new(ttl: Duration) -> FailedLayers {
        FailedLayers(Recent::new(ttl, MAX_RECENT))
    }

    /// Why `layer` failed, if it did within the time to live.
    pub fn get(&self, layer: &ImageLayer) -> Option<String> {
        self.0.get(&key(layer))
    }

    pub fn remember(&self, layer: &ImageLayer, why: &str) {
        self.0.insert(key(layer), why.to_string());
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

    #[test]
    fn the_count_is_bounded() {
        let r = Recent::new(Duration::from_secs(60), 8);
        for i in 0..20u32 {
            r.insert(i, ());
        }
        assert_eq!(r.len(), 8);
        assert!(r.get(&19).is_some(), "the newest stays");
    }
}
