//! The gateway's Starlight endpoints, as the worker calls them.

use std::path::{Path, PathBuf};
use std::time::Duration;

use starlight_format::Digest;

use crate::store::Reference;

/// A failed call to the gateway.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{url}: {why}")]
    Http { url: String, why: String },
    #[error("{url}: the gateway answered {status}: {message}")]
    Refused { url: String, status: u16, message: String },
}

/// The longest wait for the gateway's answer (it converts an image before its first bundle).
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(1800);
/// How long a response body may stall, by default, before the transfer counts as cut.
pub const STALL_TIMEOUT: Duration = Duration::from_secs(60);

/// The next piece of a response body; an error when the body stalls for `stall`.
pub async fn next_chunk<S>(stream: &mut S, stall: Duration) -> Option<Result<bytes::Bytes, String>>
where
    S: futures::Stream<Item = reqwest::Result<bytes::Bytes>> + Unpin,
{
    use futures::StreamExt;
    match tokio::time::timeout(stall, stream.next()).await {
        Ok(c) => c.map(|r| r.map_err(|e| describe(&e))),
        Err(_) => Some(Err(format!("nothing received for {} s: the transfer stalled", stall.as_secs()))),
    }
}

/// A transport error as one line: its causes, innermost last, without the URL repeated.
pub fn describe(e: &reqwest::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut cur: Option<&dyn std::error::Error> = std::error::Error::source(e);
    while let Some(c) = cur {
        let s = c.to_string();
        if !parts.iter().any(|p| p.contains(&s)) {
            parts.push(s);
        }
        cur = c.source();
    }
    if parts.is_empty() {
        let mut e = e.to_string();
        if let Some(i) = e.find(" for url (") {
            e.truncate(i);
        }
        parts.push(e);
    }
    parts.join(": ")
}

/// How the worker reaches the gateway, beyond its URL.
#[derive(Clone, Debug, Default)]
pub struct GatewayOptions {
    /// `USER:PASSWORD` for HTTP Basic (see [`Gateway`]).
    pub credentials: Option<String>,
    /// PEM file of CA certificates trusted for `https://` gateways besides the system's roots.
    pub ca_file: Option<PathBuf>,
    /// Send credentials over plain `http://` to hosts other than loopback (anyone on the path
    /// reads them). Off by default: such a gateway is refused before any connection.
    pub allow_plain_http_credentials: bool,
}

/// The flag that lets credentials go over plain HTTP, as error messages name it.
pub const ALLOW_PLAIN_HTTP_CREDENTIALS: &str = "--allow-plain-http-credentials";

/// Whether credentials sent to `url` stay private: `https://`, or plain `http://` to a loopback
/// host (127.0.0.0/8, ::1, `localhost`), which never leaves the machine.
pub fn keeps_credentials_private(url: &str) -> bool {
    let Ok(u) = reqwest::Url::parse(url) else { return false };
    match u.scheme() {
        "https" => true,
        "http" => match u.host_str() {
            Some(h) => {
                let h = h.trim_start_matches('[').trim_end_matches(']');
                match h.parse::<std::net::IpAddr>() {
                    Ok(ip) => ip.is_loopback(),
                    Err(_) => h.trim_end_matches('.').eq_ignore_ascii_case("localhost"),
                }
            }
            None => false,
        },
        _ => false,
    }
}

/// Refuses to send credentials to `url` (named `what` in the message) over plain HTTP to anything
/// but loopback, unless allowed.
pub fn check_credentials_transport(what: &str, url: &str, allow: bool) -> Result<(), String> {
    if allow || keeps_credentials_private(url) {
        return Ok(());
    }
    Err(format!(
        "{what} {url}: refusing to send credentials over plain HTTP to a host that is not loopback \
         (anyone on the path could read them); use https://, or pass {ALLOW_PLAIN_HTTP_CREDENTIALS} \
         to send them anyway"
    ))
}

/// The CA certificates of a PEM file.
fn read_ca_file(path: &Path) -> Result<Vec<reqwest::Certificate>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("CA file {}: {e}", path.display()))?;
    let certs = reqwest::Certificate::from_pem_bundle(&pem)
        .map_err(|e| format!("CA file {}: {}", path.display(), describe(&e)))?;
    if certs.is_empty() {
        return Err(format!("CA file {}: no PEM certificate in it", path.display()));
    }
    Ok(certs)
}

