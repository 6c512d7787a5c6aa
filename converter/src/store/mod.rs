//! The object store that holds seekable blobs and TOCs: a local directory by default, S3 at scale.

use std::future::Future;
use std::path::{Path, PathBuf};

use bytes::Bytes;

mod local;
mod s3;

pub use local::LocalStore;
pub use s3::S3Store;

/// What went wrong talking to an object store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("object {key} not found")]
    NotFound { key: String },
    #[error("object store I/O on {key} ({path}): {source}")]
    Io {
        key: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("S3 {op} of {key} failed: {source}")]
    S3 {
        op: &'static str,
        key: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("object {key}: asked for {want} bytes at {offset}, got {got}")]
    ShortRead { key: String, offset: u64, want: u64, got: u64 },
    #[error("invalid store specification {0:?}: expected a directory or s3://BUCKET[/PREFIX]")]
    BadSpec(String),
}

/// An object store. Keys are relative `/`-separated paths such as `blobs/sha256/<hex>`.
/// Every write is atomic: a reader sees the whole object or no object, never a part.
pub trait ObjectStore: Send + Sync {
    /// Stores the file at `path` under `key`, streaming it (never whole in memory).
    fn put_file(&self, key: &str, path: &Path) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// Stores a small object.
    fn put_bytes(&self, key: &str, data: Bytes) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// Reads `len` bytes at `offset`; fewer bytes than asked is an error.
    fn get_range(
        &self,
        key: &str,
        offset: u64,
        len: u64,
    ) -> impl Future<Output = Result<Bytes, StoreError>> + Send;
    /// Reads several ranges, `(key, offset, len)`, returned in order. The default reads them
    /// concurrently; the local store reads them all in one blocking call.
    fn get_ranges(
        &self,
        ranges: Vec<(String, u64, u64)>,
    ) -> impl Future<Output = Result<Vec<Bytes>, StoreError>> + Send {
        async move {
            futures::future::try_join_all(ranges.iter().map(|(k, o, l)| self.get_range(k, *o, *l))).await
        }
    }
    /// Reads a whole small object (TOCs): at most `max` bytes, else an error.
    fn get(&self, key: &str, max: u64) -> impl Future<Output = Result<Bytes, StoreError>> + Send;
    /// The object's size, or `None` if it does not exist.
    fn size(&self, key: &str) -> impl Future<Output = Result<Option<u64>, StoreError>> + Send;
    /// Removes the object; removing a missing object is not an error.
    fn delete(&self, key: &str) -> impl Future<Output = Result<(), StoreError>> + Send;
}

/// The store chosen on the command line, by enum dispatch (the trait's async methods are not
/// object-safe, and there are only two backends).
#[derive(Debug, Clone)]
pub enum AnyStore {
    Local(LocalStore),
    S3(S3Store),
}

impl AnyStore {
    /// Opens `DIR` or `s3://BUCKET[/PREFIX]`. S3 endpoint, region and credentials come from the
    /// standard AWS environment variables (`AWS_ENDPOINT_URL`, `AWS_REGION`, `AWS_ACCESS_KEY_ID`, ...).
    pub async fn open(spec: &str) -> Result<AnyStore, StoreError> {
        if let Some(rest) = spec.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(StoreError::BadSpec(spec.to_string()));
            }
            return Ok(AnyStore::S3(S3Store::from_env(bucket, prefix).await?));
        }
        if spec.is_empty() || spec.contains("://") {
            return Err(StoreError::BadSpec(spec.to_string()));
        }
        Ok(AnyStore::Local(LocalStore::open(spec)?))
    }
}

macro_rules! dispatch {
    ($self:ident, $s:ident => $e:expr) => {
        match $self {
            AnyStore::Local($s) => $e,
            AnyStore::S3($s) => $e,
        }
    };
}

impl ObjectStore for AnyStore {
    async fn put_file(&self, key: &str, path: &Path) -> Result<(), StoreError> {
        dispatch!(self, s => s.put_file(key, path).await)
    }
    async fn put_bytes(&self, key: &str, data: Bytes) -> Result<(), StoreError> {
        dispatch!(self, s => s.put_bytes(key, data).await)
    }
    async fn get_range(&self, key: &str, offset: u64, len: u64) -> Result<Bytes, StoreError> {
        dispatch!(self, s => s.get_range(key, offset, len).await)
    }
    async fn get_ranges(&self, ranges: Vec<(String, u64, u64)>) -> Result<Vec<Bytes>, StoreError> {
        dispatch!(self, s => s.get_ranges(ranges).await)
    }
    async fn get(&self, key: &str, max: u64) -> Result<Bytes, StoreError> {
        dispatch!(self, s => s.get(key, max).await)
    }
    async fn size(&self, key: &str) -> Result<Option<u64>, StoreError> {
        dispatch!(self, s => s.size(key).await)
    }
    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        dispatch!(self, s => s.delete(key).await)
    }
}
