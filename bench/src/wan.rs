//! An emulated WAN, since this kernel has no netem: two network namespaces, each with a TUN
//! device, joined by a delay line in this process. Every IP packet one side sends is read from its
//! TUN device, waits its turn on a link of the configured bandwidth (a drop-tail queue of the
//! configured size in front of it), travels half the round-trip time, and is written into the
//! other side's TUN device. It works at packet level, so TCP's slow start, congestion window and
//! loss recovery behave as on a real link.
//!
//! The worker side is `10.78.0.1`, the server side `10.78.0.2`. [`Netns::run`] runs a closure on
//! a thread inside a namespace: sockets it opens and processes it spawns live there.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, OwnedFd};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

pub const WORKER_ADDR: Ipv4Addr = Ipv4Addr::new(10, 78, 0, 1);
pub const SERVER_ADDR: Ipv4Addr = Ipv4Addr::new(10, 78, 0, 2);
/// The MTU of both TUN devices, as on an Ethernet path.
const MTU: usize = 1500;

/// The emulated link, the same in both directions.
#[derive(Clone, Copy, Debug)]
pub struct Link {
    pub rtt: Duration,
    pub rate_bps: u64,
    /// The drop-tail queue in front of the link, per direction.
    pub queue_bytes: u64,
}

impl Link {
    /// A link whose queue holds one bandwidth-delay product (at least 64 packets): what a router
    /// sized by the rule of thumb gives, and enough for one TCP flow to fill the link.
    pub fn new(rtt: Duration, rate_bps: u64) -> Link {
        let bdp = (rate_bps as f64 / 8.0 * rtt.as_secs_f64()) as u64;
        Link { rtt, rate_bps, queue_bytes: bdp.max(64 * MTU as u64) }
    }

    fn tx_time(&self, bytes: usize) -> Duration {
        Duration::from_secs_f64(bytes as f64 * 8.0 / self.rate_bps as f64)
    }
}

impl std::fmt::Display for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "RTT {} ms, {} Mbit/s, queue {} KiB",
            self.rtt.as_secs_f64() * 1e3,
            self.rate_bps as f64 / 1e6,
            self.queue_bytes / 1024
        )
    }
}

/// A network namespace made by this process (`ip netns add`), deleted on drop.
pub struct Netns {
    name: String,
    fd: OwnedFd,
}

impl Netns {
    fn create(name: &str) -> Result<Netns> {
        // A namespace left by a run that was killed: nothing of ours can still be using it.
        if std::path::Path::new("/run/netns").join(name).exists() {
            ip(&["netns", "del", name])?;
        }
        ip(&["netns", "add", name])?;
        let path = format!("/run/netns/{name}");
        let fd = File::open(&path).with_context(|| format!("open {path}"))?.into();
        Ok(Netns { name: name.into(), fd })
    }

