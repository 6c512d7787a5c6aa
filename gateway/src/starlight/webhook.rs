//! Push notifications: Distribution's notification endpoint (`events[]` with `action: push`) and
//! Harbor's webhook (`type: PUSH_ARTIFACT`). Every pushed manifest is converted in the background
//! for each configured platform, so that its first pull finds it converted. The answer comes at
//! once; the registry does not wait for conversions.

use std::sync::Arc;

use http::{HeaderValue, Request, Response, StatusCode, header};
use serde::Deserialize;
use starlight_converter::source::{DOCKER_LIST, DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST};
use starlight_format::Digest;
use tracing::{info, warn};

use super::Starlight;
use crate::body::{Body, full};
use crate::error::GatewayError;
use crate::route::valid_name;

const MAX_BODY: usize = 4 << 20;

#[derive(Deserialize)]
struct Envelope {
    #[serde(default)]
    events: Option<Vec<DistEvent>>,
    #[serde(default, rename = "type")]
    kind: Option<String>,
    #[serde(default)]
    event_data: Option<HarborData>,
}

#[derive(Deserialize)]
struct DistEvent {
    #[serde(default)]
    action: String,
    target: DistTarget,
}

#[derive(Deserialize)]
struct DistTarget {
    #[serde(default, rename = "mediaType")]
    media_type: String,
    #[serde(default)]
    digest: String,
    #[serde(default)]
    repository: String,
}

#[derive(Deserialize)]
struct HarborData {
    #[serde(default)]
    resources: Vec<HarborResource>,
    repository: HarborRepo,
}

#[derive(Deserialize)]
struct HarborResource {
    #[serde(default)]
    digest: String,
}

#[derive(Deserialize)]
struct HarborRepo {
    #[serde(default)]
    repo_full_name: String,
}

/// The pushed manifests a notification reports: (repository, digest).
fn pushed(env: Envelope) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for e in env.events.unwrap_or_default() {
        let manifest =
            [OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST].contains(&e.target.media_type.as_str());
        if e.action == "push" && manifest {
            out.push((e.target.repository, e.target.digest));
        }
    }
    if env.kind.as_deref() == Some("PUSH_ARTIFACT")
        && let Some(d) = env.event_data
    {
        for r in d.resources {
            out.push((d.repository.repo_full_name.clone(), r.digest));
        }
    }
    out
}

/// Compares in time independent of where the inputs differ.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The token of an `Authorization: Bearer TOKEN` header (the scheme in any case, RFC 7235), or "".
fn presented_token(headers: &http::HeaderMap) -> &str {
    let given = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).unwrap_or("");
    starlight_format::auth::credentials_for(given, "Bearer").unwrap_or("")
}

pub async fn handle(sl: Arc<Starlight>, req: Request<Body>) -> Result<Response<Body>, GatewayError> {
    let Some(token) = sl.webhook_token.clone() else {
        return Err(GatewayError::NotFound);
    };
    if req.method() != http::Method::POST {
        return Err(GatewayError::BadRequest("notifications are POSTed".into()));
    }
    if !same_secret(presented_token(req.headers()).as_bytes(), token.as_bytes()) {
        return Err(GatewayError::Unauthorized(
            "notifications need Authorization: Bearer <webhook_token>".into(),
        ));
    }
    let body = crate::body::collect_capped(req.into_body(), MAX_BODY)
        .await
        .map_err(|e| GatewayError::BadRequest(format!("reading the notification: {e}")))?;
    let env: Envelope = serde_json::from_slice(&body)
        .map_err(|e| GatewayError::BadRequest(format!("not a Distribution or Harbor notification: {e}")))?;
    let mut accepted = 0;
    for (repo, digest) in pushed(env) {
        let Ok(digest) = digest.parse::<Digest>() else {
            warn!(%repo, %digest, "notification with an invalid digest ignored");
            continue;
        };
        if !valid_name(&repo) {
            warn!(%repo, "notification with an invalid repository ignored");
            continue;
        }
        accepted += 1;
        let sl = sl.clone();
        tokio::spawn(async move { convert_pushed(sl, repo, digest).await });
    }
    let mut resp = Response::new(full(serde_json::json!({"accepted": accepted}).to_string()));
    *resp.status_mut() = StatusCode::OK;
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Ok(resp)
}

