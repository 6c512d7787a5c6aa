//! Helpers shared by the worker's integration tests.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::Child;

use starlight_conformance::images::skopeo_copy;
use starlight_conformance::servers::Registry;
use starlight_converter::index::{AnyIndex, RedbIndex};
use starlight_converter::store::{AnyStore, LocalStore};
use starlight_gateway::starlight::Backends;
use tokio::net::TcpListener;

/// A gateway in this process, on local storage under `dir`.
pub struct Gw {
    pub addr: std::net::SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), String>>,
}

impl Gw {
    pub async fn start(registry: &Registry, dir: &Path) -> Gw {
        Gw::start_with(registry, dir, |_| {}).await
    }

    /// The same, with settings of the test's own (TLS, say).
    pub async fn start_with(
        registry: &Registry,
        dir: &Path,
        tune: impl FnOnce(&mut starlight_gateway::Config),
    ) -> Gw {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut config = starlight_gateway::Config {
            upstream: format!("http://{}", registry.addr()),
            listen: addr,
            upstream_timeout: 30.0,
            work_dir: Some(dir.to_path_buf()),
            ..starlight_gateway::Config::default()
        };
        tune(&mut config);
        let backends = Backends {
            store: AnyStore::Local(LocalStore::open(dir.join("store")).unwrap()),
            index: AnyIndex::Redb(RedbIndex::open(dir.join("index.redb")).unwrap()),
        };
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(starlight_gateway::run_with(listener, config, Some(backends), async {
            let _ = rx.await;
        }));
        Gw { addr, stop: Some(tx), task }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.task.await.unwrap().unwrap();
    }
}

/// Pushes `tags` of the OCI layout to `registry` as `name`.
pub fn push(layout: &Path, registry: &Registry, name: &str, tags: &[&str]) {
    for tag in tags {
        skopeo_copy(
            &format!("oci:{}:{tag}", layout.display()),
            &format!("docker://{}/{name}:{tag}", registry.addr()),
            None,
        );
    }
}

/// The lines `child` prints, as they come.
pub fn lines(child: &mut Child) -> std::sync::mpsc::Receiver<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    let out = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for l in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    rx
}

/// Whether `dir` is a mount point.
pub fn is_mounted(dir: &Path) -> bool {
    let m = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    m.lines().any(|l| l.split(' ').nth(4) == Some(dir.to_str().unwrap()))
}

/// Sends `sig` to a child of ours.
pub fn signal(child: &Child, sig: i32) {
    // SAFETY: kill on the pid of our own child.
    assert_eq!(unsafe { libc::kill(child.id() as i32, sig) }, 0, "kill {}", child.id());
}
