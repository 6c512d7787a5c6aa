//! Assertions for the workflows. Each failure names the request, what was expected and what came
//! back: status, the headers the suite cares about and an excerpt of the body.

use serde::Deserialize;

use super::client::{ClientError, Resp};

/// Why a test failed; becomes [`super::Outcome::Fail`].
#[derive(Debug)]
pub(crate) struct Failure(pub(crate) String);

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Self {
        Failure(format!("request failed: {e}"))
    }
}

pub(crate) type Check = Result<(), Failure>;

/// Headers quoted in failure messages when present.
const SHOWN_HEADERS: &[&str] = &[
    "content-type",
    "location",
    "range",
    "docker-content-digest",
    "oci-subject",
    "oci-filters-applied",
    "www-authenticate",
];

/// A printable excerpt of `bytes`: lossy UTF-8, control characters as spaces, at most `max` chars.
pub(crate) fn excerpt(bytes: &[u8], max: usize) -> String {
    let text = String::from_utf8_lossy(bytes);
    let mut out: String = text.chars().take(max).map(|c| if c.is_control() { ' ' } else { c }).collect();
    if text.chars().nth(max).is_some() {
        out.push('…');
    }
    out
}

/// `"404 Not Found (Content-Type: …; body: …)"`.
pub(crate) fn describe(resp: &Resp) -> String {
    let mut parts: Vec<String> = SHOWN_HEADERS
        .iter()
        .filter_map(|h| resp.header(h).map(|v| format!("{h}: {}", excerpt(v.as_bytes(), 160))))
        .collect();
    if resp.body_len > 0 {
        parts.push(format!("body: {}", excerpt(&resp.body, 300)));
    }
    if parts.is_empty() { resp.status.to_string() } else { format!("{} ({})", resp.status, parts.join("; ")) }
}

pub(crate) fn fail(resp: &Resp, expected: impl std::fmt::Display) -> Failure {
    Failure(format!("{}: expected {expected}, got {}", resp.what, describe(resp)))
}

pub(crate) fn ensure(cond: bool, msg: impl FnOnce() -> String) -> Check {
    if cond { Ok(()) } else { Err(Failure(msg())) }
}

pub(crate) fn status(resp: &Resp, want: u16) -> Check {
    status_in(resp, &[want])
}

pub(crate) fn status_in(resp: &Resp, want: &[u16]) -> Check {
    let list: Vec<String> = want.iter().map(u16::to_string).collect();
    ensure(want.contains(&resp.code()), || fail(resp, format!("status {}", list.join(" or "))).0)
}

pub(crate) fn status_2xx(resp: &Resp) -> Check {
    status_2xx_or(resp, &[])
}

/// A 2xx status, or one of `also`.
pub(crate) fn status_2xx_or(resp: &Resp, also: &[u16]) -> Check {
    let ok = resp.status.is_success() || also.contains(&resp.code());
    let extra: String = also.iter().map(|s| format!(" or {s}")).collect();
    ensure(ok, || fail(resp, format!("a 2xx status{extra}")).0)
}

pub(crate) fn header_eq(resp: &Resp, name: &str, want: &str) -> Check {
    let got = resp.header(name).unwrap_or("");
    ensure(got == want, || fail(resp, format!("header {name}: {want:?} (got {got:?})")).0)
}

/// If the header is present it must equal `want` (as the official suite checks digests).
pub(crate) fn header_eq_if_present(resp: &Resp, name: &str, want: &str) -> Check {
    match resp.header(name) {
        Some(got) if !got.is_empty() && got != want => {
            Err(fail(resp, format!("header {name} absent or {want:?} (got {got:?})")))
        }
        _ => Ok(()),
    }
}

pub(crate) fn has_location(resp: &Resp) -> Check {
    ensure(resp.location().is_some(), || fail(resp, "a non-empty, valid Location header").0)
}

/// The body is exactly `content` (length and digest), when content checks are on.
pub(crate) fn body_is(resp: &Resp, content: &[u8], digest: &str, enabled: bool) -> Check {
    if !enabled {
        return Ok(());
    }
    let ok = resp.body_len == content.len() as u64 && resp.body_digest == digest;
    ensure(ok, || {
        let got = format!("{} bytes with digest {}", resp.body_len, resp.body_digest);
        format!(
            "{}: expected the {} bytes pushed ({digest}), got {got} (check beyond the official suite)",
            resp.what,
            content.len()
        )
    })
}

/// The body parsed as JSON of type `T`.
pub(crate) fn json<T: for<'de> Deserialize<'de>>(resp: &Resp) -> Result<T, Failure> {
    serde_json::from_slice(&resp.body).map_err(|e| fail(resp, format!("a JSON body ({e})")))
}

/// The OCI error body `{"errors":[{"code":…}]}`.
#[derive(Debug, Deserialize)]
pub(crate) struct ErrorBody {
    #[serde(default)]
    pub(crate) errors: Vec<ErrorInfo>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct ErrorInfo {
    #[serde(default)]
    pub(crate) code: String,
}

/// Codes the distribution-spec defines.
pub(crate) const ERROR_CODES: &[&str] = &[
    "BLOB_UNKNOWN",
    "BLOB_UPLOAD_INVALID",
    "BLOB_UPLOAD_UNKNOWN",
    "DIGEST_INVALID",
    "MANIFEST_BLOB_UNKNOWN",
    "MANIFEST_INVALID",
    "MANIFEST_UNKNOWN",
    "MANIFEST_UNVERIFIED",
    "NAME_INVALID",
    "NAME_UNKNOWN",
    "SIZE_INVALID",
    "TAG_INVALID",
    "UNAUTHORIZED",
    "DENIED",
    "UNSUPPORTED",
];

/// The first error code of an OCI error body, which must exist.
pub(crate) fn first_error_code(resp: &Resp) -> Result<String, Failure> {
    let body: ErrorBody = json(resp)?;
    body.errors
        .into_iter()
        .next()
        .map(|e| e.code)
        .ok_or_else(|| fail(resp, "an OCI error body with at least one error"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn excerpts_are_single_line_and_bounded() {
        assert_eq!(excerpt(b"a\nb", 10), "a b");
        assert_eq!(excerpt(b"abcdef", 3), "abc…");
        assert_eq!(excerpt(&[0xff, b'x'], 5), "\u{fffd}x");
    }
}
