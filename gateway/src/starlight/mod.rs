//! The Starlight endpoints (see `docs/api.md` for the reference):
//!
//! - `GET|POST /v2/<name>/_starlight/bundle?to=REF[&have=[NAME@]DIGEST]...[&platform=OS/ARCH[/VARIANT]]`:
//!   the delta bundle. A POST body lists contents the caller already holds (one digest per line),
//!   which is how an interrupted pull resumes.
//! - `POST /v2/<name>/_starlight/traces?image=DIGEST`: a start-up trace (one path per line, in the
//!   order first used), merged into the image's ranks. Needs push rights on `<name>`.
//! - `POST /v2/_starlight/notifications`: Distribution's and Harbor's push notifications; pushed
//!   images are converted before their first pull.
//!
//! The store and index open on first use, so the pass-through works while they are down.

mod convert;
mod failures;
mod image;
mod lease;
pub mod order;
mod query;
mod repair;
mod stream;
mod upstream;
mod webhook;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use starlight_converter::content::read_content;
use starlight_converter::layer::Options;
use starlight_converter::source::{Credentials, index_child};
use starlight_converter::{AnyIndex, AnyStore, Index, ObjectStore};
use starlight_format::bundle::{ContentRef, compress_header, encode_header_with};
use starlight_format::{ContentLocation, Digest, Platform};
use tracing::{debug, info, warn};

use crate::body::{Body, boxed, full};
use crate::config::Config;
use crate::error::GatewayError;
use crate::layers::Metrics;
use crate::proxy::Proxy;
use image::Prepared;
use query::BundleQuery;

/// Media type of a bundle response.
pub const BUNDLE_MEDIA_TYPE: &str = "application/vnd.starlight.bundle.v1";
/// Largest request body of the bundle (held contents) and trace endpoints.
const MAX_LIST_BODY: usize = 64 << 20;
/// Index lookups per round trip.
const LOOKUP_BATCH: usize = 4096;
/// `have` images per request.
const MAX_HAVE: usize = 32;

/// The object store and the index, once open.
#[derive(Debug)]
pub struct Backends {
    pub store: AnyStore,
    pub index: AnyIndex,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct ResultLabel {
    pub result: &'static str,
}

/// An index or store failure: the service behind the gateway is down.
fn backend_error(e: impl std::fmt::Display) -> GatewayError {
    GatewayError::Unavailable(format!("Starlight storage unavailable: {e}"))
}

/// Traces are kept per repository and image.
type TraceKey = (String, Digest);

/// State of the Starlight endpoints.
#[derive(Debug)]
pub struct Starlight {
    proxy: Proxy,
    store_spec: String,
    index_spec: String,
    backends: tokio::sync::OnceCell<Arc<Backends>>,
    cache: image::Cache,
    flights: convert::Flights,
    /// One trace merge at a time per repository and image (in this process).
    trace_locks: Mutex<std::collections::HashMap<TraceKey, Arc<tokio::sync::Mutex<()>>>>,
    metrics: Arc<Metrics>,
    upstream: convert::Upstream,
    credentials: Option<Credentials>,
    webhook_token: Option<String>,
    platforms: Vec<Platform>,
    convert_timeout: Duration,
    /// The converter's caps (`convert_max_*` settings).
    convert_options: Options,
    tmp_dir: std::path::PathBuf,
    read_ahead: u64,
    recompressor: stream::Recompressor,
    shared_budget: stream::SharedBudget,
    verify_bundles: bool,
    /// A bundle its client takes none of for this long is cut (`write_stall_timeout`).
    bundle_stall: Duration,
}

impl Starlight {
    /// `backends`, when given, are used instead of opening `config.store` and `config.index`.
    pub fn new(config: &Config, proxy: Proxy, metrics: Arc<Metrics>, backends: Option<Backends>) -> Self {
        let base = proxy.upstream().base.clone();
        let (scheme, host) = base.split_once("://").unwrap_or(("https", &base));
        let cell = tokio::sync::OnceCell::new();
        if let Some(b) = backends {
            let _ = cell.set(Arc::new(b));
        }
        let mut platforms: Vec<Platform> = config.platforms.iter().filter_map(|p| p.parse().ok()).collect();
        if platforms.is_empty() {
            platforms.push(Platform::host());
        }
        Starlight {
            upstream: convert::Upstream { host: host.to_string(), plain_http: scheme == "http" },
            proxy,
            store_spec: config.store.clone(),
            index_spec: config.index.clone(),
            backends: cell,
            cache: image::Cache::new(config.cache_images),
            flights: convert::Flights::new(Config::secs(config.failure_ttl)),
            trace_locks: Mutex::default(),
            metrics: metrics.clone(),
            credentials: config.upstream_credentials.as_deref().and_then(|c| c.parse().ok()),
            webhook_token: config.webhook_token.clone(),
            platforms,
            convert_timeout: Config::secs(config.convert_timeout),
            convert_options: config.convert_options(),
            tmp_dir: config.work_dir.clone().unwrap_or_else(std::env::temp_dir),
            read_ahead: config.bundle_read_ahead,
            recompressor: stream::Recompressor::new(
                config.recompress_level,
                config.recompress_workers,
                metrics.clone(),
            ),
            shared_budget: stream::SharedBudget::new(config.bundle_memory, config.bundle_memory_per_client),
            verify_bundles: config.verify_bundles,
            bundle_stall: Config::secs(config.write_stall_timeout),
        }
    }

