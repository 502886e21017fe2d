//! The namespace topology: client, load balancer node, an L2 switch and backends.
//!
//! ```text
//!  client ns "<p>c"               LB ns "<p>lb"                 switch ns "<p>sw" (br0)    backend ns "<p>bN"
//!  eth0 198.18.0.1/24 <--veth--> lbc 198.18.0.2/24
//!    198.18.100.0/24,            lbb 198.18.1.1/24 <--veth--> p0          pN <--veth--> eth0 198.18.1.1N/24
//!    198.18.1.0/24 via .0.2                                                             default via 198.18.1.1
//! ```
//!
//! The LB node routes between the client and backend subnets (ip_forward=1) and is where the
//! daemon attaches its XDP program (to `lbc` and `lbb`). Interfaces are created directly inside
//! their namespaces (`ip -n NS link add ... peer ... netns OTHER`): nothing is ever created in,
//! attached to, or routed through the root namespace.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    process::Command,
    sync::atomic::{AtomicUsize, Ordering},
};

use anyhow::{Context, Result, ensure};

use crate::{cmd, netns::OwnedNetns};

/// The client's address.
pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// The LB node's address on the client side (`lbc`); the client's route to the VIPs.
pub const LB_CLIENT_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
/// The LB node's address on the backend side (`lbb`); the backends' default route, and the
/// address full-NAT uses as source towards them.
pub const LB_BACKEND_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);
/// The virtual IP the tests put services on.
pub const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 1);
/// The subnet of VIPs the client routes through the LB node.
pub const VIP_SUBNET: &str = "198.18.100.0/24";
/// The backends' subnet (behind `lbb`).
pub const BACKEND_SUBNET: &str = "198.18.1.0/24";
/// Interfaces the daemon attaches to, in the LB namespace.
pub const LB_IFACES: [&str; 2] = ["lbc", "lbb"];
/// Most backends a topology can have (addresses 198.18.1.11 ..= 198.18.1.19).
pub const MAX_BACKENDS: usize = 9;

/// The client's IPv6 address (dual-stack topologies).
pub const CLIENT_IP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
/// The LB node's IPv6 address on the client side.
pub const LB_CLIENT_IP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 2);
/// The LB node's IPv6 address on the backend side: the backends' default route and full-NAT's
/// source towards them.
pub const LB_BACKEND_IP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 1);
/// The IPv6 virtual IP.
pub const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x64, 0, 0, 0, 0, 1);
/// The IPv6 VIPs' subnet, routed by the client through the LB node.
pub const VIP6_SUBNET: &str = "2001:db8:64::/64";
/// The backends' IPv6 subnet.
pub const BACKEND6_SUBNET: &str = "2001:db8:1::/64";

/// IPv6 address of backend `index` (1-based): 2001:db8:1::1N (hex).
pub fn backend_ip6(index: usize) -> Ipv6Addr {
    assert!((1..=MAX_BACKENDS).contains(&index), "backend index {index}");
    Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 0x10 + index as u16)
}

/// Address of backend `index` (1-based): 198.18.1.1N.
pub fn backend_ip(index: usize) -> Ipv4Addr {
    assert!((1..=MAX_BACKENDS).contains(&index), "backend index {index}");
    Ipv4Addr::new(198, 18, 1, 10 + index as u8)
}

/// What to build.
#[derive(Clone, Debug)]
pub struct TopologyOptions {
    /// Number of backend namespaces (b1..bN).
    pub backends: usize,
    /// Direct server return: backends also hold the VIP on `lo` and answer clients directly.
    pub dsr: bool,
    /// Dual stack: every node also gets its IPv6 address (2001:db8::/32, see [`CLIENT_IP6`]),
    /// routes and, in DSR, [`VIP6`]. Off by default: IPv6 stays disabled in the namespaces, so
    /// no router or neighbour solicitation moves the counters the IPv4 tests compare.
    pub ipv6: bool,
}

impl Default for TopologyOptions {
    fn default() -> Self {
        TopologyOptions {
            backends: 3,
            dsr: false,
            ipv6: false,
        }
    }
}

