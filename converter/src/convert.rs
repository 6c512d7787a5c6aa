//! Converts whole images: resolves the manifest, skips layers already converted, converts the rest,
//! and publishes in an order that makes publication atomic:
//! blob -> TOC -> content locations -> layer record -> (all layers) -> image record and tag.
//!
//! A converted layer is reused only for the same compressed blob digest that produced it (what a
//! manifest names and the registry holds), never for a diffID a config merely claims.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use starlight_format::{ContentLocation, Digest, Frame, Hasher, ImageRecord, LayerRecord, blob_key, toc_key};
use tokio_util::io::SyncIoBridge;
use tracing::{debug, info};

use crate::ConvertError;
use crate::failed::FailedLayers;
use crate::index::Index;
use crate::layer::{ConvertedLayer, Expect, Options, convert_layer};
use crate::source::{ResolvedImage, Source};
use crate::store::ObjectStore;

/// How one layer went.
#[derive(Clone, Debug)]
pub struct LayerOutcome {
    pub record: LayerRecord,
    /// False when the layer was already converted and nothing was fetched.
    pub converted: bool,
    pub compressed_size: u64,
    pub uncompressed_size: u64,
    /// Bytes of new contents stored (blob) and TOC size, compressed.
    pub stored_bytes: u64,
    pub toc_bytes: u64,
}

/// How one image went.
#[derive(Clone, Debug)]
pub struct ImageOutcome {
    pub image: ImageRecord,
    pub layers: Vec<LayerOutcome>,
    pub seconds: f64,
}

/// The converter: a store, an index and the conversion options.
#[derive(Debug, Clone)]
pub struct Converter<S, I> {
    pub store: S,
    pub index: I,
    pub options: Options,
    /// Where temporary blobs are written before upload.
    pub tmp_dir: PathBuf,
    /// Layers that failed for good lately (shared by the converters of one process), answered at
    /// once instead of fetched again.
    pub failed_layers: Option<Arc<FailedLayers>>,
}

impl<S: ObjectStore + Clone + 'static, I: Index + Clone + 'static> Converter<S, I> {
    pub fn new(store: S, index: I, options: Options) -> Self {
        Converter { store, index, options, tmp_dir: std::env::temp_dir(), failed_layers: None }
    }

    /// Converts the image `source` points at and publishes it.
    pub async fn convert(&self, source: &Source) -> Result<ImageOutcome, ConvertError> {
        let started = Instant::now();
        let resolved = source.resolve().await?;
        // Every limit of the image record, checked before any layer is fetched: an image whose
        // record could not be written (or read back) is refused at once.
        resolved.record.check_limits().map_err(|e| ConvertError::BadImage {
            image: format!("{}@{}", resolved.record.name, resolved.record.manifest_digest),
            why: format!("cannot be converted: {e}"),
        })?;
        info!(image = %resolved.record.manifest_digest, name = %resolved.record.name, layers = resolved.record.layers.len(), "converting");
        let mut layers = Vec::new();
        for layer in &resolved.record.layers {
            layers.push(self.convert_image_layer(source, &resolved, layer).await?);
        }
        // Every layer record is durable now: publishing the image makes it visible at once.
        self.index.put_image(&resolved.record).await?;
        info!(image = %resolved.record.manifest_digest, "published");
        Ok(ImageOutcome { image: resolved.record, layers, seconds: started.elapsed().as_secs_f64() })
    }

    async fn convert_image_layer(
        &self,
        source: &Source,
        resolved: &ResolvedImage,
        layer: &starlight_format::ImageLayer,
    ) -> Result<LayerOutcome, ConvertError> {
        if let Some(record) = self.index.get_layer_from_blob(&layer.digest).await?
            && record.diff_id == layer.diff_id
        {
            debug!(blob = %layer.digest, diff_id = %layer.diff_id, "layer already converted");
            return Ok(LayerOutcome {
                record,
                converted: false,
                compressed_size: layer.size,
                uncompressed_size: 0,
                stored_bytes: 0,
                toc_bytes: 0,
            });
        }
        if let Some(why) = self.failed_layers.as_ref().and_then(|f| f.get(layer)) {
            debug!(blob = %layer.digest, "layer failed lately; not fetched again");
            return Err(ConvertError::BadLayer {
                layer: layer.digest.to_string(),
                entry: None,
                why: format!("{why} (remembered from a conversion that failed lately)"),
            });
        }
        let out = self.fetch_and_convert_layer(source, resolved, layer).await;
        if let (Err(e @ ConvertError::BadLayer { .. }), Some(f)) = (&out, &self.failed_layers) {
            f.remember(
                layer,
                &match e {
                    ConvertError::BadLayer { why, entry: Some(entry), .. } => {
                        format!("entry {entry:?}: {why}")
                    }
                    ConvertError::BadLayer { why, .. } => why.clone(),
                    _ => e.to_string(),
                },
            );
        }
        out
    }

