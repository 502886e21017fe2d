//! The forwarding benchmark's namespace topology, and small interface helpers.
//!
//! ```text
//!  generator ns "<p>g"            LB ns "<p>lb"                        sink ns "<p>s"
//!  g0 198.18.0.1/24 <--veth--> lbc 198.18.0.2/24
//!                              lbb 198.18.1.1/24 <--veth--> s0 198.18.1.11-14/24 (xdp_count_sink)
//! ```
//!
//! The generator sends out of `g0` (live frames), so frames arrive at `lbc`, where the device
//! under test runs (the XDP load balancer, nftables DNAT behind `xdp_pass`, or `xdp_drop_count`).
//! Everything is addressed from 198.18.0.0/15; the LB node has static (permanent) neighbour
//! entries for the backends, so nothing depends on ARP. The LB node's interfaces are named as
//! in the namespace tests' topology (`lbc`, `lbb`), so `netns_tests::Daemon` can run the daemon
//! on them. Dropping the topology deletes its namespaces (and with them their interfaces and the
//! programs attached to them); nothing is created in or attached to the root namespace.

use std::{
    net::Ipv4Addr,
    sync::atomic::{AtomicUsize, Ordering},
};

use anyhow::{Context, Result, ensure};
use netns_tests::{
    netns::OwnedNetns,
    topology::{exec_in, ip_in, sysctl_in},
};

/// The generator's address (and first flow source is [`FLOW_SRC_IP`]).
pub const GEN_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// First source address of the generated flows (flows beyond one address's ports take the
/// following ones); in the generator's subnet, never the LB node's own address.
pub const FLOW_SRC_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 100);
/// The LB node's address towards the generator.
pub const LB_FRONT_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
/// The LB node's address towards the backends (full-NAT's source address).
pub const LB_BACK_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);
/// The service address.
pub const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 1);
/// The service port.
pub const VIP_PORT: u16 = 80;
/// The backends' port.
pub const BACKEND_PORT: u16 = 8080;
/// The backends (all held by the sink's interface).
pub const BACKENDS: [Ipv4Addr; 4] = [
    Ipv4Addr::new(198, 18, 1, 11),
    Ipv4Addr::new(198, 18, 1, 12),
    Ipv4Addr::new(198, 18, 1, 13),
    Ipv4Addr::new(198, 18, 1, 14),
];
/// Interface names.
pub const GEN_IFACE: &str = "g0";
pub const LB_FRONT_IFACE: &str = "lbc";
pub const LB_BACK_IFACE: &str = "lbb";
pub const SINK_IFACE: &str = "s0";

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A fresh name prefix for this process: `pf<pid><n>`.
pub fn unique_prefix() -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("pf{}{}", std::process::id() % 100_000, n)
}

/// The MAC address of `iface` in namespace `ns`.
pub fn mac_of(ns: &str, iface: &str) -> Result<[u8; 6]> {
    let out = ip_in(ns, &["-j", "link", "show", "dev", iface])?;
    let json: serde_json::Value =
        serde_json::from_str(&out).with_context(|| format!("`ip -j link show` printed {out}"))?;
    let text = json
        .get(0)
        .and_then(|l| l.get("address"))
        .and_then(|a| a.as_str())
        .with_context(|| format!("no MAC address for {iface} in {ns}: {out}"))?;
    let mut mac = [0u8; 6];
    let parts: Vec<&str> = text.split(':').collect();
    ensure!(parts.len() == 6, "odd MAC address {text}");
    for (byte, part) in mac.iter_mut().zip(parts) {
        *byte = u8::from_str_radix(part, 16).with_context(|| format!("MAC address {text}"))?;
    }
    Ok(mac)
}