/// One backend node.
#[derive(Clone, Debug)]
pub struct BackendNode {
    /// `b1`, `b2`, ...: what its servers answer with.
    pub name: String,
    /// Its namespace.
    pub ns: String,
    /// Its address on `eth0`.
    pub ip: Ipv4Addr,
    /// Its IPv6 address on `eth0` (configured in dual-stack topologies only).
    pub ip6: Ipv6Addr,
}

/// A built topology. Dropping it deletes every namespace it created (and with them their
/// interfaces, routes and any programs attached to those interfaces).
#[derive(Debug)]
pub struct Topology {
    /// Unique prefix of every namespace name, also used for the daemon's pin root.
    pub prefix: String,
    pub client: String,
    pub lb: String,
    pub switch: String,
    pub backends: Vec<BackendNode>,
    pub dsr: bool,
    pub ipv6: bool,
    /// Every namespace, in creation order; deleted in reverse order on drop.
    created: Vec<OwnedNetns>,
}

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A prefix unique to this process and call: `dp<pid % 10000><counter>`, short enough that
/// `<prefix>lb` and friends stay valid interface-length names.
pub fn unique_prefix() -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("dp{}{}", std::process::id() % 10000, n)
}

/// `ip -n NS args...`
pub fn ip_in(ns: &str, args: &[&str]) -> Result<String> {
    let mut full = vec!["-n", ns];
    full.extend_from_slice(args);
    cmd::run_args("ip", &full)
}

/// Runs a program inside namespace `ns` (`ip netns exec NS program args...`).
pub fn exec_in(ns: &str, program: &str, args: &[&str]) -> Result<String> {
    cmd::run(
        Command::new("ip")
            .args(["netns", "exec", ns, program])
            .args(args),
    )
}

/// Sets sysctls inside namespace `ns`.
pub fn sysctl_in(ns: &str, settings: &[(&str, &str)]) -> Result<()> {
    let assignments: Vec<String> = settings.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let mut args = vec!["-q", "-w"];
    args.extend(assignments.iter().map(String::as_str));
    exec_in(ns, "sysctl", &args).map(|_| ())
}

impl Topology {
    /// Builds the topology. On error, whatever was already created is deleted again.
    pub fn create(opts: &TopologyOptions) -> Result<Topology> {
        ensure!(
            (1..=MAX_BACKENDS).contains(&opts.backends),
            "between 1 and {MAX_BACKENDS} backends"
        );
        let prefix = unique_prefix();
        let mut topo = Topology {
            client: format!("{prefix}c"),
            lb: format!("{prefix}lb"),
            switch: format!("{prefix}sw"),
            backends: (1..=opts.backends)
                .map(|i| BackendNode {
                    name: format!("b{i}"),
                    ns: format!("{prefix}b{i}"),
                    ip: backend_ip(i),
                    ip6: backend_ip6(i),
                })
                .collect(),
            prefix,
            dsr: opts.dsr,
            ipv6: opts.ipv6,
            created: Vec::new(),
        };
        topo.build()
            .with_context(|| format!("building topology {}", topo.prefix))?;
        Ok(topo)
    }

    fn add_netns(&mut self, name: &str) -> Result<()> {
        self.created.push(OwnedNetns::create(name)?);
        Ok(())
    }

