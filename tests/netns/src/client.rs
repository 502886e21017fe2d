//! Clients: they run inside the client namespace and report which backend answered.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    io::{ErrorKind, Read, Write},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream, UdpSocket},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};

use crate::{netns, topology::CLIENT_IP};

/// Longest a client waits for a connect or an answer.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// A burst gives up after this many failures (each failure can cost up to [`IO_TIMEOUT`]).
pub const MAX_BURST_ERRORS: usize = 10;
/// Longest a bulk transfer ([`Conn::bulk_download`], [`Conn::bulk_upload`]) may take.
pub const BULK_TIMEOUT: Duration = Duration::from_secs(30);
/// A burst never runs longer than this, whatever its count.
pub const MAX_BURST_TIME: Duration = Duration::from_secs(60);

/// A TCP connection to a backend server, through whatever is in between.
pub struct Conn {
    stream: TcpStream,
    pending: Vec<u8>,
    /// The backend that answered (its greeting line).
    pub backend: String,
    pub local: SocketAddr,
    pub peer: SocketAddr,
    exchanged: usize,
}

impl fmt::Debug for Conn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} -> {} ({})", self.local, self.peer, self.backend)
    }
}

impl Conn {
    /// Connects to `addr` and reads the greeting. Call inside the client namespace (see
    /// [`connect_in`]).
    pub fn connect(addr: SocketAddr) -> Result<Conn> {
        let stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT)
            .with_context(|| format!("connect to {addr}"))?;
        Self::greeted(stream, addr)
    }

    /// Connects to `addr` from the client's address and a fixed source `port` (a client that
    /// reuses its source ports), and reads the greeting. Call inside the client namespace.
    pub fn connect_from(port: u16, addr: SocketAddr) -> Result<Conn> {
        use std::os::fd::FromRawFd as _;
        let what = || format!("connect from port {port} to {addr}");
        let SocketAddr::V4(to) = addr else {
            bail!("{}: IPv4 only", what());
        };
        let sockaddr = |a: SocketAddrV4| libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: a.port().to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes(a.ip().octets()),
            },
            sin_zero: [0; 8],
        };
        let len = size_of::<libc::sockaddr_in>() as libc::socklen_t;
        // SAFETY: plain socket calls on a descriptor owned here (handed to TcpStream at the
        // end, or closed on error); the option and address buffers outlive each call.
        let stream = unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
            ensure!(
                fd >= 0,
                "{}: socket: {}",
                what(),
                std::io::Error::last_os_error()
            );
            let stream = TcpStream::from_raw_fd(fd);
            let one: libc::c_int = 1;
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_REUSEADDR,
                (&one as *const libc::c_int).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            );
            // connect() gives up after SO_SNDTIMEO.
            let timeout = libc::timeval {
                tv_sec: IO_TIMEOUT.as_secs() as libc::time_t,
                tv_usec: 0,
            };
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_SNDTIMEO,
                (&timeout as *const libc::timeval).cast(),
                size_of::<libc::timeval>() as libc::socklen_t,
            );
            let local = sockaddr(SocketAddrV4::new(CLIENT_IP, port));
            if libc::bind(fd, (&local as *const libc::sockaddr_in).cast(), len) != 0 {
                bail!("{}: bind: {}", what(), std::io::Error::last_os_error());
            }
            let remote = sockaddr(to);
            if libc::connect(fd, (&remote as *const libc::sockaddr_in).cast(), len) != 0 {
                bail!("{}: {}", what(), std::io::Error::last_os_error());
            }
            stream
        };
        stream.set_write_timeout(None)?;
        Self::greeted(stream, addr)
    }

    /// Closes the connection with a RST (`SO_LINGER` 0), so the client keeps no TIME_WAIT and
    /// can reuse its source port at once.
    pub fn reset(self) -> Result<()> {
        use std::os::fd::AsRawFd as _;
        let linger = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        // SAFETY: setsockopt on the stream's own descriptor; the buffer outlives the call.
        let rc = unsafe {
            libc::setsockopt(
                self.stream.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&linger as *const libc::linger).cast(),
                size_of::<libc::linger>() as libc::socklen_t,
            )
        };
        ensure!(rc == 0, "SO_LINGER: {}", std::io::Error::last_os_error());
        drop(self);
        Ok(())
    }

    fn greeted(stream: TcpStream, addr: SocketAddr) -> Result<Conn> {
        stream.set_nodelay(true)?;
        let local = stream.local_addr()?;
        let peer = stream.peer_addr()?;
        let mut conn = Conn {
            stream,
            pending: Vec::new(),
            backend: String::new(),
            local,
            peer,
            exchanged: 0,
        };
        conn.backend = conn
            .read_line()
            .with_context(|| format!("greeting on {local} -> {addr}"))?;
        ensure!(
            !conn.backend.is_empty(),
            "empty greeting on {local} -> {addr}"
        );
        Ok(conn)
    }

    fn read_line(&mut self) -> Result<String> {
        self.read_line_within(IO_TIMEOUT)
    }

    fn read_line_within(&mut self, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        let mut chunk = [0u8; 1024];
        loop {
            if let Some(end) = self.pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.pending.drain(..=end).collect();
                return Ok(String::from_utf8_lossy(&line[..line.len() - 1]).into_owned());
            }
            let now = Instant::now();
            if now >= deadline {
                bail!("no complete line within {timeout:?}");
            }
            self.stream.set_read_timeout(Some(deadline - now))?;
            match self.stream.read(&mut chunk) {
                Ok(0) => bail!("connection closed by the peer"),
                Ok(n) => self.pending.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    bail!("no complete line within {timeout:?}")
                }
                Err(e) => return Err(e).context("read"),
            }
        }
    }

    /// Sends one line and checks that the same line comes back.
    pub fn echo(&mut self, msg: &str) -> Result<()> {
        let what = format!("echo on {self:?}");
        self.stream
            .write_all(format!("{msg}\n").as_bytes())
            .with_context(|| what.clone())?;
        let back = self.read_line().with_context(|| what.clone())?;
        ensure!(back == msg, "{what}: sent {msg:?}, got {back:?}");
        self.exchanged += 1;
        Ok(())
    }

    /// Asks the server for `n` bytes (`bulk-send`) and checks every byte against the pattern.
    /// Bounded by [`BULK_TIMEOUT`].
    pub fn bulk_download(&mut self, n: usize) -> Result<()> {
        let what = format!("download of {n} bytes on {self:?}");
        self.stream
            .write_all(format!("bulk-send {n}\n").as_bytes())
            .with_context(|| what.clone())?;
        let deadline = Instant::now() + BULK_TIMEOUT;
        let mut got = 0usize;
        let check = |bytes: &[u8], got: &mut usize| -> Result<()> {
            for b in bytes {
                ensure!(
                    *b == crate::servers::bulk_byte(*got),
                    "{what}: byte {got} differs from the pattern"
                );
                *got += 1;
            }
            Ok(())
        };
        let head: Vec<u8> = self.pending.drain(..self.pending.len().min(n)).collect();
        check(&head, &mut got)?;
        let mut chunk = vec![0u8; 64 * 1024];
        while got < n {
            let now = Instant::now();
            ensure!(
                now < deadline,
                "{what}: {got} bytes within {BULK_TIMEOUT:?}"
            );
            self.stream.set_read_timeout(Some(deadline - now))?;
            let want = chunk.len().min(n - got);
            match self.stream.read(&mut chunk[..want]) {
                Ok(0) => bail!("{what}: closed by the peer after {got} bytes"),
                Ok(k) => check(&chunk[..k], &mut got)?,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    bail!("{what}: {got} bytes within {BULK_TIMEOUT:?}")
                }
                Err(e) => return Err(e).with_context(|| format!("{what}: read")),
            }
        }
        Ok(())
    }

    /// Sends `n` pattern bytes (`bulk-recv`) and checks that the server received them all
    /// intact. Bounded by [`BULK_TIMEOUT`].
    pub fn bulk_upload(&mut self, n: usize) -> Result<()> {
        let what = format!("upload of {n} bytes on {self:?}");
        self.stream.set_write_timeout(Some(BULK_TIMEOUT))?;
        self.stream
            .write_all(format!("bulk-recv {n}\n").as_bytes())
            .with_context(|| what.clone())?;
        let data: Vec<u8> = (0..n).map(crate::servers::bulk_byte).collect();
        self.stream.write_all(&data).with_context(|| what.clone())?;
        self.stream.set_read_timeout(Some(BULK_TIMEOUT))?;
        let answer = self
            .read_line_within(BULK_TIMEOUT)
            .with_context(|| what.clone())?;
        ensure!(
            answer == format!("got {n} 0"),
            "{what}: the server answered {answer:?}"
        );
        Ok(())
    }

    /// Sends a fresh numbered line and checks the echo.
    pub fn ping(&mut self) -> Result<()> {
        let msg = format!("ping {} from {}", self.exchanged, self.local);
        self.echo(&msg)
    }
}

