//! The shared index for many converters and gateways: Redis, single node or Redis Cluster.
//!
//! Keys (values are the format crate's encodings; a tag's value is the digest text):
//! `sl:c:<hex>` content location, `sl:l:<hex>` layer, `sl:i:<hex>` image, `sl:t:<name>:<tag>` tag.
//! Every command touches one key, so nothing needs a hash tag and keys spread over the cluster.

use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Value};
use starlight_format::{ContentLocation, Digest, FormatError, ImageRecord, LayerRecord};
use tracing::debug;

use super::{Index, IndexError};

/// Keys per pipeline on a single node: one round trip each, replies of a bounded size.
const BATCH: usize = 1000;
/// Pipelines (single node) in flight at once.
const PIPELINES_IN_FLIGHT: usize = 4;
/// Single-key commands in flight at once on a cluster; the connection multiplexes them, so this
/// bounds memory and server queue depth rather than sockets.
const CLUSTER_IN_FLIGHT: usize = 512;
/// A dead or wedged server must fail an operation in seconds, not hang a conversion.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Reconnect attempts before an operation reports the server as unreachable.
const RETRIES: usize = 2;

/// An index in Redis. Clones share the underlying multiplexed connection.
#[derive(Clone)]
pub struct RedisIndex {
    conn: Conn,
}

#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl std::fmt::Debug for RedisIndex {
    /// Never prints the URL: it may hold a password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mode = match self.conn {
            Conn::Single(_) => "single",
            Conn::Cluster(_) => "cluster",
        };
        f.debug_struct("RedisIndex").field("mode", &mode).finish_non_exhaustive()
    }
}

fn backend<E: std::error::Error + Send + Sync + 'static>(op: &'static str) -> impl FnOnce(E) -> IndexError {
    move |e| IndexError::Backend { backend: "redis", op, source: Box::new(e) }
}

fn content_key(d: &Digest) -> String {
    format!("sl:c:{}", d.hex())
}

fn layer_key(d: &Digest) -> String {
    format!("sl:l:{}", d.hex())
}

fn layer_blob_key(d: &Digest) -> String {
    format!("sl:lb:{}", d.hex())
}

/// Version 2: keys `sl:i:` of earlier versions are not read (see `Index::get_image`).
fn image_key(d: &Digest) -> String {
    format!("sl:i2:{}", d.hex())
}

/// Tags cannot contain `:`, so the last `:` separates name (which may hold `host:port`) and tag.
fn tag_key(name: &str, tag: &str) -> String {
    format!("sl:t:{name}:{tag}")
}

/// Takes a free or lapsed lease, or extends one's own (KEYS[1]; ARGV: holder, ttl in ms).
const TRY_LEASE: &str = "local v = redis.call('GET', KEYS[1]) \
if v == false then redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) return 1 end \
if v == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1 end \
return 0";
/// Deletes a lease only if the holder still has it.
const RELEASE_LEASE: &str = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end \
return 0";

fn lease_key(key: &str) -> String {
    format!("sl:lease:{key}")
}

fn decode<T>(
    key: &str,
    value: Option<Vec<u8>>,
    f: fn(&[u8]) -> Result<T, FormatError>,
) -> Result<Option<T>, IndexError> {
    value.map(|v| f(&v).map_err(|source| IndexError::Corrupt { key: key.to_string(), source })).transpose()
}

