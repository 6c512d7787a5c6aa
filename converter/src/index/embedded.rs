//! The default index: one embedded `redb` file. Every write is one redb transaction, durable on
//! commit, so a record is either wholly there or absent after a crash.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use starlight_format::{ContentLocation, Digest, FormatError, ImageRecord, LayerRecord};

use super::{Index, IndexError};

const CONTENTS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("contents");
const LAYERS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("layers");
/// Layer records by the compressed blob they were converted from.
const LAYER_BLOBS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("layer_blobs");
/// Version 2: the table "images" of earlier versions is not read (see `Index::get_image`).
const IMAGES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("images.v2");
const TAGS: TableDefinition<&str, &str> = TableDefinition::new("tags");
/// Lease key -> expiry (milliseconds since the Unix epoch, 8 bytes little-endian) and holder.
const LEASES: TableDefinition<&str, &[u8]> = TableDefinition::new("leases");

/// An index in an embedded redb file.
#[derive(Clone)]
pub struct RedbIndex {
    db: Arc<Database>,
}

impl std::fmt::Debug for RedbIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RedbIndex")
    }
}

fn backend(op: &'static str) -> impl FnOnce(redb::Error) -> IndexError {
    move |e| IndexError::Backend { backend: "redb", op, source: Box::new(e) }
}

fn corrupt(table: &str, key: &[u8]) -> impl FnOnce(FormatError) -> IndexError {
    let key = format!("{table}/{}", hex_key(key));
    move |source| IndexError::Corrupt { key, source }
}

fn unwritable(table: &str, key: &[u8]) -> impl FnOnce(FormatError) -> IndexError {
    let key = format!("{table}/{}", hex_key(key));
    move |source| IndexError::Unwritable { key, source }
}

fn hex_key(key: &[u8]) -> String {
    key.iter().map(|b| format!("{b:02x}")).collect()
}

impl RedbIndex {
    /// Opens (creating if needed) the index file at `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<RedbIndex, IndexError> {
        let path = path.as_ref();
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| backend("create directory")(redb::Error::Io(e)))?;
        }
        let db = Database::create(path).map_err(|e| backend("open")(e.into()))?;
        // Create the tables once so that readers never see "table does not exist".
        let tx = db.begin_write().map_err(|e| backend("begin write")(e.into()))?;
        {
            for t in [CONTENTS, LAYERS, LAYER_BLOBS, IMAGES] {
                tx.open_table(t).map_err(|e| backend("open table")(e.into()))?;
            }
            tx.open_table(TAGS).map_err(|e| backend("open table")(e.into()))?;
            tx.open_table(LEASES).map_err(|e| backend("open table")(e.into()))?;
        }
        tx.commit().map_err(|e| backend("commit")(e.into()))?;
        Ok(RedbIndex { db: Arc::new(db) })
    }

    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Database) -> Result<T, IndexError> + Send + 'static,
    ) -> Result<T, IndexError> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || f(&db)).await.map_err(|e| IndexError::Backend {
            backend: "redb",
            op: "task",
            source: Box::new(e),
        })?
    }

    async fn get_one(
        &self,
        table: TableDefinition<'static, &'static [u8], &'static [u8]>,
        key: Digest,
    ) -> Result<Option<Vec<u8>>, IndexError> {
        self.run(move |db: &Database| {
            let tx = db.begin_read().map_err(|e| backend("begin read")(e.into()))?;
            let t = tx.open_table(table).map_err(|e| backend("open table")(e.into()))?;
            let v = t.get(&key.0[..]).map_err(|e| backend("get")(e.into()))?;
            Ok(v.map(|g| g.value().to_vec()))
        })
        .await
    }

    async fn delete_many(
        &self,
        table: TableDefinition<'static, &'static [u8], &'static [u8]>,
        keys: Vec<Digest>,
    ) -> Result<(), IndexError> {
        self.run(move |db: &Database| {
            let tx = db.begin_write().map_err(|e| backend("begin write")(e.into()))?;
            {
                let mut t = tx.open_table(table).map_err(|e| backend("open table")(e.into()))?;
                for k in &keys {
                    t.remove(&k.0[..]).map_err(|e| backend("remove")(e.into()))?;
                }
            }
            tx.commit().map_err(|e| backend("commit")(e.into()))
        })
        .await
    }

    async fn put_one(
        &self,
        table: TableDefinition<'static, &'static [u8], &'static [u8]>,
        key: Digest,
        value: Vec<u8>,
    ) -> Result<(), IndexError> {
        self.run(move |db: &Database| {
            let tx = db.begin_write().map_err(|e| backend("begin write")(e.into()))?;
            {
                let mut t = tx.open_table(table).map_err(|e| backend("open table")(e.into()))?;
                t.insert(&key.0[..], &value[..]).map_err(|e| backend("insert")(e.into()))?;
            }
            tx.commit().map_err(|e| backend("commit")(e.into()))
        })
        .await
    }
}