    /// The store and index, opened on first use (a failed open is retried by the next request).
    async fn backends(&self) -> Result<Arc<Backends>, GatewayError> {
        self.backends
            .get_or_try_init(|| async {
                let store = AnyStore::open(&self.store_spec).await.map_err(backend_error)?;
                let index = AnyIndex::open(&self.index_spec).await.map_err(backend_error)?;
                info!(store = %self.store_spec, index = %self.index_spec, "Starlight storage open");
                Ok(Arc::new(Backends { store, index }))
            })
            .await
            .cloned()
    }

    /// Serves `/v2/<name>/_starlight/<rest>`.
    pub async fn handle(
        self: Arc<Self>,
        name: &str,
        rest: &str,
        req: Request<Body>,
    ) -> Result<Response<Body>, GatewayError> {
        match (rest, req.method()) {
            ("bundle", &Method::GET | &Method::POST) => self.bundle(name, req).await,
            ("traces", &Method::POST) => self.traces(name, req).await,
            (r, &Method::GET) if r.starts_with("content/") => {
                let digest = r["content/".len()..].parse::<Digest>().map_err(|e| {
                    GatewayError::BadRequest(format!("_starlight/{r}: not a content digest: {e}"))
                })?;
                self.content(name, digest, req).await
            }
            ("bundle" | "traces", m) => {
                Err(GatewayError::BadRequest(format!("method {m} is not allowed on _starlight/{rest}")))
            }
            _ => Err(GatewayError::NotFound),
        }
    }

    /// Serves `/v2/_starlight/notifications`.
    pub async fn notifications(self: Arc<Self>, req: Request<Body>) -> Result<Response<Body>, GatewayError> {
        webhook::handle(self, req).await
    }

    /// Resolves `reference` of `name` as the caller, to a platform manifest digest.
    async fn resolve(
        &self,
        name: &str,
        reference: &str,
        platform: &Platform,
        auth: Option<&HeaderValue>,
    ) -> Result<Result<Digest, Response<Body>>, GatewayError> {
        let m = match upstream::get_manifest(&self.proxy, name, reference, auth).await? {
            Ok(m) => m,
            Err(refusal) => return Ok(Err(refusal)),
        };
        match index_child(&m.bytes, m.media_type.as_deref(), platform) {
            Ok(Some(child)) => Ok(Ok(child)),
            Ok(None) => Ok(Ok(m.digest)),
            Err(why) => Err(GatewayError::Unconvertible(format!("{name}:{reference}: {why}"))),
        }
    }

    /// The image's record, converting it first if needed (once, however many ask).
    async fn converted(
        &self,
        b: &Arc<Backends>,
        name: &str,
        digest: Digest,
        platform: &Platform,
        auth: Option<&HeaderValue>,
    ) -> Result<starlight_format::ImageRecord, GatewayError> {
        if let Some(r) = b.index.get_image(&digest).await.map_err(backend_error)? {
            if self.cache.contains(&digest) || self.layers_present(b, &r).await? {
                return Ok(r);
            }
            // A layer was dropped as corrupt (through another image): convert this one again.
            warn!(image = %digest, "image names a dropped layer; converting it again");
            b.index.delete_image(&digest).await.map_err(backend_error)?;
        }
        let authorization = auth.and_then(|a| a.to_str().ok()).map(str::to_string);
        // A caller's Basic credentials also answer the registry's challenges (a token service).
        let credentials =
            authorization.as_deref().and_then(Credentials::from_basic_header).or(self.credentials.clone());
        let job = convert::Job {
            name: name.to_string(),
            digest,
            platform: platform.clone(),
            authorization,
            credentials,
        };
        let run = self.flights.convert(
            b.clone(),
            self.upstream.clone(),
            self.convert_options.clone(),
            self.tmp_dir.clone(),
            self.metrics.clone(),
            job,
        );
        match tokio::time::timeout(self.convert_timeout, run).await {
            Ok(r) => r,
            Err(_) => Err(GatewayError::Timeout(self.convert_timeout)),
        }
    }

