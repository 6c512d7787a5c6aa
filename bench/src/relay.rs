//! Reference relays for the gateway benchmark: what any proxy in front of the registry costs on this
//! machine, measured in the same run as the gateway.
//!
//! - [`serve`] is the least a relay can do: read the request head, forward it with
//!   `Connection: close`, then copy the registry's answer to the client with one 1 MiB buffer.
//!   No header parsing, no pooling, one thread per connection. It runs as its own process
//!   (`starlight-bench relay`) so that its CPU time can be read from /proc.
//! - [`start_nginx`] runs nginx as a reverse proxy with response buffering off, when it is installed.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, bail};

use crate::gateway::Server;

/// Largest request head the relay reads.
const MAX_HEAD: usize = 64 << 10;

/// Serves the relay on `listen`, forwarding every connection's first request to `upstream`
/// (`HOST:PORT`). Runs until killed.
pub fn serve(listen: &str, upstream: &str) -> anyhow::Result<()> {
    let listener = TcpListener::bind(listen).with_context(|| format!("binding {listen}"))?;
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        let upstream = upstream.to_string();
        std::thread::spawn(move || {
            if let Err(e) = relay_one(conn, &upstream) {
                eprintln!("relay: {e:#}");
            }
        });
    }
    Ok(())
}

fn relay_one(mut client: TcpStream, upstream: &str) -> anyhow::Result<()> {
    let mut head = Vec::with_capacity(4096);
    let mut buf = vec![0u8; 1 << 20];
    let end = loop {
        let n = client.read(&mut buf[..4096])?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
        if let Some(i) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        if head.len() > MAX_HEAD {
            bail!("request head over {MAX_HEAD} bytes");
        }
    };
    // One request per connection: the registry closes after its answer, so EOF ends the copy.
    let kept: Vec<&[u8]> = head[..end]
        .split(|&b| b == b'\n')
        .filter(|l| !l.to_ascii_lowercase().starts_with(b"connection:"))
        .collect();
    let mut fwd = kept.join(&b'\n');
    fwd.extend_from_slice(b"\r\nConnection: close\r\n\r\n");
    let mut up = TcpStream::connect(upstream).with_context(|| format!("connecting to {upstream}"))?;
    up.set_nodelay(true)?;
    client.set_nodelay(true)?;
    up.write_all(&fwd)?;
    loop {
        let n = up.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        client.write_all(&buf[..n])?;
    }
}

/// Starts this binary's `relay` subcommand in front of `upstream` (`HOST:PORT`).
pub fn start_relay(upstream: &str) -> anyhow::Result<Server> {
    let addr = format!("127.0.0.1:{}", starlight_conformance::servers::free_port());
    let child = Command::new(std::env::current_exe()?)
        .args(["relay", "--listen", &addr, "--upstream", upstream])
        .stdout(Stdio::null())
        .spawn()
        .context("starting the reference relay")?;
    Server { name: "relay", addr, child, _dir: None }.listening()
}

/// nginx's binary, if installed.
pub fn nginx_bin() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin")])
        .map(|d| d.join("nginx"))
        .find(|p| p.is_file())
}

/// Starts nginx (one process, no daemon, response buffering off, keep-alive to the upstream) in
/// front of `upstream` (`HOST:PORT`).
pub fn start_nginx(bin: &Path, upstream: &str) -> anyhow::Result<Server> {
    let dir = tempfile::tempdir()?;
    let addr = format!("127.0.0.1:{}", starlight_conformance::servers::free_port());
    let d = dir.path().display();
    let conf = format!(
        "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\n\
         error_log {d}/error.log;\nevents {{ worker_connections 1024; }}\nhttp {{\n  access_log off;\n  \
         client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fcgi;\n  \
         uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n  \
         upstream registry {{ server {upstream}; keepalive 16; }}\n  server {{\n    listen {addr};\n    \
         location / {{\n      proxy_pass http://registry;\n      proxy_http_version 1.1;\n      \
         proxy_set_header Connection \"\";\n      proxy_buffering off;\n      proxy_buffer_size 1m;\n      \
         proxy_buffers 4 1m;\n      proxy_busy_buffers_size 2m;\n    }}\n  }}\n}}\n"
    );
    let path = dir.path().join("nginx.conf");
    std::fs::write(&path, conf)?;
    let child = Command::new(bin)
        .arg("-p")
        .arg(dir.path())
        .arg("-e")
        .arg(dir.path().join("error.log"))
        .arg("-c")
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    Server { name: "nginx", addr, child, _dir: Some(dir) }.listening()
}
