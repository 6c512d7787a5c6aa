//! Classifies request paths once, at the top of the stack: which branch serves the request and which
//! repository it concerns (for logs and metrics). Malformed paths never reach the upstream.

use crate::error::GatewayError;

/// What a request is for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    /// `/healthz` (the process is up) and `/readyz` (it can reach the upstream).
    Live,
    Ready,
    /// `/metrics` (Prometheus text format).
    Metrics,
    /// `/v2/`: the API version check.
    Base,
    /// `/v2/_catalog`.
    Catalog,
    /// A registry call on a repository: manifests, blobs, uploads, tags, referrers.
    Registry {
        name: String,
        kind: Kind,
    },
    /// Push notifications from the registry: `/v2/_starlight/notifications`.
    Notifications,
    /// A Starlight extension endpoint: `/v2/<name>/_starlight/<rest>`.
    Starlight {
        name: String,
        rest: String,
    },
}

/// The OCI API family of a repository call (used as a metrics label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Manifest,
    Blob,
    Upload,
    Tags,
    Referrers,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Manifest => "manifests",
            Kind::Blob => "blobs",
            Kind::Upload => "uploads",
            Kind::Tags => "tags",
            Kind::Referrers => "referrers",
        }
    }
}

impl Route {
    /// A short label for metrics (bounded cardinality: no names, no digests).
    pub fn label(&self) -> &'static str {
        match self {
            Route::Live | Route::Ready => "health",
            Route::Metrics => "metrics",
            Route::Base => "base",
            Route::Catalog => "catalog",
            Route::Registry { kind, .. } => kind.as_str(),
            Route::Starlight { .. } | Route::Notifications => "starlight",
        }
    }

    /// The repository the request concerns, if any.
    pub fn repository(&self) -> Option<&str> {
        match self {
            Route::Registry { name, .. } | Route::Starlight { name, .. } => Some(name),
            _ => None,
        }
    }
}

/// The longest repository name accepted (Distribution's limit).
const MAX_NAME: usize = 255;

