//! The per-frame checks.
//!
//! Every frame, whatever it is:
//!
//! - the return code is a legal verdict (never `XDP_ABORTED`; for tc `TCX_NEXT`, `TCX_PASS`
//!   or `TCX_DROP`);
//! - exactly one verdict reason (`is_verdict`) rose, by exactly 1, no counter went down, and
//!   no event reason rose by more than 1;
//! - the verdict agrees with the reason's name: `drop_*` drops, `pass_*`/`allow_*` pass,
//!   `fwd_tx` is `XDP_TX`, `fwd_redirect` is `XDP_REDIRECT`;
//! - a frame the documentation says passes untouched is untouched, and the tc programs never
//!   change a frame.
//!
//! Every frame the load balancer forwards (`XDP_TX`, `XDP_REDIRECT`) or changes: the output
//! has the input's length, parses with etherparse, differs from the input only in the fields
//! a rewrite may touch (MACs, addresses, ports, checksums, an ICMP quote's addresses, ports and
//! checksums), a forwarded frame carries one of the node's MACs as source and a neighbour's
//! as destination, and its checksums (IPv4 header, TCP/UDP/ICMP, and the quoted IPv4 header
//! and UDP header of an ICMP error) are valid - or, when the input's already were not, wrong
//! by exactly the same amount (an incremental update keeps an error; it must never create
//! one). A UDP checksum of 0 ("none") stays 0 and is never produced from a non-zero one.

use etherparse::{NetSlice, SlicedPacket, TransportSlice, checksum::Sum16BitWords};
use serde::Serialize;

use super::frames::{Layout, PROTO_ICMP, PROTO_TCP, PROTO_UDP, pseudo_header, residual};

pub const XDP_ABORTED: u32 = 0;
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;
pub const XDP_REDIRECT: u32 = 4;
/// `TCX_NEXT` (-1) as the test run reports it.
pub const TCX_NEXT: u32 = u32::MAX;
pub const TCX_PASS: u32 = 0;
pub const TCX_DROP: u32 = 2;

/// A program under test.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Program {
    #[serde(rename = "xdp_lb")]
    Xdp,
    #[serde(rename = "tc_ingress")]
    TcIngress,
    #[serde(rename = "tc_egress")]
    TcEgress,
}

impl Program {
    pub const ALL: [Program; 3] = [Program::Xdp, Program::TcIngress, Program::TcEgress];

    pub fn name(self) -> &'static str {
        match self {
            Program::Xdp => "xdp_lb",
            Program::TcIngress => "tc_ingress",
            Program::TcEgress => "tc_egress",
        }
    }

    pub fn is_tc(self) -> bool {
        self != Program::Xdp
    }

    /// The names of its reason counters, indexed by reason.
    pub fn reason_names(self) -> &'static [&'static str] {
        if self.is_tc() {
            &bpf_common::policy::reason::NAMES
        } else {
            &bpf_common::reason::NAMES
        }
    }

    pub fn is_verdict(self, reason: usize) -> bool {
        if self.is_tc() {
            bpf_common::policy::reason::is_verdict(reason as u32)
        } else {
            bpf_common::reason::is_verdict(reason as u32)
        }
    }

    pub fn verdict_name(self, retval: u32) -> String {
        let name = if self.is_tc() {
            match retval {
                TCX_NEXT => "TCX_NEXT",
                TCX_PASS => "TCX_PASS",
                TCX_DROP => "TCX_DROP",
                _ => "",
            }
        } else {
            match retval {
                XDP_ABORTED => "XDP_ABORTED",
                XDP_DROP => "XDP_DROP",
                XDP_PASS => "XDP_PASS",
                XDP_TX => "XDP_TX",
                XDP_REDIRECT => "XDP_REDIRECT",
                _ => "",
            }
        };
        if name.is_empty() {
            format!("{}", retval as i32)
        } else {
            name.to_string()
        }
    }
}

/// What a verdict reason's name says the verdict is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Class {
    Drop,
    Pass,
    Tx,
    Redirect,
    Unknown,
}

