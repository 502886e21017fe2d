//! Fixture tests of the DNS capture programs (`dns_ingress`, `dns_egress`) through
//! BPF_PROG_TEST_RUN on whole frames built with etherparse. The real `DnsPlane` loads them
//! (not attached anywhere: a test run needs no interface). Checked for every frame: the
//! verdict (always `TCX_NEXT`), the frame after the run (unchanged), the counters, and the
//! ring record (the header's fields and the frame's bytes up to the snap length).
//!
//! Needs root. Without it the tests are skipped, unless `DATAPATH_REQUIRE_PRIVILEGED=1`.

use std::collections::BTreeMap;

use aya::programs::{TestRun as _, TestRunOptions};
use bpf_common::dns::{DIR_EGRESS, DIR_INGRESS, DnsCaptureMeta};
use datapath::{
    config::DnsSettings,
    dns::plane::{DnsPlane, PROGRAM_EGRESS, PROGRAM_INGRESS, Ring},
};
use etherparse::{IpNumber, Ipv6Header, PacketBuilder, UdpHeader};

/// `TCX_NEXT` (-1) as the test run reports it.
const NEXT: u32 = u32::MAX;
const CLIENT: [u8; 4] = [198, 18, 0, 1];
const RESOLVER: [u8; 4] = [198, 18, 1, 11];
const CLIENT6: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
const RESOLVER6: [u8; 16] = [
    0x20, 0x01, 0x0d, 0xb8, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x11,
];
const MAC_A: [u8; 6] = [2, 0, 0, 0, 0, 1];
const MAC_B: [u8; 6] = [2, 0, 0, 0, 1, 11];

fn privileged() -> bool {
    netns_tests::privilege::privileged_as_root("BPF_PROG_TEST_RUN of the DNS capture")
}

fn plane(capture_rate: u64, snap_bytes: u32) -> (DnsPlane, Ring) {
    let settings = DnsSettings {
        enabled: true,
        capture_rate,
        snap_bytes,
        ..DnsSettings::default()
    };
    DnsPlane::start(&settings).unwrap_or_else(|e| panic!("load the capture: {e}"))
}

/// A DNS answer's bytes (its content does not matter to the capture).
fn answer(len: usize) -> Vec<u8> {
    let mut m = vec![0x12, 0x34, 0x81, 0x80, 0, 1, 0, 1, 0, 0, 0, 0];
    m.resize(len.max(12), 0xab);
    m
}

fn udp4(src_port: u16, dst_port: u16, payload: &[u8]) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(MAC_B, MAC_A)
        .ipv4(RESOLVER, CLIENT, 64)
        .udp(src_port, dst_port);
    let mut out = Vec::new();
    b.write(&mut out, payload).unwrap();
    out
}

fn udp4_vlan(payload: &[u8]) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(MAC_B, MAC_A)
        .single_vlan(7.try_into().unwrap())
        .ipv4(RESOLVER, CLIENT, 64)
        .udp(53, 40_000);
    let mut out = Vec::new();
    b.write(&mut out, payload).unwrap();
    out
}

fn tcp4(src_port: u16, payload: &[u8]) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(MAC_B, MAC_A)
        .ipv4(RESOLVER, CLIENT, 64)
        .tcp(src_port, 40_000, 1000, 64_000)
        .ack(1)
        .psh();
    let mut out = Vec::new();
    b.write(&mut out, payload).unwrap();
    out
}

fn udp6(payload: &[u8]) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(MAC_B, MAC_A)
        .ipv6(RESOLVER6, CLIENT6, 64)
        .udp(53, 40_000);
    let mut out = Vec::new();
    b.write(&mut out, payload).unwrap();
    out
}

/// IPv6 with a hop-by-hop options header (8 bytes of padding) before UDP.
fn udp6_hop_by_hop(payload: &[u8]) -> Vec<u8> {
    let udp = UdpHeader::with_ipv6_checksum(53, 40_000, &ip6(0, 8), payload).unwrap();
    let mut out = Vec::new();
    out.extend(MAC_A);
    out.extend(MAC_B);
    out.extend([0x86, 0xdd]);
    ip6(0, 8 + 8 + payload.len()).write(&mut out).unwrap();
    // Next header UDP, length 0 (8 bytes), a PadN option filling them.
    out.extend([17, 0, 1, 4, 0, 0, 0, 0]);
    out.extend(udp.to_bytes());
    out.extend(payload);
    out
}

fn ip6(next: u8, payload_length: usize) -> Ipv6Header {
    Ipv6Header {
        traffic_class: 0,
        flow_label: Default::default(),
        payload_length: payload_length as u16,
        next_header: IpNumber(next),
        hop_limit: 64,
        source: RESOLVER6,
        destination: CLIENT6,
    }
}

/// A later fragment of an IPv4 datagram (offset 185 * 8), protocol UDP.
fn ipv4_later_fragment() -> Vec<u8> {
    let mut f = udp4(53, 40_000, &answer(100));
    f[20] = 0x00;
    f[21] = 185;
    // The header checksum is not the capture's business; leave it.
    f
}

fn arp() -> Vec<u8> {
    let mut f = Vec::new();
    f.extend([0xff; 6]);
    f.extend(MAC_A);
    f.extend([0x08, 0x06]);
    f.extend([0, 1, 8, 0, 6, 4, 0, 1]);
    f.extend(MAC_A);
    f.extend(CLIENT);
    f.extend([0; 6]);
    f.extend(RESOLVER);
    f
}

