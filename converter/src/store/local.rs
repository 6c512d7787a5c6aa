//! The default object store: a local directory. Writes go to `.tmp/` and are renamed into place
//! after an fsync, so a crash never leaves a partial object under its final key.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;

use super::{ObjectStore, StoreError};

/// An object store in a local directory.
#[derive(Debug, Clone)]
pub struct LocalStore {
    root: Arc<PathBuf>,
}

impl LocalStore {
    /// Opens (creating if needed) the store at `dir`.
    pub fn open(dir: impl AsRef<Path>) -> Result<LocalStore, StoreError> {
        let root = dir.as_ref().to_path_buf();
        std::fs::create_dir_all(root.join(".tmp")).map_err(|source| StoreError::Io {
            key: String::new(),
            path: root.clone(),
            source,
        })?;
        Ok(LocalStore { root: Arc::new(root) })
    }

    /// The directory the store lives in.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The file that holds `key`. Keys are produced by this crate, but a key with `..` or a leading
    /// `/` would escape the root, so such keys are refused.
    pub fn path_of(&self, key: &str) -> Result<PathBuf, StoreError> {
        if key.is_empty() || key.starts_with('/') || key.split('/').any(|c| c == ".." || c.is_empty()) {
            return Err(StoreError::NotFound { key: key.to_string() });
        }
        Ok(self.root.join(key))
    }

    fn io(&self, key: &str, path: &Path) -> impl FnOnce(std::io::Error) -> StoreError {
        let (key, path) = (key.to_string(), path.to_path_buf());
        move |source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                StoreError::NotFound { key }
            } else {
                StoreError::Io { key, path, source }
            }
        }
    }

    /// Writes through a temporary file, then fsync, rename, and fsync of the directory.
    fn put_with(
        &self,
        key: &str,
        fill: impl FnOnce(&mut File) -> std::io::Result<()>,
    ) -> Result<(), StoreError> {
        let dest = self.path_of(key)?;
        let tmp_dir = self.root.join(".tmp");
        let mut tmp = tempfile::NamedTempFile::new_in(&tmp_dir).map_err(self.io(key, &tmp_dir))?;
        fill(tmp.as_file_mut()).map_err(self.io(key, tmp.path()))?;
        tmp.as_file().sync_all().map_err(self.io(key, tmp.path()))?;
        let parent = dest.parent().unwrap_or(&self.root);
        std::fs::create_dir_all(parent).map_err(self.io(key, parent))?;
        tmp.persist(&dest).map_err(|e| self.io(key, &dest)(e.error))?;
        File::open(parent).and_then(|d| d.sync_all()).map_err(self.io(key, parent))?;
        Ok(())
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| StoreError::Io {
        key: String::new(),
        path: PathBuf::new(),
        source: std::io::Error::other(e),
    })?
}

impl ObjectStore for LocalStore {
    async fn put_file(&self, key: &str, path: &Path) -> Result<(), StoreError> {
        let (this, key, src) = (self.clone(), key.to_string(), path.to_path_buf());
        blocking(move || {
            let mut input = File::open(&src).map_err(this.io(&key, &src))?;
            this.put_with(&key, |out| std::io::copy(&mut input, out).map(drop))
        })
        .await
    }

    async fn put_bytes(&self, key: &str, data: Bytes) -> Result<(), StoreError> {
        let (this, key) = (self.clone(), key.to_string());
        blocking(move || this.put_with(&key, |out| std::io::Write::write_all(out, &data))).await
    }

    async fn get_range(&self, key: &str, offset: u64, len: u64) -> Result<Bytes, StoreError> {
        let (this, key) = (self.clone(), key.to_string());
        blocking(move || {
            let path = this.path_of(&key)?;
            let mut f = File::open(&path).map_err(this.io(&key, &path))?;
            f.seek(SeekFrom::Start(offset)).map_err(this.io(&key, &path))?;
            let mut buf = Vec::with_capacity(len.min(64 << 20) as usize);
            f.take(len).read_to_end(&mut buf).map_err(this.io(&key, &path))?;
            if buf.len() as u64 != len {
                return Err(StoreError::ShortRead { key, offset, want: len, got: buf.len() as u64 });
            }
            Ok(Bytes::from(buf))
        })
        .await
    }

    async fn get_ranges(&self, ranges: Vec<(String, u64, u64)>) -> Result<Vec<Bytes>, StoreError> {
        let this = self.clone();
        blocking(move || {
            let mut out = Vec::with_capacity(ranges.len());
            let mut open: Option<(String, PathBuf, File)> = None;
            for (key, offset, len) in ranges {
                if open.as_ref().is_none_or(|(k, _, _)| *k != key) {
                    let path = this.path_of(&key)?;
                    let f = File::open(&path).map_err(this.io(&key, &path))?;
                    open = Some((key.clone(), path, f));
                }
                let Some((_, path, f)) = open.as_mut() else { unreachable!() };
                // No zero-filling: read into spare capacity.
                let mut buf = Vec::with_capacity(len as usize);
                f.seek(SeekFrom::Start(offset)).map_err(this.io(&key, path))?;
                let got = (&*f).take(len).read_to_end(&mut buf).map_err(this.io(&key, path))?;
                if got as u64 != len {
                    return Err(StoreError::ShortRead { key, offset, want: len, got: got as u64 });
                }
                out.push(Bytes::from(buf));
            }
            Ok(out)
        })
        .await
    }

    async fn get(&self, key: &str, max: u64) -> Result<Bytes, StoreError> {
        let (this, key) = (self.clone(), key.to_string());
        blocking(move || {
            let path = this.path_of(&key)?;
            let f = File::open(&path).map_err(this.io(&key, &path))?;
            let mut buf = Vec::new();
            f.take(max + 1).read_to_end(&mut buf).map_err(this.io(&key, &path))?;
            if buf.len() as u64 > max {
                return Err(StoreError::Io {
                    key,
                    path,
                    source: std::io::Error::other(format!("object larger than {max} bytes")),
                });
            }
            Ok(Bytes::from(buf))
        })
        .await
    }

    async fn size(&self, key: &str) -> Result<Option<u64>, StoreError> {
        let path = self.path_of(key)?;
        match tokio::fs::metadata(&path).await {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(StoreError::Io { key: key.to_string(), path, source }),
        }
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        let path = self.path_of(key)?;
        match tokio::fs::remove_file(&path).await {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(StoreError::Io { key: key.to_string(), path, source: e })
            }
            _ => Ok(()),
        }
    }
}