fn class_of(name: &str) -> Class {
    if name.starts_with("drop_") {
        Class::Drop
    } else if name.starts_with("pass_") || name.starts_with("allow_") {
        Class::Pass
    } else if name == "fwd_tx" {
        Class::Tx
    } else if name == "fwd_redirect" {
        Class::Redirect
    } else {
        Class::Unknown
    }
}

/// `xdp_lb` reasons after which the frame must leave untouched (docs/datapath.md).
const XDP_UNTOUCHED: [&str; 8] = [
    "pass_not_ipv4",
    "pass_not_vip",
    "pass_truncated_l3",
    "pass_malformed_ipv4",
    "pass_vip_addr_other",
    "pass_malformed_ipv6",
    "pass_neighbour_discovery",
    "pass_ipv6_unavailable",
];

/// `xdp_lb` events that only happen on a VIP or NAT path, never beside an untouched verdict.
const XDP_PATH_EVENTS: [&str; 4] = [
    "new_flow",
    "flow_rescheduled",
    "nat_reply_translated",
    "icmp_translated",
];

/// What the checks know about the node: its interfaces' MACs and its neighbours'.
#[derive(Clone, Debug, Default)]
pub struct CheckEnv {
    pub own_macs: Vec<[u8; 6]>,
    pub neighbour_macs: Vec<[u8; 6]>,
}

/// One run of one frame.
pub struct Observed<'a> {
    pub program: Program,
    pub input: &'a [u8],
    pub output: &'a [u8],
    pub retval: u32,
    /// How much each reason counter moved (this CPU's slot).
    pub deltas: &'a [i64],
}

/// What the checks saw of the frames the load balancer forwarded or changed.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct CheckStats {
    /// Frames returned with `XDP_TX` or `XDP_REDIRECT`.
    pub forwarded: u64,
    /// Frames passed to the stack after a rewrite.
    pub rewritten_and_passed: u64,
    /// Forwarded frames whose input already had an invalid IPv4 header checksum (the load
    /// balancer does not verify it; the rewrite kept the error).
    pub forwarded_with_bad_ipv4_checksum: u64,
    /// Forwarded frames whose input already had an invalid TCP/UDP/ICMP checksum.
    pub forwarded_with_bad_l4_checksum: u64,
}

/// A failed check.
#[derive(Clone, Debug)]
pub struct Violation {
    pub check: &'static str,
    pub detail: String,
}

impl Observed<'_> {
    /// The verdict reasons that moved, as the label findings are grouped by.
    pub fn reason_label(&self) -> String {
        let names = self.program.reason_names();
        let moved: Vec<&str> = (0..self.deltas.len())
            .filter(|&i| self.deltas[i] != 0 && self.program.is_verdict(i))
            .map(|i| names[i])
            .collect();
        if moved.is_empty() {
            "none".to_string()
        } else {
            moved.join("+")
        }
    }

    /// Every counter that moved, `name +n`.
    pub fn moved(&self) -> Vec<String> {
        let names = self.program.reason_names();
        (0..self.deltas.len())
            .filter(|&i| self.deltas[i] != 0)
            .map(|i| format!("{} {:+}", names[i], self.deltas[i]))
            .collect()
    }

    fn moved_by(&self, name: &str) -> i64 {
        let names = self.program.reason_names();
        names
            .iter()
            .position(|n| *n == name)
            .map_or(0, |i| self.deltas[i])
    }
}

