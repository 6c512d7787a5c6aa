//! The content one run pushes, generated from a seed: five image configs and manifests (one per
//! workflow, the fifth the subject of the referrers), a small gzip tar layer of random bytes, two
//! random blobs for streamed and chunked uploads, and the artifacts that refer to manifest 4.
//!
//! Configs carry a random author and manifests an unknown descriptor field, as in the official
//! suite, so that each run has new digests and registries must keep fields they do not know.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::Serialize;
use sha2::{Digest, Sha256};

use super::auth::base64;

pub(crate) const MANIFEST_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
pub(crate) const INDEX_TYPE: &str = "application/vnd.oci.image.index.v1+json";
const CONFIG_TYPE: &str = "application/vnd.oci.image.config.v1+json";
const LAYER_TYPE: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const EMPTY_JSON_TYPE: &str = "application/vnd.oci.empty.v1+json";
/// The digest of `{}`, which the distribution-spec names.
pub(crate) const EMPTY_JSON_DIGEST: &str =
    "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a";
pub(crate) const ANNOTATION_KEY: &str = "org.opencontainers.conformance.test";
pub(crate) const ARTIFACT_TYPE_A: &str = "application/vnd.nhl.peanut.butter.bagel";
const ARTIFACT_TYPE_B: &str = "application/vnd.nba.strawberry.jam.croissant";
const ARTIFACT_TYPE_INDEX: &str = "application/vnd.food.stand";
/// A reference no registry can hold: tags may not start with a dot.
pub(crate) const NONEXISTENT_MANIFEST: &str = ".INVALID_MANIFEST_NAME";
pub(crate) const TEST_TAG: &str = "tagtest0";
pub(crate) const EMPTY_LAYER_TAG: &str = "emptylayer";

/// Bytes and their `sha256:` digest.
#[derive(Debug, Clone)]
pub(crate) struct Blob {
    pub(crate) content: Bytes,
    pub(crate) digest: String,
}

impl Blob {
    pub(crate) fn new(content: impl Into<Bytes>) -> Blob {
        let content = content.into();
        Blob { digest: sha256(&content), content }
    }

    pub(crate) fn len(&self) -> usize {
        self.content.len()
    }
}

pub(crate) fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// A blob uploaded in two PATCHes: `first` is one byte longer than `second` for even sizes.
#[derive(Debug, Clone)]
pub(crate) struct Chunked {
    pub(crate) blob: Blob,
    pub(crate) first: Bytes,
    pub(crate) second: Bytes,
}

impl Chunked {
    pub(crate) fn new(size: usize, seed: u64) -> Chunked {
        let blob = Blob::new(Rng(seed).bytes(size));
        let split = (size / 2 + 1).min(size);
        Chunked { first: blob.content.slice(..split), second: blob.content.slice(split..), blob }
    }

    pub(crate) fn first_range(&self) -> String {
        format!("0-{}", self.first.len().saturating_sub(1))
    }

    pub(crate) fn second_range(&self) -> String {
        format!("{}-{}", self.first.len(), self.blob.len().saturating_sub(1))
    }
}

/// Artifacts with a `subject`: A and B (two shapes each) and an index refer to manifest 4, C to
/// manifest 3, which is not pushed when C is.
#[derive(Debug)]
pub(crate) struct Referrers {
    pub(crate) empty_json: Blob,
    pub(crate) blob_a: Blob,
    pub(crate) blob_b: Blob,
    pub(crate) a_config: Blob,
    pub(crate) a_layer: Blob,
    pub(crate) b_config: Blob,
    pub(crate) b_layer: Blob,
    pub(crate) c_layer: Blob,
    pub(crate) index: Blob,
    /// The value of [`ANNOTATION_KEY`] each referrer carries, by digest (C carries none).
    pub(crate) annotations: HashMap<String, String>,
}

