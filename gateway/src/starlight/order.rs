//! Start-up order: which contents a container reads first, so they go first in the bundle.
//!
//! With recorded traces, paths are ranked by their mean position across traces. Without (and
//! after the traced paths), the default order is: the entrypoint's program, its interpreter or
//! dynamic loader and shared libraries (read from its ELF headers, transitively), then `/etc`,
//! then everything else in path order, which keeps each directory's files together.

use std::collections::{HashMap, HashSet, VecDeque};

use starlight_format::wire::{Reader, Writer};
use starlight_format::{Digest, Entry, Kind};

use super::image::Prepared;

/// Symlinks followed while resolving one path, as Linux's `MAXSYMLINKS`.
const MAX_HOPS: usize = 40;
/// Programs and libraries examined for one image.
pub const MAX_PROGRAMS: usize = 128;
/// Programs larger than this are not examined (their headers would be too, but we read whole files).
pub const MAX_PROGRAM_BYTES: u64 = 64 << 20;
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Trace positions are kept as integers in [0, SCALE].
const SCALE: u64 = 1_000_000;

/// Splits a path into its components, dropping empty ones and `.`.
fn components(p: &[u8]) -> impl Iterator<Item = &[u8]> {
    p.split(|&b| b == b'/').filter(|c| !c.is_empty() && *c != b".")
}

/// Resolves `path` (absolute or relative to the root) inside the image, following symlinks in
/// every component, never leaving the root. The result names an existing entry.
pub fn resolve(p: &Prepared, path: &[u8]) -> Option<Vec<u8>> {
    let mut todo: VecDeque<Vec<u8>> = components(path).map(<[u8]>::to_vec).collect();
    let mut cur: Vec<Vec<u8>> = Vec::new();
    let mut hops = 0;
    while let Some(c) = todo.pop_front() {
        if c == b".." {
            cur.pop();
            continue;
        }
        cur.push(c);
        let here = cur.join(&b'/');
        match &p.entries[*p.by_path.get(&here)?].kind {
            Kind::Symlink { target } => {
                hops += 1;
                if hops > MAX_HOPS {
                    return None;
                }
                cur.pop();
                if target.first() == Some(&b'/') {
                    cur.clear();
                }
                let parts: Vec<&[u8]> = components(target).collect();
                for t in parts.into_iter().rev() {
                    todo.push_front(t.to_vec());
                }
            }
            Kind::Dir => {}
            // Anything else must be the last component.
            _ if !todo.is_empty() => return None,
            _ => {}
        }
    }
    Some(cur.join(&b'/'))
}

#[derive(serde::Deserialize, Default)]
struct ConfigJson {
    #[serde(default)]
    config: Option<RunConfig>,
}

#[derive(serde::Deserialize, Default)]
struct RunConfig {
    #[serde(rename = "Entrypoint", default)]
    entrypoint: Option<Vec<String>>,
    #[serde(rename = "Cmd", default)]
    cmd: Option<Vec<String>>,
    #[serde(rename = "Env", default)]
    env: Option<Vec<String>>,
    #[serde(rename = "WorkingDir", default)]
    working_dir: Option<String>,
}

