//! The suite's HTTP client: one request in, one fully read response out.
//!
//! It answers `WWW-Authenticate` challenges (Basic, or Bearer through the token service) once per
//! request and then sends the same credentials up front; it follows redirects itself (any method
//! on 307/308, GET and HEAD on 301/302/303), dropping credentials when the origin changes, as Go's
//! client does for the official suite.

use std::collections::HashMap;
use std::fmt;
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use reqwest::header::{AUTHORIZATION, HeaderMap, LOCATION, WWW_AUTHENTICATE};
use reqwest::{Method, StatusCode, Url};
use sha2::{Digest, Sha256};

use super::OciConfig;
use super::auth::{Challenge, base64, parse_challenge};
use super::check::excerpt;

const MAX_REDIRECTS: usize = 10;
/// Bytes of a response body kept in memory; the rest is only counted and hashed.
const BODY_KEEP: usize = 16 << 20;

/// A request the suite could not complete; a response with any status is not an error.
#[derive(Debug)]
pub(crate) enum ClientError {
    BadUrl { url: String, why: String },
    Transport { what: String, source: reqwest::Error },
    Timeout { what: String, after: Duration },
    TooManyRedirects { what: String },
    Token { realm: String, why: String },
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientError::BadUrl { url, why } => write!(f, "bad URL {url}: {why}"),
            ClientError::Transport { what, source } => {
                write!(f, "{what}: {source}")?;
                let mut cause = std::error::Error::source(source);
                while let Some(c) = cause {
                    write!(f, ": {c}")?;
                    cause = c.source();
                }
                Ok(())
            }
            ClientError::Timeout { what, after } => write!(f, "{what}: no answer within {after:?}"),
            ClientError::TooManyRedirects { what } => {
                write!(f, "{what}: more than {MAX_REDIRECTS} redirects")
            }
            ClientError::Token { realm, why } => write!(f, "token from {realm}: {why}"),
        }
    }
}

impl std::error::Error for ClientError {}

/// One request; bodies are in memory so that auth retries and redirects can resend them.
#[derive(Debug, Clone)]
pub(crate) struct Req {
    method: Method,
    url: Url,
    headers: Vec<(&'static str, String)>,
    body: Option<Bytes>,
}

impl Req {
    pub(crate) fn header(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }

    pub(crate) fn query(mut self, key: &str, value: &str) -> Self {
        self.url.query_pairs_mut().append_pair(key, value);
        self
    }

    pub(crate) fn body(mut self, body: impl Into<Bytes>) -> Self {
        self.body = Some(body.into());
        self
    }

    fn describe(&self) -> String {
        format!("{} {}", self.method, excerpt(self.url.as_str().as_bytes(), 200))
    }
}

/// A response, its body read (up to [`BODY_KEEP`] bytes kept) and hashed.
#[derive(Debug)]
pub(crate) struct Resp {
    pub(crate) status: StatusCode,
    pub(crate) headers: HeaderMap,
    pub(crate) body: Bytes,
    pub(crate) body_len: u64,
    /// `sha256:…` of the whole body.
    pub(crate) body_digest: String,
    /// Where the final response came from, after redirects.
    pub(crate) url: Url,
    /// The request as first sent, e.g. `PATCH http://…/v2/…`.
    pub(crate) what: String,
}

impl Resp {
    pub(crate) fn code(&self) -> u16 {
        self.status.as_u16()
    }

    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// `Location`, resolved against the URL that answered.
    pub(crate) fn location(&self) -> Option<Url> {
        let raw = self.header(LOCATION.as_str())?;
        (!raw.is_empty()).then(|| self.url.join(raw).ok()).flatten()
    }
}

#[derive(Debug, Default)]
struct AuthState {
    /// The `Authorization` value sent up front to the registry's origin.
    current: Option<String>,
    /// Bearer tokens by scope, so alternating repositories does not refetch them.
    tokens: HashMap<String, String>,
}

#[derive(Debug)]
pub(crate) struct Client {
    http: reqwest::Client,
    base: Url,
    creds: Option<(String, String)>,
    auth_scope: Option<String>,
    timeout: Duration,
    auth: Mutex<AuthState>,
}

impl Client {
    pub(crate) fn new(config: &OciConfig) -> Result<Client, ClientError> {
        let bad = |why: String| ClientError::BadUrl { url: config.url.clone(), why };
        let base = Url::parse(config.url.trim_end_matches('/')).map_err(|e| bad(e.to_string()))?;
        if !matches!(base.scheme(), "http" | "https") || base.cannot_be_a_base() {
            return Err(bad("expected an http:// or https:// URL".into()));
        }
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .user_agent("starlight-conformance (distribution-spec-conformance-tests)")
            .connect_timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| ClientError::Transport { what: "build HTTP client".into(), source: e })?;
        let creds = match (&config.username, &config.password) {
            (None, None) => None,
            (u, p) => Some((u.clone().unwrap_or_default(), p.clone().unwrap_or_default())),
        };
        Ok(Client {
            http,
            base,
            creds,
            auth_scope: config.auth_scope.clone(),
            timeout: config.timeout,
            auth: Mutex::new(AuthState::default()),
        })
    }