    /// Whether the index holds every layer record of `r`.
    async fn layers_present(
        &self,
        b: &Backends,
        r: &starlight_format::ImageRecord,
    ) -> Result<bool, GatewayError> {
        for l in &r.layers {
            if b.index.get_layer(&l.diff_id).await.map_err(backend_error)?.is_none() {
                return Ok(false);
            }
        }
        Ok(true)
    }

    async fn bundle(self: Arc<Self>, name: &str, req: Request<Body>) -> Result<Response<Body>, GatewayError> {
        let q = BundleQuery::parse(req.uri().query().unwrap_or(""))?;
        let auth = req.headers().get(header::AUTHORIZATION).cloned();
        let is_post = req.method() == Method::POST;
        let peer = req.extensions().get::<crate::server::Peer>().map(|p| p.0.ip());
        let platform = q.platform.clone().unwrap_or_else(Platform::host);

        // Access first, storage second: an unauthorized caller learns nothing, not even whether the
        // gateway's storage is up.
        let digest = match self.resolve(name, &q.to, &platform, auth.as_ref()).await? {
            Ok(d) => d,
            Err(refusal) => return Ok(refusal),
        };
        let held: HashSet<Digest> =
            if is_post { read_digests(req.into_body()).await? } else { HashSet::new() };
        let b = self.backends().await?;
        let record = self.converted(&b, name, digest, &platform, auth.as_ref()).await?;
        if let Err(refusal) = self.may_read_image(name, &record, auth.as_ref()).await? {
            return Ok(refusal);
        }
        let image = self.cache.prepare(&b.store, &b.index, record).await?;

        // Contents of `have` images the caller may read are not sent. A `have` that cannot be used
        // (not readable by the caller, not converted, any error resolving it) is ignored.
        let mut have: HashSet<Digest> = HashSet::new();
        let mut have_used = Vec::new();
        let mut have_images = Vec::new();
        let (mut used, mut ignored) = (0, 0);
        for h in &q.have {
            let repo = h.name.as_deref().unwrap_or(name);
            match self.have_image(&b, repo, &h.digest, auth.as_ref()).await {
                Ok(Some(p)) => {
                    have.extend(p.contents());
                    have_used.push(h.digest);
                    have_images.push(p);
                    used += 1;
                }
                Ok(None) => {
                    debug!(have = %h.digest, %repo, "have image ignored");
                    ignored += 1;
                }
                Err(e) => {
                    warn!(have = %h.digest, %repo, error = %e, "have image unusable; ignored");
                    ignored += 1;
                }
            }
        }

        // Only the traces of this repository: a copy of the image elsewhere has its own.
        let (ranks_digest, ranks) = self.load_ranks(&b, name, &image.record.manifest_digest).await.unzip();
        let mut have_used: Vec<Digest> = have_used;
        have_used.sort();
        let key = image::PlanKey { have: have_used, ranks: ranks_digest };
        let cached = if held.is_empty() { image.plan(&key) } else { None };
        let plan = match cached {
            Some(p) => p,
            None => {
                let p = Arc::new(self.plan(&b, &image, ranks.as_ref(), &have_images, &have, &held).await?);
                // Kept once exact: until its batches and patches exist, the next request plans again.
                if held.is_empty() && p.len().is_some() {
                    image.keep_plan(key, p.clone());
                }
                p
            }
        };
        info!(
            %name, image = %digest, contents = plan.contents, content_bytes = plan.content_bytes,
            have_used = used, have_ignored = ignored, held = held.len(), "bundle"
        );
        self.metrics.bundles.inc();
        self.metrics.bundle_contents.inc_by(plan.contents);
        let (n, content_bytes) = (plan.contents, plan.content_bytes);
        let len = plan.len();
        let body = stream::BundleBody::start(
            plan,
            b.store.clone(),
            self.recompressor.clone(),
            self.read_ahead,
            self.shared_budget.for_client(peer),
            stream::Verify { enabled: self.verify_bundles, report: self.reporter(&b, digest) },
            stream::Stall { after: self.bundle_stall, metrics: self.metrics.clone() },
        );
        let mut resp = Response::new(boxed(body));
        let h = resp.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static(BUNDLE_MEDIA_TYPE));
        if let Some(len) = len {
            h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
        }
        for (k, v) in [
            ("starlight-image", digest.to_string()),
            ("starlight-contents", n.to_string()),
            ("starlight-content-bytes", content_bytes.to_string()),
            ("starlight-have-used", used.to_string()),
            ("starlight-have-ignored", ignored.to_string()),
        ] {
            if let Ok(v) = HeaderValue::from_str(&v) {
                h.insert(k, v);
            }
        }
        Ok(resp)
    }

