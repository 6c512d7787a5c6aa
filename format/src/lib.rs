#![doc = include_str!("../README.md")]
//!
//! # Layout
//! - [`digest`]: [`Digest`] (SHA-256 in OCI text form) and an incremental [`Hasher`].
//! - [`wire`]: the varint and byte-string primitives every record is built from.
//! - [`path`]: path normalization; a TOC holds only normalized paths.
//! - [`toc`]: [`Toc`], [`Entry`] and [`Kind`]: the table of contents of one converted layer.
//! - [`bundle`]: the delta bundle stream: [`bundle::encode_header`], [`bundle::chunk_prefix`],
//!   [`bundle::encode_trailer`], and the verifying sans-I/O [`bundle::Decoder`].
//! - [`auth`]: registries' `WWW-Authenticate` challenges, base64 for HTTP Basic.
//! - [`flatten`]: applying layers with OCI semantics into one filesystem.
//! - [`records`]: the index records ([`ContentLocation`], [`LayerRecord`], [`ImageRecord`]) and
//!   the object-store keys.

pub mod auth;
pub mod bundle;
pub mod digest;
pub mod flatten;
pub mod path;
pub mod records;
pub mod toc;
pub mod wire;

pub use digest::{Digest, Hasher};
pub use records::{
    CHUNK_SIZE, ContentLocation, Frame, ImageLayer, ImageRecord, LayerRecord, MAX_LAYERS, Platform, blob_key,
    toc_key,
};
pub use toc::{Entry, Kind, Toc};

/// What can be wrong with bytes that claim to be in a Starlight format.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FormatError {
    #[error("malformed {what} at byte {offset}")]
    Malformed { what: &'static str, offset: usize },
    #[error("not a Starlight {what} (bad magic)")]
    BadMagic { what: &'static str },
    #[error("unsupported {what} version {version}")]
    UnsupportedVersion { what: &'static str, version: u16 },
    #[error("invalid digest {0:?}: expected sha256:<64 lowercase hex>")]
    BadDigest(String),
    #[error("invalid platform {0:?}: expected os/arch[/variant]")]
    BadPlatform(String),
    #[error("invalid path {path:?}: {why}")]
    BadPath { path: String, why: &'static str },
    /// Refused on write as on read: a record past a limit is never written.
    #[error("{what}: {count} exceeds the limit of {max}")]
    OverLimit { what: &'static str, count: u64, max: u64 },
}
