//! Destroying the sockets of a removed backend (`SOCK_DESTROY` over sock_diag): TCP sockets get
//! a reset, UDP sockets `ECONNABORTED` on their next call, so clients reconnect, and the socket
//! LB sends the new socket to a live backend. Connected UDP sockets are included: left alone
//! they would talk to the removed backend for as long as they live.
//!
//! Only sockets the socket LB translated are touched: sock_diag answers each TCP socket with its
//! value of `SOCK_REVNAT` (the socket-local storage the programs write at `connect()`), and a
//! connected UDP socket's cookie is looked up in `SOCK_UDP_CONN` (sock_diag dumps no storage
//! for UDP), so a socket connected to the same address directly is left alone.
use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddr},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::{Path, PathBuf},
};

use aya::maps::{HashMap, MapData};
use bpf_common::{
    FAMILY_IPV4, FAMILY_IPV6, PROTO_TCP, PROTO_UDP,
    sock::{SockRevNat, SockRevNatSet, ipv4_of_mapped},
};
use datapath_api::{Protocol, ServiceKey};

use crate::{Error, Result};

const NETLINK_SOCK_DIAG: i32 = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
/// `INET_DIAG_REQ_SK_BPF_STORAGES`: the request attribute naming the storages to dump.
const REQ_SK_BPF_STORAGES: u16 = 2;
/// `SK_DIAG_BPF_STORAGE_REQ_MAP_FD`.
const REQ_MAP_FD: u16 = 1;
/// `INET_DIAG_SK_BPF_STORAGES`: the answer's attribute with the socket's storages.
const SK_BPF_STORAGES: u16 = 20;
/// `SK_DIAG_BPF_STORAGE`: one storage, nested in the above.
const STORAGE: u16 = 1;
/// `SK_DIAG_BPF_STORAGE_MAP_VALUE`.
const STORAGE_MAP_VALUE: u16 = 3;
const NLA_F_NESTED: u16 = 1 << 15;
const NLA_TYPE_MASK: u16 = 0x3fff;

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct NlMsgHdr {
    len: u32,
    kind: u16,
    flags: u16,
    seq: u32,
    pid: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct SockId {
    sport_be: u16,
    dport_be: u16,
    src: [u32; 4],
    dst: [u32; 4],
    interface: u32,
    cookie: [u32; 2],
}

/// `struct inet_diag_req_v2`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct DiagRequest {
    family: u8,
    protocol: u8,
    ext: u8,
    pad: u8,
    states: u32,
    id: SockId,
}

/// `struct inet_diag_msg`; its attributes follow.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct DiagMessage {
    family: u8,
    state: u8,
    timer: u8,
    retrans: u8,
    id: SockId,
    expires: u32,
    rqueue: u32,
    wqueue: u32,
    uid: u32,
    inode: u32,
}
const _: () = assert!(std::mem::size_of::<DiagMessage>() == 72);

/// The netlink attributes in `buf`: (type without flags, payload).
fn attributes(mut buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if buf.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([buf[0], buf[1]]) as usize;
        let kind = u16::from_ne_bytes([buf[2], buf[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > buf.len() {
            return None;
        }
        let payload = &buf[4..len];
        buf = &buf[((len + 3) & !3).min(buf.len())..];
        Some((kind, payload))
    })
}

/// The translations in a socket's answer attributes (its `SOCK_REVNAT` value, the one
/// storage asked for).
fn translations(attrs: &[u8]) -> Vec<SockRevNat> {
    let mut out = Vec::new();
    for (kind, storages) in attributes(attrs) {
        if kind != SK_BPF_STORAGES {
            continue;
        }
        for (kind, storage) in attributes(storages) {
            if kind != STORAGE {
                continue;
            }
            for (kind, value) in attributes(storage) {
                if kind != STORAGE_MAP_VALUE {
                    continue;
                }
                if value.len() < std::mem::size_of::<SockRevNatSet>() {
                    continue;
                }
                // SAFETY: at least one plain `repr(C)` value of the ABI.
                let set: SockRevNatSet = unsafe { std::ptr::read_unaligned(value.as_ptr().cast()) };
                out.extend(
                    set.entries
                        .iter()
                        .filter(|r| r.family == FAMILY_IPV4 || r.family == FAMILY_IPV6),
                );
            }
        }
    }
    out
}

fn as_bytes<T>(v: &T) -> &[u8] {
    // SAFETY: plain `repr(C)` structs of integers without padding, read as bytes.
    unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), std::mem::size_of::<T>()) }
}

