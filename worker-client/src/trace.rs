//! Start-up traces: the order in which a container first used its files, recorded by the FUSE
//! filesystem, kept in the store, and sent to the gateway so later bundles follow it.

use starlight_format::Digest;

use crate::client::{ClientError, Gateway};
use crate::store::{Store, StoreError};

/// Keeps the trace of image `d` (paths relative to the root, first use first), replacing the last.
pub fn save(store: &Store, d: &Digest, paths: &[Vec<u8>]) -> Result<(), StoreError> {
    let mut data = Vec::new();
    for p in paths {
        data.extend_from_slice(p);
        data.push(b'\n');
    }
    let dest = store.trace_path(d);
    let tmp = dest.with_extension("tmp");
    std::fs::write(&tmp, &data).and_then(|()| std::fs::rename(&tmp, &dest)).map_err(|source| StoreError::Io {
        path: dest.display().to_string(),
        op: "write trace",
        source,
    })
}

/// The kept trace of image `d`, if any.
pub fn load(store: &Store, d: &Digest) -> Result<Option<Vec<Vec<u8>>>, StoreError> {
    let p = store.trace_path(d);
    match std::fs::read(&p) {
        Ok(data) => {
            Ok(Some(data.split(|&b| b == b'\n').filter(|l| !l.is_empty()).map(<[u8]>::to_vec).collect()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(StoreError::Io { path: p.display().to_string(), op: "read trace", source }),
    }
}

/// Sends the kept trace of image `d` of repository `name` to the gateway.
pub async fn upload(
    store: &Store,
    gw: &Gateway,
    name: &str,
    d: &Digest,
) -> Result<Option<serde_json::Value>, TraceError> {
    let Some(paths) = load(store, d)? else { return Ok(None) };
    Ok(Some(gw.upload_trace(name, d, &paths).await?))
}

#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Client(#[from] ClientError),
}
