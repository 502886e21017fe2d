//! Fixture tests of `xdp_lb` through BPF_PROG_TEST_RUN.
//!
//! Each test builds a private network namespace (its own veths, addresses and permanent
//! neighbour entries, so `bpf_fib_lookup` answers deterministically), starts the real
//! [`Dataplane`] in it, programs services through the real `apply_service`, and runs whole
//! frames built with etherparse through the program. The verdict and the complete output frame
//! are compared with an expected frame, also built with etherparse, byte for byte.
//!
//! Needs root (BPF, namespaces). Without it the tests are skipped, unless
//! `DATAPATH_REQUIRE_PRIVILEGED=1`, in which case they fail.

use std::{
    net::{IpAddr, Ipv4Addr},
    path::PathBuf,
    process::Command,
};

use aya::programs::{TestRun, TestRunOptions};
use bpf_common::{
    FlowEntry, NatReverseEntry,
    ct::{CT_F_ONE_WAY, CT_F_SEEN_REPLY, CtKey},
    reason,
};
use conntrack::{Timeouts, canonical_key, ct_timeout, state_name};
use datapath::dataplane::{Dataplane, DataplaneConfig, XdpAttachMode};
use datapath_api::{BackendSpec, BackendState, ForwardingMode, Protocol, ServiceKey, ServiceSpec};
use etherparse::{
    EtherType, Ethernet2Header, Icmpv4Header, Icmpv4Type, IpFragOffset, IpNumber, Ipv4Header,
    TcpHeader, UdpHeader, icmpv4::DestUnreachableHeader,
};
use lb_core::{
    hash::{SEED_MAGLEV, flow_hash},
    maglev::{MaglevBackend, build_table},
};
use netns_tests::netns::EnteredNetns;

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_REDIRECT: u32 = 4;

const MAGLEV_SIZE: u32 = 251;

const CLIENT: [u8; 4] = [198, 18, 0, 1];
const LB_FRONT: [u8; 4] = [198, 18, 0, 2];
const LB_BACK: [u8; 4] = [198, 18, 1, 1];
const VIP: [u8; 4] = [198, 18, 100, 1];
const BACKENDS: [[u8; 4]; 4] = [
    [198, 18, 1, 11],
    [198, 18, 1, 12],
    [198, 18, 1, 13],
    [198, 18, 1, 14],
];

const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const FRONT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
const BACK_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0x01];

fn backend_mac(addr: [u8; 4]) -> [u8; 6] {
    [0x02, 0, 0, 0, 0x01, addr[3]]
}

#[path = "xdp_fixtures/ipv6.rs"]
mod ipv6;

// ---------------------------------------------------------------------------------------------
// Privilege and namespace plumbing.
// ---------------------------------------------------------------------------------------------

/// Returns false (skip) when the test cannot run; panics when it must run (see
/// [`netns_tests::privilege::may_run`]).
fn privileged() -> bool {
    netns_tests::privilege::privileged_as_root("BPF_PROG_TEST_RUN in a network namespace")
}

