//! Fixture tests of the TCX policy programs (`tc_ingress`, `tc_egress`) through
//! BPF_PROG_TEST_RUN on whole frames built with etherparse.
//!
//! Each test builds a private network namespace with one veth (`ep0`, the endpoint), starts
//! the real [`PolicyPlane`] (its maps pinned under a test-private root), attaches it to `ep0`
//! (TCX), applies a policy through the real `apply`, and runs frames "arriving on" or
//! "leaving through" `ep0` (the `__sk_buff` context names its ifindex). Verdicts, the
//! per-reason and per-rule counters and the conntrack table are checked.
//!
//! Needs root. Without it the tests are skipped, unless `DATAPATH_REQUIRE_PRIVILEGED=1`.

use std::{os::fd::AsFd as _, path::PathBuf, process::Command};

use aya::programs::{TestRun, TestRunOptions};
use bpf_common::ct::{CtEntry, CtKey, POLICY_DIR_EGRESS, POLICY_DIR_INGRESS};
use datapath::policy::{CtFilter, PolicyConfig, PolicyPlane, PolicySpec};
use etherparse::{
    EtherType, Ethernet2Header, Icmpv4Header, Icmpv4Type, IpNumber, Ipv4Header, TcpHeader,
    UdpHeader, icmpv4::DestUnreachableHeader,
};
use netns_tests::netns::EnteredNetns;

/// `TCX_NEXT` (-1) as the test run reports it.
const NEXT: u32 = u32::MAX;
/// `TCX_DROP`.
const DROP: u32 = 2;

const CLIENT: [u8; 4] = [198, 18, 0, 1];
const ENDPOINT: [u8; 4] = [198, 18, 0, 10];
const ROUTER: [u8; 4] = [198, 18, 0, 254];
const OUTSIDER: [u8; 4] = [198, 19, 7, 7];
const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const EP_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0a];

#[path = "tc_fixtures/ipv6.rs"]
mod ipv6;

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
        Self(EnteredNetns::create("dptc").unwrap_or_else(|e| panic!("{e:#}")))
    }

    fn name(&self) -> &str {
        self.0.name()
    }

    fn ip(&self, args: &[&str]) {
        self.0.ip(args).unwrap_or_else(|e| panic!("{e:#}"));
    }
}

struct Fixture {
    plane: Option<PolicyPlane>,
    ifindex: u32,
    pin_root: PathBuf,
    _netns: TestNetns,
}

const POLICY: &str = r#"
endpoints:
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
    egress:
      - name: out-web
        protocol: tcp
        ports: 80-443
        action: allow
"#;

impl Fixture {
    fn new(policy: &str) -> Self {
        Self::with_config(policy, 1024, 1_000)
    }

    /// A fixture whose `CT_FLOWS` holds `max_ct_flows` and whose programs send at most
    /// `event_rate` flow events per second and CPU.
    fn with_config(policy: &str, max_ct_flows: u32, event_rate: u64) -> Self {
        let netns = TestNetns::enter();
        for key in [
            "net.ipv6.conf.all.disable_ipv6=1",
            "net.ipv6.conf.default.disable_ipv6=1",
        ] {
            run(&["ip", "netns", "exec", netns.name(), "sysctl", "-qw", key]);
        }
        let ip = |args: &[&str]| netns.ip(args);
        ip(&[
            "link", "add", "ep0", "type", "veth", "peer", "name", "peer0",
        ]);
        ip(&["link", "set", "ep0", "up"]);
        ip(&["link", "set", "peer0", "up"]);
        let pin_root = PathBuf::from(format!("/sys/fs/bpf/{}", netns.name()));
        let config = PolicyConfig {
            pin_root: pin_root.clone(),
            max_ct_flows,
            event_rate,
        };
        let mut plane = PolicyPlane::start(&config).unwrap_or_else(|e| {
            let _ = datapath::dataplane::cleanup(&pin_root);
            panic!("start: {e}")
        });
        plane.attach("ep0").expect("attach ep0");
        let spec = PolicySpec::parse(policy).expect("policy");
        plane.apply(&spec).expect("apply");
        let c = std::ffi::CString::new("ep0").expect("name");
        // SAFETY: valid C string.
        let ifindex = unsafe { libc::if_nametoindex(c.as_ptr()) };
        Self {
            plane: Some(plane),
            ifindex,
            pin_root,
            _netns: netns,
        }
    }

    fn plane(&mut self) -> &mut PolicyPlane {
        self.plane.as_mut().expect("plane")
    }

    /// Runs one frame through the program of tc direction `dir` on `ep0`.
    fn run(&mut self, frame: &[u8], dir: u8) -> u32 {
        // struct __sk_buff (192 bytes); the kernel lets a test set `ifindex` (offset 40).
        let mut ctx = [0u8; 192];
        ctx[40..44].copy_from_slice(&self.ifindex.to_ne_bytes());
        let mut out = vec![0u8; frame.len() + 256];
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(frame);
        opts.data_out = Some(&mut out);
        opts.ctx_in = Some(&ctx);
        let program = self.plane().program(dir).expect("program");
        let result = program.test_run(opts).expect("BPF_PROG_TEST_RUN");
        out.truncate(result.data_size_out as usize);
        assert_eq!(out, frame, "the policy never rewrites a frame");
        result.return_value
    }

    fn ingress(&mut self, frame: &[u8]) -> u32 {
        self.run(frame, POLICY_DIR_INGRESS)
    }

    fn egress(&mut self, frame: &[u8]) -> u32 {
        self.run(frame, POLICY_DIR_EGRESS)
    }

    fn reason(&mut self, name: &str) -> u64 {
        self.plane().reasons().expect("reasons")[name]
    }

    fn rule_packets(&mut self, name: &str) -> u64 {
        let status = self.plane().status().expect("status");
        status
            .rules
            .iter()
            .find(|r| r.rule.name.as_deref() == Some(name))
            .unwrap_or_else(|| panic!("rule {name}"))
            .packets
    }