/// Where the gateway is and who the worker is to it.
#[derive(Clone, Debug)]
pub struct Gateway {
    base: String,
    /// `user:password` for HTTP Basic, passed on to the registry's checks, or traded for bearer
    /// tokens when the registry behind the gateway uses a token service.
    credentials: Option<(String, String)>,
    http: reqwest::Client,
    allow_plain_http_credentials: bool,
    stall: Duration,
    /// Bearer tokens by repository, once the registry's challenge asked for them.
    tokens: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, String>>>,
}

/// The parameters of a `Bearer` challenge (`realm`, `service`, `scope`).
fn bearer_challenge(h: &str) -> Option<std::collections::HashMap<String, String>> {
    let (scheme, params) = starlight_format::auth::parse_challenge(h);
    let params: std::collections::HashMap<String, String> = params.into_iter().collect();
    (starlight_format::auth::is_scheme(&scheme, "Bearer") && params.contains_key("realm")).then_some(params)
}

/// The repository a gateway URL is about (`/v2/<name>/_starlight/...`, `/v2/<name>/manifests/...`).
fn repository_of(url: &str) -> Option<String> {
    let path = url.split_once("/v2/")?.1;
    let path = path.split('?').next()?;
    ["/_starlight/", "/manifests/", "/blobs/"]
        .iter()
        .find_map(|m| path.find(m).map(|i| path[..i].to_string()))
}

/// Sent and ignored `have` images, as the gateway counted them.
#[derive(Clone, Debug, Default)]
pub struct BundleInfo {
    pub image: Option<Digest>,
    pub contents: Option<u64>,
    pub content_bytes: Option<u64>,
    pub length: Option<u64>,
}

impl Gateway {
    /// `base` is the gateway's URL (`http://host:port`); `credentials` is `user:password`.
    pub fn new(base: &str, credentials: Option<&str>) -> Result<Gateway, String> {
        Gateway::with_options(
            base,
            &GatewayOptions { credentials: credentials.map(str::to_string), ..GatewayOptions::default() },
        )
    }

