//! Converts OCI image layers into Starlight seekable layers (see `starlight-format` for the bytes).
//!
//! # Layout
//! - [`convert`]: [`Converter`], which converts whole images and publishes them atomically.
//! - [`layer`]: the multi-threaded layer pipeline: tar (gzip, zstd, plain) -> seekable blob + TOC.
//! - [`source`]: [`Source`]: registries (`docker://`, anonymous/basic/bearer) and OCI layouts (`oci:`).
//! - [`store`]: the [`ObjectStore`] trait; local directory and S3 backends.
//! - [`index`]: the [`Index`] trait; embedded redb, Redis and Redis Cluster backends.
//! - [`content`]: reading contents back, verified against their digests.
//! - [`extract`]: writing a layer's entries to a directory, as extracting its tar would.

pub mod content;
pub mod convert;
mod error;
pub mod extract;
pub mod failed;
pub mod guard;
pub mod index;
pub mod layer;
pub mod source;
pub mod store;

pub use convert::{Converter, ImageOutcome, LayerOutcome};
pub use error::{BlobReadError, ConvertError};
pub use index::{AnyIndex, Index};
pub use source::{Source, SourceOptions};
pub use store::{AnyStore, ObjectStore};
