//! A small OCI distribution client: manifests and blobs, with anonymous, basic and bearer-token
//! auth (the registry's `WWW-Authenticate` challenge decides which).

use starlight_format::auth;
use std::sync::Mutex;

use futures::TryStreamExt;
use reqwest::StatusCode;
use reqwest::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, HeaderValue, WWW_AUTHENTICATE};
use starlight_format::Digest;
use tokio_util::io::StreamReader;

use super::{BlobReader, DOCKER_LIST, DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST, SourceOptions};
use crate::ConvertError;

/// A username and password (or token) for the registry.
#[derive(Clone)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credentials({}, <redacted>)", self.username)
    }
}

impl Credentials {
    /// The `Authorization: Basic ...` value for these credentials.
    pub fn basic_header(&self) -> String {
        format!("Basic {}", auth::base64_encode(format!("{}:{}", self.username, self.password).as_bytes()))
    }

    /// Reads the credentials of an `Authorization: Basic ...` value.
    pub fn from_basic_header(value: &str) -> Option<Credentials> {
        let b64 = auth::credentials_for(value, "Basic")?;
        String::from_utf8(auth::base64_decode(b64)?).ok()?.parse().ok()
    }
}

impl std::str::FromStr for Credentials {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (u, p) = s.split_once(':').ok_or("credentials must be USER:PASSWORD")?;
        Ok(Credentials { username: u.into(), password: p.into() })
    }
}

/// `docker://HOST[:PORT]/NAME[:TAG|@DIGEST]`.
#[derive(Debug)]
pub struct RegistrySource {
    pub host: String,
    pub repo: String,
    pub tag: Option<String>,
    pub digest: Option<Digest>,
    pub opts: SourceOptions,
    http: reqwest::Client,
    /// The `Authorization` value that the last challenge led to, reused for later requests.
    auth: Mutex<Option<HeaderValue>>,
}

impl RegistrySource {
    pub fn parse(rest: &str, opts: SourceOptions) -> Result<RegistrySource, ConvertError> {
        let bad = |why: &str| ConvertError::BadImage { image: format!("docker://{rest}"), why: why.into() };
        let (host, name) = rest.split_once('/').ok_or_else(|| bad("expected HOST[:PORT]/NAME"))?;
        let (repo, tag, digest) = if let Some((r, d)) = name.split_once('@') {
            (r, None, Some(d.parse::<Digest>().map_err(|e| bad(&e.to_string()))?))
        } else {
            match name.rsplit_once(':') {
                Some((r, t)) if !t.contains('/') => (r, Some(t.to_string()), None),
                _ => (name, Some("latest".to_string()), None),
            }
        };
        let valid = |s: &str| {
            !s.is_empty()
                && s.split('/').all(|c| {
                    !c.is_empty()
                        && c.bytes()
                            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
                })
        };
        if host.is_empty() || !valid(repo) {
            return Err(bad("invalid registry host or repository name"));
        }
        let http = reqwest::Client::builder()
            .connect_timeout(std::time::Duration::from_secs(10))
            .read_timeout(std::time::Duration::from_secs(60))
            .build()
            .map_err(|e| bad(&format!("HTTP client: {e}")))?;
        let auth = match &opts.authorization {
            Some(a) => {
                Some(HeaderValue::from_str(a).map_err(|_| bad("authorization is not a valid header"))?)
            }
            None => None,
        };
        Ok(RegistrySource {
            host: host.into(),
            repo: repo.into(),
            tag,
            digest,
            opts,
            http,
            auth: Mutex::new(auth),
        })
    }

    pub(super) fn describe(&self) -> String {
        match (&self.digest, &self.tag) {
            (Some(d), _) => format!("docker://{}/{}@{d}", self.host, self.repo),
            (None, Some(t)) => format!("docker://{}/{}:{t}", self.host, self.repo),
            _ => format!("docker://{}/{}", self.host, self.repo),
        }
    }

    fn url(&self, kind: &str, reference: &str) -> String {
        let scheme = if self.opts.plain_http { "http" } else { "https" };
        format!("{scheme}://{}/v2/{}/{kind}/{reference}", self.host, self.repo)
    }