    /// Runs `f` on a thread that joined this namespace: the sockets it opens and the processes it
    /// spawns are in the namespace (the mount namespace stays this process's).
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        std::thread::scope(|s| {
            s.spawn(|| {
                // SAFETY: setns on this thread only, with a namespace fd we own.
                let rc = unsafe { libc::setns(self.fd.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(rc, 0, "setns into {}: {}", self.name, std::io::Error::last_os_error());
                f()
            })
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    }

    /// Runs `ip -n NAME ARGS...`.
    fn ip(&self, args: &[&str]) -> Result<()> {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        ip(&all)
    }

    fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        self.run(|| std::fs::write(&path, value))
            .with_context(|| format!("sysctl {key}={value} in {}", self.name))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            eprintln!("warning: {e:#}");
        }
    }
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip").args(args).output().context("run ip (apt-get install -y iproute2)")?;
    ensure!(out.status.success(), "ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    Ok(())
}

/// Opens a TUN device (IP packets, no extra header) named `dev` inside `ns`.
fn tun_in(ns: &Netns, dev: &str) -> Result<File> {
    const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
    ns.run(|| {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .context("open /dev/net/tun")?;
        // struct ifreq: the name, then the flags.
        let mut req = [0u8; 40];
        req[..dev.len()].copy_from_slice(dev.as_bytes());
        let flags = (libc::IFF_TUN | libc::IFF_NO_PI) as u16;
        req[16..18].copy_from_slice(&flags.to_ne_bytes());
        // SAFETY: TUNSETIFF reads and writes a struct ifreq, which `req` is large enough for.
        let rc = unsafe { libc::ioctl(f.as_raw_fd(), TUNSETIFF, req.as_mut_ptr()) };
        ensure!(rc == 0, "TUNSETIFF {dev}: {}", std::io::Error::last_os_error());
        Ok(f)
    })
}

/// Packet and byte counts of one direction.
#[derive(Default)]
pub struct Counters {
    pub packets: AtomicU64,
    pub bytes: AtomicU64,
    pub dropped: AtomicU64,
}

/// The two namespaces and the delay line between them; all gone on drop.
pub struct Wan {
    pub worker: Netns,
    pub server: Netns,
    link: Arc<Mutex<Link>>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    /// Worker to server, server to worker.
    pub up: Arc<Counters>,
    pub down: Arc<Counters>,
    /// Held while the namespaces exist (dropped last, after them).
    _lock: File,
}

impl Wan {
    /// Creates namespaces `PREFIX-worker` and `PREFIX-server` joined by `link`. Only one process
    /// at a time may own a prefix: a second run (`wan` and `wan-check` use the same one) fails at
    /// once instead of deleting the first one's namespaces.
    pub fn create(prefix: &str, link: Link) -> Result<Wan> {
        let lock_path = format!("/run/starlight-bench-{prefix}.lock");
        let lock = File::create(&lock_path).with_context(|| format!("create {lock_path}"))?;
        // SAFETY: flock on a file descriptor we own.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            bail!(
                "another starlight-bench run holds the emulated WAN (lock {lock_path}: {}); \
                 wait for it to end",
                std::io::Error::last_os_error()
            );
        }
        let worker = Netns::create(&format!("{prefix}-worker"))?;
        let server = Netns::create(&format!("{prefix}-server"))?;
        let wt = tun_in(&worker, "slw0")?;
        let st = tun_in(&server, "sls0")?;
        for (ns, dev, me, peer) in
            [(&worker, "slw0", WORKER_ADDR, SERVER_ADDR), (&server, "sls0", SERVER_ADDR, WORKER_ADDR)]
        {
            ns.ip(&["link", "set", "lo", "up"])?;
            ns.ip(&["addr", "add", &me.to_string(), "peer", &format!("{peer}/32"), "dev", dev])?;
            ns.ip(&["link", "set", dev, "mtu", &MTU.to_string(), "up"])?;
            // One TCP flow must be able to fill the longest, fastest link of the sweep: windows up
            // to 32 MiB (Linux's default maximum, 6 MiB, is below 2 BDP at 300 ms and 100 Mbit/s).
            ns.sysctl("net.ipv4.tcp_rmem", "4096 131072 33554432")?;
            ns.sysctl("net.ipv4.tcp_wmem", "4096 16384 33554432")?;
        }
        let link = Arc::new(Mutex::new(link));
        let own = Arc::new(Mutex::new(Duration::ZERO));
        let stop = Arc::new(AtomicBool::new(false));
        let (up, down) = (Arc::new(Counters::default()), Arc::new(Counters::default()));
        let mut threads = Vec::new();
        for (from, to, c, name) in [
            (wt.try_clone()?, st.try_clone()?, up.clone(), "wan-up"),
            (st.try_clone()?, wt.try_clone()?, down.clone(), "wan-down"),
        ] {
            threads.extend(direction(from, to, link.clone(), own.clone(), stop.clone(), c, name)?);
        }
        let wan = Wan { worker, server, link, stop, threads, up, down, _lock: lock };
        // The delay line's own latency (two TUN crossings and two thread hand-offs each way),
        // measured with no added delay, is taken off the delay it adds, so that the round trip
        // measures as set.
        let want = wan.link();
        let probe = Duration::from_millis(1);
        wan.set_link(Link { rtt: probe, ..want });
        let base = wan.ping_median()?.saturating_sub(probe);
        *own.lock().unwrap() = base / 2;
        wan.set_link(want);
        println!(
            "delay line: its own round trip is {:.0} µs, taken off the emulated delay",
            base.as_secs_f64() * 1e6
        );
        Ok(wan)
    }

