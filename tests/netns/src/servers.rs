//! Backend servers that say who they are.
//!
//! TCP: on accept, write the backend's name line (`b1\n`), then echo every further line back,
//! so long-lived connections can keep exchanging data. Two lines are commands for bulk
//! transfers (payloads that span many segments, so GSO, GRO and paged skbs come into play):
//! `bulk-send N` makes the server send `N` bytes of [`bulk_byte`]s; `bulk-recv N` makes it read
//! `N` bytes and answer `got N <errors>`, the number of bytes that differed from the pattern. UDP: answer every datagram with
//! `<name> <payload>`.
//!
//! The sockets are created inside the backend's namespace (see [`crate::netns::run_in`]) and
//! served by ordinary threads that poll a stop flag, so every thread ends shortly after
//! [`BackendServer::stop`] (or drop).

use std::{
    collections::BTreeSet,
    io::{ErrorKind, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};

use crate::netns;

/// How often blocked server threads look at their stop flag.
const POLL: Duration = Duration::from_millis(50);
/// Longest a connection may sit on a partial line before the server gives up on it.
const MAX_LINE: usize = 64 * 1024;

/// What a server saw, for assertions and diagnostics.
#[derive(Debug, Default)]
pub struct ServerStats {
    /// TCP connections accepted.
    pub tcp_accepted: AtomicUsize,
    /// TCP connections currently open.
    pub tcp_open: AtomicUsize,
    /// UDP datagrams answered.
    pub udp_answered: AtomicUsize,
    /// Distinct local addresses connections and datagrams arrived on.
    pub local_addrs: Mutex<BTreeSet<SocketAddr>>,
}

/// A TCP + UDP server pair in one backend namespace.
pub struct BackendServer {
    pub name: String,
    pub ns: String,
    pub addr: SocketAddr,
    pub stats: Arc<ServerStats>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl BackendServer {
    /// Starts TCP and UDP servers answering as `name`, bound to `addr` inside namespace `ns`.
    pub fn start(ns: &str, name: &str, addr: SocketAddr) -> Result<BackendServer> {
        let (listener, udp) = netns::run_in(ns, || -> Result<(TcpListener, UdpSocket)> {
            let listener = TcpListener::bind(addr).with_context(|| format!("bind tcp {addr}"))?;
            let udp = UdpSocket::bind(addr).with_context(|| format!("bind udp {addr}"))?;
            Ok((listener, udp))
        })??;
        listener.set_nonblocking(true)?;
        udp.set_read_timeout(Some(POLL))?;

        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(ServerStats::default());
        let mut threads = Vec::new();
        {
            let (stop, stats, name) = (stop.clone(), stats.clone(), name.to_string());
            threads.push(
                thread::Builder::new()
                    .name(format!("{name}-tcp"))
                    .spawn(move || accept_loop(listener, &name, &stop, &stats))?,
            );
        }
        {
            let (stop, stats, name) = (stop.clone(), stats.clone(), name.to_string());
            threads.push(
                thread::Builder::new()
                    .name(format!("{name}-udp"))
                    .spawn(move || udp_loop(udp, &name, &stop, &stats))?,
            );
        }
        Ok(BackendServer {
            name: name.to_string(),
            ns: ns.to_string(),
            addr,
            stats,
            stop,
            threads,
        })
    }

    /// Stops accepting and answering, closes every connection, and waits for the threads.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        // Connection threads notice the flag within one poll interval; wait for them, bounded.
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.stats.tcp_open.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            thread::sleep(POLL / 5);
        }
    }

    /// TCP connections accepted so far.
    pub fn tcp_accepted(&self) -> usize {
        self.stats.tcp_accepted.load(Ordering::SeqCst)
    }

    /// The local addresses traffic arrived on.
    pub fn local_addrs(&self) -> BTreeSet<SocketAddr> {
        self.stats.local_addrs.lock().expect("poisoned").clone()
    }
}

impl Drop for BackendServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn accept_loop(
    listener: TcpListener,
    name: &str,
    stop: &Arc<AtomicBool>,
    stats: &Arc<ServerStats>,
) {
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, _peer)) => {
                stats.tcp_accepted.fetch_add(1, Ordering::SeqCst);
                if let Ok(local) = stream.local_addr() {
                    stats.local_addrs.lock().expect("poisoned").insert(local);
                }
                stats.tcp_open.fetch_add(1, Ordering::SeqCst);
                let (stop, stats2, name) = (stop.clone(), stats.clone(), name.to_string());
                let spawned =
                    thread::Builder::new()
                        .name(format!("{name}-conn"))
                        .spawn(move || {
                            let _ = serve_conn(stream, &name, &stop);
                            stats2.tcp_open.fetch_sub(1, Ordering::SeqCst);
                        });
                if spawned.is_err() {
                    stats.tcp_open.fetch_sub(1, Ordering::SeqCst);
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => thread::sleep(Duration::from_millis(2)),
            Err(_) => thread::sleep(POLL),
        }
    }
}

