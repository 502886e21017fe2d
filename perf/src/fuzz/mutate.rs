//! A small deterministic PRNG and the frame mutators.
//!
//! Each mutator works on raw bytes and never panics, whatever the frame has become; the
//! header offsets come from [`Layout`], recomputed after every step.

use super::frames::{
    ETH_P_8021AD, ETH_P_8021Q, ETH_P_ARP, ETH_P_IPV4, ETH_P_IPV6, ETH_P_QINQ_OLD, Layout,
    PROTO_ICMP, PROTO_TCP, PROTO_UDP, fix_ip_checksum, fix_l4_checksum, fix_total_len,
};

/// Largest frame the fuzzer sends (BPF_PROG_TEST_RUN takes about 3.5 KiB without
/// multi-buffer; 1600 covers every MTU decision of a 1500-byte network).
pub const MAX_FRAME: usize = 1600;

/// xoshiro256** seeded through splitmix64.
#[derive(Clone, Debug)]
pub struct Rng {
    s: [u64; 4],
}

impl Rng {
    pub fn new(seed: u64) -> Self {
        let mut x = seed;
        let mut next = || {
            x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        };
        Self {
            s: [next(), next(), next(), next()],
        }
    }

    pub fn next_u64(&mut self) -> u64 {
        let result = self.s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = self.s[1] << 17;
        self.s[2] ^= self.s[0];
        self.s[3] ^= self.s[1];
        self.s[1] ^= self.s[2];
        self.s[0] ^= self.s[3];
        self.s[2] ^= t;
        self.s[3] = self.s[3].rotate_left(45);
        result
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (((self.next_u64() >> 32) * n as u64) >> 32) as usize
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + self.below(hi - lo + 1)
    }

    /// True with probability `percent`/100.
    pub fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }

    pub fn byte(&mut self) -> u8 {
        self.next_u64() as u8
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }

    pub fn fill(&mut self, out: &mut [u8]) {
        for b in out {
            *b = self.byte();
        }
    }
}

/// Which mutations made a frame (for the findings), as short labels.
#[derive(Clone, Debug, Default)]
pub struct Labels {
    labels: Vec<&'static str>,
}

impl Labels {
    pub fn clear(&mut self) {
        self.labels.clear();
    }

    pub fn push(&mut self, label: &'static str) {
        if self.labels.len() < 12 {
            self.labels.push(label);
        }
    }

    pub fn join(&self) -> String {
        self.labels.join("+")
    }
}

const INTERESTING_8: [u8; 14] = [
    0, 1, 2, 4, 0x0f, 0x10, 0x40, 0x45, 0x46, 0x4f, 0x50, 0x7f, 0x80, 0xff,
];
const INTERESTING_16: [u16; 16] = [
    0, 1, 7, 8, 19, 20, 21, 28, 40, 60, 576, 1400, 1500, 0x7fff, 0x8000, 0xffff,
];

/// Where a byte-set mutation writes: offsets relative to the headers of the frame.
#[derive(Clone, Copy, Debug)]
enum Field {
    EtherType,
    VlanTci,
    VersionIhl,
    Tos,
    TotalLen,
    Ident,
    FragBits,
    Ttl,
    Proto,
    IpCheck,
    IpSrc,
    IpDst,
    IpOptions,
    SrcPort,
    DstPort,
    TcpSeq,
    TcpDataOffset,
    TcpFlags,
    TcpCheck,
    UdpLen,
    UdpCheck,
    IcmpType,
    IcmpCode,
    QuotedVersionIhl,
    QuotedProto,
    QuotedAddr,
    QuotedPorts,
}

