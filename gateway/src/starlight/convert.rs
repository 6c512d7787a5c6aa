//! Conversion on demand, single-flight: concurrent requests for one unconverted image share one
//! conversion. The conversion runs in its own task, so a client that goes away does not cancel it
//! for the others.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use starlight_converter::failed::FailedLayers;
use starlight_converter::layer::Options;
use starlight_converter::source::{Credentials, RegistrySource, Source, SourceOptions};
use starlight_converter::{ConvertError, Converter, Index};
use starlight_format::{Digest, ImageRecord, Platform};
use tracing::{info, warn};

use super::{Backends, backend_error};
use crate::error::GatewayError;
use crate::layers::Metrics;

type Outcome = Result<ImageRecord, Arc<Failure>>;

/// A conversion's failure, shared by everyone who waited for it.
#[derive(Debug)]
pub struct Failure {
    pub kind: ErrorKind,
    pub message: String,
}

#[derive(Clone, Copy, Debug)]
pub enum ErrorKind {
    Unconvertible,
    Upstream,
    Unavailable,
    Internal,
}

impl Failure {
    pub fn to_error(&self) -> GatewayError {
        let m = self.message.clone();
        match self.kind {
            ErrorKind::Unconvertible => GatewayError::Unconvertible(m),
            ErrorKind::Upstream => GatewayError::UpstreamUnreachable(m),
            ErrorKind::Unavailable => GatewayError::Unavailable(m),
            ErrorKind::Internal => GatewayError::Internal(m),
        }
    }
}

fn classify(e: &ConvertError) -> ErrorKind {
    match e {
        ConvertError::BadLayer { .. } | ConvertError::BadImage { .. } | ConvertError::Format(_) => {
            ErrorKind::Unconvertible
        }
        ConvertError::Fetch { .. } => ErrorKind::Upstream,
        ConvertError::Store(_) | ConvertError::Index(_) => ErrorKind::Unavailable,
        ConvertError::Content { .. } | ConvertError::Io { .. } => ErrorKind::Internal,
    }
}

/// How to reach the upstream for a conversion.
#[derive(Clone, Debug)]
pub struct Upstream {
    /// `HOST[:PORT]`.
    pub host: String,
    pub plain_http: bool,
}

/// What one conversion needs.
#[derive(Clone, Debug)]
pub struct Job {
    pub name: String,
    /// The platform manifest's digest (or an index's, with `platform` choosing).
    pub digest: Digest,
    pub platform: Platform,
    pub authorization: Option<String>,
    pub credentials: Option<Credentials>,
}

type Flight = Shared<BoxFuture<'static, Outcome>>;

/// Conversions in progress, by image, and those that failed for good.
#[derive(Debug)]
pub struct Flights {
    map: Arc<Mutex<HashMap<(Digest, Platform), Flight>>>,
    failures: Arc<super::failures::Failures>,
    /// Layers that failed for good: another image naming one (same blob, size, media type and
    /// claimed diffID) fails at once, without fetching it again.
    failed_layers: Arc<FailedLayers>,
}

impl Flights {
    /// Failed conversions are remembered for `failure_ttl`.
    pub fn new(failure_ttl: std::time::Duration) -> Flights {
        Flights {
            map: Arc::default(),
            failures: Arc::new(super::failures::Failures::new(failure_ttl)),
            failed_layers: Arc::new(FailedLayers::new(failure_ttl)),
        }
    }

    /// Waits for `job`'s image to be converted: joins the conversion in progress or starts one.
    pub async fn convert(
        &self,
        backends: Arc<Backends>,
        upstream: Upstream,
        options: Options,
        tmp_dir: std::path::PathBuf,
        metrics: Arc<Metrics>,
        job: Job,
    ) -> Result<ImageRecord, GatewayError> {
        let key = (job.digest, job.platform.clone());
        if let Some(f) = self.failures.get(&key) {
            info!(image = %job.digest, error = %f.message, "conversion failed before; not trying again yet");
            return Err(f.to_error());
        }
        let flight = {
            let mut map = self.map.lock().map_err(|_| GatewayError::Internal("flights lock".into()))?;
            match map.get(&key) {
                Some(f) => f.clone(),
                None => {
                    let map_ref = self.map.clone();
                    let failures = self.failures.clone();
                    let failed_layers = self.failed_layers.clone();
                    let key2 = key.clone();
                    let task = tokio::spawn(async move {
                        let out =
                            run(&backends, &upstream, options, tmp_dir, failed_layers, &metrics, &job).await;
                        if let Err(f) = &out {
                            failures.remember(key2.clone(), f);
                        }
                        if let Ok(mut m) = map_ref.lock() {
                            m.remove(&key2);
                        }
                        out
                    });
                    let f = async move {
                        task.await.unwrap_or_else(|e| {
                            Err(Arc::new(Failure {
                                kind: ErrorKind::Internal,
                                message: format!("conversion task failed: {e}"),
                            }))
                        })
                    }
                    .boxed()
                    .shared();
                    map.insert(key, f.clone());
                    f
                }
            }
        };
        flight.await.map_err(|e| e.to_error())
    }
}

async fn run(
    backends: &Backends,
    upstream: &Upstream,
    options: Options,
    tmp_dir: std::path::PathBuf,
    failed_layers: Arc<FailedLayers>,
    metrics: &Metrics,
    job: &Job,
) -> Outcome {
    let fail = |kind, message: String| Arc::new(Failure { kind, message });
    // Another gateway, or a flight that just ended, may have published it meanwhile.
    match backends.index.get_image(&job.digest).await {
        Ok(Some(r)) => return Ok(r),
        Ok(None) => {}
        Err(e) => return Err(fail(ErrorKind::Unavailable, backend_error(e).to_string())),
    }
    // One gateway converts; others sharing the index wait for its record.
    let _lease = match super::lease::take(&backends.index, &job.digest, &job.platform).await {
        Ok(super::lease::Lease::Held(held)) => held,
        Ok(super::lease::Lease::Converted(r)) => return Ok(r),
        Err(e) => return Err(fail(ErrorKind::Unavailable, backend_error(e).to_string())),
    };
    let opts = SourceOptions {
        plain_http: upstream.plain_http,
        credentials: job.credentials.clone(),
        authorization: job.authorization.clone(),
        platform: Some(job.platform.clone()),
        name: None,
    };
    let spec = format!("{}/{}@{}", upstream.host, job.name, job.digest);
    let source = RegistrySource::parse(&spec, opts)
        .map_err(|e| fail(ErrorKind::Internal, format!("conversion source {spec}: {e}")))?;
    let mut conv = Converter::new(backends.store.clone(), backends.index.clone(), options);
    conv.tmp_dir = tmp_dir;
    conv.failed_layers = Some(failed_layers);
    info!(image = %spec, "converting on demand");
    match conv.convert(&Source::Registry(source)).await {
        Ok(out) => {
            metrics.conversions.get_or_create(&super::ResultLabel { result: "ok" }).inc();
            info!(image = %spec, seconds = out.seconds, "converted");
            Ok(out.image)
        }
        Err(e) => {
            metrics.conversions.get_or_create(&super::ResultLabel { result: "error" }).inc();
            warn!(image = %spec, error = %e, "conversion failed");
            Err(fail(classify(&e), e.to_string()))
        }
    }
}
