//! Single-flight conversion across gateways that share one index: before converting an image a
//! gateway takes a lease on it in the index, renewed while it converts. Another gateway that finds
//! the lease held waits for the image record to appear, polling with backoff, and takes the lease
//! over if its holder dies (the lease lapses when no longer renewed).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use starlight_converter::index::IndexError;
use starlight_converter::{AnyIndex, Index};
use starlight_format::{Digest, ImageRecord, Platform};
use tracing::{debug, warn};

/// A lease lapses this long after its last renewal.
const TTL: Duration = Duration::from_secs(30);
/// The holder renews this often.
const RENEW: Duration = Duration::from_secs(10);
/// Polling for another gateway's conversion starts at this interval and doubles up to `POLL_MAX`.
const POLL_MIN: Duration = Duration::from_millis(50);
const POLL_MAX: Duration = Duration::from_secs(2);

/// The outcome of asking for the lease on an image.
pub enum Lease {
    /// This gateway converts; the lease is given up when this is dropped.
    Held(Held),
    /// Another gateway converted the image meanwhile.
    Converted(ImageRecord),
}

/// A held lease, renewed in the background until dropped.
pub struct Held {
    index: AnyIndex,
    key: String,
    holder: String,
    renew: tokio::task::JoinHandle<()>,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.renew.abort();
        let (index, key, holder) = (self.index.clone(), std::mem::take(&mut self.key), self.holder.clone());
        // Released at once for whoever waits; if this fails the lease lapses on its own.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                if let Err(e) = index.release_lease(&key, &holder).await {
                    warn!(%key, error = %e, "conversion lease not released; it lapses by itself");
                }
            });
        }
    }
}

/// A name for this process's leases, unique among the gateways sharing an index.
fn holder() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let seed = format!("{}:{}:{n}", std::process::id(), t.as_nanos());
    Digest::of(seed.as_bytes()).hex()[..24].to_string()
}

/// Waits until this gateway may convert `digest` for `platform`, or another has converted it.
pub async fn take(index: &AnyIndex, digest: &Digest, platform: &Platform) -> Result<Lease, IndexError> {
    let key = format!("convert:{}:{platform}", digest.hex());
    let holder = holder();
    let mut wait = POLL_MIN;
    loop {
        if index.try_lease(&key, &holder, TTL).await? {
            let renew = {
                let (index, key, holder) = (index.clone(), key.clone(), holder.clone());
                tokio::spawn(async move {
                    loop {
                        tokio::time::sleep(RENEW).await;
                        match index.try_lease(&key, &holder, TTL).await {
                            Ok(true) => {}
                            Ok(false) => warn!(%key, "conversion lease lost to another gateway"),
                            Err(e) => warn!(%key, error = %e, "conversion lease not renewed"),
                        }
                    }
                })
            };
            let held = Held { index: index.clone(), key, holder, renew };
            // The last holder may have published just before it let go.
            if let Some(r) = index.get_image(digest).await? {
                return Ok(Lease::Converted(r));
            }
            return Ok(Lease::Held(held));
        }
        if let Some(r) = index.get_image(digest).await? {
            return Ok(Lease::Converted(r));
        }
        debug!(%key, wait_ms = wait.as_millis() as u64, "another gateway converts this image; waiting");
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(POLL_MAX);
    }
}