const FIELDS: [Field; 27] = [
    Field::EtherType,
    Field::VlanTci,
    Field::VersionIhl,
    Field::Tos,
    Field::TotalLen,
    Field::Ident,
    Field::FragBits,
    Field::Ttl,
    Field::Proto,
    Field::IpCheck,
    Field::IpSrc,
    Field::IpDst,
    Field::IpOptions,
    Field::SrcPort,
    Field::DstPort,
    Field::TcpSeq,
    Field::TcpDataOffset,
    Field::TcpFlags,
    Field::TcpCheck,
    Field::UdpLen,
    Field::UdpCheck,
    Field::IcmpType,
    Field::IcmpCode,
    Field::QuotedVersionIhl,
    Field::QuotedProto,
    Field::QuotedAddr,
    Field::QuotedPorts,
];

/// Values the address and port mutations choose from: the setup's interesting addresses and
/// ports (VIPs, the node's own, backends, NAT ports in use).
#[derive(Clone, Debug, Default)]
pub struct Dictionary {
    pub addrs: Vec<[u8; 4]>,
    pub ports: Vec<u16>,
}

fn set_u16(frame: &mut [u8], off: usize, value: u16) -> bool {
    if off + 2 > frame.len() {
        return false;
    }
    frame[off..off + 2].copy_from_slice(&value.to_be_bytes());
    true
}

fn set_u8(frame: &mut [u8], off: usize, value: u8) -> bool {
    match frame.get_mut(off) {
        Some(b) => {
            *b = value;
            true
        }
        None => false,
    }
}

fn interesting_u8(rng: &mut Rng) -> u8 {
    if rng.chance(70) {
        *rng.pick(&INTERESTING_8)
    } else {
        rng.byte()
    }
}

fn interesting_u16(rng: &mut Rng, frame_len: usize, l3: usize) -> u16 {
    match rng.below(4) {
        0 => *rng.pick(&INTERESTING_16),
        // Around the real length: off by a little either way.
        1 => ((frame_len.saturating_sub(l3)) as i64 + rng.range(0, 16) as i64 - 8).clamp(0, 65535)
            as u16,
        _ => rng.next_u64() as u16,
    }
}

