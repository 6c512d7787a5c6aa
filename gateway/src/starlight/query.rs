//! Query strings of the Starlight endpoints, checked strictly: an unknown or repeated parameter is
//! an error, not something to guess about.

use starlight_format::{Digest, Platform};

use crate::error::GatewayError;
use crate::route::valid_name;

/// A `have` image: a manifest digest, in this repository or in `name`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Have {
    pub name: Option<String>,
    pub digest: Digest,
}

/// `to=REF&have=...&platform=...`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BundleQuery {
    /// A tag or a digest.
    pub to: String,
    pub have: Vec<Have>,
    pub platform: Option<Platform>,
}

fn bad(why: impl Into<String>) -> GatewayError {
    GatewayError::BadRequest(why.into())
}

/// Decodes `%XX` escapes and `+` (a space, in a form encoding).
fn percent_decode(s: &str) -> Result<String, GatewayError> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hex = b.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
                let v =
                    hex.and_then(|h| u8::from_str_radix(h, 16).ok()).ok_or_else(|| bad("bad %-escape"))?;
                out.push(v);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| bad("query is not UTF-8"))
}

fn pairs(query: &str) -> Result<Vec<(String, String)>, GatewayError> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            Ok((percent_decode(k)?, percent_decode(v)?))
        })
        .collect()
}

/// The one value of `key`.
pub fn single(query: &str, key: &str) -> Result<String, GatewayError> {
    let mut found = None;
    for (k, v) in pairs(query)? {
        if k != key {
            return Err(bad(format!("unknown parameter {k:?}")));
        }
        if found.replace(v).is_some() {
            return Err(bad(format!("{key} given twice")));
        }
    }
    found.ok_or_else(|| bad(format!("missing {key}")))
}

/// A tag as the distribution spec allows it.
fn valid_tag(t: &str) -> bool {
    let b = t.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b.iter().all(|c| c.is_ascii_alphanumeric() || b"_.-".contains(c))
}

impl BundleQuery {
    pub fn parse(query: &str) -> Result<BundleQuery, GatewayError> {
        let (mut to, mut have, mut platform) = (None, Vec::new(), None);
        for (k, v) in pairs(query)? {
            match k.as_str() {
                "to" if to.is_none() => {
                    if v.parse::<Digest>().is_err() && !valid_tag(&v) {
                        return Err(bad(format!("to={v:?} is neither a tag nor a digest")));
                    }
                    to = Some(v);
                }
                "have" => {
                    if have.len() == super::MAX_HAVE {
                        return Err(bad(format!("more than {} have images", super::MAX_HAVE)));
                    }
                    let (name, d) = match v.rsplit_once('@') {
                        Some((n, d)) if valid_name(n) => (Some(n.to_string()), d),
                        Some((n, _)) => return Err(bad(format!("have: invalid repository {n:?}"))),
                        None => (None, v.as_str()),
                    };
                    let digest = d.parse().map_err(|e| bad(format!("have: {e}")))?;
                    have.push(Have { name, digest });
                }
                "platform" if platform.is_none() => {
                    platform = Some(v.parse().map_err(|e| bad(format!("platform: {e}")))?);
                }
                "to" | "platform" => return Err(bad(format!("{k} given twice"))),
                _ => return Err(bad(format!("unknown parameter {k:?}"))),
            }
        }
        Ok(BundleQuery { to: to.ok_or_else(|| bad("missing to=TAG|DIGEST"))?, have, platform })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:0000000000000000000000000000000000000000000000000000000000000000";

    #[test]
    fn parses_a_bundle_query() {
        let q =
            BundleQuery::parse(&format!("to=v2&have={D}&have=lib%2Fbase%40{D}&platform=linux%2Farm64%2Fv8"))
                .unwrap();
        assert_eq!(q.to, "v2");
        assert_eq!(q.have.len(), 2);
        assert_eq!(q.have[0].name, None);
        assert_eq!(q.have[1].name.as_deref(), Some("lib/base"));
        assert_eq!(q.platform.unwrap().to_string(), "linux/arm64/v8");
        assert_eq!(BundleQuery::parse(&format!("to={D}")).unwrap().to, D);
    }

    #[test]
    fn rejects_bad_queries() {
        for q in [
            "",
            "have=sha256:00",
            "to=a&to=b",
            "to=.bad",
            "to=v1&x=1",
            "to=v1&have=UPPER@sha256:00",
            "to=v1&platform=linux",
            "to=%zz",
        ] {
            assert!(BundleQuery::parse(q).is_err(), "{q}");
        }
        let many = (0..=MAX).map(|_| format!("have={D}")).collect::<Vec<_>>().join("&");
        assert!(BundleQuery::parse(&format!("to=v1&{many}")).is_err());
    }

    const MAX: usize = super::super::MAX_HAVE;

    #[test]
    fn single_values() {
        assert_eq!(single(&format!("image={D}"), "image").unwrap(), D);
        assert!(single("image=a&image=b", "image").is_err());
        assert!(single("other=a", "image").is_err());
        assert!(single("", "image").is_err());
    }
}