    fn build(&mut self) -> Result<()> {
        let (client, lb, sw) = (self.client.clone(), self.lb.clone(), self.switch.clone());
        let backends = self.backends.clone();
        for ns in [&client, &lb, &sw] {
            self.add_netns(ns)?;
        }
        for b in &backends {
            self.add_netns(&b.ns)?;
        }

        // Client <-> LB.
        ip_in(
            &lb,
            &[
                "link", "add", "lbc", "type", "veth", "peer", "name", "eth0", "netns", &client,
            ],
        )?;
        // LB <-> switch, and the bridge.
        ip_in(
            &lb,
            &[
                "link", "add", "lbb", "type", "veth", "peer", "name", "p0", "netns", &sw,
            ],
        )?;
        ip_in(&sw, &["link", "add", "br0", "type", "bridge"])?;
        ip_in(&sw, &["link", "set", "p0", "master", "br0"])?;
        // Switch <-> backends.
        for (i, b) in backends.iter().enumerate() {
            let port = format!("p{}", i + 1);
            ip_in(
                &sw,
                &[
                    "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &b.ns,
                ],
            )?;
            ip_in(&sw, &["link", "set", &port, "master", "br0"])?;
        }

        // Offloads as on a real node: every interface keeps the kernel's defaults (GRO, GSO,
        // TSO, scatter-gather, checksum offload), so tc programs and the stack see the
        // non-linear and GSO skbs real NICs produce. Two exceptions:
        // - the senders into the LB's XDP program (client `eth0`, switch `p0`) compute full
        //   checksums and segment in software (`tx off` also turns off scatter-gather and
        //   TSO): an XDP program on a veth would otherwise see partial checksums, which a real
        //   NIC never hands it, and its rewrites would leave them wrong (connections time out);
        // - GRO is on at the ends that receive XDP_REDIRECTs (the peers of `lbc` and `lbb`),
        //   since a veth delivers redirected frames only when its receiving end runs XDP or
        //   GRO (NAPI).
        for (ns, dev) in [(&client, "eth0"), (&sw, "p0")] {
            exec_in(ns, "ethtool", &["-K", dev, "tx", "off", "gro", "on"])
                .with_context(|| format!("ethtool on {ns}/{dev}"))?;
        }

        // Addresses, links up, routes.
        ip_in(&client, &["addr", "add", "198.18.0.1/24", "dev", "eth0"])?;
        ip_in(&client, &["link", "set", "eth0", "up"])?;
        ip_in(
            &client,
            &["route", "add", VIP_SUBNET, "via", &LB_CLIENT_IP.to_string()],
        )?;
        // Also the backends' subnet, so the plumbing can be checked without the load
        // balancer (client -> LB node's kernel -> backend).
        ip_in(
            &client,
            &[
                "route",
                "add",
                BACKEND_SUBNET,
                "via",
                &LB_CLIENT_IP.to_string(),
            ],
        )?;

        ip_in(&lb, &["addr", "add", "198.18.0.2/24", "dev", "lbc"])?;
        ip_in(&lb, &["addr", "add", "198.18.1.1/24", "dev", "lbb"])?;
        ip_in(&lb, &["link", "set", "lbc", "up"])?;
        ip_in(&lb, &["link", "set", "lbb", "up"])?;
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

        ip_in(&sw, &["link", "set", "br0", "up"])?;
        ip_in(&sw, &["link", "set", "p0", "up"])?;
        for (i, b) in backends.iter().enumerate() {
            ip_in(&sw, &["link", "set", &format!("p{}", i + 1), "up"])?;
            ip_in(
                &b.ns,
                &["addr", "add", &format!("{}/24", b.ip), "dev", "eth0"],
            )?;
            ip_in(&b.ns, &["link", "set", "eth0", "up"])?;
            ip_in(
                &b.ns,
                &["route", "add", "default", "via", &LB_BACKEND_IP.to_string()],
            )?;
            if self.dsr {
                // Direct server return: the backend owns the VIP (on lo, so it never answers
                // ARP for it) and replies from it straight to the client. The replies go to
                // the default gateway 198.18.1.1, i.e. the LB node, whose kernel forwards them
                // to the client: in this topology the LB node is also the router, and its XDP
                // program passes these packets untranslated (they are neither for a VIP nor a
                // full-NAT reply).
                ip_in(&b.ns, &["addr", "add", &format!("{VIP}/32"), "dev", "lo"])?;
                sysctl_in(
                    &b.ns,
                    &[
                        ("net.ipv4.conf.all.arp_ignore", "1"),
                        ("net.ipv4.conf.all.arp_announce", "2"),
                        ("net.ipv4.conf.all.rp_filter", "0"),
                        ("net.ipv4.conf.default.rp_filter", "0"),
                        ("net.ipv4.conf.eth0.rp_filter", "0"),
                        ("net.ipv4.conf.lo.rp_filter", "0"),
                    ],
                )?;
            }
        }

        if self.ipv6 {
            self.build_ipv6()?;
        }
        self.check_plumbing()
    }

