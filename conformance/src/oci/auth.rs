//! The pure parts of registry auth: parsing `WWW-Authenticate` challenges, and base64 for
//! `Authorization: Basic` (and the descriptors' `data` fields).

use std::collections::HashMap;

/// One `WWW-Authenticate` challenge: the scheme (lowercased) and its parameters.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Challenge {
    pub(crate) scheme: String,
    pub(crate) params: HashMap<String, String>,
}

/// Parses the first challenge of a `WWW-Authenticate` value; quoted values may hold commas.
pub(crate) fn parse_challenge(value: &str) -> Option<Challenge> {
    let value = value.trim();
    let (scheme, rest) = value.split_once(char::is_whitespace).unwrap_or((value, ""));
    if scheme.is_empty() {
        return None;
    }
    let mut params = HashMap::new();
    let mut chars = rest.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace() || *c == ',').is_some() {}
        let key: String = std::iter::from_fn(|| chars.next_if(|c| *c != '=' && *c != ',')).collect();
        if key.trim().is_empty() || chars.next() != Some('=') {
            break;
        }
        let mut val = String::new();
        if chars.next_if_eq(&'"').is_some() {
            while let Some(c) = chars.next() {
                match c {
                    '\\' => val.extend(chars.next()),
                    '"' => break,
                    c => val.push(c),
                }
            }
        } else {
            val.extend(std::iter::from_fn(|| chars.next_if(|c| *c != ',')));
        }
        params.insert(key.trim().to_ascii_lowercase(), val.trim().to_string());
    }
    Some(Challenge { scheme: scheme.to_ascii_lowercase(), params })
}

/// Standard base64 with padding, for `Authorization: Basic` and descriptor `data` fields.
pub(crate) fn base64(bytes: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..4 {
            let c = if i <= chunk.len() { ABC[(n >> (18 - 6 * i) & 63) as usize] as char } else { '=' };
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_challenges_keep_commas_inside_quotes() {
        let ch = parse_challenge(
            r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull,push""#,
        )
        .unwrap();
        assert_eq!(ch.scheme, "bearer");
        assert_eq!(ch.params["realm"], "https://auth.example/token");
        assert_eq!(ch.params["service"], "registry.example");
        assert_eq!(ch.params["scope"], "repository:a/b:pull,push");
    }

    #[test]
    fn basic_challenges_and_odd_spacing_parse() {
        let ch = parse_challenge(r#"Basic realm="starlight \"test\"" , charset=UTF-8"#).unwrap();
        assert_eq!(ch.scheme, "basic");
        assert_eq!(ch.params["realm"], r#"starlight "test""#);
        assert_eq!(ch.params["charset"], "UTF-8");
        assert_eq!(parse_challenge("Negotiate").unwrap().params.len(), 0);
        assert_eq!(parse_challenge("  "), None);
    }

    #[test]
    fn base64_matches_rfc4648_vectors() {
        let cases = [("", ""), ("f", "Zg=="), ("fo", "Zm8="), ("foo", "Zm9v"), ("foobar", "Zm9vYmFy")];
        for (plain, encoded) in cases {
            assert_eq!(base64(plain.as_bytes()), encoded);
        }
    }
}