/// Runs `prog` on `frame`: the verdict, and whether the frame came out unchanged.
fn run(plane: &DnsPlane, prog: &str, frame: &[u8], repeat: u32) -> (u32, Vec<u8>) {
    let mut out = vec![0u8; frame.len() + 64];
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(frame);
    opts.data_out = Some(&mut out);
    opts.repeat = repeat;
    let r = plane
        .program(prog)
        .unwrap()
        .test_run(opts)
        .unwrap_or_else(|e| panic!("test run of {prog} on {} bytes: {e:?}", frame.len()));
    out.truncate(r.data_size_out as usize);
    (r.return_value, out)
}

fn records(ring: &mut Ring) -> Vec<(DnsCaptureMeta, Vec<u8>)> {
    let meta_len = std::mem::size_of::<DnsCaptureMeta>();
    let mut out = Vec::new();
    while let Some(item) = ring.next() {
        assert!(item.len() >= meta_len, "short record");
        // SAFETY: a POD of the ABI, read unaligned from a record at least its size.
        let meta: DnsCaptureMeta = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
        out.push((meta, item[meta_len..].to_vec()));
    }
    out
}

fn delta(before: &BTreeMap<&str, u64>, after: &BTreeMap<&str, u64>) -> BTreeMap<String, u64> {
    after
        .iter()
        .filter_map(|(k, v)| {
            let d = v - before.get(k).copied().unwrap_or(0);
            (d > 0).then(|| (k.to_string(), d))
        })
        .collect()
}

fn counts(pairs: &[(&str, u64)]) -> BTreeMap<String, u64> {
    pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
}

#[test]
fn answers_are_copied_whole_and_everything_else_passes_untouched() {
    if !privileged() {
        return;
    }
    let (plane, mut ring) = plane(1_000_000, 512);
    let long = udp4(53, 40_000, &answer(900));
    let cases: Vec<(&str, Vec<u8>, bool)> = vec![
        ("udp4 answer", udp4(53, 40_000, &answer(60)), true),
        ("udp4 query (to 53)", udp4(40_000, 53, &answer(40)), false),
        (
            "udp4 from 53, shorter than a DNS header",
            udp4(53, 40_000, &[0; 8]),
            false,
        ),
        ("udp4 answer in a VLAN", udp4_vlan(&answer(60)), true),
        ("tcp4 answer segment", tcp4(53, &answer(80)), true),
        ("tcp4 ack without payload", tcp4(53, &[]), false),
        ("tcp4 from another port", tcp4(8080, &answer(80)), false),
        ("udp6 answer", udp6(&answer(60)), true),
        (
            "udp6 answer after hop-by-hop",
            udp6_hop_by_hop(&answer(60)),
            true,
        ),
        ("ipv4 later fragment", ipv4_later_fragment(), false),
        ("arp", arp(), false),
        // BPF_PROG_TEST_RUN refuses an IPv4 frame shorter than its IPv4 header, so the
        // shortest is a cut UDP header.
        (
            "udp header cut",
            udp4(53, 40_000, &answer(60))[..36].to_vec(),
            false,
        ),
    ];
    for prog in [PROGRAM_INGRESS, PROGRAM_EGRESS] {
        let direction = if prog == PROGRAM_INGRESS {
            DIR_INGRESS
        } else {
            DIR_EGRESS
        };
        for (name, frame, captured) in &cases {
            let before = plane.reasons().unwrap();
            let (verdict, out) = run(&plane, prog, frame, 1);
            assert_eq!(verdict, NEXT, "{prog} {name}: the capture never decides");
            assert_eq!(&out, frame, "{prog} {name}: the frame is left as it was");
            let got = records(&mut ring);
            let d = delta(&before, &plane.reasons().unwrap());
            if *captured {
                assert_eq!(d, counts(&[("captured", 1)]), "{prog} {name}");
                assert_eq!(got.len(), 1, "{prog} {name}");
                let (meta, bytes) = &got[0];
                assert_eq!(bytes, frame, "{prog} {name}: the record is the whole frame");
                assert_eq!(meta.packet_len as usize, frame.len());
                assert_eq!(meta.captured_len as usize, frame.len());
                assert_eq!(meta.direction, direction);
                assert!(meta.ts_ns > 0);
            } else {
                assert!(d.is_empty(), "{prog} {name}: counted {d:?}");
                assert!(got.is_empty(), "{prog} {name}: sent {} records", got.len());
            }
        }
    }

    // Longer than the snap length: its first 512 bytes, counted as cut.
    let before = plane.reasons().unwrap();
    let (verdict, out) = run(&plane, PROGRAM_INGRESS, &long, 1);
    assert_eq!((verdict, &out), (NEXT, &long));
    let got = records(&mut ring);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].1, long[..512]);
    assert_eq!(got[0].0.packet_len as usize, long.len());
    assert_eq!(got[0].0.captured_len, 512);
    assert_eq!(
        delta(&before, &plane.reasons().unwrap()),
        counts(&[("captured", 1), ("snap_cut", 1)])
    );
}

#[test]
fn answers_over_the_rate_are_counted_not_sent() {
    if !privileged() {
        return;
    }
    // A bucket of 3 a second: a burst of 10 sends 3 (the bucket starts full after its first
    // second; the test runs well within one).
    let (plane, mut ring) = plane(3, 4096);
    let frame = udp4(53, 40_000, &answer(60));
    let before = plane.reasons().unwrap();
    let (verdict, _) = run(&plane, PROGRAM_INGRESS, &frame, 10);
    assert_eq!(verdict, NEXT);
    let d = delta(&before, &plane.reasons().unwrap());
    let sent = records(&mut ring).len() as u64;
    assert_eq!(d.get("captured").copied().unwrap_or(0), sent);
    assert_eq!(
        sent + d.get("rate_limited").copied().unwrap_or(0),
        10,
        "{d:?}"
    );
    assert_eq!(sent, 3, "a burst of the rate, then nothing: {d:?}");
}