    async fn fetch_and_convert_layer(
        &self,
        source: &Source,
        resolved: &ResolvedImage,
        layer: &starlight_format::ImageLayer,
    ) -> Result<LayerOutcome, ConvertError> {
        let compression =
            crate::source::compression_of(&layer.media_type).ok_or_else(|| ConvertError::BadImage {
                image: resolved.record.name.clone(),
                why: format!("layer {} has unsupported media type {:?}", layer.digest, layer.media_type),
            })?;
        let reader = source.open_blob(&layer.digest, layer.size).await?;
        let expect = Expect {
            name: layer.digest.to_string(),
            compression,
            digest: Some(layer.digest),
            diff_id: Some(layer.diff_id),
        };
        let opts = self.options.clone();
        let tmp = self.tmp_dir.clone();
        let converted = tokio::task::spawn_blocking(move || {
            convert_layer(SyncIoBridge::new(reader), &expect, &opts, &tmp)
        })
        .await
        .map_err(|e| ConvertError::BadLayer {
            layer: layer.digest.to_string(),
            entry: None,
            why: format!("converter task failed: {e}"),
        })??;
        self.publish_layer(converted).await
    }

    /// Converts a layer from any reader (tests, tools) and publishes it; returns its record.
    pub async fn convert_layer_from(
        &self,
        reader: impl Read + Send + 'static,
        expect: Expect,
    ) -> Result<LayerOutcome, ConvertError> {
        // Reused only for the blob that produced it (and the diffID asked for, if any).
        if let Some(blob) = &expect.digest
            && let Some(record) = self.index.get_layer_from_blob(blob).await?
            && expect.diff_id.is_none_or(|want| want == record.diff_id)
        {
            return Ok(LayerOutcome {
                record,
                converted: false,
                compressed_size: 0,
                uncompressed_size: 0,
                stored_bytes: 0,
                toc_bytes: 0,
            });
        }
        let opts = self.options.clone();
        let tmp = self.tmp_dir.clone();
        let name = expect.name.clone();
        let converted = tokio::task::spawn_blocking(move || convert_layer(reader, &expect, &opts, &tmp))
            .await
            .map_err(|e| ConvertError::BadLayer {
                layer: name,
                entry: None,
                why: format!("converter task failed: {e}"),
            })??;
        self.publish_layer(converted).await
    }

    /// Stores a converted layer: drops contents stored elsewhere, uploads blob and TOC, then records
    /// contents and finally the layer itself, under its diffID and under the compressed blob digest
    /// it was converted from (hashed while converting), by which alone it is reused.
    async fn publish_layer(&self, layer: ConvertedLayer) -> Result<LayerOutcome, ConvertError> {
        let diff_id = layer.toc.diff_id;
        let source = layer.compressed_digest;
        let digests: Vec<Digest> = layer.contents.iter().map(|c| c.digest).collect();
        let existing = self.index.get_contents(&digests).await?;
        let keep: Vec<bool> = existing.iter().map(Option::is_none).collect();
        let ConvertedLayer { toc, blob, contents, compressed_size, uncompressed_size, .. } = layer;

        // Compact the blob if some contents turned out to be stored already, and hash it.
        let (blob, kept) =
            tokio::task::spawn_blocking(move || finish_blob(blob, contents, &keep))
                .await
                .map_err(|e| ConvertError::Io { path: "blob".into(), source: std::io::Error::other(e) })??;

        let mut stored_bytes = 0;
        let blob_digest = match &blob {
            Some(b) => {
                let key = blob_key(&b.digest);
                if self.store.size(&key).await? != Some(b.size) {
                    self.store.put_file(&key, b.file.path()).await?;
                }
                stored_bytes = b.size;
                Some(b.digest)
            }
            None => None,
        };

        let encoded = toc.encode();
        let toc_digest = Digest::of(&encoded);
        let toc_key = toc_key(&toc_digest);
        let compressed = zstd::bulk::compress(&encoded, 3).map_err(ConvertError::io("TOC compression"))?;
        let toc_bytes = compressed.len() as u64;
        if self.store.size(&toc_key).await?.is_none() {
            self.store.put_bytes(&toc_key, Bytes::from(compressed)).await?;
        }

        if let Some(blob_digest) = blob_digest {
            let locations: Vec<(Digest, ContentLocation)> = kept
                .into_iter()
                .map(|(digest, size, frames)| (digest, ContentLocation { blob: blob_digest, size, frames }))
                .collect();
            for batch in locations.chunks(1000) {
                self.index.put_contents(batch).await?;
            }
        }

        let (mut files, mut content_bytes) = (0, 0);
        for e in &toc.entries {
            if let starlight_format::Kind::File { size, .. } = e.kind
                && size > 0
            {
                files += 1;
                content_bytes += size;
            }
        }
        let record = LayerRecord {
            diff_id,
            toc: toc_digest,
            blob: blob_digest,
            blob_size: stored_bytes,
            entries: toc.entries.len() as u64,
            files,
            content_bytes,
        };
        self.index.put_layer(&record).await?;
        self.index.put_layer_from_blob(&source, &record).await?;
        info!(%diff_id, entries = record.entries, stored_bytes, toc_bytes, "layer converted");
        Ok(LayerOutcome {
            record,
            converted: true,
            compressed_size,
            uncompressed_size,
            stored_bytes,
            toc_bytes,
        })
    }

