//! The state the programs are fuzzed in, built in a private network namespace the way the
//! fixtures build theirs (`datapath/tests/xdp_fixtures.rs`, `tc_fixtures.rs`): the real
//! [`Dataplane`] and [`PolicyPlane`], programmed through their real APIs.
//!
//! ```text
//!  load balancer (xdp_lb on front and back)            policy (TCX on ep0, ep1)
//!  front 198.18.0.2/24   client 198.18.0.1, 198.18.0.3     ep0, ep1 (no addresses)
//!                        backend 198.18.0.50 (XDP_TX)
//!  back  198.18.1.1/24   backends 198.18.1.11-13, 198.18.1.14 without a neighbour entry
//!                        (MTU 1400: longer packets need fragmentation)
//!  side  198.18.2.1/24   backend 198.18.2.11 behind an interface xdp_lb does not manage
//!  no route              backend 198.19.250.1
//! ```
//!
//! Services on VIP 198.18.100.1: TCP 80 full-NAT and 81 DSR, UDP 53 full-NAT and 54 DSR over
//! the three backends with neighbours; TCP 82 without backends; TCP 83 full-NAT over the
//! backends that end in `pass_fib_no_neigh`, `fwd_tx` and `pass_no_tx_port`; UDP 84 full-NAT
//! to the unroutable backend (`drop_fib_failed`); TCP 85 DSR with one backend draining. The
//! full-NAT port range is 1024 ports, and the flow tables hold 4096 flows, so port exhaustion,
//! reclaimed ports and LRU evictions happen during a run.
//!
//! The policy (two variants; the run flips between them, so tracked flows are re-checked and
//! some cut) has allow, deny and log rules in both directions on `ep0`, and `ep1` is a second
//! endpoint with its own defaults.

use std::{
    net::IpAddr,
    os::fd::{AsFd as _, OwnedFd},
    path::PathBuf,
};

use anyhow::{Context as _, Result, anyhow, ensure};
use datapath::{
    dataplane::{Dataplane, DataplaneConfig, XdpAttachMode, cleanup},
    policy::{PolicyConfig, PolicyPlane, PolicySpec},
};
use datapath_api::{BackendSpec, BackendState, ForwardingMode, Protocol, ServiceKey, ServiceSpec};
use netns_tests::netns::EnteredNetns;

use super::{check::CheckEnv, mutate::Dictionary};

pub const CLIENT: [u8; 4] = [198, 18, 0, 1];
pub const CLIENT2: [u8; 4] = [198, 18, 0, 3];
pub const LB_FRONT: [u8; 4] = [198, 18, 0, 2];
pub const LB_BACK: [u8; 4] = [198, 18, 1, 1];
pub const LB_SIDE: [u8; 4] = [198, 18, 2, 1];
pub const VIP: [u8; 4] = [198, 18, 100, 1];
pub const BACKENDS: [[u8; 4]; 3] = [[198, 18, 1, 11], [198, 18, 1, 12], [198, 18, 1, 13]];
pub const BACKEND_NO_NEIGH: [u8; 4] = [198, 18, 1, 14];
pub const BACKEND_TX: [u8; 4] = [198, 18, 0, 50];
pub const BACKEND_SIDE: [u8; 4] = [198, 18, 2, 11];
pub const BACKEND_NO_ROUTE: [u8; 4] = [198, 19, 250, 1];
pub const ROUTER_BACK: [u8; 4] = [198, 18, 1, 254];
pub const BACKEND_PORT: u16 = 8080;

pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
pub const CLIENT2_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x03];
pub const FRONT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
pub const BACK_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0x01];
pub const SIDE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x02, 0x01];
pub const ROUTER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0xfe];

/// Endpoint and remote addresses of the policy.
pub const ENDPOINT: [u8; 4] = [198, 18, 0, 10];
pub const ENDPOINT1: [u8; 4] = [198, 18, 0, 11];
pub const OUTSIDER: [u8; 4] = [198, 19, 7, 7];
pub const LAB: [u8; 4] = [198, 19, 200, 5];
pub const ROUTER_EP: [u8; 4] = [198, 18, 0, 254];
pub const EP_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0a];

