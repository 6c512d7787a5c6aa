//! A real Debian-based image (debootstrap base + redis-server installed with apt, built by
//! `scripts/debian-image.sh` and cached), pushed to a real docker-registry with skopeo and converted
//! from the registry and from the OCI layout, with the `starlight-convert` binary.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use starlight_conformance::servers::Registry;
use starlight_converter::content::copy_content;
use starlight_converter::convert::load_toc;
use starlight_converter::index::{Index, RedbIndex};
use starlight_converter::store::LocalStore;
use starlight_format::{Digest, Hasher, Kind, path};

const BIN: &str = env!("CARGO_BIN_EXE_starlight-convert");

fn image_layout() -> PathBuf {
    starlight_conformance::images::debian_layout()
}

fn skopeo_push(layout: &Path, tag: &str, dest: &str, creds: Option<&str>) {
    starlight_conformance::images::skopeo_copy(&format!("oci:{}:{tag}", layout.display()), dest, creds);
}

fn convert(data: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .arg("--store")
        .arg(data.join("store"))
        .arg("--index")
        .arg(data.join("index.redb"))
        .arg("--json")
        .args(args)
        .output()
        .unwrap()
}

fn json(out: &Output) -> serde_json::Value {
    assert!(out.status.success(), "starlight-convert failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn converted(v: &serde_json::Value) -> usize {
    v["layers"].as_array().unwrap().iter().filter(|l| l["converted"] == true).count()
}

#[tokio::test(flavor = "multi_thread")]
async fn debian_image_from_registry_and_from_layout() {
    let layout = image_layout();
    let reg = Registry::start();
    for tag in ["app", "app-v2"] {
        skopeo_push(&layout, tag, &format!("docker://{}/debian/redis:{tag}", reg.addr()), None);
    }
    let data = tempfile::tempdir().unwrap();

    let from_registry =
        json(&convert(data.path(), &["--plain-http", &format!("docker://{}/debian/redis:app", reg.addr())]));
    assert_eq!(converted(&from_registry), 2, "{from_registry}");
    assert_eq!(from_registry["platform"], "linux/amd64");

    // The same image from the OCI layout: same manifest, every layer already converted.
    let from_layout =
        json(&convert(data.path(), &["--name", "debian/redis", &format!("oci:{}:app", layout.display())]));
    assert_eq!(from_layout["manifest"], from_registry["manifest"]);
    assert_eq!(converted(&from_layout), 0, "layers are converted once: {from_layout}");

    // The update: only the upgrade layer is new.
    let v2 = json(&convert(
        data.path(),
        &["--plain-http", &format!("docker://{}/debian/redis:app-v2", reg.addr())],
    ));
    assert_eq!(converted(&v2), 1, "{v2}");

    // The index resolves the tag, and every entry of every real layer matches its tar exactly.
    let index = RedbIndex::open(data.path().join("index.redb")).unwrap();
    let store = LocalStore::open(data.path().join("store")).unwrap();
    let manifest: Digest = from_registry["manifest"].as_str().unwrap().parse().unwrap();
    assert_eq!(index.resolve_tag("debian/redis", "app").await.unwrap(), Some(manifest));
    let image = index.get_image(&manifest).await.unwrap().expect("image published");
    for layer in &image.layers {
        let record = index.get_layer(&layer.diff_id).await.unwrap().expect("layer published");
        let toc = load_toc(&store, &record).await.unwrap();
        let blob = layout.join("blobs/sha256").join(layer.digest.hex());
        compare_with_tar(&blob, &toc);
        // Every content reads back from the store and matches its digest.
        let digests: Vec<Digest> = toc.content_digests().collect();
        let locs = index.get_contents(&digests).await.unwrap();
        for (d, loc) in digests.iter().zip(locs) {
            copy_content(&store, d, &loc.expect("indexed"), &mut std::io::sink()).await.unwrap();
        }
    }
}

/// Checks a TOC against the tar it came from, entry by entry, with GNU-independent parsing of the
/// metadata that matters (path, type, size, content digest, mode, owner, mtime, link target).
fn compare_with_tar(gz: &Path, toc: &starlight_format::Toc) {
    let by_path: HashMap<&[u8], &starlight_format::Entry> =
        toc.entries.iter().map(|e| (e.path.as_slice(), e)).collect();
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(std::fs::File::open(gz).unwrap()));
    let mut n = 0;
    for e in archive.entries().unwrap() {
        let mut e = e.unwrap();
        let p = path::normalize(&e.path_bytes()).unwrap();
        let t = by_path
            .get(p.as_slice())
            .unwrap_or_else(|| panic!("{} missing from TOC", String::from_utf8_lossy(&p)));
        let h = e.header().clone();
        assert_eq!(t.mode, h.mode().unwrap() & 0o7777, "{}", String::from_utf8_lossy(&p));
        assert_eq!((u64::from(t.uid), u64::from(t.gid)), (h.uid().unwrap(), h.gid().unwrap()));
        assert_eq!(t.mtime as u64, h.mtime().unwrap());
        match &t.kind {
            Kind::File { size, digest } => {
                let mut hasher = Hasher::new();
                let mut buf = Vec::new();
                e.read_to_end(&mut buf).unwrap();
                hasher.update(&buf);
                assert_eq!(*size, buf.len() as u64);
                assert_eq!(*digest, (!buf.is_empty()).then(|| hasher.finish()));
            }
            Kind::Symlink { target } => assert_eq!(Some(target.as_slice()), e.link_name_bytes().as_deref()),
            Kind::Hardlink { target } => {
                assert_eq!(Some(target.clone()), e.link_name_bytes().map(|l| path::normalize(&l).unwrap()))
            }
            Kind::Dir => assert!(h.entry_type().is_dir()),
            other => assert!(!h.entry_type().is_file(), "{other:?}"),
        }
        n += 1;
    }
    assert_eq!(n, toc.entries.len());
    assert!(n > 100, "a real layer has many entries");
}