#[derive(Debug)]
pub(crate) struct Fixtures {
    pub(crate) seed: u64,
    pub(crate) configs: Vec<Blob>,
    pub(crate) manifests: Vec<Blob>,
    pub(crate) layer: Blob,
    pub(crate) empty_layer_manifest: Blob,
    pub(crate) blob_a: Blob,
    pub(crate) chunked: Chunked,
    pub(crate) refs: Referrers,
    pub(crate) dummy_digest: String,
}

/// A seed from the clock and the process id.
pub(crate) fn time_seed() -> u64 {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
    nanos ^ (u64::from(std::process::id()) << 32)
}

impl Fixtures {
    pub(crate) fn generate(seed: u64) -> Fixtures {
        let mut rng = Rng(seed);
        let (layer, diff_id) = layer(&rng.bytes(512));
        let configs: Vec<Blob> = (0..5).map(|_| image_config(&rng.string(16), &diff_id)).collect();
        let manifests: Vec<Blob> =
            configs.iter().map(|c| image_manifest(c, std::slice::from_ref(&layer))).collect();
        let empty = Manifest { media_type: None, ..image_manifest_doc(&configs[1], &[]) };
        Fixtures {
            seed,
            empty_layer_manifest: Blob::new(pretty(&empty)),
            blob_a: Blob::new(Rng(seed.wrapping_add(1)).bytes(42)),
            chunked: Chunked::new(42, seed.wrapping_add(2)),
            refs: referrers(&manifests),
            dummy_digest: sha256(b"hello world"),
            configs,
            manifests,
            layer,
        }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Descriptor {
    media_type: &'static str,
    digest: String,
    size: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    new_unspecified_field: Option<String>,
}

fn desc(media_type: &'static str, blob: &Blob) -> Descriptor {
    Descriptor {
        media_type,
        digest: blob.digest.clone(),
        size: blob.len(),
        data: None,
        new_unspecified_field: None,
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Manifest {
    schema_version: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    media_type: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    artifact_type: Option<&'static str>,
    config: Descriptor,
    layers: Vec<Descriptor>,
    #[serde(skip_serializing_if = "Option::is_none")]
    subject: Option<Descriptor>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    annotations: BTreeMap<&'static str, &'static str>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Index {
    schema_version: u32,
    media_type: &'static str,
    artifact_type: &'static str,
    manifests: Vec<Descriptor>,
    subject: Descriptor,
    annotations: BTreeMap<&'static str, &'static str>,
}

/// Tab-indented JSON, as the official suite writes it.
fn pretty<T: Serialize>(value: &T) -> Vec<u8> {
    let mut out = Vec::new();
    let fmt = serde_json::ser::PrettyFormatter::with_indent(b"\t");
    let mut ser = serde_json::Serializer::with_formatter(&mut out, fmt);
    // Plain structs of strings and numbers into memory: serialisation cannot fail.
    value.serialize(&mut ser).expect("serialise a fixture to memory");
    out
}

/// A gzip tar holding one file of `payload`, and its diff ID (digest of the tar).
fn layer(payload: &[u8]) -> (Blob, String) {
    let mut header = tar::Header::new_ustar();
    header.set_size(payload.len() as u64);
    header.set_mode(0o644);
    header.set_mtime(0);
    header.set_entry_type(tar::EntryType::Regular);
    let mut tar = tar::Builder::new(Vec::new());
    // Writing to memory with a short, valid path cannot fail.
    tar.append_data(&mut header, "conformance/random.bin", payload).expect("tar into memory");
    let tar = tar.into_inner().expect("finish tar in memory");
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&tar).expect("gzip into memory");
    let gz = gz.finish().expect("finish gzip in memory");
    (Blob::new(gz), sha256(&tar))
}

fn image_config(author: &str, diff_id: &str) -> Blob {
    let config = serde_json::json!({
        "author": author,
        "architecture": "amd64",
        "os": "linux",
        "rootfs": { "type": "layers", "diff_ids": [diff_id] },
    });
    Blob::new(pretty(&config))
}

fn image_manifest_doc(config: &Blob, layers: &[Blob]) -> Manifest {
    Manifest {
        schema_version: 2,
        media_type: Some(MANIFEST_TYPE),
        artifact_type: None,
        config: Descriptor {
            data: Some(base64(&config.content)),
            new_unspecified_field: Some(base64(b"hello world")),
            ..desc(CONFIG_TYPE, config)
        },
        layers: layers.iter().map(|l| desc(LAYER_TYPE, l)).collect(),
        subject: None,
        annotations: BTreeMap::new(),
    }
}

fn image_manifest(config: &Blob, layers: &[Blob]) -> Blob {
    Blob::new(pretty(&image_manifest_doc(config, layers)))
}

fn referrers(manifests: &[Blob]) -> Referrers {
    let empty_json = Blob::new(&b"{}"[..]);
    let blob_a = Blob::new(&b"NHL Peanut Butter on my NHL bagel"[..]);
    let blob_b = Blob::new(&b"NBA Strawberry Jam on my NBA croissant"[..]);
    let subject = |i: usize| Some(desc(MANIFEST_TYPE, &manifests[i]));
    let artifact = |artifact_type: Option<&'static str>,
                    config: Descriptor,
                    layer: Descriptor,
                    subject: Option<Descriptor>,
                    note: Option<&'static str>| Manifest {
        schema_version: 2,
        media_type: Some(MANIFEST_TYPE),
        artifact_type,
        config,
        layers: vec![layer],
        subject,
        annotations: note.map(|n| BTreeMap::from([(ANNOTATION_KEY, n)])).unwrap_or_default(),
    };
    // "config" artifacts put the type in config.mediaType, "layer" ones in artifactType.
    let empty = || desc(EMPTY_JSON_TYPE, &empty_json);
    let a_config = artifact(None, desc(ARTIFACT_TYPE_A, &blob_a), empty(), subject(4), Some("test config a"));
    let b_config = artifact(None, desc(ARTIFACT_TYPE_B, &blob_b), empty(), subject(4), Some("test config b"));
    let a_layer_doc = artifact(
        Some(ARTIFACT_TYPE_A),
        empty(),
        desc(ARTIFACT_TYPE_A, &blob_a),
        subject(4),
        Some("test layer a"),
    );
    let b_layer = artifact(
        Some(ARTIFACT_TYPE_B),
        empty(),
        desc(ARTIFACT_TYPE_B, &blob_b),
        subject(4),
        Some("test layer b"),
    );
    let c_layer = artifact(Some(ARTIFACT_TYPE_B), empty(), desc(ARTIFACT_TYPE_B, &blob_b), subject(3), None);
    let (a_config, a_layer) = (Blob::new(pretty(&a_config)), Blob::new(pretty(&a_layer_doc)));
    let index = Index {
        schema_version: 2,
        media_type: INDEX_TYPE,
        artifact_type: ARTIFACT_TYPE_INDEX,
        manifests: vec![desc(MANIFEST_TYPE, &a_config), desc(MANIFEST_TYPE, &a_layer)],
        subject: desc(MANIFEST_TYPE, &manifests[4]),
        annotations: BTreeMap::from([(ANNOTATION_KEY, "test index")]),
    };
    let refs = Referrers {
        b_config: Blob::new(pretty(&b_config)),
        b_layer: Blob::new(pretty(&b_layer)),
        c_layer: Blob::new(pretty(&c_layer)),
        index: Blob::new(pretty(&index)),
        annotations: HashMap::new(),
        a_config,
        a_layer,
        empty_json,
        blob_a,
        blob_b,
    };
    let notes = [
        (&refs.a_config, "test config a"),
        (&refs.b_config, "test config b"),
        (&refs.a_layer, "test layer a"),
        (&refs.b_layer, "test layer b"),
        (&refs.index, "test index"),
    ];
    let annotations = notes.iter().map(|(b, n)| (b.digest.clone(), n.to_string())).collect();
    Referrers { annotations, ..refs }
}

/// SplitMix64: small, seedable, good enough for test content.
#[derive(Debug)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }

    fn string(&mut self, n: usize) -> String {
        const LETTERS: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz-";
        (0..n).map(|_| LETTERS[(self.next() % LETTERS.len() as u64) as usize] as char).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_differ_by_seed_and_repeat_with_it() {
        let (a, b) = (Fixtures::generate(1), Fixtures::generate(2));
        assert_ne!(a.manifests[0].digest, b.manifests[0].digest);
        assert_ne!(a.layer.digest, b.layer.digest);
        assert_eq!(a.manifests[0].digest, Fixtures::generate(1).manifests[0].digest);
        let digests: std::collections::HashSet<_> = a.manifests.iter().map(|m| &m.digest).collect();
        assert_eq!(digests.len(), 5, "one distinct manifest per workflow");
    }

    #[test]
    fn manifests_reference_their_config_and_layer() {
        let fx = Fixtures::generate(7);
        let m: serde_json::Value = serde_json::from_slice(&fx.manifests[2].content).unwrap();
        assert_eq!(m["mediaType"], MANIFEST_TYPE);
        assert_eq!(m["config"]["digest"], fx.configs[2].digest.as_str());
        assert_eq!(m["config"]["size"], fx.configs[2].len());
        assert_eq!(m["config"]["data"], base64(&fx.configs[2].content).as_str());
        assert_eq!(m["layers"][0]["digest"], fx.layer.digest.as_str());
        let empty: serde_json::Value = serde_json::from_slice(&fx.empty_layer_manifest.content).unwrap();
        assert_eq!(empty["layers"], serde_json::json!([]));
        assert!(empty.get("mediaType").is_none());
    }

    #[test]
    fn the_layer_is_a_gzip_tar_whose_diff_id_the_config_lists() {
        let fx = Fixtures::generate(3);
        let mut tar = Vec::new();
        let mut gz = flate2::read::GzDecoder::new(&fx.layer.content[..]);
        std::io::Read::read_to_end(&mut gz, &mut tar).unwrap();
        let config: serde_json::Value = serde_json::from_slice(&fx.configs[0].content).unwrap();
        assert_eq!(config["rootfs"]["diff_ids"][0], sha256(&tar).as_str());
        let mut archive = tar::Archive::new(&tar[..]);
        assert_eq!(archive.entries().unwrap().count(), 1);
    }

    #[test]
    fn referrers_point_at_manifest_four_except_c() {
        let fx = Fixtures::generate(5);
        assert_eq!(fx.refs.empty_json.digest, EMPTY_JSON_DIGEST);
        for r in [&fx.refs.a_config, &fx.refs.a_layer, &fx.refs.b_config, &fx.refs.b_layer, &fx.refs.index] {
            let v: serde_json::Value = serde_json::from_slice(&r.content).unwrap();
            assert_eq!(v["subject"]["digest"], fx.manifests[4].digest.as_str());
            assert_eq!(v["annotations"][ANNOTATION_KEY], fx.refs.annotations[&r.digest].as_str());
        }
        let c: serde_json::Value = serde_json::from_slice(&fx.refs.c_layer.content).unwrap();
        assert_eq!(c["subject"]["digest"], fx.manifests[3].digest.as_str());
        assert_eq!(fx.refs.annotations.len(), 5);
    }

    #[test]
    fn chunks_split_one_past_the_middle() {
        let c = Chunked::new(42, 9);
        assert_eq!((c.first.len(), c.second.len()), (22, 20));
        assert_eq!((c.first_range(), c.second_range()), ("0-21".to_string(), "22-41".to_string()));
        assert_eq!([c.first.as_ref(), c.second.as_ref()].concat(), c.blob.content.as_ref());
    }
}
