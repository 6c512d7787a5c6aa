//! What the upstream registry says about a caller: the Starlight endpoints never decide access
//! themselves. Each check is an ordinary registry call made with the caller's own `Authorization`,
//! so the registry's policy (htpasswd, a token service, Harbor's projects) is the only policy.

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use starlight_converter::source::MAX_MANIFEST;
use starlight_format::Digest;

use crate::body::{Body, empty};
use crate::error::GatewayError;
use crate::proxy::Proxy;

/// A manifest as the upstream served it to the caller.
#[derive(Debug)]
pub struct Manifest {
    pub bytes: Bytes,
    pub media_type: Option<String>,
    pub digest: Digest,
}

/// The upstream's refusal, passed back to the caller as it is (status, challenge, body).
pub type Refusal = Response<Body>;

fn request(method: Method, path: &str, auth: Option<&HeaderValue>) -> Result<Request<Body>, GatewayError> {
    let mut b = Request::builder().method(method).uri(path);
    if let Some(a) = auth {
        b = b.header(header::AUTHORIZATION, a.clone());
    }
    b.body(empty()).map_err(|e| GatewayError::Internal(format!("building {path}: {e}")))
}

// Every manifest type the converter reads (a test below keeps them in step).
const ACCEPT_MANIFESTS: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, \
     application/vnd.docker.distribution.manifest.list.v2+json, \
     application/vnd.docker.distribution.manifest.v2+json";

fn accept_manifests() -> HeaderValue {
    HeaderValue::from_static(ACCEPT_MANIFESTS)
}

/// GETs `name`'s manifest `reference` as the caller. A refusal (401, 403, 404, ...) comes back as
/// the upstream's own response.
pub async fn get_manifest(
    proxy: &Proxy,
    name: &str,
    reference: &str,
    auth: Option<&HeaderValue>,
) -> Result<Result<Manifest, Refusal>, GatewayError> {
    let mut req = request(Method::GET, &format!("/v2/{name}/manifests/{reference}"), auth)?;
    req.headers_mut().insert(header::ACCEPT, accept_manifests());
    let resp = proxy.forward(req).await?;
    if !resp.status().is_success() {
        return Ok(Err(resp));
    }
    let media_type = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|s| s.split(';').next().unwrap_or("").trim().to_string())
        .filter(|s| !s.is_empty() && s != "application/json");
    let bytes = crate::body::collect_capped(resp.into_body(), MAX_MANIFEST as usize).await.map_err(|e| {
        GatewayError::UpstreamUnreachable(format!("reading manifest {name}:{reference}: {e}"))
    })?;
    let digest = Digest::of(&bytes);
    if let Ok(want) = reference.parse::<Digest>()
        && want != digest
    {
        return Err(GatewayError::UpstreamUnreachable(format!(
            "the upstream served manifest {name}@{want} with digest {digest}"
        )));
    }
    Ok(Ok(Manifest { bytes, media_type, digest }))
}

/// True if the caller may pull `name@digest` (a HEAD of the manifest succeeds).
pub async fn may_pull(
    proxy: &Proxy,
    name: &str,
    digest: &Digest,
    auth: Option<&HeaderValue>,
) -> Result<bool, GatewayError> {
    let mut req = request(Method::HEAD, &format!("/v2/{name}/manifests/{digest}"), auth)?;
    req.headers_mut().insert(header::ACCEPT, accept_manifests());
    Ok(proxy.forward(req).await?.status().is_success())
}

/// Checks that the caller may read blob `digest` in repository `name` (a HEAD of the blob as the
/// caller succeeds). Registries link blobs per repository, so this is the caller's right to the
/// bytes, not merely to some repository that holds them. A refusal comes back as the upstream's
/// own response.
pub async fn may_read_blob(
    proxy: &Proxy,
    name: &str,
    digest: &Digest,
    auth: Option<&HeaderValue>,
) -> Result<Result<(), Refusal>, GatewayError> {
    let resp = proxy.forward(request(Method::HEAD, &format!("/v2/{name}/blobs/{digest}"), auth)?).await?;
    let status = resp.status();
    // A redirect to the blob's storage is the registry's yes.
    if status.is_success() || status.is_redirection() {
        return Ok(Ok(()));
    }
    // A HEAD's answer has no body: the caller gets the status and challenge with an error body.
    let code = match status {
        StatusCode::UNAUTHORIZED => "UNAUTHORIZED",
        StatusCode::FORBIDDEN => "DENIED",
        StatusCode::NOT_FOUND => "BLOB_UNKNOWN",
        _ => "UNKNOWN",
    };
    let message = format!("the registry refused blob {digest} of {name} to the caller ({status})");
    let mut refusal = crate::error::oci_error(status, code, &message);
    if let Some(challenge) = resp.headers().get(header::WWW_AUTHENTICATE) {
        refusal.headers_mut().insert(header::WWW_AUTHENTICATE, challenge.clone());
    }
    Ok(Err(refusal))
}

/// HEADs at once (a few at a time) in which the caller may read each of `blobs` in `name`;
/// the first refusal, if any.
pub async fn may_read_blobs(
    proxy: &Proxy,
    name: &str,
    blobs: impl IntoIterator<Item = Digest>,
    auth: Option<&HeaderValue>,
) -> Result<Result<(), Refusal>, GatewayError> {
    use futures::StreamExt;
    let mut unique: Vec<Digest> = blobs.into_iter().collect();
    unique.sort();
    unique.dedup();
    let mut checks = futures::stream::iter(unique)
        .map(|d| async move { (d, may_read_blob(proxy, name, &d, auth).await) })
        .buffer_unordered(BLOB_CHECKS);
    while let Some((d, r)) = checks.next().await {
        if let Err(refusal) = r? {
            tracing::debug!(%name, blob = %d, status = %refusal.status(), "blob refused to the caller");
            return Ok(Err(refusal));
        }
    }
    Ok(Ok(()))
}

/// Blob HEADs in flight per request.
const BLOB_CHECKS: usize = 16;

/// Checks that the caller may push to `name`: starts a blob upload as the caller and cancels it at
/// once (the registry's own test of push rights; nothing is written).
pub async fn may_push(
    proxy: &Proxy,
    name: &str,
    auth: Option<&HeaderValue>,
) -> Result<Result<(), Refusal>, GatewayError> {
    let resp = proxy.forward(request(Method::POST, &format!("/v2/{name}/blobs/uploads/"), auth)?).await?;
    if resp.status() != StatusCode::ACCEPTED {
        return Ok(Err(resp));
    }
    if let Some(loc) = resp.headers().get(header::LOCATION).and_then(|v| v.to_str().ok()) {
        // The proxy made the location relative to the gateway; a foreign one is not ours to cancel.
        if loc.starts_with('/') {
            let cancelled = proxy.forward(request(Method::DELETE, loc, auth)?).await;
            if let Err(e) = cancelled {
                tracing::warn!(%name, error = %e, "cancelling the push-rights probe upload failed");
            }
        }
    }
    Ok(Ok(()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use starlight_converter::source::{DOCKER_LIST, DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST};

    #[test]
    fn accept_lists_every_manifest_type() {
        let a = ACCEPT_MANIFESTS;
        for t in [OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST] {
            assert!(a.contains(t), "{t}");
        }
    }
}
