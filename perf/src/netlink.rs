//! `dp-bench --only netlink`: how fast the daemon follows the node (issue 12), with the real
//! daemon in the forwarding topology's LB namespace:
//!
//! - **link appears -> program attached**: 100 veths matching `lb.interfaces`, created one by
//!   one; the time from `ip link add` returning until the XDP link's pin exists (the daemon
//!   pins right after attaching);
//! - **neighbour change -> FIB generation bumped**: a backend's neighbour replaced with a new
//!   MAC, 200 times, by an RTM_NEWNEIGH the bench sends itself on a netlink socket in the LB
//!   namespace; the time until `LB_FIB_GEN` (read from its pin with aya) moved. Measured from
//!   just before the request is sent (an upper bound: the kernel's own work is inside it) and
//!   from its `sendmsg` returning (a lower bound: the kernel changes the entry and announces it
//!   inside that call, so the daemon may already be at work);
//! - **idle CPU** of the daemon over 60 s (10 s with `--smoke`), measured first: XDP on the
//!   two LB interfaces, the policy on one, a UDP service of 4 backends; `/proc/<pid>/stat`.
use std::{
    io,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_REPLACE, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage,
    NetlinkPayload,
};
use netlink_packet_route::{
    AddressFamily, RouteNetlinkMessage,
    neighbour::{
        NeighbourAddress, NeighbourAttribute, NeighbourHeader, NeighbourMessage, NeighbourState,
    },
};
use netlink_sys::{Socket, protocols::NETLINK_ROUTE};
use netns_tests::{Binaries, Daemon, DaemonOptions, topology::ip_in};
use serde::Serialize;

use crate::{forward::cpu_percent_over, report::Summary, topo};

/// Longest wait for one attachment or one bump before the bench fails.
const LIMIT: Duration = Duration::from_secs(5);

#[derive(Debug, Serialize)]
pub struct NetlinkReport {
    /// Milliseconds from `ip link add` returning to the XDP pin, per interface.
    pub attach_ms: Summary,
    /// Milliseconds from the RTM_NEWNEIGH request being sent to the bump (upper bound).
    pub bump_from_send_ms: Summary,
    /// Milliseconds from its `sendmsg` returning to the bump (lower bound).
    pub bump_from_sent_ms: Summary,
    pub idle_window_s: u64,
    pub idle_cpu_percent: f64,
}

fn wait_for(what: &str, mut f: impl FnMut() -> Result<bool>) -> Result<Instant> {
    let start = Instant::now();
    loop {
        if f()? {
            return Ok(Instant::now());
        }
        if start.elapsed() > LIMIT {
            bail!("timed out waiting for {what}");
        }
        thread::sleep(Duration::from_micros(100));
    }
}

fn fib_generation(pin: &Path) -> Result<u32> {
    let data =
        aya::maps::MapData::from_pin(pin).with_context(|| format!("open {}", pin.display()))?;
    let array: aya::maps::Array<_, u32> = aya::maps::Array::try_from(aya::maps::Map::Array(data))?;
    Ok(array.get(&0, 0)?)
}