/// A sock_diag netlink socket of the calling thread's network namespace.
struct Diag {
    fd: OwnedFd,
    seq: u32,
}

impl Diag {
    fn open() -> Result<Self> {
        // SAFETY: plain socket(2).
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                NETLINK_SOCK_DIAG,
            )
        };
        if fd < 0 {
            return Err(Error::io(
                "open a sock_diag socket",
                std::io::Error::last_os_error(),
            ));
        }
        // SAFETY: a descriptor we own from here.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let timeout = libc::timeval {
            tv_sec: 5,
            tv_usec: 0,
        };
        // SAFETY: a valid option value of the stated size.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&timeout as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            )
        };
        Ok(Self { fd, seq: 0 })
    }

    /// Sends a request of `body` and the attribute bytes `attrs`.
    fn send(&mut self, kind: u16, flags: u16, body: DiagRequest, attrs: &[u8]) -> Result<u32> {
        self.seq += 1;
        let header = NlMsgHdr {
            len: (std::mem::size_of::<NlMsgHdr>()
                + std::mem::size_of::<DiagRequest>()
                + attrs.len()) as u32,
            kind,
            flags,
            seq: self.seq,
            pid: 0,
        };
        let mut bytes = Vec::with_capacity(header.len as usize);
        bytes.extend_from_slice(as_bytes(&header));
        bytes.extend_from_slice(as_bytes(&body));
        bytes.extend_from_slice(attrs);
        // SAFETY: a buffer of the length passed.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), bytes.as_ptr().cast(), bytes.len(), 0) };
        if n < 0 {
            return Err(Error::io(
                "send to sock_diag",
                std::io::Error::last_os_error(),
            ));
        }
        Ok(self.seq)
    }

    /// Reads the answers to request `seq` until it is done: the messages of a dump, or the
    /// acknowledgement (an error code, 0 for success) of a request with `NLM_F_ACK`.
    fn answers(&mut self, seq: u32, mut each: impl FnMut(&DiagMessage, &[u8])) -> Result<i32> {
        let mut buf = vec![0u8; 64 * 1024];
        // Bounded: a dump of a million sockets is about 10,000 reads.
        for _ in 0..1_000_000 {
            // SAFETY: a buffer of the length passed.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                return Err(Error::io(
                    "read from sock_diag",
                    std::io::Error::last_os_error(),
                ));
            }
            let mut at = 0usize;
            let n = n as usize;
            while at + std::mem::size_of::<NlMsgHdr>() <= n {
                // SAFETY: within the bytes read; unaligned reads of plain structs.
                let h: NlMsgHdr = unsafe { std::ptr::read_unaligned(buf[at..].as_ptr().cast()) };
                let len = h.len as usize;
                if len < std::mem::size_of::<NlMsgHdr>() || at + len > n {
                    return Err(Error::io(
                        "read from sock_diag",
                        std::io::Error::other("a truncated netlink message"),
                    ));
                }
                let payload = &buf[at + std::mem::size_of::<NlMsgHdr>()..at + len];
                if h.seq == seq {
                    match h.kind {
                        NLMSG_DONE => return Ok(0),
                        NLMSG_ERROR => {
                            let code = payload
                                .get(..4)
                                .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
                                .unwrap_or(-libc::EIO);
                            return Ok(code);
                        }
                        SOCK_DIAG_BY_FAMILY
                            if payload.len() >= std::mem::size_of::<DiagMessage>() =>
                        {
                            // SAFETY: as above.
                            let m: DiagMessage =
                                unsafe { std::ptr::read_unaligned(payload.as_ptr().cast()) };
                            each(&m, &payload[std::mem::size_of::<DiagMessage>()..]);
                        }
                        _ => {}
                    }
                }
                at += (len + 3) & !3;
            }
        }
        Err(Error::io(
            "read from sock_diag",
            std::io::Error::other("the dump did not end"),
        ))
    }
}