/// Sets one header field of the frame to an interesting or random value.
fn set_field(frame: &mut [u8], rng: &mut Rng, dict: &Dictionary, labels: &mut Labels) {
    let field = *rng.pick(&FIELDS);
    let layout = Layout::of(frame, 3);
    let len = frame.len();
    let ok = match (field, layout) {
        (Field::EtherType, _) => {
            let types = [
                ETH_P_IPV4,
                ETH_P_8021Q,
                ETH_P_8021AD,
                ETH_P_QINQ_OLD,
                ETH_P_ARP,
                ETH_P_IPV6,
                0,
                0xffff,
            ];
            // The outer ethertype or the one behind the first tag.
            let off = if rng.chance(70) { 12 } else { 16 };
            set_u16(frame, off, *rng.pick(&types))
        }
        (Field::VlanTci, _) => set_u16(frame, 14, rng.next_u64() as u16),
        (_, None) => false,
        (Field::VersionIhl, Some(l)) => {
            let value = if rng.chance(60) {
                0x40 | rng.below(16) as u8
            } else {
                interesting_u8(rng)
            };
            set_u8(frame, l.l3, value)
        }
        (Field::Tos, Some(l)) => set_u8(frame, l.l3 + 1, rng.byte()),
        (Field::TotalLen, Some(l)) => {
            let v = interesting_u16(rng, len, l.l3);
            set_u16(frame, l.l3 + 2, v)
        }
        (Field::Ident, Some(l)) => set_u16(frame, l.l3 + 4, rng.next_u64() as u16),
        (Field::FragBits, Some(l)) => {
            let choices = [
                0x2000u16, 0x0001, 0x0000, 0x4000, 0x8000, 0x3fff, 0x1fff, 0x2001,
            ];
            let v = if rng.chance(70) {
                *rng.pick(&choices)
            } else {
                rng.next_u64() as u16
            };
            set_u16(frame, l.l3 + 6, v)
        }
        (Field::Ttl, Some(l)) => set_u8(frame, l.l3 + 8, interesting_u8(rng)),
        (Field::Proto, Some(l)) => {
            let protos = [PROTO_TCP, PROTO_UDP, PROTO_ICMP, 0, 4, 41, 47, 50, 132, 255];
            set_u8(frame, l.l3 + 9, *rng.pick(&protos))
        }
        (Field::IpCheck, Some(l)) => set_u16(frame, l.l3 + 10, rng.next_u64() as u16),
        (Field::IpSrc | Field::IpDst, Some(l)) => {
            let off = l.l3
                + if matches!(field, Field::IpSrc) {
                    12
                } else {
                    16
                };
            let addr = if !dict.addrs.is_empty() && rng.chance(80) {
                *rng.pick(&dict.addrs)
            } else {
                let mut a = [0u8; 4];
                rng.fill(&mut a);
                a
            };
            if off + 4 <= len {
                frame[off..off + 4].copy_from_slice(&addr);
                true
            } else {
                false
            }
        }
        (Field::IpOptions, Some(l)) if l.ihl_bytes > 20 => {
            let off = l.l3 + 20 + rng.below(l.ihl_bytes - 20);
            set_u8(frame, off, interesting_u8(rng))
        }
        (Field::SrcPort | Field::DstPort | Field::QuotedPorts, Some(l)) => {
            let base = if matches!(field, Field::QuotedPorts) {
                l.l4 + 8 + 20
            } else {
                l.l4
            };
            let off = base
                + if matches!(field, Field::SrcPort) {
                    0
                } else {
                    2
                };
            let port = if !dict.ports.is_empty() && rng.chance(75) {
                *rng.pick(&dict.ports)
            } else {
                let random = rng.next_u64() as u16;
                *rng.pick(&[0u16, 1, 1023, 1024, 65535, random])
            };
            set_u16(frame, off, port)
        }
        (Field::TcpSeq, Some(l)) => set_u16(frame, l.l4 + 4, rng.next_u64() as u16),
        (Field::TcpDataOffset, Some(l)) => {
            let v = (rng.below(16) as u8) << 4 | (frame.get(l.l4 + 12).copied().unwrap_or(0) & 0xf);
            set_u8(frame, l.l4 + 12, v)
        }
        (Field::TcpFlags, Some(l)) => {
            let flags = [
                0x02u8, 0x12, 0x10, 0x11, 0x04, 0x14, 0x18, 0x01, 0x00, 0x03, 0x06, 0xff, 0x29,
            ];
            let v = if rng.chance(75) {
                *rng.pick(&flags)
            } else {
                rng.byte()
            };
            set_u8(frame, l.l4 + 13, v)
        }
        (Field::TcpCheck, Some(l)) => set_u16(frame, l.l4 + 16, rng.next_u64() as u16),
        (Field::UdpLen, Some(l)) => {
            let v = interesting_u16(rng, len, l.l4);
            set_u16(frame, l.l4 + 4, v)
        }
        (Field::UdpCheck, Some(l)) => {
            let v = if rng.chance(50) {
                0
            } else {
                rng.next_u64() as u16
            };
            set_u16(frame, l.l4 + 6, v)
        }
        (Field::IcmpType, Some(l)) => {
            let types = [0u8, 3, 4, 5, 8, 11, 12, 13, 255];
            set_u8(frame, l.l4, *rng.pick(&types))
        }
        (Field::IcmpCode, Some(l)) => set_u8(frame, l.l4 + 1, rng.below(17) as u8),
        (Field::QuotedVersionIhl, Some(l)) => {
            let v = *rng.pick(&[0x45u8, 0x46, 0x4f, 0x44, 0x55, 0x00]);
            set_u8(frame, l.l4 + 8, v)
        }
        (Field::QuotedProto, Some(l)) => {
            let v = *rng.pick(&[PROTO_TCP, PROTO_UDP, PROTO_ICMP, 0]);
            set_u8(frame, l.l4 + 8 + 9, v)
        }
        (Field::QuotedAddr, Some(l)) => {
            let off = l.l4 + 8 + if rng.chance(50) { 12 } else { 16 };
            if off + 4 <= len && !dict.addrs.is_empty() {
                let addr = *rng.pick(&dict.addrs);
                frame[off..off + 4].copy_from_slice(&addr);
                true
            } else {
                false
            }
        }
        (Field::IpOptions, Some(_)) => false,
    };
    if ok {
        labels.push(match field {
            Field::EtherType => "set-ethertype",
            Field::VlanTci => "set-vlan-tci",
            Field::VersionIhl => "set-ihl",
            Field::Tos => "set-tos",
            Field::TotalLen => "set-total-len",
            Field::Ident => "set-ident",
            Field::FragBits => "set-frag",
            Field::Ttl => "set-ttl",
            Field::Proto => "set-proto",
            Field::IpCheck => "set-ip-check",
            Field::IpSrc => "set-src-addr",
            Field::IpDst => "set-dst-addr",
            Field::IpOptions => "set-ip-option-byte",
            Field::SrcPort => "set-src-port",
            Field::DstPort => "set-dst-port",
            Field::TcpSeq => "set-tcp-seq",
            Field::TcpDataOffset => "set-tcp-data-offset",
            Field::TcpFlags => "set-tcp-flags",
            Field::TcpCheck => "set-tcp-check",
            Field::UdpLen => "set-udp-len",
            Field::UdpCheck => "set-udp-check",
            Field::IcmpType => "set-icmp-type",
            Field::IcmpCode => "set-icmp-code",
            Field::QuotedVersionIhl => "set-quoted-ihl",
            Field::QuotedProto => "set-quoted-proto",
            Field::QuotedAddr => "set-quoted-addr",
            Field::QuotedPorts => "set-quoted-port",
        });
    }
}

