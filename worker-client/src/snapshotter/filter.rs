//! containerd's filter syntax, as its metadata store sends it to a snapshotter's List:
//! `labels."containerd.io/snapshot.ref"==sha256:…,parent=="default/3/sha256:…"`.
//!
//! A filter is selectors joined by `,` (all must hold); a list of filters matches when any does.
//! A selector is a field path (`name`, `parent`, `kind`, `labels.KEY` or `labels."KEY"`), then
//! `==VALUE`, `!=VALUE`, or nothing (the field is present and not empty). Values are bare or
//! double-quoted. `~=` (regular expressions) is refused.

use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Op {
    Present,
    Eq(String),
    Ne(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Field {
    Name,
    Parent,
    Kind,
    Label(String),
}

/// A parsed filter: selectors that must all hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter(Vec<(Field, Op)>);

/// What a filter looks at.
#[derive(Debug)]
pub struct Subject<'a> {
    pub name: &'a str,
    pub parent: &'a str,
    pub kind: &'a str,
    pub labels: &'a BTreeMap<String, String>,
}

impl Filter {
    pub fn parse(s: &str) -> Result<Filter, String> {
        let bad = |why: &str| format!("filter {s:?}: {why}");
        let mut sels = Vec::new();
        let mut rest = s.trim();
        while !rest.is_empty() {
            let (path, after) = field_path(rest).map_err(|w| bad(&w))?;
            let field = match path.as_slice() {
                [f] if f == "name" => Field::Name,
                [f] if f == "parent" => Field::Parent,
                [f] if f == "kind" => Field::Kind,
                [l, k] if l == "labels" => Field::Label(k.clone()),
                _ => return Err(bad(&format!("unknown field {}", path.join(".")))),
            };
            let after = after.trim_start();
            let (op, after) = if let Some(v) = after.strip_prefix("==") {
                let (v, a) = value(v).map_err(|w| bad(&w))?;
                (Op::Eq(v), a)
            } else if let Some(v) = after.strip_prefix("!=") {
                let (v, a) = value(v).map_err(|w| bad(&w))?;
                (Op::Ne(v), a)
            } else if after.starts_with("~=") {
                return Err(bad("regular expressions (~=) are not supported"));
            } else {
                (Op::Present, after)
            };
            sels.push((field, op));
            let after = after.trim_start();
            rest = match after.strip_prefix(',') {
                Some(r) => r.trim_start(),
                None if after.is_empty() => after,
                None => return Err(bad(&format!("unexpected {after:?}"))),
            };
        }
        Ok(Filter(sels))
    }

    pub fn matches(&self, s: &Subject<'_>) -> bool {
        self.0.iter().all(|(f, op)| {
            let v = match f {
                Field::Name => Some(s.name),
                Field::Parent => Some(s.parent),
                Field::Kind => Some(s.kind),
                Field::Label(k) => s.labels.get(k).map(String::as_str),
            };
            match op {
                Op::Present => v.is_some_and(|v| !v.is_empty()),
                Op::Eq(want) => v == Some(want.as_str()),
                Op::Ne(want) => v != Some(want.as_str()),
            }
        })
    }
}

/// Any of `filters` matches (no filter: everything does).
pub fn any_matches(filters: &[Filter], s: &Subject<'_>) -> bool {
    filters.is_empty() || filters.iter().any(|f| f.matches(s))
}

fn quoted(s: &str) -> Result<(String, &str), String> {
    let mut out = String::new();
    let mut chars = s.char_indices().skip(1);
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Ok((out, &s[i + 1..])),
            '\\' => match chars.next() {
                Some((_, e)) => out.push(e),
                None => break,
            },
            c => out.push(c),
        }
    }
    Err("unterminated quoted string".into())
}

fn field_path(s: &str) -> Result<(Vec<String>, &str), String> {
    let mut parts = Vec::new();
    let mut rest = s;
    loop {
        let (part, after) = if rest.starts_with('"') {
            quoted(rest)?
        } else {
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '-'))
                .unwrap_or(rest.len());
            if end == 0 {
                return Err(format!("a field name was expected at {rest:?}"));
            }
            (rest[..end].to_string(), &rest[end..])
        };
        parts.push(part);
        match after.strip_prefix('.') {
            Some(a) => rest = a,
            None => return Ok((parts, after)),
        }
    }
}

fn value(s: &str) -> Result<(String, &str), String> {
    let s = s.trim_start();
    if s.starts_with('"') {
        return quoted(s);
    }
    let end = s.find(|c: char| c == ',' || c.is_whitespace()).unwrap_or(s.len());
    Ok((s[..end].to_string(), &s[end..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subject<'a>(labels: &'a BTreeMap<String, String>, parent: &'a str) -> Subject<'a> {
        Subject { name: "default/4/sha256:ab", parent, kind: "committed", labels }
    }

    #[test]
    fn containerds_target_filter_matches_exactly() {
        let mut labels = BTreeMap::new();
        labels.insert("containerd.io/snapshot.ref".to_string(), "sha256:ab".to_string());
        let f =
            Filter::parse(r#"labels."containerd.io/snapshot.ref"==sha256:ab,parent=="default/3/sha256:cd""#)
                .unwrap();
        assert!(f.matches(&subject(&labels, "default/3/sha256:cd")));
        assert!(!f.matches(&subject(&labels, "")));
        let f = Filter::parse(r#"labels."containerd.io/snapshot.ref"==sha256:ab,parent=="""#).unwrap();
        assert!(f.matches(&subject(&labels, "")));
        assert!(
            Filter::parse(r#"labels."containerd.io/snapshot.ref""#).unwrap().matches(&subject(&labels, ""))
        );
        assert!(
            Filter::parse("kind!=active , name==default/4/sha256:ab").unwrap().matches(&subject(&labels, ""))
        );
        assert!(!Filter::parse("labels.missing").unwrap().matches(&subject(&labels, "")));
    }

    #[test]
    fn bad_filters_are_refused_with_the_reason() {
        for (f, why) in [
            ("name~=x", "regular expressions"),
            ("size==3", "unknown field size"),
            ("labels.\"x==1", "unterminated"),
            ("name==a b", "unexpected"),
            ("==a", "field name"),
        ] {
            let e = Filter::parse(f).unwrap_err();
            assert!(e.contains(why), "{f}: {e}");
        }
    }
}