    /// The IPv6 half of a dual-stack topology: the same links, addresses without duplicate
    /// address detection (usable at once), the same routes.
    fn build_ipv6(&self) -> Result<()> {
        let mut namespaces = vec![self.client.as_str(), self.lb.as_str(), self.switch.as_str()];
        namespaces.extend(self.backends.iter().map(|b| b.ns.as_str()));
        for ns in namespaces {
            sysctl_in(
                ns,
                &[
                    ("net.ipv6.conf.all.disable_ipv6", "0"),
                    ("net.ipv6.conf.default.disable_ipv6", "0"),
                    ("net.ipv6.conf.all.accept_dad", "0"),
                    ("net.ipv6.conf.default.accept_dad", "0"),
                ],
            )?;
        }
        let addr = |ns: &str, a: String, dev: &str| {
            ip_in(ns, &["-6", "addr", "add", &a, "dev", dev, "nodad"])
        };
        addr(&self.client, format!("{CLIENT_IP6}/64"), "eth0")?;
        for subnet in [VIP6_SUBNET, BACKEND6_SUBNET] {
            ip_in(
                &self.client,
                &[
                    "-6",
                    "route",
                    "add",
                    subnet,
                    "via",
                    &LB_CLIENT_IP6.to_string(),
                ],
            )?;
        }
        addr(&self.lb, format!("{LB_CLIENT_IP6}/64"), "lbc")?;
        addr(&self.lb, format!("{LB_BACKEND_IP6}/64"), "lbb")?;
        sysctl_in(&self.lb, &[("net.ipv6.conf.all.forwarding", "1")])?;
        for b in &self.backends {
            addr(&b.ns, format!("{}/64", b.ip6), "eth0")?;
            ip_in(
                &b.ns,
                &[
                    "-6",
                    "route",
                    "add",
                    "default",
                    "via",
                    &LB_BACKEND_IP6.to_string(),
                ],
            )?;
            if self.dsr {
                addr(&b.ns, format!("{VIP6}/128"), "lo")?;
            }
        }
        Ok(())
    }

    /// Pings every neighbour of the LB node once, from the LB node. This proves the links are
    /// up and fills the LB node's neighbour table (as on any router that has carried traffic),
    /// so the first packets of a test do not depend on ARP timing.
    fn check_plumbing(&self) -> Result<()> {
        let mut targets: Vec<IpAddr> = vec![CLIENT_IP.into()];
        targets.extend(self.backends.iter().map(|b| IpAddr::from(b.ip)));
        if self.ipv6 {
            targets.push(CLIENT_IP6.into());
            targets.extend(self.backends.iter().map(|b| IpAddr::from(b.ip6)));
        }
        for ip in targets {
            let ip = ip.to_string();
            // Bounded: at most 5 probes, 1 s each.
            exec_in(
                &self.lb,
                "ping",
                &["-c", "1", "-w", "5", "-W", "1", "-q", &ip],
            )
            .with_context(|| format!("LB node {} cannot reach {ip}", self.lb))?;
        }
        Ok(())
    }

    /// Every namespace's name, for diagnostics.
    pub fn namespaces(&self) -> Vec<&str> {
        self.created.iter().map(OwnedNetns::name).collect()
    }

    /// The backend node named `name` (`b1`, ...).
    pub fn backend(&self, name: &str) -> &BackendNode {
        self.backends
            .iter()
            .find(|b| b.name == name)
            .unwrap_or_else(|| panic!("no backend {name} in topology {}", self.prefix))
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        // The reverse of creation order: backends and switch before the LB node and client.
        while let Some(ns) = self.created.pop() {
            drop(ns);
        }
    }
}
