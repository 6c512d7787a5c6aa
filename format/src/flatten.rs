//! Flattening: the filesystem an image's layers describe once applied in order with OCI semantics
//! (the image spec's "applying changesets"). Whiteouts and opaque markers remove what lower layers
//! put there; a file replaces a directory and the reverse; directories merge; hardlinks are tracked
//! by inode, so a link keeps its content when another name of the same inode is removed later,
//! exactly as with tar extraction on a real filesystem.
//!
//! The result lists every path once, parents before children. Names of one inode become one
//! regular entry (the first in that order) and hardlinks to it.

use std::collections::{BTreeMap, HashMap};

use crate::toc::{Entry, Kind, Toc};

/// Why layers cannot be applied.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FlattenError {
    #[error("layer {layer}: hardlink {path:?} points at {target:?}, which does not exist")]
    MissingLinkTarget { layer: usize, path: String, target: String },
    #[error("layer {layer}: hardlink {path:?} points at the directory {target:?}")]
    LinkToDirectory { layer: usize, path: String, target: String },
}

type Inode = u64;

/// The state while applying layers: names to inodes, inodes to their entry.
#[derive(Default)]
struct Tree {
    names: BTreeMap<Vec<u8>, Inode>,
    inodes: HashMap<Inode, Entry>,
    next: Inode,
}

/// The range of keys strictly below `dir` in byte order: `dir/` up to `dir0` (`0` follows `/`).
fn subtree(dir: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let mut lo = dir.to_vec();
    lo.push(b'/');
    let mut hi = dir.to_vec();
    hi.push(b'0');
    (lo, hi)
}

impl Tree {
    fn is_dir(&self, path: &[u8]) -> bool {
        self.names.get(path).is_some_and(|i| matches!(self.inodes[i].kind, Kind::Dir))
    }

    /// Removes everything strictly below `dir`.
    fn clear_below(&mut self, dir: &[u8]) {
        if dir.is_empty() {
            // The root's subtree is everything but the root.
            let root = self.names.get(&Vec::new()).copied();
            self.names.clear();
            if let Some(r) = root {
                self.names.insert(Vec::new(), r);
            }
        } else {
            let (lo, hi) = subtree(dir);
            let doomed: Vec<Vec<u8>> = self.names.range(lo..hi).map(|(k, _)| k.clone()).collect();
            for k in doomed {
                self.names.remove(&k);
            }
        }
    }

    /// Removes `path` and, if it is a directory, everything below it.
    fn remove(&mut self, path: &[u8]) {
        if self.names.remove(path).is_some() {
            self.clear_below(path);
        }
    }

    fn insert(&mut self, path: Vec<u8>, entry: Entry) {
        let ino = self.next;
        self.next += 1;
        self.inodes.insert(ino, entry);
        self.names.insert(path, ino);
    }

    /// Makes every ancestor of `path` a directory, as extraction would create it.
    fn ensure_parents(&mut self, path: &[u8], template: &Entry) {
        let mut end = 0;
        while let Some(i) = path[end..].iter().position(|&b| b == b'/') {
            let parent = &path[..end + i];
            if !self.is_dir(parent) {
                self.remove(parent);
                let mut dir = template.clone();
                dir.path = parent.to_vec();
                dir.kind = Kind::Dir;
                dir.mode = 0o755;
                dir.xattrs.clear();
                self.insert(parent.to_vec(), dir);
            }
            end += i + 1;
        }
    }
}