/// A socket's peer address: that of an IPv4 socket, an IPv6 socket's IPv6 one, or the IPv4
/// address in an IPv6 socket's IPv4-mapped one (how such a socket reaches an IPv4 VIP).
fn peer_ip(family: i32, dst: &[u32; 4]) -> std::net::IpAddr {
    let v4 = |w: u32| std::net::IpAddr::V4(Ipv4Addr::from(w.to_ne_bytes()));
    if family == libc::AF_INET {
        return v4(dst[0]);
    }
    match ipv4_of_mapped(dst) {
        Some(w) => v4(w),
        None => bpf_common::ip_from_addr16(dst, FAMILY_IPV6),
    }
}

/// What the socket LB recorded for a socket, as a (service, backend) pair.
fn translated(r: &SockRevNat) -> (ServiceKey, SocketAddr) {
    let ip = |a: [u32; 4]| bpf_common::ip_from_addr16(&a, r.family);
    let proto = if r.proto == PROTO_UDP {
        Protocol::Udp
    } else {
        Protocol::Tcp
    };
    (
        ServiceKey {
            vip: ip(r.vip),
            port: u16::from_be(r.vip_port_be),
            proto,
        },
        SocketAddr::new(ip(r.backend), u16::from_be(r.backend_port_be)),
    )
}

