//! Where images come from: an OCI distribution registry (`docker://`) or an OCI image layout on disk
//! (`oci:`). Both resolve to an [`ImageRecord`] (manifest, config, layers with diffIDs) and open
//! layer blobs as byte streams.

use std::collections::HashMap;
use std::pin::Pin;

use serde::Deserialize;
use starlight_format::{Digest, ImageLayer, ImageRecord, Platform};
use tokio::io::AsyncRead;

use crate::ConvertError;
use crate::layer::Compression;

mod layout;
mod registry;
mod sized;

pub use layout::LayoutSource;
pub use registry::{Credentials, RegistrySource};

pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Manifests and configs larger than this are refused.
pub const MAX_MANIFEST: u64 = 4 << 20;

/// A byte stream of a blob.
pub type BlobReader = Pin<Box<dyn AsyncRead + Send>>;

/// Settings that apply to every source.
#[derive(Clone, Debug, Default)]
pub struct SourceOptions {
    /// Use `http://` for the registry (loopback test registries).
    pub plain_http: bool,
    pub credentials: Option<Credentials>,
    /// An `Authorization` value to send from the first request on (a caller's token, forwarded by
    /// the gateway); a challenge is still answered with `credentials` if the registry refuses it.
    pub authorization: Option<String>,
    /// Platform to pick from an image index; the host's when unset.
    pub platform: Option<Platform>,
    /// Name recorded for an image from an OCI layout (default: the directory's name).
    pub name: Option<String>,
}

/// An image source.
#[derive(Debug)]
pub enum Source {
    Registry(RegistrySource),
    Layout(LayoutSource),
}

/// An image with its manifest and config fetched and checked.
#[derive(Clone, Debug)]
pub struct ResolvedImage {
    pub record: ImageRecord,
}

#[derive(Deserialize)]
struct Descriptor {
    #[serde(rename = "mediaType", default)]
    media_type: Option<String>,
    digest: String,
    size: u64,
    #[serde(default)]
    platform: Option<PlatformJson>,
    #[serde(default)]
    annotations: Option<HashMap<String, String>>,
}

#[derive(Deserialize)]
struct PlatformJson {
    os: String,
    architecture: String,
    #[serde(default)]
    variant: Option<String>,
}

#[derive(Deserialize)]
struct ManifestJson {
    #[serde(rename = "schemaVersion")]
    schema_version: u32,
    #[serde(rename = "mediaType", default)]
    media_type: Option<String>,
    #[serde(default)]
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Option<Vec<Descriptor>>,
    #[serde(default)]
    manifests: Option<Vec<Descriptor>>,
}

#[derive(Deserialize)]
struct ConfigJson {
    #[serde(default)]
    os: String,
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    variant: Option<String>,
    rootfs: RootFs,
}

#[derive(Deserialize)]
struct RootFs {
    diff_ids: Vec<String>,
}

/// The compression of a layer media type, or `None` if Starlight cannot convert it.
pub fn compression_of(media_type: &str) -> Option<Compression> {
    let base = media_type.replace(".nondistributable", "");
    match base.as_str() {
        "application/vnd.oci.image.layer.v1.tar" => Some(Compression::None),
        "application/vnd.oci.image.layer.v1.tar+gzip"
        | "application/vnd.docker.image.rootfs.diff.tar.gzip" => Some(Compression::Gzip),
        "application/vnd.oci.image.layer.v1.tar+zstd"
        | "application/vnd.docker.image.rootfs.diff.tar.zstd" => Some(Compression::Zstd),
        _ => None,
    }
}

impl Source {
    /// Parses `docker://HOST[:PORT]/NAME[:TAG|@DIGEST]` or `oci:DIR[:REFERENCE]` (the directory ends
    /// at the first colon, as in skopeo).
    pub fn parse(spec: &str, opts: SourceOptions) -> Result<Source, ConvertError> {
        if let Some(rest) = spec.strip_prefix("docker://") {
            return Ok(Source::Registry(RegistrySource::parse(rest, opts)?));
        }
        if let Some(rest) = spec.strip_prefix("oci:") {
            return Ok(Source::Layout(LayoutSource::parse(rest, opts)?));
        }
        Err(ConvertError::BadImage {
            image: spec.to_string(),
            why: "source must be docker://HOST[:PORT]/NAME[:TAG|@DIGEST] or oci:DIR[:REFERENCE]".into(),
        })
    }

