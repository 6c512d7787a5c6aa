//! `starlight-pull --containerd`: puts a Starlight image into containerd without unpacking a layer.
//!
//! 1. The image's manifest (through its index, for the platform) and config come through the
//!    gateway's pass-through and are verified against their digests.
//! 2. Under a containerd lease, they go into containerd's content store, labelled the way
//!    containerd's own unpacker labels them, so that containerd's garbage collector keeps the
//!    config while the image exists and the snapshot while the config exists.
//! 3. The image's snapshot (named by its chain ID) is prepared through containerd with the
//!    `containerd.io/snapshot/starlight.image` label: the Starlight snapshotter mounts the image
//!    (its bundle streams in the background) and answers "already exists", as a remote
//!    snapshotter does, so containerd records the snapshot as committed.
//! 4. The image record is created (or moved), and the lease is let go.

use std::collections::HashMap;
use std::path::PathBuf;

use serde::Deserialize;
use starlight_format::Digest;
use tonic::Code;
use tonic::transport::Channel;

use super::api::content::content_client::ContentClient;
use super::api::content::{self as cs, WriteAction, WriteContentRequest};
use super::api::images::images_client::ImagesClient;
use super::api::images::{CreateImageRequest, Image, UpdateImageRequest};
use super::api::leases::leases_client::LeasesClient;
use super::api::leases::{CreateRequest, DeleteRequest};
use super::api::snapshots::snapshots_client::SnapshotsClient;
use super::api::snapshots::{PrepareSnapshotRequest, RemoveSnapshotRequest, StatSnapshotRequest};
use super::api::types::Descriptor;
use super::{connect, request};
use crate::client::Gateway;
use crate::store::Reference;

/// The label that tells the snapshotter which Starlight image a snapshot is.
pub const IMAGE_LABEL: &str = "containerd.io/snapshot/starlight.image";
/// containerd's label naming the committed snapshot a prepare is for.
pub const TARGET_LABEL: &str = "containerd.io/snapshot.ref";

const INDEX_TYPES: [&str; 2] =
    ["application/vnd.oci.image.index.v1+json", "application/vnd.docker.distribution.manifest.list.v2+json"];
const MANIFEST_LIMIT: usize = 4 << 20;
const CONFIG_LIMIT: usize = 16 << 20;

/// Where to put the image in containerd.
#[derive(Clone, Debug)]
pub struct Target {
    pub socket: PathBuf,
    pub namespace: String,
    pub snapshotter: String,
    /// The containerd image name; `GATEWAY_HOST/NAME:TAG` when unset (what `ctr pull` through the
    /// gateway would name it).
    pub name: Option<String>,
    /// `os/arch[/variant]` for an image index; this machine's when unset.
    pub platform: Option<String>,
}

/// What the pull did.
#[derive(Debug)]
pub struct Pulled {
    pub name: String,
    pub manifest: Digest,
    pub chain_id: String,
    /// The snapshot was there already (the image, or one with the same layers, was pulled before).
    pub present: bool,
}