/// Runs every check on one observed run; appends what failed to `out`.
pub fn check(obs: &Observed<'_>, env: &CheckEnv, out: &mut Vec<Violation>, stats: &mut CheckStats) {
    let names = obs.program.reason_names();
    let mut verdict_reason = None;
    let mut verdicts_moved = 0;
    let mut bad_counts = false;
    for (i, &d) in obs.deltas.iter().enumerate() {
        if d < 0 {
            out.push(Violation {
                check: "counter-decreased",
                detail: format!("{} moved by {d}", names[i]),
            });
        }
        if obs.program.is_verdict(i) {
            if d != 0 {
                verdicts_moved += 1;
                verdict_reason = Some(i);
                bad_counts |= d != 1;
            }
        } else if d > 1 {
            out.push(Violation {
                check: "event-counted-twice",
                detail: format!("{} rose by {d} for one frame", names[i]),
            });
        }
    }
    if verdicts_moved != 1 || bad_counts {
        out.push(Violation {
            check: "one-verdict-reason",
            detail: format!(
                "{verdicts_moved} verdict reasons moved (want exactly one, by 1): [{}]",
                obs.moved().join(", ")
            ),
        });
    }
    let verdict_name = obs.program.verdict_name(obs.retval);
    let legal = if obs.program.is_tc() {
        matches!(obs.retval, TCX_NEXT | TCX_PASS | TCX_DROP)
    } else {
        matches!(obs.retval, XDP_DROP | XDP_PASS | XDP_TX | XDP_REDIRECT)
    };
    if !legal {
        out.push(Violation {
            check: if obs.retval == XDP_ABORTED && !obs.program.is_tc() {
                "aborted"
            } else {
                "illegal-verdict"
            },
            detail: format!("returned {verdict_name}"),
        });
    }
    let reason_name = if verdicts_moved == 1 {
        verdict_reason.map(|i| names[i])
    } else {
        None
    };
    if let Some(reason) = reason_name
        && legal
    {
        let class = class_of(reason);
        let agrees = match (obs.program.is_tc(), class) {
            (_, Class::Unknown) => false,
            (true, Class::Drop) => obs.retval == TCX_DROP,
            (true, Class::Pass) => obs.retval != TCX_DROP,
            (true, _) => false,
            (false, Class::Drop) => obs.retval == XDP_DROP,
            (false, Class::Pass) => obs.retval == XDP_PASS,
            (false, Class::Tx) => obs.retval == XDP_TX,
            (false, Class::Redirect) => obs.retval == XDP_REDIRECT,
        };
        if !agrees {
            out.push(Violation {
                check: "verdict-matches-reason",
                detail: format!("{verdict_name} counted as {reason}"),
            });
        }
    }
    if let Some(reason) = reason_name {
        parser_agrees(obs, reason, out);
    }
    if obs.program.is_tc() {
        if obs.output != obs.input {
            out.push(Violation {
                check: "tc-frame-unchanged",
                detail: format!("output differs from the input ({})", diff_summary(obs)),
            });
        }
        return;
    }
    check_xdp(obs, env, reason_name, out, stats);
}

/// Verdict reasons that say the IPv4 or transport header is cut short or malformed.
const XDP_REJECTS: [&str; 3] = [
    "pass_truncated_l3",
    "pass_malformed_ipv4",
    "drop_truncated_l4",
];
const TC_REJECTS: [&str; 2] = ["drop_malformed", "drop_truncated"];
/// Verdict reasons that say the transport header was parsed whole.
const XDP_ACCEPTS: [&str; 8] = [
    "fwd_tx",
    "fwd_redirect",
    "pass_fib_no_neigh",
    "pass_no_tx_port",
    "pass_frag_needed",
    "drop_no_backend",
    "drop_nat_ports_exhausted",
    "drop_fib_failed",
];
const TC_ACCEPTS: [&str; 9] = [
    "pass_tracked",
    "pass_reply",
    "pass_related",
    "allow_rule",
    "allow_default",
    "allow_untracked",
    "drop_rule",
    "drop_default",
    "drop_policy_changed",
];

/// Which header an etherparse refusal is about: `tcp`, `udp`, `icmp`, `ipv4` or `other`.
fn layer_of(e: &etherparse::err::packet::SliceError) -> &'static str {
    use etherparse::{err::Layer, err::packet::SliceError};
    match e {
        SliceError::Len(l) => match l.layer {
            Layer::TcpHeader => "tcp",
            Layer::UdpHeader | Layer::UdpPayload => "udp",
            Layer::Icmpv4 | Layer::Icmpv4Timestamp | Layer::Icmpv4TimestampReply => "icmp",
            Layer::IpHeader | Layer::Ipv4Header | Layer::Ipv4Packet => "ipv4",
            _ => "other",
        },
        SliceError::Tcp(_) => "tcp",
        SliceError::Ip(_) | SliceError::Ipv4(_) => "ipv4",
        _ => "other",
    }
}

