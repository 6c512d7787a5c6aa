//! The converter's error type: every failure names the image or layer, and the entry when there is one.

use starlight_format::{Digest, FormatError};

use crate::index::IndexError;
use crate::store::StoreError;

/// What went wrong converting an image or a layer.
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    /// The layer's bytes are bad: corrupt or truncated compression or tar, a digest mismatch, a cap
    /// exceeded. `entry` names the tar entry when the problem is in one.
    #[error("layer {layer}{}: {why}", entry.as_ref().map(|e| format!(", entry {e:?}")).unwrap_or_default())]
    BadLayer { layer: String, entry: Option<String>, why: String },
    #[error("image {image}: {why}")]
    BadImage { image: String, why: String },
    #[error("fetching {what} from {source_name}: {why}")]
    Fetch { source_name: String, what: String, why: String },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Index(#[from] IndexError),
    #[error("content {digest}: {why}")]
    Content { digest: Digest, why: String },
    #[error("local I/O on {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Format(#[from] FormatError),
}

/// Why a layer blob's byte stream failed. It travels inside the `std::io::Error` the stream returns
/// (through the decompressors and the sync bridge), so that the layer pipeline tells a source that
/// failed from a bad blob by type ([`BlobReadError::find`]), never by message text.
#[derive(Clone, Debug, thiserror::Error)]
pub enum BlobReadError {
    /// The source failed mid-stream: a connection cut by the registry, a local read error.
    #[error("reading blob {digest} from {source_name}: {why}")]
    Source { source_name: String, digest: Digest, why: String },
    /// The blob ends before the size its manifest declares.
    #[error("blob is {actual} bytes, shorter than the {declared} bytes the manifest declares")]
    Short { declared: u64, actual: u64 },
    /// The blob goes on past the size its manifest declares (nothing past it is read).
    #[error("blob is {}longer than the {declared} bytes the manifest declares", actual.map_or(String::new(), |n| format!("{n} bytes, ")))]
    Long { declared: u64, actual: Option<u64> },
}

impl BlobReadError {
    /// The `BlobReadError` an I/O error carries, looked for along its whole `source()` chain.
    pub fn find(e: &std::io::Error) -> Option<&BlobReadError> {
        let mut cur: Option<&(dyn std::error::Error + 'static)> = e.get_ref().map(|i| i as _);
        while let Some(err) = cur {
            if let Some(b) = err.downcast_ref::<BlobReadError>() {
                return Some(b);
            }
            cur = err.source();
        }
        None
    }

    /// The conversion error for layer `layer`: a failed source is a fetch failure (the gateway's
    /// 502), a size mismatch a bad layer.
    pub fn into_convert_error(self, layer: &str) -> ConvertError {
        match self {
            BlobReadError::Source { source_name, digest, why } => {
                ConvertError::Fetch { source_name, what: format!("layer blob {digest}"), why }
            }
            other => ConvertError::BadLayer { layer: layer.to_string(), entry: None, why: other.to_string() },
        }
    }
}

impl ConvertError {
    pub(crate) fn io(path: impl std::fmt::Display) -> impl FnOnce(std::io::Error) -> ConvertError {
        let path = path.to_string();
        move |source| ConvertError::Io { path, source }
    }
}