impl RedisIndex {
    /// Connects to one Redis server (`redis://[:PASSWORD@]HOST:PORT[/DB]`). The connection
    /// manager reconnects by itself after a server restart.
    pub async fn single(url: &str) -> Result<RedisIndex, IndexError> {
        let client = redis::Client::open(url).map_err(backend("parse url"))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT))
            .set_number_of_retries(RETRIES);
        let conn = ConnectionManager::new_with_config(client, config).await.map_err(backend("connect"))?;
        debug!(mode = "single", "connected to redis");
        Ok(RedisIndex { conn: Conn::Single(conn) })
    }

    /// Connects to a Redis Cluster through any of its nodes (`redis://HOST:PORT` each); the client
    /// discovers the rest and follows slot moves.
    pub async fn cluster(urls: &[String]) -> Result<RedisIndex, IndexError> {
        let client = ClusterClientBuilder::new(urls.to_vec())
            .connection_timeout(CONNECT_TIMEOUT)
            .response_timeout(RESPONSE_TIMEOUT)
            .retries(RETRIES as u32)
            .build()
            .map_err(backend("parse urls"))?;
        let conn = client.get_async_connection().await.map_err(backend("connect"))?;
        debug!(mode = "cluster", nodes = urls.len(), "connected to redis");
        Ok(RedisIndex { conn: Conn::Cluster(conn) })
    }

    /// Runs one single-key command.
    async fn query<T: redis::FromRedisValue>(&self, cmd: &Cmd, op: &'static str) -> Result<T, IndexError> {
        match &self.conn {
            Conn::Single(c) => cmd.query_async(&mut c.clone()).await,
            Conn::Cluster(c) => cmd.query_async(&mut c.clone()).await,
        }
        .map_err(backend(op))
    }

    async fn get_raw(&self, key: &str, op: &'static str) -> Result<Option<Vec<u8>>, IndexError> {
        self.query(redis::cmd("GET").arg(key), op).await
    }

    /// Runs `cmds` (single-key each) and returns their replies in order: pipelined in batches on a
    /// single node, concurrently on a cluster (which rejects pipelines that span slots).
    async fn many(&self, cmds: Vec<Cmd>, op: &'static str) -> Result<Vec<Value>, IndexError> {
        match &self.conn {
            Conn::Single(c) => {
                // Built up front: a stream over borrowed chunks trips the `Send` check on the future.
                let pipes: Vec<redis::Pipeline> = cmds
                    .chunks(BATCH)
                    .map(|batch| {
                        let mut pipe = redis::pipe();
                        for cmd in batch {
                            pipe.add_command(cmd.clone());
                        }
                        pipe
                    })
                    .collect();
                let batches: Vec<Vec<Value>> = futures::stream::iter(pipes)
                    .map(|pipe| {
                        let mut c = c.clone();
                        async move { pipe.query_async::<Vec<Value>>(&mut c).await }
                    })
                    .buffered(PIPELINES_IN_FLIGHT)
                    .try_collect()
                    .await
                    .map_err(backend(op))?;
                Ok(batches.into_iter().flatten().collect())
            }
            Conn::Cluster(c) => futures::stream::iter(cmds)
                .map(|cmd| {
                    let mut c = c.clone();
                    async move { cmd.query_async::<Value>(&mut c).await }
                })
                .buffered(CLUSTER_IN_FLIGHT)
                .try_collect()
                .await
                .map_err(backend(op)),
        }
    }
}

impl Index for RedisIndex {
    async fn get_contents(&self, digests: &[Digest]) -> Result<Vec<Option<ContentLocation>>, IndexError> {
        let keys: Vec<String> = digests.iter().map(content_key).collect();
        let cmds = keys.iter().map(|k| redis::cmd("GET").arg(k).clone()).collect();
        let values = self.many(cmds, "get contents").await?;
        if values.len() != keys.len() {
            let msg = format!("{} replies for {} keys", values.len(), keys.len());
            return Err(IndexError::Backend { backend: "redis", op: "get contents", source: msg.into() });
        }
        let out: Vec<Option<ContentLocation>> = keys
            .iter()
            .zip(values)
            .map(|(key, value)| {
                let raw: Option<Vec<u8>> = redis::from_redis_value(value).map_err(backend("get contents"))?;
                decode(key, raw, ContentLocation::decode)
            })
            .collect::<Result<_, _>>()?;
        debug!(asked = digests.len(), found = out.iter().flatten().count(), "got contents");
        Ok(out)
    }

    async fn put_contents(&self, items: &[(Digest, ContentLocation)]) -> Result<(), IndexError> {
        // SET NX: the first location recorded for a content stays, so readers never see it move.
        let cmds = items
            .iter()
            .map(|(d, loc)| {
                let key = content_key(d);
                let value =
                    loc.encode().map_err(|source| IndexError::Unwritable { key: key.clone(), source })?;
                Ok(redis::cmd("SET").arg(key).arg(value).arg("NX").clone())
            })
            .collect::<Result<_, IndexError>>()?;
        let replies = self.many(cmds, "put contents").await?;
        let added = replies.iter().filter(|v| !matches!(v, Value::Nil)).count();
        debug!(items = items.len(), added, "put contents");
        Ok(())
    }

    async fn get_layer(&self, diff_id: &Digest) -> Result<Option<LayerRecord>, IndexError> {
        let key = layer_key(diff_id);
        decode(&key, self.get_raw(&key, "get layer").await?, LayerRecord::decode)
    }

    async fn put_layer(&self, rec: &LayerRecord) -> Result<(), IndexError> {
        let key = layer_key(&rec.diff_id);
        self.query::<()>(redis::cmd("SET").arg(&key).arg(rec.encode()), "put layer").await?;
        debug!(diff_id = %rec.diff_id, "put layer");
        Ok(())
    }

