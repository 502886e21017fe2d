//! One hop of the graph scenario (`tests/graph.rs`): a small real TCP client or server that
//! resolves its downstream names with real DNS A queries over UDP.
//!
//! ```text
//! graph-hop client --bind IP --resolver IP --call NAME:PORT --count N [--deadline-seconds S]
//! graph-hop server --listen IP:PORT --bind IP --resolver IP [--each NAME:PORT]...
//!                  [--once NAME:PORT]... [--max-requests N] [--deadline-seconds S]
//! ```
//!
//! - Client: calls `NAME:PORT` `N` times, one connection each (resolved anew each time), from
//!   `--bind`; prints each reply on its own line; exits 1 at the first failure.
//! - Server: prints `listening IP:PORT` once bound, then serves one connection at a time: it
//!   reads a line, makes each `--each` call (and each `--once` call on its first request
//!   only), answers `<its program's name>(<the downstream replies>)` and waits for the caller
//!   to close first. It exits after `--max-requests` requests (0 when all succeeded) or at
//!   its deadline (1, as when a request failed).
//!
//! Every wait is bounded: the sockets have timeouts, the DNS query is retried a few times,
//! and the whole program stops at its deadline.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    os::fd::FromRawFd as _,
    process::ExitCode,
    time::{Duration, Instant},
};

/// Timeout of one socket operation.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// DNS: each try's timeout and the number of tries.
const DNS_TIMEOUT: Duration = Duration::from_secs(2);
const DNS_TRIES: usize = 3;
/// How often the server looks for a connection (and at its deadline).
const ACCEPT_POLL: Duration = Duration::from_millis(10);

type Result<T> = std::result::Result<T, String>;

/// `NAME:PORT`.
#[derive(Clone, Debug)]
struct Target {
    name: String,
    port: u16,
}

fn target(s: &str) -> Result<Target> {
    let (name, port) = s
        .rsplit_once(':')
        .ok_or_else(|| format!("{s:?}: expected NAME:PORT"))?;
    Ok(Target {
        name: name.to_string(),
        port: port.parse().map_err(|e| format!("{s:?}: port: {e}"))?,
    })
}

#[derive(Debug, Default)]
struct Args {
    mode: String,
    bind: Option<Ipv4Addr>,
    resolver: Option<Ipv4Addr>,
    listen: Option<SocketAddrV4>,
    call: Option<Target>,
    count: usize,
    each: Vec<Target>,
    once: Vec<Target>,
    max_requests: usize,
    deadline: Duration,
}

fn parse_args() -> Result<Args> {
    let mut it = std::env::args().skip(1);
    let mut a = Args {
        mode: it.next().ok_or("usage: graph-hop client|server ...")?,
        count: 1,
        max_requests: 1000,
        deadline: Duration::from_secs(120),
        ..Args::default()
    };
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let bad = |e: &dyn std::fmt::Display| format!("{flag} {value:?}: {e}");
        match flag.as_str() {
            "--bind" => a.bind = Some(value.parse().map_err(|e| bad(&e))?),
            "--resolver" => a.resolver = Some(value.parse().map_err(|e| bad(&e))?),
            "--listen" => a.listen = Some(value.parse().map_err(|e| bad(&e))?),
            "--call" => a.call = Some(target(&value)?),
            "--count" => a.count = value.parse().map_err(|e| bad(&e))?,
            "--each" => a.each.push(target(&value)?),
            "--once" => a.once.push(target(&value)?),
            "--max-requests" => a.max_requests = value.parse().map_err(|e| bad(&e))?,
            "--deadline-seconds" => {
                a.deadline = Duration::from_secs(value.parse().map_err(|e| bad(&e))?)
            }
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    Ok(a)
}

/// The name this copy of the program runs under (`frontend`, `api`, ...): what it answers.
fn my_name() -> String {
    std::env::args()
        .next()
        .and_then(|a| {
            std::path::Path::new(&a)
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
        })
        .unwrap_or_else(|| "graph-hop".into())
}

// ---------------------------------------------------------------------------------------------
// DNS: one A question over UDP, the wire format by hand (RFC 1035).
// ---------------------------------------------------------------------------------------------

/// A query for `name`'s A records, with recursion desired.
fn dns_query(id: u16, name: &str) -> Result<Vec<u8>> {
    let mut q = Vec::with_capacity(32 + name.len());
    q.extend(id.to_be_bytes());
    q.extend([0x01, 0x00]); // RD
    q.extend([0, 1, 0, 0, 0, 0, 0, 0]); // QDCOUNT 1
    for label in name.trim_end_matches('.').split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err(format!("{name:?} is not a DNS name"));
        }
        q.push(label.len() as u8);
        q.extend(label.as_bytes());
    }
    q.push(0);
    q.extend([0, 1, 0, 1]); // type A, class IN
    Ok(q)
}

