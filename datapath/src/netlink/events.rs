//! The multicast event socket: link, neighbour, address and route groups of both families,
//! read without blocking on the runtime and framed by [`super::parse::datagram`].
use std::os::fd::AsRawFd as _;

use netlink_sys::{Socket, protocols::NETLINK_ROUTE};
use tokio::io::unix::AsyncFd;

use super::parse::{self, Datagram};
use crate::{Error, Result};

// rtnetlink multicast groups (`include/uapi/linux/rtnetlink.h`, enum rtnetlink_groups).
const RTNLGRP_LINK: u32 = 1;
const RTNLGRP_NEIGH: u32 = 3;
const RTNLGRP_IPV4_IFADDR: u32 = 5;
const RTNLGRP_IPV4_ROUTE: u32 = 7;
const RTNLGRP_IPV6_IFADDR: u32 = 9;
const RTNLGRP_IPV6_ROUTE: u32 = 11;

/// Datagrams read per wake-up at most, so that a flood cannot starve the controller's other
/// work (the rest is read on the next turn).
const MAX_DATAGRAMS: usize = 1024;
/// One netlink notification fits in a page or two; 64 KiB leaves room for any.
const BUFFER: usize = 64 * 1024;

pub struct EventSocket {
    fd: AsyncFd<Socket>,
    buf: Vec<u8>,
}

impl EventSocket {
    /// Opens, raises the receive buffer to `receive_buffer` bytes (SO_RCVBUFFORCE, which
    /// ignores `rmem_max`), and joins the groups.
    pub fn open(receive_buffer: u64) -> Result<Self> {
        let io = |what: &str| {
            let what = what.to_string();
            move |e: std::io::Error| Error::io(what.clone(), e)
        };
        let mut socket = Socket::new(NETLINK_ROUTE).map_err(io("open a netlink socket"))?;
        socket.bind_auto().map_err(io("bind the netlink socket"))?;
        let size = libc::c_int::try_from(receive_buffer).unwrap_or(libc::c_int::MAX);
        // SAFETY: a valid socket and a c_int option value of the size passed.
        let rc = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                (&size as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(Error::io(
                format!(
                    "set the netlink receive buffer to {receive_buffer} bytes (SO_RCVBUFFORCE)"
                ),
                std::io::Error::last_os_error(),
            ));
        }
        for group in [
            RTNLGRP_LINK,
            RTNLGRP_NEIGH,
            RTNLGRP_IPV4_IFADDR,
            RTNLGRP_IPV4_ROUTE,
            RTNLGRP_IPV6_IFADDR,
            RTNLGRP_IPV6_ROUTE,
        ] {
            socket
                .add_membership(group)
                .map_err(io(&format!("join rtnetlink group {group}")))?;
        }
        socket
            .set_non_blocking(true)
            .map_err(io("make the netlink socket non-blocking"))?;
        // SAFETY: the socket owns its descriptor, which stays open and the same for as long as
        // the AsyncFd holds it.
        let fd = unsafe { AsyncFd::register(socket) }.map_err(|e| {
            Error::io(
                "register the netlink socket",
                std::io::Error::other(e.to_string()),
            )
        })?;
        Ok(Self {
            fd,
            buf: vec![0; BUFFER],
        })
    }

    /// SO_RCVBUF as the kernel reports it (twice what was asked, for its bookkeeping).
    pub fn receive_buffer(&self) -> usize {
        self.fd.get_ref().get_rx_buf_sz().unwrap_or(0)
    }

    fn recv(&mut self) -> std::io::Result<usize> {
        // SAFETY: the buffer is valid for writes of its length.
        let n = unsafe {
            libc::recv(
                self.fd.get_ref().as_raw_fd(),
                self.buf.as_mut_ptr().cast(),
                self.buf.len(),
                0,
            )
        };
        if n < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    /// Waits for events, then reads what is queued (up to [`MAX_DATAGRAMS`]).
    pub async fn next_batch(&mut self) -> Result<Datagram> {
        loop {
            let mut guard = self
                .fd
                .readable()
                .await
                .map_err(|e| Error::io("wait on the netlink socket", e))?;
            guard.clear_ready();
            drop(guard);
            let mut out = Datagram::default();
            for _ in 0..MAX_DATAGRAMS {
                match self.recv() {
                    Ok(n) => {
                        let d = parse::datagram(&self.buf[..n]);
                        out.changes.extend(d.changes);
                        out.invalid.extend(d.invalid);
                        out.overrun |= d.overrun;
                    }
                    Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => out.overrun = true,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(Error::io("read the netlink socket", e)),
                }
            }
            if !out.changes.is_empty() || !out.invalid.is_empty() || out.overrun {
                return Ok(out);
            }
        }
    }

    /// Drops what is queued (older than the dump that follows an overrun).
    pub fn discard_queued(&mut self) {
        for _ in 0..1_000_000 {
            match self.recv() {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {}
                Err(_) => return,
            }
        }
    }
}
