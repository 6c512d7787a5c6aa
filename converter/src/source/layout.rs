//! OCI image layouts on disk, as skopeo and umoci write them (`index.json` + `blobs/sha256/`).

use std::path::PathBuf;

use starlight_format::Digest;
use tokio::io::AsyncReadExt;

use super::{BlobReader, Descriptor, SourceOptions, ref_name};
use crate::ConvertError;

/// `oci:DIR[:REFERENCE]`, read the way skopeo reads it: the directory is everything up to the first
/// colon, so `oci:/images:redis:v1` is the image named `redis:v1` in `/images`.
#[derive(Debug)]
pub struct LayoutSource {
    pub dir: PathBuf,
    /// The reference looked up in `index.json` (`org.opencontainers.image.ref.name`).
    pub reference: Option<String>,
    /// The tag recorded for the image: the reference, or what follows its last colon when it is
    /// `NAME:TAG` (tags hold no colon).
    pub tag: Option<String>,
    pub opts: SourceOptions,
}

#[derive(serde::Deserialize)]
struct IndexJson {
    manifests: Vec<Descriptor>,
}

impl LayoutSource {
    pub fn parse(rest: &str, opts: SourceOptions) -> Result<LayoutSource, ConvertError> {
        let (dir, reference) = match rest.split_once(':') {
            Some((d, r)) => (d, Some(r).filter(|r| !r.is_empty())),
            None => (rest, None),
        };
        if dir.is_empty() {
            return Err(ConvertError::BadImage {
                image: format!("oci:{rest}"),
                why: "empty OCI layout directory (expected oci:DIR[:REFERENCE])".into(),
            });
        }
        let tag = reference.map(|r| r.rsplit_once(':').map_or(r, |(_, t)| t).to_string());
        Ok(LayoutSource { dir: PathBuf::from(dir), reference: reference.map(str::to_string), tag, opts })
    }

    pub(super) fn describe(&self) -> String {
        format!(
            "oci:{}{}",
            self.dir.display(),
            self.reference.as_ref().map(|t| format!(":{t}")).unwrap_or_default()
        )
    }

    /// The name recorded: `--name`, else the `NAME` of a `NAME:TAG` reference, else the directory's.
    pub(super) fn name(&self) -> String {
        if let Some(n) = &self.opts.name {
            return n.clone();
        }
        if let Some((name, _)) = self.reference.as_deref().and_then(|r| r.rsplit_once(':'))
            && !name.is_empty()
        {
            return name.to_string();
        }
        self.opts.name.clone().unwrap_or_else(|| {
            let canon = std::fs::canonicalize(&self.dir).unwrap_or_else(|_| self.dir.clone());
            canon.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "image".into())
        })
    }

    fn err(&self, why: String) -> ConvertError {
        ConvertError::Fetch { source_name: self.describe(), what: "OCI layout".into(), why }
    }

    fn blob_path(&self, d: &Digest) -> PathBuf {
        self.dir.join("blobs").join("sha256").join(d.hex())
    }

    pub(super) async fn top_manifest(
        &self,
    ) -> Result<(Vec<u8>, Option<String>, Option<Digest>), ConvertError> {
        let index_path = self.dir.join("index.json");
        let raw = tokio::fs::read(&index_path)
            .await
            .map_err(|e| self.err(format!("{}: {e}", index_path.display())))?;
        let index: IndexJson = serde_json::from_slice(&raw)
            .map_err(|e| self.err(format!("index.json is not a valid OCI index: {e}")))?;
        let pick = match &self.reference {
            Some(r) => index.manifests.iter().find(|d| ref_name(d) == Some(r.as_str())),
            None if index.manifests.len() == 1 => index.manifests.first(),
            None => {
                return Err(self.err("the layout holds several images: name one (oci:DIR:REFERENCE)".into()));
            }
        };
        let pick = pick.ok_or_else(|| {
            self.err(format!("no image named {:?} in index.json", self.reference.as_deref().unwrap_or("")))
        })?;
        let digest: Digest = pick.digest.parse().map_err(|e| self.err(format!("index.json: {e}")))?;
        let bytes = self.blob_bytes(&digest, super::MAX_MANIFEST).await?;
        Ok((bytes, pick.media_type.clone(), Some(digest)))
    }

    pub(super) async fn blob_bytes(&self, d: &Digest, max: u64) -> Result<Vec<u8>, ConvertError> {
        let mut f = self.open_file(d).await?;
        let mut out = Vec::new();
        (&mut f).take(max + 1).read_to_end(&mut out).await.map_err(|e| self.err(format!("blob {d}: {e}")))?;
        if out.len() as u64 > max {
            return Err(self.err(format!("blob {d} is larger than {max} bytes")));
        }
        Ok(out)
    }

    async fn open_file(&self, d: &Digest) -> Result<tokio::fs::File, ConvertError> {
        let p = self.blob_path(d);
        tokio::fs::File::open(&p).await.map_err(|e| self.err(format!("blob {d} ({}): {e}", p.display())))
    }

    pub(super) async fn open_blob(&self, d: &Digest) -> Result<BlobReader, ConvertError> {
        Ok(Box::pin(self.open_file(d).await?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(rest: &str) -> LayoutSource {
        LayoutSource::parse(rest, SourceOptions::default()).unwrap()
    }

    /// Issue item 8: `oci:/images:redis:v1` was split at the last colon (dir `/images:redis`).
    #[test]
    fn the_directory_ends_at_the_first_colon_like_skopeo() {
        let l = parse("/images:redis:v1");
        assert_eq!(l.dir, PathBuf::from("/images"));
        assert_eq!(l.reference.as_deref(), Some("redis:v1"));
        assert_eq!((l.name(), l.tag.as_deref()), ("redis".to_string(), Some("v1")));
        assert_eq!(l.describe(), "oci:/images:redis:v1");

        let l = parse("/var/tmp/layout:app");
        assert_eq!(
            (l.dir.to_str(), l.reference.as_deref(), l.tag.as_deref()),
            (Some("/var/tmp/layout"), Some("app"), Some("app"))
        );
        assert_eq!(l.name(), "layout");

        let l = parse("rel/dir");
        assert_eq!((l.dir.to_str(), l.reference.as_deref()), (Some("rel/dir"), None));
        let l = parse("/d:");
        assert_eq!((l.dir.to_str(), l.reference.as_deref()), (Some("/d"), None));
        // A reference may hold slashes (skopeo allows `oci:DIR:library/redis:7`).
        let l = parse("/d:library/redis:7");
        assert_eq!((l.name(), l.tag.as_deref()), ("library/redis".to_string(), Some("7")));

        let named = LayoutSource::parse(
            "/images:redis:v1",
            SourceOptions { name: Some("team/redis".into()), ..SourceOptions::default() },
        )
        .unwrap();
        assert_eq!(named.name(), "team/redis");

        let e = LayoutSource::parse(":app", SourceOptions::default()).unwrap_err().to_string();
        assert!(e.contains("oci::app") && e.contains("empty OCI layout directory"), "{e}");
    }
}