    /// Reads and decodes a layer's TOC from the store, checking its digest.
    pub async fn load_toc(&self, record: &LayerRecord) -> Result<starlight_format::Toc, ConvertError> {
        load_toc(&self.store, record).await
    }
}

/// Reads and decodes a layer's TOC from the store, checking its digest.
pub async fn load_toc(
    store: &impl ObjectStore,
    record: &LayerRecord,
) -> Result<starlight_format::Toc, ConvertError> {
    let key = toc_key(&record.toc);
    let compressed = store.get(&key, 1 << 30).await?;
    let bad = |why: String| ConvertError::Content { digest: record.toc, why };
    let mut encoded = Vec::new();
    zstd::stream::read::Decoder::new(&compressed[..])
        .and_then(|d| d.take(4 << 30).read_to_end(&mut encoded))
        .map_err(|e| bad(format!("TOC {key} does not decompress: {e}")))?;
    if Digest::of(&encoded) != record.toc {
        return Err(bad(format!("TOC {key} does not match its digest")));
    }
    Ok(starlight_format::Toc::decode(&encoded)?)
}

type Kept = Vec<(Digest, u64, Vec<Frame>)>;

/// The blob a layer stores: its temporary file, digest and size.
struct FinalBlob {
    file: tempfile::NamedTempFile,
    digest: Digest,
    size: u64,
}

/// Returns the final blob, or none if no content is new, and the kept contents with frame offsets
/// in the final blob.
fn finish_blob(
    blob: tempfile::NamedTempFile,
    contents: Vec<crate::layer::PendingContent>,
    keep: &[bool],
) -> Result<(Option<FinalBlob>, Kept), ConvertError> {
    let path = blob.path().display().to_string();
    let io = |e| ConvertError::io(&path)(e);
    let n_keep = keep.iter().filter(|k| **k).count();
    if n_keep == 0 {
        return Ok((None, Vec::new()));
    }
    let mut hasher = Hasher::new();
    if n_keep == contents.len() {
        let mut f = blob.reopen().map_err(io)?;
        let size = hash_copy(&mut f, u64::MAX, &mut hasher, None).map_err(io)?;
        let kept = contents.into_iter().map(|c| (c.digest, c.size, c.frames)).collect();
        return Ok((Some(FinalBlob { file: blob, digest: hasher.finish(), size }), kept));
    }
    // Copy only the kept contents' frames into a new file, renumbering offsets.
    let dir = blob.path().parent().map(|p| p.to_path_buf()).unwrap_or_else(std::env::temp_dir);
    let mut out = tempfile::NamedTempFile::new_in(dir).map_err(io)?;
    let mut src = blob.reopen().map_err(io)?;
    let mut pos = 0u64;
    let mut kept = Vec::with_capacity(n_keep);
    {
        let mut w = std::io::BufWriter::new(out.as_file_mut());
        for (c, _) in contents.into_iter().zip(keep).filter(|(_, k)| **k) {
            let first = c.frames[0].offset;
            let len: u64 = c.frames.iter().map(|f| u64::from(f.clen)).sum();
            src.seek(SeekFrom::Start(first)).map_err(io)?;
            hash_copy(&mut src, len, &mut hasher, Some(&mut w)).map_err(io)?;
            let frames = c.frames.iter().map(|f| Frame { offset: f.offset - first + pos, ..*f }).collect();
            kept.push((c.digest, c.size, frames));
            pos += len;
        }
        w.flush().map_err(io)?;
    }
    Ok((Some(FinalBlob { file: out, digest: hasher.finish(), size: pos }), kept))
}

fn hash_copy(
    src: &mut std::fs::File,
    len: u64,
    hasher: &mut Hasher,
    mut out: Option<&mut dyn Write>,
) -> std::io::Result<u64> {
    let mut buf = vec![0u8; 1 << 20];
    let mut done = 0u64;
    let mut src = src.take(len);
    loop {
        let n = src.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        if let Some(w) = out.as_mut() {
            w.write_all(&buf[..n])?;
        }
        done += n as u64;
    }
    if len != u64::MAX && done != len {
        return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "blob shorter than its frames"));
    }
    Ok(done)
}
