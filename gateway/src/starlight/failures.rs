//! Conversions that failed for good (a bad layer, a bad image, a diffID that does not match),
//! remembered per image for a bounded time, so that asking again is answered at once instead of
//! fetching and decompressing the same bytes again. Transient failures (upstream unreachable,
//! storage down) are never remembered.

use std::sync::Arc;
use std::time::Duration;

use starlight_converter::failed::{MAX_RECENT, Recent};
use starlight_format::{Digest, Platform};

use super::convert::{ErrorKind, Failure};

/// An image: its manifest digest and platform.
type Key = (Digest, Platform);

/// Remembered failures by image.
#[derive(Debug)]
pub struct Failures(Recent<Key, Arc<Failure>>);

impl Failures {
    /// Failures are remembered for `ttl` (zero: not at all).
    pub fn new(ttl: Duration) -> Failures {
        Failures(Recent::new(ttl, MAX_RECENT))
    }

    /// The failure remembered for `key`, if it has not expired.
    pub fn get(&self, key: &Key) -> Option<Arc<Failure>> {
        self.0.get(key)
    }

    /// Remembers `failure` for `key` if it is of the kind that asking again cannot fix.
    pub fn remember(&self, key: Key, failure: &Arc<Failure>) {
        if matches!(failure.kind, ErrorKind::Unconvertible) {
            self.0.insert(key, failure.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failure(kind: ErrorKind) -> Arc<Failure> {
        Arc::new(Failure { kind, message: "layer x: diffID mismatch".into() })
    }

    #[test]
    fn only_unconvertible_failures_are_remembered_and_only_for_the_ttl() {
        let f = Failures::new(Duration::from_millis(200));
        let key = (Digest::of(b"m"), Platform::host());
        f.remember(key.clone(), &failure(ErrorKind::Upstream));
        assert!(f.get(&key).is_none(), "a transient failure is not remembered");
        f.remember(key.clone(), &failure(ErrorKind::Unconvertible));
        assert_eq!(f.get(&key).unwrap().message, "layer x: diffID mismatch");
        std::thread::sleep(Duration::from_millis(250));
        assert!(f.get(&key).is_none(), "expired");
    }

    #[test]
    fn the_count_is_bounded() {
        let f = Failures::new(Duration::from_secs(60));
        for i in 0..(MAX_RECENT + 10) as u32 {
            f.remember((Digest::of(&i.to_le_bytes()), Platform::host()), &failure(ErrorKind::Unconvertible));
        }
        assert_eq!(f.0.len(), MAX_RECENT);
    }
}
