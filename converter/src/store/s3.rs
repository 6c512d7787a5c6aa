//! S3 (and S3-compatible servers) as the object store.

use std::path::Path;
use std::time::Duration;

use aws_sdk_s3::Client;
use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::{ByteStream, Length};
use aws_sdk_s3::types::{
    BucketLocationConstraint, CompletedMultipartUpload, CompletedPart, CreateBucketConfiguration,
};
use bytes::{Bytes, BytesMut};
use futures::{StreamExt, TryStreamExt};
use tracing::{debug, warn};

use super::{ObjectStore, StoreError};

/// Files above this size go up in parts: a single PUT cannot resume, and S3 caps it at 5 GiB.
const MULTIPART_THRESHOLD: u64 = 64 << 20;
/// Part size: large enough that a 5 GiB blob stays far below S3's 10,000-part limit.
const PART_SIZE: u64 = 16 << 20;
/// Parts in flight at once: enough to fill a link, few enough to bound memory and open files.
const PART_CONCURRENCY: usize = 4;
/// Attempts per request, the first included; a dead endpoint fails after a few seconds of backoff.
const MAX_ATTEMPTS: u32 = 4;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound on one whole operation (all attempts), so a hung server gives an error, not a hang.
const OPERATION_TIMEOUT: Duration = Duration::from_secs(60);
/// Uploads get extra time per MiB on top of [`OPERATION_TIMEOUT`]: 64 MiB at 1 MiB/s must not fail.
const UPLOAD_SECS_PER_MIB: u64 = 1;

/// An S3 bucket, with every key under an optional prefix. Cheap to clone (the client is shared).
#[derive(Clone, Debug)]
pub struct S3Store {
    client: Client,
    bucket: String,
    /// Without leading or trailing `/`; empty for the bucket root.
    prefix: String,
    region: String,
}

type HttpResponse = aws_sdk_s3::config::http::HttpResponse;

/// The HTTP status of an SDK error's response, when there was one.
fn status<E>(err: &SdkError<E, HttpResponse>) -> Option<u16> {
    err.raw_response().map(|r| r.status().as_u16())
}

/// Whether an SDK error means "no such object" (and not "no such bucket", which is a setup error).
fn is_not_found<E: ProvideErrorMetadata>(err: &SdkError<E, HttpResponse>) -> bool {
    match err {
        SdkError::ServiceError(e) => match e.err().code() {
            Some(code) => matches!(code, "NoSuchKey" | "NotFound"),
            // HEAD responses have no body, hence no code.
            None => status(err) == Some(404),
        },
        _ => false,
    }
}

/// Flattens an SDK error into one line: its own `Display` says only "service error" or "dispatch
/// failure", and `DisplayErrorContext` appends a long `Debug` dump.
fn s3_error<E: ProvideErrorMetadata + std::error::Error + 'static>(
    op: &'static str,
    key: &str,
    err: SdkError<E, HttpResponse>,
) -> StoreError {
    let detail = match &err {
        SdkError::ServiceError(e) => {
            let status = e.raw().status().as_u16();
            match (e.err().code(), e.err().message()) {
                (Some(code), Some(m)) => format!("{code} (HTTP {status}): {m}"),
                (Some(code), None) => format!("{code} (HTTP {status})"),
                // HEAD responses carry no error body.
                (None, _) if status == 403 => format!("HTTP {status}: access denied (credentials?)"),
                (None, _) => format!("HTTP {status}"),
            }
        }
        _ => {
            let mut chain = err.to_string();
            let mut next = std::error::Error::source(&err);
            while let Some(e) = next {
                chain = format!("{chain}: {e}");
                next = e.source();
            }
            chain
        }
    };
    s3_other(op, key, detail)
}

fn s3_other(op: &'static str, key: &str, detail: String) -> StoreError {
    StoreError::S3 { op, key: key.to_string(), source: detail.into() }
}