    pub fn link(&self) -> Link {
        *self.link.lock().unwrap()
    }

    /// Changes the link; meant for when it is idle.
    pub fn set_link(&self, link: Link) {
        *self.link.lock().unwrap() = link;
    }
}

impl Drop for Wan {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// One direction: a reader that queues each packet on the link and a writer that delivers it
/// when it is due.
fn direction(
    mut from: File,
    mut to: File,
    link: Arc<Mutex<Link>>,
    own: Arc<Mutex<Duration>>,
    stop: Arc<AtomicBool>,
    counters: Arc<Counters>,
    name: &str,
) -> Result<Vec<JoinHandle<()>>> {
    let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
    let stop2 = stop.clone();
    let counters2 = counters.clone();
    let name = name.to_string();
    let reader = std::thread::Builder::new().name(format!("{name}-in")).spawn({
        let name = name.clone();
        move || {
            let mut busy_until = Instant::now();
            let mut buf = vec![0u8; 65536];
            while !stop.load(Ordering::Relaxed) {
                let mut pfd = libc::pollfd { fd: from.as_raw_fd(), events: libc::POLLIN, revents: 0 };
                // SAFETY: one valid pollfd.
                if unsafe { libc::poll(&mut pfd, 1, 100) } <= 0 {
                    continue;
                }
                let n = match from.read(&mut buf) {
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        eprintln!("{name}: read: {e}");
                        return;
                    }
                };
                let now = Instant::now();
                let l = *link.lock().unwrap();
                // What is still queued ahead of this packet, in bytes at the link's rate.
                let backlog = busy_until.saturating_duration_since(now);
                let queued = (backlog.as_secs_f64() * l.rate_bps as f64 / 8.0) as u64;
                if queued + n as u64 > l.queue_bytes {
                    counters.dropped.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                busy_until = busy_until.max(now) + l.tx_time(n);
                let one_way = (l.rtt / 2).saturating_sub(*own.lock().unwrap());
                if tx.send((busy_until + one_way, buf[..n].to_vec())).is_err() {
                    return;
                }
            }
        }
    })?;
    let writer = std::thread::Builder::new().name(format!("{name}-out")).spawn(move || {
        let counters = counters2;
        let _ = &counters;
        // Sleeps end within microseconds of their deadline, not the default 50 µs slack.
        // SAFETY: prctl on this thread.
        unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong) };
        let mut due: VecDeque<(Instant, Vec<u8>)> = VecDeque::new();
        while !stop2.load(Ordering::Relaxed) {
            if due.is_empty() {
                match rx.recv_timeout(Duration::from_millis(100)) {
                    Ok(p) => due.push_back(p),
                    Err(mpsc::RecvTimeoutError::Timeout) => continue,
                    Err(mpsc::RecvTimeoutError::Disconnected) => return,
                }
            }
            due.extend(rx.try_iter());
            let now = Instant::now();
            let Some((at, _)) = due.front() else { continue };
            if *at > now {
                std::thread::sleep(*at - now);
                continue;
            }
            while let Some((at, _)) = due.front() {
                if *at > Instant::now() {
                    break;
                }
                let (_, p) = due.pop_front().unwrap();
                // A full TUN queue on the far side drops the packet, as a NIC would.
                if to.write(&p).is_ok() {
                    counters.packets.fetch_add(1, Ordering::Relaxed);
                    counters.bytes.fetch_add(p.len() as u64, Ordering::Relaxed);
                }
            }
        }
    })?;
    Ok(vec![reader, writer])
}

