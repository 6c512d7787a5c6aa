//! Shared fixtures for the gateway's tests: the gateway in-process on 127.0.0.1:0, and raw clients.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use starlight_gateway::Config;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A gateway running in this process until stopped or dropped.
pub struct Gateway {
    pub addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), String>>>,
}

impl Gateway {
    pub async fn start(config: Config) -> Gateway {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(starlight_gateway::run(listener, config, async {
            let _ = rx.await;
        }));
        Gateway { addr, stop: Some(tx), task: Some(task) }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Signals shutdown and waits for the server to return.
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap().unwrap();
        }
    }

    /// Starts shutdown without waiting.
    pub fn begin_stop(&mut self) -> tokio::task::JoinHandle<Result<(), String>> {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        self.task.take().unwrap()
    }
}

/// A configuration for `upstream` with short timeouts suited to tests.
pub fn config(upstream: &str) -> Config {
    Config {
        upstream: upstream.to_string(),
        listen: "127.0.0.1:0".parse().unwrap(),
        connect_timeout: 2.0,
        upstream_timeout: 2.0,
        header_read_timeout: 2.0,
        shutdown_grace: 5.0,
        ..Config::default()
    }
}

/// Sends raw bytes and reads the whole answer (until the server closes or `wait` passes).
pub async fn raw(addr: SocketAddr, request: &[u8], wait: Duration) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    read_all(&mut s, wait).await
}

pub async fn read_all(s: &mut TcpStream, wait: Duration) -> String {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(wait, s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

pub fn http() -> reqwest::Client {
    reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap()
}

pub mod bundle;

/// Starts a gateway on an already bound listener, with Starlight storage given.
pub async fn start_on(
    listener: TcpListener,
    config: Config,
    backends: Option<starlight_gateway::starlight::Backends>,
) -> Gateway {
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(starlight_gateway::run_with(listener, config, backends, async {
        let _ = rx.await;
    }));
    Gateway { addr, stop: Some(tx), task: Some(task) }
}

/// A local store and a redb index under `dir`.
pub fn local_redb(dir: &std::path::Path) -> starlight_gateway::starlight::Backends {
    use starlight_converter::index::{AnyIndex, RedbIndex};
    use starlight_converter::store::{AnyStore, LocalStore};
    starlight_gateway::starlight::Backends {
        store: AnyStore::Local(LocalStore::open(dir.join("store")).unwrap()),
        index: AnyIndex::Redb(RedbIndex::open(dir.join("index.redb")).unwrap()),
    }
}

/// A bucket of `s3` and a Redis index on `redis`.
pub async fn s3_redis(
    s3: &starlight_conformance::servers::S3Server,
    redis: &starlight_conformance::servers::Redis,
) -> starlight_gateway::starlight::Backends {
    use starlight_converter::index::{AnyIndex, RedisIndex};
    use starlight_converter::store::{AnyStore, S3Store};
    let store = S3Store::with_config(
        "starlight",
        "gw",
        &s3.endpoint(),
        s3.access_key(),
        s3.secret_key(),
        "us-east-1",
    )
    .await
    .unwrap();
    store.ensure_bucket().await.unwrap();
    starlight_gateway::starlight::Backends {
        store: AnyStore::S3(store),
        index: AnyIndex::Redis(RedisIndex::single(&redis.url()).await.unwrap()),
    }
}

/// A gateway in front of `registry` with Starlight storage `backends` and scratch space in `dir`.
pub async fn gateway(
    registry: &starlight_conformance::servers::Registry,
    dir: &std::path::Path,
    backends: starlight_gateway::starlight::Backends,
) -> Gateway {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut config = config(&format!("http://{}", registry.addr()));
    config.upstream_timeout = 30.0;
    config.work_dir = Some(dir.to_path_buf());
    start_on(listener, config, Some(backends)).await
}

/// A value from the gateway's /metrics (`name` with its labels, as printed); 0 if absent.
pub async fn metric(gw: &Gateway, name: &str) -> u64 {
    let text = http().get(format!("{}/metrics", gw.url())).send().await.unwrap().text().await.unwrap();
    text.lines()
        .find(|l| l.strip_prefix(name).is_some_and(|rest| rest.starts_with(' ')))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0)
}