/// MAC of a neighbour the node has a permanent entry for.
pub fn neighbour_mac(addr: [u8; 4]) -> [u8; 6] {
    [0x02, 0, 0, 0, addr[2], addr[3]]
}

/// Ports of the services, for the generators.
pub const VIP_TCP_PORTS: [u16; 5] = [80, 81, 82, 83, 85];
pub const VIP_UDP_PORTS: [u16; 3] = [53, 54, 84];

const NAT_PORT_MIN: u16 = 30_000;
const NAT_PORT_MAX: u16 = 31_023;

const POLICY_A: &str = r#"
endpoints:
  - interface: "ep1"
    default_ingress: allow
    default_egress: allow
    ingress:
      - name: ep1-no-ssh
        protocol: tcp
        ports: 22
        action: deny
  - interface: "ep*"
    default_ingress: deny
    default_egress: deny
    ingress:
      - name: web
        cidr: 198.18.0.0/16
        protocol: tcp
        ports: 8080
        action: allow
      - name: no-telnet
        protocol: tcp
        ports: 23
        action: deny
      - name: dns
        protocol: udp
        ports: 53
        action: log
      - name: ping
        cidr: 198.18.0.0/24
        protocol: icmp
        action: allow
      - name: lab
        cidr: 198.19.128.0/17
        protocol: udp
        action: log
    egress:
      - name: out-web
        protocol: tcp
        ports: 80-443
        action: allow
      - name: out-dns
        protocol: udp
        ports: 53
        action: allow
      - name: no-smtp
        protocol: tcp
        ports: 25
        action: deny
"#;

/// The flipped policy: the web rule now denies (tracked web flows are cut), telnet and the
/// ingress default allow, egress narrowed to 443.
const POLICY_B: &str = r#"
endpoints:
  - interface: "ep1"
    default_ingress: deny
    default_egress: allow
  - interface: "ep*"
    default_ingress: allow
    default_egress: deny
    ingress:
      - name: web
        cidr: 198.18.0.0/16
        protocol: tcp
        ports: 8080
        action: deny
      - name: dns
        protocol: udp
        ports: 53
        action: allow
      - name: lab
        cidr: 198.19.0.0/16
        action: log
    egress:
      - name: out-web
        protocol: tcp
        ports: 443
        action: allow
      - name: out-dns
        protocol: udp
        ports: 53
        action: log
"#;

fn mac_str(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn ip_str(addr: [u8; 4]) -> String {
    std::net::Ipv4Addr::from(addr).to_string()
}

fn if_index(name: &str) -> Result<u32> {
    let c = std::ffi::CString::new(name)?;
    // SAFETY: a valid C string.
    let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
    ensure!(index != 0, "no interface {name}");
    Ok(index)
}

/// Interface indexes the contexts name.
#[derive(Clone, Copy, Debug, Default)]
pub struct Ifaces {
    pub lo: u32,
    pub front: u32,
    pub back: u32,
    pub side: u32,
    pub ep0: u32,
    pub ep1: u32,
}

/// Everything a run needs, alive until dropped (then the namespace and the pins go away).
pub struct Setup {
    pub dataplane: Dataplane,
    pub policy: PolicyPlane,
    pub policies: [PolicySpec; 2],
    /// The services as programmed (the run changes the first one's backends now and then).
    services: Vec<ServiceSpec>,
    pub ifaces: Ifaces,
    pub env: CheckEnv,
    pub dict: Dictionary,
    /// Program descriptors and the reason arrays, for the workers.
    pub xdp_prog: OwnedFd,
    pub tc_ingress_prog: OwnedFd,
    pub tc_egress_prog: OwnedFd,
    pub lb_reasons: OwnedFd,
    pub tc_reasons: OwnedFd,
    events: Option<aya::maps::RingBuf<aya::maps::MapData>>,
    lb_pins: PathBuf,
    tc_pins: PathBuf,
    // Dropped last: leaves and deletes the namespace.
    netns: EnteredNetns,
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = cleanup(&self.lb_pins);
        let _ = cleanup(&self.tc_pins);
    }
}