/// Connects from inside namespace `ns`.
pub fn connect_in(ns: &str, addr: SocketAddr) -> Result<Conn> {
    netns::run_in(ns, || Conn::connect(addr))?
}

/// Opens `count` connections from inside namespace `ns` and keeps them.
pub fn connect_many_in(ns: &str, addr: SocketAddr, count: usize) -> Result<Vec<Conn>> {
    netns::run_in(ns, || (0..count).map(|_| Conn::connect(addr)).collect())?
}

/// Opens long-lived connections until every backend in `backends` holds at least `min_each`
/// of them, opening at most `max_total`.
pub fn connect_until_each_in(
    ns: &str,
    addr: SocketAddr,
    backends: &[&str],
    min_each: usize,
    max_total: usize,
) -> Result<Vec<Conn>> {
    netns::run_in(ns, || -> Result<Vec<Conn>> {
        let mut conns: Vec<Conn> = Vec::new();
        let enough = |conns: &[Conn]| {
            backends
                .iter()
                .all(|b| conns.iter().filter(|c| c.backend == *b).count() >= min_each)
        };
        while !enough(&conns) {
            ensure!(
                conns.len() < max_total,
                "after {max_total} connections, not every backend of {backends:?} has \
                 {min_each}: {}",
                format_counts(&count_backends(conns.iter().map(|c| c.backend.as_str())))
            );
            conns.push(Conn::connect(addr)?);
        }
        Ok(conns)
    })?
}