    /// One content of an image, out of band: the stored zstd frames, concatenated (one zstd
    /// stream). A worker asks for it when a program reads a file far down its bundle.
    async fn content(
        self: Arc<Self>,
        name: &str,
        content: Digest,
        req: Request<Body>,
    ) -> Result<Response<Body>, GatewayError> {
        let q = BundleQuery::parse(req.uri().query().unwrap_or(""))?;
        if !q.have.is_empty() {
            return Err(GatewayError::BadRequest("_starlight/content takes no `have`".into()));
        }
        let auth = req.headers().get(header::AUTHORIZATION).cloned();
        let platform = q.platform.clone().unwrap_or_else(Platform::host);
        let digest = match self.resolve(name, &q.to, &platform, auth.as_ref()).await? {
            Ok(d) => d,
            Err(refusal) => return Ok(refusal),
        };
        let b = self.backends().await?;
        let record = self.converted(&b, name, digest, &platform, auth.as_ref()).await?;
        if let Err(refusal) = self.may_read_image(name, &record, auth.as_ref()).await? {
            return Ok(refusal);
        }
        let image = self.cache.prepare(&b.store, &b.index, record).await?;
        // Only a content of this image, whose blobs the caller may read.
        if !image.sizes.contains_key(&content) {
            return Err(GatewayError::BadRequest(format!(
                "image {digest} of {name} has no content {content}"
            )));
        }
        let locs = self.locations(&b, &image).await?;
        let loc = locs.get(&content).cloned().ok_or_else(|| {
            GatewayError::Internal(format!("content {content} of image {digest} is not in the index"))
        })?;
        let key = starlight_format::blob_key(&loc.blob);
        let size = loc.size;
        let store = b.store.clone();
        let frames = futures::stream::iter(loc.frames.clone()).then(move |f| {
            let (store, key) = (store.clone(), key.clone());
            async move {
                store
                    .get_range(&key, f.offset, f.clen as u64)
                    .await
                    .map(|data| (f.offset, data))
                    .map_err(crate::body::BoxError::from)
            }
        });
        let verify = stream::Verify { enabled: self.verify_bundles, report: self.reporter(&b, digest) };
        let frames = stream::content_stream(Box::pin(frames), content, loc, verify)
            .map(|r| r.map(http_body::Frame::data));
        let mut resp = Response::new(boxed(http_body_util::StreamBody::new(frames)));
        let h = resp.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/zstd"));
        h.insert("starlight-content-size", HeaderValue::from(size));
        Ok(resp)
    }

    /// Checks that the caller may read, in repository `name`, every blob the image's converted
    /// data came from (its layers and config): what the gateway serves of an image is never more
    /// than the caller could read from the registry itself.
    async fn may_read_image(
        &self,
        name: &str,
        record: &starlight_format::ImageRecord,
        auth: Option<&HeaderValue>,
    ) -> Result<Result<(), upstream::Refusal>, GatewayError> {
        let blobs = record.layers.iter().map(|l| l.digest).chain([record.config_digest]);
        upstream::may_read_blobs(&self.proxy, name, blobs, auth).await
    }

