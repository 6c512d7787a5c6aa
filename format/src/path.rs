//! Path normalization shared by the converter and the worker. A TOC holds only normalized paths, so
//! that nothing downstream has to re-check them against `..` or absolute-path tricks.

use crate::FormatError;

/// The longest path a TOC may hold, as Linux's `PATH_MAX`. It also bounds directory nesting.
pub const MAX_PATH: usize = 4096;

/// Normalizes a path from a tar header: strips one leading `./` (and repeats of it), trailing `/`,
/// empty and `.` components. Rejects absolute paths, `..` components, NUL bytes and paths longer
/// than [`MAX_PATH`]. The root directory normalizes to the empty path.
pub fn normalize(raw: &[u8]) -> Result<Vec<u8>, FormatError> {
    let bad = |why: &'static str| FormatError::BadPath {
        path: String::from_utf8_lossy(&raw[..raw.len().min(200)]).into_owned(),
        why,
    };
    if raw.len() > MAX_PATH {
        return Err(bad("longer than 4096 bytes"));
    }
    if raw.contains(&0) {
        return Err(bad("contains a NUL byte"));
    }
    if raw.first() == Some(&b'/') {
        return Err(bad("absolute path"));
    }
    let mut out = Vec::with_capacity(raw.len());
    for comp in raw.split(|&b| b == b'/') {
        match comp {
            b"" | b"." => continue,
            b".." => return Err(bad("contains a `..` component")),
            c => {
                if !out.is_empty() {
                    out.push(b'/');
                }
                out.extend_from_slice(c);
            }
        }
    }
    Ok(out)
}

/// True when `path` is already in normal form.
pub fn is_normal(path: &[u8]) -> bool {
    normalize(path).is_ok_and(|n| n == path)
}

/// The parent of a normalized path (`b""` for top-level entries and the root).
pub fn parent(path: &[u8]) -> &[u8] {
    match path.iter().rposition(|&b| b == b'/') {
        Some(i) => &path[..i],
        None => b"",
    }
}

/// The last component of a normalized path.
pub fn file_name(path: &[u8]) -> &[u8] {
    match path.iter().rposition(|&b| b == b'/') {
        Some(i) => &path[i + 1..],
        None => path,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes() {
        assert_eq!(normalize(b"./a/b/").unwrap(), b"a/b");
        assert_eq!(normalize(b"a//./b").unwrap(), b"a/b");
        assert_eq!(normalize(b"./").unwrap(), b"");
        assert_eq!(normalize(b"././x").unwrap(), b"x");
        assert_eq!(normalize(b"caf\xe9").unwrap(), b"caf\xe9");
    }

    #[test]
    fn rejects_escapes() {
        assert!(normalize(b"../etc/passwd").is_err());
        assert!(normalize(b"a/../../b").is_err());
        assert!(normalize(b"/etc/passwd").is_err());
        assert!(normalize(b"a\0b").is_err());
        assert!(normalize(&vec![b'a'; 4097]).is_err());
    }

    #[test]
    fn splits() {
        assert_eq!(parent(b"a/b/c"), b"a/b");
        assert_eq!(parent(b"a"), b"");
        assert_eq!(file_name(b"a/b/c"), b"c");
    }
}