#[derive(Deserialize)]
struct Platform {
    os: String,
    architecture: String,
    #[serde(default)]
    variant: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Desc {
    digest: String,
    #[serde(default)]
    platform: Option<Platform>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Manifest {
    #[serde(default)]
    media_type: Option<String>,
    #[serde(default)]
    manifests: Vec<Desc>,
    #[serde(default)]
    config: Option<Desc>,
}

#[derive(Deserialize)]
struct Config {
    rootfs: RootFs,
}

#[derive(Deserialize)]
struct RootFs {
    diff_ids: Vec<String>,
}

/// `os/arch[/variant]` of this machine, as OCI names them.
pub fn host_platform() -> String {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        a => a,
    };
    format!("linux/{arch}")
}

/// containerd's chain ID of a list of layer diff IDs.
pub fn chain_id(diff_ids: &[String]) -> Result<String, String> {
    let mut chain: Option<String> = None;
    for d in diff_ids {
        d.parse::<Digest>().map_err(|e| format!("diff ID {d:?}: {e}"))?;
        chain = Some(match chain {
            None => d.clone(),
            Some(c) => Digest::of(format!("{c} {d}").as_bytes()).to_string(),
        });
    }
    chain.ok_or_else(|| "the image has no layers".to_string())
}

/// The document `reference` of `name` and its descriptor; its digest is checked.
async fn fetch(
    gw: &Gateway,
    image: &Reference,
    kind: &str,
    reference: &str,
    limit: usize,
) -> Result<(Vec<u8>, Digest, Option<String>), String> {
    let (body, media_type) =
        gw.registry_get(&image.name, kind, reference, limit).await.map_err(|e| e.to_string())?;
    let d = Digest::of(&body);
    if reference.starts_with("sha256:") && reference != d.to_string() {
        return Err(format!("{kind}/{reference} of {}: the registry sent content of digest {d}", image.name));
    }
    Ok((body, d, media_type))
}

fn platform_matches(p: &Platform, want: &str) -> bool {
    let mut parts = want.split('/');
    let (os, arch, variant) = (parts.next(), parts.next(), parts.next());
    Some(p.os.as_str()) == os
        && Some(p.architecture.as_str()) == arch
        && (variant.is_none() || p.variant.as_deref() == variant)
}

/// One document put into containerd's content store.
struct Doc {
    bytes: Vec<u8>,
    digest: Digest,
    labels: HashMap<String, String>,
}

/// Puts `image` (a reference at the gateway) into containerd; see the module's documentation.
pub async fn pull(gw: &Gateway, image: &Reference, t: &Target) -> Result<Pulled, String> {
    let platform = t.platform.clone().unwrap_or_else(host_platform);
    let (top, top_digest, top_type) = fetch(gw, image, "manifests", &image.reference, MANIFEST_LIMIT).await?;
    let parsed: Manifest = serde_json::from_slice(&top)
        .map_err(|e| format!("manifest of {image}: not a JSON image manifest or index: {e}"))?;
    let top_type = parsed.media_type.clone().or(top_type).unwrap_or_default();
    let mut docs = Vec::new();
    let (manifest, manifest_digest, manifest_bytes) = if INDEX_TYPES.contains(&top_type.as_str())
        || (!parsed.manifests.is_empty() && parsed.config.is_none())
    {
        let (i, chosen) = parsed
            .manifests
            .iter()
            .enumerate()
            .find(|(_, m)| m.platform.as_ref().is_some_and(|p| platform_matches(p, &platform)))
            .ok_or_else(|| format!("the index of {image} has no manifest for {platform}"))?;
        let (m, d, _) = fetch(gw, image, "manifests", &chosen.digest, MANIFEST_LIMIT).await?;
        let mut labels = HashMap::new();
        labels.insert(format!("containerd.io/gc.ref.content.m.{i}"), d.to_string());
        docs.push(Doc { bytes: top.clone(), digest: top_digest, labels });
        let parsed =
            serde_json::from_slice::<Manifest>(&m).map_err(|e| format!("manifest {d} of {image}: {e}"))?;
        (parsed, d, m)
    } else {
        (parsed, top_digest, top.clone())
    };
    let config_desc = manifest
        .config
        .as_ref()
        .ok_or_else(|| format!("manifest {manifest_digest} of {image} has no config"))?;
    let (config, config_digest, _) = fetch(gw, image, "blobs", &config_desc.digest, CONFIG_LIMIT).await?;
    let parsed_config: Config = serde_json::from_slice(&config)
        .map_err(|e| format!("config {config_digest} of {image}: no rootfs.diff_ids: {e}"))?;
    let chain = chain_id(&parsed_config.rootfs.diff_ids).map_err(|e| format!("config of {image}: {e}"))?;

    // The manifest is stored as the registry sent it. Its label points at the config only: the
    // layers are never fetched.
    let mut mlabels = HashMap::new();
    mlabels.insert("containerd.io/gc.ref.content.config".to_string(), config_digest.to_string());
    docs.push(Doc { bytes: manifest_bytes, digest: manifest_digest, labels: mlabels });
    let mut clabels = HashMap::new();
    clabels.insert(format!("containerd.io/gc.ref.snapshot.{}", t.snapshotter), chain.clone());
    docs.push(Doc { bytes: config, digest: config_digest, labels: clabels });

    let ch = connect(&t.socket).await?;
    let ns = t.namespace.as_str();
    let lease = format!("starlight-pull-{}-{}", std::process::id(), now_nanos());
    let mut leases = LeasesClient::new(ch.clone());
    let mut llabels = HashMap::new();
    llabels.insert("containerd.io/gc.expire".to_string(), rfc3339(now_secs() + 3600));
    leases
        .create(request(ns, None, CreateRequest { id: lease.clone(), labels: llabels }))
        .await
        .map_err(|e| status(&t.socket, "create a lease", &e))?;
    let pieces = Pieces {
        docs,
        chain: chain.clone(),
        starlight_ref: format!("{}@{manifest_digest}", image.name),
        top: Descriptor {
            media_type: top_type,
            digest: top_digest.to_string(),
            size: top.len() as i64,
            annotations: HashMap::new(),
        },
    };
    let res = in_lease(&ch, ns, &lease, gw, image, t, &pieces).await;
    let _ = leases.delete(request(ns, None, DeleteRequest { id: lease, sync: false })).await;
    let (name, present) = res?;
    Ok(Pulled { name, manifest: manifest_digest, chain_id: chain, present })
}

/// What goes into containerd: the documents, the snapshot and the image record's target.
struct Pieces {
    docs: Vec<Doc>,
    chain: String,
    /// `NAME@MANIFEST_DIGEST`, for the snapshotter's mount.
    starlight_ref: String,
    top: Descriptor,
}

async fn in_lease(
    ch: &Channel,
    ns: &str,
    lease: &str,
    gw: &Gateway,
    image: &Reference,
    t: &Target,
    p: &Pieces,
) -> Result<(String, bool), String> {
    let (sock, docs, chain) = (&t.socket, &p.docs, p.chain.as_str());
    let mut content = ContentClient::new(ch.clone());
    for d in docs {
        put_content(&mut content, ns, lease, d).await.map_err(|e| status(sock, "store content", &e))?;
    }
    let mut snaps = SnapshotsClient::new(ch.clone());
    let stat = snaps
        .stat(request(
            ns,
            Some(lease),
            StatSnapshotRequest { snapshotter: t.snapshotter.clone(), key: chain.into() },
        ))
        .await;
    let present = match stat {
        Ok(_) => true,
        Err(e) if e.code() == Code::NotFound => false,
        Err(e) => return Err(status(sock, &format!("stat snapshot {chain}"), &e)),
    };
    if !present {
        let key = format!("starlight-pull-{}-{chain}", now_nanos());
        let mut labels = HashMap::new();
        labels.insert(TARGET_LABEL.to_string(), chain.to_string());
        labels.insert(IMAGE_LABEL.to_string(), p.starlight_ref.clone());
        let req = PrepareSnapshotRequest {
            snapshotter: t.snapshotter.clone(),
            key: key.clone(),
            parent: String::new(),
            labels,
        };
        match snaps.prepare(request(ns, Some(lease), req)).await {
            Err(e) if e.code() == Code::AlreadyExists => {}
            Err(e) => return Err(status(sock, &format!("prepare the snapshot of {image}"), &e)),
            Ok(_) => {
                let _ = snaps
                    .remove(request(
                        ns,
                        Some(lease),
                        RemoveSnapshotRequest { snapshotter: t.snapshotter.clone(), key },
                    ))
                    .await;
                return Err(format!(
                    "snapshotter {:?} of containerd at {} is not a Starlight snapshotter: it prepared an empty \
                     snapshot instead of mounting {image}",
                    t.snapshotter,
                    sock.display()
                ));
            }
        }
    }
    let name = t.name.clone().unwrap_or_else(|| default_name(gw, image));
    let img = Image {
        name: name.clone(),
        labels: HashMap::new(),
        target: Some(p.top.clone()),
        created_at: None,
        updated_at: None,
    };
    let mut images = ImagesClient::new(ch.clone());
    let created = images
        .create(request(
            ns,
            Some(lease),
            CreateImageRequest { image: Some(img.clone()), source_date_epoch: None },
        ))
        .await;
    match created {
        Ok(_) => {}
        Err(e) if e.code() == Code::AlreadyExists => {
            let req = UpdateImageRequest {
                image: Some(img),
                update_mask: Some(prost_types::FieldMask { paths: vec!["target".into()] }),
                source_date_epoch: None,
            };
            images
                .update(request(ns, Some(lease), req))
                .await
                .map_err(|e| status(sock, "update the image", &e))?;
        }
        Err(e) => return Err(status(sock, "create the image", &e)),
    }
    Ok((name, present))
}

async fn put_content(
    c: &mut ContentClient<Channel>,
    ns: &str,
    lease: &str,
    d: &Doc,
) -> Result<(), tonic::Status> {
    let info = c.info(request(ns, Some(lease), cs::InfoRequest { digest: d.digest.to_string() })).await;
    match info {
        Ok(_) => {
            let paths = d.labels.keys().map(|k| format!("labels.{k}")).collect();
            let req = cs::UpdateRequest {
                info: Some(cs::Info {
                    digest: d.digest.to_string(),
                    labels: d.labels.clone(),
                    ..Default::default()
                }),
                update_mask: Some(prost_types::FieldMask { paths }),
            };
            c.update(request(ns, Some(lease), req)).await?;
            return Ok(());
        }
        Err(e) if e.code() == Code::NotFound => {}
        Err(e) => return Err(e),
    }
    let req = WriteContentRequest {
        action: WriteAction::Commit as i32,
        r#ref: format!("starlight-{}", d.digest),
        total: d.bytes.len() as i64,
        expected: d.digest.to_string(),
        offset: 0,
        data: d.bytes.clone(),
        labels: d.labels.clone(),
    };
    let mut answers = c.write(request(ns, Some(lease), tokio_stream::iter(vec![req]))).await?.into_inner();
    match answers.message().await {
        Ok(_) => Ok(()),
        Err(e) if e.code() == Code::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

/// `HOST:PORT/NAME:TAG` (or `@DIGEST`) of the gateway, as `ctr pull` through it names images.
fn default_name(gw: &Gateway, image: &Reference) -> String {
    let host = gw.base().split_once("://").map_or(gw.base(), |(_, h)| h);
    format!("{host}/{image}")
}

fn status(sock: &std::path::Path, what: &str, e: &tonic::Status) -> String {
    format!("containerd at {}: {what}: {} ({:?})", sock.display(), e.message(), e.code())
}

fn now_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn now_nanos() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos())
}

/// `secs` since the epoch as an RFC 3339 UTC time.
pub fn rfc3339(secs: u64) -> String {
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (the proleptic Gregorian calendar, in 400-year eras).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_ids_follow_containerd() {
        let a = format!("sha256:{}", "a".repeat(64));
        let b = format!("sha256:{}", "b".repeat(64));
        assert_eq!(chain_id(std::slice::from_ref(&a)).unwrap(), a);
        let want = Digest::of(format!("{a} {b}").as_bytes()).to_string();
        assert_eq!(chain_id(&[a.clone(), b]).unwrap(), want);
        assert!(chain_id(&[]).is_err());
        assert!(chain_id(&["md5:x".into()]).is_err());
    }

    #[test]
    fn times_are_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_795_000_000), "2026-11-18T11:06:40Z");
    }
}