    fn flows(&mut self) -> Vec<datapath::policy::CtFlow> {
        self.plane()
            .ct_list(&CtFilter::default(), 0)
            .expect("ct list")
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        drop(self.plane.take());
        let _ = datapath::dataplane::cleanup(&self.pin_root);
    }
}

fn eth(src: [u8; 6], dst: [u8; 6]) -> Vec<u8> {
    Ethernet2Header {
        source: src,
        destination: dst,
        ether_type: EtherType::IPV4,
    }
    .to_bytes()
    .to_vec()
}

fn ipv4(src: [u8; 4], dst: [u8; 4], proto: IpNumber, payload_len: usize) -> Ipv4Header {
    let mut ip = Ipv4Header::new(payload_len as u16, 64, proto, src, dst).expect("ipv4");
    ip.identification = 0x1234;
    ip.dont_fragment = true;
    ip.header_checksum = ip.calc_header_checksum();
    ip
}

fn tcp(src: ([u8; 4], u16), dst: ([u8; 4], u16), syn: bool, ack: bool) -> Vec<u8> {
    let mut tcp = TcpHeader::new(src.1, dst.1, 1000, 64240);
    tcp.syn = syn;
    tcp.ack = ack;
    if ack {
        tcp.acknowledgment_number = 5000;
    }
    let ip = ipv4(src.0, dst.0, IpNumber::TCP, tcp.header_len());
    tcp.checksum = tcp.calc_checksum_ipv4(&ip, &[]).expect("tcp checksum");
    let mut frame = eth(CLIENT_MAC, EP_MAC);
    frame.extend_from_slice(&ip.to_bytes());
    frame.extend_from_slice(&tcp.to_bytes());
    frame
}

fn udp(src: ([u8; 4], u16), dst: ([u8; 4], u16), payload: &[u8]) -> Vec<u8> {
    let ip = ipv4(src.0, dst.0, IpNumber::UDP, 8 + payload.len());
    let udp = UdpHeader::with_ipv4_checksum(src.1, dst.1, &ip, payload).expect("udp");
    let mut frame = eth(CLIENT_MAC, EP_MAC);
    frame.extend_from_slice(&ip.to_bytes());
    frame.extend_from_slice(&udp.to_bytes());
    frame.extend_from_slice(payload);
    frame
}

/// An ICMP port-unreachable from `from` to `to`, quoting a TCP packet `quoted_src ->
/// quoted_dst` (IPv4 header + 8 bytes).
fn icmp_error(
    from: [u8; 4],
    to: [u8; 4],
    quoted_src: ([u8; 4], u16),
    quoted_dst: ([u8; 4], u16),
) -> Vec<u8> {
    let mut t = TcpHeader::new(quoted_src.1, quoted_dst.1, 1000, 64240);
    t.ack = true;
    let qip = ipv4(
        quoted_src.0,
        quoted_dst.0,
        IpNumber::TCP,
        t.header_len() + 100,
    );
    let mut quoted = qip.to_bytes().to_vec();
    quoted.extend_from_slice(&t.to_bytes()[..8]);
    let header = Icmpv4Header::with_checksum(
        Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::Port),
        &quoted,
    );
    let ip = ipv4(from, to, IpNumber::ICMP, header.header_len() + quoted.len());
    let mut frame = eth(CLIENT_MAC, EP_MAC);
    frame.extend_from_slice(&ip.to_bytes());
    frame.extend_from_slice(&header.to_bytes());
    frame.extend_from_slice(&quoted);
    frame
}

#[test]
fn allowed_new_flow_opens_a_tracked_entry() {
    if !privileged() {
        return;
    }
    let mut fx = Fixture::new(POLICY);
    let syn = tcp((CLIENT, 40000), (ENDPOINT, 8080), true, false);
    assert_eq!(fx.ingress(&syn), NEXT);
    assert_eq!(fx.reason("allow_rule"), 1);
    assert_eq!(fx.rule_packets("web"), 1);
    let flows = fx.flows();
    assert_eq!(flows.len(), 1, "{flows:?}");
    let f = &flows[0];
    assert_eq!(
        (f.protocol.as_str(), f.src.as_str(), f.src_port),
        ("tcp", "198.18.0.1", 40000)
    );
    assert_eq!((f.dst.as_str(), f.dst_port), ("198.18.0.10", 8080));
    assert_eq!(f.state, "SYN_SENT");
    assert_eq!((f.packets_orig, f.packets_reply), (1, 0));
    assert_eq!(f.bytes_orig, 40);
    assert_eq!(f.rule, Some(0));
    assert_eq!(f.policy_direction, "ingress");
    // A log rule admits too, and tracks the UDP flow.
    let dns = udp((CLIENT, 5353), (ENDPOINT, 53), b"query");
    assert_eq!(fx.ingress(&dns), NEXT);
    assert_eq!(fx.rule_packets("dns"), 1);
    assert_eq!(fx.flows().len(), 2);
    let status = fx.plane().status().expect("status");
    assert_eq!(status.endpoints[0].ingress.allowed, 2);
    assert_eq!(status.endpoints[0].interfaces, ["ep0"]);
}