#[test]
fn basic_auth_registry() {
    let layout = image_layout();
    let reg = Registry::start_with_htpasswd("alice", "s3cret");
    let src = format!("docker://{}/debian/base:1", reg.addr());
    skopeo_push(&layout, "base", &src, Some("alice:s3cret"));
    let data = tempfile::tempdir().unwrap();

    let denied = convert(data.path(), &["--plain-http", &src]);
    assert!(!denied.status.success());
    let err = String::from_utf8_lossy(&denied.stderr);
    assert!(err.contains("requires credentials"), "{err}");
    let wrong = convert(data.path(), &["--plain-http", "--creds", "alice:wrong", &src]);
    assert!(!wrong.status.success());
    assert!(
        String::from_utf8_lossy(&wrong.stderr).contains("401"),
        "{}",
        String::from_utf8_lossy(&wrong.stderr)
    );

    let ok = json(&convert(data.path(), &["--plain-http", "--creds", "alice:s3cret", &src]));
    assert_eq!(converted(&ok), 1);
}

/// A conversion killed at any point publishes nothing; running it again finishes the job.
#[tokio::test(flavor = "multi_thread")]
async fn killed_conversion_publishes_nothing_and_rerun_finishes() {
    let layout = image_layout();
    let data = tempfile::tempdir().unwrap();
    let src = format!("oci:{}:app-v2", layout.display());
    let manifest_of_tag = || async {
        let index = RedbIndex::open(data.path().join("index.redb")).unwrap();
        index.resolve_tag("oci", "app-v2").await.unwrap()
    };
    for delay in [300u64, 1200] {
        let mut child = Command::new(BIN)
            .arg("--store")
            .arg(data.path().join("store"))
            .arg("--index")
            .arg(data.path().join("index.redb"))
            .arg(&src)
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(delay));
        let finished = child.try_wait().unwrap().is_some();
        assert!(!finished, "conversion finished within {delay} ms: the kill would test nothing");
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        assert_eq!(manifest_of_tag().await, None, "a killed conversion left the image visible");
    }
    let done = json(&convert(data.path(), &[&src]));
    let manifest: Digest = done["manifest"].as_str().unwrap().parse().unwrap();
    assert_eq!(manifest_of_tag().await, Some(manifest));
    let index = RedbIndex::open(data.path().join("index.redb")).unwrap();
    let image = index.get_image(&manifest).await.unwrap().unwrap();
    for l in &image.layers {
        assert!(index.get_layer(&l.diff_id).await.unwrap().is_some());
    }
}

/// An image index with two platforms: the host's is chosen by default, `--platform` picks another,
/// and a platform the index lacks is a clear error naming what it has.
#[test]
fn image_index_platform_choice() {
    let layout = image_layout();
    let copy = tempfile::tempdir().unwrap();
    let st = Command::new("cp").arg("-al").arg(&layout).arg(copy.path().join("oci")).status().unwrap();
    assert!(st.success());
    let dir = copy.path().join("oci");
    let index_path = dir.join("index.json");
    let mut index: serde_json::Value = serde_json::from_slice(&std::fs::read(&index_path).unwrap()).unwrap();
    let find = |tag: &str| {
        index["manifests"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["annotations"]["org.opencontainers.image.ref.name"] == tag)
            .unwrap()
            .clone()
    };
    let (app, base) = (find("app"), find("base"));
    let entry = |d: &serde_json::Value, arch: &str| {
        serde_json::json!({"mediaType": d["mediaType"], "digest": d["digest"], "size": d["size"],
                           "platform": {"os": "linux", "architecture": arch}})
    };
    let nested = serde_json::json!({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [entry(&base, "arm64"), entry(&app, "amd64")],
    });
    let bytes = serde_json::to_vec(&nested).unwrap();
    let digest = Digest::of(&bytes);
    std::fs::write(dir.join("blobs/sha256").join(digest.hex()), &bytes).unwrap();
    index["manifests"].as_array_mut().unwrap().push(serde_json::json!({
        "mediaType": "application/vnd.oci.image.index.v1+json", "digest": digest.to_string(),
        "size": bytes.len(), "annotations": {"org.opencontainers.image.ref.name": "multi"},
    }));
    std::fs::write(&index_path, serde_json::to_vec(&index).unwrap()).unwrap();

    let data = tempfile::tempdir().unwrap();
    let src = format!("oci:{}:multi", dir.display());
    let host = json(&convert(data.path(), &[&src]));
    assert_eq!(host["manifest"], app["digest"]);
    assert_eq!(host["platform"], "linux/amd64");
    let arm = json(&convert(data.path(), &["--platform", "linux/arm64", &src]));
    assert_eq!(arm["manifest"], base["digest"]);
    assert_eq!(arm["platform"], "linux/arm64");
    let none = convert(data.path(), &["--platform", "linux/s390x", &src]);
    assert!(!none.status.success());
    let err = String::from_utf8_lossy(&none.stderr);
    assert!(
        err.contains("no manifest for platform linux/s390x") && err.contains("linux/arm64, linux/amd64"),
        "{err}"
    );
}

