//! The file-hash index: image -> layers, layer (compressed blob digest, and diffID) -> TOC,
//! content digest -> location.
//! An embedded `redb` file by default, Redis (single node or cluster) at scale.

use std::future::Future;
use std::time::Duration;

use starlight_format::{ContentLocation, Digest, FormatError, ImageRecord, LayerRecord};

mod embedded;
mod redis;

pub use embedded::RedbIndex;
pub use redis::RedisIndex;

/// What went wrong talking to the index.
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error("index backend {backend}: {op} failed: {source}")]
    Backend {
        backend: &'static str,
        op: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("index record {key} is corrupt: {source}")]
    Corrupt {
        key: String,
        #[source]
        source: FormatError,
    },
    #[error("index record {key} not written: {source}")]
    Unwritable {
        key: String,
        #[source]
        source: FormatError,
    },
    #[error(
        "invalid index specification {0:?}: expected a file, redis://HOST:PORT or redis+cluster://HOST:PORT,..."
    )]
    BadSpec(String),
}

/// The index. Writes of contents keep what is there (first writer wins); layer and image records are
/// written only after everything they refer to is durable, which makes publication atomic.
pub trait Index: Send + Sync {
    /// Looks up many contents at once (one round trip where the backend allows).
    fn get_contents(
        &self,
        digests: &[Digest],
    ) -> impl Future<Output = Result<Vec<Option<ContentLocation>>, IndexError>> + Send;
    /// Records content locations, keeping any location already recorded for a digest.
    fn put_contents(
        &self,
        items: &[(Digest, ContentLocation)],
    ) -> impl Future<Output = Result<(), IndexError>> + Send;
    fn get_layer(
        &self,
        diff_id: &Digest,
    ) -> impl Future<Output = Result<Option<LayerRecord>, IndexError>> + Send;
    fn put_layer(&self, rec: &LayerRecord) -> impl Future<Output = Result<(), IndexError>> + Send;
    /// The layer converted from the compressed blob `blob` (the digest a manifest names). The only
    /// lookup by which a converted layer is reused: a diffID is what a config claims, a blob digest
    /// is what the registry holds.
    fn get_layer_from_blob(
        &self,
        blob: &Digest,
    ) -> impl Future<Output = Result<Option<LayerRecord>, IndexError>> + Send;
    /// Records that `rec` was converted from the compressed blob `blob`.
    fn put_layer_from_blob(
        &self,
        blob: &Digest,
        rec: &LayerRecord,
    ) -> impl Future<Output = Result<(), IndexError>> + Send;
    /// Image records are kept under a key version of their own: records published before layers
    /// were keyed by blob digest (which could name layers by a claimed diffID) are not read.
    fn get_image(
        &self,
        manifest: &Digest,
    ) -> impl Future<Output = Result<Option<ImageRecord>, IndexError>> + Send;
    /// Publishes an image: its record, then `name:tag` pointing at it when the record has a tag.
    fn put_image(&self, rec: &ImageRecord) -> impl Future<Output = Result<(), IndexError>> + Send;
    fn resolve_tag(
        &self,
        name: &str,
        tag: &str,
    ) -> impl Future<Output = Result<Option<Digest>, IndexError>> + Send;

    /// Forgets content locations (their blob went bad): the next conversion stores them again.
    fn delete_contents(&self, digests: &[Digest]) -> impl Future<Output = Result<(), IndexError>> + Send;
    /// Forgets a layer record, so that the next conversion of an image with it converts it again.
    fn delete_layer(&self, diff_id: &Digest) -> impl Future<Output = Result<(), IndexError>> + Send;
    /// Forgets which layer record a compressed blob produced, so that the blob is converted again.
    fn delete_layer_from_blob(&self, blob: &Digest) -> impl Future<Output = Result<(), IndexError>> + Send;
    /// Forgets an image record (its tag, if any, is left to point at nothing until re-published).
    fn delete_image(&self, manifest: &Digest) -> impl Future<Output = Result<(), IndexError>> + Send;
    /// Takes the lease `key` for `holder` for `ttl`, or extends it if `holder` has it already.
    /// False when another holder's lease is live. A holder that dies lets its lease lapse.
    fn try_lease(
        &self,
        key: &str,
        holder: &str,
        ttl: Duration,
    ) -> impl Future<Output = Result<bool, IndexError>> + Send;
    /// Gives the lease up if `holder` still has it.
    fn release_lease(&self, key: &str, holder: &str) -> impl Future<Output = Result<(), IndexError>> + Send;
}