#[test]
fn denied_flows_are_dropped_and_counted_against_their_rule() {
    if !privileged() {
        return;
    }
    let mut fx = Fixture::new(POLICY);
    // An explicit deny rule.
    let telnet = tcp((CLIENT, 40001), (ENDPOINT, 23), true, false);
    assert_eq!(fx.ingress(&telnet), DROP);
    assert_eq!(fx.reason("drop_rule"), 1);
    assert_eq!(fx.rule_packets("no-telnet"), 1);
    // No rule: the default action (deny).
    let ssh = tcp((CLIENT, 40002), (ENDPOINT, 22), true, false);
    assert_eq!(fx.ingress(&ssh), DROP);
    // The web rule's CIDR does not cover 198.19.0.0/16.
    let outsider = tcp((OUTSIDER, 40003), (ENDPOINT, 8080), true, false);
    assert_eq!(fx.ingress(&outsider), DROP);
    assert_eq!(fx.reason("drop_default"), 2);
    assert_eq!(fx.rule_packets("web"), 0);
    assert!(fx.flows().is_empty(), "denied packets track nothing");
    let status = fx.plane().status().expect("status");
    assert_eq!(status.endpoints[0].ingress.denied, 3);
    assert_eq!(status.endpoints[0].ingress.default_hits, 2);
    // Egress: 443 allowed, 8443 not.
    let out = tcp((ENDPOINT, 50000), (OUTSIDER, 443), true, false);
    assert_eq!(fx.egress(&out), NEXT);
    let out = tcp((ENDPOINT, 50001), (OUTSIDER, 8443), true, false);
    assert_eq!(fx.egress(&out), DROP);
    assert_eq!(fx.rule_packets("out-web"), 1);
}

#[test]
fn reply_of_an_allowed_flow_passes_through_conntrack() {
    if !privileged() {
        return;
    }
    let mut fx = Fixture::new(POLICY);
    let reply = tcp((ENDPOINT, 8080), (CLIENT, 40000), true, true);
    // Egress default is deny: without the tracked flow, the SYN+ACK is dropped.
    assert_eq!(fx.egress(&reply), DROP);
    let syn = tcp((CLIENT, 40000), (ENDPOINT, 8080), true, false);
    assert_eq!(fx.ingress(&syn), NEXT);
    assert_eq!(fx.egress(&reply), NEXT);
    assert_eq!(fx.reason("pass_reply"), 1);
    let ack = tcp((CLIENT, 40000), (ENDPOINT, 8080), false, true);
    assert_eq!(fx.ingress(&ack), NEXT);
    assert_eq!(fx.reason("pass_tracked"), 1);
    let flows = fx.flows();
    assert_eq!(flows.len(), 1);
    assert_eq!(flows[0].state, "ESTABLISHED");
    assert_eq!((flows[0].packets_orig, flows[0].packets_reply), (2, 1));
    // The outbound direction: the endpoint's allowed connection gets its replies.
    let out = tcp((ENDPOINT, 50000), (OUTSIDER, 443), true, false);
    assert_eq!(fx.egress(&out), NEXT);
    let back = tcp((OUTSIDER, 443), (ENDPOINT, 50000), true, true);
    assert_eq!(fx.ingress(&back), NEXT);
    assert_eq!(fx.reason("pass_reply"), 2);
}

#[test]
fn related_icmp_error_of_an_allowed_flow_passes() {
    if !privileged() {
        return;
    }
    let mut fx = Fixture::new(POLICY);
    // An error about a flow nobody opened: ingress default deny.
    let stray = icmp_error(ROUTER, ENDPOINT, (ENDPOINT, 50000), (OUTSIDER, 443));
    assert_eq!(fx.ingress(&stray), DROP);
    assert_eq!(fx.reason("drop_default"), 1);
    // The endpoint opens the flow; the router's error about it now passes.
    let out = tcp((ENDPOINT, 50000), (OUTSIDER, 443), true, false);
    assert_eq!(fx.egress(&out), NEXT);
    assert_eq!(fx.ingress(&stray), NEXT);
    assert_eq!(fx.reason("pass_related"), 1);
}

#[test]
fn truncated_frames_are_dropped_and_others_pass() {
    if !privileged() {
        return;
    }
    let mut fx = Fixture::new(POLICY);
    let syn = tcp((CLIENT, 40000), (ENDPOINT, 8080), true, false);
    // IPv4 header cut short, behind a VLAN tag (the kernel's test run itself refuses an
    // untagged IPv4 frame shorter than an IPv4 header).
    let mut tagged = syn[..12].to_vec();
    tagged.extend_from_slice(&[0x81, 0x00, 0x00, 0x07, 0x08, 0x00]);
    tagged.extend_from_slice(&syn[14..14 + 12]);
    assert_eq!(fx.ingress(&tagged), DROP);
    // TCP header cut short by the frame (the IP total length claims more).
    assert_eq!(fx.ingress(&syn[..14 + 20 + 10]), DROP);
    // TCP header cut short by the IP total length.
    let mut short = syn.clone();
    short[16..18].copy_from_slice(&30u16.to_be_bytes());
    assert_eq!(fx.ingress(&short), DROP);
    assert_eq!(fx.reason("drop_truncated"), 2);
    assert_eq!(fx.reason("drop_malformed"), 1);
    assert!(fx.flows().is_empty());
    // ARP (not IPv4) passes untouched.
    let mut arp = syn.clone();
    arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
    assert_eq!(fx.ingress(&arp), NEXT);
    assert_eq!(fx.reason("pass_not_ipv4"), 1);
}

#[test]
fn policy_change_cuts_a_flow_no_longer_allowed_and_keeps_the_others() {
    if !privileged() {
        return;
    }
    let mut fx = Fixture::new(POLICY);
    let web = tcp((CLIENT, 40000), (ENDPOINT, 8080), true, false);
    let dns = udp((CLIENT, 5353), (ENDPOINT, 53), b"q");
    assert_eq!(fx.ingress(&web), NEXT);
    assert_eq!(fx.ingress(&dns), NEXT);
    // The new policy drops the web rule.
    let without_web = POLICY.replace("ports: 8080", "ports: 8081");
    let spec = PolicySpec::parse(&without_web).expect("policy");
    let generation = fx.plane().apply(&spec).expect("apply");
    assert!(generation >= 2);
    let web_ack = tcp((CLIENT, 40000), (ENDPOINT, 8080), false, true);
    assert_eq!(fx.ingress(&web_ack), DROP);
    assert_eq!(fx.reason("drop_policy_changed"), 1);
    assert_eq!(fx.ingress(&dns), NEXT);
    assert_eq!(fx.reason("flow_rechecked"), 1);
    let flows = fx.flows();
    assert_eq!(flows.len(), 1, "{flows:?}");
    assert_eq!(flows[0].protocol, "udp");
    // The cut flow cannot come back mid-stream.
    assert_eq!(fx.ingress(&web_ack), DROP);
    let status = fx.plane().status().expect("status");
    assert_eq!(status.endpoints[0].ingress.cut, 1);
}