/// Checks a repository name against the OCI distribution grammar:
/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*(\/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)*`.
pub fn valid_name(name: &str) -> bool {
    fn component(c: &str) -> bool {
        let b = c.as_bytes();
        if b.is_empty() || !b[0].is_ascii_alphanumeric() || !b[b.len() - 1].is_ascii_alphanumeric() {
            return false;
        }
        let mut i = 0;
        while i < b.len() {
            let ch = b[i];
            if ch.is_ascii_lowercase() || ch.is_ascii_digit() {
                i += 1;
                continue;
            }
            // A separator run: ".", "_", "__", or one or more "-".
            let start = i;
            while i < b.len() && !(b[i].is_ascii_lowercase() || b[i].is_ascii_digit()) {
                i += 1;
            }
            let sep = &c[start..i];
            if !(sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|x| x == b'-')) {
                return false;
            }
        }
        true
    }
    !name.is_empty() && name.len() <= MAX_NAME && name.split('/').all(component)
}

/// Classifies `path` (without the query string).
pub fn classify(path: &str) -> Result<Route, GatewayError> {
    match path {
        "/healthz" => return Ok(Route::Live),
        "/readyz" => return Ok(Route::Ready),
        "/metrics" => return Ok(Route::Metrics),
        "/v2" | "/v2/" => return Ok(Route::Base),
        "/v2/_catalog" => return Ok(Route::Catalog),
        "/v2/_starlight/notifications" => return Ok(Route::Notifications),
        _ => {}
    }
    let Some(rest) = path.strip_prefix("/v2/") else {
        return Err(GatewayError::NotFound);
    };
    if rest.bytes().any(|b| b == 0 || b == b'\\' || b.is_ascii_control()) {
        return Err(GatewayError::BadPath("control characters or backslashes".into()));
    }
    let segs: Vec<&str> = rest.split('/').collect();
    for s in &segs {
        let decoded = s.replace("%2e", ".").replace("%2E", ".");
        if decoded == "." || decoded == ".." {
            return Err(GatewayError::BadPath("dot segments".into()));
        }
    }
    let n = segs.len();
    // Find the API keyword from the end: names may contain any component, but what follows the
    // keyword has a fixed shape.
    let (name_end, kind, starlight_rest) = if n >= 3 && segs[n - 2] == "tags" && segs[n - 1] == "list" {
        (n - 2, Some(Kind::Tags), None)
    } else if n >= 3 && segs[n - 2] == "manifests" {
        (n - 2, Some(Kind::Manifest), None)
    } else if n >= 3 && segs[n - 2] == "referrers" {
        (n - 2, Some(Kind::Referrers), None)
    } else if n >= 4 && segs[n - 3] == "blobs" && segs[n - 2] == "uploads" {
        (n - 3, Some(Kind::Upload), None)
    } else if n >= 3 && segs[n - 2] == "blobs" {
        (n - 2, Some(Kind::Blob), None)
    } else if let Some(i) = segs.iter().position(|s| *s == "_starlight") {
        (i, None, Some(segs[i + 1..].join("/")))
    } else {
        return Err(GatewayError::NotFound);
    };
    let tail_ok = segs[name_end..].iter().enumerate().all(|(i, s)| {
        // Only an upload's trailing slash (`blobs/uploads/`) may leave an empty last segment.
        !s.is_empty() || (kind == Some(Kind::Upload) && i == segs.len() - name_end - 1)
    });
    if name_end == 0 || !tail_ok {
        return Err(GatewayError::BadPath("empty path segments".into()));
    }
    let name = segs[..name_end].join("/");
    if !valid_name(&name) {
        return Err(GatewayError::NameInvalid(name.chars().take(300).collect()));
    }
    Ok(match (kind, starlight_rest) {
        (Some(kind), _) => Route::Registry { name, kind },
        (None, Some(rest)) => Route::Starlight { name, rest },
        (None, None) => return Err(GatewayError::NotFound),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg(name: &str, kind: Kind) -> Route {
        Route::Registry { name: name.into(), kind }
    }

    #[test]
    fn classifies_the_api() {
        assert_eq!(classify("/v2/").unwrap(), Route::Base);
        assert_eq!(
            classify("/v2/library/redis/manifests/7.2").unwrap(),
            reg("library/redis", Kind::Manifest)
        );
        assert_eq!(classify("/v2/a/blobs/sha256:00").unwrap(), reg("a", Kind::Blob));
        assert_eq!(classify("/v2/a/b/blobs/uploads/").unwrap(), reg("a/b", Kind::Upload));
        assert_eq!(classify("/v2/a/blobs/uploads/5f1c-aa").unwrap(), reg("a", Kind::Upload));
        assert_eq!(classify("/v2/a/tags/list").unwrap(), reg("a", Kind::Tags));
        assert_eq!(classify("/v2/a/referrers/sha256:00").unwrap(), reg("a", Kind::Referrers));
        // A repository may be called "blobs" or "manifests".
        assert_eq!(classify("/v2/x/blobs/manifests/latest").unwrap(), reg("x/blobs", Kind::Manifest));
        assert_eq!(
            classify("/v2/a/_starlight/bundle").unwrap(),
            Route::Starlight { name: "a".into(), rest: "bundle".into() }
        );
    }

    #[test]
    fn rejects_malformed_paths() {
        for p in [
            "/v2/../etc/passwd/manifests/x",
            "/v2/a/%2e%2e/manifests/x",
            "/v2/a//b/manifests/x",
            "/v2/A/manifests/x",
            "/v2/a/manifests/",
            "/v2/a\\b/manifests/x",
            "/v2/-a/manifests/x",
            "/v2/a/unknown/x",
            "/etc/passwd",
        ] {
            assert!(classify(p).is_err(), "{p}");
        }
        assert!(matches!(
            classify(&format!("/v2/{}/manifests/x", "a".repeat(300))),
            Err(GatewayError::NameInvalid(_))
        ));
    }

    #[test]
    fn names() {
        for ok in ["a", "a0/b-c", "a__b", "a.b", "a---b", "x/y/z"] {
            assert!(valid_name(ok), "{ok}");
        }
        for bad in ["", "A", "a_", "a___b", "a..b", "a/", "/a", "a.-b"] {
            assert!(!valid_name(bad), "{bad}");
        }
    }
}