/// What the self-check measured.
pub struct Check {
    pub rtt: Duration,
    pub goodput_bps: f64,
    /// The link's capacity: IP bytes per second received of a UDP stream offered at 1.2x the rate.
    pub udp_bps: f64,
}

impl Wan {
    /// The median round trip of 20 UDP echoes from the worker to the server.
    fn ping_median(&self) -> Result<Duration> {
        let link = self.link();
        let echo = self.server.run(|| UdpSocket::bind((SERVER_ADDR, 0)))?;
        let echo_addr = echo.local_addr()?;
        echo.set_read_timeout(Some(Duration::from_millis(200)))?;
        let done = Arc::new(AtomicBool::new(false));
        let d2 = done.clone();
        let echo_thread = std::thread::spawn(move || {
            let mut b = [0u8; 64];
            while !d2.load(Ordering::Relaxed) {
                if let Ok((n, from)) = echo.recv_from(&mut b) {
                    let _ = echo.send_to(&b[..n], from);
                }
            }
        });
        let rtts = self.pings(echo_addr, link);
        done.store(true, Ordering::Relaxed);
        let _ = echo_thread.join();
        let mut rtts = rtts?;
        rtts.sort();
        Ok(rtts[rtts.len() / 2])
    }

    fn pings(&self, echo_addr: SocketAddr, link: Link) -> Result<Vec<Duration>> {
        let ping = self.worker.run(|| UdpSocket::bind((WORKER_ADDR, 0)))?;
        ping.set_read_timeout(Some(Duration::from_secs(2) + link.rtt * 2))?;
        let mut rtts = Vec::new();
        for i in 0..20u32 {
            let t = Instant::now();
            ping.send_to(&i.to_be_bytes(), echo_addr)?;
            let mut b = [0u8; 64];
            loop {
                let n = ping.recv(&mut b).context("no echo over the emulated link")?;
                if n == 4 && b[..4] == i.to_be_bytes() {
                    break;
                }
            }
            rtts.push(t.elapsed());
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(rtts)
    }

    /// Offers a UDP stream at 1.2x the link's rate for 3 s and measures what arrives, counted in
    /// IP bytes (payload + 28) over the last 2 s.
    fn udp_capacity(&self) -> Result<f64> {
        let link = self.link();
        let rx = self.worker.run(|| UdpSocket::bind((WORKER_ADDR, 0)))?;
        rx.set_read_timeout(Some(Duration::from_millis(500) + link.rtt * 2))?;
        let to = rx.local_addr()?;
        let tx = self.server.run(|| UdpSocket::bind((SERVER_ADDR, 0)))?;
        const PAYLOAD: usize = MTU - 28;
        let interval = Duration::from_secs_f64((MTU * 8) as f64 / (link.rate_bps as f64 * 1.2));
        let sender = std::thread::spawn(move || {
            let buf = [0u8; PAYLOAD];
            let start = Instant::now();
            let mut next = start;
            while start.elapsed() < Duration::from_secs(3) {
                let _ = tx.send_to(&buf, to);
                next += interval;
                if let Some(d) = next.checked_duration_since(Instant::now()) {
                    std::thread::sleep(d);
                }
            }
        });
        let mut buf = [0u8; MTU];
        let mut first = None::<Instant>;
        let (mut mark, mut bytes) = (None::<Instant>, 0u64);
        let mut last = Instant::now();
        while let Ok(n) = rx.recv(&mut buf) {
            let now = Instant::now();
            let f = *first.get_or_insert(now);
            if now - f >= Duration::from_secs(1) {
                if mark.is_none() {
                    mark = Some(now);
                } else {
                    bytes += (n + 28) as u64;
                    last = now;
                }
            }
        }
        let _ = sender.join();
        let mark = mark.context("the UDP stream did not come through the emulated link")?;
        Ok(bytes as f64 * 8.0 / (last - mark).as_secs_f64())
    }

    /// Measures the round-trip time (UDP echo, median of 20) and the link's throughput (a UDP
    /// stream offered above the rate), and checks them against the settings: RTT within 5%,
    /// throughput within 10%. Also reports what one TCP flow gets after its slow start.
    pub fn self_check(&self) -> Result<Check> {
        let link = self.link();
        let rtt = self.ping_median()?;

        let dropped0 = self.down.dropped.load(Ordering::Relaxed) + self.up.dropped.load(Ordering::Relaxed);
        // Throughput: long enough for slow start to end, measured over the last half.
        let secs = (8.0 + 40.0 * link.rtt.as_secs_f64()).min(20.0);
        let listener = self.server.run(|| TcpListener::bind((SERVER_ADDR, 0)))?;
        let addr = listener.local_addr()?;
        let sender = std::thread::spawn(move || -> Result<()> {
            let (mut s, _) = listener.accept()?;
            let chunk = vec![0u8; 1 << 16];
            let end = Instant::now() + Duration::from_secs_f64(secs);
            while Instant::now() < end {
                s.write_all(&chunk)?;
            }
            Ok(())
        });
        let mut conn = self.worker.run(|| TcpStream::connect(addr))?;
        let start = Instant::now();
        let half = Duration::from_secs_f64(secs / 2.0);
        let mut buf = vec![0u8; 1 << 16];
        let (mut mark, mut bytes_after) = (None::<(Instant, u64)>, 0u64);
        loop {
            let n = conn.read(&mut buf)?;
            if n == 0 {
                break;
            }
            if start.elapsed() >= half {
                if mark.is_none() {
                    mark = Some((Instant::now(), self.down.bytes.load(Ordering::Relaxed)));
                } else {
                    bytes_after += n as u64;
                }
            }
        }
        let end = Instant::now();
        sender.join().map_err(|_| anyhow::anyhow!("sender panicked"))??;
        let (t_mark, wire_mark) = mark.context("the transfer ended before its second half")?;
        let el = (end - t_mark).as_secs_f64();
        let goodput_bps = bytes_after as f64 * 8.0 / el;
        let wire_bps = (self.down.bytes.load(Ordering::Relaxed) - wire_mark) as f64 * 8.0 / el;
        let dropped =
            self.down.dropped.load(Ordering::Relaxed) + self.up.dropped.load(Ordering::Relaxed) - dropped0;
        let udp_bps = self.udp_capacity()?;
        let c = Check { rtt, goodput_bps, udp_bps };
        let rtt_err = (rtt.as_secs_f64() - link.rtt.as_secs_f64()).abs() / link.rtt.as_secs_f64();
        let rate_err = (udp_bps - link.rate_bps as f64).abs() / link.rate_bps as f64;
        println!(
            "self-check {link}: RTT {:.2} ms ({:+.1}%), throughput {:.1} Mbit/s ({:+.1}%); one TCP flow: {:.1} Mbit/s of data, {:.1} on the wire, {dropped} packets dropped by the queue",
            rtt.as_secs_f64() * 1e3,
            (rtt.as_secs_f64() / link.rtt.as_secs_f64() - 1.0) * 100.0,
            udp_bps / 1e6,
            (udp_bps / link.rate_bps as f64 - 1.0) * 100.0,
            goodput_bps / 1e6,
            wire_bps / 1e6,
        );
        if !(rtt_err <= 0.05 && rate_err <= 0.10) {
            bail!(
                "the emulated link is off: RTT {:.2} ms for {:.2} ms (limit 5%), throughput {:.1} Mbit/s for {:.1} (limit 10%)",
                rtt.as_secs_f64() * 1e3,
                link.rtt.as_secs_f64() * 1e3,
                udp_bps / 1e6,
                link.rate_bps as f64 / 1e6
            );
        }
        Ok(c)
    }
}