    fn describe(&self) -> String {
        match self {
            Source::Registry(r) => r.describe(),
            Source::Layout(l) => l.describe(),
        }
    }

    fn options(&self) -> &SourceOptions {
        match self {
            Source::Registry(r) => &r.opts,
            Source::Layout(l) => &l.opts,
        }
    }

    /// Fetches the top-level manifest: bytes and media type (from the transport, else the JSON).
    async fn top_manifest(&self) -> Result<(Vec<u8>, Option<String>, Option<Digest>), ConvertError> {
        match self {
            Source::Registry(r) => r.manifest(None).await,
            Source::Layout(l) => l.top_manifest().await,
        }
    }

    async fn manifest_by_digest(&self, d: &Digest) -> Result<(Vec<u8>, Option<String>), ConvertError> {
        match self {
            Source::Registry(r) => r.manifest(Some(d)).await.map(|(b, t, _)| (b, t)),
            Source::Layout(l) => l.blob_bytes(d, MAX_MANIFEST).await.map(|b| (b, None)),
        }
    }

    async fn blob_bytes(&self, d: &Digest, max: u64) -> Result<Vec<u8>, ConvertError> {
        match self {
            Source::Registry(r) => r.blob_bytes(d, max).await,
            Source::Layout(l) => l.blob_bytes(d, max).await,
        }
    }

    /// Opens a layer blob as a stream (its digest is checked by the converter as it reads) of
    /// exactly `size` bytes, the manifest's declared size: a blob that is shorter or longer fails
    /// as it is read, nothing past `size` is read, and a failure of the source underneath comes
    /// as a [`crate::BlobReadError::Source`] inside the stream's I/O error.
    pub async fn open_blob(&self, d: &Digest, size: u64) -> Result<BlobReader, ConvertError> {
        let inner = match self {
            Source::Registry(r) => r.open_blob(d, size).await?,
            Source::Layout(l) => l.open_blob(d).await?,
        };
        Ok(Box::pin(sized::SizedBlob::new(inner, self.describe(), *d, size)))
    }

    fn name(&self) -> String {
        match self {
            Source::Registry(r) => r.repo.clone(),
            Source::Layout(l) => l.name(),
        }
    }

    fn tag(&self) -> Option<String> {
        match self {
            Source::Registry(r) => r.tag.clone(),
            Source::Layout(l) => l.tag.clone(),
        }
    }

