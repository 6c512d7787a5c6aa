//! Image references and what a manifest declares (issue "Security and liveness", item 8):
//! `oci:DIR:NAME:TAG` is read the way skopeo reads it, and a layer blob whose size differs from the
//! manifest's declared `size` fails the conversion, naming the layer and both sizes.

mod common;

use std::path::Path;

use starlight_conformance::layout::{Layer, noise, write_image};
use starlight_converter::{ConvertError, Index, Source, SourceOptions};
use starlight_format::Digest;

fn layer(seed: u64) -> Vec<u8> {
    Layer::new()
        .dir("etc", 0o755)
        .file("etc/hello", format!("hello {seed}\n").as_bytes())
        .file("etc/noise", &noise(300 << 10, seed))
        .finish()
}

fn source(spec: &str) -> Source {
    Source::parse(spec, SourceOptions::default()).unwrap()
}

/// `oci:/images:redis:v1` was split at the last colon: directory `/images:redis`, tag `v1`.
#[tokio::test]
async fn an_oci_reference_with_colons_names_the_image_in_the_directory_before_the_first_colon() {
    let b = common::local_redb().await;
    let tmp = tempfile::tempdir().unwrap();
    let layout = tmp.path().join("images");
    let v1 = write_image(&layout, "redis:v1", &[layer(1)], &["/bin/true"]);
    let v2 = write_image(&layout, "redis:v2", &[layer(2)], &["/bin/true"]);

    let out = b.conv.convert(&source(&format!("oci:{}:redis:v1", layout.display()))).await.unwrap();
    assert_eq!(out.image.manifest_digest.to_string(), v1);
    assert_eq!((out.image.name.as_str(), out.image.tag.as_deref()), ("redis", Some("v1")));
    assert_eq!(b.conv.index.resolve_tag("redis", "v1").await.unwrap(), Some(out.image.manifest_digest));

    let out = b.conv.convert(&source(&format!("oci:{}:redis:v2", layout.display()))).await.unwrap();
    assert_eq!(out.image.manifest_digest.to_string(), v2);

    // The name the layout does not hold is refused, naming it.
    let e = b.conv.convert(&source(&format!("oci:{}:redis:v3", layout.display()))).await.unwrap_err();
    assert!(e.to_string().contains(r#"no image named "redis:v3""#), "{e}");
}

/// Rewrites the manifest tagged `tag` in `layout` with its first layer's `size` changed by
/// `delta`, tagged `new_tag`. Returns that layer's digest and real size.
fn with_layer_size(layout: &Path, tag: &str, new_tag: &str, delta: i64) -> (String, u64) {
    let index_path = layout.join("index.json");
    let mut index: serde_json::Value = serde_json::from_slice(&std::fs::read(&index_path).unwrap()).unwrap();
    let entry = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == tag)
        .unwrap()
        .clone();
    let blob = |d: &str| layout.join("blobs/sha256").join(d.trim_start_matches("sha256:"));
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(blob(entry["digest"].as_str().unwrap())).unwrap()).unwrap();
    let real = manifest["layers"][0]["size"].as_u64().unwrap();
    let digest = manifest["layers"][0]["digest"].as_str().unwrap().to_string();
    manifest["layers"][0]["size"] = serde_json::json!(real.checked_add_signed(delta).unwrap());
    let bytes = manifest.to_string().into_bytes();
    let d = Digest::of(&bytes).to_string();
    std::fs::write(blob(&d), &bytes).unwrap();
    let mut new_entry = entry;
    new_entry["digest"] = serde_json::json!(d);
    new_entry["size"] = serde_json::json!(bytes.len());
    new_entry["annotations"]["org.opencontainers.image.ref.name"] = serde_json::json!(new_tag);
    index["manifests"].as_array_mut().unwrap().push(new_entry);
    std::fs::write(&index_path, index.to_string()).unwrap();
    (digest, real)
}

/// A layer blob longer or shorter than the manifest says was converted as if nothing were wrong
/// (and a registry serving a huge blob for a small declared size was read to its end).
#[tokio::test]
async fn a_layer_blob_of_another_size_than_declared_fails_naming_the_layer_and_both_sizes() {
    let b = common::local_redb().await;
    let tmp = tempfile::tempdir().unwrap();
    let layout = tmp.path().join("layout");
    write_image(&layout, "app", &[layer(3)], &["/bin/true"]);
    let (digest, real) = with_layer_size(&layout, "app", "declared-less", -1000);
    with_layer_size(&layout, "app", "declared-more", 1);

    let e = b.conv.convert(&source(&format!("oci:{}:declared-less", layout.display()))).await.unwrap_err();
    assert!(matches!(e, ConvertError::BadLayer { .. }), "{e:?}");
    let want = format!("layer {digest}: blob is longer than the {} bytes the manifest declares", real - 1000);
    assert!(e.to_string().starts_with(&want), "{e}");

    let e = b.conv.convert(&source(&format!("oci:{}:declared-more", layout.display()))).await.unwrap_err();
    assert!(matches!(e, ConvertError::BadLayer { .. }), "{e:?}");
    let want = format!(
        "layer {digest}: blob is {real} bytes, shorter than the {} bytes the manifest declares",
        real + 1
    );
    assert!(e.to_string().starts_with(&want), "{e}");

    // Nothing was published; the image with the right size converts.
    assert!(b.conv.index.resolve_tag("layout", "declared-less").await.unwrap().is_none());
    b.conv.convert(&source(&format!("oci:{}:app", layout.display()))).await.unwrap();
}