impl Setup {
    pub fn netns_name(&self) -> &str {
        self.netns.name()
    }

    /// Builds the namespace, starts both planes in it and programs them. The calling thread
    /// stays in the namespace (threads it spawns later start there too).
    pub fn build() -> Result<Setup> {
        let netns = EnteredNetns::create("dpfz")?;
        let ns = netns.name().to_string();
        let sysctl = |key: &str| -> Result<()> {
            netns_tests::cmd::run_args("ip", &["netns", "exec", &ns, "sysctl", "-qw", key])
                .map(drop)
        };
        // Nothing but the test runs may move the counters: no IPv6 chatter on the links.
        sysctl("net.ipv6.conf.all.disable_ipv6=1")?;
        sysctl("net.ipv6.conf.default.disable_ipv6=1")?;
        let ip = |args: &[&str]| netns.ip(args).map(drop);
        for (dev, peer, mac) in [
            ("front", "front-peer", FRONT_MAC),
            ("back", "back-peer", BACK_MAC),
            ("side", "side-peer", SIDE_MAC),
            ("ep0", "ep0-peer", EP_MAC),
            ("ep1", "ep1-peer", [0x02, 0, 0, 0, 0, 0x0b]),
        ] {
            ip(&["link", "add", dev, "type", "veth", "peer", "name", peer])?;
            ip(&["link", "set", dev, "address", &mac_str(mac)])?;
            ip(&["link", "set", dev, "up"])?;
            ip(&["link", "set", peer, "up"])?;
        }
        ip(&["link", "set", "back", "mtu", "1400"])?;
        ip(&["addr", "add", "198.18.0.2/24", "dev", "front"])?;
        ip(&["addr", "add", "198.18.1.1/24", "dev", "back"])?;
        ip(&["addr", "add", "198.18.2.1/24", "dev", "side"])?;
        let neighbours = [
            (CLIENT, "front"),
            (CLIENT2, "front"),
            (BACKEND_TX, "front"),
            (BACKENDS[0], "back"),
            (BACKENDS[1], "back"),
            (BACKENDS[2], "back"),
            (ROUTER_BACK, "back"),
            (BACKEND_SIDE, "side"),
        ];
        for (addr, dev) in neighbours {
            ip(&[
                "neigh",
                "replace",
                &ip_str(addr),
                "lladdr",
                &mac_str(neighbour_mac(addr)),
                "dev",
                dev,
                "nud",
                "permanent",
            ])?;
        }
        // bpf_fib_lookup refuses to route when forwarding is off.
        sysctl("net.ipv4.ip_forward=1")?;

        let ifaces = Ifaces {
            lo: if_index("lo")?,
            front: if_index("front")?,
            back: if_index("back")?,
            side: if_index("side")?,
            ep0: if_index("ep0")?,
            ep1: if_index("ep1")?,
        };
        let lb_pins = PathBuf::from(format!("/sys/fs/bpf/{ns}-lb"));
        let tc_pins = PathBuf::from(format!("/sys/fs/bpf/{ns}-tc"));
        let config = DataplaneConfig {
            pin_root: lb_pins.clone(),
            interfaces: vec!["front".into(), "back".into()],
            xdp_mode: XdpAttachMode::Auto,
            maglev_size: 4093,
            max_services: 8,
            max_backends: 32,
            max_flows: 4096,
            nat_port_min: NAT_PORT_MIN,
            nat_port_max: NAT_PORT_MAX,
            fib_cache_ns: 1_000_000_000,
            // The model this fuzzer checks against tracks every new flow; the SYN-flood mode
            // has fixtures of its own (datapath/tests/xdp_fixtures.rs).
            syn_flood_rate: 0,
        };
        std::fs::create_dir_all(&lb_pins).context("create the pin root")?;
        let start = Dataplane::start(&config).map_err(|e| anyhow!("start the dataplane: {e}"));
        let mut dataplane = match start {
            Ok(d) => d,
            Err(e) => {
                let _ = cleanup(&lb_pins);
                return Err(e);
            }
        };
        let policy_start = PolicyPlane::start(&PolicyConfig {
            pin_root: tc_pins.clone(),
            max_ct_flows: 8192,
            // Slow enough that the bucket runs dry (event_rate_limited) under the fuzzer's
            // new flows, fast enough that the ring buffer fills up between two reads
            // (event_lost).
            event_rate: 5_000,
        })
        .map_err(|e| anyhow!("start the policy plane: {e}"));
        let policy = match policy_start {
            Ok(p) => p,
            Err(e) => {
                let _ = cleanup(&lb_pins);
                let _ = cleanup(&tc_pins);
                return Err(e);
            }
        };
        // From here on, dropping `setup` cleans up.
        let xdp_prog = dataplane
            .program_mut()
            .map_err(|e| anyhow!("{e}"))?
            .fd()?
            .as_fd()
            .try_clone_to_owned()?;
        let tc_ingress_prog = policy
            .program(bpf_common::ct::POLICY_DIR_INGRESS)
            .map_err(|e| anyhow!("{e}"))?
            .fd()?
            .as_fd()
            .try_clone_to_owned()?;
        let tc_egress_prog = policy
            .program(bpf_common::ct::POLICY_DIR_EGRESS)
            .map_err(|e| anyhow!("{e}"))?
            .fd()?
            .as_fd()
            .try_clone_to_owned()?;
        let open_pin = |path: PathBuf| -> Result<OwnedFd> {
            let map = aya::maps::MapData::from_pin(&path)
                .with_context(|| format!("open {}", path.display()))?;
            Ok(map.fd().as_fd().try_clone_to_owned()?)
        };
        let lb_reasons = open_pin(lb_pins.join(bpf_common::map_names::REASONS))?;
        let tc_reasons = open_pin(tc_pins.join(bpf_common::policy::map_names::REASONS))?;
        let policies = [
            PolicySpec::parse(POLICY_A).map_err(|e| anyhow!("policy A: {e}"))?,
            PolicySpec::parse(POLICY_B).map_err(|e| anyhow!("policy B: {e}"))?,
        ];
        let mut setup = Setup {
            dataplane,
            policy,
            policies,
            services: Vec::new(),
            ifaces,
            env: CheckEnv::default(),
            dict: Dictionary::default(),
            xdp_prog,
            tc_ingress_prog,
            tc_egress_prog,
            lb_reasons,
            tc_reasons,
            events: None,
            lb_pins,
            tc_pins,
            netns,
        };
        setup.program_services()?;
        setup
            .policy
            .attach("ep0")
            .map_err(|e| anyhow!("attach ep0: {e}"))?;
        setup
            .policy
            .attach("ep1")
            .map_err(|e| anyhow!("attach ep1: {e}"))?;
        setup.apply_policy(0)?;
        setup.events = setup.policy.take_events();
        setup.env = CheckEnv {
            own_macs: vec![FRONT_MAC, BACK_MAC, SIDE_MAC],
            neighbour_macs: neighbours.iter().map(|(a, _)| neighbour_mac(*a)).collect(),
        };
        let mut addrs = vec![
            CLIENT,
            CLIENT2,
            LB_FRONT,
            LB_BACK,
            LB_SIDE,
            VIP,
            BACKEND_NO_NEIGH,
            BACKEND_TX,
            BACKEND_SIDE,
            BACKEND_NO_ROUTE,
            ROUTER_BACK,
            ENDPOINT,
            ENDPOINT1,
            OUTSIDER,
            LAB,
            [198, 18, 7, 7],
            [0, 0, 0, 0],
            [255, 255, 255, 255],
        ];
        addrs.extend_from_slice(&BACKENDS);
        let mut ports: Vec<u16> = VIP_TCP_PORTS.to_vec();
        ports.extend_from_slice(&VIP_UDP_PORTS);
        ports.extend_from_slice(&[
            BACKEND_PORT,
            22,
            23,
            25,
            443,
            8443,
            40000,
            NAT_PORT_MIN,
            NAT_PORT_MAX,
        ]);
        setup.dict = Dictionary { addrs, ports };
        Ok(setup)
    }