/// The programs the container starts with: `argv[0]` of entrypoint + cmd found on `PATH`, and the
/// command of a `sh -c "..."` wrapper too.
pub fn entry_programs(p: &Prepared) -> Vec<Vec<u8>> {
    let cfg: ConfigJson = serde_json::from_slice(&p.record.config).unwrap_or_default();
    let run = cfg.config.unwrap_or_default();
    let argv: Vec<String> =
        run.entrypoint.unwrap_or_default().into_iter().chain(run.cmd.unwrap_or_default()).collect();
    let path_var = run
        .env
        .unwrap_or_default()
        .into_iter()
        .find_map(|e| e.strip_prefix("PATH=").map(str::to_string))
        .unwrap_or_else(|| DEFAULT_PATH.to_string());
    let workdir = run.working_dir.unwrap_or_default();
    let mut names: Vec<String> = argv.first().cloned().into_iter().collect();
    let shell = argv.first().map(|a| a.rsplit('/').next().unwrap_or(a)).unwrap_or("");
    if ["sh", "bash", "dash"].contains(&shell) && argv.get(1).map(String::as_str) == Some("-c") {
        let words = argv.get(2).map(|s| s.split_whitespace().collect::<Vec<_>>()).unwrap_or_default();
        let first = words.iter().find(|w| **w != "exec" && !w.contains('='));
        names.extend(first.map(|w| w.to_string()));
    }
    let mut out = Vec::new();
    for name in names {
        let found = if name.contains('/') {
            let full = if name.starts_with('/') { name.clone() } else { format!("{workdir}/{name}") };
            resolve(p, full.as_bytes())
        } else {
            path_var.split(':').find_map(|dir| {
                let r = resolve(p, format!("{dir}/{name}").as_bytes())?;
                p.content_of(&r).map(|_| r)
            })
        };
        out.extend(found);
    }
    out
}

/// Library directories of the image, in the order the dynamic loader searches them by default.
pub fn library_dirs(p: &Prepared) -> Vec<Vec<u8>> {
    let mut dirs: Vec<Vec<u8>> = Vec::new();
    for base in ["lib", "usr/lib"] {
        for e in &p.entries {
            let rest = e.path.strip_prefix(base.as_bytes()).and_then(|r| r.strip_prefix(b"/"));
            if let Some(name) = rest
                && !name.contains(&b'/')
                && name.windows(7).any(|w| w == b"-linux-")
                && matches!(e.kind, Kind::Dir | Kind::Symlink { .. })
            {
                dirs.push(e.path.clone());
            }
        }
    }
    for d in ["lib", "usr/lib", "lib64", "usr/lib64", "usr/local/lib"] {
        dirs.push(d.as_bytes().to_vec());
    }
    dirs
}

/// What a program needs to start: its ELF interpreter and `DT_NEEDED` libraries, or a script's
/// interpreter.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Needs {
    pub interpreter: Option<Vec<u8>>,
    pub libraries: Vec<Vec<u8>>,
    pub runpath: Vec<Vec<u8>>,
}

/// Reads what `data` (a whole program file) needs. Unknown or malformed files need nothing.
pub fn needs(data: &[u8]) -> Needs {
    if let Some(rest) = data.strip_prefix(b"#!") {
        let line = rest.split(|&b| b == b'\n').next().unwrap_or(b"");
        let interp = line.split(|b| b.is_ascii_whitespace()).find(|w| !w.is_empty());
        return Needs { interpreter: interp.map(<[u8]>::to_vec), ..Needs::default() };
    }
    elf_needs(data).unwrap_or_default()
}