    /// A request to `path` (starting with `/v2/`) under the configured root URL.
    pub(crate) fn req(&self, method: Method, path: &str) -> Req {
        let mut url = self.base.clone();
        let prefix = self.base.path().trim_end_matches('/');
        url.set_path(&format!("{prefix}{path}"));
        self.req_url(method, url)
    }

    /// A request to a URL a response handed out, such as an upload `Location`.
    pub(crate) fn req_url(&self, method: Method, url: Url) -> Req {
        Req { method, url, headers: Vec::new(), body: None }
    }

    /// The path a `/v2/…` path has under the configured root URL.
    pub(crate) fn full_path(&self, path: &str) -> String {
        format!("{}{path}", self.base.path().trim_end_matches('/'))
    }

    pub(crate) async fn send(&self, req: Req) -> Result<Resp, ClientError> {
        let what = req.describe();
        match tokio::time::timeout(self.timeout, self.exchange(req, what.clone())).await {
            Ok(r) => r,
            Err(_) => Err(ClientError::Timeout { what, after: self.timeout }),
        }
    }

    async fn exchange(&self, mut req: Req, what: String) -> Result<Resp, ClientError> {
        let mut challenged = false;
        for _ in 0..=MAX_REDIRECTS {
            let auth = self.auth_for(&req.url);
            let resp = self.once(&req, auth.as_deref(), &what).await?;
            let status = resp.status();
            let header = |name| resp.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
            if status == StatusCode::UNAUTHORIZED && !challenged && self.same_origin(&req.url) {
                challenged = true;
                if let Some(ch) = header(WWW_AUTHENTICATE).as_deref().and_then(parse_challenge)
                    && self.answer(&ch, auth.as_deref()).await?
                {
                    continue;
                }
            }
            let follow = match status.as_u16() {
                307 | 308 => true,
                301..=303 => matches!(req.method, Method::GET | Method::HEAD),
                _ => false,
            };
            if let Some(next) = header(LOCATION).filter(|_| follow).and_then(|l| req.url.join(&l).ok()) {
                req.url = next;
                continue;
            }
            return read(resp, what).await;
        }
        Err(ClientError::TooManyRedirects { what })
    }

    async fn once(
        &self,
        req: &Req,
        auth: Option<&str>,
        what: &str,
    ) -> Result<reqwest::Response, ClientError> {
        let mut b = self.http.request(req.method.clone(), req.url.clone());
        for (k, v) in &req.headers {
            b = b.header(*k, v);
        }
        if let Some(a) = auth {
            b = b.header(AUTHORIZATION, a);
        }
        // Empty bodies still go out, so that POST/PUT/PATCH carry `Content-Length: 0`.
        match (&req.body, &req.method) {
            (Some(body), _) => b = b.body(body.clone()),
            (None, &Method::POST | &Method::PUT | &Method::PATCH) => b = b.body(Bytes::new()),
            _ => {}
        }
        b.send().await.map_err(|e| ClientError::Transport { what: what.to_string(), source: e })
    }

