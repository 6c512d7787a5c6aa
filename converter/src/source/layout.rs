//! OCI image layouts on disk, as skopeo and umoci write them (`index.json` + `blobs/sha256/`).

use std::path::PathBuf;

use starlight_format::Digest;
use tokio::io::AsyncReadExt;

use super::{BlobReader, Descriptor, SourceOptions, ref_name};
use crate::ConvertError;

/// `oci:DIR[:TAG]`.
#[derive(Debug)]
pub struct LayoutSource {
    pub dir: PathBuf,
    pub tag: Option<String>,
    pub opts: SourceOptions,
}

#[derive(serde::Deserialize)]
struct IndexJson {
    manifests: Vec<Descriptor>,
}

impl LayoutSource {
    pub fn parse(rest: &str, opts: SourceOptions) -> Result<LayoutSource, ConvertError> {
        let (dir, tag) = match rest.rsplit_once(':') {
            Some((d, t)) if !t.contains('/') => (d, Some(t.to_string())),
            _ => (rest, None),
        };
        if dir.is_empty() {
            return Err(ConvertError::BadImage {
                image: rest.into(),
                why: "empty OCI layout directory".into(),
            });
        }
        Ok(LayoutSource { dir: PathBuf::from(dir), tag, opts })
    }

    pub(super) fn describe(&self) -> String {
        format!(
            "oci:{}{}",
            self.dir.display(),
            self.tag.as_ref().map(|t| format!(":{t}")).unwrap_or_default()
        )
    }

    pub(super) fn name(&self) -> String {
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
        let pick = match &self.tag {
            Some(tag) => index.manifests.iter().find(|d| ref_name(d) == Some(tag.as_str())),
            None if index.manifests.len() == 1 => index.manifests.first(),
            None => return Err(self.err("the layout holds several images: name a tag (oci:DIR:TAG)".into())),
        };
        let pick = pick.ok_or_else(|| {
            self.err(format!("no image tagged {:?} in index.json", self.tag.as_deref().unwrap_or("")))
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