fn elf_needs(d: &[u8]) -> Option<Needs> {
    if d.get(..4)? != b"\x7fELF" {
        return None;
    }
    let wide = match d.get(4)? {
        1 => false,
        2 => true,
        _ => return None,
    };
    let little = match d.get(5)? {
        1 => true,
        2 => false,
        _ => return None,
    };
    let int = |off: usize, n: usize| -> Option<u64> {
        let b = d.get(off..off.checked_add(n)?)?;
        let mut v = 0u64;
        for i in 0..n {
            let byte = if little { b[n - 1 - i] } else { b[i] };
            v = (v << 8) | u64::from(byte);
        }
        Some(v)
    };
    let word = if wide { 8 } else { 4 };
    let (phoff, phentsize, phnum) = if wide {
        (int(0x20, 8)?, int(0x36, 2)?, int(0x38, 2)?)
    } else {
        (int(0x1c, 4)?, int(0x2a, 2)?, int(0x2c, 2)?)
    };
    struct Ph {
        kind: u64,
        offset: u64,
        vaddr: u64,
        filesz: u64,
    }
    let mut phs = Vec::new();
    for i in 0..phnum.min(256) {
        let base = usize::try_from(phoff.checked_add(i * phentsize)?).ok()?;
        phs.push(if wide {
            Ph {
                kind: int(base, 4)?,
                offset: int(base + 8, 8)?,
                vaddr: int(base + 16, 8)?,
                filesz: int(base + 32, 8)?,
            }
        } else {
            Ph {
                kind: int(base, 4)?,
                offset: int(base + 4, 4)?,
                vaddr: int(base + 8, 4)?,
                filesz: int(base + 16, 4)?,
            }
        });
    }
    let cstr = |off: u64| -> Option<Vec<u8>> {
        let s = d.get(usize::try_from(off).ok()?..)?;
        Some(s[..s.iter().position(|&b| b == 0)?].to_vec())
    };
    let mut out = Needs::default();
    if let Some(ph) = phs.iter().find(|p| p.kind == 3) {
        out.interpreter = cstr(ph.offset).filter(|s| !s.is_empty());
    }
    let Some(dynamic) = phs.iter().find(|p| p.kind == 2) else { return Some(out) };
    let (mut needed, mut runpath, mut strtab) = (Vec::new(), Vec::new(), None);
    let mut off = dynamic.offset;
    while off + 2 * word as u64 <= dynamic.offset + dynamic.filesz {
        let o = usize::try_from(off).ok()?;
        let (tag, val) = (int(o, word)?, int(o + word, word)?);
        match tag {
            0 => break,
            1 => needed.push(val),
            5 => strtab = Some(val),
            15 | 29 => runpath.push(val),
            _ => {}
        }
        off += 2 * word as u64;
    }
    // DT_STRTAB is an address: map it to a file offset through the segment that loads it.
    let strtab = strtab?;
    let load = phs.iter().find(|p| p.kind == 1 && p.vaddr <= strtab && strtab < p.vaddr + p.filesz)?;
    let table = strtab - load.vaddr + load.offset;
    out.libraries = needed.into_iter().filter_map(|v| cstr(table.checked_add(v)?)).collect();
    for r in runpath {
        if let Some(s) = cstr(table.saturating_add(r)) {
            out.runpath.extend(s.split(|&b| b == b':').filter(|p| !p.is_empty()).map(<[u8]>::to_vec));
        }
    }
    Some(out)
}

/// Merged start-up traces of one image: for each path, the sum of its positions (scaled to
/// [0, SCALE]) over the traces that saw it, and how many did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Ranks {
    pub traces: u64,
    pub paths: HashMap<Vec<u8>, (u64, u64)>,
}

impl Ranks {
    /// Adds one trace: paths in the order they were first used.
    pub fn add(&mut self, trace: &[Vec<u8>]) {
        let n = trace.len().max(1) as u64;
        let mut seen = HashSet::new();
        for (i, path) in trace.iter().enumerate() {
            if !seen.insert(path) {
                continue;
            }
            let slot = self.paths.entry(path.clone()).or_insert((0, 0));
            slot.0 += i as u64 * SCALE / n;
            slot.1 += 1;
        }
        self.traces += 1;
    }

    /// Traced paths, best first: by mean position, a trace that missed a path counting it last.
    pub fn ordered(&self) -> Vec<&[u8]> {
        let mut v: Vec<(u64, &[u8])> = self
            .paths
            .iter()
            .map(|(p, (sum, count))| {
                ((sum + (self.traces.saturating_sub(*count)) * SCALE) / self.traces.max(1), p.as_slice())
            })
            .collect();
        v.sort();
        v.into_iter().map(|(_, p)| p).collect()
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new();
        w.raw(&[b'R', 1]);
        w.varint(self.traces);
        let mut paths: Vec<_> = self.paths.iter().collect();
        paths.sort();
        w.varint(paths.len() as u64);
        for (p, (sum, count)) in paths {
            w.bytes(p);
            w.varint(*sum);
            w.varint(*count);
        }
        w.buf
    }