    /// A `have` image `repo@digest`, prepared, if the caller may use it: it may pull the manifest and
    /// read every blob of it in `repo`, and the image is converted.
    async fn have_image(
        &self,
        b: &Backends,
        repo: &str,
        digest: &Digest,
        auth: Option<&HeaderValue>,
    ) -> Result<Option<Arc<Prepared>>, GatewayError> {
        if !upstream::may_pull(&self.proxy, repo, digest, auth).await? {
            return Ok(None);
        }
        let Some(record) = b.index.get_image(digest).await.map_err(backend_error)? else {
            return Ok(None);
        };
        if let Err(refusal) = self.may_read_image(repo, &record, auth).await? {
            debug!(have = %digest, %repo, status = %refusal.status(), "have image's blobs refused");
            return Ok(None);
        }
        Ok(Some(self.cache.prepare(&b.store, &b.index, record).await?))
    }

    /// The header and the steps of a bundle of `image` without the `have` and `held` contents.
    /// A content whose path holds an older version in a `have` image may go as a patch.
    async fn plan(
        &self,
        b: &Backends,
        image: &Prepared,
        ranks: Option<&order::Ranks>,
        have_images: &[Arc<Prepared>],
        have: &HashSet<Digest>,
        held: &HashSet<Digest>,
    ) -> Result<stream::Plan, GatewayError> {
        let startup = self.startup(b, image).await;
        let base = image
            .base_order
            .get_or_init(|| async { Arc::new(order::base_order(image, &startup)) })
            .await
            .clone();
        let order = order::content_order(image, ranks, &base);
        let all = self.locations(b, image).await?;
        let send_set: Vec<Digest> =
            order.into_iter().filter(|d| !have.contains(d) && !held.contains(d)).collect();
        let bases = self.patch_bases(b, image, have_images, &send_set).await?;
        // Traced and start-up contents keep their places; around them, small files gather into
        // whole batches.
        let mut pinned: HashSet<Digest> = startup.iter().filter_map(|p| image.content_of(p)).collect();
        if let Some(r) = ranks {
            pinned.extend(r.ordered().into_iter().filter_map(|p| image.content_of(p)));
        }
        let batchable = |d: &Digest| {
            let size = all.get(d)?.size;
            (size <= stream::BATCH_FILE_MAX && !bases.contains_key(d)).then_some(size)
        };
        let send_set = order::group_small(send_set, batchable, &pinned, starlight_format::bundle::MAX_BATCH);
        let mut send = Vec::with_capacity(send_set.len());
        let mut table = Vec::with_capacity(send_set.len());
        for d in send_set {
            let loc = all.get(&d).ok_or_else(|| {
                GatewayError::Internal(format!(
                    "content {d} of image {} is not in the index",
                    image.record.manifest_digest
                ))
            })?;
            table.push(ContentRef { digest: d, size: loc.size });
            send.push(stream::Send { content: d, loc: loc.clone(), base: bases.get(&d).cloned() });
        }
        let r = &image.record;
        let header = encode_header_with(
            &r.manifest_digest,
            &r.manifest,
            &r.config,
            &r.platform,
            &image.encoded,
            &table,
        );
        let header = compress_header(&header, 3)
            .map_err(|e| GatewayError::Internal(format!("compressing the bundle header: {e}")))?;
        let mut plan = stream::Plan::new(header, send);
        plan.resolve(&b.store, self.recompressor.level).await;
        Ok(plan)
    }

    /// For contents to send whose path holds another content in a `have` image: that content
    /// and where it is stored (the base of a patch).
    async fn patch_bases(
        &self,
        b: &Backends,
        image: &Prepared,
        have_images: &[Arc<Prepared>],
        send: &[Digest],
    ) -> Result<std::collections::HashMap<Digest, (Digest, ContentLocation)>, GatewayError> {
        let mut out = std::collections::HashMap::new();
        if have_images.is_empty() || send.is_empty() {
            return Ok(out);
        }
        let wanted: HashSet<&Digest> = send.iter().collect();
        for h in have_images {
            let locs = self.locations(b, h).await?;
            for e in &image.entries {
                let starlight_format::Kind::File { digest: Some(d), .. } = &e.kind else { continue };
                if !wanted.contains(d) || out.contains_key(d) {
                    continue;
                }
                if let Some(old) = h.content_of(&e.path)
                    && old != *d
                    && let Some(loc) = locs.get(&old)
                {
                    out.insert(*d, (old, loc.clone()));
                }
            }
        }
        Ok(out)
    }