    fn same_origin(&self, url: &Url) -> bool {
        url.origin() == self.base.origin()
    }

    fn auth_for(&self, url: &Url) -> Option<String> {
        if !self.same_origin(url) {
            return None;
        }
        self.auth.lock().ok().and_then(|a| a.current.clone())
    }

    /// Stores credentials that answer `ch`; false when there is nothing new to try.
    async fn answer(&self, ch: &Challenge, sent: Option<&str>) -> Result<bool, ClientError> {
        let value = match ch.scheme.as_str() {
            "basic" => match &self.creds {
                Some((u, p)) => format!("Basic {}", base64(format!("{u}:{p}").as_bytes())),
                None => return Ok(false),
            },
            "bearer" => {
                let scope = self.auth_scope.clone().or_else(|| ch.params.get("scope").cloned());
                let key = scope.clone().unwrap_or_default();
                let cached = self.auth.lock().ok().and_then(|a| a.tokens.get(&key).cloned());
                let token = match cached.filter(|t| sent != Some(format!("Bearer {t}").as_str())) {
                    Some(t) => t,
                    None => self.fetch_token(ch, scope.as_deref()).await?,
                };
                if let Ok(mut a) = self.auth.lock() {
                    a.tokens.insert(key, token.clone());
                }
                format!("Bearer {token}")
            }
            _ => return Ok(false),
        };
        if sent == Some(value.as_str()) {
            return Ok(false);
        }
        if let Ok(mut a) = self.auth.lock() {
            a.current = Some(value);
        }
        Ok(true)
    }

    async fn fetch_token(&self, ch: &Challenge, scope: Option<&str>) -> Result<String, ClientError> {
        let realm = ch.params.get("realm").cloned().unwrap_or_default();
        let err = |why: String| ClientError::Token { realm: realm.clone(), why };
        let mut url = Url::parse(&realm).map_err(|e| err(format!("bad realm: {e}")))?;
        if let Some(service) = ch.params.get("service") {
            url.query_pairs_mut().append_pair("service", service);
        }
        if let Some(scope) = scope {
            url.query_pairs_mut().append_pair("scope", scope);
        }
        let mut b = self.http.get(url).header("Accept", "application/json");
        if let Some((u, p)) = &self.creds {
            b = b.basic_auth(u, Some(p));
        }
        let resp = b.send().await.map_err(|e| err(e.to_string()))?;
        let status = resp.status();
        let body = resp.bytes().await.map_err(|e| err(e.to_string()))?;
        if !status.is_success() {
            return Err(err(format!("status {status}, body: {}", excerpt(&body, 300))));
        }
        #[derive(serde::Deserialize)]
        struct TokenResponse {
            token: Option<String>,
            access_token: Option<String>,
        }
        let t: TokenResponse = serde_json::from_slice(&body).map_err(|e| err(format!("bad JSON: {e}")))?;
        t.token
            .or(t.access_token)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| err("no token in the answer".into()))
    }
}

async fn read(mut resp: reqwest::Response, what: String) -> Result<Resp, ClientError> {
    let (status, headers, url) = (resp.status(), resp.headers().clone(), resp.url().clone());
    let mut body = Vec::new();
    let mut len = 0u64;
    let mut hasher = Sha256::new();
    while let Some(chunk) =
        resp.chunk().await.map_err(|e| ClientError::Transport { what: what.clone(), source: e })?
    {
        hasher.update(&chunk);
        len += chunk.len() as u64;
        let room = BODY_KEEP.saturating_sub(body.len());
        body.extend_from_slice(&chunk[..chunk.len().min(room)]);
    }
    let body_digest = format!("sha256:{}", hex::encode(hasher.finalize()));
    Ok(Resp { status, headers, body: body.into(), body_len: len, body_digest, url, what })
}

#[cfg(test)]
#[path = "client_tests.rs"]
mod tests;