    /// Resolves the image: index -> platform manifest -> config, each checked against its digest.
    pub async fn resolve(&self) -> Result<ResolvedImage, ConvertError> {
        let image = self.describe();
        let bad = |why: String| ConvertError::BadImage { image: image.clone(), why };
        let (mut bytes, mut media_type, pinned) = self.top_manifest().await?;
        let mut digest = Digest::of(&bytes);
        if let Some(want) = pinned
            && want != digest
        {
            return Err(bad(format!("manifest digest mismatch: asked for {want}, got {digest}")));
        }
        let want_platform = self.options().platform.clone().unwrap_or_else(Platform::host);
        let mut chosen_platform = None;
        let mut manifest: ManifestJson = parse_json(&bytes).map_err(|e| bad(format!("manifest: {e}")))?;
        for _hop in 0..2 {
            let mt = media_type.clone().or(manifest.media_type.clone()).unwrap_or_default();
            let is_index =
                mt == OCI_INDEX || mt == DOCKER_LIST || (mt.is_empty() && manifest.manifests.is_some());
            if !is_index {
                break;
            }
            let list = manifest.manifests.as_deref().unwrap_or_default();
            let pick = pick_platform(list, &want_platform).ok_or_else(|| {
                let have: Vec<String> = list
                    .iter()
                    .filter_map(|d| d.platform.as_ref().map(|p| platform_of(p).to_string()))
                    .collect();
                bad(format!(
                    "no manifest for platform {want_platform} in the index (has: {})",
                    have.join(", ")
                ))
            })?;
            let d: Digest = pick.digest.parse().map_err(|e| bad(format!("index entry: {e}")))?;
            chosen_platform = pick.platform.as_ref().map(platform_of);
            let (b, t) = self.manifest_by_digest(&d).await?;
            if Digest::of(&b) != d {
                return Err(bad(format!("manifest {d} does not match its digest")));
            }
            bytes = b;
            digest = d;
            media_type = t.or(pick.media_type.clone());
            manifest = parse_json(&bytes).map_err(|e| bad(format!("manifest {d}: {e}")))?;
        }
        let media_type =
            media_type.or(manifest.media_type.clone()).unwrap_or_else(|| OCI_MANIFEST.to_string());
        if media_type != OCI_MANIFEST && media_type != DOCKER_MANIFEST {
            return Err(bad(format!("unsupported manifest media type {media_type:?}")));
        }
        if manifest.schema_version != 2 {
            return Err(bad(format!("unsupported manifest schemaVersion {}", manifest.schema_version)));
        }
        let config_desc = manifest.config.as_ref().ok_or_else(|| bad("manifest has no config".into()))?;
        let config_digest: Digest = config_desc.digest.parse().map_err(|e| bad(format!("config: {e}")))?;
        let config =
            self.blob_bytes(&config_digest, MAX_MANIFEST.max(config_desc.size.min(16 << 20))).await?;
        if Digest::of(&config) != config_digest {
            return Err(bad(format!("config {config_digest} does not match its digest")));
        }
        let cfg: ConfigJson = parse_json(&config).map_err(|e| bad(format!("config: {e}")))?;
        let layers_json = manifest.layers.as_deref().unwrap_or_default();
        if cfg.rootfs.diff_ids.len() != layers_json.len() {
            return Err(bad(format!(
                "manifest has {} layers but config has {} diff_ids",
                layers_json.len(),
                cfg.rootfs.diff_ids.len()
            )));
        }
        let mut layers = Vec::with_capacity(layers_json.len());
        for (l, diff) in layers_json.iter().zip(&cfg.rootfs.diff_ids) {
            layers.push(ImageLayer {
                diff_id: diff.parse().map_err(|e| bad(format!("config diff_id: {e}")))?,
                digest: l.digest.parse().map_err(|e| bad(format!("layer: {e}")))?,
                size: l.size,
                media_type: l.media_type.clone().unwrap_or_default(),
            });
        }
        let platform = chosen_platform.unwrap_or(Platform {
            os: if cfg.os.is_empty() { "linux".into() } else { cfg.os.clone() },
            architecture: if cfg.architecture.is_empty() {
                want_platform.architecture.clone()
            } else {
                cfg.architecture.clone()
            },
            variant: cfg.variant.clone(),
        });
        Ok(ResolvedImage {
            record: ImageRecord {
                manifest_digest: digest,
                name: self.name(),
                tag: self.tag(),
                platform,
                media_type,
                manifest: bytes,
                config_digest,
                config,
                layers,
            },
        })
    }
}

/// If `manifest` is an image index (or Docker manifest list), the digest of its entry for `want`:
/// `Ok(None)` when it is not an index, an error when it is one without a match or is malformed.
pub fn index_child(
    manifest: &[u8],
    media_type: Option<&str>,
    want: &Platform,
) -> Result<Option<Digest>, String> {
    let m: ManifestJson = parse_json(manifest)?;
    let mt = media_type.map(str::to_string).or(m.media_type.clone()).unwrap_or_default();
    let is_index = mt == OCI_INDEX || mt == DOCKER_LIST || (mt.is_empty() && m.manifests.is_some());
    if !is_index {
        return Ok(None);
    }
    let list = m.manifests.as_deref().unwrap_or_default();
    let pick = pick_platform(list, want).ok_or_else(|| format!("the index has no manifest for {want}"))?;
    pick.digest.parse().map(Some).map_err(|e| format!("index entry: {e}"))
}

fn parse_json<T: serde::de::DeserializeOwned>(b: &[u8]) -> Result<T, String> {
    serde_json::from_slice(b).map_err(|e| format!("invalid JSON: {e}"))
}

fn platform_of(p: &PlatformJson) -> Platform {
    Platform { os: p.os.clone(), architecture: p.architecture.clone(), variant: p.variant.clone() }
}

/// Picks the index entry for `want`: exact variant if asked for, else the first os/arch match.
fn pick_platform<'a>(list: &'a [Descriptor], want: &Platform) -> Option<&'a Descriptor> {
    let matches = |d: &&Descriptor| {
        d.platform.as_ref().is_some_and(|p| {
            p.os == want.os
                && p.architecture == want.architecture
                && (want.variant.is_none() || p.variant == want.variant)
        })
    };
    list.iter().find(matches)
}

fn ref_name(d: &Descriptor) -> Option<&str> {
    d.annotations.as_ref()?.get("org.opencontainers.image.ref.name").map(String::as_str)
}