#[test]
fn invalid_policy_is_rejected_with_its_line_and_the_old_one_stays() {
    if !privileged() {
        return;
    }
    let mut fx = Fixture::new(POLICY);
    let bad = POLICY.replace("198.18.0.0/16", "198.18.0.0/40");
    let err = PolicySpec::parse(&bad).expect_err("invalid");
    let text = err.to_string();
    assert!(text.contains("line 8"), "{text}");
    assert!(text.contains("prefix length"), "{text}");
    let syn = tcp((CLIENT, 40000), (ENDPOINT, 8080), true, false);
    assert_eq!(fx.ingress(&syn), NEXT);
}

#[test]
fn sweep_expires_idle_flows_by_their_state_timeout_and_keeps_the_others() {
    if !privileged() {
        return;
    }
    let mut fx = Fixture::new(POLICY);
    let syn = tcp((CLIENT, 40000), (ENDPOINT, 8080), true, false);
    let syn_ack = tcp((ENDPOINT, 8080), (CLIENT, 40000), true, true);
    let ack = tcp((CLIENT, 40000), (ENDPOINT, 8080), false, true);
    for (frame, ingress) in [(&syn, true), (&syn_ack, false), (&ack, true)] {
        let verdict = if ingress {
            fx.ingress(frame)
        } else {
            fx.egress(frame)
        };
        assert_eq!(verdict, NEXT);
    }
    let dns = udp((CLIENT, 5353), (ENDPOINT, 53), b"q");
    assert_eq!(fx.ingress(&dns), NEXT);
    assert_eq!(fx.flows().len(), 2);
    // UDP times out at once, established TCP after an hour.
    let timeouts = conntrack::Timeouts {
        tcp_syn_ns: 0,
        tcp_established_ns: 3_600_000_000_000,
        tcp_closing_ns: 0,
        udp_ns: 0,
        other_ns: 0,
    };
    let now = datapath::gc::monotonic_now_ns() + 1;
    let expired = fx.plane().ct_sweep(&timeouts, now, 100).expect("sweep");
    assert_eq!(expired.len(), 1, "{expired:?}");
    assert_eq!(expired[0].0.proto, bpf_common::PROTO_UDP);
    let flows = fx.flows();
    assert_eq!(flows.len(), 1);
    assert_eq!(flows[0].state, "ESTABLISHED");
    // The deletion cap throttles a sweep.
    assert_eq!(fx.ingress(&dns), NEXT);
    let expired = fx
        .plane()
        .ct_sweep(&timeouts, datapath::gc::monotonic_now_ns() + 1, 0)
        .expect("sweep");
    assert!(expired.is_empty());
    assert_eq!(fx.flows().len(), 2);
}

/// A UDP conntrack entry from `CLIENT:sport` to `ENDPOINT:53`, last seen at `last_seen_ns`.
fn udp_ct_entry(sport: u16, last_seen_ns: u64) -> (CtKey, CtEntry) {
    let key = CtKey {
        addr_a: [u32::from_ne_bytes(CLIENT), 0, 0, 0],
        addr_b: [u32::from_ne_bytes(ENDPOINT), 0, 0, 0],
        port_a_be: sport.to_be(),
        port_b_be: 53u16.to_be(),
        proto: bpf_common::PROTO_UDP,
        family: bpf_common::FAMILY_IPV4,
        _pad: [0; 2],
    };
    let entry = CtEntry {
        created_ns: last_seen_ns,
        last_seen_ns,
        packets: [1, 0],
        bytes: [40, 0],
        rule_id: bpf_common::ct::RULE_DEFAULT,
        ..CtEntry::default()
    };
    (key, entry)
}