    /// Where each content of the image is stored; looked up once per image and process.
    async fn locations(
        &self,
        b: &Backends,
        p: &Prepared,
    ) -> Result<Arc<std::collections::HashMap<Digest, ContentLocation>>, GatewayError> {
        p.locations
            .get_or_try_init(|| async {
                let digests: Vec<Digest> = p.sizes.keys().copied().collect();
                let mut map = std::collections::HashMap::with_capacity(digests.len());
                for batch in digests.chunks(LOOKUP_BATCH) {
                    let found = b.index.get_contents(batch).await.map_err(backend_error)?;
                    for (d, loc) in batch.iter().zip(found) {
                        map.extend(loc.map(|l| (*d, l)));
                    }
                }
                if map.len() < digests.len() {
                    // Dropped with a corrupt blob of another image: convert this one again.
                    let image = p.record.manifest_digest;
                    let why = format!("{} contents have no location", digests.len() - map.len());
                    let c = stream::Corrupt { bad: stream::Bad::Unlocated, why: why.clone() };
                    self.repair(b, &image, c).await;
                    return Err(GatewayError::Unavailable(format!(
                        "image {image}: {why}; it is converted again on the next request"
                    )));
                }
                Ok(Arc::new(map))
            })
            .await
            .cloned()
    }

    /// Paths the image starts with, found without traces. Found once (reading the programs'
    /// ELF headers) and kept in the store, so later bundles, in this process or another, read
    /// no content before their header.
    async fn startup(&self, b: &Backends, p: &Prepared) -> Arc<Vec<Vec<u8>>> {
        p.startup
            .get_or_init(|| async {
                let key = order::startup_key(&p.record.manifest_digest);
                if let Ok(Some(_)) = b.store.size(&key).await
                    && let Ok(data) = b.store.get(&key, 64 << 20).await
                {
                    match order::decode_paths(&data) {
                        Ok(paths) => return Arc::new(paths),
                        Err(e) => {
                            warn!(%key, error = %e, "stored start-up order unreadable; finding it again")
                        }
                    }
                }
                let paths = self.find_startup(b, p).await;
                if let Err(e) = b.store.put_bytes(&key, Bytes::from(order::encode_paths(&paths))).await {
                    warn!(%key, error = %e, "start-up order not kept");
                }
                Arc::new(paths)
            })
            .await
            .clone()
    }

    /// Prepares a freshly converted image for its first bundle: its flattened filesystem and its
    /// start-up order (which reads its programs), so the first bundle reads no content before its
    /// header.
    async fn warm(&self, b: &Backends, record: starlight_format::ImageRecord) -> Result<(), GatewayError> {
        let image = self.cache.prepare(&b.store, &b.index, record).await?;
        self.startup(b, &image).await;
        Ok(())
    }

    async fn find_startup(&self, b: &Backends, p: &Prepared) -> Vec<Vec<u8>> {
        let dirs = order::library_dirs(p);
        let mut queue: std::collections::VecDeque<Vec<u8>> = order::entry_programs(p).into();
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        while let Some(path) = queue.pop_front() {
            if out.len() >= order::MAX_PROGRAMS {
                break;
            }
            if !seen.insert(path.clone()) {
                continue;
            }
            out.push(path.clone());
            let Some(d) = p.content_of(&path) else { continue };
            if p.sizes.get(&d).is_none_or(|s| *s > order::MAX_PROGRAM_BYTES) {
                continue;
            }
            let data = match b.index.get_contents(&[d]).await {
                Ok(mut v) => match v.pop().flatten() {
                    Some(loc) => read_content(&b.store, &d, &loc).await,
                    None => continue,
                },
                Err(e) => {
                    warn!(error = %e, "start-up order: index lookup failed");
                    break;
                }
            };
            let data = match data {
                Ok(d) => d,
                Err(e) => {
                    warn!(path = %String::from_utf8_lossy(&path), error = %e, "start-up order: unreadable program");
                    continue;
                }
            };
            let needs = order::needs(&data);
            if let Some(i) = needs.interpreter.as_deref().and_then(|i| order::resolve(p, i)) {
                queue.push_back(i);
            }
            let origin = &path[..path.iter().rposition(|&c| c == b'/').unwrap_or(0)];
            let runpath = needs.runpath.iter().map(|r| {
                let s = String::from_utf8_lossy(r)
                    .replace("$ORIGIN", &format!("/{}", String::from_utf8_lossy(origin)));
                s.into_bytes()
            });
            let search: Vec<Vec<u8>> = runpath.chain(dirs.iter().cloned()).collect();
            for lib in &needs.libraries {
                let found = search.iter().find_map(|dir| {
                    let mut cand = dir.clone();
                    cand.push(b'/');
                    cand.extend_from_slice(lib);
                    let r = order::resolve(p, &cand)?;
                    p.content_of(&r).map(|_| r)
                });
                queue.extend(found);
            }
        }
        debug!(image = %p.record.manifest_digest, paths = out.len(), "start-up order");
        out
    }