    pub fn decode(data: &[u8]) -> Result<Ranks, starlight_format::FormatError> {
        let mut r = Reader::new(data);
        if r.u8("record type")? != b'R' || r.u8("record version")? != 1 {
            return Err(starlight_format::FormatError::BadMagic { what: "trace ranks" });
        }
        let traces = r.varint("traces")?;
        let n = r.varint_max(10_000_000, "path count")?;
        let mut paths = HashMap::with_capacity((n as usize).min(r.remaining() / 3));
        for _ in 0..n {
            let p = r.bytes(starlight_format::path::MAX_PATH, "path")?.to_vec();
            let sum = r.varint("sum")?;
            let count = r.varint("count")?;
            paths.insert(p, (sum, count));
        }
        r.finish()?;
        Ok(Ranks { traces, paths })
    }
}

/// Object-store key of an image's start-up paths found without traces.
pub fn startup_key(image: &Digest) -> String {
    format!("startup/sha256/{}", image.hex())
}

/// Encodes a list of paths (any bytes).
pub fn encode_paths(paths: &[Vec<u8>]) -> Vec<u8> {
    let mut w = Writer::new();
    w.raw(&[b'S', 1]);
    w.varint(paths.len() as u64);
    for p in paths {
        w.bytes(p);
    }
    w.buf
}

pub fn decode_paths(data: &[u8]) -> Result<Vec<Vec<u8>>, starlight_format::FormatError> {
    let mut r = Reader::new(data);
    if r.u8("record type")? != b'S' || r.u8("record version")? != 1 {
        return Err(starlight_format::FormatError::BadMagic { what: "start-up paths" });
    }
    let n = r.varint_max(MAX_PROGRAMS as u64, "path count")?;
    let mut out = Vec::with_capacity(n as usize);
    for _ in 0..n {
        out.push(r.bytes(starlight_format::path::MAX_PATH, "path")?.to_vec());
    }
    r.finish()?;
    Ok(out)
}

/// Object-store key of the merged traces of image `image` in repository `name`. Traces are kept
/// per repository: a pusher's traces reorder only the bundles of repositories it may push to. (The
/// fixed-length tail keeps keys of different names apart; keys of earlier versions,
/// `traces/sha256/<hex>`, name no repository and are not read.)
pub fn ranks_key(name: &str, image: &Digest) -> String {
    format!("traces/{name}/sha256/{}", image.hex())
}

/// Every content of the image once, without traces: start-up paths, `/etc`, then the rest in path
/// order (which keeps each directory's files together).
pub fn base_order(p: &Prepared, startup: &[Vec<u8>]) -> Vec<Digest> {
    let mut out = Vec::with_capacity(p.sizes.len());
    let mut seen = HashSet::with_capacity(p.sizes.len());
    for path in startup {
        if let Some(d) = p.content_of(path)
            && seen.insert(d)
        {
            out.push(d);
        }
    }
    let mut rest: Vec<&Entry> = p.entries.iter().collect();
    rest.sort_by(|a, b| a.path.cmp(&b.path));
    let is_etc = |e: &Entry| e.path.starts_with(b"etc/");
    let etc = rest.iter().filter(|e| is_etc(e));
    for e in etc.chain(rest.iter().filter(|e| !is_etc(e))) {
        if let Kind::File { digest: Some(d), .. } = &e.kind
            && seen.insert(*d)
        {
            out.push(*d);
        }
    }
    out
}

/// The order to send contents in: traced paths first, by rank, then `base` (see [`base_order`]).
pub fn content_order(p: &Prepared, ranks: Option<&Ranks>, base: &[Digest]) -> Vec<Digest> {
    let Some(r) = ranks else { return base.to_vec() };
    let mut out = Vec::with_capacity(base.len());
    let mut seen = HashSet::new();
    for path in r.ordered() {
        if let Some(d) = p.content_of(path)
            && seen.insert(d)
        {
            out.push(d);
        }
    }
    out.extend(base.iter().filter(|d| !seen.contains(*d)));
    out
}