#[test]
fn batch_read_sees_every_flow_of_a_large_table_and_sweep_and_flush_keep_their_bounds() {
    if !privileged() {
        return;
    }
    // More entries than one BPF_MAP_LOOKUP_BATCH call returns (4096), so the walk resumes
    // from the kernel's token several times.
    const FLOWS: u16 = 20_000;
    const FIRST_PORT: u16 = 10_000;
    let mut fx = Fixture::with_config(POLICY, 32_768, 1_000);
    let pinned = aya::maps::MapData::from_pin(fx.pin_root.join("CT_FLOWS")).expect("CT_FLOWS");
    // Explicit clock values: even source ports were last seen at BASE (idle 5 s at the sweep's
    // `now`), odd ones "after" `now` (idle 0).
    const BASE: u64 = 1_000_000_000_000;
    const SECOND: u64 = 1_000_000_000;
    let now = BASE + 5 * SECOND;
    let entries: Vec<(CtKey, CtEntry)> = (0..FLOWS)
        .map(|i| {
            let seen = if i % 2 == 0 { BASE } else { now + SECOND };
            udp_ct_entry(FIRST_PORT + i, seen)
        })
        .collect();
    datapath::gc::update_all(pinned.fd().as_fd(), &entries).expect("fill CT_FLOWS");

    let read = fx.plane().ct_entries().expect("batch read");
    assert_eq!(read.len(), usize::from(FLOWS), "every entry, once");
    let mut ports: Vec<u16> = read
        .iter()
        .map(|(k, _)| u16::from_be(k.port_a_be))
        .collect();
    ports.sort_unstable();
    ports.dedup();
    assert_eq!(ports.len(), usize::from(FLOWS), "no entry read twice");
    assert_eq!(
        (ports[0], ports[ports.len() - 1]),
        (FIRST_PORT, FIRST_PORT + FLOWS - 1)
    );
    let (key, entry) = read
        .iter()
        .find(|(k, _)| u16::from_be(k.port_a_be) == FIRST_PORT + 1)
        .expect("port 10001");
    assert_eq!(*entry, entries[1].1, "values travel with their keys");
    assert_eq!(*key, entries[1].0);

    // UDP idles out after one second: the even half is expired. The cap bounds one sweep.
    let timeouts = conntrack::Timeouts {
        tcp_syn_ns: SECOND,
        tcp_established_ns: SECOND,
        tcp_closing_ns: SECOND,
        udp_ns: SECOND,
        other_ns: SECOND,
    };
    let expired = fx.plane().ct_sweep(&timeouts, now, 4_000).expect("sweep");
    assert_eq!(expired.len(), 4_000);
    assert!(
        expired
            .iter()
            .all(|(k, e)| u16::from_be(k.port_a_be) % 2 == 0 && e.last_seen_ns == BASE),
        "only idle flows expire"
    );
    assert_eq!(fx.plane().ct_entries().expect("read").len(), 16_000);
    let expired = fx.plane().ct_sweep(&timeouts, now, 100_000).expect("sweep");
    assert_eq!(expired.len(), 6_000, "the rest of the idle half");
    let left = fx.plane().ct_entries().expect("read");
    assert_eq!(left.len(), 10_000);
    assert!(left.iter().all(|(k, _)| u16::from_be(k.port_a_be) % 2 == 1));

    // Flush by filter, then everything.
    let one = CtFilter {
        port: Some(FIRST_PORT + 1),
        ..CtFilter::default()
    };
    assert_eq!(fx.plane().ct_flush(&one, now).expect("flush"), 1);
    assert_eq!(
        fx.plane()
            .ct_flush(&CtFilter::default(), now)
            .expect("flush"),
        9_999
    );
    assert!(fx.plane().ct_entries().expect("read").is_empty());
}

/// (packets, bytes) of every rule of the live policy, by name.
fn rule_counters(fx: &mut Fixture) -> std::collections::BTreeMap<String, (u64, u64)> {
    let status = fx.plane().status().expect("status");
    status
        .rules
        .iter()
        .map(|r| (r.rule.label(), (r.packets, r.bytes)))
        .collect()
}

/// (allowed, denied, default_hits) of the `ep*` endpoint's ingress.
fn ingress_counters(fx: &mut Fixture) -> (u64, u64, u64) {
    let status = fx.plane().status().expect("status");
    let c = &status.endpoints[0].ingress;
    (c.allowed, c.denied, c.default_hits)
}

#[test]
fn rule_and_endpoint_counters_keep_counting_across_applies() {
    if !privileged() {
        return;
    }
    let mut fx = Fixture::new(POLICY);
    let apply = |fx: &mut Fixture, text: &str| {
        let spec = PolicySpec::parse(text).expect("policy");
        fx.plane().apply(&spec).expect("apply")
    };
    let web = |port: u16| tcp((CLIENT, port), (ENDPOINT, 8080), true, false);
    let telnet = |port: u16| tcp((CLIENT, port), (ENDPOINT, 23), true, false);
    // A TCP SYN is 40 bytes of IP.
    const SYN: u64 = 40;
    assert_eq!(fx.ingress(&web(40000)), NEXT);
    assert_eq!(fx.ingress(&telnet(41000)), DROP);
    let rules = rule_counters(&mut fx);
    assert_eq!(rules["web"], (1, SYN));
    assert_eq!(rules["no-telnet"], (1, SYN));
    assert_eq!(ingress_counters(&mut fx), (1, 1, 0));

    // A changed policy that keeps `web` (wider ports) and moves it: a new rule comes first, so
    // `web` gets another rule id and other counter slots in the kernel.
    let changed = POLICY
        .replace(
            "    ingress:\n      - name: web\n",
            "    ingress:\n      - name: ssh\n        protocol: tcp\n        ports: 22\n        \
             action: allow\n      - name: web\n",
        )
        .replace("ports: 8080\n", "ports: 8080-8081\n");
    assert_ne!(changed, POLICY);
    apply(&mut fx, &changed);
    let status = fx.plane().status().expect("status");
    let web_rule = status
        .rules
        .iter()
        .find(|r| r.rule.name.as_deref() == Some("web"))
        .expect("web");
    assert_eq!(web_rule.rule.id, 1, "web moved to another counter slot");
    let rules = rule_counters(&mut fx);
    assert_eq!(rules["web"], (1, SYN), "not reset by the apply");
    assert_eq!(rules["no-telnet"], (1, SYN));
    assert_eq!(rules["ssh"], (0, 0), "a new rule starts at zero");
    assert_eq!(ingress_counters(&mut fx), (1, 1, 0));
    assert_eq!(fx.ingress(&web(40001)), NEXT);
    assert_eq!(
        fx.ingress(&tcp((CLIENT, 42000), (ENDPOINT, 22), true, false)),
        NEXT
    );
    let rules = rule_counters(&mut fx);
    assert_eq!(rules["web"], (2, 2 * SYN), "keeps counting");
    assert_eq!(rules["ssh"], (1, SYN));
    assert_eq!(ingress_counters(&mut fx), (3, 1, 0));

    // A second change, without `no-telnet`: the slot of the first generation is reused (its
    // counters are folded into the totals before it is zeroed).
    let without_telnet = changed.replace(
        "      - name: no-telnet\n        protocol: tcp\n        ports: 23\n        action: deny\n",
        "",
    );
    assert_ne!(without_telnet, changed);
    apply(&mut fx, &without_telnet);
    let rules = rule_counters(&mut fx);
    assert_eq!(rules["web"], (2, 2 * SYN));
    assert!(!rules.contains_key("no-telnet"));
    assert_eq!(ingress_counters(&mut fx), (3, 1, 0));
    assert_eq!(fx.ingress(&web(40002)), NEXT);
    // Telnet now meets the default action (deny).
    assert_eq!(fx.ingress(&telnet(41001)), DROP);
    assert_eq!(rule_counters(&mut fx)["web"], (3, 3 * SYN));
    assert_eq!(ingress_counters(&mut fx), (4, 2, 1));

    // Delete, then the original policy again: `no-telnet` comes back with its total, `web`
    // goes back to rule id 0 and keeps its own.
    fx.plane().delete().expect("delete");
    assert!(rule_counters(&mut fx).is_empty());
    apply(&mut fx, POLICY);
    let rules = rule_counters(&mut fx);
    assert_eq!(rules["web"], (3, 3 * SYN));
    assert_eq!(rules["no-telnet"], (1, SYN));
    assert_eq!(ingress_counters(&mut fx), (4, 2, 1));
    assert_eq!(fx.ingress(&telnet(41002)), DROP);
    assert_eq!(rule_counters(&mut fx)["no-telnet"], (2, 2 * SYN));

    // Attaching another interface rewrites the policy into the other slot (a flip) too.
    fx._netns.ip(&[
        "link", "add", "ep1", "type", "veth", "peer", "name", "peer1",
    ]);
    let before = fx.plane().generation().expect("generation");
    fx.plane().attach("ep1").expect("attach ep1");
    assert!(fx.plane().generation().expect("generation") > before);
    let rules = rule_counters(&mut fx);
    assert_eq!(rules["web"], (3, 3 * SYN));
    assert_eq!(rules["no-telnet"], (2, 2 * SYN));
    assert_eq!(ingress_counters(&mut fx), (4, 3, 1));
    assert_eq!(fx.ingress(&web(40003)), NEXT);
    assert_eq!(rule_counters(&mut fx)["web"], (4, 4 * SYN));
    assert_eq!(ingress_counters(&mut fx), (5, 3, 1));
}

