//! Repair of corrupt stored data: a bundle that finds a stored object bad (see
//! `stream::verify`) reports it here. The object is logged, counted and deleted; for a blob, the
//! content locations in it, the layer records that hold them and the image record go too, so that
//! the next request converts the image again from the registry. Batches and patches are simply
//! made again.

use std::sync::Arc;

use futures::FutureExt;
use starlight_converter::convert::load_toc;
use starlight_converter::{Index, ObjectStore};
use starlight_format::Digest;
use tracing::{error, info, warn};

use super::stream::{Bad, Corrupt, Report};
use super::{Backends, LOOKUP_BATCH, Starlight};
use crate::layers::metrics::KindLabel;

impl Starlight {
    /// The report of bundles of `image`.
    pub(super) fn reporter(self: &Arc<Self>, b: &Arc<Backends>, image: Digest) -> Report {
        let (me, b) = (self.clone(), b.clone());
        Arc::new(move |c: Corrupt| {
            let (me, b) = (me.clone(), b.clone());
            async move { me.repair(&b, &image, c).await }.boxed()
        })
    }

    /// Drops the bad object and what points to it; failures are logged (the next bundle that
    /// meets the object reports it again).
    pub(super) async fn repair(&self, b: &Backends, image: &Digest, c: Corrupt) {
        let key = c.bad.key();
        if matches!(c.bad, Bad::Unchecked) {
            error!(%image, why = %c.why, "bundle not verified; cut");
            return;
        }
        match &c.bad {
            Bad::Frames { content, offset, .. } => error!(
                %key, offset, %content, %image, why = %c.why,
                "stored frames corrupt; dropping the blob and converting the image again"
            ),
            Bad::Batch { content, .. } | Bad::Patch { content, .. } => error!(
                %key, %content, %image, why = %c.why, "stored object corrupt; dropping it to make it again"
            ),
            Bad::Missing { .. } => warn!(%key, %image, "stored object missing; dropping what names it"),
            Bad::Unlocated => warn!(%image, why = %c.why, "contents without a location; converting again"),
            Bad::Unchecked => {}
        }
        self.metrics.corrupt_objects.get_or_create(&KindLabel { kind: c.bad.kind() }).inc();
        // Plans and locations held in memory name the object: build them again.
        self.cache.forget(image);
        let blob = match &c.bad {
            Bad::Frames { blob, .. } => Some(*blob),
            Bad::Missing { key } => {
                key.strip_prefix("blobs/sha256/").and_then(|h| format!("sha256:{h}").parse::<Digest>().ok())
            }
            Bad::Batch { .. } | Bad::Patch { .. } | Bad::Unlocated | Bad::Unchecked => None,
        };
        if !key.is_empty()
            && let Err(e) = b.store.delete(&key).await
        {
            warn!(%key, error = %e, "corrupt object not deleted");
        }
        let drop_records = blob.is_some() || matches!(c.bad, Bad::Unlocated);
        if drop_records && let Err(e) = self.forget_blob(b, image, blob.as_ref()).await {
            warn!(%key, %image, error = %e, "index entries of a corrupt blob not dropped");
        }
    }

    /// Drops from the index the image's contents stored in `blob`, the layers holding them or
    /// contents without a location (dropped through another image), and the image itself.
    async fn forget_blob(&self, b: &Backends, image: &Digest, blob: Option<&Digest>) -> Result<(), String> {
        let Some(record) = b.index.get_image(image).await.map_err(|e| e.to_string())? else {
            return Ok(());
        };
        let (mut contents, mut layers) = (0, 0);
        for l in &record.layers {
            let Some(rec) = b.index.get_layer(&l.diff_id).await.map_err(|e| e.to_string())? else {
                continue;
            };
            let toc = match load_toc(&b.store, &rec).await {
                Ok(t) => Some(t),
                Err(e) => {
                    warn!(diff_id = %l.diff_id, error = %e, "layer TOC unreadable; dropping the layer");
                    None
                }
            };
            let mut bad = Vec::new();
            if let Some(toc) = &toc {
                let digests: Vec<Digest> = toc.content_digests().collect();
                for chunk in digests.chunks(LOOKUP_BATCH) {
                    let found = b.index.get_contents(chunk).await.map_err(|e| e.to_string())?;
                    bad.extend(
                        chunk
                            .iter()
                            .zip(found)
                            .filter(|(_, l)| l.as_ref().is_none_or(|l| Some(&l.blob) == blob))
                            .map(|(d, _)| *d),
                    );
                }
            }
            let holds_blob = blob.is_some_and(|x| rec.blob == Some(*x));
            if bad.is_empty() && !holds_blob && toc.is_some() {
                continue;
            }
            b.index.delete_contents(&bad).await.map_err(|e| e.to_string())?;
            b.index.delete_layer(&l.diff_id).await.map_err(|e| e.to_string())?;
            // The layer is reused by the blob that produced it: that link goes too.
            b.index.delete_layer_from_blob(&l.digest).await.map_err(|e| e.to_string())?;
            contents += bad.len();
            layers += 1;
        }
        b.index.delete_image(image).await.map_err(|e| e.to_string())?;
        info!(%image, blob = ?blob, contents, layers, "dropped from the index; the next request converts again");
        Ok(())
    }
}