    async fn get_layer_from_blob(&self, blob: &Digest) -> Result<Option<LayerRecord>, IndexError> {
        let key = layer_blob_key(blob);
        decode(&key, self.get_raw(&key, "get layer from blob").await?, LayerRecord::decode)
    }

    async fn put_layer_from_blob(&self, blob: &Digest, rec: &LayerRecord) -> Result<(), IndexError> {
        let key = layer_blob_key(blob);
        self.query::<()>(redis::cmd("SET").arg(&key).arg(rec.encode()), "put layer from blob").await?;
        debug!(%blob, diff_id = %rec.diff_id, "put layer from blob");
        Ok(())
    }

    async fn get_image(&self, manifest: &Digest) -> Result<Option<ImageRecord>, IndexError> {
        let key = image_key(manifest);
        decode(&key, self.get_raw(&key, "get image").await?, ImageRecord::decode)
    }

    async fn put_image(&self, rec: &ImageRecord) -> Result<(), IndexError> {
        // Record first, tag second (they may live on different cluster nodes, so no transaction):
        // a reader that resolves the tag always finds the record.
        let key = image_key(&rec.manifest_digest);
        let value = rec.encode().map_err(|source| IndexError::Unwritable { key: key.clone(), source })?;
        self.query::<()>(redis::cmd("SET").arg(&key).arg(value), "put image").await?;
        if let Some(tag) = &rec.tag {
            let tkey = tag_key(&rec.name, tag);
            self.query::<()>(redis::cmd("SET").arg(&tkey).arg(rec.manifest_digest.to_string()), "put tag")
                .await?;
        }
        debug!(manifest = %rec.manifest_digest, name = %rec.name, tag = ?rec.tag, "put image");
        Ok(())
    }

    async fn resolve_tag(&self, name: &str, tag: &str) -> Result<Option<Digest>, IndexError> {
        let key = tag_key(name, tag);
        let Some(raw) = self.get_raw(&key, "resolve tag").await? else {
            return Ok(None);
        };
        let corrupt = |source| IndexError::Corrupt { key: key.clone(), source };
        let text = String::from_utf8(raw).map_err(|e| {
            corrupt(FormatError::BadDigest(String::from_utf8_lossy(e.as_bytes()).into_owned()))
        })?;
        text.parse::<Digest>().map(Some).map_err(corrupt)
    }

    async fn delete_contents(&self, digests: &[Digest]) -> Result<(), IndexError> {
        let cmds = digests.iter().map(|d| redis::cmd("DEL").arg(content_key(d)).clone()).collect();
        self.many(cmds, "delete contents").await?;
        debug!(items = digests.len(), "deleted contents");
        Ok(())
    }

    async fn delete_layer(&self, diff_id: &Digest) -> Result<(), IndexError> {
        self.query::<()>(redis::cmd("DEL").arg(layer_key(diff_id)), "delete layer").await
    }

    async fn delete_layer_from_blob(&self, blob: &Digest) -> Result<(), IndexError> {
        self.query::<()>(redis::cmd("DEL").arg(layer_blob_key(blob)), "delete layer from blob").await
    }

    async fn delete_image(&self, manifest: &Digest) -> Result<(), IndexError> {
        self.query::<()>(redis::cmd("DEL").arg(image_key(manifest)), "delete image").await
    }

    async fn try_lease(&self, key: &str, holder: &str, ttl: Duration) -> Result<bool, IndexError> {
        let ms = ttl.as_millis().max(1) as u64;
        let cmd = redis::cmd("EVAL").arg(TRY_LEASE).arg(1).arg(lease_key(key)).arg(holder).arg(ms).clone();
        let taken: i64 = self.query(&cmd, "take lease").await?;
        Ok(taken == 1)
    }

    async fn release_lease(&self, key: &str, holder: &str) -> Result<(), IndexError> {
        let cmd = redis::cmd("EVAL").arg(RELEASE_LEASE).arg(1).arg(lease_key(key)).arg(holder).clone();
        self.query::<i64>(&cmd, "release lease").await.map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_stable() {
        let d = Digest::empty();
        let hex = d.hex();
        assert_eq!(content_key(&d), format!("sl:c:{hex}"));
        assert_eq!(layer_key(&d), format!("sl:l:{hex}"));
        assert_eq!(layer_blob_key(&d), format!("sl:lb:{hex}"));
        assert_eq!(image_key(&d), format!("sl:i2:{hex}"));
        assert_eq!(tag_key("127.0.0.1:5000/app", "v1"), "sl:t:127.0.0.1:5000/app:v1");
    }
}
