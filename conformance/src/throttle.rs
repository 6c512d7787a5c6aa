//! A TCP proxy on loopback that slows the answers down to a given rate, and can cut every
//! connection at once: a slow, far link, or a link that drops, between a test's client and server.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The proxy; it stops when dropped.
#[derive(Debug)]
pub struct Throttle {
    addr: SocketAddr,
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    /// Bytes per second from the server to the client; 0 = unlimited.
    rate: AtomicU64,
    stopped: AtomicBool,
    conns: Mutex<Vec<TcpStream>>,
    /// Bytes passed from the server to the client.
    down: AtomicU64,
}

impl Throttle {
    /// Proxies 127.0.0.1:<ephemeral> to `upstream`, at most `rate` bytes per second downstream.
    pub fn start(upstream: SocketAddr, rate: u64) -> Throttle {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the throttle proxy");
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            rate: AtomicU64::new(rate),
            stopped: AtomicBool::new(false),
            conns: Mutex::new(Vec::new()),
            down: AtomicU64::new(0),
        });
        let s = shared.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if s.stopped.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(client) = client else { continue };
                let Ok(server) = TcpStream::connect(upstream) else { continue };
                let _ = client.set_nodelay(true);
                for c in [&client, &server] {
                    if let Ok(c) = c.try_clone() {
                        s.conns.lock().unwrap().push(c);
                    }
                }
                let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                std::thread::spawn(move || pipe(c2, s2, None));
                let shared = s.clone();
                std::thread::spawn(move || pipe(server, client, Some(shared)));
            }
        });
        Throttle { addr, shared }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Changes the rate of every connection from now on (0 = unlimited).
    pub fn set_rate(&self, rate: u64) {
        self.shared.rate.store(rate, Ordering::SeqCst);
    }

    /// Bytes passed downstream so far.
    pub fn down_bytes(&self) -> u64 {
        self.shared.down.load(Ordering::SeqCst)
    }

    /// Cuts every open connection, as a network failure would.
    pub fn cut(&self) {
        for c in self.shared.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
    }
}

impl Drop for Throttle {
    fn drop(&mut self) {
        self.shared.stopped.store(true, Ordering::SeqCst);
        self.cut();
        // Wake the accept loop so that it sees `stopped`.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(100));
    }
}

/// Copies `from` to `to`, paced by `shared`'s rate when given.
fn pipe(mut from: TcpStream, mut to: TcpStream, shared: Option<Arc<Shared>>) {
    let mut buf = vec![0u8; 16 * 1024];
    let started = Instant::now();
    let mut sent = 0u64;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if let Some(s) = &shared {
            let rate = s.rate.load(Ordering::SeqCst);
            sent += n as u64;
            if rate > 0 {
                let due = Duration::from_secs_f64(sent as f64 / rate as f64);
                if let Some(wait) = due.checked_sub(started.elapsed()) {
                    std::thread::sleep(wait);
                }
            }
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
        if let Some(s) = &shared {
            s.down.fetch_add(n as u64, Ordering::SeqCst);
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}