/// Converts `repo@digest` for every configured platform, as the gateway's own identity.
async fn convert_pushed(sl: Arc<Starlight>, repo: String, digest: Digest) {
    let auth = sl.credentials.as_ref().and_then(|c| HeaderValue::from_str(&c.basic_header()).ok());
    let b = match sl.backends().await {
        Ok(b) => b,
        Err(e) => {
            warn!(%repo, %digest, error = %e, "pushed image not converted");
            return;
        }
    };
    for platform in sl.platforms.clone() {
        let child = match sl.resolve(&repo, &digest.to_string(), &platform, auth.as_ref()).await {
            Ok(Ok(d)) => d,
            Ok(Err(refusal)) => {
                warn!(%repo, %digest, status = %refusal.status(), "pushed image not readable; set upstream_credentials");
                return;
            }
            Err(e) => {
                // An index without this platform is normal: nothing to convert for it.
                info!(%repo, %digest, %platform, error = %e, "pushed image not converted for this platform");
                continue;
            }
        };
        match sl.converted(&b, &repo, child, &platform, auth.as_ref()).await {
            Ok(r) => {
                let image = r.manifest_digest;
                info!(%repo, %image, %platform, "pushed image converted");
                if let Err(e) = sl.warm(&b, r).await {
                    warn!(%repo, %image, error = %e, "pushed image not prepared");
                }
            }
            Err(e) => warn!(%repo, %digest, %platform, error = %e, "pushed image conversion failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_distribution_and_harbor_pushes() {
        let dist = r#"{"events":[
            {"action":"push","target":{"mediaType":"application/vnd.oci.image.manifest.v1+json",
             "digest":"sha256:aa","repository":"app","tag":"v1"}},
            {"action":"push","target":{"mediaType":"application/octet-stream","digest":"sha256:bb","repository":"app"}},
            {"action":"pull","target":{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:cc","repository":"app"}}
        ]}"#;
        let got = pushed(serde_json::from_str(dist).unwrap());
        assert_eq!(got, vec![("app".to_string(), "sha256:aa".to_string())]);
        let harbor = r#"{"type":"PUSH_ARTIFACT","occur_at":1,"operator":"admin","event_data":{
            "resources":[{"digest":"sha256:dd","tag":"v2","resource_url":"h/p/app:v2"}],
            "repository":{"name":"app","namespace":"p","repo_full_name":"p/app","repo_type":"private"}}}"#;
        assert_eq!(pushed(serde_json::from_str(harbor).unwrap()), vec![("p/app".into(), "sha256:dd".into())]);
    }

    #[test]
    fn secrets_compare_whole() {
        assert!(same_secret(b"abc", b"abc"));
        assert!(!same_secret(b"abc", b"abd"));
        assert!(!same_secret(b"abc", b"ab"));
    }

    /// Issue item 8: `Authorization: bearer TOKEN` was refused (the scheme matched case-sensitively).
    #[test]
    fn the_bearer_scheme_is_case_insensitive() {
        let with = |v: &str| {
            let mut h = http::HeaderMap::new();
            h.insert(header::AUTHORIZATION, HeaderValue::from_str(v).unwrap());
            presented_token(&h).to_string()
        };
        assert_eq!(with("Bearer s3cret"), "s3cret");
        assert_eq!(with("bearer s3cret"), "s3cret");
        assert_eq!(with("BEARER s3cret"), "s3cret");
        assert_eq!(with("Basic s3cret"), "");
        assert_eq!(presented_token(&http::HeaderMap::new()), "");
    }
}