/// The SDK settings both constructors share: bounded retries and timeouts.
fn retry_config() -> RetryConfig {
    RetryConfig::standard().with_max_attempts(MAX_ATTEMPTS)
}

fn timeout_config(operation: Duration) -> TimeoutConfig {
    TimeoutConfig::builder().connect_timeout(CONNECT_TIMEOUT).operation_timeout(operation).build()
}

/// A longer operation timeout for sending `len` bytes.
fn upload_override(len: u64) -> aws_sdk_s3::config::Builder {
    let secs = OPERATION_TIMEOUT.as_secs() + (len >> 20) * UPLOAD_SECS_PER_MIB;
    aws_sdk_s3::config::Builder::default().timeout_config(timeout_config(Duration::from_secs(secs)))
}

impl S3Store {
    /// Configures the client from the standard AWS environment (`AWS_ENDPOINT_URL`, `AWS_REGION`,
    /// `AWS_ACCESS_KEY_ID`, profiles, ...), as every other S3 tool does. Binaries only: reads the
    /// process environment.
    pub async fn from_env(bucket: &str, prefix: &str) -> Result<S3Store, StoreError> {
        let shared = aws_config::defaults(BehaviorVersion::latest())
            .retry_config(retry_config())
            .timeout_config(timeout_config(OPERATION_TIMEOUT))
            .load()
            .await;
        let region = shared.region().map_or_else(|| "us-east-1".to_string(), |r| r.to_string());
        let config = aws_sdk_s3::config::Builder::from(&shared)
            .region(Region::new(region.clone()))
            .force_path_style(true)
            .build();
        Ok(Self::new(Client::from_conf(config), bucket, prefix, region))
    }

    /// Configures the client explicitly, for tests and embedders that must not touch the process
    /// environment (setting env vars is unsound once threads run).
    pub async fn with_config(
        bucket: &str,
        prefix: &str,
        endpoint: &str,
        access_key: &str,
        secret_key: &str,
        region: &str,
    ) -> Result<S3Store, StoreError> {
        let config = aws_sdk_s3::config::Builder::new()
            .behavior_version(BehaviorVersion::latest())
            .endpoint_url(endpoint)
            .region(Region::new(region.to_string()))
            .credentials_provider(Credentials::new(access_key, secret_key, None, None, "starlight-static"))
            .force_path_style(true)
            .retry_config(retry_config())
            .timeout_config(timeout_config(OPERATION_TIMEOUT))
            .build();
        Ok(Self::new(Client::from_conf(config), bucket, prefix, region.to_string()))
    }

    fn new(client: Client, bucket: &str, prefix: &str, region: String) -> S3Store {
        S3Store { client, bucket: bucket.to_string(), prefix: prefix.trim_matches('/').to_string(), region }
    }

    /// The full S3 key of a store key.
    fn full_key(&self, key: &str) -> String {
        let key = key.trim_start_matches('/');
        if self.prefix.is_empty() { key.to_string() } else { format!("{}/{key}", self.prefix) }
    }

    /// Creates the bucket unless it exists, so a fresh deployment (or a test server) works at once.
    pub async fn ensure_bucket(&self) -> Result<(), StoreError> {
        let bucket = &self.bucket;
        match self.client.head_bucket().bucket(bucket).send().await {
            Ok(_) => return Ok(()),
            Err(e) if status(&e) == Some(404) => {}
            Err(e) => return Err(s3_error("head bucket", bucket, e)),
        }
        let mut req = self.client.create_bucket().bucket(bucket);
        // us-east-1 is the one region that rejects an explicit location constraint.
        if self.region != "us-east-1" {
            let constraint = BucketLocationConstraint::from(self.region.as_str());
            req = req.create_bucket_configuration(
                CreateBucketConfiguration::builder().location_constraint(constraint).build(),
            );
        }
        match req.send().await {
            Ok(_) => {
                debug!(bucket = %bucket, "created bucket");
                Ok(())
            }
            // Lost a race with another creator: the bucket is there, which is all we wanted.
            Err(e) if matches!(e.code(), Some("BucketAlreadyOwnedByYou" | "BucketAlreadyExists")) => Ok(()),
            Err(e) => Err(s3_error("create bucket", bucket, e)),
        }
    }