/// The name of a check about one header (findings group by it).
fn per_layer(check: &str, layer: &str) -> &'static str {
    match (check, layer) {
        ("parses", "tcp") => "forwarded-frame-parses:tcp",
        ("parses", "udp") => "forwarded-frame-parses:udp",
        ("parses", "icmp") => "forwarded-frame-parses:icmp",
        ("parses", "ipv4") => "forwarded-frame-parses:ipv4",
        ("parses", _) => "forwarded-frame-parses:other",
        (_, "tcp") => "parser-agrees-with-etherparse:tcp",
        (_, "udp") => "parser-agrees-with-etherparse:udp",
        (_, "icmp") => "parser-agrees-with-etherparse:icmp",
        (_, "ipv4") => "parser-agrees-with-etherparse:ipv4",
        _ => "parser-agrees-with-etherparse:other",
    }
}

/// etherparse refusals the programs' parser does not share by design: the UDP length field
/// (the programs judge the UDP header by the IP total length) and ICMP timestamp bodies.
fn tolerated(e: &etherparse::err::packet::SliceError) -> bool {
    use etherparse::{LenSource, err::Layer, err::packet::SliceError};
    match e {
        SliceError::Len(l) => {
            matches!(
                l.layer,
                Layer::UdpPayload | Layer::Icmpv4Timestamp | Layer::Icmpv4TimestampReply
            ) || (l.layer == Layer::UdpHeader && l.len_source == LenSource::UdpHeaderLen)
        }
        _ => false,
    }
}

/// The programs' parser (`lb-core::parse`) and etherparse agree on whether the headers are
/// whole: a frame counted as cut short or malformed does not parse with etherparse, and a
/// frame whose TCP/UDP/ICMP header the program took as whole does. Only frames both parsers
/// read alike are compared: untagged or one 802.1Q/802.1ad tag, IPv4, not a fragment.
fn parser_agrees(obs: &Observed<'_>, reason: &str, out: &mut Vec<Violation>) {
    let (rejects, accepts): (&[&str], &[&str]) = if obs.program.is_tc() {
        (&TC_REJECTS, &TC_ACCEPTS)
    } else {
        (&XDP_REJECTS, &XDP_ACCEPTS)
    };
    let reject = rejects.contains(&reason);
    if !reject && !accepts.contains(&reason) {
        return;
    }
    let f = obs.input;
    let be16 = |off: usize| {
        f.get(off..off + 2)
            .map(|b| u16::from_be_bytes([b[0], b[1]]))
    };
    let l3 = match be16(12) {
        Some(0x0800) => 14,
        Some(0x8100 | 0x88a8) if be16(16) == Some(0x0800) => 18,
        _ => return,
    };
    let parsed = SlicedPacket::from_ethernet(f);
    let transport_expected = f
        .get(l3 + 9)
        .is_some_and(|p| matches!(*p, PROTO_TCP | PROTO_UDP | PROTO_ICMP))
        && be16(l3 + 6).is_some_and(|frag| frag & 0x3fff == 0);
    if reject {
        if let Ok(p) = &parsed
            && (!transport_expected || p.transport.is_some())
        {
            let l3_reason = matches!(
                reason,
                "pass_truncated_l3" | "pass_malformed_ipv4" | "drop_malformed"
            );
            let layer = match f.get(l3 + 9) {
                _ if l3_reason || !transport_expected => "ipv4",
                Some(&PROTO_TCP) => "tcp",
                Some(&PROTO_UDP) => "udp",
                _ => "icmp",
            };
            // etherparse accepts a UDP length field of 0; the parser, like Linux's UDP, takes a
            // length below the 8 header bytes as a header cut short.
            let ihl = f.get(l3).map_or(0, |b| usize::from(b & 0x0f) * 4);
            if layer == "udp" && be16(l3 + ihl + 4).is_some_and(|len| len < 8) {
                return;
            }
            out.push(Violation {
                check: per_layer("agrees", layer),
                detail: format!("counted {reason}, but etherparse parses every header"),
            });
        }
    } else if transport_expected
        && let Err(e) = &parsed
        && !tolerated(e)
    {
        out.push(Violation {
            check: per_layer("agrees", layer_of(e)),
            detail: format!("counted {reason}, but etherparse refuses the packet: {e}"),
        });
    }
}