/// Applies `layers` (lowest first) and returns the final filesystem.
pub fn flatten(layers: &[&Toc]) -> Result<Vec<Entry>, FlattenError> {
    let mut t = Tree::default();
    for (n, layer) in layers.iter().enumerate() {
        // Whiteouts and opaque markers apply to the layers below only, whatever their tar order:
        // a layer may hide a lower `a` and add its own `a`.
        for e in &layer.entries {
            match e.kind {
                Kind::Whiteout => t.remove(&e.path),
                Kind::Opaque => t.clear_below(&e.path),
                _ => {}
            }
        }
        for e in &layer.entries {
            let path = e.path.clone();
            match &e.kind {
                Kind::Whiteout | Kind::Opaque => continue,
                Kind::Dir if t.is_dir(&path) => {
                    // Directories merge: the new metadata, the old children.
                    let ino = t.names[&path];
                    t.inodes.insert(ino, e.clone());
                    continue;
                }
                Kind::Hardlink { target } => {
                    let show = |p: &[u8]| String::from_utf8_lossy(p).into_owned();
                    let Some(&ino) = t.names.get(target) else {
                        return Err(FlattenError::MissingLinkTarget {
                            layer: n,
                            path: show(&path),
                            target: show(target),
                        });
                    };
                    if matches!(t.inodes[&ino].kind, Kind::Dir) {
                        return Err(FlattenError::LinkToDirectory {
                            layer: n,
                            path: show(&path),
                            target: show(target),
                        });
                    }
                    t.remove(&path);
                    t.ensure_parents(&path, e);
                    t.names.insert(path, ino);
                    continue;
                }
                _ => {}
            }
            t.remove(&path);
            t.ensure_parents(&path, e);
            t.insert(path, e.clone());
        }
    }

    // Parents before children: compare paths component by component (`/` sorts before any byte).
    let mut names: Vec<(Vec<u8>, Inode)> = t.names.into_iter().collect();
    names.sort_by(|(a, _), (b, _)| a.split(|&c| c == b'/').cmp(b.split(|&c| c == b'/')));
    let mut first_name: HashMap<Inode, Vec<u8>> = HashMap::new();
    let mut out = Vec::with_capacity(names.len());
    for (path, ino) in names {
        let inode = &t.inodes[&ino];
        let mut e = inode.clone();
        match first_name.get(&ino) {
            Some(primary) => e.kind = Kind::Hardlink { target: primary.clone() },
            None => {
                if !matches!(inode.kind, Kind::Dir) {
                    first_name.insert(ino, path.clone());
                }
            }
        }
        e.path = path;
        out.push(e);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Digest;

    fn e(path: &str, kind: Kind) -> Entry {
        Entry {
            path: path.as_bytes().to_vec(),
            kind,
            mode: 0o644,
            uid: 0,
            gid: 0,
            mtime: 0,
            mtime_nsec: 0,
            xattrs: vec![],
        }
    }
    fn file(path: &str, content: &str) -> Entry {
        e(path, Kind::File { size: content.len() as u64, digest: Some(Digest::of(content.as_bytes())) })
    }
    fn dir(path: &str) -> Entry {
        e(path, Kind::Dir)
    }
    fn toc(entries: Vec<Entry>) -> Toc {
        Toc { diff_id: Digest([0; 32]), entries }
    }
    fn flat(layers: &[Toc]) -> Vec<(String, String)> {
        let refs: Vec<&Toc> = layers.iter().collect();
        flatten(&refs)
            .unwrap()
            .into_iter()
            .map(|x| {
                let what = match x.kind {
                    Kind::File { digest: Some(d), .. } => format!("file {}", &d.hex()[..6]),
                    Kind::File { .. } => "empty".into(),
                    Kind::Dir => "dir".into(),
                    Kind::Symlink { target } => format!("-> {}", String::from_utf8_lossy(&target)),
                    Kind::Hardlink { target } => format!("link {}", String::from_utf8_lossy(&target)),
                    other => format!("{other:?}"),
                };
                (String::from_utf8_lossy(&x.path).into_owned(), what)
            })
            .collect()
    }
    fn h(s: &str) -> String {
        format!("file {}", &Digest::of(s.as_bytes()).hex()[..6])
    }

    #[test]
    fn whiteouts_remove_lower_files_and_subtrees() {
        let l1 = toc(vec![dir("a"), file("a/x", "1"), dir("a/d"), file("a/d/y", "2"), file("b", "3")]);
        let l2 = toc(vec![e("a/d", Kind::Whiteout), e("b", Kind::Whiteout)]);
        assert_eq!(flat(&[l1, l2]), vec![("a".into(), "dir".into()), ("a/x".into(), h("1"))]);
    }

    #[test]
    fn opaque_hides_lower_children_but_keeps_its_own() {
        let l1 = toc(vec![dir("a"), file("a/old", "1"), dir("a/sub"), file("a/sub/deep", "2")]);
        let l2 = toc(vec![dir("a"), e("a", Kind::Opaque), file("a/new", "3")]);
        assert_eq!(flat(&[l1, l2]), vec![("a".into(), "dir".into()), ("a/new".into(), h("3"))]);
    }

    #[test]
    fn a_layer_may_hide_and_re_add_the_same_name() {
        let l1 = toc(vec![dir("d"), file("d/f", "old")]);
        let l2 = toc(vec![file("d", "now a file"), e("d", Kind::Whiteout)]);
        assert_eq!(flat(&[l1, l2]), vec![("d".into(), h("now a file"))]);
    }

    #[test]
    fn files_and_directories_replace_each_other() {
        let l1 = toc(vec![file("x", "file"), dir("y"), file("y/child", "c")]);
        let l2 = toc(vec![dir("x"), file("x/inside", "i"), file("y", "file now")]);
        assert_eq!(
            flat(&[l1, l2]),
            vec![("x".into(), "dir".into()), ("x/inside".into(), h("i")), ("y".into(), h("file now"))]
        );
    }

    #[test]
    fn a_replaced_symlink_is_not_followed() {
        let l1 = toc(vec![
            dir("etc"),
            file("etc/real", "r"),
            e("etc/link", Kind::Symlink { target: b"real".to_vec() }),
        ]);
        let l2 = toc(vec![file("etc/link", "replaced")]);
        assert_eq!(
            flat(&[l1, l2]),
            vec![
                ("etc".into(), "dir".into()),
                ("etc/link".into(), h("replaced")),
                ("etc/real".into(), h("r"))
            ]
        );
    }

    #[test]
    fn a_symlink_parent_never_redirects_an_entry() {
        // Hostile layers: an entry "under" a symlink that points outside the image, in the same
        // layer and in a later one. The symlink gives way to a directory, as a name that must be
        // a directory; nothing is written through it.
        for target in ["/etc", "../../../../etc", "."] {
            let l1 = toc(vec![e("escape", Kind::Symlink { target: target.as_bytes().to_vec() })]);
            let l2 = toc(vec![file("escape/passwd", "owned")]);
            assert_eq!(
                flat(&[l1.clone(), l2]),
                vec![("escape".into(), "dir".into()), ("escape/passwd".into(), h("owned"))],
                "{target}"
            );
            let same = toc(vec![
                e("escape", Kind::Symlink { target: target.as_bytes().to_vec() }),
                file("escape/shadow", "owned"),
            ]);
            assert_eq!(
                flat(&[same]),
                vec![("escape".into(), "dir".into()), ("escape/shadow".into(), h("owned"))],
                "{target}"
            );
        }
    }

    #[test]
    fn directories_merge_and_take_the_upper_metadata() {
        let l1 = toc(vec![dir("d"), file("d/a", "a")]);
        let mut upper = dir("d");
        upper.mode = 0o700;
        let l2 = toc(vec![upper, file("d/b", "b")]);
        let refs = [&l1, &l2];
        let out = flatten(&refs).unwrap();
        assert_eq!(out[0].mode, 0o700);
        assert_eq!(out.len(), 3);
    }

    #[test]
    fn hardlinks_across_layers_keep_their_content() {
        let l1 = toc(vec![dir("bin"), file("bin/a", "prog")]);
        let l2 = toc(vec![e("bin/b", Kind::Hardlink { target: b"bin/a".to_vec() })]);
        // The original name goes away; the link keeps the inode and becomes its primary name.
        let l3 =
            toc(vec![e("bin/a", Kind::Whiteout), e("bin/c", Kind::Hardlink { target: b"bin/b".to_vec() })]);
        assert_eq!(
            flat(&[l1.clone(), l2.clone()]),
            vec![
                ("bin".into(), "dir".into()),
                ("bin/a".into(), h("prog")),
                ("bin/b".into(), "link bin/a".into())
            ]
        );
        assert_eq!(
            flat(&[l1, l2, l3]),
            vec![
                ("bin".into(), "dir".into()),
                ("bin/b".into(), h("prog")),
                ("bin/c".into(), "link bin/b".into())
            ]
        );
    }

    #[test]
    fn replacing_one_name_of_a_linked_inode_leaves_the_others() {
        let l1 = toc(vec![file("a", "shared"), e("b", Kind::Hardlink { target: b"a".to_vec() })]);
        let l2 = toc(vec![file("a", "new")]);
        assert_eq!(flat(&[l1, l2]), vec![("a".into(), h("new")), ("b".into(), h("shared"))]);
    }

    #[test]
    fn bad_links_are_errors() {
        let l = toc(vec![e("x", Kind::Hardlink { target: b"missing".to_vec() })]);
        assert!(matches!(flatten(&[&l]), Err(FlattenError::MissingLinkTarget { layer: 0, .. })));
        let l = toc(vec![dir("d"), e("x", Kind::Hardlink { target: b"d".to_vec() })]);
        assert!(matches!(flatten(&[&l]), Err(FlattenError::LinkToDirectory { .. })));
    }

    #[test]
    fn parents_come_before_children_and_missing_parents_are_made() {
        let l = toc(vec![file("a-b", "1"), file("a/b/c", "2")]);
        assert_eq!(
            flat(&[l]),
            vec![
                ("a".into(), "dir".into()),
                ("a/b".into(), "dir".into()),
                ("a/b/c".into(), h("2")),
                ("a-b".into(), h("1")),
            ]
        );
    }
}