/// Groups small contents so that they fill whole batches: walking `order`, contents for which
/// `batchable` holds (with their sizes) gather in a group of up to `group_max` bytes, and the
/// others met meanwhile wait until the group is full. `pinned` contents (traced and start-up
/// paths) keep their exact place: the group and the waiting ones go out before each of them.
pub fn group_small(
    order: Vec<Digest>,
    batchable: impl Fn(&Digest) -> Option<u64>,
    pinned: &HashSet<Digest>,
    group_max: u64,
) -> Vec<Digest> {
    let mut out = Vec::with_capacity(order.len());
    let (mut group, mut waiting, mut bytes) = (Vec::new(), Vec::new(), 0u64);
    let flush =
        |out: &mut Vec<Digest>, group: &mut Vec<Digest>, waiting: &mut Vec<Digest>, bytes: &mut u64| {
            out.append(group);
            out.append(waiting);
            *bytes = 0;
        };
    for d in order {
        if pinned.contains(&d) {
            flush(&mut out, &mut group, &mut waiting, &mut bytes);
            out.push(d);
            continue;
        }
        match batchable(&d) {
            Some(size) => {
                if bytes + size > group_max {
                    flush(&mut out, &mut group, &mut waiting, &mut bytes);
                }
                group.push(d);
                bytes += size;
            }
            None => waiting.push(d),
        }
    }
    flush(&mut out, &mut group, &mut waiting, &mut bytes);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use starlight_format::{ImageRecord, Platform};

    fn entry(path: &str, kind: Kind) -> Entry {
        Entry {
            path: path.as_bytes().to_vec(),
            kind,
            mode: 0o755,
            uid: 0,
            gid: 0,
            mtime: 0,
            mtime_nsec: 0,
            xattrs: Vec::new(),
        }
    }

    fn file(path: &str, n: u8) -> Entry {
        entry(path, Kind::File { size: 10, digest: Some(Digest::of(&[n])) })
    }

    fn link(path: &str, target: &str) -> Entry {
        entry(path, Kind::Symlink { target: target.as_bytes().to_vec() })
    }

    fn image(config: &str, entries: Vec<Entry>) -> Prepared {
        let record = ImageRecord {
            manifest_digest: Digest::of(b"m"),
            name: "t".into(),
            tag: None,
            platform: Platform::host(),
            media_type: String::new(),
            manifest: Vec::new(),
            config_digest: Digest::of(config.as_bytes()),
            config: config.as_bytes().to_vec(),
            layers: Vec::new(),
        };
        let mut by_path = HashMap::new();
        let mut sizes = HashMap::new();
        for (i, e) in entries.iter().enumerate() {
            by_path.insert(e.path.clone(), i);
            if let Kind::File { size, digest: Some(d) } = &e.kind {
                sizes.insert(*d, *size);
            }
        }
        Prepared::new(record, entries)
    }

    fn merged_usr() -> Vec<Entry> {
        vec![
            entry("usr", Kind::Dir),
            entry("usr/bin", Kind::Dir),
            entry("usr/lib", Kind::Dir),
            entry("usr/lib/x86_64-linux-gnu", Kind::Dir),
            link("bin", "usr/bin"),
            link("lib", "usr/lib"),
            link("lib64", "usr/lib64"),
            entry("usr/lib64", Kind::Dir),
            file("usr/bin/redis-server", 1),
            file("usr/lib/x86_64-linux-gnu/libc.so.6", 2),
            link("usr/lib64/ld-linux-x86-64.so.2", "../lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"),
            file("usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2", 3),
            entry("etc", Kind::Dir),
            file("etc/passwd", 4),
            file("usr/bin/other", 5),
            entry("usr/bin/again", Kind::Hardlink { target: b"usr/bin/other".to_vec() }),
        ]
    }

    #[test]
    fn resolves_through_symlinked_directories() {
        let p = image("{}", merged_usr());
        assert_eq!(
            resolve(&p, b"/lib64/ld-linux-x86-64.so.2").unwrap(),
            b"usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"
        );
        assert_eq!(resolve(&p, b"/bin/redis-server").unwrap(), b"usr/bin/redis-server");
        // `..` never climbs above the root.
        assert_eq!(resolve(&p, b"/../../etc/passwd").unwrap(), b"etc/passwd");
        assert_eq!(resolve(&p, b"/etc/passwd/x"), None);
        assert_eq!(resolve(&p, b"/nope"), None);
    }

    #[test]
    fn symlink_loops_end() {
        let p = image("{}", vec![link("a", "b"), link("b", "a")]);
        assert_eq!(resolve(&p, b"a"), None);
    }

    #[test]
    fn finds_the_entrypoint_on_path_and_in_sh_c() {
        let cfg = r#"{"config":{"Cmd":["sh","-c","exec redis-server /etc/redis.conf"],
                     "Env":["PATH=/usr/local/bin:/bin"]}}"#;
        let mut entries = merged_usr();
        entries.push(file("usr/bin/sh", 9));
        let p = image(cfg, entries);
        assert_eq!(entry_programs(&p), vec![b"usr/bin/sh".to_vec(), b"usr/bin/redis-server".to_vec()]);
    }

    #[test]
    fn reads_the_host_binaries_needs() {
        // A real dynamically linked program of this machine.
        let data = std::fs::read("/bin/ls").expect("/bin/ls");
        let n = needs(&data);
        let interp = String::from_utf8(n.interpreter.unwrap()).unwrap();
        assert!(interp.contains("ld-linux"), "{interp}");
        assert!(n.libraries.iter().any(|l| l == b"libc.so.6"), "{:?}", n.libraries);
        assert_eq!(needs(b"#!/bin/sh -e\necho").interpreter.unwrap(), b"/bin/sh");
        assert_eq!(needs(b"\x7fELF garbage"), Needs::default());
        assert_eq!(needs(&data[..100]).libraries, Vec::<Vec<u8>>::new());
    }

    #[test]
    fn small_contents_group_and_pinned_ones_stay() {
        let d = |n: u8| Digest::of(&[n]);
        // 1..=6 small (40 bytes each), 10 and 11 large, 20 pinned.
        let order = vec![d(20), d(1), d(10), d(2), d(3), d(11), d(4), d(5), d(6)];
        let small = |x: &Digest| (1..=6).any(|n| *x == d(n)).then_some(40);
        let pinned: HashSet<Digest> = [d(20)].into();
        let got = group_small(order, small, &pinned, 100);
        assert_eq!(got, vec![d(20), d(1), d(2), d(10), d(3), d(4), d(11), d(5), d(6)]);
    }

    #[test]
    fn path_lists_roundtrip() {
        let paths = vec![b"usr/bin/x".to_vec(), vec![0xff, b'\n', b'a']];
        assert_eq!(decode_paths(&encode_paths(&paths)).unwrap(), paths);
        assert!(decode_paths(b"S\x02\x00").is_err());
        assert!(decode_paths(&encode_paths(&paths)[..5]).is_err());
    }

    #[test]
    fn ranks_merge_and_roundtrip() {
        let mut r = Ranks::default();
        let t = |v: &[&str]| v.iter().map(|s| s.as_bytes().to_vec()).collect::<Vec<_>>();
        r.add(&t(&["a", "b", "c"]));
        r.add(&t(&["b", "a", "c"]));
        r.add(&t(&["b", "c"]));
        // Mean positions: b 0.11, a 0.44 (missed by one trace: counted last there), c 0.61.
        assert_eq!(r.ordered(), vec![b"b".as_slice(), b"a", b"c"]);
        assert_eq!(Ranks::decode(&r.encode()).unwrap(), r);
        assert!(Ranks::decode(b"R\x02").is_err());
    }

    #[test]
    fn order_is_traces_then_startup_then_etc_then_rest() {
        let p = image("{}", merged_usr());
        let mut r = Ranks::default();
        r.add(&[b"usr/bin/again".to_vec()]);
        let startup = vec![b"usr/bin/redis-server".to_vec()];
        let order = content_order(&p, Some(&r), &base_order(&p, &startup));
        let d = |n: u8| Digest::of(&[n]);
        assert_eq!(order, vec![d(5), d(1), d(4), d(3), d(2)]);
    }
}