    fn program_services(&mut self) -> Result<()> {
        let backend = |addr: [u8; 4], id: u32, state: BackendState| BackendSpec {
            addr: IpAddr::V4(addr.into()),
            port: BACKEND_PORT,
            weight: 1,
            state,
            id,
            generation: 1,
        };
        let service = |id: u32,
                       port: u16,
                       proto: Protocol,
                       mode: ForwardingMode,
                       snat: Option<[u8; 4]>,
                       backends: &[([u8; 4], BackendState)]| ServiceSpec {
            key: ServiceKey {
                vip: IpAddr::V4(VIP.into()),
                port,
                proto,
            },
            source: Default::default(),
            owner: None,
            source_ranges: Vec::new(),
            xdp_only: false,
            mode,
            snat_addr: snat.map(|a| IpAddr::V4(a.into())),
            id,
            backends: backends
                .iter()
                .zip(0u32..)
                .map(|((addr, state), i)| backend(*addr, id * 4 + i, *state))
                .collect(),
        };
        let active = BackendState::Active;
        let main: Vec<([u8; 4], BackendState)> = BACKENDS.iter().map(|b| (*b, active)).collect();
        let specs = [
            service(0, 80, Protocol::Tcp, ForwardingMode::FullNat, None, &main),
            service(1, 81, Protocol::Tcp, ForwardingMode::Dsr, None, &main),
            service(2, 53, Protocol::Udp, ForwardingMode::FullNat, None, &main),
            service(3, 54, Protocol::Udp, ForwardingMode::Dsr, None, &main),
            service(4, 82, Protocol::Tcp, ForwardingMode::FullNat, None, &[]),
            service(
                5,
                83,
                Protocol::Tcp,
                ForwardingMode::FullNat,
                None,
                &[
                    (BACKEND_NO_NEIGH, active),
                    (BACKEND_TX, active),
                    (BACKEND_SIDE, active),
                ],
            ),
            service(
                6,
                84,
                Protocol::Udp,
                ForwardingMode::FullNat,
                Some(LB_BACK),
                &[(BACKEND_NO_ROUTE, active)],
            ),
            service(
                7,
                85,
                Protocol::Tcp,
                ForwardingMode::Dsr,
                None,
                &[(BACKENDS[0], active), (BACKENDS[1], BackendState::Draining)],
            ),
        ];
        for spec in &specs {
            self.dataplane
                .apply_service(spec)
                .map_err(|e| anyhow!("apply service {}: {e}", spec.key))?;
        }
        self.services = specs.to_vec();
        Ok(())
    }