/// Docker v2 schema 2 manifests (what `docker push` writes) convert like OCI ones.
#[test]
fn docker_v2_manifest() {
    let layout = image_layout();
    let reg = Registry::start();
    let dest = format!("docker://{}/debian/docker:v2", reg.addr());
    let out = Command::new("skopeo")
        .args(["copy", "--quiet", "--dest-tls-verify=false", "--format", "v2s2"])
        .arg(format!("oci:{}:app", layout.display()))
        .arg(&dest)
        .output()
        .unwrap();
    assert!(out.status.success(), "skopeo: {}", String::from_utf8_lossy(&out.stderr));
    let data = tempfile::tempdir().unwrap();
    let v = json(&convert(data.path(), &["--plain-http", &dest]));
    assert_eq!(converted(&v), 2);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let index = RedbIndex::open(data.path().join("index.redb")).unwrap();
    let manifest: Digest = v["manifest"].as_str().unwrap().parse().unwrap();
    let image = rt.block_on(index.get_image(&manifest)).unwrap().unwrap();
    assert_eq!(image.media_type, "application/vnd.docker.distribution.manifest.v2+json");
    assert!(image.layers.iter().all(|l| l.media_type == "application/vnd.docker.image.rootfs.diff.tar.gzip"));
}

/// Flattening the real three-layer image (base, redis, security upgrades that replace files) and
/// materializing it gives exactly what `umoci unpack` gives, attribute for attribute.
#[tokio::test(flavor = "multi_thread")]
async fn flattened_image_equals_umoci_unpack() {
    let layout = image_layout();
    let data = tempfile::tempdir().unwrap();
    let v = json(&convert(data.path(), &[&format!("oci:{}:app-v2", layout.display())]));
    let manifest: Digest = v["manifest"].as_str().unwrap().parse().unwrap();
    let index = RedbIndex::open(data.path().join("index.redb")).unwrap();
    let store = LocalStore::open(data.path().join("store")).unwrap();
    let image = index.get_image(&manifest).await.unwrap().unwrap();
    let mut tocs = Vec::new();
    for l in &image.layers {
        let record = index.get_layer(&l.diff_id).await.unwrap().unwrap();
        tocs.push(load_toc(&store, &record).await.unwrap());
    }
    let refs: Vec<&starlight_format::Toc> = tocs.iter().collect();
    let flat = starlight_format::flatten::flatten(&refs).unwrap();
    let flat_toc = starlight_format::Toc { diff_id: Digest([0; 32]), entries: flat };

    let ours = data.path().join("ours");
    std::fs::create_dir(&ours).unwrap();
    let digests: Vec<Digest> = flat_toc.content_digests().collect();
    let locs: HashMap<Digest, _> = digests
        .iter()
        .copied()
        .zip(index.get_contents(&digests).await.unwrap().into_iter().map(|l| l.unwrap()))
        .collect();
    let handle = tokio::runtime::Handle::current();
    let (t, dir) = (flat_toc.clone(), ours.clone());
    tokio::task::spawn_blocking(move || {
        starlight_converter::extract::extract_layer(&t, &dir, &mut |d, f| {
            handle.block_on(copy_content(&store, d, &locs[d], f)).map_err(std::io::Error::other)
        })
    })
    .await
    .unwrap()
    .unwrap();

    let bundle = data.path().join("bundle");
    let out = Command::new("umoci")
        .args(["unpack", "--image", &format!("{}:app-v2", layout.display())])
        .arg(&bundle)
        .output()
        .expect("umoci: apt-get install -y umoci");
    assert!(out.status.success(), "umoci unpack: {}", String::from_utf8_lossy(&out.stderr));
    starlight_conformance::fstree::assert_same_tree(
        &bundle.join("rootfs"),
        &ours,
        starlight_conformance::fstree::Options { skip_root: true, skip_dir_mtimes: false },
    );
}