/// Every flow event waiting in the ring, oldest first (at most `max`).
fn drain_events(
    ring: &mut aya::maps::RingBuf<aya::maps::MapData>,
    max: usize,
) -> Vec<bpf_common::policy::FlowEvent> {
    let mut events = Vec::new();
    for _ in 0..max {
        let Some(item) = ring.next() else {
            break;
        };
        assert_eq!(
            item.len(),
            std::mem::size_of::<bpf_common::policy::FlowEvent>(),
            "one FlowEvent per record"
        );
        // SAFETY: the record holds one FlowEvent, a plain-old-data struct.
        events.push(unsafe {
            std::ptr::read_unaligned(item.as_ptr().cast::<bpf_common::policy::FlowEvent>())
        });
    }
    events
}

/// A SYN from `CLIENT:port` to `ENDPOINT:22`: a new flow the ingress default denies, which
/// sends exactly one `denied` event and tracks nothing (so the same count of events arises
/// whatever the conntrack holds).
fn denied_syn(port: u16) -> Vec<u8> {
    tcp((CLIENT, port), (ENDPOINT, 22), true, false)
}

/// The client source port of a flow event.
fn event_src_port(e: &bpf_common::policy::FlowEvent) -> u16 {
    datapath::policy::original_tuple(&e.key, e.orig_side).1
}

#[test]
fn events_over_the_rate_limit_are_counted_not_silently_lost() {
    if !privileged() {
        return;
    }
    // Every BPF_PROG_TEST_RUN meets the same per-CPU token bucket (`TC_EVENT_RATE`).
    netns_tests::cpu::pin_here().expect("pin the test thread to its CPU");
    const RATE: u64 = 10;
    const FLOWS: u16 = 200;
    const FIRST_PORT: u16 = 20_000;
    let mut fx = Fixture::with_config(POLICY, 1024, RATE);
    let mut ring = fx.plane().take_events().expect("TC_EVENTS");
    let started = std::time::Instant::now();
    for i in 0..FLOWS {
        assert_eq!(fx.ingress(&denied_syn(FIRST_PORT + i)), DROP);
    }
    let elapsed = started.elapsed();
    // Nothing has read the ring meanwhile.
    let events = drain_events(&mut ring, usize::from(FLOWS) + 16);
    let delivered = events.len() as u64;
    let rate_limited = fx.reason("event_rate_limited");
    let ring_full = fx.reason("event_lost");
    assert_eq!(fx.reason("drop_default"), u64::from(FLOWS));
    assert_eq!(
        delivered + rate_limited + ring_full,
        u64::from(FLOWS),
        "every event generated is delivered or counted as lost \
         (delivered {delivered}, rate_limited {rate_limited}, ring_full {ring_full})"
    );
    assert_eq!(ring_full, 0, "the ring had room for all of them");
    // The bucket starts full (a burst of RATE), then refills at RATE per second: the bound
    // grows with the time the loop took, it is not a timing threshold.
    let refill = (elapsed.as_nanos() * u128::from(RATE)).div_ceil(1_000_000_000) as u64;
    assert!(
        (RATE..=RATE + refill).contains(&delivered),
        "delivered {delivered}: a burst of {RATE} plus at most {refill} refilled in {elapsed:?}"
    );
    assert!(rate_limited >= u64::from(FLOWS) - RATE - refill);
    // The burst is the first flows, in order, each a `denied` event.
    for (i, e) in events.iter().take(RATE as usize).enumerate() {
        assert_eq!(e.kind, bpf_common::policy::EVENT_DENIED);
        assert_eq!(event_src_port(e), FIRST_PORT + i as u16);
    }
}