    fn err(&self, what: impl Into<String>, why: impl Into<String>) -> ConvertError {
        ConvertError::Fetch { source_name: self.describe(), what: what.into(), why: why.into() }
    }

    /// GETs `url`, answering one auth challenge if the registry sends one.
    async fn get(
        &self,
        url: &str,
        accept: Option<&str>,
        what: &str,
    ) -> Result<reqwest::Response, ConvertError> {
        for attempt in 0..2 {
            let mut req = self.http.get(url);
            if let Some(a) = accept {
                req = req.header(ACCEPT, a);
            }
            let auth = self.auth.lock().map(|g| g.clone()).unwrap_or(None);
            if let Some(a) = auth {
                req = req.header(AUTHORIZATION, a);
            }
            let resp = req.send().await.map_err(|e| self.err(what, format!("{url}: {}", error_chain(&e))))?;
            if resp.status() == StatusCode::UNAUTHORIZED && attempt == 0 {
                let challenge = resp
                    .headers()
                    .get(WWW_AUTHENTICATE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_string();
                let value = self.answer_challenge(&challenge, what).await?;
                if let Ok(mut g) = self.auth.lock() {
                    *g = Some(value);
                }
                continue;
            }
            if !resp.status().is_success() {
                let status = resp.status();
                let body = resp.text().await.unwrap_or_default();
                let hint = if status == StatusCode::UNAUTHORIZED { " (check --creds)" } else { "" };
                return Err(self.err(
                    what,
                    format!("{url}: HTTP {status}{hint}: {}", body.chars().take(300).collect::<String>()),
                ));
            }
            return Ok(resp);
        }
        Err(self.err(what, "authentication failed"))
    }

    async fn answer_challenge(&self, challenge: &str, what: &str) -> Result<HeaderValue, ConvertError> {
        let (scheme, params) = starlight_format::auth::parse_challenge(challenge);
        let creds = self.opts.credentials.as_ref();
        let basic = Credentials::basic_header;
        let header = |s: String| {
            HeaderValue::from_str(&s).map_err(|_| self.err(what, "credentials are not a valid header"))
        };
        // Schemes are case-insensitive (RFC 7235): `bearer` is `Bearer`.
        match scheme.to_ascii_lowercase().as_str() {
            "basic" => match creds {
                Some(c) => header(basic(c)),
                None => Err(self.err(
                    what,
                    "the registry requires credentials (HTTP 401, Basic); pass --creds USER:PASSWORD",
                )),
            },
            "bearer" => {
                let realm = params
                    .iter()
                    .find(|(k, _)| k == "realm")
                    .map(|(_, v)| v.clone())
                    .ok_or_else(|| self.err(what, "bearer challenge without realm"))?;
                let mut req = self.http.get(&realm);
                let mut query: Vec<(String, String)> =
                    params.iter().filter(|(k, _)| k == "service" || k == "scope").cloned().collect();
                if !query.iter().any(|(k, _)| k == "scope") {
                    query.push(("scope".into(), format!("repository:{}:pull", self.repo)));
                }
                req = req.query(&query);
                if let Some(c) = creds {
                    req = req.header(AUTHORIZATION, basic(c));
                }
                let resp = req
                    .send()
                    .await
                    .map_err(|e| self.err(what, format!("token service {realm}: {}", error_chain(&e))))?;
                if !resp.status().is_success() {
                    return Err(self.err(what, format!("token service {realm}: HTTP {}", resp.status())));
                }
                #[derive(serde::Deserialize)]
                struct Token {
                    #[serde(default)]
                    token: Option<String>,
                    #[serde(default)]
                    access_token: Option<String>,
                }
                let t: Token =
                    resp.json().await.map_err(|e| self.err(what, format!("token service {realm}: {e}")))?;
                let token = t
                    .token
                    .or(t.access_token)
                    .ok_or_else(|| self.err(what, "token service returned no token"))?;
                header(format!("Bearer {token}"))
            }
            _ => Err(self.err(what, format!("HTTP 401 with unsupported challenge {challenge:?}"))),
        }
    }

    /// Fetches a manifest by tag (or the pinned digest) or by `digest`.
    pub(super) async fn manifest(
        &self,
        digest: Option<&Digest>,
    ) -> Result<(Vec<u8>, Option<String>, Option<Digest>), ConvertError> {
        let pinned = digest.copied().or(self.digest);
        let reference = match (&pinned, &self.tag) {
            (Some(d), _) => d.to_string(),
            (None, Some(t)) => t.clone(),
            (None, None) => "latest".into(),
        };
        let accept = [OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST].join(", ");
        let resp = self.get(&self.url("manifests", &reference), Some(&accept), "manifest").await?;
        let media_type = resp
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|s| s.split(';').next().unwrap_or("").trim().to_string())
            .filter(|s| !s.is_empty() && s != "application/json");
        let bytes = read_capped(resp, super::MAX_MANIFEST).await.map_err(|e| self.err("manifest", e))?;
        Ok((bytes, media_type, pinned))
    }