    async fn put_multipart(&self, key: &str, full: &str, path: &Path, len: u64) -> Result<(), StoreError> {
        let created = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(full)
            .send()
            .await
            .map_err(|e| s3_error("create multipart upload", key, e))?;
        let upload_id = created
            .upload_id()
            .ok_or_else(|| s3_other("create multipart upload", key, "response has no upload id".into()))?
            .to_string();
        debug!(key, upload_id, bytes = len, "multipart upload started");
        let result = async {
            let parts = self.upload_parts(key, full, path, len, &upload_id).await?;
            let done = CompletedMultipartUpload::builder().set_parts(Some(parts)).build();
            let req = self.client.complete_multipart_upload().bucket(&self.bucket).key(full);
            let sent = req.upload_id(&upload_id).multipart_upload(done).send().await;
            sent.map_err(|e| s3_error("complete multipart upload", key, e))
        }
        .await;
        match result {
            Ok(_) => {
                debug!(key, upload_id, "multipart upload completed");
                Ok(())
            }
            Err(e) => {
                // Abort, or the parts already sent keep costing storage until a lifecycle rule runs.
                let req = self.client.abort_multipart_upload().bucket(&self.bucket).key(full);
                if let Err(e) = req.upload_id(&upload_id).send().await {
                    warn!(key, upload_id, error = %s3_error("abort multipart upload", key, e), "could not abort multipart upload");
                }
                Err(e)
            }
        }
    }

    async fn upload_parts(
        &self,
        key: &str,
        full: &str,
        path: &Path,
        len: u64,
        upload_id: &str,
    ) -> Result<Vec<CompletedPart>, StoreError> {
        let count = len.div_ceil(PART_SIZE);
        futures::stream::iter(0..count)
            .map(|i| async move {
                let offset = i * PART_SIZE;
                let part_len = PART_SIZE.min(len - offset);
                let number = i32::try_from(i + 1)
                    .map_err(|_| s3_other("upload part", key, format!("too many parts ({count})")))?;
                let body = ByteStream::read_from()
                    .path(path)
                    .offset(offset)
                    .length(Length::Exact(part_len))
                    .build()
                    .await
                    .map_err(|e| StoreError::Io {
                        key: key.to_string(),
                        path: path.to_path_buf(),
                        source: std::io::Error::other(e),
                    })?;
                let out = self
                    .client
                    .upload_part()
                    .bucket(&self.bucket)
                    .key(full)
                    .upload_id(upload_id)
                    .part_number(number)
                    .content_length(part_len as i64)
                    .body(body)
                    .customize()
                    .config_override(upload_override(part_len))
                    .send()
                    .await
                    .map_err(|e| s3_error("upload part", key, e))?;
                debug!(key, part = number, bytes = part_len, "uploaded part");
                Ok(CompletedPart::builder()
                    .part_number(number)
                    .set_e_tag(out.e_tag().map(str::to_string))
                    .build())
            })
            .buffered(PART_CONCURRENCY)
            .try_collect()
            .await
    }
}

/// Reads a response body, refusing to buffer more than `max` bytes.
async fn read_capped(
    mut body: ByteStream,
    key: &str,
    op: &'static str,
    max: u64,
) -> Result<Bytes, StoreError> {
    let mut buf = BytesMut::new();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| s3_other(op, key, format!("reading body: {e}")))?;
        if (buf.len() + chunk.len()) as u64 > max {
            return Err(s3_other(op, key, format!("response body exceeds the {max}-byte limit")));
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf.freeze())
}

