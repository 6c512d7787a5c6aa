//! Prepared images: an image's flattened filesystem and its contents, built once from the index and
//! the TOCs and kept in a small in-memory cache, so that a warm bundle request reads no TOC.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use starlight_converter::convert::load_toc;
use starlight_converter::{AnyIndex, AnyStore, Index};
use starlight_format::bundle::EncodedEntries;
use starlight_format::{ContentLocation, Digest, Entry, ImageRecord, Kind};

use super::backend_error;
use super::stream::Plan;
use crate::error::GatewayError;

/// An image ready to be bundled.
#[derive(Debug)]
pub struct Prepared {
    pub record: ImageRecord,
    /// The flattened filesystem, parents before children.
    pub entries: Vec<Entry>,
    /// Path -> position in `entries`.
    pub by_path: HashMap<Vec<u8>, usize>,
    /// Every content the filesystem holds and its size.
    pub sizes: HashMap<Digest, u64>,
    /// The entries as the bundle header carries them.
    pub encoded: EncodedEntries,
    /// The start-up paths found without traces (see `order`), computed on first use.
    pub startup: tokio::sync::OnceCell<Arc<Vec<Vec<u8>>>>,
    /// The send order without traces (see `order::base_order`), computed on first use.
    pub base_order: tokio::sync::OnceCell<Arc<Vec<Digest>>>,
    /// Where every content is stored, looked up on first use (locations never change once
    /// recorded: the index keeps the first).
    pub locations: tokio::sync::OnceCell<Arc<HashMap<Digest, ContentLocation>>>,
    /// Recent bundle plans of this image, by what shaped them (see [`PlanKey`]).
    plans: Mutex<Vec<(PlanKey, Arc<Plan>)>>,
}

/// What makes two bundle requests of one image identical: the `have` images used and the trace
/// ranks (by digest of their stored form). Requests with held contents are never cached.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlanKey {
    pub have: Vec<Digest>,
    pub ranks: Option<Digest>,
}

/// Plans kept per image.
const PLANS_PER_IMAGE: usize = 8;

impl Prepared {
    pub fn new(record: ImageRecord, entries: Vec<Entry>) -> Prepared {
        let mut sizes = HashMap::new();
        let mut by_path = HashMap::with_capacity(entries.len());
        for (i, e) in entries.iter().enumerate() {
            by_path.insert(e.path.clone(), i);
            if let Kind::File { size, digest: Some(d) } = &e.kind {
                sizes.insert(*d, *size);
            }
        }
        Prepared {
            record,
            encoded: EncodedEntries::new(&entries),
            entries,
            by_path,
            sizes,
            startup: tokio::sync::OnceCell::new(),
            base_order: tokio::sync::OnceCell::new(),
            locations: tokio::sync::OnceCell::new(),
            plans: Mutex::new(Vec::new()),
        }
    }

    /// A plan made earlier for the same request.
    pub fn plan(&self, key: &PlanKey) -> Option<Arc<Plan>> {
        let plans = self.plans.lock().ok()?;
        plans.iter().find(|(k, _)| k == key).map(|(_, p)| p.clone())
    }

    pub fn keep_plan(&self, key: PlanKey, plan: Arc<Plan>) {
        if let Ok(mut plans) = self.plans.lock() {
            plans.retain(|(k, _)| *k != key);
            if plans.len() >= PLANS_PER_IMAGE {
                plans.remove(0);
            }
            plans.push((key, plan));
        }
    }

    /// The content behind `path` if it names a regular file (directly or as a hardlink).
    pub fn content_of(&self, path: &[u8]) -> Option<Digest> {
        let e = &self.entries[*self.by_path.get(path)?];
        match &e.kind {
            Kind::File { digest, .. } => *digest,
            Kind::Hardlink { target } => match &self.entries[*self.by_path.get(target)?].kind {
                Kind::File { digest, .. } => *digest,
                _ => None,
            },
            _ => None,
        }
    }

    pub fn contents(&self) -> HashSet<Digest> {
        self.sizes.keys().copied().collect()
    }
}

/// A bounded cache of prepared images, least recently used out.
#[derive(Debug)]
pub struct Cache {
    map: Mutex<HashMap<Digest, (Arc<Prepared>, u64)>>,
    capacity: usize,
    clock: AtomicU64,
}

impl Cache {
    pub fn new(capacity: usize) -> Cache {
        Cache { map: Mutex::new(HashMap::new()), capacity: capacity.max(1), clock: AtomicU64::new(0) }
    }

    fn get(&self, d: &Digest) -> Option<Arc<Prepared>> {
        let now = self.clock.fetch_add(1, Ordering::Relaxed);
        let mut map = self.map.lock().ok()?;
        let slot = map.get_mut(d)?;
        slot.1 = now;
        Some(slot.0.clone())
    }

    /// Whether `d` is prepared already.
    pub fn contains(&self, d: &Digest) -> bool {
        self.map.lock().is_ok_and(|m| m.contains_key(d))
    }

    /// Drops `d`, whose stored data changed (a corrupt object was dropped).
    pub fn forget(&self, d: &Digest) {
        if let Ok(mut m) = self.map.lock() {
            m.remove(d);
        }
    }

    fn put(&self, p: Arc<Prepared>) {
        let now = self.clock.fetch_add(1, Ordering::Relaxed);
        let Ok(mut map) = self.map.lock() else { return };
        if map.len() >= self.capacity
            && let Some(oldest) = map.iter().min_by_key(|(_, (_, t))| *t).map(|(k, _)| *k)
        {
            map.remove(&oldest);
        }
        map.insert(p.record.manifest_digest, (p, now));
    }

    /// The prepared image for `record`: from the cache, else built from its layers' TOCs.
    pub async fn prepare(
        &self,
        store: &AnyStore,
        index: &AnyIndex,
        record: ImageRecord,
    ) -> Result<Arc<Prepared>, GatewayError> {
        if let Some(p) = self.get(&record.manifest_digest) {
            return Ok(p);
        }
        let mut layers = Vec::with_capacity(record.layers.len());
        // Layers by the compressed blob the manifest names, which produced them; never by diffID.
        for l in &record.layers {
            let rec = index
                .get_layer_from_blob(&l.digest)
                .await
                .map_err(backend_error)?
                .filter(|r| r.diff_id == l.diff_id)
                .ok_or_else(|| {
                    GatewayError::Internal(format!(
                        "image {} names layer {} (diffID {}) that the index does not hold",
                        record.manifest_digest, l.digest, l.diff_id
                    ))
                })?;
            layers.push(rec);
        }
        let tocs = futures::future::try_join_all(layers.iter().map(|l| load_toc(store, l)))
            .await
            .map_err(|e| GatewayError::Internal(format!("image {}: {e}", record.manifest_digest)))?;
        let image = record.manifest_digest;
        let p = tokio::task::spawn_blocking(move || {
            let refs: Vec<&starlight_format::Toc> = tocs.iter().collect();
            starlight_format::flatten::flatten(&refs).map(|entries| Prepared::new(record, entries))
        })
        .await
        .map_err(|e| GatewayError::Internal(format!("flattening {image}: {e}")))?
        .map_err(|e| GatewayError::Unconvertible(format!("image {image}: {e}")))?;
        let p = Arc::new(p);
        self.put(p.clone());
        Ok(p)
    }
}