    pub(super) async fn blob_bytes(&self, d: &Digest, max: u64) -> Result<Vec<u8>, ConvertError> {
        let resp = self.get(&self.url("blobs", &d.to_string()), None, "blob").await?;
        read_capped(resp, max).await.map_err(|e| self.err(format!("blob {d}"), e))
    }

    /// The blob's stream; a `Content-Length` other than `size` (the manifest's) fails at once.
    pub(super) async fn open_blob(&self, d: &Digest, size: u64) -> Result<BlobReader, ConvertError> {
        let resp = self.get(&self.url("blobs", &d.to_string()), None, "layer blob").await?;
        if let Some(len) = resp.content_length()
            && len != size
        {
            let why = if len < size {
                crate::BlobReadError::Short { declared: size, actual: len }
            } else {
                crate::BlobReadError::Long { declared: size, actual: Some(len) }
            };
            return Err(why.into_convert_error(&d.to_string()));
        }
        let stream = resp.bytes_stream().map_err(|e| std::io::Error::other(error_chain(&e)));
        Ok(Box::pin(StreamReader::new(stream)))
    }
}

async fn read_capped(mut resp: reqwest::Response, max: u64) -> Result<Vec<u8>, String> {
    if resp.content_length().is_some_and(|n| n > max) {
        return Err(format!("larger than {max} bytes"));
    }
    let mut out = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| error_chain(&e))? {
        out.extend_from_slice(&chunk);
        if out.len() as u64 > max {
            return Err(format!("larger than {max} bytes"));
        }
    }
    Ok(out)
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use starlight_format::auth;

    #[test]
    fn basic_headers_roundtrip() {
        let c = Credentials { username: "user".into(), password: "pa:ss".into() };
        assert_eq!(c.basic_header(), "Basic dXNlcjpwYTpzcw==");
        let back = Credentials::from_basic_header(&c.basic_header()).unwrap();
        assert_eq!((back.username.as_str(), back.password.as_str()), ("user", "pa:ss"));
        assert_eq!(auth::base64_decode("YWI").unwrap(), b"ab");
        assert!(auth::base64_decode("Y").is_none());
        assert!(auth::base64_decode("a$bc").is_none());
        assert!(Credentials::from_basic_header("Bearer x").is_none());
        // Schemes are case-insensitive (RFC 7235).
        let back = Credentials::from_basic_header("BASIC dXNlcjpwYTpzcw==").unwrap();
        assert_eq!((back.username.as_str(), back.password.as_str()), ("user", "pa:ss"));
    }

    #[test]
    fn parses_references() {
        let r = RegistrySource::parse("127.0.0.1:5000/library/redis:7", SourceOptions::default()).unwrap();
        assert_eq!(
            (r.host.as_str(), r.repo.as_str(), r.tag.as_deref()),
            ("127.0.0.1:5000", "library/redis", Some("7"))
        );
        let r = RegistrySource::parse("h/x", SourceOptions::default()).unwrap();
        assert_eq!(r.tag.as_deref(), Some("latest"));
        assert!(RegistrySource::parse("h/X:1", SourceOptions::default()).is_err());
        assert!(RegistrySource::parse("h/x@sha256:zz", SourceOptions::default()).is_err());
    }
}