/// Sends a line on every connection and checks the echoes.
pub fn ping_all(conns: &mut [Conn]) -> Result<()> {
    for c in conns.iter_mut() {
        c.ping()?;
    }
    Ok(())
}

/// Who answered a burst of flows.
#[derive(Clone, Debug, Default)]
pub struct Spread {
    /// Answers by backend name.
    pub counts: BTreeMap<String, usize>,
    /// Flows that failed, with why (the burst stops after [`MAX_BURST_ERRORS`]).
    pub errors: Vec<String>,
    /// Distinct client source ports used.
    pub local_ports: BTreeSet<u16>,
    /// Distinct addresses the answers came from.
    pub peers: BTreeSet<SocketAddr>,
    /// Flows attempted.
    pub attempted: usize,
}

impl Spread {
    /// Flows that got an answer.
    pub fn answered(&self) -> usize {
        self.counts.values().sum()
    }

    /// Answers from backend `name`.
    pub fn count(&self, name: &str) -> usize {
        self.counts.get(name).copied().unwrap_or(0)
    }

    /// A small table: backend, count, percentage.
    pub fn table(&self) -> String {
        let total = self.answered().max(1);
        let mut out = format!("{:<8} {:>6} {:>7}\n", "backend", "conns", "share");
        for (name, n) in &self.counts {
            out.push_str(&format!(
                "{:<8} {:>6} {:>6.1}%\n",
                name,
                n,
                100.0 * *n as f64 / total as f64
            ));
        }
        out.push_str(&format!(
            "{:<8} {:>6} (of {} attempted, {} failed)\n",
            "total",
            self.answered(),
            self.attempted,
            self.errors.len()
        ));
        out
    }

    fn stop_early(&self, started: Instant) -> bool {
        self.errors.len() >= MAX_BURST_ERRORS || started.elapsed() >= MAX_BURST_TIME
    }
}

fn count_backends<'a>(names: impl Iterator<Item = &'a str>) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for n in names {
        *counts.entry(n.to_string()).or_insert(0) += 1;
    }
    counts
}