impl Index for RedbIndex {
    async fn get_contents(&self, digests: &[Digest]) -> Result<Vec<Option<ContentLocation>>, IndexError> {
        let digests = digests.to_vec();
        self.run(move |db: &Database| {
            let tx = db.begin_read().map_err(|e| backend("begin read")(e.into()))?;
            let t = tx.open_table(CONTENTS).map_err(|e| backend("open table")(e.into()))?;
            digests
                .iter()
                .map(|d| {
                    let v = t.get(&d.0[..]).map_err(|e| backend("get")(e.into()))?;
                    v.map(|g| ContentLocation::decode(g.value()).map_err(corrupt("contents", &d.0)))
                        .transpose()
                })
                .collect()
        })
        .await
    }

    async fn put_contents(&self, items: &[(Digest, ContentLocation)]) -> Result<(), IndexError> {
        let items: Vec<(Digest, Vec<u8>)> = items
            .iter()
            .map(|(d, l)| Ok((*d, l.encode().map_err(unwritable("contents", &d.0))?)))
            .collect::<Result<_, IndexError>>()?;
        self.run(move |db: &Database| {
            let tx = db.begin_write().map_err(|e| backend("begin write")(e.into()))?;
            {
                let mut t = tx.open_table(CONTENTS).map_err(|e| backend("open table")(e.into()))?;
                for (d, v) in &items {
                    let present = t.get(&d.0[..]).map_err(|e| backend("get")(e.into()))?.is_some();
                    if !present {
                        t.insert(&d.0[..], &v[..]).map_err(|e| backend("insert")(e.into()))?;
                    }
                }
            }
            tx.commit().map_err(|e| backend("commit")(e.into()))
        })
        .await
    }

    async fn get_layer(&self, diff_id: &Digest) -> Result<Option<LayerRecord>, IndexError> {
        let v = self.get_one(LAYERS, *diff_id).await?;
        v.map(|v| LayerRecord::decode(&v).map_err(corrupt("layers", &diff_id.0))).transpose()
    }

    async fn put_layer(&self, rec: &LayerRecord) -> Result<(), IndexError> {
        self.put_one(LAYERS, rec.diff_id, rec.encode()).await
    }

    async fn get_layer_from_blob(&self, blob: &Digest) -> Result<Option<LayerRecord>, IndexError> {
        let v = self.get_one(LAYER_BLOBS, *blob).await?;
        v.map(|v| LayerRecord::decode(&v).map_err(corrupt("layer_blobs", &blob.0))).transpose()
    }

    async fn put_layer_from_blob(&self, blob: &Digest, rec: &LayerRecord) -> Result<(), IndexError> {
        self.put_one(LAYER_BLOBS, *blob, rec.encode()).await
    }

    async fn get_image(&self, manifest: &Digest) -> Result<Option<ImageRecord>, IndexError> {
        let v = self.get_one(IMAGES, *manifest).await?;
        v.map(|v| ImageRecord::decode(&v).map_err(corrupt("images.v2", &manifest.0))).transpose()
    }