/// The offset past the (possibly compressed) name at `at`.
fn skip_name(m: &[u8], mut at: usize) -> Result<usize> {
    // At most 128 labels in a name of 255 bytes.
    for _ in 0..128 {
        let len = *m.get(at).ok_or("name past the message")?;
        match len {
            0 => return Ok(at + 1),
            l if l & 0xc0 == 0xc0 => return Ok(at + 2),
            l if l & 0xc0 == 0 => at += 1 + l as usize,
            _ => return Err("bad label".into()),
        }
    }
    Err("name too long".into())
}

fn u16_at(m: &[u8], at: usize) -> Result<u16> {
    m.get(at..at + 2)
        .map(|b| u16::from_be_bytes([b[0], b[1]]))
        .ok_or_else(|| "message cut short".to_string())
}

/// The first A record of the answer to query `id`.
fn dns_answer(id: u16, m: &[u8]) -> Result<Ipv4Addr> {
    if m.len() < 12 || u16_at(m, 0)? != id {
        return Err("not the answer to our query".into());
    }
    let flags = u16_at(m, 2)?;
    if flags & 0x8000 == 0 {
        return Err("not a response".into());
    }
    if flags & 0x000f != 0 {
        return Err(format!("rcode {}", flags & 0x000f));
    }
    let (qd, an) = (u16_at(m, 4)?, u16_at(m, 6)?);
    let mut at = 12;
    for _ in 0..qd {
        at = skip_name(m, at)? + 4;
    }
    for _ in 0..an {
        at = skip_name(m, at)?;
        let (ty, class) = (u16_at(m, at)?, u16_at(m, at + 2)?);
        let len = u16_at(m, at + 8)? as usize;
        at += 10;
        let data = m.get(at..at + len).ok_or("record past the message")?;
        if ty == 1 && class == 1 && len == 4 {
            return Ok(Ipv4Addr::new(data[0], data[1], data[2], data[3]));
        }
        at += len;
    }
    Err("no A record in the answer".into())
}

/// `name`'s address, asked of `resolver:53` from `bind`.
fn resolve(bind: Ipv4Addr, resolver: Ipv4Addr, name: &str) -> Result<Ipv4Addr> {
    let sock = UdpSocket::bind((bind, 0)).map_err(|e| format!("bind udp {bind}: {e}"))?;
    sock.set_read_timeout(Some(DNS_TIMEOUT))
        .map_err(|e| e.to_string())?;
    sock.connect((resolver, 53))
        .map_err(|e| format!("connect udp {resolver}:53: {e}"))?;
    let mut last = String::new();
    for attempt in 0..DNS_TRIES {
        let id = (std::process::id() as u16) ^ (attempt as u16).wrapping_mul(0x9e37);
        let query = dns_query(id, name)?;
        sock.send(&query)
            .map_err(|e| format!("send to {resolver}: {e}"))?;
        let mut buf = [0u8; 1500];
        match sock.recv(&mut buf) {
            Ok(n) => match dns_answer(id, &buf[..n]) {
                Ok(a) => return Ok(a),
                Err(e) => last = e,
            },
            Err(e) => last = e.to_string(),
        }
    }
    Err(format!("resolving {name} at {resolver}: {last}"))
}

// ---------------------------------------------------------------------------------------------
// TCP from a chosen source address.
// ---------------------------------------------------------------------------------------------

fn sockaddr(a: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*a.ip()).to_be(),
        },
        sin_zero: [0; 8],
    }
}

/// A TCP connection to `to` from `bind` (any port), with bounded connect, reads and writes.
fn connect_from(bind: Ipv4Addr, to: SocketAddrV4) -> Result<TcpStream> {
    let os = |what: &str| {
        format!(
            "{what} ({bind} -> {to}): {}",
            std::io::Error::last_os_error()
        )
    };
    // SAFETY: plain socket calls on a descriptor this function owns; the stream takes it over.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(os("socket"));
        }
        let stream = TcpStream::from_raw_fd(fd);
        // connect(2) honours the send timeout.
        stream
            .set_write_timeout(Some(IO_TIMEOUT))
            .map_err(|e| e.to_string())?;
        stream
            .set_read_timeout(Some(IO_TIMEOUT))
            .map_err(|e| e.to_string())?;
        let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        let local = sockaddr(SocketAddrV4::new(bind, 0));
        if libc::bind(fd, (&raw const local).cast(), len) != 0 {
            return Err(os("bind"));
        }
        let remote = sockaddr(to);
        if libc::connect(fd, (&raw const remote).cast(), len) != 0 {
            return Err(os("connect"));
        }
        Ok(stream)
    }
}