#[test]
fn events_that_find_the_ring_full_are_counted_not_silently_lost() {
    if !privileged() {
        return;
    }
    // Every BPF_PROG_TEST_RUN meets the same per-CPU token bucket (`TC_EVENT_RATE`).
    netns_tests::cpu::pin_here().expect("pin the test thread to its CPU");
    // The programs cap the rate at 1e6 per second: the bucket's burst is far more than the
    // ring holds, so only the ring limits here.
    let mut fx = Fixture::with_config(POLICY, 1024, 1_000_000);
    let mut ring = fx.plane().take_events().expect("TC_EVENTS");
    // A ring buffer record is an 8-byte header plus the event, rounded up to 8 bytes; a
    // reservation fails once it would not fit the ring's bytes.
    let record = (8 + std::mem::size_of::<bpf_common::policy::FlowEvent>()).next_multiple_of(8);
    let capacity = bpf_common::policy::defaults::EVENTS_BYTES as usize / record;
    let flows = capacity + 500;
    const FIRST_PORT: u16 = 10_000;
    for i in 0..flows {
        assert_eq!(fx.ingress(&denied_syn(FIRST_PORT + i as u16)), DROP);
    }
    let events = drain_events(&mut ring, flows + 16);
    let delivered = events.len() as u64;
    let rate_limited = fx.reason("event_rate_limited");
    let ring_full = fx.reason("event_lost");
    assert_eq!(
        delivered + rate_limited + ring_full,
        flows as u64,
        "every event generated is delivered or counted as lost \
         (delivered {delivered}, rate_limited {rate_limited}, ring_full {ring_full})"
    );
    assert_eq!(rate_limited, 0);
    assert_eq!(
        delivered, capacity as u64,
        "the ring holds {capacity} events"
    );
    assert_eq!(ring_full, (flows - capacity) as u64);
    // The ring keeps the oldest: the first `capacity` flows, in order.
    for (i, e) in events.iter().enumerate() {
        assert_eq!(e.kind, bpf_common::policy::EVENT_DENIED);
        assert_eq!(event_src_port(e), FIRST_PORT + i as u16);
    }
    // Once read, the ring takes events again; the loss count stays where it was.
    const MORE: u16 = 10;
    let next_port = FIRST_PORT + flows as u16;
    for i in 0..MORE {
        assert_eq!(fx.ingress(&denied_syn(next_port + i)), DROP);
    }
    let events = drain_events(&mut ring, usize::from(MORE) + 16);
    assert_eq!(events.len(), usize::from(MORE));
    assert_eq!(event_src_port(&events[0]), next_port);
    assert_eq!(fx.reason("event_lost"), (flows - capacity) as u64);
}

#[test]
fn a_restarted_plane_reuses_every_pinned_map_of_its_own_layout() {
    if !privileged() {
        return;
    }
    let mut fx = Fixture::new(POLICY);
    // Map id of every pinned map (the links live in their own directory).
    let ids = |root: &std::path::Path| -> Vec<(String, u32)> {
        let mut ids: Vec<(String, u32)> = std::fs::read_dir(root)
            .expect("list the pin root")
            .map(|e| e.expect("entry").path())
            .filter(|p| p.is_file())
            .map(|p| {
                let map = aya::maps::MapData::from_pin(&p).expect("open pin");
                let id = datapath::gc::map_layout(map.fd().as_fd())
                    .expect("map info")
                    .id;
                (p.file_name().unwrap().to_string_lossy().into_owned(), id)
            })
            .collect();
        ids.sort();
        ids
    };
    let before = ids(&fx.pin_root);
    assert!(
        before.iter().any(|(name, _)| name == "CT_FLOWS"),
        "{before:?}"
    );
    // A daemon restart: the plane goes, a new one loads the same object on the same pins. The
    // layout check must find every pin compatible and replace none.
    drop(fx.plane.take());
    let plane = PolicyPlane::start(&PolicyConfig {
        pin_root: fx.pin_root.clone(),
        max_ct_flows: 1024,
        event_rate: 1_000,
    })
    .expect("restart");
    fx.plane = Some(plane);
    assert_eq!(ids(&fx.pin_root), before);
}

/// A TCP segment of `payload` bytes (ACK set), checksummed.
fn tcp_data(src: ([u8; 4], u16), dst: ([u8; 4], u16), payload: &[u8]) -> Vec<u8> {
    let mut tcp = TcpHeader::new(src.1, dst.1, 1000, 64240);
    tcp.ack = true;
    tcp.psh = true;
    tcp.acknowledgment_number = 5000;
    let ip = ipv4(
        src.0,
        dst.0,
        IpNumber::TCP,
        tcp.header_len() + payload.len(),
    );
    tcp.checksum = tcp.calc_checksum_ipv4(&ip, payload).expect("tcp checksum");
    let mut frame = eth(CLIENT_MAC, EP_MAC);
    frame.extend_from_slice(&ip.to_bytes());
    frame.extend_from_slice(&tcp.to_bytes());
    frame.extend_from_slice(payload);
    frame
}

/// A SYN whose TCP data offset points past the end of the segment (15 words, 20 bytes on the
/// wire) has a header cut short: dropped as `drop_truncated`, nothing tracked.
#[test]
fn tcp_data_offset_past_the_segment_is_dropped_as_truncated() {
    if !privileged() {
        return;
    }
    let mut fx = Fixture::new(POLICY);
    for (n, words) in [15u8, 6, 4, 0].into_iter().enumerate() {
        let mut syn = tcp((CLIENT, 40100), (ENDPOINT, 8080), true, false);
        syn[34 + 12] = (words << 4) | (syn[34 + 12] & 0x0f);
        assert_eq!(fx.ingress(&syn), DROP, "data offset {words}");
        assert_eq!(fx.reason("drop_truncated"), n as u64 + 1);
    }
    assert_eq!(fx.reason("allow_rule"), 0);
    assert!(fx.flows().is_empty());
}