/// Byte `i` of every bulk transfer: a pattern that shows lost, duplicated or reordered data.
pub fn bulk_byte(i: usize) -> u8 {
    (i % 251) as u8
}

/// Largest bulk transfer a command may ask for.
pub const MAX_BULK: usize = 64 << 20;

/// Longest a bulk transfer may take on the server's side.
const BULK_TIME: Duration = Duration::from_secs(60);

/// A `bulk-send N` / `bulk-recv N` command line, if `line` is one.
fn bulk_command(line: &[u8]) -> Option<(bool, usize)> {
    let text = std::str::from_utf8(line).ok()?.trim_end();
    let (send, n) = if let Some(n) = text.strip_prefix("bulk-send ") {
        (true, n)
    } else {
        (false, text.strip_prefix("bulk-recv ")?)
    };
    let n: usize = n.parse().ok()?;
    (n <= MAX_BULK).then_some((send, n))
}

/// Sends `n` pattern bytes.
fn bulk_send(stream: &mut TcpStream, n: usize) -> std::io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut sent = 0;
    while sent < n {
        let len = buf.len().min(n - sent);
        for (j, b) in buf[..len].iter_mut().enumerate() {
            *b = bulk_byte(sent + j);
        }
        stream.write_all(&buf[..len])?;
        sent += len;
    }
    Ok(())
}

/// Reads `n` bytes (the first of them already in `pending`) and answers how many differed.
fn bulk_recv(
    stream: &mut TcpStream,
    pending: &mut Vec<u8>,
    n: usize,
    stop: &AtomicBool,
) -> std::io::Result<()> {
    let deadline = Instant::now() + BULK_TIME;
    let mut got = 0usize;
    let mut errors = 0usize;
    let mut check = |bytes: &[u8], got: &mut usize| {
        for b in bytes {
            if *b != bulk_byte(*got) {
                errors += 1;
            }
            *got += 1;
        }
    };
    let take = pending.len().min(n);
    let head: Vec<u8> = pending.drain(..take).collect();
    check(&head, &mut got);
    let mut chunk = vec![0u8; 64 * 1024];
    while got < n {
        if stop.load(Ordering::SeqCst) || Instant::now() > deadline {
            return Ok(());
        }
        let want = chunk.len().min(n - got);
        match stream.read(&mut chunk[..want]) {
            Ok(0) => return Ok(()),
            Ok(k) => check(&chunk[..k], &mut got),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    stream.write_all(format!("got {got} {errors}\n").as_bytes())
}

fn serve_conn(mut stream: TcpStream, name: &str, stop: &AtomicBool) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(POLL))?;
    stream.write_all(format!("{name}\n").as_bytes())?;
    let mut pending = Vec::new();
    let mut chunk = [0u8; 4096];
    while !stop.load(Ordering::SeqCst) {
        match stream.read(&mut chunk) {
            Ok(0) => return Ok(()),
            Ok(n) => {
                pending.extend_from_slice(&chunk[..n]);
                while let Some(end) = pending.iter().position(|&b| b == b'\n') {
                    let line: Vec<u8> = pending.drain(..=end).collect();
                    match bulk_command(&line) {
                        Some((true, n)) => bulk_send(&mut stream, n)?,
                        Some((false, n)) => bulk_recv(&mut stream, &mut pending, n, stop)?,
                        None => stream.write_all(&line)?,
                    }
                }
                if pending.len() > MAX_LINE {
                    return Ok(());
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn udp_loop(socket: UdpSocket, name: &str, stop: &AtomicBool, stats: &ServerStats) {
    if let Ok(local) = socket.local_addr() {
        stats.local_addrs.lock().expect("poisoned").insert(local);
    }
    let mut buf = [0u8; 2048];
    while !stop.load(Ordering::SeqCst) {
        match socket.recv_from(&mut buf) {
            Ok((n, peer)) => {
                let mut reply = format!("{name} ").into_bytes();
                reply.extend_from_slice(&buf[..n]);
                if socket.send_to(&reply, peer).is_ok() {
                    stats.udp_answered.fetch_add(1, Ordering::SeqCst);
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => thread::sleep(POLL),
        }
    }
}