/// The 99th percentile (nearest rank) of `s`.
pub fn p99(s: &Summary) -> f64 {
    let mut v = s.samples.clone();
    v.sort_by(f64::total_cmp);
    let rank = ((v.len() as f64) * 0.99).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

pub fn run(datapathd: PathBuf, lb_ctl: PathBuf, smoke: bool) -> Result<NetlinkReport> {
    let topo = topo::ForwardTopo::create()?;
    let config = std::env::temp_dir().join(format!("dp-bench-netlink-{}.yaml", topo.prefix));
    std::fs::write(
        &config,
        "lb:\n  interfaces: [lbc, lbb, \"nlb*\"]\npolicy:\n  enabled: true\n  interfaces: [lbb, \"nlb*\"]\n",
    )?;
    let daemon = Daemon::start_with(
        &topo.lb_ns,
        &topo.prefix,
        Binaries { datapathd, lb_ctl },
        DaemonOptions {
            ifaces: false,
            wait_ready: true,
            extra_args: vec!["--config".into(), config.display().to_string()],
        },
    )
    .context("start datapathd")?;
    let result = (|| -> Result<NetlinkReport> {
        crate::forward::add_fullnat_service(&daemon)?;
        // Idle first, as a node runs: two interfaces with XDP, TCX on one, the service.
        let window = Duration::from_secs(if smoke { 10 } else { 60 });
        let pid = daemon.pid().context("datapathd is not running")?;
        let idle = cpu_percent_over(pid, window)?;
        let links = daemon.pin_root.join("lb/links");
        let count = if smoke { 10 } else { 100 };
        let mut attach = Vec::new();
        for i in 0..count {
            let name = format!("nlb{i}");
            ip_in(
                &topo.lb_ns,
                &[
                    "link",
                    "add",
                    &name,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    &format!("pnl{i}"),
                ],
            )?;
            let created = Instant::now();
            let pin = links.join(format!("xdp_lb_{name}"));
            let done = wait_for(&format!("XDP on {name}"), || Ok(pin.exists()))?;
            attach.push(ms(done - created));
        }
        let gen_pin = daemon
            .pin_root
            .join("lb")
            .join(bpf_common::map_names::FIB_GEN);
        let backend = topo::BACKENDS[0];
        let neigh = NeighbourSocket::open_in(&topo.lb_ns, "lbb")?;
        let rounds = if smoke { 20 } else { 200 };
        let (mut from_send, mut from_sent) = (Vec::new(), Vec::new());
        for i in 0..rounds {
            let before = fib_generation(&gen_pin)?;
            let mac = [0x02, 0, 0, 0, ((i >> 8) & 0xff) as u8, (i & 0xff) as u8];
            let start = Instant::now();
            neigh.send_replace(backend, mac)?;
            let sent = Instant::now();
            neigh.ack().context("RTM_NEWNEIGH")?;
            let done = wait_for("the FIB generation to move", || {
                Ok(fib_generation(&gen_pin)? != before)
            })?;
            from_send.push(ms(done - start));
            from_sent.push(ms(done.saturating_duration_since(sent)));
        }
        Ok(NetlinkReport {
            attach_ms: Summary::of(&attach).context("no attachment")?,
            bump_from_send_ms: Summary::of(&from_send).context("no bump")?,
            bump_from_sent_ms: Summary::of(&from_sent).context("no bump")?,
            idle_window_s: window.as_secs(),
            idle_cpu_percent: idle,
        })
    })();
    if result.is_err() {
        eprintln!("{}", daemon.log());
    }
    drop(daemon);
    let _ = std::fs::remove_file(&config);
    result
}

/// A NETLINK_ROUTE socket made in a namespace, that replaces one interface's neighbours there:
/// the request the bench times, with nothing else (no process start) inside the measure.
/// Built and read with the netlink crates the daemon uses.
struct NeighbourSocket {
    socket: Socket,
    ifindex: u32,
    seq: std::cell::Cell<u32>,
}

impl NeighbourSocket {
    fn open_in(ns: &str, dev: &str) -> Result<Self> {
        let dev = std::ffi::CString::new(dev)?;
        netns_tests::netns::run_in(ns, || -> Result<Self> {
            let mut socket = Socket::new(NETLINK_ROUTE).context("netlink socket")?;
            socket.bind_auto().context("bind the netlink socket")?;
            // SAFETY: `dev` is a valid NUL-terminated string.
            let ifindex = unsafe { libc::if_nametoindex(dev.as_ptr()) };
            ensure!(ifindex != 0, "no interface {dev:?} in {ns}");
            Ok(Self {
                socket,
                ifindex,
                seq: std::cell::Cell::new(0),
            })
        })?
    }

    /// Sends RTM_NEWNEIGH (create or replace, REACHABLE) for `addr` with `mac`.
    fn send_replace(&self, addr: Ipv4Addr, mac: [u8; 6]) -> Result<()> {
        let mut n = NeighbourMessage::default();
        n.header = NeighbourHeader {
            family: AddressFamily::Inet,
            ifindex: self.ifindex,
            state: NeighbourState::Reachable,
            ..Default::default()
        };
        n.attributes = vec![
            NeighbourAttribute::Destination(NeighbourAddress::Inet(addr)),
            NeighbourAttribute::LinkLayerAddress(mac.to_vec()),
        ];
        self.seq.set(self.seq.get() + 1);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE;
        header.sequence_number = self.seq.get();
        let mut m = NetlinkMessage::new(
            header,
            NetlinkPayload::from(RouteNetlinkMessage::NewNeighbour(n)),
        );
        m.finalize();
        let mut buf = vec![0; m.buffer_len()];
        m.serialize(&mut buf);
        self.socket.send(&buf, 0).context("send RTM_NEWNEIGH")?;
        Ok(())
    }

    /// Reads the kernel's answer to the last request: an acknowledgement, or its errno.
    fn ack(&self) -> Result<()> {
        let mut buf = vec![0u8; 4096];
        let n = self
            .socket
            .recv(&mut &mut buf[..], 0)
            .context("receive the netlink answer")?;
        let answer = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&buf[..n])
            .context("decode the netlink answer")?;
        match answer.payload {
            NetlinkPayload::Error(e) => match e.code {
                None => Ok(()),
                Some(code) => {
                    Err(io::Error::from_raw_os_error(-code.get())).context("the kernel refused")
                }
            },
            other => bail!("unexpected netlink answer {other:?}"),
        }
    }
}