/// `SOL_PACKET` options (linux/if_packet.h).
const SOL_PACKET: libc::c_int = 263;
const PACKET_VNET_HDR: libc::c_int = 15;

/// Sends `frame` out of `ifname` through an AF_PACKET socket, so the kernel's egress path (and
/// the TCX egress program) sees it. With `linear = Some(n)` the socket's virtio-net header asks
/// for an skb whose linear area holds only the first `n` bytes, the rest in page fragments: the
/// shape scatter-gather and GRO give real traffic. (BPF_PROG_TEST_RUN on this kernel builds only
/// linear skbs: it refuses a `data_end` below the frame's length, so this is the way to hand the
/// program a non-linear one.) The kernel pages an skb only from a page's worth of data, so the
/// frame must be longer than 4 KiB, and the interface's MTU must allow it. Even without the
/// header the linear area holds only the link-layer header. Returns whether the packet left
/// (false: the egress path dropped it).
fn send_packet(ifname: &str, frame: &[u8], linear: Option<u16>) -> bool {
    // SAFETY: plain socket calls on a descriptor this function owns; buffers outlive the calls.
    unsafe {
        let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
        assert!(
            fd >= 0,
            "AF_PACKET socket: {}",
            std::io::Error::last_os_error()
        );
        let one: libc::c_int = 1;
        let mut buf = Vec::new();
        if let Some(linear) = linear {
            let rc = libc::setsockopt(
                fd,
                SOL_PACKET,
                PACKET_VNET_HDR,
                (&one as *const libc::c_int).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            );
            assert_eq!(
                rc,
                0,
                "PACKET_VNET_HDR: {}",
                std::io::Error::last_os_error()
            );
            // struct virtio_net_hdr: flags, gso_type (none), hdr_len, gso_size, csum_start,
            // csum_offset. No offloads asked for: only the linear size.
            buf.extend_from_slice(&[0, 0]);
            buf.extend_from_slice(&linear.to_ne_bytes());
            buf.extend_from_slice(&[0u8; 6]);
        }
        buf.extend_from_slice(frame);
        let name = std::ffi::CString::new(ifname).expect("name");
        let mut addr: libc::sockaddr_ll = std::mem::zeroed();
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = (libc::ETH_P_IP as u16).to_be();
        addr.sll_ifindex = libc::if_nametoindex(name.as_ptr()) as i32;
        addr.sll_halen = 6;
        addr.sll_addr[..6].copy_from_slice(&frame[..6]);
        let sent = libc::sendto(
            fd,
            buf.as_ptr().cast(),
            buf.len(),
            0,
            (&addr as *const libc::sockaddr_ll).cast(),
            size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        );
        let err = std::io::Error::last_os_error();
        libc::close(fd);
        // A packet the egress program drops comes back as NET_XMIT_DROP: ENOBUFS.
        if sent < 0 && err.raw_os_error() == Some(libc::ENOBUFS) {
            return false;
        }
        assert_eq!(sent, buf.len() as isize, "sendto {ifname}: {err}");
        true
    }
}

/// Non-linear skbs get the verdicts of the same packets linear: a tracked flow's large segments
/// pass, an untracked flow's are denied by the policy, and a packet whose IP total length runs
/// past the skb's real length is still malformed. (Before the parser judged lengths against
/// `skb->len`, every non-linear segment was dropped as `drop_malformed`.)
#[test]
fn non_linear_skbs_get_the_verdicts_of_linear_ones() {
    if !privileged() {
        return;
    }
    let mut fx = Fixture::new(POLICY);
    for dev in ["ep0", "peer0"] {
        fx._netns.ip(&["link", "set", dev, "mtu", "9000"]);
    }
    // The endpoint opens an allowed connection (egress 443) and one that is not (8443).
    let syn = tcp((ENDPOINT, 50000), (OUTSIDER, 443), true, false);
    assert_eq!(fx.egress(&syn), NEXT);
    let payload = vec![0x5au8; 6000];
    let allowed = tcp_data((ENDPOINT, 50000), (OUTSIDER, 443), &payload);
    let denied = tcp_data((ENDPOINT, 50001), (OUTSIDER, 8443), &payload);
    let mut too_long = allowed.clone();
    let claimed = u16::from_be_bytes([too_long[16], too_long[17]]) + 1;
    too_long[16..18].copy_from_slice(&claimed.to_be_bytes());
    let mut ip = Ipv4Header::from_slice(&too_long[14..]).expect("ip").0;
    ip.header_checksum = ip.calc_header_checksum();
    too_long[14..34].copy_from_slice(&ip.to_bytes());

    let cases: [(&str, &[u8], &str); 3] = [
        ("tracked segment", &allowed, "pass_tracked"),
        ("untracked segment", &denied, "drop_default"),
        ("total length past the packet", &too_long, "drop_malformed"),
    ];
    for linear in [None, Some(54), Some(64), Some(200)] {
        for (what, frame, counter) in cases {
            let before = fx.plane().reasons().expect("reasons");
            let sent = send_packet("ep0", frame, linear);
            let after = fx.plane().reasons().expect("reasons");
            let moved: Vec<(&String, u64)> = after
                .iter()
                .filter(|(k, v)| before[*k] != **v)
                .map(|(k, v)| (k, v - before[k]))
                .collect();
            assert_eq!(
                moved,
                vec![(&counter.to_string(), 1)],
                "{what}, linear part {linear:?}: exactly {counter} moved"
            );
            assert_eq!(sent, !counter.starts_with("drop_"), "{what}: sent");
        }
    }
    let flows = fx.flows();
    let flow = flows
        .iter()
        .find(|f| f.dst_port == 443)
        .expect("the 443 flow");
    assert_eq!(flow.packets_orig, 1 + 4, "{flow:?}");
}