/// The index chosen on the command line, by enum dispatch.
#[derive(Debug, Clone)]
pub enum AnyIndex {
    Redb(RedbIndex),
    Redis(RedisIndex),
}

impl AnyIndex {
    /// Opens `FILE` (embedded), `redis://HOST:PORT[/DB]` or `redis+cluster://HOST:PORT,HOST:PORT,...`.
    pub async fn open(spec: &str) -> Result<AnyIndex, IndexError> {
        if spec.starts_with("redis://") || spec.starts_with("rediss://") {
            return Ok(AnyIndex::Redis(RedisIndex::single(spec).await?));
        }
        if let Some(nodes) = spec.strip_prefix("redis+cluster://") {
            let urls: Vec<String> = nodes.split(',').map(|n| format!("redis://{n}")).collect();
            if nodes.is_empty() {
                return Err(IndexError::BadSpec(spec.to_string()));
            }
            return Ok(AnyIndex::Redis(RedisIndex::cluster(&urls).await?));
        }
        if spec.is_empty() || spec.contains("://") {
            return Err(IndexError::BadSpec(spec.to_string()));
        }
        Ok(AnyIndex::Redb(RedbIndex::open(spec)?))
    }
}

macro_rules! dispatch {
    ($self:ident, $i:ident => $e:expr) => {
        match $self {
            AnyIndex::Redb($i) => $e,
            AnyIndex::Redis($i) => $e,
        }
    };
}

impl Index for AnyIndex {
    async fn get_contents(&self, digests: &[Digest]) -> Result<Vec<Option<ContentLocation>>, IndexError> {
        dispatch!(self, i => i.get_contents(digests).await)
    }
    async fn put_contents(&self, items: &[(Digest, ContentLocation)]) -> Result<(), IndexError> {
        dispatch!(self, i => i.put_contents(items).await)
    }
    async fn get_layer(&self, diff_id: &Digest) -> Result<Option<LayerRecord>, IndexError> {
        dispatch!(self, i => i.get_layer(diff_id).await)
    }
    async fn put_layer(&self, rec: &LayerRecord) -> Result<(), IndexError> {
        dispatch!(self, i => i.put_layer(rec).await)
    }
    async fn get_layer_from_blob(&self, blob: &Digest) -> Result<Option<LayerRecord>, IndexError> {
        dispatch!(self, i => i.get_layer_from_blob(blob).await)
    }
    async fn put_layer_from_blob(&self, blob: &Digest, rec: &LayerRecord) -> Result<(), IndexError> {
        dispatch!(self, i => i.put_layer_from_blob(blob, rec).await)
    }
    async fn get_image(&self, manifest: &Digest) -> Result<Option<ImageRecord>, IndexError> {
        dispatch!(self, i => i.get_image(manifest).await)
    }
    async fn put_image(&self, rec: &ImageRecord) -> Result<(), IndexError> {
        dispatch!(self, i => i.put_image(rec).await)
    }
    async fn resolve_tag(&self, name: &str, tag: &str) -> Result<Option<Digest>, IndexError> {
        dispatch!(self, i => i.resolve_tag(name, tag).await)
    }
    async fn delete_contents(&self, digests: &[Digest]) -> Result<(), IndexError> {
        dispatch!(self, i => i.delete_contents(digests).await)
    }
    async fn delete_layer(&self, diff_id: &Digest) -> Result<(), IndexError> {
        dispatch!(self, i => i.delete_layer(diff_id).await)
    }
    async fn delete_layer_from_blob(&self, blob: &Digest) -> Result<(), IndexError> {
        dispatch!(self, i => i.delete_layer_from_blob(blob).await)
    }
    async fn delete_image(&self, manifest: &Digest) -> Result<(), IndexError> {
        dispatch!(self, i => i.delete_image(manifest).await)
    }
    async fn try_lease(&self, key: &str, holder: &str, ttl: Duration) -> Result<bool, IndexError> {
        dispatch!(self, i => i.try_lease(key, holder, ttl).await)
    }
    async fn release_lease(&self, key: &str, holder: &str) -> Result<(), IndexError> {
        dispatch!(self, i => i.release_lease(key, holder).await)
    }
}