impl ObjectStore for S3Store {
    async fn put_file(&self, key: &str, path: &Path) -> Result<(), StoreError> {
        let io_err = |source| StoreError::Io { key: key.to_string(), path: path.to_path_buf(), source };
        let len = tokio::fs::metadata(path).await.map_err(io_err)?.len();
        let full = self.full_key(key);
        if len > MULTIPART_THRESHOLD {
            return self.put_multipart(key, &full, path, len).await;
        }
        let body = ByteStream::from_path(path).await.map_err(|e| io_err(std::io::Error::other(e)))?;
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(&full)
            .body(body)
            .customize()
            .config_override(upload_override(len))
            .send()
            .await
            .map_err(|e| s3_error("put", key, e))?;
        debug!(key, bytes = len, "put file");
        Ok(())
    }

    async fn put_bytes(&self, key: &str, data: Bytes) -> Result<(), StoreError> {
        let len = data.len();
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(self.full_key(key))
            .body(ByteStream::from(data))
            .send()
            .await
            .map_err(|e| s3_error("put", key, e))?;
        debug!(key, bytes = len, "put bytes");
        Ok(())
    }

    async fn get_range(&self, key: &str, offset: u64, len: u64) -> Result<Bytes, StoreError> {
        if len == 0 {
            return Ok(Bytes::new());
        }
        let short = |got: u64| StoreError::ShortRead { key: key.to_string(), offset, want: len, got };
        let end = offset.checked_add(len - 1).ok_or_else(|| short(0))?;
        let resp = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(self.full_key(key))
            .range(format!("bytes={offset}-{end}"))
            .send()
            .await;
        let resp = match resp {
            Ok(r) => r,
            Err(e) if is_not_found(&e) => return Err(StoreError::NotFound { key: key.to_string() }),
            // 416: the range starts at or past the end of the object.
            Err(e) if status(&e) == Some(416) => return Err(short(0)),
            Err(e) => return Err(s3_error("get range", key, e)),
        };
        // A server that ignored the Range header would send the whole object: the cap catches it.
        let data = read_capped(resp.body, key, "get range", len).await?;
        if (data.len() as u64) < len {
            return Err(short(data.len() as u64));
        }
        debug!(key, offset, bytes = len, "got range");
        Ok(data)
    }

    async fn get(&self, key: &str, max: u64) -> Result<Bytes, StoreError> {
        let resp = self.client.get_object().bucket(&self.bucket).key(self.full_key(key)).send().await;
        let resp = match resp {
            Ok(r) => r,
            Err(e) if is_not_found(&e) => return Err(StoreError::NotFound { key: key.to_string() }),
            Err(e) => return Err(s3_error("get", key, e)),
        };
        if let Some(n) = resp.content_length().and_then(|n| u64::try_from(n).ok())
            && n > max
        {
            return Err(s3_other("get", key, format!("object is {n} bytes, over the {max}-byte limit")));
        }
        let data = read_capped(resp.body, key, "get", max).await?;
        debug!(key, bytes = data.len(), "got object");
        Ok(data)
    }

    async fn size(&self, key: &str) -> Result<Option<u64>, StoreError> {
        match self.client.head_object().bucket(&self.bucket).key(self.full_key(key)).send().await {
            Ok(out) => {
                let n = out.content_length().unwrap_or(0);
                u64::try_from(n)
                    .map(Some)
                    .map_err(|_| s3_other("head", key, format!("negative Content-Length {n}")))
            }
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(s3_error("head", key, e)),
        }
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        // S3 answers 204 for a missing key too, which is the contract we want.
        self.client
            .delete_object()
            .bucket(&self.bucket)
            .key(self.full_key(key))
            .send()
            .await
            .map_err(|e| s3_error("delete", key, e))?;
        debug!(key, "deleted");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn keys_join_prefix_without_double_slashes() {
        for (prefix, key, want) in
            [("", "blobs/x", "blobs/x"), ("p", "blobs/x", "p/blobs/x"), ("/p/q/", "/blobs/x", "p/q/blobs/x")]
        {
            let s =
                S3Store::with_config("b", prefix, "http://127.0.0.1:1", "a", "s", "us-east-1").await.unwrap();
            assert_eq!(s.full_key(key), want);
        }
    }
}