fn format_counts(counts: &BTreeMap<String, usize>) -> String {
    counts
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Opens `count` TCP connections one after the other from inside namespace `ns`; each reads
/// the greeting (who answered) and closes. Bounded by [`MAX_BURST_ERRORS`] and
/// [`MAX_BURST_TIME`].
pub fn tcp_spread_in(ns: &str, addr: SocketAddr, count: usize) -> Result<Spread> {
    tcp_spread_within(ns, addr, count, MAX_BURST_TIME)
}

/// [`tcp_spread_in`] that stops opening connections after `max_time`.
pub fn tcp_spread_within(
    ns: &str,
    addr: SocketAddr,
    count: usize,
    max_time: Duration,
) -> Result<Spread> {
    netns::run_in(ns, || {
        let started = Instant::now();
        let mut spread = Spread::default();
        for i in 0..count {
            if spread.stop_early(started) || started.elapsed() >= max_time {
                break;
            }
            spread.attempted += 1;
            match Conn::connect(addr) {
                Ok(conn) => {
                    *spread.counts.entry(conn.backend.clone()).or_insert(0) += 1;
                    spread.local_ports.insert(conn.local.port());
                    spread.peers.insert(conn.peer);
                }
                Err(e) => spread.errors.push(format!("connection {i}: {e:#}")),
            }
        }
        spread
    })
}

/// Sends one datagram from each of `count` client sockets bound to distinct ports
/// (`first_port`, `first_port + 1`, ...) from inside namespace `ns`; each expects the answer
/// `<backend> <payload>` from `addr` itself. Bounded like [`tcp_spread_in`].
pub fn udp_spread_in(ns: &str, addr: SocketAddr, count: usize, first_port: u16) -> Result<Spread> {
    ensure!(
        usize::from(first_port) + count <= usize::from(u16::MAX),
        "port range overflows"
    );
    netns::run_in(ns, || {
        let started = Instant::now();
        let mut spread = Spread::default();
        for i in 0..count {
            if spread.stop_early(started) {
                break;
            }
            spread.attempted += 1;
            let port = first_port + i as u16;
            let result = (|| -> Result<(String, SocketAddr)> {
                let local = SocketAddr::V4(SocketAddrV4::new(CLIENT_IP, port));
                let socket = UdpSocket::bind(local).with_context(|| format!("bind {local}"))?;
                let payload = format!("flow {i}");
                udp_ask(&socket, addr, &payload)
            })();
            match result {
                Ok((backend, from)) => {
                    *spread.counts.entry(backend).or_insert(0) += 1;
                    spread.local_ports.insert(port);
                    spread.peers.insert(from);
                }
                Err(e) => spread
                    .errors
                    .push(format!("flow {i} from port {port}: {e:#}")),
            }
        }
        spread
    })
}

/// Sends `count` datagrams from one socket (one flow) from inside namespace `ns`; returns who
/// answered each.
pub fn udp_one_flow_in(ns: &str, addr: SocketAddr, count: usize) -> Result<Vec<String>> {
    netns::run_in(ns, || -> Result<Vec<String>> {
        let socket = UdpSocket::bind(SocketAddrV4::new(CLIENT_IP, 0))?;
        (0..count)
            .map(|i| udp_ask(&socket, addr, &format!("same flow {i}")).map(|(b, _)| b))
            .collect()
    })?
}

/// One request/answer, with up to 3 tries (UDP may lose a datagram while a neighbour is
/// being resolved). Checks that the answer comes from `addr` and echoes `payload`.
fn udp_ask(socket: &UdpSocket, addr: SocketAddr, payload: &str) -> Result<(String, SocketAddr)> {
    socket.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut buf = [0u8; 2048];
    for _try in 0..3 {
        socket.send_to(payload.as_bytes(), addr)?;
        match socket.recv_from(&mut buf) {
            Ok((n, from)) => {
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                ensure!(
                    from == addr,
                    "answer {text:?} came from {from}, not from {addr}"
                );
                let Some((backend, echoed)) = text.split_once(' ') else {
                    bail!("malformed answer {text:?}");
                };
                ensure!(
                    echoed == payload,
                    "answer {text:?} does not echo {payload:?}"
                );
                return Ok((backend.to_string(), from));
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => return Err(e).context("recv"),
        }
    }
    bail!("no answer to {payload:?} from {addr} after 3 tries")
}

/// `ip:port` for an IPv4 address.
pub fn sock(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(ip, port))
}
