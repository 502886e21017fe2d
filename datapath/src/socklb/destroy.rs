//! Destroying the sockets of a removed backend (`SOCK_DESTROY` over sock_diag): TCP sockets get
//! a reset, UDP sockets `ECONNABORTED` on their next call, so clients reconnect, and the socket
//! LB sends the new socket to a live backend. Connected UDP sockets are included: left alone
//! they would talk to the removed backend for as long as they live.
//!
//! Only sockets the socket LB translated are touched: each connected socket's translation is in
//! `SOCK_BY_COOKIE`, and sock_diag answers every socket's cookie. A socket connected to the same
//! address directly is left alone.
use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddr},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

use aya::maps::{HashMap, MapData};
use bpf_common::{PROTO_TCP, PROTO_UDP, sock::SockRevNat};
use datapath_api::{Protocol, ServiceKey};

use crate::{Error, Result};

const NETLINK_SOCK_DIAG: i32 = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;

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

/// The start of `struct inet_diag_msg`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct DiagMessage {
    family: u8,
    state: u8,
    timer: u8,
    retrans: u8,
    id: SockId,
}

#[repr(C)]
struct Request {
    header: NlMsgHdr,
    body: DiagRequest,
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

    fn send(&mut self, kind: u16, flags: u16, body: DiagRequest) -> Result<u32> {
        self.seq += 1;
        let req = Request {
            header: NlMsgHdr {
                len: std::mem::size_of::<Request>() as u32,
                kind,
                flags,
                seq: self.seq,
                pid: 0,
            },
            body,
        };
        let bytes = as_bytes(&req);
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
    fn answers(&mut self, seq: u32, mut each: impl FnMut(&DiagMessage)) -> Result<i32> {
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
                            each(&m);
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

/// What the socket LB recorded for a socket, as a (service, backend) pair.
fn translated(r: &SockRevNat) -> (ServiceKey, SocketAddr) {
    let ip = |a: [u32; 4]| std::net::IpAddr::V4(Ipv4Addr::from(a[0].to_ne_bytes()));
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
    by_cookie: &HashMap<MapData, u64, SockRevNat>,
    peers: Option<&BTreeSet<SocketAddr>>,
    doomed: impl Fn(&(ServiceKey, SocketAddr)) -> bool,
) -> Result<u64> {
    let mut destroyed = 0;
    for protocol in [PROTO_TCP, PROTO_UDP] {
        let mut diag = Diag::open()?;
        let seq = diag.send(
            SOCK_DIAG_BY_FAMILY,
            (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16,
            DiagRequest {
                family: libc::AF_INET as u8,
                protocol,
                states: u32::MAX,
                ..Default::default()
            },
        )?;
        let mut candidates = Vec::new();
        diag.answers(seq, |m| {
            let peer = SocketAddr::new(
                std::net::IpAddr::V4(Ipv4Addr::from(m.id.dst[0].to_ne_bytes())),
                u16::from_be(m.id.dport_be),
            );
            if peer.port() != 0 && peers.is_none_or(|p| p.contains(&peer)) {
                candidates.push(*m);
            }
        })?;
        for m in candidates {
            let cookie = u64::from(m.id.cookie[0]) | (u64::from(m.id.cookie[1]) << 32);
            let Ok(record) = by_cookie.get(&cookie, 0) else {
                // Not one the socket LB connected.
                continue;
            };
            let pair = translated(&record);
            if !doomed(&pair) {
                continue;
            }
            let seq = diag.send(
                SOCK_DESTROY,
                (libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16,
                DiagRequest {
                    family: libc::AF_INET as u8,
                    protocol,
                    states: 1 << m.state,
                    id: m.id,
                    ..Default::default()
                },
            )?;
            match diag.answers(seq, |_| {})? {
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
