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

impl ConvertError {
    pub(crate) fn io(path: impl std::fmt::Display) -> impl FnOnce(std::io::Error) -> ConvertError {
        let path = path.to_string();
        move |source| ConvertError::Io { path, source }
    }
}