    /// `base` is the gateway's URL (`http[s]://host:port`). Credentials for a plain-HTTP gateway
    /// that is not loopback are refused here, before any connection, unless allowed.
    pub fn with_options(base: &str, opts: &GatewayOptions) -> Result<Gateway, String> {
        let base = base.trim_end_matches('/').to_string();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(format!("gateway {base:?}: not an http:// or https:// URL"));
        }
        let credentials = match &opts.credentials {
            Some(c) => {
                let (u, p) = c.split_once(':').ok_or("credentials must be USER:PASSWORD")?;
                check_credentials_transport("gateway", &base, opts.allow_plain_http_credentials)?;
                Some((u.to_string(), p.to_string()))
            }
            None => None,
        };
        // No read timeout here: the first answer for an image not converted yet comes only after
        // its conversion. The answer is bounded by `ANSWER_TIMEOUT`, and a stalled body by the
        // stall timeout (see `next_chunk`).
        let mut http = reqwest::Client::builder().connect_timeout(Duration::from_secs(10));
        if let Some(path) = &opts.ca_file {
            // Added to the system's roots, which stay trusted.
            http = http.tls_certs_merge(read_ca_file(path)?);
        }
        let http = http.build().map_err(|e| format!("HTTP client: {}", describe(&e)))?;
        Ok(Gateway {
            base,
            credentials,
            http,
            allow_plain_http_credentials: opts.allow_plain_http_credentials,
            stall: STALL_TIMEOUT,
            tokens: Default::default(),
        })
    }

    /// A body that stalls this long counts as cut (default [`STALL_TIMEOUT`]).
    pub fn with_stall_timeout(mut self, stall: Duration) -> Gateway {
        self.stall = stall;
        self
    }

    pub fn stall_timeout(&self) -> Duration {
        self.stall
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    fn auth(&self, req: reqwest::RequestBuilder, repo: Option<&str>) -> reqwest::RequestBuilder {
        if let Some(t) = repo.and_then(|r| self.tokens.lock().unwrap().get(r).cloned()) {
            return req.bearer_auth(t);
        }
        match &self.credentials {
            Some((u, p)) => req.basic_auth(u, Some(p)),
            None => req,
        }
    }

    /// A token from the registry's token service for the challenge's scope, with our credentials
    /// (anonymous without them).
    async fn token(
        &self,
        url: &str,
        challenge: &std::collections::HashMap<String, String>,
    ) -> Result<String, ClientError> {
        let realm = &challenge["realm"];
        if self.credentials.is_some() {
            check_credentials_transport("token service", realm, self.allow_plain_http_credentials)
                .map_err(|why| ClientError::Http { url: url.to_string(), why })?;
        }
        let mut req = self.http.get(realm).timeout(Duration::from_secs(60));
        let mut query: Vec<(&str, &str)> = Vec::new();
        for k in ["service", "scope"] {
            if let Some(v) = challenge.get(k) {
                query.push((k, v));
            }
        }
        req = req.query(&query);
        if let Some((u, p)) = &self.credentials {
            req = req.basic_auth(u, Some(p));
        }
        let refused = |why: String| ClientError::Http {
            url: url.to_string(),
            why: format!("token service {realm}: {why}"),
        };
        let resp = req.send().await.map_err(|e| refused(describe(&e)))?;
        if !resp.status().is_success() {
            return Err(refused(format!("answered {}", resp.status())));
        }
        let v: serde_json::Value = resp.json().await.map_err(|e| refused(describe(&e)))?;
        v.get("token")
            .or_else(|| v.get("access_token"))
            .and_then(|t| t.as_str())
            .map(str::to_string)
            .ok_or_else(|| refused("no token in its answer".into()))
    }

    async fn send(
        &self,
        url: String,
        req: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, ClientError> {
        let repo = repository_of(&url);
        let again = req.try_clone();
        let mut resp = self
            .auth(req, repo.as_deref())
            .send()
            .await
            .map_err(|e| ClientError::Http { url: url.clone(), why: describe(&e) })?;
        // The registry behind the gateway uses a token service (Docker Hub, Harbor): trade the
        // credentials for a token of the scope it asks for, and ask again once.
        let challenge = resp
            .headers()
            .get(reqwest::header::WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .and_then(bearer_challenge);
        if resp.status() == reqwest::StatusCode::UNAUTHORIZED
            && let (Some(challenge), Some(again), Some(repo)) = (challenge, again, repo)
        {
            let token = self.token(&url, &challenge).await?;
            self.tokens.lock().unwrap().insert(repo, token.clone());
            resp = again
                .bearer_auth(token)
                .send()
                .await
                .map_err(|e| ClientError::Http { url: url.clone(), why: describe(&e) })?;
        }
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status().as_u16();
        let body = resp.text().await.unwrap_or_default();
        // OCI error bodies carry the reason; show it rather than the JSON.
        let message = serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| {
                let e = v.get("errors")?.get(0)?.clone();
                Some(format!(
                    "{} {}",
                    e.get("code").and_then(|c| c.as_str()).unwrap_or(""),
                    e.get("message").and_then(|c| c.as_str()).unwrap_or("")
                ))
            })
            .unwrap_or_else(|| body.chars().take(500).collect());
        Err(ClientError::Refused { url, status, message })
    }

    /// Asks for the bundle of `image`, without the contents of `have` images and the `held`
    /// contents.
    pub async fn bundle(
        &self,
        image: &Reference,
        have: &[String],
        held: &[Digest],
        platform: Option<&str>,
    ) -> Result<(reqwest::Response, BundleInfo), ClientError> {
        let mut url = format!("{}/v2/{}/_starlight/bundle?to={}", self.base, image.name, image.reference);
        for h in have {
            url.push_str("&have=");
            url.push_str(h);
        }
        if let Some(p) = platform {
            url.push_str("&platform=");
            url.push_str(p);
        }
        let req = if held.is_empty() {
            self.http.get(&url)
        } else {
            let body: String = held.iter().map(|d| format!("{d}\n")).collect();
            self.http.post(&url).body(body)
        };
        let resp = self.send(url, req).await?;
        let h = resp.headers();
        let num = |k: &str| h.get(k).and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok());
        let info = BundleInfo {
            image: h.get("starlight-image").and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok()),
            contents: num("starlight-contents"),
            content_bytes: num("starlight-content-bytes"),
            length: resp.content_length(),
        };
        Ok((resp, info))
    }

    /// One content of `image`, out of band: a zstd stream of its bytes.
    pub async fn content(
        &self,
        image: &Reference,
        content: &Digest,
        platform: Option<&str>,
    ) -> Result<reqwest::Response, ClientError> {
        let mut url =
            format!("{}/v2/{}/_starlight/content/{content}?to={}", self.base, image.name, image.reference);
        if let Some(p) = platform {
            url.push_str("&platform=");
            url.push_str(p);
        }
        let req = self.http.get(&url);
        self.send(url, req).await
    }

    /// A manifest (`kind` = `manifests`) or blob (`blobs`) of repository `name`, through the
    /// gateway's pass-through to its registry, and its media type. At most `limit` bytes: this is
    /// for manifests and image configs, never layers.
    pub async fn registry_get(
        &self,
        name: &str,
        kind: &str,
        reference: &str,
        limit: usize,
    ) -> Result<(Vec<u8>, Option<String>), ClientError> {
        const ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
            application/vnd.oci.image.manifest.v1+json, \
            application/vnd.docker.distribution.manifest.list.v2+json, \
            application/vnd.docker.distribution.manifest.v2+json";
        let url = format!("{}/v2/{name}/{kind}/{reference}", self.base);
        let req = self.http.get(&url).header("accept", ACCEPT).timeout(Duration::from_secs(300));
        let mut resp = self.send(url.clone(), req).await?;
        let media_type = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .map(|v| v.split(';').next().unwrap_or(v).trim().to_string());
        let mut body = Vec::new();
        while let Some(chunk) =
            resp.chunk().await.map_err(|e| ClientError::Http { url: url.clone(), why: describe(&e) })?
        {
            if body.len() + chunk.len() > limit {
                return Err(ClientError::Http {
                    url,
                    why: format!("more than {limit} bytes: not a manifest or config"),
                });
            }
            body.extend_from_slice(&chunk);
        }
        Ok((body, media_type))
    }

    /// Sends a start-up trace (paths in first-use order) of image `digest` in `name`.
    pub async fn upload_trace(
        &self,
        name: &str,
        digest: &Digest,
        paths: &[Vec<u8>],
    ) -> Result<serde_json::Value, ClientError> {
        let url = format!("{}/v2/{name}/_starlight/traces?image={digest}", self.base);
        let mut body = Vec::new();
        for p in paths {
            body.push(b'/');
            body.extend_from_slice(p);
            body.push(b'\n');
        }
        let req = self.http.post(&url).body(body);
        let resp = self.send(url.clone(), req).await?;
        resp.json().await.map_err(|e| ClientError::Http { url, why: describe(&e) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_challenges_and_repositories() {
        let c = bearer_challenge(
            r#"Bearer realm="http://t:1/token",service="reg",scope="repository:a/b:pull,push",error="insufficient_scope""#,
        )
        .unwrap();
        assert_eq!(c["realm"], "http://t:1/token");
        assert_eq!(c["service"], "reg");
        assert_eq!(c["scope"], "repository:a/b:pull,push");
        assert!(bearer_challenge(r#"Basic realm="x""#).is_none());
        assert!(bearer_challenge("Bearer service=x").is_none());
        // Schemes are case-insensitive (RFC 7235; issue item 8).
        assert_eq!(bearer_challenge(r#"bearer realm="r""#).unwrap()["realm"], "r");
        assert_eq!(bearer_challenge("BEARER\trealm=r").unwrap()["realm"], "r");
        assert_eq!(repository_of("http://g/v2/a/b/_starlight/bundle?to=v1").as_deref(), Some("a/b"));
        assert_eq!(repository_of("http://g/v2/x/manifests/v1").as_deref(), Some("x"));
        assert_eq!(repository_of("http://g/v2/_starlight/notifications"), None);
    }

    #[test]
    fn credentials_go_over_plain_http_only_to_loopback() {
        for url in [
            "https://gw.example:8443",
            "http://127.0.0.1:8080",
            "http://127.5.6.7",
            "http://[::1]:80",
            "http://localhost:8080",
            "http://LOCALHOST.",
        ] {
            assert!(keeps_credentials_private(url), "{url}");
            assert!(Gateway::new(url, Some("u:p")).is_ok(), "{url}");
        }
        for url in ["http://10.0.0.1:1", "http://gw.example", "http://[::2]:80", "http://localhost.example"] {
            assert!(!keeps_credentials_private(url), "{url}");
            let e = Gateway::new(url, Some("u:p")).unwrap_err();
            assert!(e.contains(url) && e.contains(ALLOW_PLAIN_HTTP_CREDENTIALS), "{e}");
            // Without credentials, or when allowed, the gateway is usable.
            assert!(Gateway::new(url, None).is_ok(), "{url}");
            let opts = GatewayOptions {
                credentials: Some("u:p".into()),
                allow_plain_http_credentials: true,
                ..GatewayOptions::default()
            };
            assert!(Gateway::with_options(url, &opts).is_ok(), "{url}");
        }
    }

    #[test]
    fn a_ca_file_without_certificates_is_refused_with_its_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.pem");
        let opts = |p: &Path| GatewayOptions { ca_file: Some(p.into()), ..GatewayOptions::default() };
        let e = Gateway::with_options("https://127.0.0.1:1", &opts(&path)).unwrap_err();
        assert!(e.contains("ca.pem"), "{e}");
        std::fs::write(&path, "no pem here").unwrap();
        let e = Gateway::with_options("https://127.0.0.1:1", &opts(&path)).unwrap_err();
        assert!(e.contains("ca.pem") && e.contains("no PEM certificate"), "{e}");
    }
}