fn diff_summary(obs: &Observed<'_>) -> String {
    if obs.output.len() != obs.input.len() {
        return format!("{} bytes in, {} out", obs.input.len(), obs.output.len());
    }
    let offsets: Vec<String> = (0..obs.input.len())
        .filter(|&i| obs.input[i] != obs.output[i])
        .take(16)
        .map(|i| i.to_string())
        .collect();
    format!("bytes changed at offsets {}", offsets.join(","))
}

fn check_xdp(
    obs: &Observed<'_>,
    env: &CheckEnv,
    reason: Option<&'static str>,
    out: &mut Vec<Violation>,
    stats: &mut CheckStats,
) {
    let untouched = reason.is_some_and(|r| XDP_UNTOUCHED.contains(&r));
    if untouched {
        for event in XDP_PATH_EVENTS {
            if obs.moved_by(event) != 0 {
                out.push(Violation {
                    check: "event-beside-untouched-verdict",
                    detail: format!("{event} counted with {}", reason.unwrap_or("?")),
                });
            }
        }
    }
    if obs.retval == XDP_DROP {
        return;
    }
    let changed = obs.output != obs.input;
    if untouched && changed {
        out.push(Violation {
            check: "untouched-frame-changed",
            detail: format!(
                "{} is documented as passed untouched, but {}",
                reason.unwrap_or("?"),
                diff_summary(obs)
            ),
        });
        return;
    }
    let forwarded = matches!(obs.retval, XDP_TX | XDP_REDIRECT);
    if !forwarded && !changed {
        return;
    }
    if forwarded {
        stats.forwarded += 1;
    } else {
        stats.rewritten_and_passed += 1;
    }
    if obs.output.len() != obs.input.len() {
        out.push(Violation {
            check: "rewrite-keeps-length",
            detail: diff_summary(obs),
        });
        return;
    }
    if forwarded {
        let dst: [u8; 6] = obs.output[0..6].try_into().expect("6 bytes");
        let src: [u8; 6] = obs.output[6..12].try_into().expect("6 bytes");
        if !env.own_macs.contains(&src) || !env.neighbour_macs.contains(&dst) {
            out.push(Violation {
                check: "forwarded-macs",
                detail: format!(
                    "forwarded from {} to {} (not an interface and a neighbour of the node)",
                    mac(src),
                    mac(dst)
                ),
            });
        }
    }
    check_rewritten_fields(obs, out);
    check_output_packet(obs, out, forwarded, stats);
}

fn mac(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The output differs from the input only where a rewrite may write.
fn check_rewritten_fields(obs: &Observed<'_>, out: &mut Vec<Violation>) {
    // The load balancer's parser reads at most one VLAN tag.
    let layout = Layout::of(obs.input, 1);
    let mut allowed: Vec<(usize, usize)> = vec![(0, 12)];
    if let Some(l) = layout {
        allowed.push((l.l3 + 10, l.l3 + 20));
        match l.proto {
            PROTO_TCP => {
                allowed.push((l.l4, l.l4 + 4));
                allowed.push((l.l4 + 16, l.l4 + 18));
            }
            PROTO_UDP => {
                allowed.push((l.l4, l.l4 + 4));
                allowed.push((l.l4 + 6, l.l4 + 8));
            }
            PROTO_ICMP => {
                let q3 = l.l4 + 8;
                let q4 = q3 + 20;
                allowed.push((l.l4 + 2, l.l4 + 4));
                allowed.push((q3 + 10, q3 + 20));
                allowed.push((q4, q4 + 4));
                allowed.push((q4 + 6, q4 + 8));
            }
            _ => {}
        }
    }
    if let Some(l) = layout {
        let beyond: Vec<String> = (l.ip_end..obs.input.len())
            .filter(|&i| obs.input[i] != obs.output[i])
            .take(16)
            .map(|i| i.to_string())
            .collect();
        if !beyond.is_empty() {
            out.push(Violation {
                check: "rewrite-stays-in-ip-packet",
                detail: format!(
                    "bytes changed behind the IPv4 packet's end (offset {}, from its total \
                     length) at offsets {}",
                    l.ip_end,
                    beyond.join(",")
                ),
            });
        }
    }
    let outside: Vec<String> = (0..obs.input.len())
        .filter(|&i| obs.input[i] != obs.output[i])
        .filter(|&i| !allowed.iter().any(|(a, b)| (*a..*b).contains(&i)))
        .take(16)
        .map(|i| i.to_string())
        .collect();
    if !outside.is_empty() {
        out.push(Violation {
            check: "rewrite-stays-in-its-fields",
            detail: format!(
                "bytes changed outside MACs, addresses, ports and checksums at offsets {}",
                outside.join(",")
            ),
        });
    }
}

/// A packet's checksummed parts, as residuals (0 = valid).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Sums {
    ip: Option<u16>,
    /// (protocol, residual, raw checksum field).
    l4: Option<(u8, u16, u16)>,
    quoted_ip: Option<u16>,
    /// (residual over the quoted UDP header and what follows of it, raw checksum field).
    quoted_udp: Option<(u16, u16)>,
}