/// IPv4 options: (bytes, plausible encodings first).
fn random_ip_options(rng: &mut Rng) -> Vec<u8> {
    let mut opts = match rng.below(6) {
        // NOPs, end of list.
        0 => vec![1, 1, 1, 0],
        // Router alert.
        1 => vec![148, 4, 0, 0],
        // Record route with room for 2 addresses.
        2 => vec![7, 11, 4, 0, 0, 0, 0, 0, 0, 0, 0],
        // Timestamp.
        3 => vec![68, 12, 5, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        // A length field pointing past the header.
        4 => vec![7, 40, 4],
        _ => {
            let mut v = vec![0u8; rng.range(1, 40)];
            rng.fill(&mut v);
            v
        }
    };
    while opts.len() % 4 != 0 {
        opts.push(0);
    }
    opts.truncate(40);
    opts
}

/// Inserts IPv4 options after the fixed header, raising the IHL.
fn insert_ip_options(frame: &mut Vec<u8>, rng: &mut Rng) -> bool {
    let Some(l) = Layout::of(frame, 3) else {
        return false;
    };
    let opts = random_ip_options(rng);
    let current = l.ihl_bytes.max(20);
    if current + opts.len() > 60 || l.l3 + current > frame.len() {
        return false;
    }
    let at = l.l3 + current;
    frame.splice(at..at, opts.iter().copied());
    frame[l.l3] = 0x40 | ((current + opts.len()) / 4) as u8;
    true
}

/// Inserts TCP options before the payload, raising the data offset.
fn insert_tcp_options(frame: &mut Vec<u8>, rng: &mut Rng) -> bool {
    let Some(l) = Layout::of(frame, 3) else {
        return false;
    };
    if l.proto != PROTO_TCP || l.l4 + 20 > frame.len() {
        return false;
    }
    let current = usize::from(frame[l.l4 + 12] >> 4) * 4;
    let mut opts = match rng.below(5) {
        0 => vec![2, 4, 5, 0xb4],
        1 => vec![1, 3, 3, 7],
        2 => vec![4, 2, 1, 1],
        3 => vec![8, 10, 0, 0, 0, 1, 0, 0, 0, 0, 1, 1],
        _ => {
            let mut v = vec![0u8; 4 * rng.range(1, 5)];
            rng.fill(&mut v);
            v
        }
    };
    opts.truncate(40);
    let current = current.clamp(20, 60);
    if current + opts.len() > 60 || l.l4 + current > frame.len() {
        return false;
    }
    let at = l.l4 + current;
    frame.splice(at..at, opts.iter().copied());
    let words = ((current + opts.len()) / 4) as u8;
    frame[l.l4 + 12] = words << 4 | (frame[l.l4 + 12] & 0x0f);
    true
}

/// Inserts one to three VLAN tags (or, sometimes, takes one away).
fn vlan_stack(frame: &mut Vec<u8>, rng: &mut Rng) -> bool {
    if frame.len() < 14 {
        return false;
    }
    let tpids = [ETH_P_8021Q, ETH_P_8021AD, ETH_P_QINQ_OLD];
    let ethertype = u16::from_be_bytes([frame[12], frame[13]]);
    if tpids.contains(&ethertype) && frame.len() >= 18 && rng.chance(25) {
        frame.drain(12..16);
        return true;
    }
    for _ in 0..rng.range(1, 3) {
        let tpid = *rng.pick(&tpids);
        let tci = rng.next_u64() as u16;
        let tag = [(tpid >> 8) as u8, tpid as u8, (tci >> 8) as u8, tci as u8];
        frame.splice(12..12, tag);
    }
    true
}

/// Flips `count` random bits, mostly in the headers.
fn bit_flips(frame: &mut [u8], rng: &mut Rng) -> bool {
    if frame.is_empty() {
        return false;
    }
    for _ in 0..rng.range(1, 8) {
        let span = if rng.chance(70) {
            frame.len().min(80)
        } else {
            frame.len()
        };
        let i = rng.below(span);
        frame[i] ^= 1 << rng.below(8);
    }
    true
}

/// Truncates to a random length (at least 1 byte).
fn truncate(frame: &mut Vec<u8>, rng: &mut Rng) -> bool {
    if frame.len() < 2 {
        return false;
    }
    // Mostly around the headers, where the length checks are.
    let len = if rng.chance(70) {
        rng.range(1, frame.len().min(90))
    } else {
        rng.range(1, frame.len() - 1)
    };
    frame.truncate(len);
    true
}

/// Grows or shrinks to a random length, padding with random bytes or zeros.
fn random_length(frame: &mut Vec<u8>, rng: &mut Rng) -> bool {
    let len = match rng.below(4) {
        0 => rng.range(14, 80),
        1 => rng.range(1390, MAX_FRAME),
        _ => rng.range(14, MAX_FRAME),
    };
    let old = frame.len();
    frame.resize(len, 0);
    if len > old && rng.chance(50) {
        rng.fill(&mut frame[old..]);
    }
    true
}

/// Appends 1 to 64 bytes behind the IP packet (Ethernet padding or garbage).
fn append_garbage(frame: &mut Vec<u8>, rng: &mut Rng) -> bool {
    let n = rng.range(1, 64).min(MAX_FRAME.saturating_sub(frame.len()));
    if n == 0 {
        return false;
    }
    let old = frame.len();
    frame.resize(old + n, 0);
    if rng.chance(60) {
        rng.fill(&mut frame[old..]);
    }
    true
}

/// Overwrites a run of bytes with random ones.
fn random_run(frame: &mut [u8], rng: &mut Rng) -> bool {
    if frame.len() < 15 {
        return false;
    }
    let start = rng.range(12, frame.len() - 1);
    let n = rng.range(1, 8).min(frame.len() - start);
    rng.fill(&mut frame[start..start + n]);
    true
}

/// Applies 1 to `max` random mutations, then, with some probability, makes the lengths and
/// checksums consistent again. Returns with `labels` naming what was done.
pub fn mutate(
    frame: &mut Vec<u8>,
    rng: &mut Rng,
    dict: &Dictionary,
    max: usize,
    labels: &mut Labels,
) {
    for _ in 0..rng.range(1, max) {
        let (done, label) = match rng.below(20) {
            0..=4 => {
                set_field(frame, rng, dict, labels);
                (false, "")
            }
            5..=7 => (bit_flips(frame, rng), "bit-flips"),
            8..=9 => (truncate(frame, rng), "truncate"),
            10 => (random_length(frame, rng), "random-length"),
            11 => (append_garbage(frame, rng), "append-garbage"),
            12..=13 => (insert_ip_options(frame, rng), "ip-options"),
            14 => (insert_tcp_options(frame, rng), "tcp-options"),
            15..=16 => (vlan_stack(frame, rng), "vlan-stack"),
            _ => (random_run(frame, rng), "random-bytes-run"),
        };
        if done {
            labels.push(label);
        }
    }
    frame.truncate(MAX_FRAME);
    // Consistent lengths and checksums take mutations past the parser's first checks.
    if rng.chance(50) {
        fix_total_len(frame);
        labels.push("fix-len");
    }
    if rng.chance(60) {
        fix_l4_checksum(frame);
        labels.push("fix-l4-check");
    }
    if rng.chance(70) {
        fix_ip_checksum(frame);
        labels.push("fix-ip-check");
    }
}

/// Random bytes of a random length; half of them made to look like IPv4 first.
pub fn random_frame(frame: &mut Vec<u8>, rng: &mut Rng, dict: &Dictionary) {
    let len = if rng.chance(80) {
        rng.range(1, 120)
    } else {
        rng.range(1, MAX_FRAME)
    };
    frame.clear();
    frame.resize(len, 0);
    rng.fill(frame);
    if len >= 34 && rng.chance(50) {
        frame[12..14].copy_from_slice(&ETH_P_IPV4.to_be_bytes());
        frame[14] = 0x45;
        if rng.chance(50) {
            frame[23] = *rng.pick(&[PROTO_TCP, PROTO_UDP, PROTO_ICMP]);
            frame[20] &= 0x40;
            frame[21] = 0;
        }
        if !dict.addrs.is_empty() && rng.chance(60) {
            let addr = *rng.pick(&dict.addrs);
            frame[30..34].copy_from_slice(&addr);
        }
        if rng.chance(50) {
            fix_total_len(frame);
            fix_ip_checksum(frame);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::frames::{self, IpOpts, TCP_SYN, Tcp};
    use super::*;

    #[test]
    fn mutations_never_panic_and_stay_bounded() {
        let l2 = frames::eth([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2], &[], ETH_P_IPV4);
        let seed = frames::tcp_frame(
            &l2,
            &Tcp::new(([198, 18, 0, 1], 1), ([198, 18, 100, 1], 80), TCP_SYN),
            IpOpts::default(),
        );
        let dict = Dictionary {
            addrs: vec![[198, 18, 100, 1]],
            ports: vec![80],
        };
        let mut rng = Rng::new(7);
        let mut labels = Labels::default();
        for _ in 0..20_000 {
            let mut f = seed.clone();
            labels.clear();
            mutate(&mut f, &mut rng, &dict, 4, &mut labels);
            assert!(f.len() <= MAX_FRAME);
            random_frame(&mut f, &mut rng, &dict);
            assert!(!f.is_empty() && f.len() <= MAX_FRAME);
        }
    }

    #[test]
    fn rng_is_deterministic_and_in_range() {
        let mut a = Rng::new(1);
        let mut b = Rng::new(1);
        for _ in 0..1000 {
            assert_eq!(a.next_u64(), b.next_u64());
            assert!(a.below(7) < 7);
            b.below(7);
            let r = a.range(3, 5);
            b.range(3, 5);
            assert!((3..=5).contains(&r));
        }
    }
}
