//! Process plumbing for the test servers: spawning with a log file, readiness polls that quote
//! the log on failure, kill-by-PID on drop, and tiny loopback probes (HTTP status, Redis PING).

use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// Lines of a server's log quoted in a start-up panic.
const LOG_TAIL_LINES: usize = 40;
const POLL: Duration = Duration::from_millis(50);

/// A free TCP port on 127.0.0.1. Another process may grab it before the server binds it; the
/// window is a few milliseconds, which is the accepted price of servers that cannot report the
/// port they bound.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0 to find a free port");
    listener.local_addr().expect("local address of a bound listener").port()
}

/// `name` on `PATH`.
pub(super) fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|dir| dir.join(name)).find(|p| p.is_file())
}

/// `name` on `PATH`, or a panic naming the command that installs it.
pub(super) fn require(name: &str, install: &str) -> PathBuf {
    on_path(name).unwrap_or_else(|| panic!("`{name}` not found on PATH; install it with: {install}"))
}

/// One server process. Dropping it kills the process and reaps it.
#[derive(Debug)]
pub(super) struct Proc {
    name: String,
    pub(super) child: Child,
    pub(super) log: PathBuf,
}

impl Proc {
    /// Starts `cmd` with stdout and stderr appended to `log`.
    pub(super) fn spawn(name: impl Into<String>, mut cmd: Command, log: PathBuf) -> Proc {
        let name = name.into();
        let out = File::create(&log).unwrap_or_else(|e| panic!("create log {}: {e}", log.display()));
        let err = out.try_clone().unwrap_or_else(|e| panic!("clone log handle {}: {e}", log.display()));
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("start {name} ({cmd:?}): {e}"));
        Proc { name, child, log }
    }

    /// Polls `ready` until it holds; panics with the log tail if the process exits or time runs out.
    pub(super) fn wait_ready(&mut self, what: &str, timeout: Duration, mut ready: impl FnMut() -> bool) {
        let deadline = Instant::now() + timeout;
        loop {
            if ready() {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("{} exited ({status}) before {what}\n{}", self.name, log_tail(&self.log));
            }
            if Instant::now() > deadline {
                panic!("{} not {what} after {timeout:?}\n{}", self.name, log_tail(&self.log));
            }
            std::thread::sleep(POLL);
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // `Child::kill` signals this child's PID only; an already-exited child is not an error here.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The last lines of a log file, for panic messages.
pub(super) fn log_tail(path: &Path) -> String {
    let text = std::fs::read(path).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n");
    format!("--- last lines of {} ---\n{tail}", path.display())
}

/// Runs a short-lived helper to completion (output to `log`), killing it after `timeout`.
pub(super) fn run(name: &str, cmd: Command, log: PathBuf, timeout: Duration) {
    let mut p = Proc::spawn(name, cmd, log);
    let deadline = Instant::now() + timeout;
    loop {
        match p.child.try_wait() {
            Ok(Some(status)) if status.success() => return,
            Ok(Some(status)) => panic!("{name} failed ({status})\n{}", log_tail(&p.log)),
            Ok(None) if Instant::now() > deadline => {
                panic!("{name} still running after {timeout:?}\n{}", log_tail(&p.log))
            }
            Ok(None) => std::thread::sleep(POLL),
            Err(e) => panic!("waiting for {name}: {e}"),
        }
    }
}

pub(super) fn tempdir(what: &str) -> TempDir {
    tempdir_in(what, &std::env::temp_dir())
}

/// A new directory `starlight-WHAT-*` under `parent`.
pub(super) fn tempdir_in(what: &str, parent: &std::path::Path) -> TempDir {
    tempfile::Builder::new()
        .prefix(&format!("starlight-{what}-"))
        .tempdir_in(parent)
        .unwrap_or_else(|e| panic!("create a temp dir for {what} under {}: {e}", parent.display()))
}

/// Connects to `127.0.0.1:port` with a short timeout, so a poll never blocks for long.
pub(super) fn connect(port: u16) -> Option<TcpStream> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let s = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.set_write_timeout(Some(Duration::from_secs(2))).ok()?;
    Some(s)
}

/// The status code of `GET path` on `127.0.0.1:port`, if an HTTP server answers.
pub(super) fn http_status(port: u16, path: &str) -> Option<u16> {
    let mut s = connect(port)?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).ok()?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head).ok()?;
    let line = std::str::from_utf8(&head).ok()?;
    line.strip_prefix("HTTP/1.")?.get(2..5)?.parse().ok()
}

/// Whether a Redis server answers `PING` on `port`.
pub(super) fn redis_pong(port: u16) -> bool {
    let Some(mut s) = connect(port) else { return false };
    let mut reply = [0u8; 7];
    s.write_all(b"PING\r\n").is_ok() && s.read_exact(&mut reply).is_ok() && &reply == b"+PONG\r\n"
}