fn sums_of(frame: &[u8]) -> Result<Sums, (String, &'static str)> {
    let packet = SlicedPacket::from_ethernet(frame).map_err(|e| (e.to_string(), layer_of(&e)))?;
    let Some(NetSlice::Ipv4(ip)) = &packet.net else {
        return Err(("no IPv4 header".into(), "ipv4"));
    };
    let header = ip.header();
    let mut sums = Sums {
        ip: Some(residual(Sum16BitWords::new(), header.slice())),
        ..Sums::default()
    };
    let (src, dst) = (header.source(), header.destination());
    match &packet.transport {
        Some(TransportSlice::Tcp(tcp)) => {
            let seg = tcp.slice();
            sums.l4 = Some((
                PROTO_TCP,
                residual(pseudo_header(src, dst, PROTO_TCP, seg.len() as u16), seg),
                tcp.checksum(),
            ));
        }
        Some(TransportSlice::Udp(udp)) => {
            let dgram = udp.slice();
            sums.l4 = Some((
                PROTO_UDP,
                residual(pseudo_header(src, dst, PROTO_UDP, udp.length()), dgram),
                udp.checksum(),
            ));
        }
        Some(TransportSlice::Icmpv4(icmp)) => {
            let msg = icmp.slice();
            sums.l4 = Some((PROTO_ICMP, residual(Sum16BitWords::new(), msg), 0));
            if matches!(icmp.type_u8(), 3 | 11 | 12) && msg.len() >= 8 + 20 {
                let q = &msg[8..];
                let qhl = usize::from(q[0] & 0x0f) * 4;
                if q[0] >> 4 == 4 && qhl >= 20 && q.len() >= qhl {
                    sums.quoted_ip = Some(residual(Sum16BitWords::new(), &q[..qhl]));
                    let l4 = &q[qhl..];
                    if q[9] == PROTO_UDP && l4.len() >= 8 {
                        let qsrc: [u8; 4] = q[12..16].try_into().expect("4 bytes");
                        let qdst: [u8; 4] = q[16..20].try_into().expect("4 bytes");
                        let udp_len = u16::from_be_bytes([l4[4], l4[5]]);
                        let check = u16::from_be_bytes([l4[6], l4[7]]);
                        sums.quoted_udp = Some((
                            residual(pseudo_header(qsrc, qdst, PROTO_UDP, udp_len), l4),
                            check,
                        ));
                    }
                }
            }
        }
        _ => {}
    }
    Ok(sums)
}

