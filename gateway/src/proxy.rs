//! The pass-through proxy, the innermost service: forwards any request to the upstream registry and
//! streams both bodies, preserving status, headers and bodies. Only hop-by-hop headers are dropped,
//! and `Location`/`Link` headers that point at the upstream are rewritten to point at the gateway.

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::BoxFuture;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tracing::debug;

use crate::body::{Body, BoxError, boxed};
use crate::error::GatewayError;

/// The upstream registry.
#[derive(Clone, Debug)]
pub struct Upstream {
    /// `scheme://authority`, without a trailing slash.
    pub base: String,
}

impl Upstream {
    /// Parses `http[s]://HOST[:PORT]` (a path is not allowed: registries live at the root).
    pub fn parse(url: &str) -> Result<Upstream, String> {
        let uri: Uri = url.parse().map_err(|e| format!("invalid upstream URL {url:?}: {e}"))?;
        let scheme = uri.scheme_str().ok_or_else(|| format!("upstream URL {url:?} has no scheme"))?;
        if scheme != "http" && scheme != "https" {
            return Err(format!("upstream URL {url:?}: scheme must be http or https"));
        }
        let authority = uri.authority().ok_or_else(|| format!("upstream URL {url:?} has no host"))?;
        if !matches!(uri.path(), "" | "/") {
            return Err(format!("upstream URL {url:?} must not have a path"));
        }
        Ok(Upstream { base: format!("{scheme}://{authority}") })
    }
}

type Connector = hyper_rustls::HttpsConnector<HttpConnector>;

/// The proxy service.
#[derive(Clone, Debug)]
pub struct Proxy {
    client: Client<Connector, Body>,
    upstream: Arc<Upstream>,
    head_timeout: Duration,
}

impl Proxy {
    /// `head_timeout` bounds the wait for the upstream's response head; bodies stream without limit.
    pub fn new(
        upstream: Upstream,
        connect_timeout: Duration,
        head_timeout: Duration,
    ) -> Result<Proxy, String> {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(connect_timeout));
        http.set_nodelay(true);
        let tls = hyper_rustls::HttpsConnectorBuilder::new()
            .with_native_roots()
            .map_err(|e| format!("loading the system's TLS roots: {e}"))?
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(64)
            .build(tls);
        Ok(Proxy { client, upstream: Arc::new(upstream), head_timeout })
    }

    pub fn upstream(&self) -> &Upstream {
        &self.upstream
    }

    /// Sends `req` upstream (its URI's path and query are kept) and returns the upstream's answer.
    pub async fn forward(&self, req: Request<Body>) -> Result<Response<Body>, GatewayError> {
        let (mut parts, body) = req.into_parts();
        let pq = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        parts.uri = format!("{}{pq}", self.upstream.base)
            .parse()
            .map_err(|e| GatewayError::BadPath(format!("cannot forward {pq:?}: {e}")))?;
        strip_hop_by_hop(&mut parts.headers);
        // The client sets Host from the upstream URI.
        parts.headers.remove(header::HOST);
        // The client's HTTP version (HTTP/2 by ALPN or h2c) is not the upstream's: left at 2, the
        // client would speak h2 without negotiation to an upstream that may only know HTTP/1.1.
        // Its own ALPN chooses HTTP/2 where the upstream offers it.
        parts.version = http::Version::HTTP_11;
        let method = parts.method.clone();
        let sent =
            tokio::time::timeout(self.head_timeout, self.client.request(Request::from_parts(parts, body)));
        let resp = match sent.await {
            Err(_) => return Err(GatewayError::UpstreamTimeout(self.head_timeout)),
            Ok(Err(e)) => return Err(GatewayError::UpstreamUnreachable(error_chain(&e))),
            Ok(Ok(r)) => r,
        };
        let (mut parts, body) = resp.into_parts();
        debug!(%method, status = parts.status.as_u16(), "upstream answered");
        strip_hop_by_hop(&mut parts.headers);
        rewrite_location(&mut parts.headers, &self.upstream.base);
        rewrite_link(&mut parts.headers, &self.upstream.base);
        Ok(Response::from_parts(parts, boxed(body)))
    }
}

impl tower::Service<Request<Body>> for Proxy {
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<Response<Body>, BoxError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move { this.forward(req).await.map_err(Into::into) })
    }
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

/// Headers that describe one connection, not the message (RFC 9110 section 7.6.1).
const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

fn strip_hop_by_hop(h: &mut HeaderMap) {
    let listed: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for name in HOP_BY_HOP.iter().chain(&listed) {
        h.remove(name);
    }
}

/// `http://upstream/v2/...` becomes `/v2/...`, which clients resolve against the gateway's URL.
/// A redirect elsewhere (a CDN or S3 in front of the registry's storage) is left alone.
fn rewrite_location(h: &mut HeaderMap, base: &str) {
    if let Some(v) = h.get(header::LOCATION).and_then(|v| v.to_str().ok())
        && let Some(rest) = v.strip_prefix(base)
        && rest.starts_with('/')
        && let Ok(new) = HeaderValue::from_str(rest)
    {
        h.insert(header::LOCATION, new);
    }
}

/// `<http://upstream/v2/x/tags/list?last=a>; rel="next"` loses the upstream's origin the same way.
fn rewrite_link(h: &mut HeaderMap, base: &str) {
    let needle = format!("<{base}/");
    let values: Vec<HeaderValue> = h
        .get_all(header::LINK)
        .iter()
        .map(|v| match v.to_str() {
            Ok(s) if s.contains(&needle) => {
                HeaderValue::from_str(&s.replace(&needle, "</")).unwrap_or_else(|_| v.clone())
            }
            _ => v.clone(),
        })
        .collect();
    if !values.is_empty() {
        h.remove(header::LINK);
        for v in values {
            h.append(header::LINK, v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rewrites_upstream_urls_only() {
        let mut h = HeaderMap::new();
        h.insert(header::LOCATION, HeaderValue::from_static("http://reg:5000/v2/a/blobs/uploads/u?x=1"));
        h.insert(
            header::LINK,
            HeaderValue::from_static("<http://reg:5000/v2/a/tags/list?n=1&last=b>; rel=\"next\""),
        );
        rewrite_location(&mut h, "http://reg:5000");
        rewrite_link(&mut h, "http://reg:5000");
        assert_eq!(h[header::LOCATION], "/v2/a/blobs/uploads/u?x=1");
        assert_eq!(h[header::LINK], "</v2/a/tags/list?n=1&last=b>; rel=\"next\"");

        let mut h = HeaderMap::new();
        h.insert(header::LOCATION, HeaderValue::from_static("https://cdn.example/blob?sig=1"));
        rewrite_location(&mut h, "http://reg:5000");
        assert_eq!(h[header::LOCATION], "https://cdn.example/blob?sig=1");
    }

    #[test]
    fn drops_hop_by_hop_headers() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, x-private"));
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key(header::CONTENT_TYPE));
    }

    #[test]
    fn parses_upstreams() {
        assert_eq!(Upstream::parse("http://127.0.0.1:5000/").unwrap().base, "http://127.0.0.1:5000");
        assert!(Upstream::parse("ftp://x").is_err());
        assert!(Upstream::parse("http://x/v2").is_err());
        assert!(Upstream::parse("x:5000").is_err());
    }
}