    /// Changes the backends of TCP 80 (full-NAT): odd `n` removes the third backend (its flows
    /// are rescheduled), even `n` brings it back with a new generation.
    pub fn flip_service(&mut self, n: usize) -> Result<()> {
        let mut spec = self.services[0].clone();
        if n % 2 == 1 {
            spec.backends.pop();
        } else if let Some(last) = spec.backends.last_mut() {
            last.generation = 1 + (n / 2) as u32;
        }
        self.dataplane
            .apply_service(&spec)
            .map_err(|e| anyhow!("change the backends of {}: {e}", spec.key))
    }

    /// Makes policy variant `which` (0 or 1) live.
    pub fn apply_policy(&mut self, which: usize) -> Result<()> {
        let spec = self.policies[which % 2].clone();
        self.policy
            .apply(&spec)
            .map_err(|e| anyhow!("apply policy {which}: {e}"))?;
        Ok(())
    }

    /// Reads and discards the flow events the programs queued (so the ring buffer keeps both
    /// its full and its accepting paths busy). Bounded by `max` events.
    pub fn drain_events(&mut self, max: usize) -> usize {
        let Some(ring) = self.events.as_mut() else {
            return 0;
        };
        let mut n = 0;
        while n < max && ring.next().is_some() {
            n += 1;
        }
        n
    }
}