fn check_output_packet(
    obs: &Observed<'_>,
    out: &mut Vec<Violation>,
    forwarded: bool,
    stats: &mut CheckStats,
) {
    let after = match sums_of(obs.output) {
        Ok(s) => s,
        Err((e, layer)) => {
            out.push(Violation {
                check: per_layer("parses", layer),
                detail: format!("etherparse: {e}"),
            });
            return;
        }
    };
    // An input etherparse refuses has no reference: its output must be plain valid.
    let before = sums_of(obs.input).unwrap_or_default();
    if forwarded {
        if before.ip.is_some_and(|r| r != 0) {
            stats.forwarded_with_bad_ipv4_checksum += 1;
        }
        if before
            .l4
            .is_some_and(|(p, r, f)| r != 0 && !(p == PROTO_UDP && f == 0))
        {
            stats.forwarded_with_bad_l4_checksum += 1;
        }
    }
    let mut bad = |check: &'static str, detail: String| out.push(Violation { check, detail });
    if let Some(r) = after.ip
        && r != 0
        && Some(r) != before.ip
    {
        bad(
            "ipv4-checksum",
            format!(
                "IPv4 header checksum off by {r:#06x} (input {})",
                describe(before.ip)
            ),
        );
    }
    if let Some((proto, r, field)) = after.l4 {
        let (in_r, in_field) = match before.l4 {
            Some((p, r, f)) if p == proto => (Some(r), Some(f)),
            _ => (None, None),
        };
        let name = match proto {
            PROTO_TCP => "tcp-checksum",
            PROTO_UDP => "udp-checksum",
            _ => "icmp-checksum",
        };
        if proto == PROTO_UDP && in_field == Some(0) {
            if field != 0 {
                bad(
                    "udp-zero-checksum-kept",
                    format!("UDP checksum 0 (none) became {field:#06x}"),
                );
            }
        } else if proto == PROTO_UDP && field == 0 {
            bad(
                "udp-checksum-not-zeroed",
                format!(
                    "UDP checksum {:#06x} became 0 (\"no checksum\")",
                    in_field.unwrap_or(0)
                ),
            );
        } else if r != 0 && Some(r) != in_r {
            bad(
                name,
                format!("checksum off by {r:#06x} (input {})", describe(in_r)),
            );
        }
    }
    if let Some(r) = after.quoted_ip
        && r != 0
        && Some(r) != before.quoted_ip
    {
        bad(
            "quoted-ipv4-checksum",
            format!(
                "quoted IPv4 header checksum off by {r:#06x} (input {})",
                describe(before.quoted_ip)
            ),
        );
    }
    if let (Some((r, field)), Some((in_r, in_field))) = (after.quoted_udp, before.quoted_udp) {
        if in_field == 0 {
            if field != 0 {
                bad(
                    "quoted-udp-checksum",
                    format!("quoted UDP checksum 0 (none) became {field:#06x}"),
                );
            }
        } else if field == 0 || r != in_r {
            bad(
                "quoted-udp-checksum",
                format!(
                    "quoted UDP checksum {in_field:#06x} -> {field:#06x} does not follow the \
                     rewrite (residual {in_r:#06x} -> {r:#06x})"
                ),
            );
        }
    }
}