/// `aa:bb:...` form.
pub fn mac_text(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The three namespaces of the forwarding benchmark.
#[derive(Debug)]
pub struct ForwardTopo {
    pub prefix: String,
    /// Generator namespace (`g0`).
    pub gen_ns: String,
    /// LB node namespace (`lbc`, `lbb`).
    pub lb_ns: String,
    /// Sink namespace (`s0`, the backends).
    pub sink_ns: String,
    /// MAC of `lbc` (the generated frames' destination).
    pub lb_front_mac: [u8; 6],
    /// MAC of `g0`.
    pub gen_mac: [u8; 6],
    /// Every namespace, in creation order; deleted in reverse order on drop.
    created: Vec<OwnedNetns>,
}

impl ForwardTopo {
    /// Builds the topology under a fresh prefix. On error, whatever was created is deleted.
    pub fn create() -> Result<Self> {
        let prefix = unique_prefix();
        let mut topo = ForwardTopo {
            gen_ns: format!("{prefix}g"),
            lb_ns: format!("{prefix}lb"),
            sink_ns: format!("{prefix}s"),
            prefix,
            lb_front_mac: [0; 6],
            gen_mac: [0; 6],
            created: Vec::new(),
        };
        topo.build()
            .with_context(|| format!("building forwarding topology {}", topo.prefix))?;
        Ok(topo)
    }

    fn add_netns(&mut self, name: &str) -> Result<()> {
        self.created.push(OwnedNetns::create(name)?);
        // No IPv6: router solicitations and the like would only add noise to the counters.
        sysctl_in(
            name,
            &[
                ("net.ipv6.conf.all.disable_ipv6", "1"),
                ("net.ipv6.conf.default.disable_ipv6", "1"),
            ],
        )?;
        Ok(())
    }

    fn build(&mut self) -> Result<()> {
        let (g, lb, s) = (
            self.gen_ns.clone(),
            self.lb_ns.clone(),
            self.sink_ns.clone(),
        );
        for ns in [&g, &lb, &s] {
            self.add_netns(ns)?;
        }
        ip_in(
            &lb,
            &[
                "link",
                "add",
                LB_FRONT_IFACE,
                "type",
                "veth",
                "peer",
                "name",
                GEN_IFACE,
                "netns",
                &g,
            ],
        )?;
        ip_in(
            &lb,
            &[
                "link",
                "add",
                LB_BACK_IFACE,
                "type",
                "veth",
                "peer",
                "name",
                SINK_IFACE,
                "netns",
                &s,
            ],
        )?;
        // Full checksums on transmit (XDP must not see partial ones) and GRO on every end.
        for (ns, dev) in [
            (&g, GEN_IFACE),
            (&lb, LB_FRONT_IFACE),
            (&lb, LB_BACK_IFACE),
            (&s, SINK_IFACE),
        ] {
            exec_in(ns, "ethtool", &["-K", dev, "tx", "off", "gro", "on"])
                .with_context(|| format!("ethtool on {ns}/{dev}"))?;
        }
        ip_in(
            &g,
            &["addr", "add", &format!("{GEN_IP}/24"), "dev", GEN_IFACE],
        )?;
        ip_in(&g, &["link", "set", GEN_IFACE, "up"])?;
        ip_in(
            &lb,
            &[
                "addr",
                "add",
                &format!("{LB_FRONT_IP}/24"),
                "dev",
                LB_FRONT_IFACE,
            ],
        )?;
        ip_in(
            &lb,
            &[
                "addr",
                "add",
                &format!("{LB_BACK_IP}/24"),
                "dev",
                LB_BACK_IFACE,
            ],
        )?;
        ip_in(&lb, &["link", "set", LB_FRONT_IFACE, "up"])?;
        ip_in(&lb, &["link", "set", LB_BACK_IFACE, "up"])?;
        sysctl_in(
            &lb,
            &[
                ("net.ipv4.ip_forward", "1"),
                ("net.ipv4.conf.all.rp_filter", "0"),
                ("net.ipv4.conf.default.rp_filter", "0"),
                ("net.ipv4.conf.lbc.rp_filter", "0"),
                ("net.ipv4.conf.lbb.rp_filter", "0"),
            ],
        )?;
        for backend in BACKENDS {
            ip_in(
                &s,
                &["addr", "add", &format!("{backend}/24"), "dev", SINK_IFACE],
            )?;
        }
        ip_in(&s, &["link", "set", SINK_IFACE, "up"])?;
        ip_in(
            &s,
            &["route", "add", "default", "via", &LB_BACK_IP.to_string()],
        )?;

        // Static neighbours: the LB node reaches the backends, and the generator's flows, and
        // the sink reaches the LB node, without ARP.
        let sink_mac = mac_text(mac_of(&s, SINK_IFACE)?);
        let lbb_mac = mac_text(mac_of(&lb, LB_BACK_IFACE)?);
        self.lb_front_mac = mac_of(&lb, LB_FRONT_IFACE)?;
        self.gen_mac = mac_of(&g, GEN_IFACE)?;
        let gen_mac = mac_text(self.gen_mac);
        for backend in BACKENDS {
            ip_in(
                &lb,
                &[
                    "neigh",
                    "replace",
                    &backend.to_string(),
                    "lladdr",
                    &sink_mac,
                    "dev",
                    LB_BACK_IFACE,
                    "nud",
                    "permanent",
                ],
            )?;
        }
        for addr in [GEN_IP, FLOW_SRC_IP, Ipv4Addr::new(198, 18, 0, 101)] {
            ip_in(
                &lb,
                &[
                    "neigh",
                    "replace",
                    &addr.to_string(),
                    "lladdr",
                    &gen_mac,
                    "dev",
                    LB_FRONT_IFACE,
                    "nud",
                    "permanent",
                ],
            )?;
        }
        ip_in(
            &s,
            &[
                "neigh",
                "replace",
                &LB_BACK_IP.to_string(),
                "lladdr",
                &lbb_mac,
                "dev",
                SINK_IFACE,
                "nud",
                "permanent",
            ],
        )?;
        Ok(())
    }
}

impl Drop for ForwardTopo {
    fn drop(&mut self) {
        while let Some(ns) = self.created.pop() {
            drop(ns);
        }
    }
}
