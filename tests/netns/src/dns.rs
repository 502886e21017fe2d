//! DNS for the tests: a real dnsmasq (Debian's `dnsmasq-base`, run in the foreground in a
//! test namespace), `dig` and `getent` as real clients, and a scripted server that answers
//! with crafted bytes, over UDP and TCP.

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpListener, UdpSocket},
    path::Path,
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::{cmd, netns};

/// The DNS port.
pub const DNS_PORT: u16 = 53;

/// dnsmasq in the foreground in a namespace, killed on drop.
pub struct Dnsmasq(std::process::Child);

impl Dnsmasq {
    /// Starts dnsmasq in `ns`, listening on `listen` at `port`, with no upstream, no hosts
    /// file and `records` (its own options: `--host-record=...`, `--cname=...`). Ready once it
    /// answers `probe` (a name among its records) with `expect`.
    pub fn start(
        ns: &str,
        listen: &[IpAddr],
        port: u16,
        records: &[String],
        probe: (&str, &str),
    ) -> Result<Self> {
        let mut cmd = Command::new("dnsmasq");
        cmd.args([
            "--no-daemon",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
            "--pid-file=",
            &format!("--port={port}"),
        ]);
        for ip in listen {
            cmd.arg(format!("--listen-address={ip}"));
        }
        cmd.args(records)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        netns::command_in(&mut cmd, ns)?;
        let child = cmd.spawn().context("dnsmasq")?;
        let server = Self(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let port = port.to_string();
            let probe_args = [probe.0, "-p", &port, "+short", "+tries=1", "+time=1"];
            let answer = dig(ns, listen[0], &probe_args)?;
            if answer.lines().any(|l| l.trim() == probe.1) {
                return Ok(server);
            }
            if Instant::now() > deadline {
                bail!(
                    "dnsmasq in {ns} does not answer {} with {}",
                    probe.0,
                    probe.1
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `dig @server args...` in `ns`: its standard output (whatever its exit status: a hostile
/// answer makes dig fail, which is what such a test wants).
pub fn dig(ns: &str, server: IpAddr, args: &[&str]) -> Result<String> {
    let mut c = Command::new("dig");
    c.arg(format!("@{server}")).args(args);
    netns::command_in(&mut c, ns)?;
    let out = cmd::output_timeout(&mut c, Duration::from_secs(20))?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `getent ahosts name` in `ns`, resolving through `resolv_conf` (bind-mounted over
/// `/etc/resolv.conf` in a private mount namespace, so the host's file is untouched): the
/// system's own resolver (glibc) as a client.
pub fn getent(ns: &str, resolv_conf: &Path, name: &str) -> Result<String> {
    let mut c = Command::new("unshare");
    c.args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg("mount --bind \"$0\" /etc/resolv.conf && exec getent ahosts \"$1\"")
        .arg(resolv_conf)
        .arg(name);
    netns::command_in(&mut c, ns)?;
    let out = cmd::output_timeout(&mut c, Duration::from_secs(20))?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The question name of a DNS query (lowercase, dotted); `None` if it does not parse.
pub fn query_name(query: &[u8]) -> Option<String> {
    let mut labels = Vec::new();
    let mut at = 12;
    loop {
        let len = *query.get(at)? as usize;
        if len == 0 {
            break;
        }
        if len > 63 {
            return None;
        }
        labels.push(String::from_utf8_lossy(query.get(at + 1..at + 1 + len)?).to_lowercase());
        at += 1 + len;
    }
    Some(labels.join("."))
}

/// A crafted answer to a query (the query's bytes in): `None` sends nothing.
pub type Crafter = Arc<dyn Fn(&[u8]) -> Option<Vec<u8>> + Send + Sync>;

/// A scripted DNS server on `addr:53` in a namespace, over UDP and TCP, answering every query
/// with what its crafter makes of it. Stopped on drop.
pub struct ScriptedServer {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl ScriptedServer {
    pub fn start(ns: &str, addr: IpAddr, crafter: Crafter) -> Result<Self> {
        let at = SocketAddr::new(addr, DNS_PORT);
        // Sockets keep the namespace they were made in.
        let (udp, tcp) = netns::run_in(ns, || -> Result<(UdpSocket, TcpListener)> {
            Ok((
                UdpSocket::bind(at).with_context(|| format!("bind udp {at}"))?,
                TcpListener::bind(at).with_context(|| format!("bind tcp {at}"))?,
            ))
        })??;
        udp.set_read_timeout(Some(Duration::from_millis(100)))?;
        tcp.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        {
            let (stop, crafter) = (Arc::clone(&stop), Arc::clone(&crafter));
            threads.push(std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while !stop.load(Ordering::Relaxed) {
                    let Ok((n, from)) = udp.recv_from(&mut buf) else {
                        continue;
                    };
                    if let Some(reply) = crafter(&buf[..n]) {
                        let _ = udp.send_to(&reply, from);
                    }
                }
            }));
        }
        {
            let stop = Arc::clone(&stop);
            threads.push(std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let Ok((mut conn, _)) = tcp.accept() else {
                        std::thread::sleep(Duration::from_millis(20));
                        continue;
                    };
                    let _ = conn.set_nonblocking(false);
                    let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
                    let mut len = [0u8; 2];
                    if conn.read_exact(&mut len).is_err() {
                        continue;
                    }
                    let mut query = vec![0u8; u16::from_be_bytes(len) as usize];
                    if conn.read_exact(&mut query).is_err() {
                        continue;
                    }
                    if let Some(reply) = crafter(&query) {
                        // A reply longer than the framing can say is sent as its first
                        // 65535 bytes under that length.
                        let n = reply.len().min(u16::MAX as usize);
                        let _ = conn.write_all(&(n as u16).to_be_bytes());
                        let _ = conn.write_all(&reply[..n]);
                    }
                    let _ = conn.flush();
                    // Let the client close first.
                    std::thread::sleep(Duration::from_millis(200));
                }
            }));
        }
        Ok(Self { stop, threads })
    }
}

impl Drop for ScriptedServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
