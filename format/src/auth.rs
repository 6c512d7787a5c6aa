//! Registry auth, shared by the converter, the worker and the test servers: `WWW-Authenticate`
//! challenges (`Bearer realm="…",service="…",scope="…"`, `Basic realm="…"`) and the base64 of
//! HTTP Basic credentials (not worth a dependency).

/// Parses `Scheme k="v",k2=v2` into the scheme and its parameters. The scheme comes back as sent:
/// compare it with [`is_scheme`], schemes are case-insensitive (RFC 7235 section 2.1).
pub fn parse_challenge(h: &str) -> (String, Vec<(String, String)>) {
    let h = h.trim();
    let (scheme, rest) = h.split_once(char::is_whitespace).unwrap_or((h, ""));
    let mut params = Vec::new();
    let mut chars = rest.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        let key: String = std::iter::from_fn(|| chars.next_if(|c| *c != '=')).collect();
        if key.is_empty() || chars.next() != Some('=') {
            break;
        }
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => value.extend(chars.next()),
                    '"' => break,
                    c => value.push(c),
                }
            }
        } else {
            value = std::iter::from_fn(|| chars.next_if(|c| *c != ',')).collect();
        }
        params.push((key.trim().to_ascii_lowercase(), value));
    }
    (scheme.to_string(), params)
}

/// Whether `scheme` (from a challenge or an `Authorization` value) is `want`, ignoring ASCII case:
/// `bearer`, `Bearer` and `BEARER` are one scheme (RFC 7235 section 2.1).
pub fn is_scheme(scheme: &str, want: &str) -> bool {
    scheme.eq_ignore_ascii_case(want)
}

/// The credentials of an `Authorization` value (`Scheme credentials`) when its scheme is `want`,
/// in any case; `None` for another scheme.
pub fn credentials_for<'a>(authorization: &'a str, want: &str) -> Option<&'a str> {
    let (scheme, rest) = authorization.trim().split_once(char::is_whitespace)?;
    is_scheme(scheme, want).then(|| rest.trim())
}

/// Standard base64 (with or without padding).
pub fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let val = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let s = s.trim_end_matches('=').as_bytes();
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    for chunk in s.chunks(4) {
        if chunk.len() == 1 {
            return None;
        }
        let mut n = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            n |= val(c)? << (18 - 6 * i);
        }
        let bytes = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        out.extend_from_slice(&bytes[..chunk.len() - 1]);
    }
    Some(out)
}

/// Standard base64 with padding.
pub fn base64_encode(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for c in data.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                out.push(T[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges() {
        let (s, p) = parse_challenge(
            r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull,push""#,
        );
        assert_eq!(s, "Bearer");
        assert_eq!(p[0], ("realm".into(), "https://auth.example/token".into()));
        assert_eq!(p[2], ("scope".into(), "repository:a/b:pull,push".into()));
        let (s, p) = parse_challenge(r#"Basic realm="Registry Realm""#);
        assert_eq!((s.as_str(), p.len()), ("Basic", 1));
    }

    /// Issue item 8: the `bearer` scheme was matched case-sensitively somewhere.
    #[test]
    fn schemes_are_case_insensitive() {
        for h in [
            r#"bearer realm="r",service="s""#,
            r#"BEARER realm="r",service="s""#,
            "Bearer\trealm=r,service=s",
        ] {
            let (s, p) = parse_challenge(h);
            assert!(is_scheme(&s, "Bearer") && !is_scheme(&s, "Basic"), "{h}: {s}");
            assert_eq!(p, vec![("realm".into(), "r".into()), ("service".into(), "s".into())], "{h}");
        }
        assert_eq!(credentials_for("bearer abc", "Bearer"), Some("abc"));
        assert_eq!(credentials_for("BEARER  abc ", "Bearer"), Some("abc"));
        assert_eq!(credentials_for("bAsIc dXNlcjpwYXNz", "Basic"), Some("dXNlcjpwYXNz"));
        assert_eq!(credentials_for("Basic dXNlcjpwYXNz", "Bearer"), None);
        assert_eq!(credentials_for("Bearerabc", "Bearer"), None);
        assert_eq!(credentials_for("", "Bearer"), None);
    }

    #[test]
    fn base64() {
        assert_eq!(base64_encode(b"user:pass"), "dXNlcjpwYXNz");
        assert_eq!(base64_encode(b"a"), "YQ==");
        assert_eq!(base64_encode(b"ab"), "YWI=");
        assert_eq!(base64_decode("YWI").unwrap(), b"ab");
        assert!(base64_decode("Y").is_none());
        assert!(base64_decode("a$bc").is_none());
    }
}