/// One line, without its newline (at most 4 KiB).
fn read_line(stream: &TcpStream) -> Result<String> {
    let mut line = String::new();
    BufReader::new(stream.take(4096))
        .read_line(&mut line)
        .map_err(|e| format!("read: {e}"))?;
    if !line.ends_with('\n') {
        return Err(format!("no full line: {line:?}"));
    }
    Ok(line.trim_end().to_string())
}

/// One call: resolve, connect, a line each way, then close (the caller closes first).
fn call(bind: Ipv4Addr, resolver: Ipv4Addr, t: &Target, what: &str) -> Result<String> {
    let ip = resolve(bind, resolver, &t.name)?;
    let mut s = connect_from(bind, SocketAddrV4::new(ip, t.port))?;
    s.write_all(format!("{what}\n").as_bytes())
        .map_err(|e| format!("write to {}: {e}", t.name))?;
    let reply = read_line(&s).map_err(|e| format!("{}: {e}", t.name))?;
    drop(s);
    Ok(reply)
}

fn client(a: &Args) -> Result<()> {
    let (bind, resolver) = (a.bind.ok_or("--bind")?, a.resolver.ok_or("--resolver")?);
    let t = a.call.as_ref().ok_or("--call")?;
    let deadline = Instant::now() + a.deadline;
    for i in 0..a.count {
        if Instant::now() > deadline {
            return Err(format!("deadline reached after {i} calls"));
        }
        let reply = call(bind, resolver, t, &format!("request {i}"))?;
        println!("{reply}");
    }
    Ok(())
}

/// Serves one connection: a line in, the downstream calls, the answer out, then waits
/// (bounded) for the caller's close.
fn serve(a: &Args, stream: TcpStream, first: bool, me: &str) -> Result<()> {
    stream
        .set_nonblocking(false)
        .and_then(|()| stream.set_read_timeout(Some(IO_TIMEOUT)))
        .and_then(|()| stream.set_write_timeout(Some(IO_TIMEOUT)))
        .map_err(|e| e.to_string())?;
    let request = read_line(&stream)?;
    let mut replies = Vec::new();
    let once = if first { &a.once[..] } else { &[][..] };
    for t in a.each.iter().chain(once) {
        let (bind, resolver) = (
            a.bind.ok_or("--bind is needed for calls")?,
            a.resolver.ok_or("--resolver is needed for calls")?,
        );
        replies.push(call(bind, resolver, t, &format!("{me}: {request}"))?);
    }
    let mut s = &stream;
    s.write_all(format!("{me}({})\n", replies.join(",")).as_bytes())
        .map_err(|e| format!("write: {e}"))?;
    // The caller closes first; anything more it sends is drained (at most 64 KiB).
    let mut rest = [0u8; 4096];
    for _ in 0..16 {
        match s.read(&mut rest) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
    Ok(())
}

fn server(a: &Args) -> Result<()> {
    let listen = a.listen.ok_or("--listen")?;
    let me = my_name();
    let listener = TcpListener::bind(listen).map_err(|e| format!("listen {listen}: {e}"))?;
    listener.set_nonblocking(true).map_err(|e| e.to_string())?;
    println!("listening {listen}");
    std::io::stdout().flush().map_err(|e| e.to_string())?;
    let deadline = Instant::now() + a.deadline;
    let (mut served, mut failed) = (0, 0);
    while served < a.max_requests && Instant::now() < deadline {
        match listener.accept() {
            Ok((stream, peer)) => {
                if let Err(e) = serve(a, stream, served == 0, &me) {
                    eprintln!("{me}: request from {peer}: {e}");
                    failed += 1;
                }
                served += 1;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(ACCEPT_POLL),
            Err(e) => return Err(format!("accept: {e}")),
        }
    }
    match (failed, served < a.max_requests) {
        (0, false) => Ok(()),
        (0, true) => Err(format!("deadline reached after {served} requests")),
        _ => Err(format!("{failed} of {served} requests failed")),
    }
}

fn main() -> ExitCode {
    let result = parse_args().and_then(|a| match a.mode.as_str() {
        "client" => client(&a),
        "server" => server(&a),
        m => Err(format!("unknown mode {m:?}: client or server")),
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{}: {e}", my_name());
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_with_a_compressed_name_gives_its_a_record() {
        let q = dns_query(7, "api.svc.test").unwrap();
        let mut m = q.clone();
        m[2] = 0x81;
        m[3] = 0x80;
        m[7] = 1; // ANCOUNT 1
        m.extend([0xc0, 12, 0, 1, 0, 1, 0, 0, 1, 44, 0, 4, 198, 18, 100, 12]);
        assert_eq!(dns_answer(7, &m), Ok(Ipv4Addr::new(198, 18, 100, 12)));
        assert!(dns_answer(8, &m).is_err(), "another query's id");
        m[3] = 0x83; // NXDOMAIN
        assert!(dns_answer(7, &m).is_err());
    }
}