/// Destroys, in the calling thread's network namespace, every TCP and UDP socket the socket LB
/// connected to a (service, backend) pair that `doomed` picks; `peers`, when given, are the
/// only backend addresses worth looking at. Answers how many it destroyed.
pub fn destroy_where(
    revnat: &MapData,
    udp_connected: &HashMap<MapData, u64, SockRevNat>,
    peers: Option<&BTreeSet<SocketAddr>>,
    doomed: impl Fn(&(ServiceKey, SocketAddr)) -> bool,
) -> Result<u64> {
    use std::os::fd::AsFd as _;
    // INET_DIAG_REQ_SK_BPF_STORAGES { SK_DIAG_BPF_STORAGE_REQ_MAP_FD: fd }.
    let fd = revnat.fd().as_fd().as_raw_fd() as u32;
    let mut attrs = Vec::new();
    attrs.extend(12u16.to_ne_bytes());
    attrs.extend((REQ_SK_BPF_STORAGES | NLA_F_NESTED).to_ne_bytes());
    attrs.extend(8u16.to_ne_bytes());
    attrs.extend(REQ_MAP_FD.to_ne_bytes());
    attrs.extend(fd.to_ne_bytes());
    let mut destroyed = 0;
    // IPv6 sockets too: IPv6 VIPs', and IPv4 VIPs' through IPv4-mapped addresses.
    for (family, protocol) in [
        (libc::AF_INET, PROTO_TCP),
        (libc::AF_INET, PROTO_UDP),
        (libc::AF_INET6, PROTO_TCP),
        (libc::AF_INET6, PROTO_UDP),
    ] {
        let mut diag = Diag::open()?;
        let seq = diag.send(
            SOCK_DIAG_BY_FAMILY,
            (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16,
            DiagRequest {
                family: family as u8,
                protocol,
                states: u32::MAX,
                ..Default::default()
            },
            &attrs,
        )?;
        let mut doomed_sockets = Vec::new();
        diag.answers(seq, |m, attrs| {
            let peer = SocketAddr::new(peer_ip(family, &m.id.dst), u16::from_be(m.id.dport_be));
            if peer.port() == 0 || peers.is_some_and(|p| !p.contains(&peer)) {
                return;
            }
            // The translation that led this socket to its peer; none: not the socket LB's.
            let recorded = if protocol == PROTO_UDP {
                let cookie = u64::from(m.id.cookie[0]) | (u64::from(m.id.cookie[1]) << 32);
                udp_connected.get(&cookie, 0).into_iter().collect()
            } else {
                translations(attrs)
            };
            let pair = recorded
                .iter()
                .map(translated)
                .find(|(_, backend)| *backend == peer);
            if let Some(pair) = pair
                && doomed(&pair)
            {
                doomed_sockets.push((*m, pair));
            }
        })?;
        for (m, pair) in doomed_sockets {
            let seq = diag.send(
                SOCK_DESTROY,
                (libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16,
                DiagRequest {
                    family: family as u8,
                    protocol,
                    states: 1 << m.state,
                    id: m.id,
                    ..Default::default()
                },
                &[],
            )?;
            match diag.answers(seq, |_, _| {})? {
                0 => destroyed += 1,
                // Gone meanwhile.
                code if code == -libc::ENOENT => {}
                code => {
                    return Err(Error::io(
                        format!("destroy the socket of {} to {}", pair.0, pair.1),
                        std::io::Error::from_raw_os_error(-code),
                    ));
                }
            }
        }
    }
    Ok(destroyed)
}

/// Most cgroup directories and processes [`member_namespaces`] looks at: a bound on the walk,
/// far above a node's.
const MAX_CGROUPS: usize = 100_000;
const MAX_PROCESSES: usize = 1_000_000;

/// The network namespaces of the processes in `cgroup` and below it, other than the daemon's
/// own: for each, the `/proc/<pid>/ns/net` of one process in it. Pods have their own
/// namespaces, whose sockets sock_diag only lists from inside.
pub fn member_namespaces(cgroup: &Path) -> Vec<PathBuf> {
    use std::os::unix::fs::MetadataExt as _;
    let own = std::fs::metadata("/proc/self/ns/net").map(|m| m.ino()).ok();
    let mut seen: BTreeSet<u64> = own.into_iter().collect();
    let mut out = Vec::new();
    let mut dirs = vec![cgroup.to_path_buf()];
    let (mut visited, mut processes) = (0usize, 0usize);
    while let Some(dir) = dirs.pop() {
        visited += 1;
        if visited > MAX_CGROUPS || processes > MAX_PROCESSES {
            tracing::warn!(cgroup = %cgroup.display(), "socklb: cgroup walk cut short");
            break;
        }
        if let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) {
            for pid in procs.lines() {
                processes += 1;
                let ns = PathBuf::from(format!("/proc/{pid}/ns/net"));
                if let Ok(m) = std::fs::metadata(&ns)
                    && seen.insert(m.ino())
                {
                    out.push(ns);
                }
            }
        }
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    dirs.push(e.path());
                }
            }
        }
    }
    out
}

/// Runs `f` on a thread of its own in the network namespace `ns` (a `/proc/<pid>/ns/net`).
pub fn in_namespace<T: Send>(ns: &Path, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let file = std::fs::File::open(ns)
                    .map_err(|e| Error::io(format!("open {}", ns.display()), e))?;
                // SAFETY: setns(2) on this thread only, with a namespace descriptor we hold.
                if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(Error::io(
                        format!("enter {}", ns.display()),
                        std::io::Error::last_os_error(),
                    ));
                }
                f()
            })
            .join()
            .unwrap_or_else(|_| {
                Err(Error::io(
                    "destroy sockets",
                    std::io::Error::other("the namespace thread panicked"),
                ))
            })
    })
}