    async fn put_image(&self, rec: &ImageRecord) -> Result<(), IndexError> {
        let key = rec.manifest_digest;
        let value = rec.encode().map_err(unwritable("images.v2", &key.0))?;
        let tag = rec.tag.as_ref().map(|t| (format!("{}:{t}", rec.name), key.to_string()));
        // Record and tag in one transaction: the tag never points at a missing record.
        self.run(move |db: &Database| {
            let tx = db.begin_write().map_err(|e| backend("begin write")(e.into()))?;
            {
                let mut t = tx.open_table(IMAGES).map_err(|e| backend("open table")(e.into()))?;
                t.insert(&key.0[..], &value[..]).map_err(|e| backend("insert")(e.into()))?;
                if let Some((k, v)) = &tag {
                    let mut t = tx.open_table(TAGS).map_err(|e| backend("open table")(e.into()))?;
                    t.insert(k.as_str(), v.as_str()).map_err(|e| backend("insert")(e.into()))?;
                }
            }
            tx.commit().map_err(|e| backend("commit")(e.into()))
        })
        .await
    }

    async fn resolve_tag(&self, name: &str, tag: &str) -> Result<Option<Digest>, IndexError> {
        let key = format!("{name}:{tag}");
        self.run(move |db: &Database| {
            let tx = db.begin_read().map_err(|e| backend("begin read")(e.into()))?;
            let t = tx.open_table(TAGS).map_err(|e| backend("open table")(e.into()))?;
            let v = t.get(key.as_str()).map_err(|e| backend("get")(e.into()))?;
            v.map(|g| {
                g.value().parse::<Digest>().map_err(|source| IndexError::Corrupt { key: key.clone(), source })
            })
            .transpose()
        })
        .await
    }

    async fn delete_contents(&self, digests: &[Digest]) -> Result<(), IndexError> {
        self.delete_many(CONTENTS, digests.to_vec()).await
    }

    async fn delete_layer(&self, diff_id: &Digest) -> Result<(), IndexError> {
        self.delete_many(LAYERS, vec![*diff_id]).await
    }

    async fn delete_layer_from_blob(&self, blob: &Digest) -> Result<(), IndexError> {
        self.delete_many(LAYER_BLOBS, vec![*blob]).await
    }

    async fn delete_image(&self, manifest: &Digest) -> Result<(), IndexError> {
        self.delete_many(IMAGES, vec![*manifest]).await
    }

    /// One transaction checks and sets, so two tasks of this process never both hold a lease
    /// (redb is single-process: one gateway per file).
    async fn try_lease(&self, key: &str, holder: &str, ttl: Duration) -> Result<bool, IndexError> {
        let (key, holder) = (key.to_string(), holder.to_string());
        self.run(move |db: &Database| {
            let now = now_ms();
            let tx = db.begin_write().map_err(|e| backend("begin write")(e.into()))?;
            let taken = {
                let mut t = tx.open_table(LEASES).map_err(|e| backend("open table")(e.into()))?;
                let current = t.get(key.as_str()).map_err(|e| backend("get")(e.into()))?.map(|g| {
                    let v = g.value();
                    let expiry = v.get(..8).map_or(0, |b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])));
                    (expiry, v.get(8..).unwrap_or_default() == holder.as_bytes())
                });
                let free = match current {
                    None => true,
                    Some((expiry, mine)) => mine || expiry <= now,
                };
                if free {
                    let mut v = (now + ttl.as_millis() as u64).to_le_bytes().to_vec();
                    v.extend_from_slice(holder.as_bytes());
                    t.insert(key.as_str(), &v[..]).map_err(|e| backend("insert")(e.into()))?;
                }
                free
            };
            tx.commit().map_err(|e| backend("commit")(e.into()))?;
            Ok(taken)
        })
        .await
    }

    async fn release_lease(&self, key: &str, holder: &str) -> Result<(), IndexError> {
        let (key, holder) = (key.to_string(), holder.to_string());
        self.run(move |db: &Database| {
            let tx = db.begin_write().map_err(|e| backend("begin write")(e.into()))?;
            {
                let mut t = tx.open_table(LEASES).map_err(|e| backend("open table")(e.into()))?;
                let mine = t
                    .get(key.as_str())
                    .map_err(|e| backend("get")(e.into()))?
                    .is_some_and(|g| g.value().get(8..).unwrap_or_default() == holder.as_bytes());
                if mine {
                    t.remove(key.as_str()).map_err(|e| backend("remove")(e.into()))?;
                }
            }
            tx.commit().map_err(|e| backend("commit")(e.into()))
        })
        .await
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}