fn describe(residual: Option<u16>) -> String {
    match residual {
        Some(0) => "valid".into(),
        Some(r) => format!("off by {r:#06x}"),
        None => "not comparable".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::super::frames::{self, ETH_P_IPV4, IpOpts, TCP_SYN, Tcp};
    use super::*;

    const M1: [u8; 6] = [2, 0, 0, 0, 0, 1];
    const M2: [u8; 6] = [2, 0, 0, 0, 0, 2];

    fn env() -> CheckEnv {
        CheckEnv {
            own_macs: vec![M2],
            neighbour_macs: vec![M1],
        }
    }

    fn deltas(pairs: &[(&str, i64)]) -> Vec<i64> {
        let names = Program::Xdp.reason_names();
        let mut d = vec![0; names.len()];
        for (n, v) in pairs {
            d[names.iter().position(|x| x == n).expect("reason")] = *v;
        }
        d
    }

    fn syn() -> Vec<u8> {
        let l2 = frames::eth(M1, M2, &[], ETH_P_IPV4);
        frames::tcp_frame(
            &l2,
            &Tcp::new(([198, 18, 0, 1], 40000), ([198, 18, 100, 1], 80), TCP_SYN),
            IpOpts::default(),
        )
    }

    fn run(input: &[u8], output: &[u8], retval: u32, d: &[i64]) -> Vec<&'static str> {
        let mut out = Vec::new();
        check(
            &Observed {
                program: Program::Xdp,
                input,
                output,
                retval,
                deltas: d,
            },
            &env(),
            &mut out,
            &mut CheckStats::default(),
        );
        out.iter().map(|v| v.check).collect()
    }

    #[test]
    fn a_correct_rewrite_passes_and_a_broken_checksum_is_caught() {
        let input = syn();
        // A full-NAT-like rewrite done right: new addresses, recomputed checksums.
        let l2 = frames::eth(M2, M1, &[], ETH_P_IPV4);
        let good = frames::tcp_frame(
            &l2,
            &Tcp::new(([198, 18, 1, 1], 40000), ([198, 18, 1, 11], 8080), TCP_SYN),
            IpOpts::default(),
        );
        let d = deltas(&[("fwd_redirect", 1), ("new_flow", 1)]);
        assert_eq!(run(&input, &good, XDP_REDIRECT, &d), Vec::<&str>::new());
        let mut bad = good.clone();
        bad[14 + 20 + 16] ^= 1;
        assert_eq!(run(&input, &bad, XDP_REDIRECT, &d), vec!["tcp-checksum"]);
        // An input whose checksum was already off by the same amount is not the rewrite's fault.
        // (Both frames carry the same window, so one change makes the same error in both.)
        let (mut bad_in, mut bad_out) = (input.clone(), good.clone());
        bad_in[14 + 20 + 14] ^= 1;
        bad_out[14 + 20 + 14] ^= 1;
        assert_eq!(run(&bad_in, &bad_out, XDP_REDIRECT, &d), Vec::<&str>::new());
    }

    #[test]
    fn the_parser_must_agree_with_etherparse() {
        // A SYN whose data offset points past the segment, forwarded: both the differential
        // and the output check see it.
        let mut input = syn();
        input[14 + 20 + 12] = 0xf0;
        let d = deltas(&[("fwd_redirect", 1), ("new_flow", 1)]);
        let mut output = input.clone();
        output[..6].copy_from_slice(&M1);
        output[6..12].copy_from_slice(&M2);
        assert_eq!(
            run(&input, &output, XDP_REDIRECT, &d),
            vec![
                "parser-agrees-with-etherparse:tcp",
                "forwarded-frame-parses:tcp"
            ]
        );
        // The same frame dropped as truncated is right; a whole one dropped so is not.
        let d = deltas(&[("drop_truncated_l4", 1)]);
        assert_eq!(run(&input, &input, XDP_DROP, &d), Vec::<&str>::new());
        let whole = syn();
        assert_eq!(
            run(&whole, &whole, XDP_DROP, &d),
            vec!["parser-agrees-with-etherparse:tcp"]
        );
    }

    #[test]
    fn a_rewrite_behind_the_ip_packet_is_caught() {
        let mut input = syn();
        input.extend_from_slice(&[0u8; 6]);
        let mut output = input.clone();
        output[..6].copy_from_slice(&M1);
        output[6..12].copy_from_slice(&M2);
        let last = output.len() - 1;
        output[last] = 1;
        let d = deltas(&[("fwd_tx", 1)]);
        assert_eq!(
            run(&input, &output, XDP_TX, &d),
            vec!["rewrite-stays-in-ip-packet", "rewrite-stays-in-its-fields"]
        );
    }

    #[test]
    fn counters_and_verdicts_must_agree() {
        let input = syn();
        let d = deltas(&[("pass_not_vip", 1)]);
        assert_eq!(run(&input, &input, XDP_PASS, &d), Vec::<&str>::new());
        assert_eq!(
            run(&input, &input, XDP_DROP, &d),
            vec!["verdict-matches-reason"]
        );
        assert_eq!(
            run(&input, &input, XDP_ABORTED, &deltas(&[])),
            vec!["one-verdict-reason", "aborted"]
        );
        assert_eq!(
            run(
                &input,
                &input,
                XDP_PASS,
                &deltas(&[("pass_not_vip", 1), ("pass_not_ipv4", 1)])
            ),
            vec!["one-verdict-reason"]
        );
        let mut changed = input.clone();
        changed[0] ^= 1;
        assert_eq!(
            run(&input, &changed, XDP_PASS, &d),
            vec!["untouched-frame-changed"]
        );
    }
}