    /// The merged traces of `image` in repository `name` and the digest of their stored form, if
    /// any.
    async fn load_ranks(&self, b: &Backends, name: &str, image: &Digest) -> Option<(Digest, order::Ranks)> {
        let key = order::ranks_key(name, image);
        match b.store.size(&key).await {
            Ok(Some(_)) => {}
            Ok(None) => return None,
            Err(e) => {
                warn!(%key, error = %e, "trace ranks unavailable");
                return None;
            }
        }
        let data = b.store.get(&key, 256 << 20).await.ok()?;
        match order::Ranks::decode(&data) {
            Ok(r) => Some((Digest::of(&data), r)),
            Err(e) => {
                warn!(%key, error = %e, "trace ranks unreadable; ignored");
                None
            }
        }
    }

    async fn traces(self: Arc<Self>, name: &str, req: Request<Body>) -> Result<Response<Body>, GatewayError> {
        let image: Digest = query::single(req.uri().query().unwrap_or(""), "image")?
            .parse()
            .map_err(|e| GatewayError::BadRequest(format!("image: {e}")))?;
        let auth = req.headers().get(header::AUTHORIZATION).cloned();
        if let Err(refusal) = upstream::may_push(&self.proxy, name, auth.as_ref()).await? {
            return Ok(refusal);
        }
        if !upstream::may_pull(&self.proxy, name, &image, auth.as_ref()).await? {
            return Err(GatewayError::BadRequest(format!("{name} has no image {image}")));
        }
        let body = crate::body::collect_capped(req.into_body(), MAX_LIST_BODY)
            .await
            .map_err(|e| GatewayError::BadRequest(format!("reading the trace: {e}")))?;
        let b = self.backends().await?;
        let record = b.index.get_image(&image).await.map_err(backend_error)?.ok_or_else(|| {
            GatewayError::BadRequest(format!("image {image} is not converted; pull its bundle first"))
        })?;
        let prepared = self.cache.prepare(&b.store, &b.index, record).await?;
        let mut trace = Vec::new();
        for (i, line) in body.split(|&c| c == b'\n').enumerate() {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if line.is_empty() {
                continue;
            }
            let rel = line.strip_prefix(b"/").unwrap_or(line);
            let path = starlight_format::path::normalize(rel)
                .map_err(|e| GatewayError::BadRequest(format!("trace line {}: {e}", i + 1)))?;
            if prepared.by_path.contains_key(&path) {
                trace.push(path);
            }
        }
        let lock = {
            let mut locks =
                self.trace_locks.lock().map_err(|_| GatewayError::Internal("trace lock".into()))?;
            locks.entry((name.to_string(), image)).or_default().clone()
        };
        let _guard = lock.lock().await;
        let mut ranks = self.load_ranks(&b, name, &image).await.map(|(_, r)| r).unwrap_or_default();
        ranks.add(&trace);
        b.store
            .put_bytes(&order::ranks_key(name, &image), Bytes::from(ranks.encode()))
            .await
            .map_err(backend_error)?;
        info!(%name, %image, paths = trace.len(), traces = ranks.traces, "trace merged");
        let mut resp = Response::new(full(
            serde_json::json!({"image": image.to_string(), "paths": trace.len(), "traces": ranks.traces})
                .to_string(),
        ));
        *resp.status_mut() = StatusCode::ACCEPTED;
        resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        Ok(resp)
    }
}

/// Reads a list of content digests, one per line.
async fn read_digests(body: Body) -> Result<HashSet<Digest>, GatewayError> {
    let data = crate::body::collect_capped(body, MAX_LIST_BODY)
        .await
        .map_err(|e| GatewayError::BadRequest(format!("reading the held-contents list: {e}")))?;
    let text = std::str::from_utf8(&data)
        .map_err(|_| GatewayError::BadRequest("the held-contents list is not UTF-8".into()))?;
    let mut out = HashSet::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        out.insert(
            line.parse()
                .map_err(|e| GatewayError::BadRequest(format!("held contents, line {}: {e}", i + 1)))?,
        );
    }
    Ok(out)
}