fn run(args: &[&str]) {
    let output = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("spawn {args:?}: {e}"));
    assert!(
        output.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The fixture's namespace (`netns_tests::netns::EnteredNetns`), with panicking helpers.
struct TestNetns(EnteredNetns);

impl TestNetns {
    fn enter() -> Self {
        Self(EnteredNetns::create("dpfx").unwrap_or_else(|e| panic!("{e:#}")))
    }

    fn name(&self) -> &str {
        self.0.name()
    }

    fn ip(&self, args: &[&str]) {
        self.0.ip(args).unwrap_or_else(|e| panic!("{e:#}"));
    }
}

fn mac_str(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn ip_str(addr: [u8; 4]) -> String {
    Ipv4Addr::from(addr).to_string()
}

/// The load-balancer node of the fixtures: `front` faces the client, `back` the backends. The
/// peers only exist so the interfaces are up; neighbours are permanent entries.
struct Fixture {
    dataplane: Dataplane,
    front_index: u32,
    back_index: u32,
    pin_root: PathBuf,
    // Dropped last: leaves and deletes the namespace.
    _netns: TestNetns,
}

impl Fixture {
    fn new() -> Self {
        Self::new_after(|_| {})
    }

    /// A fixture whose `prepare` runs on the (created) pin root before the dataplane starts.
    fn new_after(prepare: impl FnOnce(&std::path::Path)) -> Self {
        Self::new_with(prepare, 0)
    }

    /// A fixture whose XDP program enters SYN-flood mode above `syn_flood_rate` new flows per
    /// second per CPU (0: never, as every other fixture runs).
    fn new_with(prepare: impl FnOnce(&std::path::Path), syn_flood_rate: u64) -> Self {
        let netns = TestNetns::enter();
        // The program is really attached: IPv6 router solicitations on the new links would
        // move the counters these tests compare exactly. Off before any link exists.
        for key in [
            "net.ipv6.conf.all.disable_ipv6=1",
            "net.ipv6.conf.default.disable_ipv6=1",
        ] {
            run(&["ip", "netns", "exec", netns.name(), "sysctl", "-qw", key]);
        }
        netns.ip(&[
            "link",
            "add",
            "front",
            "type",
            "veth",
            "peer",
            "name",
            "front-peer",
        ]);
        netns.ip(&[
            "link",
            "add",
            "back",
            "type",
            "veth",
            "peer",
            "name",
            "back-peer",
        ]);
        netns.ip(&["link", "set", "front", "address", &mac_str(FRONT_MAC)]);
        netns.ip(&["link", "set", "back", "address", &mac_str(BACK_MAC)]);
        for dev in ["front", "front-peer", "back", "back-peer"] {
            netns.ip(&["link", "set", dev, "up"]);
        }
        netns.ip(&[
            "addr",
            "add",
            &format!("{}/24", ip_str(LB_FRONT)),
            "dev",
            "front",
        ]);
        netns.ip(&[
            "addr",
            "add",
            &format!("{}/24", ip_str(LB_BACK)),
            "dev",
            "back",
        ]);
        netns.ip(&[
            "neigh",
            "replace",
            &ip_str(CLIENT),
            "lladdr",
            &mac_str(CLIENT_MAC),
            "dev",
            "front",
            "nud",
            "permanent",
        ]);
        for backend in BACKENDS {
            netns.ip(&[
                "neigh",
                "replace",
                &ip_str(backend),
                "lladdr",
                &mac_str(backend_mac(backend)),
                "dev",
                "back",
                "nud",
                "permanent",
            ]);
        }
        // bpf_fib_lookup refuses to route when forwarding is off.
        run(&[
            "ip",
            "netns",
            "exec",
            netns.name(),
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
        ]);
        ipv6::configure(&netns);

        let pin_root = PathBuf::from(format!("/sys/fs/bpf/{}", netns.name()));
        std::fs::create_dir_all(&pin_root).expect("create the pin root");
        prepare(&pin_root);
        let config = DataplaneConfig {
            pin_root: pin_root.clone(),
            interfaces: vec!["front".into(), "back".into()],
            xdp_mode: XdpAttachMode::Auto,
            maglev_size: MAGLEV_SIZE,
            max_services: 4,
            max_backends: 16,
            max_flows: 1024,
            nat_port_min: 1024,
            nat_port_max: 65535,
            // An hour: the cached FIB answer never expires during a test, so the test below
            // can tell a cached answer from a fresh lookup without depending on time.
            fib_cache_ns: 3_600_000_000_000,
            syn_flood_rate,
        };
        let dataplane = Dataplane::start(&config).unwrap_or_else(|e| {
            let _ = datapath::dataplane::cleanup(&pin_root);
            panic!("start: {e}")
        });
        let index = |name: &str| {
            let c = std::ffi::CString::new(name).expect("name");
            // SAFETY: valid C string.
            unsafe { libc::if_nametoindex(c.as_ptr()) }
        };
        Self {
            dataplane,
            front_index: index("front"),
            back_index: index("back"),
            pin_root,
            _netns: netns,
        }
    }

    /// Runs one frame arriving on `ingress`; returns the verdict and the output frame.
    fn run(&mut self, frame: &[u8], ingress: u32) -> (u32, Vec<u8>) {
        // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index,
        // egress_ifindex. The kernel wants data = 0 and data_end = the frame's length.
        let mut ctx = [0u32; 6];
        ctx[1] = frame.len() as u32;
        ctx[3] = ingress;
        let ctx_bytes: Vec<u8> = ctx.iter().flat_map(|w| w.to_ne_bytes()).collect();
        let mut out = vec![0u8; frame.len() + 256];
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(frame);
        opts.data_out = Some(&mut out);
        opts.ctx_in = Some(&ctx_bytes);
        let program = self.dataplane.program_mut().expect("program");
        let result = program.test_run(opts).expect("BPF_PROG_TEST_RUN");
        out.truncate(result.data_size_out as usize);
        (result.return_value, out)
    }

    fn reason(&self, name: &str) -> u64 {
        self.dataplane.stats().expect("stats").reasons[name]
    }

    fn apply(&mut self, service: &ServiceSpec) {
        self.dataplane
            .apply_service(service)
            .unwrap_or_else(|e| panic!("apply {}: {e}", service.key));
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = datapath::dataplane::cleanup(&self.pin_root);
    }
}

// ---------------------------------------------------------------------------------------------
// Services and expected backend choice.
// ---------------------------------------------------------------------------------------------

fn service(mode: ForwardingMode, proto: Protocol, port: u16, backends: &[[u8; 4]]) -> ServiceSpec {
    ServiceSpec {
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
        snat_addr: None,
        id: 0,
        backends: backends
            .iter()
            .map(|addr| BackendSpec {
                addr: IpAddr::V4((*addr).into()),
                port: 8080,
                weight: 1,
                state: BackendState::Active,
                id: u32::from(addr[3]) - 10,
                generation: 1,
            })
            .collect(),
    }
}

/// The backend the Maglev table (computed independently here) gives this flow.
fn expected_backend(backends: &[[u8; 4]], client_port: u16, vip_port: u16, proto: u8) -> [u8; 4] {
    let identities: Vec<String> = backends
        .iter()
        .map(|b| format!("{}:8080", Ipv4Addr::from(*b)))
        .collect();
    let members: Vec<MaglevBackend<'_>> = identities
        .iter()
        .map(|id| MaglevBackend {
            key: id.as_bytes(),
            weight: 1,
        })
        .collect();
    let table = build_table(&members, MAGLEV_SIZE).expect("table");
    let addr = |a: [u8; 4]| [u32::from_ne_bytes(a), 0, 0, 0];
    let hash = flow_hash(
        &addr(CLIENT),
        &addr(VIP),
        client_port.to_be(),
        vip_port.to_be(),
        proto,
        SEED_MAGLEV,
    );
    backends[table[(hash % MAGLEV_SIZE) as usize] as usize]
}

// ---------------------------------------------------------------------------------------------
// Frames.
// ---------------------------------------------------------------------------------------------

fn eth(src: [u8; 6], dst: [u8; 6]) -> Ethernet2Header {
    Ethernet2Header {
        source: src,
        destination: dst,
        ether_type: EtherType::IPV4,
    }
}

fn ipv4(src: [u8; 4], dst: [u8; 4], proto: IpNumber, payload_len: usize) -> Ipv4Header {
    let mut ip = Ipv4Header::new(payload_len as u16, 64, proto, src, dst).expect("ipv4");
    ip.identification = 0x1234;
    ip.dont_fragment = true;
    ip.header_checksum = ip.calc_header_checksum();
    ip
}

fn tcp_frame(
    macs: ([u8; 6], [u8; 6]),
    src: ([u8; 4], u16),
    dst: ([u8; 4], u16),
    syn: bool,
    ack: bool,
    payload: &[u8],
) -> Vec<u8> {
    tcp_segment(macs, src, dst, (syn, ack, false), payload)
}

/// A TCP frame with any of SYN, ACK and FIN set: the one builder of the TCP frames here.
fn tcp_segment(
    macs: ([u8; 6], [u8; 6]),
    src: ([u8; 4], u16),
    dst: ([u8; 4], u16),
    (syn, ack, fin): (bool, bool, bool),
    payload: &[u8],
) -> Vec<u8> {
    let mut tcp = TcpHeader::new(src.1, dst.1, 1000, 64240);
    tcp.syn = syn;
    tcp.ack = ack;
    tcp.fin = fin;
    if ack {
        tcp.acknowledgment_number = 5000;
    }
    let ip = ipv4(
        src.0,
        dst.0,
        IpNumber::TCP,
        tcp.header_len() + payload.len(),
    );
    tcp.checksum = tcp.calc_checksum_ipv4(&ip, payload).expect("tcp checksum");
    let mut frame = eth(macs.0, macs.1).to_bytes().to_vec();
    frame.extend_from_slice(&ip.to_bytes());
    frame.extend_from_slice(&tcp.to_bytes());
    frame.extend_from_slice(payload);
    frame
}

fn udp_frame(
    macs: ([u8; 6], [u8; 6]),
    src: ([u8; 4], u16),
    dst: ([u8; 4], u16),
    payload: &[u8],
) -> Vec<u8> {
    let ip = ipv4(src.0, dst.0, IpNumber::UDP, 8 + payload.len());
    let udp = UdpHeader::with_ipv4_checksum(src.1, dst.1, &ip, payload).expect("udp");
    let mut frame = eth(macs.0, macs.1).to_bytes().to_vec();
    frame.extend_from_slice(&ip.to_bytes());
    frame.extend_from_slice(&udp.to_bytes());
    frame.extend_from_slice(payload);
    frame
}

fn assert_frame(what: &str, got: (u32, Vec<u8>), verdict: u32, frame: &[u8]) {
    assert_eq!(got.0, verdict, "{what}: verdict");
    assert_eq!(
        got.1, frame,
        "{what}: output frame differs\n got: {:02x?}\nwant: {:02x?}",
        got.1, frame
    );
}

// ---------------------------------------------------------------------------------------------
// Tests.
// ---------------------------------------------------------------------------------------------

#[test]
fn tcp_syn_to_vip_is_full_natted_to_its_maglev_backend() {
    if !privileged() {
        return;
    }
    let mut fx = Fixture::new();
    let backends = &BACKENDS[..3];
    fx.apply(&service(
        ForwardingMode::FullNat,
        Protocol::Tcp,
        80,
        backends,
    ));

    let syn = tcp_frame(
        (CLIENT_MAC, FRONT_MAC),
        (CLIENT, 40000),
        (VIP, 80),
        true,
        false,
        &[],
    );
    let backend = expected_backend(backends, 40000, 80, 6);
    // DNAT to the backend, SNAT to the back interface's address; the client port is free in the
    // NAT range, so it is kept.
    let want = tcp_frame(
        (BACK_MAC, backend_mac(backend)),
        (LB_BACK, 40000),
        (backend, 8080),
        true,
        false,
        &[],
    );
    let before = fx.reason("new_flow");
    assert_frame("SYN", fx.run(&syn, fx.front_index), XDP_REDIRECT, &want);
    assert_eq!(fx.reason("new_flow"), before + 1);
    assert!(fx.reason("fwd_redirect") >= 1);
}

#[test]
fn dsr_rewrites_only_the_mac_addresses() {
    if !privileged() {
        return;
    }
    let mut fx = Fixture::new();
    let backends = &BACKENDS[..3];
    fx.apply(&service(ForwardingMode::Dsr, Protocol::Tcp, 80, backends));

    let payload = b"GET / HTTP/1.0\r\n\r\n";
    let packet = tcp_frame(
        (CLIENT_MAC, FRONT_MAC),
        (CLIENT, 41000),
        (VIP, 80),
        false,
        true,
        payload,
    );
    let backend = expected_backend(backends, 41000, 80, 6);
    let want = tcp_frame(
        (BACK_MAC, backend_mac(backend)),
        (CLIENT, 41000),
        (VIP, 80),
        false,
        true,
        payload,
    );
    assert_frame("DSR", fx.run(&packet, fx.front_index), XDP_REDIRECT, &want);
}

#[test]
fn established_flow_sticks_to_its_backend_after_the_table_changes() {
    if !privileged() {
        return;
    }
    let mut fx = Fixture::new();
    let old_set = &BACKENDS[..3];
    let new_set = &BACKENDS[..4];
    // A client port whose flow the new table would send elsewhere.
    let port = (42000u16..43000)
        .find(|p| expected_backend(old_set, *p, 80, 6) != expected_backend(new_set, *p, 80, 6))
        .expect("some flow moves when a backend is added");
    let old_backend = expected_backend(old_set, port, 80, 6);

    fx.apply(&service(
        ForwardingMode::FullNat,
        Protocol::Tcp,
        80,
        old_set,
    ));
    let syn = tcp_frame(
        (CLIENT_MAC, FRONT_MAC),
        (CLIENT, port),
        (VIP, 80),
        true,
        false,
        &[],
    );
    assert_eq!(fx.run(&syn, fx.front_index).0, XDP_REDIRECT);

    fx.apply(&service(
        ForwardingMode::FullNat,
        Protocol::Tcp,
        80,
        new_set,
    ));
    let ack = tcp_frame(
        (CLIENT_MAC, FRONT_MAC),
        (CLIENT, port),
        (VIP, 80),
        false,
        true,
        b"hello",
    );
    let want = tcp_frame(
        (BACK_MAC, backend_mac(old_backend)),
        (LB_BACK, port),
        (old_backend, 8080),
        false,
        true,
        b"hello",
    );
    assert_frame(
        "established ACK",
        fx.run(&ack, fx.front_index),
        XDP_REDIRECT,
        &want,
    );

    // The table did change: a new flow with the same hash position goes to the new choice.
    let fresh = (43000u16..44000)
        .find(|p| expected_backend(old_set, *p, 80, 6) != expected_backend(new_set, *p, 80, 6))
        .expect("another moving flow");
    let new_backend = expected_backend(new_set, fresh, 80, 6);
    let syn = tcp_frame(
        (CLIENT_MAC, FRONT_MAC),
        (CLIENT, fresh),
        (VIP, 80),
        true,
        false,
        &[],
    );
    let want = tcp_frame(
        (BACK_MAC, backend_mac(new_backend)),
        (LB_BACK, fresh),
        (new_backend, 8080),
        true,
        false,
        &[],
    );
    assert_frame(
        "new flow after change",
        fx.run(&syn, fx.front_index),
        XDP_REDIRECT,
        &want,
    );
}

#[test]
fn removed_backend_flows_move_and_draining_backend_keeps_them() {
    if !privileged() {
        return;
    }
    let mut fx = Fixture::new();
    let all = &BACKENDS[..3];
    let mut spec = service(ForwardingMode::FullNat, Protocol::Tcp, 80, all);
    fx.apply(&spec);
    // One flow pinned to each backend.
    let ports: Vec<u16> = all
        .iter()
        .map(|b| {
            (45000u16..46000)
                .find(|p| expected_backend(all, *p, 80, 6) == *b)
                .expect("a port for each backend")
        })
        .collect();
    for port in &ports {
        let syn = tcp_frame(
            (CLIENT_MAC, FRONT_MAC),
            (CLIENT, *port),
            (VIP, 80),
            true,
            false,
            &[],
        );
        assert_eq!(fx.run(&syn, fx.front_index).0, XDP_REDIRECT);
    }

    // Drain backend 0: its flow stays.
    spec.backends[0].state = BackendState::Draining;
    fx.apply(&spec);
    let ack = tcp_frame(
        (CLIENT_MAC, FRONT_MAC),
        (CLIENT, ports[0]),
        (VIP, 80),
        false,
        true,
        b"x",
    );
    let want = tcp_frame(
        (BACK_MAC, backend_mac(all[0])),
        (LB_BACK, ports[0]),
        (all[0], 8080),
        false,
        true,
        b"x",
    );
    assert_frame(
        "flow of a draining backend",
        fx.run(&ack, fx.front_index),
        XDP_REDIRECT,
        &want,
    );

    // Remove backend 1: its flow moves to one of the remaining active backends (2, since 0 is
    // draining).
    spec.backends.remove(1);
    fx.apply(&spec);
    let before = fx.reason("flow_rescheduled");
    let ack = tcp_frame(
        (CLIENT_MAC, FRONT_MAC),
        (CLIENT, ports[1]),
        (VIP, 80),
        false,
        true,
        b"y",
    );
    let want = tcp_frame(
        (BACK_MAC, backend_mac(all[2])),
        (LB_BACK, ports[1]),
        (all[2], 8080),
        false,
        true,
        b"y",
    );
    assert_frame(
        "flow of a removed backend",
        fx.run(&ack, fx.front_index),
        XDP_REDIRECT,
        &want,
    );
    assert_eq!(fx.reason("flow_rescheduled"), before + 1);
}

#[test]
fn service_without_backends_drops_and_counts() {
    if !privileged() {
        return;
    }
    let mut fx = Fixture::new();
    fx.apply(&service(ForwardingMode::FullNat, Protocol::Tcp, 80, &[]));
    let syn = tcp_frame(
        (CLIENT_MAC, FRONT_MAC),
        (CLIENT, 40000),
        (VIP, 80),
        true,
        false,
        &[],
    );
    let before = fx.reason("drop_no_backend");
    assert_frame("no backend", fx.run(&syn, fx.front_index), XDP_DROP, &syn);
    assert_eq!(fx.reason("drop_no_backend"), before + 1);
}

/// A service with source ranges takes new flows only from them: the others are dropped whole
/// and counted; a source inside a range is forwarded as usual.
#[test]
fn source_ranges_admit_only_their_sources() {
    if !privileged() {
        return;
    }
    let mut fx = Fixture::new();
    let backends = &BACKENDS[..2];
    let mut svc = service(ForwardingMode::FullNat, Protocol::Tcp, 80, backends);
    // CLIENT is inside the first range; 198.19.0.7 is in none.
    svc.source_ranges = vec![
        format!("{}/24", ip_str(CLIENT)).parse().unwrap(),
        "203.0.113.0/24".parse().unwrap(),
    ];
    fx.apply(&svc);
    let outsider = [198, 19, 0, 7];
    let syn = tcp_frame(
        (CLIENT_MAC, FRONT_MAC),
        (outsider, 40000),
        (VIP, 80),
        true,
        false,
        &[],
    );
    let before = fx.reason("drop_source_range");
    assert_frame(
        "outside the ranges",
        fx.run(&syn, fx.front_index),
        XDP_DROP,
        &syn,
    );
    assert_eq!(fx.reason("drop_source_range"), before + 1);

    let syn = tcp_frame(
        (CLIENT_MAC, FRONT_MAC),
        (CLIENT, 40000),
        (VIP, 80),
        true,
        false,
        &[],
    );
    let backend = expected_backend(backends, 40000, 80, 6);
    let want = tcp_frame(
        (BACK_MAC, backend_mac(backend)),
        (LB_BACK, 40000),
        (backend, 8080),
        true,
        false,
        &[],
    );
    assert_frame(
        "inside a range",
        fx.run(&syn, fx.front_index),
        XDP_REDIRECT,
        &want,
    );

    // Without ranges the outsider is served again: the flag and the entries go together.
    svc.source_ranges.clear();
    fx.apply(&svc);
    let syn = tcp_frame(
        (CLIENT_MAC, FRONT_MAC),
        (outsider, 40001),
        (VIP, 80),
        true,
        false,
        &[],
    );
    assert_eq!(fx.run(&syn, fx.front_index).0, XDP_REDIRECT);
    assert_eq!(fx.reason("drop_source_range"), before + 1);
}

#[test]
fn non_vip_packets_pass_unchanged() {
    if !privileged() {
        return;
    }
    let mut fx = Fixture::new();
    fx.apply(&service(
        ForwardingMode::FullNat,
        Protocol::Tcp,
        80,
        &BACKENDS[..3],
    ));
    let cases = [
        // Same VIP, other port.
        tcp_frame(
            (CLIENT_MAC, FRONT_MAC),
            (CLIENT, 40000),
            (VIP, 81),
            true,
            false,
            &[],
        ),
        // Same port, other protocol.
        udp_frame((CLIENT_MAC, FRONT_MAC), (CLIENT, 40000), (VIP, 80), b"dns?"),
        // The load balancer's own address.
        tcp_frame(
            (CLIENT_MAC, FRONT_MAC),
            (CLIENT, 40000),
            (LB_FRONT, 22),
            true,
            false,
            &[],
        ),
    ];
    for frame in cases {
        let before = fx.reason("pass_not_vip");
        assert_frame("non-VIP", fx.run(&frame, fx.front_index), XDP_PASS, &frame);
        assert_eq!(fx.reason("pass_not_vip"), before + 1);
    }
    // ARP is not IPv4.
    let mut arp = eth(CLIENT_MAC, [0xff; 6]).to_bytes().to_vec();
    arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
    arp.extend_from_slice(&[0u8; 28]);
    let before = fx.reason("pass_not_ipv4");
    assert_frame("ARP", fx.run(&arp, fx.front_index), XDP_PASS, &arp);
    assert_eq!(fx.reason("pass_not_ipv4"), before + 1);
}

#[test]
fn truncated_frames_follow_the_documented_rules() {
    if !privileged() {
        return;
    }
    let mut fx = Fixture::new();
    fx.apply(&service(
        ForwardingMode::FullNat,
        Protocol::Tcp,
        80,
        &BACKENDS[..3],
    ));
    let syn = tcp_frame(
        (CLIENT_MAC, FRONT_MAC),
        (CLIENT, 40000),
        (VIP, 80),
        true,
        false,
        &[],
    );

    // Every cut of the frame: headers up to IPv4 cut -> pass (truncated); IPv4 header whole but
    // shorter than its total length -> pass (malformed). Never forwarded, never changed.
    // (BPF_PROG_TEST_RUN refuses XDP frames shorter than an Ethernet header.)
    for len in 14..syn.len() {
        let cut = &syn[..len];
        let counter = if len < 34 {
            "pass_truncated_l3"
        } else {
            "pass_malformed_ipv4"
        };
        let before = fx.reason(counter);
        assert_frame(
            &format!("cut at {len}"),
            fx.run(cut, fx.front_index),
            XDP_PASS,
            cut,
        );
        assert_eq!(
            fx.reason(counter),
            before + 1,
            "cut at {len} counted as {counter}"
        );
    }

    // A consistent IPv4 packet whose TCP header is cut short, to the VIP address: dropped.
    let mut short = syn[..14 + 20 + 10].to_vec();
    let mut ip = ipv4(CLIENT, VIP, IpNumber::TCP, 10);
    ip.header_checksum = ip.calc_header_checksum();
    short[14..34].copy_from_slice(&ip.to_bytes());
    let before = fx.reason("drop_truncated_l4");
    assert_frame(
        "short TCP to VIP",
        fx.run(&short, fx.front_index),
        XDP_DROP,
        &short,
    );
    assert_eq!(fx.reason("drop_truncated_l4"), before + 1);

    // The same to another address: not ours, passed.
    let mut other = short.clone();
    let mut ip = ipv4(CLIENT, [198, 18, 7, 7], IpNumber::TCP, 10);
    ip.header_checksum = ip.calc_header_checksum();
    other[14..34].copy_from_slice(&ip.to_bytes());
    assert_frame(
        "short TCP elsewhere",
        fx.run(&other, fx.front_index),
        XDP_PASS,
        &other,
    );
}

#[test]
fn fragments_to_a_vip_are_dropped_and_others_pass() {
    if !privileged() {
        return;
    }
    let mut fx = Fixture::new();
    fx.apply(&service(
        ForwardingMode::FullNat,
        Protocol::Udp,
        53,
        &BACKENDS[..3],
    ));

    let fragment = |dst: [u8; 4], more: bool, offset: u16| {
        let payload = [0xabu8; 64];
        let mut ip = ipv4(CLIENT, dst, IpNumber::UDP, payload.len());
        ip.dont_fragment = false;
        ip.more_fragments = more;
        ip.fragment_offset = IpFragOffset::try_new(offset).expect("offset");
        ip.header_checksum = ip.calc_header_checksum();
        let mut frame = eth(CLIENT_MAC, FRONT_MAC).to_bytes().to_vec();
        frame.extend_from_slice(&ip.to_bytes());
        // The first fragment starts with a UDP header to port 53 - still not hashed on.
        frame.extend_from_slice(&[0x9c, 0x40, 0x00, 0x35]);
        frame.extend_from_slice(&payload[4..]);
        frame
    };
    for (more, offset) in [(true, 0), (true, 8), (false, 8)] {
        let frame = fragment(VIP, more, offset);
        let before = fx.reason("drop_fragment");
        assert_frame(
            "fragment to VIP",
            fx.run(&frame, fx.front_index),
            XDP_DROP,
            &frame,
        );
        assert_eq!(fx.reason("drop_fragment"), before + 1);

        let frame = fragment([198, 18, 7, 7], more, offset);
        assert_frame(
            "fragment elsewhere",
            fx.run(&frame, fx.front_index),
            XDP_PASS,
            &frame,
        );
    }
}

#[test]
fn full_nat_reply_is_translated_back_to_the_client() {
    if !privileged() {
        return;
    }
    let mut fx = Fixture::new();
    let backends = &BACKENDS[..3];
    fx.apply(&service(
        ForwardingMode::FullNat,
        Protocol::Tcp,
        80,
        backends,
    ));
    let backend = expected_backend(backends, 40000, 80, 6);
    let syn = tcp_frame(
        (CLIENT_MAC, FRONT_MAC),
        (CLIENT, 40000),
        (VIP, 80),
        true,
        false,
        &[],
    );
    assert_eq!(fx.run(&syn, fx.front_index).0, XDP_REDIRECT);

    let syn_ack = tcp_frame(
        (backend_mac(backend), BACK_MAC),
        (backend, 8080),
        (LB_BACK, 40000),
        true,
        true,
        &[],
    );
    let want = tcp_frame(
        (FRONT_MAC, CLIENT_MAC),
        (VIP, 80),
        (CLIENT, 40000),
        true,
        true,
        &[],
    );
    let before = fx.reason("nat_reply_translated");
    assert_frame(
        "SYN-ACK",
        fx.run(&syn_ack, fx.back_index),
        XDP_REDIRECT,
        &want,
    );
    assert_eq!(fx.reason("nat_reply_translated"), before + 1);

    // UDP too, with its checksum.
    fx.apply(&service(
        ForwardingMode::FullNat,
        Protocol::Udp,
        53,
        backends,
    ));
    let backend = expected_backend(backends, 50000, 53, 17);
    let query = udp_frame(
        (CLIENT_MAC, FRONT_MAC),
        (CLIENT, 50000),
        (VIP, 53),
        b"query",
    );
    let want = udp_frame(
        (BACK_MAC, backend_mac(backend)),
        (LB_BACK, 50000),
        (backend, 8080),
        b"query",
    );
    assert_frame(
        "UDP query",
        fx.run(&query, fx.front_index),
        XDP_REDIRECT,
        &want,
    );
    let answer = udp_frame(
        (backend_mac(backend), BACK_MAC),
        (backend, 8080),
        (LB_BACK, 50000),
        b"answer",
    );
    let want = udp_frame(
        (FRONT_MAC, CLIENT_MAC),
        (VIP, 53),
        (CLIENT, 50000),
        b"answer",
    );
    assert_frame(
        "UDP answer",
        fx.run(&answer, fx.back_index),
        XDP_REDIRECT,
        &want,
    );
}

/// An ICMP "fragmentation needed" from a router on the backend side, quoting the packet the
/// load balancer sent, reaches the client as if the VIP had sent it about the client's packet.
#[test]
fn icmp_fragmentation_needed_is_translated_to_the_client() {
    if !privileged() {
        return;
    }
    let mut fx = Fixture::new();
    let backends = &BACKENDS[..3];
    fx.apply(&service(
        ForwardingMode::FullNat,
        Protocol::Tcp,
        80,
        backends,
    ));
    let backend = expected_backend(backends, 40000, 80, 6);
    let syn = tcp_frame(
        (CLIENT_MAC, FRONT_MAC),
        (CLIENT, 40000),
        (VIP, 80),
        true,
        false,
        &[],
    );
    assert_eq!(fx.run(&syn, fx.front_index).0, XDP_REDIRECT);

    let payload = [0x55u8; 1200];
    // The quote: IPv4 header + the first 8 bytes of TCP, of a full-size data packet.
    let quote = |src: ([u8; 4], u16), dst: ([u8; 4], u16)| {
        let mut tcp = TcpHeader::new(src.1, dst.1, 1000, 64240);
        tcp.ack = true;
        let ip = ipv4(
            src.0,
            dst.0,
            IpNumber::TCP,
            tcp.header_len() + payload.len(),
        );
        tcp.checksum = tcp.calc_checksum_ipv4(&ip, &payload).expect("checksum");
        let mut bytes = ip.to_bytes().to_vec();
        bytes.extend_from_slice(&tcp.to_bytes()[..8]);
        bytes
    };
    let icmp = |macs: ([u8; 6], [u8; 6]), src: [u8; 4], dst: [u8; 4], quoted: &[u8]| {
        let header = Icmpv4Header::with_checksum(
            Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::FragmentationNeeded {
                next_hop_mtu: 1400,
            }),
            quoted,
        );
        let ip = ipv4(src, dst, IpNumber::ICMP, header.header_len() + quoted.len());
        let mut frame = eth(macs.0, macs.1).to_bytes().to_vec();
        frame.extend_from_slice(&ip.to_bytes());
        frame.extend_from_slice(&header.to_bytes());
        frame.extend_from_slice(quoted);
        frame
    };
    let router = [198, 18, 1, 254];
    let sent_to_backend = quote((LB_BACK, 40000), (backend, 8080));
    let error = icmp(
        (backend_mac(backend), BACK_MAC),
        router,
        LB_BACK,
        &sent_to_backend,
    );
    // The quote's TCP checksum (bytes 16-17) is not within the 8 quoted bytes, so it needs no
    // fixing; everything else is rewritten as the client's own packet to the VIP.
    let client_sent = quote((CLIENT, 40000), (VIP, 80));
    let want = icmp((FRONT_MAC, CLIENT_MAC), VIP, CLIENT, &client_sent);
    let before = fx.reason("icmp_translated");
    assert_frame(
        "ICMP frag needed",
        fx.run(&error, fx.back_index),
        XDP_REDIRECT,
        &want,
    );
    assert_eq!(fx.reason("icmp_translated"), before + 1);

    // The same error cut at the quoted header, its total length ending there and the quoted
    // ports only in the Ethernet padding behind it: not translated (the rewrite would touch
    // bytes the ICMP checksum does not cover), passed untouched.
    let mut short_quote = sent_to_backend[..20].to_vec();
    short_quote[2..4].copy_from_slice(&48u16.to_be_bytes());
    let mut padded = icmp(
        (backend_mac(backend), BACK_MAC),
        router,
        LB_BACK,
        &short_quote,
    );
    padded.extend_from_slice(&sent_to_backend[20..]);
    let before = fx.reason("icmp_translated");
    assert_frame(
        "quote in the padding",
        fx.run(&padded, fx.back_index),
        XDP_PASS,
        &padded,
    );
    assert_eq!(fx.reason("icmp_translated"), before);

    // An ICMP error about a flow the load balancer does not know passes untouched.
    let unknown = quote((LB_BACK, 40001), (backend, 8080));
    let error = icmp((backend_mac(backend), BACK_MAC), router, LB_BACK, &unknown);
    assert_frame(
        "unknown ICMP",
        fx.run(&error, fx.back_index),
        XDP_PASS,
        &error,
    );
}

#[test]
fn vlan_tagged_vip_traffic_is_parsed() {
    if !privileged() {
        return;
    }
    let mut fx = Fixture::new();
    fx.apply(&service(
        ForwardingMode::FullNat,
        Protocol::Tcp,
        80,
        &BACKENDS[..3],
    ));
    // A tagged frame to a port with no service passes unchanged and is counted as not-VIP
    // (i.e. it was parsed through the tag, not rejected as non-IPv4).
    let plain = tcp_frame(
        (CLIENT_MAC, FRONT_MAC),
        (CLIENT, 40000),
        (VIP, 81),
        true,
        false,
        &[],
    );
    let mut tagged = plain[..12].to_vec();
    tagged.extend_from_slice(&[0x81, 0x00, 0x00, 0x64]);
    tagged.extend_from_slice(&plain[12..]);
    let before = fx.reason("pass_not_vip");
    assert_frame(
        "tagged non-VIP",
        fx.run(&tagged, fx.front_index),
        XDP_PASS,
        &tagged,
    );
    assert_eq!(fx.reason("pass_not_vip"), before + 1);
    let _ = reason::COUNT;
}

#[test]
fn established_flow_reuses_its_cached_fib_answer_until_a_longer_packet() {
    if !privileged() {
        return;
    }
    let mut fx = Fixture::new();
    let backends = &BACKENDS[..1];
    fx.apply(&service(
        ForwardingMode::FullNat,
        Protocol::Tcp,
        80,
        backends,
    ));
    let backend = backends[0];
    let client_side = (CLIENT_MAC, FRONT_MAC);
    let backend_side = (BACK_MAC, backend_mac(backend));
    let syn = tcp_frame(client_side, (CLIENT, 40000), (VIP, 80), true, false, &[]);
    let ack = tcp_frame(client_side, (CLIENT, 40000), (VIP, 80), false, true, &[]);
    let want_syn = tcp_frame(
        backend_side,
        (LB_BACK, 40000),
        (backend, 8080),
        true,
        false,
        &[],
    );
    let want_ack = tcp_frame(
        backend_side,
        (LB_BACK, 40000),
        (backend, 8080),
        false,
        true,
        &[],
    );

    // The SYN creates the flow; the first ACK looks the route up and caches the answer.
    assert_frame("SYN", fx.run(&syn, fx.front_index), XDP_REDIRECT, &want_syn);
    assert_frame(
        "first ACK",
        fx.run(&ack, fx.front_index),
        XDP_REDIRECT,
        &want_ack,
    );

    // Without its neighbour entry, a lookup would now answer "no neighbour" and the packet
    // would go to the stack. The cached answer still forwards, byte for byte as before.
    fx._netns
        .ip(&["neigh", "del", &ip_str(backend), "dev", "back"]);
    let misses = fx.reason("pass_fib_no_neigh");
    assert_frame(
        "cached ACK",
        fx.run(&ack, fx.front_index),
        XDP_REDIRECT,
        &want_ack,
    );
    assert_eq!(
        fx.reason("pass_fib_no_neigh"),
        misses,
        "the cached ACK looked the route up"
    );

    // A longer packet than the cached answer was checked against (the route's MTU) looks the
    // route up again, finds no neighbour, and goes to the stack, which resolves it.
    let data = tcp_frame(
        client_side,
        (CLIENT, 40000),
        (VIP, 80),
        false,
        true,
        &[0x5a; 100],
    );
    let (verdict, _) = fx.run(&data, fx.front_index);
    assert_eq!(
        verdict, XDP_PASS,
        "a longer packet must not use the cached answer"
    );
    assert_eq!(fx.reason("pass_fib_no_neigh"), misses + 1);
}

// ---------------------------------------------------------------------------------------------
// The flow table is the conntrack: LB_FLOWS holds CtKey -> CtEntry records.
// ---------------------------------------------------------------------------------------------

/// A TCP frame with any of SYN, ACK and FIN set, and no payload.
fn tcp_flags_frame(
    macs: ([u8; 6], [u8; 6]),
    src: ([u8; 4], u16),
    dst: ([u8; 4], u16),
    flags: (bool, bool, bool),
) -> Vec<u8> {
    tcp_segment(macs, src, dst, flags, &[])
}

fn addr16(a: [u8; 4]) -> [u32; 4] {
    [u32::from_ne_bytes(a), 0, 0, 0]
}

/// Every entry of the pinned map `name` under the fixture's pin root.
fn pinned_entries<V: Copy + Default>(fx: &Fixture, name: &str) -> Vec<(CtKey, V)> {
    use std::os::fd::AsFd as _;
    let map = aya::maps::MapData::from_pin(fx.pin_root.join(name)).expect("open pinned map");
    datapath::gc::read_all::<CtKey, V>(map.fd().as_fd()).expect("read map")
}

/// The `LB_FLOWS` record of the flow from `client` to `vip`, found by the conntrack's own key.
fn lb_flow(fx: &Fixture, client: ([u8; 4], u16), vip: ([u8; 4], u16)) -> (u8, FlowEntry) {
    let (key, client_side) = canonical_key(
        addr16(client.0),
        client.1.to_be(),
        addr16(vip.0),
        vip.1.to_be(),
        6,
        2,
    );
    let entries = pinned_entries::<FlowEntry>(fx, bpf_common::map_names::FLOWS);
    let entry = entries
        .iter()
        .find(|(k, _)| *k == key)
        .unwrap_or_else(|| panic!("no LB_FLOWS entry under the canonical key in {entries:?}"))
        .1;
    (client_side, entry)
}

const SYN: (bool, bool, bool) = (true, false, false);
const SYN_ACK: (bool, bool, bool) = (true, true, false);
const ACK: (bool, bool, bool) = (false, true, false);
const FIN_ACK: (bool, bool, bool) = (false, true, true);
/// IPv4 total length of every frame `tcp_flags_frame` builds.
const IP_LEN: u64 = 40;

#[test]
fn full_nat_flow_entries_are_conntrack_records_advanced_in_both_directions() {
    if !privileged() {
        return;
    }
    let mut fx = Fixture::new();
    let backends = &BACKENDS[..3];
    fx.apply(&service(
        ForwardingMode::FullNat,
        Protocol::Tcp,
        80,
        backends,
    ));
    let backend = expected_backend(backends, 40100, 80, 6);
    let client_packet =
        |flags| tcp_flags_frame((CLIENT_MAC, FRONT_MAC), (CLIENT, 40100), (VIP, 80), flags);
    let backend_packet = |flags| {
        tcp_flags_frame(
            (backend_mac(backend), BACK_MAC),
            (backend, 8080),
            (LB_BACK, 40100),
            flags,
        )
    };
    let state = |fx: &Fixture| {
        let (_, entry) = lb_flow(fx, (CLIENT, 40100), (VIP, 80));
        state_name(6, entry.ct.state)
    };

    assert_eq!(fx.run(&client_packet(SYN), fx.front_index).0, XDP_REDIRECT);
    assert_eq!(state(&fx), "SYN_SENT");
    // The backend's SYN+ACK reaches the flow's record through the reverse entry.
    assert_eq!(
        fx.run(&backend_packet(SYN_ACK), fx.back_index).0,
        XDP_REDIRECT
    );
    assert_eq!(state(&fx), "SYN_RECV");
    assert_eq!(fx.run(&client_packet(ACK), fx.front_index).0, XDP_REDIRECT);

    let (client_side, entry) = lb_flow(&fx, (CLIENT, 40100), (VIP, 80));
    let ct = entry.ct;
    assert_eq!(state_name(6, ct.state), "ESTABLISHED");
    assert_eq!(ct.orig_side, client_side, "opened from the client's side");
    assert_eq!(ct.packets, [2, 1]);
    assert_eq!(ct.bytes, [2 * IP_LEN, IP_LEN]);
    assert_ne!(ct.flags & CT_F_SEEN_REPLY, 0);
    assert_eq!(ct.flags & CT_F_ONE_WAY, 0);
    assert!(
        ct.rtt_ns > 0,
        "handshake RTT observed from SYN to SYN+ACK: {ct:?}"
    );
    assert_eq!(ct.ifindex, fx.front_index);
    assert_eq!(
        entry.nat_port_be,
        40100u16.to_be(),
        "full-NAT kept the client's port"
    );

    // The reverse entry: keyed by the backend leg's canonical key, owned by the flow's key.
    let (backend_leg, backend_side) = canonical_key(
        addr16(backend),
        8080u16.to_be(),
        addr16(LB_BACK),
        40100u16.to_be(),
        6,
        2,
    );
    let reverse = pinned_entries::<NatReverseEntry>(&fx, bpf_common::map_names::NAT_REV);
    assert_eq!(reverse.len(), 1, "{reverse:?}");
    let (key, value) = reverse[0];
    assert_eq!(key, backend_leg);
    assert_eq!(value.backend_side, backend_side);
    let (flow_key, _) = canonical_key(
        addr16(CLIENT),
        40100u16.to_be(),
        addr16(VIP),
        80u16.to_be(),
        6,
        2,
    );
    assert_eq!(value.owner, flow_key);

    // Close: the client's FIN, then the backend's. The record ends in TIME_WAIT, which the
    // GC expires after the closing timeout, not the established one.
    assert_eq!(
        fx.run(&client_packet(FIN_ACK), fx.front_index).0,
        XDP_REDIRECT
    );
    assert_eq!(state(&fx), "FIN_WAIT");
    assert_eq!(
        fx.run(&backend_packet(FIN_ACK), fx.back_index).0,
        XDP_REDIRECT
    );
    assert_eq!(state(&fx), "TIME_WAIT");
    let (_, entry) = lb_flow(&fx, (CLIENT, 40100), (VIP, 80));
    assert_eq!(entry.ct.packets, [3, 2]);
    assert_eq!(
        ct_timeout(&Timeouts::DEFAULT, 6, entry.ct.state),
        Timeouts::DEFAULT.tcp_closing_ns
    );

    // A packet from the LB's side of the backend leg (not from the backend) is not a reply,
    // even though the bidirectional key matches the reverse entry.
    let spoofed = tcp_flags_frame(
        (backend_mac(backend), BACK_MAC),
        (LB_BACK, 40100),
        (backend, 8080),
        ACK,
    );
    let before = fx.reason("nat_reply_translated");
    assert_eq!(fx.run(&spoofed, fx.back_index).0, XDP_PASS);
    assert_eq!(fx.reason("nat_reply_translated"), before);
}

#[test]
fn dsr_flow_entries_are_one_way_conntrack_records() {
    if !privileged() {
        return;
    }
    let mut fx = Fixture::new();
    let backends = &BACKENDS[..3];
    fx.apply(&service(ForwardingMode::Dsr, Protocol::Tcp, 80, backends));
    let packet =
        |flags| tcp_flags_frame((CLIENT_MAC, FRONT_MAC), (CLIENT, 40200), (VIP, 80), flags);
    assert_eq!(fx.run(&packet(SYN), fx.front_index).0, XDP_REDIRECT);
    // Backends answer clients directly; the client's first ACK proves the handshake.
    assert_eq!(fx.run(&packet(ACK), fx.front_index).0, XDP_REDIRECT);
    let (_, entry) = lb_flow(&fx, (CLIENT, 40200), (VIP, 80));
    assert_eq!(state_name(6, entry.ct.state), "ESTABLISHED");
    assert_ne!(entry.ct.flags & CT_F_ONE_WAY, 0);
    assert_eq!(entry.ct.packets, [2, 0]);
    assert_eq!(entry.ct.rtt_ns, 0, "no SYN+ACK seen, no RTT");
    assert_eq!(entry.nat_port_be, 0);
    assert!(
        pinned_entries::<NatReverseEntry>(&fx, bpf_common::map_names::NAT_REV).is_empty(),
        "DSR allocates no reverse entry"
    );
    assert_eq!(fx.run(&packet(FIN_ACK), fx.front_index).0, XDP_REDIRECT);
    let (_, entry) = lb_flow(&fx, (CLIENT, 40200), (VIP, 80));
    assert_eq!(state_name(6, entry.ct.state), "FIN_WAIT");
}

#[test]
fn pinned_maps_of_another_abi_are_replaced_and_the_compatible_ones_kept() {
    use std::os::fd::AsFd as _;
    if !privileged() {
        return;
    }
    const BPF_MAP_TYPE_HASH: u32 = 1;
    const BPF_MAP_TYPE_PERCPU_ARRAY: u32 = 6;
    const BPF_MAP_TYPE_LRU_HASH: u32 = 9;
    let pin = |fd: std::os::fd::OwnedFd, path: std::path::PathBuf| {
        aya::maps::MapData::from_fd(fd)
            .expect("map data")
            .pin(path)
            .expect("pin");
    };
    let layout = |fx: &Fixture, name: &str| {
        let map = aya::maps::MapData::from_pin(fx.pin_root.join(name)).expect("open pin");
        datapath::gc::map_layout(map.fd().as_fd()).expect("map info")
    };
    let mut kept_id = 0;
    let mut fx = Fixture::new_after(|root| {
        // What the previous release pinned: a 40-byte 5-tuple key and a 56-byte flow entry,
        // and 21 drop reasons.
        let flows =
            datapath::gc::create_hash_map::<[u8; 40], [u8; 56]>(BPF_MAP_TYPE_LRU_HASH, 1024)
                .expect("old LB_FLOWS");
        pin(flows, root.join(bpf_common::map_names::FLOWS));
        let reasons = datapath::gc::create_hash_map::<u32, u64>(BPF_MAP_TYPE_PERCPU_ARRAY, 21)
            .expect("old LB_REASONS");
        pin(reasons, root.join(bpf_common::map_names::REASONS));
        // A map whose layout did not change: it must be reused, not replaced.
        let vips = datapath::gc::create_hash_map::<bpf_common::VipKey, bpf_common::VipInfo>(
            BPF_MAP_TYPE_HASH,
            4,
        )
        .expect("LB_VIPS");
        kept_id = datapath::gc::map_layout(vips.as_fd()).expect("info").id;
        pin(vips, root.join(bpf_common::map_names::VIPS));
    });

    let flows = layout(&fx, bpf_common::map_names::FLOWS);
    assert_eq!(
        (flows.key_size, flows.value_size),
        (size_of::<CtKey>() as u32, size_of::<FlowEntry>() as u32)
    );
    assert_eq!(
        layout(&fx, bpf_common::map_names::REASONS).max_entries,
        reason::COUNT
    );
    assert_eq!(layout(&fx, bpf_common::map_names::VIPS).id, kept_id);

    // And the datapath works on the replaced maps.
    let backends = &BACKENDS[..3];
    fx.apply(&service(ForwardingMode::Dsr, Protocol::Tcp, 80, backends));
    let before = fx.reason("new_flow");
    let syn = tcp_flags_frame((CLIENT_MAC, FRONT_MAC), (CLIENT, 40300), (VIP, 80), SYN);
    assert_eq!(fx.run(&syn, fx.front_index).0, XDP_REDIRECT);
    assert_eq!(fx.reason("new_flow"), before + 1);
    let (_, entry) = lb_flow(&fx, (CLIENT, 40300), (VIP, 80));
    assert_eq!(state_name(6, entry.ct.state), "SYN_SENT");
}

// ---------------------------------------------------------------------------------------------
// Recycled 5-tuples, hostile TCP headers, IP options.
// ---------------------------------------------------------------------------------------------

/// A client port whose flow Maglev gives to `backend` among `among`.
fn port_for(among: &[[u8; 4]], backend: [u8; 4], from: u16) -> u16 {
    (from..from + 2000)
        .find(|p| expected_backend(among, *p, 80, 6) == backend)
        .expect("a client port for the backend")
}

/// A SYN on a 5-tuple whose previous connection ended (TIME_WAIT after both FINs, CLOSE after a
/// RST; FIN_WAIT for DSR, which sees one direction) is a new flow: a fresh Maglev choice that
/// skips the draining backend, `new_flow` counted and not `flow_rescheduled`, and in full-NAT
/// the client's port kept since it is free towards the new backend.
#[test]
fn a_syn_on_a_closed_tuple_is_a_new_flow_and_skips_a_draining_backend() {
    if !privileged() {
        return;
    }
    let mut fx = Fixture::new();
    let all = &BACKENDS[..3];
    let survivors = &BACKENDS[1..3];
    let mut full_nat = service(ForwardingMode::FullNat, Protocol::Tcp, 80, all);
    fx.apply(&full_nat);
    let to_lb = |port: u16, flags| {
        tcp_flags_frame((CLIENT_MAC, FRONT_MAC), (CLIENT, port), (VIP, 80), flags)
    };
    let from_backend = |backend: [u8; 4], port: u16, flags| {
        tcp_flags_frame(
            (backend_mac(backend), BACK_MAC),
            (backend, 8080),
            (LB_BACK, port),
            flags,
        )
    };
    const RST: (bool, bool, bool) = (false, false, false);
    // Two connections on backend 0: one closed by both FINs, one reset by the client.
    let fin_port = port_for(all, all[0], 47000);
    let rst_port = port_for(all, all[0], fin_port + 1);
    for port in [fin_port, rst_port] {
        assert_eq!(fx.run(&to_lb(port, SYN), fx.front_index).0, XDP_REDIRECT);
        assert_eq!(
            fx.run(&from_backend(all[0], port, SYN_ACK), fx.back_index)
                .0,
            XDP_REDIRECT
        );
        assert_eq!(fx.run(&to_lb(port, ACK), fx.front_index).0, XDP_REDIRECT);
    }
    assert_eq!(
        fx.run(&to_lb(fin_port, FIN_ACK), fx.front_index).0,
        XDP_REDIRECT
    );
    assert_eq!(
        fx.run(&from_backend(all[0], fin_port, FIN_ACK), fx.back_index)
            .0,
        XDP_REDIRECT
    );
    let mut rst = to_lb(rst_port, RST);
    // Set RST+ACK by hand (the frame builder knows SYN, ACK and FIN) and fix the checksum.
    {
        let mut tcp = TcpHeader::from_slice(&rst[34..]).expect("tcp").0;
        tcp.rst = true;
        tcp.ack = true;
        tcp.acknowledgment_number = 5000;
        let ip = Ipv4Header::from_slice(&rst[14..]).expect("ip").0;
        tcp.checksum = tcp.calc_checksum_ipv4(&ip, &[]).expect("checksum");
        rst[34..54].copy_from_slice(&tcp.to_bytes());
    }
    assert_eq!(fx.run(&rst, fx.front_index).0, XDP_REDIRECT);
    let state =
        |fx: &Fixture, port| state_name(6, lb_flow(fx, (CLIENT, port), (VIP, 80)).1.ct.state);
    assert_eq!(state(&fx, fin_port), "TIME_WAIT");
    assert_eq!(state(&fx, rst_port), "CLOSE");

    // Backend 0 drains. Its closed records must not pull the reconnecting clients back to it.
    full_nat.backends[0].state = BackendState::Draining;
    fx.apply(&full_nat);
    for port in [fin_port, rst_port] {
        let (new_flow, rescheduled) = (fx.reason("new_flow"), fx.reason("flow_rescheduled"));
        let backend = expected_backend(survivors, port, 80, 6);
        let want = tcp_flags_frame(
            (BACK_MAC, backend_mac(backend)),
            (LB_BACK, port),
            (backend, 8080),
            SYN,
        );
        assert_frame(
            &format!("SYN on the closed tuple from port {port}"),
            fx.run(&to_lb(port, SYN), fx.front_index),
            XDP_REDIRECT,
            &want,
        );
        assert_eq!(fx.reason("new_flow"), new_flow + 1, "a new flow counted");
        assert_eq!(fx.reason("flow_rescheduled"), rescheduled);
        let (_, entry) = lb_flow(&fx, (CLIENT, port), (VIP, 80));
        assert_eq!(state_name(6, entry.ct.state), "SYN_SENT", "a fresh record");
        assert_eq!(entry.ct.packets, [1, 0], "counters start over");
    }

    // A SYN on a live (established) connection of the draining backend is not a reconnect:
    // the flow stays where it is.
    let live = port_for(all, all[0], rst_port + 1);
    full_nat.backends[0].state = BackendState::Active;
    fx.apply(&full_nat);
    assert_eq!(fx.run(&to_lb(live, SYN), fx.front_index).0, XDP_REDIRECT);
    assert_eq!(
        fx.run(&from_backend(all[0], live, SYN_ACK), fx.back_index)
            .0,
        XDP_REDIRECT
    );
    assert_eq!(fx.run(&to_lb(live, ACK), fx.front_index).0, XDP_REDIRECT);
    full_nat.backends[0].state = BackendState::Draining;
    fx.apply(&full_nat);
    let want = tcp_flags_frame(
        (BACK_MAC, backend_mac(all[0])),
        (LB_BACK, live),
        (all[0], 8080),
        SYN,
    );
    assert_frame(
        "SYN on a live flow of a draining backend",
        fx.run(&to_lb(live, SYN), fx.front_index),
        XDP_REDIRECT,
        &want,
    );

    // DSR sees one direction: the client's FIN leaves the record in FIN_WAIT, and a SYN there
    // opens a new connection.
    let mut dsr = service(ForwardingMode::Dsr, Protocol::Tcp, 81, all);
    dsr.id = 1;
    fx.apply(&dsr);
    let to_dsr = |port: u16, flags| {
        tcp_flags_frame((CLIENT_MAC, FRONT_MAC), (CLIENT, port), (VIP, 81), flags)
    };
    let port = (40000u16..42000)
        .find(|p| expected_backend(all, *p, 81, 6) == all[0])
        .expect("port");
    for flags in [SYN, ACK, FIN_ACK] {
        assert_eq!(fx.run(&to_dsr(port, flags), fx.front_index).0, XDP_REDIRECT);
    }
    dsr.backends[0].state = BackendState::Draining;
    fx.apply(&dsr);
    let backend = expected_backend(survivors, port, 81, 6);
    let want = tcp_flags_frame(
        (BACK_MAC, backend_mac(backend)),
        (CLIENT, port),
        (VIP, 81),
        SYN,
    );
    assert_frame(
        "DSR SYN on a closed tuple",
        fx.run(&to_dsr(port, SYN), fx.front_index),
        XDP_REDIRECT,
        &want,
    );
}

/// A SYN to a VIP whose TCP data offset points past the end of the segment (15 words, 20 bytes
/// on the wire) has a header cut short: dropped as `drop_truncated_l4`, no flow created.
#[test]
fn tcp_data_offset_past_the_segment_is_dropped_as_truncated() {
    if !privileged() {
        return;
    }
    let mut fx = Fixture::new();
    fx.apply(&service(
        ForwardingMode::FullNat,
        Protocol::Tcp,
        80,
        &BACKENDS[..3],
    ));
    for words in [15u8, 6, 4, 0] {
        let mut syn = tcp_flags_frame((CLIENT_MAC, FRONT_MAC), (CLIENT, 40777), (VIP, 80), SYN);
        syn[34 + 12] = (words << 4) | (syn[34 + 12] & 0x0f);
        let (dropped, new_flow) = (fx.reason("drop_truncated_l4"), fx.reason("new_flow"));
        assert_frame(
            &format!("data offset {words}"),
            fx.run(&syn, fx.front_index),
            XDP_DROP,
            &syn,
        );
        assert_eq!(
            fx.reason("drop_truncated_l4"),
            dropped + 1,
            "offset {words}"
        );
        assert_eq!(fx.reason("new_flow"), new_flow, "offset {words}: no flow");
    }
    let flows = pinned_entries::<FlowEntry>(&fx, bpf_common::map_names::FLOWS);
    assert!(flows.is_empty(), "{flows:?}");
}

/// IPv4 options on a VIP flow are forwarded unchanged and counted as `seen_ip_options`.
#[test]
fn ip_options_on_a_vip_flow_are_forwarded_and_counted() {
    if !privileged() {
        return;
    }
    let mut fx = Fixture::new();
    let backends = &BACKENDS[..3];
    fx.apply(&service(ForwardingMode::Dsr, Protocol::Tcp, 80, backends));
    let with_options = |macs: ([u8; 6], [u8; 6])| {
        let mut tcp = TcpHeader::new(41500, 80, 1000, 64240);
        tcp.syn = true;
        let mut ip = ipv4(CLIENT, VIP, IpNumber::TCP, tcp.header_len());
        // Four bytes of options: NOP, NOP, NOP, end of list.
        ip.options = [1u8, 1, 1, 0].into();
        ip.total_len += 4;
        ip.header_checksum = ip.calc_header_checksum();
        tcp.checksum = tcp.calc_checksum_ipv4(&ip, &[]).expect("checksum");
        let mut frame = eth(macs.0, macs.1).to_bytes().to_vec();
        frame.extend_from_slice(&ip.to_bytes());
        frame.extend_from_slice(&tcp.to_bytes());
        frame
    };
    let backend = expected_backend(backends, 41500, 80, 6);
    let before = fx.reason("seen_ip_options");
    assert_frame(
        "SYN with IP options",
        fx.run(&with_options((CLIENT_MAC, FRONT_MAC)), fx.front_index),
        XDP_REDIRECT,
        &with_options((BACK_MAC, backend_mac(backend))),
    );
    assert_eq!(fx.reason("seen_ip_options"), before + 1);
    // Without options it does not move.
    let plain = tcp_flags_frame((CLIENT_MAC, FRONT_MAC), (CLIENT, 41501), (VIP, 80), SYN);
    assert_eq!(fx.run(&plain, fx.front_index).0, XDP_REDIRECT);
    assert_eq!(fx.reason("seen_ip_options"), before + 1);
}

/// A UDP datagram to a VIP whose length field runs past the end of the IP packet (or is below
/// the 8 header bytes) is cut short: dropped as `drop_truncated_l4`, no flow opened. One shorter
/// than the payload leaves padding and is forwarded.
#[test]
fn udp_length_past_the_packet_is_dropped_as_truncated() {
    if !privileged() {
        return;
    }
    let mut fx = Fixture::new();
    let backends = &BACKENDS[..3];
    fx.apply(&service(ForwardingMode::Dsr, Protocol::Udp, 53, backends));
    for len in [200u16, 7, 0] {
        let mut frame = udp_frame(
            (CLIENT_MAC, FRONT_MAC),
            (CLIENT, 40600),
            (VIP, 53),
            b"query",
        );
        frame[38..40].copy_from_slice(&len.to_be_bytes());
        let (dropped, new_flow) = (fx.reason("drop_truncated_l4"), fx.reason("new_flow"));
        assert_frame(
            &format!("UDP length {len}"),
            fx.run(&frame, fx.front_index),
            XDP_DROP,
            &frame,
        );
        assert_eq!(fx.reason("drop_truncated_l4"), dropped + 1, "length {len}");
        assert_eq!(fx.reason("new_flow"), new_flow, "length {len}: no flow");
    }
    let mut short = udp_frame(
        (CLIENT_MAC, FRONT_MAC),
        (CLIENT, 40601),
        (VIP, 53),
        b"query",
    );
    short[38..40].copy_from_slice(&10u16.to_be_bytes());
    assert_eq!(fx.run(&short, fx.front_index).0, XDP_REDIRECT);
}

#[test]
fn above_the_syn_flood_rate_dsr_syns_make_no_entry_and_keep_their_maglev_backend() {
    if !privileged() {
        return;
    }
    // BPF_PROG_TEST_RUN runs on the caller's CPU and the SYN-flood window is per CPU: a
    // migration between two runs would split the count.
    netns_tests::cpu::pin_here().expect("pin the test thread to its CPU");
    // Three new flows per second per CPU: the fourth new flow within a second is over the rate.
    const RATE: u64 = 3;
    let backends = &BACKENDS[..3];
    let dsr_frame = |port: u16, flags| {
        tcp_flags_frame((CLIENT_MAC, FRONT_MAC), (CLIENT, port), (VIP, 80), flags)
    };
    let forwarded = |port: u16, flags| {
        let backend = expected_backend(backends, port, 80, 6);
        tcp_flags_frame(
            (BACK_MAC, backend_mac(backend)),
            (CLIENT, port),
            (VIP, 80),
            flags,
        )
    };
    let has_entry = |fx: &Fixture, port: u16| {
        let (key, _) = canonical_key(
            addr16(CLIENT),
            port.to_be(),
            addr16(VIP),
            80u16.to_be(),
            6,
            2,
        );
        pinned_entries::<FlowEntry>(fx, bpf_common::map_names::FLOWS)
            .iter()
            .any(|(k, _)| *k == key)
    };
    // The whole sequence must fall within one window; on a machine too loaded for that, it is
    // run again with a fresh program (bounded).
    for attempt in 0..3 {
        let mut fx = Fixture::new_with(|_| {}, RATE);
        fx.apply(&service(ForwardingMode::Dsr, Protocol::Tcp, 80, backends));
        let started = std::time::Instant::now();
        // Below the rate: the normal path, one entry per SYN.
        let mut outputs = Vec::new();
        for port in 43000..43003 {
            outputs.push((port, SYN, fx.run(&dsr_frame(port, SYN), fx.front_index)));
        }
        let tracked: Vec<bool> = (43000..43003).map(|p| has_entry(&fx, p)).collect();
        let new_flows_below = fx.reason("new_flow");
        // Over it: forwarded to the same Maglev backend, with no entry.
        for port in 43003..43005 {
            outputs.push((port, SYN, fx.run(&dsr_frame(port, SYN), fx.front_index)));
        }
        let untracked: Vec<bool> = (43003..43005).map(|p| has_entry(&fx, p)).collect();
        let flood = fx.dataplane.stats().expect("stats").syn_flood;
        // The flow's first packet that is not a SYN makes its entry, on the same backend.
        outputs.push((43003, ACK, fx.run(&dsr_frame(43003, ACK), fx.front_index)));
        if started.elapsed() > std::time::Duration::from_millis(800) {
            eprintln!("attempt {attempt}: the sequence took more than one window; again");
            continue;
        }
        for (port, flags, got) in outputs {
            assert_frame(
                &format!("port {port} {flags:?}"),
                got,
                XDP_REDIRECT,
                &forwarded(port, flags),
            );
        }
        assert_eq!(tracked, [true; 3], "below the rate every SYN is tracked");
        assert_eq!(new_flows_below, 3);
        assert_eq!(untracked, [false; 2], "over the rate no SYN is tracked");
        assert_eq!(fx.reason("new_flow_untracked"), 2);
        assert_eq!(
            (flood.rate_per_cpu, flood.cpus_flooding, flood.entered),
            (RATE, 1, 1),
            "{flood:?}"
        );
        let (_, entry) = lb_flow(&fx, (CLIENT, 43003), (VIP, 80));
        let backend = expected_backend(backends, 43003, 80, 6);
        assert_eq!(entry.backend_id, u32::from(backend[3]) - 10);
        assert_ne!(entry.ct.flags & CT_F_ONE_WAY, 0);
        assert_eq!(
            fx.reason("new_flow"),
            4,
            "the ACK's entry is a tracked new flow"
        );

        // A window later the CPU is below the rate again: the next SYN is tracked.
        std::thread::sleep(std::time::Duration::from_millis(1100));
        assert_frame(
            "SYN after the window",
            fx.run(&dsr_frame(43010, SYN), fx.front_index),
            XDP_REDIRECT,
            &forwarded(43010, SYN),
        );
        assert!(has_entry(&fx, 43010));
        let flood = fx.dataplane.stats().expect("stats").syn_flood;
        assert_eq!((flood.cpus_flooding, flood.entered), (0, 1), "{flood:?}");

        // Full-NAT keeps an entry for every SYN even over the rate: its replies need them.
        let mut nat = Fixture::new_with(|_| {}, 1);
        nat.apply(&service(
            ForwardingMode::FullNat,
            Protocol::Tcp,
            80,
            backends,
        ));
        for port in 43020..43024 {
            let frame = tcp_flags_frame((CLIENT_MAC, FRONT_MAC), (CLIENT, port), (VIP, 80), SYN);
            assert_eq!(nat.run(&frame, nat.front_index).0, XDP_REDIRECT);
            assert!(has_entry(&nat, port), "full-NAT SYN {port} tracked");
        }
        assert_eq!(nat.reason("new_flow"), 4);
        assert_eq!(nat.reason("new_flow_untracked"), 0);
        return;
    }
    panic!("three attempts in a row took longer than the one-second window");
}
