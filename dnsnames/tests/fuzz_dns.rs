//! Fuzz target `dns`: captured DNS responses from bytes to learned names. Arbitrary bytes,
//! generated responses (random names, CNAME chains, A/AAAA, noise records) encoded with
//! hickory-proto and carried in frames built with etherparse, and mutations of both, through
//! `dnsnames::dns_packet`, `Reassembler`, `tcp_messages` and `decode_response`; random operation
//! sequences through `NameStore` beside a model. See `docs/fuzzing.md`.
//!
//! Properties:
//! - nothing panics, whatever the bytes;
//! - every learned name is valid: printable ASCII, lowercase, and unescaped its labels are
//!   1..=63 bytes and the name at most 253; every learned chain starts at the question name,
//!   has no repeated name and no repeated address; nothing is learned from a query, an error
//!   response or a message without exactly one question;
//! - a mutated message that hickory's whole-message decoder still accepts teaches exactly what
//!   the documented rules give over hickory's answer records;
//! - a valid generated response, sent over UDP or split into TCP segments (with
//!   retransmissions), decodes to exactly the learned set the generator predicts;
//! - a valid frame gives exactly its payload, cut or not; any frame gives a payload inside it;
//! - reassembly gives back exactly the messages sent in order (over-long ones skipped and
//!   counted), and stays within its bounds under random segments;
//! - the store never exceeds `max_entries` nor the per-name cap, and agrees with a plain model
//!   on every entry, every lookup, the next expiry and the counters.

#[path = "../../lb-core/tests/fuzz_harness/mod.rs"]
mod fuzz_harness;

use std::{
    collections::HashSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::Arc,
};

use dnsnames::{
    DnsPacket, Entry, Inserted, Learned, NameStore, PACKET_REASONS, Reassembler, StoreConfig,
    StoreStats, Transport, WIRE_REASONS, WireError, decode_response, dns_packet, tcp_messages,
};
use etherparse::{
    IpFragOffset, IpHeaders, IpNumber, Ipv4Header, Ipv6Extensions, Ipv6FragmentHeader, Ipv6Header,
    Ipv6RawExtHeader, Ipv6RoutingExtensions, PacketBuilder, TcpHeader, VlanId,
};
use hickory_proto::{
    op::{Edns, Message, MessageType, OpCode, Query, ResponseCode},
    rr::{
        DNSClass, Name, RData, Record, RecordType,
        rdata::{A, AAAA, CNAME, NS, TXT},
    },
};
use proptest::{prelude::*, sample::Index};

// ---------------------------------------------------------------------------------------------
// The documented name rules, written out again.
// ---------------------------------------------------------------------------------------------

/// Lowercase, labels joined by '.', bytes other than printable ASCII (and '.', '\') as \DDD.
fn text_of(labels: &[Vec<u8>]) -> String {
    labels
        .iter()
        .map(|label| {
            label
                .iter()
                .map(|&b| {
                    let b = b.to_ascii_lowercase();
                    if b.is_ascii_graphic() && b != b'.' && b != b'\\' {
                        char::from(b).to_string()
                    } else {
                        format!("\\{b:03}")
                    }
                })
                .collect::<String>()
        })
        .collect::<Vec<_>>()
        .join(".")
}

/// A stored name is printable, lowercase, and unescaped within the DNS limits.
fn check_name(text: &str) -> Result<(), TestCaseError> {
    prop_assert!(
        text.bytes().all(|b| b.is_ascii_graphic()),
        "not printable: {text:?}"
    );
    prop_assert!(
        !text.bytes().any(|b| b.is_ascii_uppercase()),
        "not lowercase: {text:?}"
    );
    let bytes = text.as_bytes();
    let mut labels: Vec<Vec<u8>> = vec![Vec::new()];
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'.' => labels.push(Vec::new()),
            b'\\' => {
                let digits = text.get(i + 1..i + 4).unwrap_or_default();
                let value: u16 = digits.parse().unwrap_or(999);
                prop_assert!(value <= 255, "bad escape in {text:?}");
                labels.last_mut().unwrap().push(value as u8);
                i += 3;
            }
            b => labels.last_mut().unwrap().push(b),
        }
        i += 1;
    }
    for label in &labels {
        prop_assert!((1..=63).contains(&label.len()), "label length in {text:?}");
    }
    let wire: usize = labels.iter().map(Vec::len).sum::<usize>() + labels.len() - 1;
    prop_assert!(wire <= 253, "{wire} bytes: {text:?}");
    Ok(())
}

/// What holds for any decode, whatever the input.
fn check_decoded(d: &dnsnames::Decoded) -> Result<(), TestCaseError> {
    for e in &d.errors {
        prop_assert!(WIRE_REASONS.contains(&e.reason()));
    }
    let refused = d.errors.iter().any(|e| {
        matches!(
            e,
            WireError::NotResponse
                | WireError::Opcode(_)
                | WireError::Rcode(_)
                | WireError::Questions(_)
                | WireError::InvalidName
        )
    });
    if refused {
        prop_assert!(d.learned.is_empty());
    }
    let mut addrs = HashSet::new();
    for l in &d.learned {
        prop_assert!(addrs.insert(l.addr), "{} learned twice", l.addr);
        let question = d.question.as_ref().map(|q| q.0.as_str());
        prop_assert_eq!(l.names.first().map(String::as_str), question);
        prop_assert!(l.names.len() <= 17);
        let distinct: HashSet<&String> = l.names.iter().collect();
        prop_assert_eq!(
            distinct.len(),
            l.names.len(),
            "a name repeats: {:?}",
            l.names
        );
        for n in &l.names {
            check_name(n)?;
        }
        prop_assert!(l.ttl <= i32::MAX as u32);
    }
    Ok(())
}

fn labels_of(name: &Name) -> Vec<Vec<u8>> {
    name.iter().map(<[u8]>::to_vec).collect()
}

fn effective_ttl(ttl: u32) -> u32 {
    if ttl > i32::MAX as u32 { 0 } else { ttl }
}

/// The documented rules over a decoded list of answer records (class IN only): follow the first
/// CNAME of each name from the question (at most 16, no name twice), learn each A/AAAA of a
/// name on that chain (first occurrence of an address), smallest TTL on the way.
fn rules(question: &Name, answers: &[Record]) -> Vec<Learned> {
    let text = |n: &Name| (!n.is_root()).then(|| text_of(&labels_of(n)));
    let mut chain = vec![(text(question).unwrap_or_default(), u32::MAX)];
    while chain.len() <= 16 {
        let (last, ttl) = chain.last().cloned().unwrap();
        let next = answers.iter().find_map(|r| match &r.data {
            RData::CNAME(CNAME(target))
                if r.dns_class == DNSClass::IN
                    && text(&r.name).as_deref() == Some(last.as_str()) =>
            {
                Some((text(target), effective_ttl(r.ttl)))
            }
            _ => None,
        });
        let Some((Some(target), cname_ttl)) = next else {
            break;
        };
        if chain.iter().any(|(n, _)| *n == target) {
            break;
        }
        chain.push((target, ttl.min(cname_ttl)));
    }
    let mut learned: Vec<Learned> = Vec::new();
    for r in answers.iter().filter(|r| r.dns_class == DNSClass::IN) {
        let addr = match &r.data {
            RData::A(A(a)) => IpAddr::V4(*a),
            RData::AAAA(AAAA(a)) => IpAddr::V6(*a),
            _ => continue,
        };
        let Some(owner) = text(&r.name) else { continue };
        let Some(at) = chain.iter().position(|(n, _)| *n == owner) else {
            continue;
        };
        if learned.iter().any(|l| l.addr == addr) {
            continue;
        }
        learned.push(Learned {
            addr,
            names: chain[..=at].iter().map(|(n, _)| n.clone()).collect(),
            ttl: chain[at].1.min(effective_ttl(r.ttl)),
        });
    }
    learned
}

// ---------------------------------------------------------------------------------------------
// Generated responses.
// ---------------------------------------------------------------------------------------------

/// A name of the response: the question, a CNAME target on the chain, or an unrelated name.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Owner {
    /// 0 is the question name, i the i-th CNAME target.
    Chain(usize),
    Unrelated(usize),
}

#[derive(Clone, Debug)]
enum Answer {
    /// The CNAME from chain name `hop - 1` to chain name `hop`.
    Cname {
        hop: usize,
    },
    Address {
        owner: Owner,
        addr: IpAddr,
        ttl: u32,
    },
    Txt {
        owner: Owner,
    },
    /// From an unrelated name: it must lead nowhere.
    StrayCname {
        from: usize,
        to: Owner,
    },
}

#[derive(Clone, Debug)]
struct ResponseSpec {
    id: u16,
    qtype: RecordType,
    /// Labels after each name's distinct first label ("q", "c1".., "u0"..).
    question: Vec<Vec<u8>>,
    chain: Vec<(Vec<Vec<u8>>, u32)>,
    unrelated: Vec<Vec<Vec<u8>>>,
    /// In message order; the flag writes the owner in upper case.
    answers: Vec<(Answer, bool)>,
    additional: Vec<(Owner, IpAddr)>,
    authority_ns: bool,
    edns: bool,
    tc: bool,
}

impl ResponseSpec {
    fn labels(&self, owner: Owner) -> Vec<Vec<u8>> {
        let (first, rest) = match owner {
            Owner::Chain(0) => ("q".to_string(), &self.question),
            Owner::Chain(i) => (format!("c{i}"), &self.chain[i - 1].0),
            Owner::Unrelated(j) => (format!("u{j}"), &self.unrelated[j]),
        };
        let mut labels = vec![first.into_bytes()];
        labels.extend(rest.iter().cloned());
        labels
    }

    fn name(&self, owner: Owner, upper: bool) -> Name {
        let mut labels = self.labels(owner);
        if upper {
            labels.iter_mut().for_each(|l| l.make_ascii_uppercase());
        }
        Name::from_labels(labels).expect("generated names are valid")
    }

    fn message(&self) -> Message {
        let mut m = Message::response(self.id, OpCode::Query);
        m.metadata.truncation = self.tc;
        m.add_query(Query::query(self.name(Owner::Chain(0), false), self.qtype));
        for (answer, upper) in &self.answers {
            let record = match answer {
                Answer::Cname { hop } => Record::from_rdata(
                    self.name(Owner::Chain(hop - 1), *upper),
                    self.chain[hop - 1].1,
                    RData::CNAME(CNAME(self.name(Owner::Chain(*hop), false))),
                ),
                Answer::Address { owner, addr, ttl } => {
                    let data = match addr {
                        IpAddr::V4(a) => RData::A(A(*a)),
                        IpAddr::V6(a) => RData::AAAA(AAAA(*a)),
                    };
                    Record::from_rdata(self.name(*owner, *upper), *ttl, data)
                }
                Answer::Txt { owner } => Record::from_rdata(
                    self.name(*owner, *upper),
                    60,
                    RData::TXT(TXT::new(vec!["v=spf1 -all".into()])),
                ),
                Answer::StrayCname { from, to } => Record::from_rdata(
                    self.name(Owner::Unrelated(*from), *upper),
                    60,
                    RData::CNAME(CNAME(self.name(*to, false))),
                ),
            };
            m.add_answer(record);
        }
        if self.authority_ns {
            m.add_authority(Record::from_rdata(
                self.name(Owner::Chain(0), false),
                3600,
                RData::NS(NS(self.name(Owner::Unrelated(0), false))),
            ));
        }
        for (owner, addr) in &self.additional {
            let data = match addr {
                IpAddr::V4(a) => RData::A(A(*a)),
                IpAddr::V6(a) => RData::AAAA(AAAA(*a)),
            };
            m.add_additional(Record::from_rdata(self.name(*owner, false), 60, data));
        }
        if self.edns {
            m.set_edns(Edns::new());
        }
        m
    }

    fn bytes(&self) -> Vec<u8> {
        self.message().to_vec().expect("generated responses encode")
    }

    /// What the response must teach, from the generator's own view of it.
    fn expected(&self) -> (Vec<Learned>, usize) {
        let chain_names: Vec<String> = (0..=self.chain.len())
            .map(|i| text_of(&self.labels(Owner::Chain(i))))
            .collect();
        let mut ttl_to = vec![u32::MAX];
        for (_, ttl) in &self.chain {
            let last = *ttl_to.last().unwrap();
            ttl_to.push(last.min(effective_ttl(*ttl)));
        }
        let mut learned: Vec<Learned> = Vec::new();
        let mut unrelated = 0;
        for (answer, _) in &self.answers {
            let Answer::Address { owner, addr, ttl } = answer else {
                continue;
            };
            match owner {
                Owner::Chain(i) => {
                    if !learned.iter().any(|l| l.addr == *addr) {
                        learned.push(Learned {
                            addr: *addr,
                            names: chain_names[..=*i].to_vec(),
                            ttl: ttl_to[*i].min(effective_ttl(*ttl)),
                        });
                    }
                }
                Owner::Unrelated(_) => unrelated += 1,
            }
        }
        (learned, unrelated)
    }
}

fn label() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        8 => prop::collection::vec(
            prop::sample::select(b"abcdefghijklmnopqrstuvwxyz0123456789-".to_vec()),
            1..12
        ),
        2 => prop::collection::vec(prop::sample::select(b"ABCxyz09-_*".to_vec()), 1..8),
        1 => prop::collection::vec(any::<u8>(), 1..6),
        1 => prop::collection::vec(prop::sample::select(b"long".to_vec()), 40..=63),
    ]
}

fn rest() -> impl Strategy<Value = Vec<Vec<u8>>> {
    prop::collection::vec(label(), 0..3)
}

fn ttl() -> impl Strategy<Value = u32> {
    prop_oneof![
        2 => Just(0u32),
        6 => 1u32..100_000,
        1 => any::<u32>(),
    ]
}

fn addr() -> impl Strategy<Value = IpAddr> {
    prop_oneof![
        // A small pool, so that addresses repeat.
        2 => (0u8..4).prop_map(|i| IpAddr::V4(Ipv4Addr::new(192, 0, 2, i))),
        3 => any::<[u8; 4]>().prop_map(|a| IpAddr::V4(Ipv4Addr::from(a))),
        2 => any::<[u8; 16]>().prop_map(|a| IpAddr::V6(Ipv6Addr::from(a))),
    ]
}

fn response_spec() -> impl Strategy<Value = ResponseSpec> {
    (0usize..5, 1usize..4)
        .prop_flat_map(|(hops, unrelated)| {
            let owner = prop_oneof![
                4 => (0..=hops).prop_map(Owner::Chain),
                1 => (0..unrelated).prop_map(Owner::Unrelated),
            ];
            let answer = prop_oneof![
                6 => (owner.clone(), addr(), ttl())
                    .prop_map(|(owner, addr, ttl)| Answer::Address { owner, addr, ttl }),
                1 => owner.clone().prop_map(|owner| Answer::Txt { owner }),
                1 => (0..unrelated, owner.clone())
                    .prop_map(|(from, to)| Answer::StrayCname { from, to }),
            ];
            let cnames: Vec<Answer> = (1..=hops).map(|hop| Answer::Cname { hop }).collect();
            let answers = (prop::collection::vec(answer, 0..8), Just(cnames))
                .prop_map(|(mut a, c)| {
                    a.extend(c);
                    a
                })
                .prop_shuffle()
                .prop_flat_map(|a| {
                    let n = a.len();
                    (Just(a), prop::collection::vec(any::<bool>(), n))
                })
                .prop_map(|(a, upper)| a.into_iter().zip(upper).collect::<Vec<_>>());
            (
                any::<u16>(),
                prop_oneof![Just(RecordType::A), Just(RecordType::AAAA)],
                rest(),
                prop::collection::vec((rest(), ttl()), hops),
                prop::collection::vec(rest(), unrelated),
                answers,
                prop::collection::vec((owner, addr()), 0..3),
                any::<(bool, bool, bool)>(),
            )
        })
        .prop_map(
            |(id, qtype, question, chain, unrelated, answers, additional, (ns, edns, tc))| {
                ResponseSpec {
                    id,
                    qtype,
                    question,
                    chain,
                    unrelated,
                    answers,
                    additional,
                    authority_ns: ns,
                    edns,
                    tc,
                }
            },
        )
}

// ---------------------------------------------------------------------------------------------
// Frames.
// ---------------------------------------------------------------------------------------------

const MAC_A: [u8; 6] = [2, 0, 0, 0, 0, 1];
const MAC_B: [u8; 6] = [2, 0, 0, 0, 0, 2];

#[derive(Clone, Debug)]
struct FrameSpec {
    /// TPIDs of the VLAN tags (0-2).
    vlans: Vec<u16>,
    v6: bool,
    src: [u8; 16],
    dst: [u8; 16],
    /// IPv4 option words.
    options: usize,
    /// IPv6: hop-by-hop, destination options, routing, final destination options.
    extensions: [bool; 4],
    /// (more fragments, offset)
    fragment: Option<(bool, u16)>,
    /// (sequence number, flags)
    tcp: Option<(u32, u8)>,
    src_port: u16,
    dst_port: u16,
    payload: Vec<u8>,
    padding: usize,
}

struct Built {
    frame: Vec<u8>,
    payload_start: usize,
    payload_end: usize,
}

impl FrameSpec {
    fn addrs(&self) -> (IpAddr, IpAddr) {
        if self.v6 {
            (
                IpAddr::from(Ipv6Addr::from(self.src)),
                IpAddr::from(Ipv6Addr::from(self.dst)),
            )
        } else {
            let four = |a: &[u8; 16]| IpAddr::from([a[0], a[1], a[2], a[3]]);
            (four(&self.src), four(&self.dst))
        }
    }

    fn build(&self) -> Built {
        let ip = if self.v6 {
            let raw = |next| Ipv6RawExtHeader::new_raw(next, &[1, 4, 0, 0, 0, 0]).unwrap();
            let [hbh, dest, routing, final_dest] = self.extensions;
            let extensions = Ipv6Extensions {
                hop_by_hop_options: hbh.then(|| raw(IpNumber::UDP)),
                destination_options: dest.then(|| raw(IpNumber::UDP)),
                routing: routing.then(|| Ipv6RoutingExtensions {
                    routing: raw(IpNumber::UDP),
                    final_destination_options: final_dest.then(|| raw(IpNumber::UDP)),
                }),
                fragment: self.fragment.map(|(more, offset)| {
                    Ipv6FragmentHeader::new(
                        IpNumber::UDP,
                        IpFragOffset::try_new(offset & 0x1fff).unwrap(),
                        more,
                        7,
                    )
                }),
                auth: None,
            };
            let header = Ipv6Header {
                hop_limit: 64,
                source: self.src,
                destination: self.dst,
                ..Default::default()
            };
            IpHeaders::Ipv6(header, extensions)
        } else {
            let src = [self.src[0], self.src[1], self.src[2], self.src[3]];
            let dst = [self.dst[0], self.dst[1], self.dst[2], self.dst[3]];
            let mut header = Ipv4Header::new(0, 64, IpNumber::UDP, src, dst).unwrap();
            let options = vec![1u8; self.options * 4];
            header.options = options[..].try_into().unwrap();
            if let Some((more, offset)) = self.fragment {
                header.more_fragments = more;
                header.fragment_offset = IpFragOffset::try_new(offset & 0x1fff).unwrap();
            }
            IpHeaders::Ipv4(header, Default::default())
        };
        let ethernet = PacketBuilder::ethernet2(MAC_A, MAC_B);
        let vlan = VlanId::try_new(5).unwrap();
        let ip_step = match self.vlans.len() {
            0 => ethernet.ip(ip),
            1 => ethernet.single_vlan(vlan).ip(ip),
            _ => ethernet.double_vlan(vlan, vlan).ip(ip),
        };
        let mut frame = Vec::new();
        match self.tcp {
            Some((seq, flags)) => {
                let mut h = TcpHeader::new(self.src_port, self.dst_port, seq, 1000);
                h.fin = flags & 0x01 != 0;
                h.syn = flags & 0x02 != 0;
                h.rst = flags & 0x04 != 0;
                h.psh = flags & 0x08 != 0;
                h.ack = flags & 0x10 != 0;
                ip_step
                    .tcp_header(h)
                    .write(&mut frame, &self.payload)
                    .unwrap();
            }
            None => ip_step
                .udp(self.src_port, self.dst_port)
                .write(&mut frame, &self.payload)
                .unwrap(),
        }
        for (i, tpid) in self.vlans.iter().enumerate() {
            frame[12 + 4 * i..14 + 4 * i].copy_from_slice(&tpid.to_be_bytes());
        }
        let payload_end = frame.len();
        frame.extend(vec![0u8; self.padding]);
        Built {
            payload_start: payload_end - self.payload.len(),
            payload_end,
            frame,
        }
    }

    fn is_fragment(&self) -> bool {
        // An IPv6 fragment header is refused whatever it says.
        self.fragment
            .is_some_and(|(more, offset)| self.v6 || more || offset & 0x1fff != 0)
    }
}

fn frame_spec() -> impl Strategy<Value = FrameSpec> {
    (
        prop::collection::vec(prop::sample::select(vec![0x8100u16, 0x88a8, 0x9100]), 0..=2),
        any::<bool>(),
        any::<([u8; 16], [u8; 16])>(),
        prop_oneof![3 => Just(0usize), 1 => 1usize..=10],
        any::<[bool; 4]>(),
        prop_oneof![5 => Just(None), 1 => any::<(bool, u16)>().prop_map(Some)],
        prop_oneof![Just(None), any::<(u32, u8)>().prop_map(Some)],
        prop_oneof![6 => Just(53u16), 1 => any::<u16>()],
        any::<u16>(),
        prop::collection::vec(any::<u8>(), 0..120),
        prop_oneof![3 => Just(0usize), 1 => 1usize..30],
    )
        .prop_map(
            |(
                vlans,
                v6,
                (src, dst),
                options,
                extensions,
                fragment,
                tcp,
                src_port,
                dst_port,
                payload,
                padding,
            )| {
                FrameSpec {
                    vlans,
                    v6,
                    src,
                    dst,
                    options,
                    extensions,
                    fragment,
                    tcp,
                    src_port,
                    dst_port,
                    payload,
                    padding,
                }
            },
        )
}

#[derive(Clone, Debug)]
enum Mutation {
    Truncate(Index),
    FlipBit(Index, u8),
    SetByte(Index, u8),
    /// One of the four DNS section counts (or any 16-bit field) set.
    SetWord(Index, u16),
    /// A compression pointer written somewhere.
    Pointer(Index, u16),
    Insert(Index, Vec<u8>),
    Remove(Index, u8),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        2 => any::<Index>().prop_map(Mutation::Truncate),
        4 => (any::<Index>(), 0u8..8).prop_map(|(i, b)| Mutation::FlipBit(i, b)),
        2 => (any::<Index>(), any::<u8>()).prop_map(|(i, v)| Mutation::SetByte(i, v)),
        2 => (any::<Index>(), prop_oneof![0u16..4, any::<u16>()])
            .prop_map(|(i, v)| Mutation::SetWord(i, v)),
        2 => (any::<Index>(), 0u16..0x4000).prop_map(|(i, v)| Mutation::Pointer(i, v)),
        1 => (any::<Index>(), prop::collection::vec(any::<u8>(), 1..8))
            .prop_map(|(i, b)| Mutation::Insert(i, b)),
        1 => (any::<Index>(), 1u8..16).prop_map(|(i, n)| Mutation::Remove(i, n)),
    ]
}

/// `count_fields`: SetWord lands on a section count (offsets 4, 6, 8, 10) half of the time.
fn mutate(bytes: &mut Vec<u8>, mutations: &[Mutation], count_fields: bool) {
    for m in mutations {
        let len = bytes.len();
        if len == 0 {
            return;
        }
        match m {
            Mutation::Truncate(i) => bytes.truncate(i.index(len)),
            Mutation::FlipBit(i, b) => bytes[i.index(len)] ^= 1 << b,
            Mutation::SetByte(i, v) => bytes[i.index(len)] = *v,
            Mutation::SetWord(i, v) => {
                let at = if count_fields && i.index(2) == 0 && len >= 12 {
                    4 + 2 * i.index(4)
                } else {
                    i.index(len)
                };
                for (k, b) in v.to_be_bytes().into_iter().enumerate() {
                    if let Some(slot) = bytes.get_mut(at + k) {
                        *slot = b;
                    }
                }
            }
            Mutation::Pointer(i, target) => {
                let at = i.index(len);
                let [hi, lo] = (0xc000 | target).to_be_bytes();
                bytes[at] = hi;
                if let Some(slot) = bytes.get_mut(at + 1) {
                    *slot = lo;
                }
            }
            Mutation::Insert(i, extra) => {
                let at = i.index(len + 1);
                bytes.splice(at..at, extra.iter().copied());
            }
            Mutation::Remove(i, n) => {
                let at = i.index(len);
                let end = (at + usize::from(*n)).min(len);
                bytes.drain(at..end);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Decoding.
// ---------------------------------------------------------------------------------------------

#[test]
fn fuzz_decode_arbitrary_bytes() {
    let strategy = (
        prop::collection::vec(any::<u8>(), 0..400),
        // Half of the inputs behind a plausible response header with one question.
        any::<bool>(),
    );
    fuzz_harness::check(
        "fuzz_decode_arbitrary_bytes",
        strategy,
        |(mut bytes, plausible)| {
            if plausible && bytes.len() >= 12 {
                bytes[2..6].copy_from_slice(&[0x81, 0x80, 0, 1]);
                bytes[6] = 0;
            }
            let d = decode_response(&bytes);
            check_decoded(&d)?;
            let (messages, used) = tcp_messages(&bytes);
            prop_assert!(used <= bytes.len());
            let mut at = 0;
            for m in &messages {
                let len = usize::from(u16::from_be_bytes([bytes[at], bytes[at + 1]]));
                prop_assert_eq!(m.len(), len);
                prop_assert_eq!(*m, &bytes[at + 2..at + 2 + len]);
                at += 2 + len;
            }
            prop_assert_eq!(at, used);
            let rest = &bytes[used..];
            let whole_left = rest.len() >= 2
                && rest.len() >= 2 + usize::from(u16::from_be_bytes([rest[0], rest[1]]));
            prop_assert!(!whole_left, "a whole message was left behind");
            Ok(())
        },
    );
}

#[test]
fn fuzz_decode_mutated_responses() {
    let strategy = (response_spec(), prop::collection::vec(mutation(), 1..5));
    fuzz_harness::check(
        "fuzz_decode_mutated_responses",
        strategy,
        |(spec, mutations)| {
            let mut bytes = spec.bytes();
            mutate(&mut bytes, &mutations, true);
            let d = decode_response(&bytes);
            check_decoded(&d)?;
            // Where hickory's whole-message decoder still accepts the bytes, the record-by-record
            // decoder must teach exactly what the rules give over hickory's answers.
            if let Ok(m) = Message::from_vec(&bytes)
                && m.metadata.message_type == MessageType::Response
                && m.metadata.op_code == OpCode::Query
                && m.metadata.response_code == ResponseCode::NoError
                && m.queries.len() == 1
                && !m.queries[0].name().is_root()
            {
                prop_assert_eq!(&d.learned, &rules(m.queries[0].name(), &m.answers));
            }
            Ok(())
        },
    );
}

/// Feeds `message` as DNS over TCP: framed, cut into segments at `cuts`, every segment built as
/// a frame and sent once, some twice (retransmissions, also overlapping ones).
fn over_tcp(
    message: &[u8],
    cuts: &[Index],
    resend: &[bool],
    seq0: u32,
) -> Result<Vec<Vec<u8>>, TestCaseError> {
    let mut stream = (message.len() as u16).to_be_bytes().to_vec();
    stream.extend(message);
    let mut points: Vec<usize> = cuts.iter().map(|c| c.index(stream.len())).collect();
    points.push(0);
    points.push(stream.len());
    points.sort_unstable();
    points.dedup();
    let mut reassembler = Reassembler::new(4, 70_000, 10_000_000_000);
    let mut out = Vec::new();
    for (k, w) in points.windows(2).enumerate() {
        let mut sends = vec![(w[0], w[1])];
        if resend.get(k).copied().unwrap_or(false) {
            // Again, and from the start of the previous segment.
            sends.push((w[0], w[1]));
            if k > 0 {
                sends.push((points[k - 1], w[1]));
            }
        }
        for (from, to) in sends {
            let spec = FrameSpec {
                vlans: vec![],
                v6: false,
                src: [192, 0, 2, 53, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                dst: [198, 51, 100, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                options: 0,
                extensions: [false; 4],
                fragment: None,
                tcp: Some((seq0.wrapping_add(from as u32), 0x18)),
                src_port: 53,
                dst_port: 40_000,
                payload: stream[from..to].to_vec(),
                padding: 0,
            };
            let built = spec.build();
            let packet = dns_packet(&built.frame);
            prop_assert!(packet.is_ok(), "{:?}", packet);
            if let Ok(packet) = packet {
                out.extend(reassembler.push(&packet, k as u64));
            }
        }
    }
    prop_assert_eq!(reassembler.stats().gaps, 0);
    Ok(out)
}

#[test]
fn fuzz_valid_responses_are_learned_exactly() {
    let strategy = (
        response_spec(),
        any::<bool>(),
        prop::collection::vec(any::<Index>(), 0..4),
        prop::collection::vec(any::<bool>(), 0..5),
        any::<u32>(),
    );
    fuzz_harness::check(
        "fuzz_valid_responses_are_learned_exactly",
        strategy,
        |(spec, tcp, cuts, resend, seq0)| {
            let bytes = spec.bytes();
            let message = if tcp {
                let messages = over_tcp(&bytes, &cuts, &resend, seq0)?;
                prop_assert_eq!(messages.len(), 1);
                messages.into_iter().next().unwrap_or_default()
            } else {
                let frame = FrameSpec {
                    vlans: vec![0x8100],
                    v6: true,
                    src: [
                        0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x53,
                    ],
                    dst: [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
                    options: 0,
                    extensions: [true, false, false, false],
                    fragment: None,
                    tcp: None,
                    src_port: 53,
                    dst_port: 5353,
                    payload: bytes.clone(),
                    padding: 0,
                }
                .build();
                let packet = dns_packet(&frame.frame);
                prop_assert!(packet.is_ok(), "{:?}", packet);
                packet.map(|p| p.payload.to_vec()).unwrap_or_default()
            };
            prop_assert_eq!(&message, &bytes);
            let d = decode_response(&message);
            let (learned, unrelated) = spec.expected();
            prop_assert_eq!(d.id, spec.id);
            prop_assert_eq!(d.truncated_flag, spec.tc);
            prop_assert_eq!(
                d.question,
                Some((
                    text_of(&spec.labels(Owner::Chain(0))),
                    u16::from(spec.qtype)
                ))
            );
            prop_assert_eq!(&d.learned, &learned);
            prop_assert_eq!(d.errors, vec![WireError::Unrelated; unrelated]);
            check_decoded(&decode_response(&bytes))?;
            Ok(())
        },
    );
}

// ---------------------------------------------------------------------------------------------
// Frames.
// ---------------------------------------------------------------------------------------------

fn check_packet_within(frame: &[u8], p: &DnsPacket<'_>) -> Result<(), TestCaseError> {
    prop_assert_eq!(p.src_port, 53);
    let start = p.payload.as_ptr() as usize;
    let base = frame.as_ptr() as usize;
    prop_assert!(start >= base && start + p.payload.len() <= base + frame.len());
    if p.cut {
        prop_assert_eq!(start + p.payload.len(), base + frame.len());
    }
    if p.transport == Transport::Udp {
        prop_assert_eq!(p.tcp_seq, 0);
        prop_assert!(!p.tcp_syn_or_fin);
    }
    Ok(())
}

#[test]
fn fuzz_dns_packet_frames() {
    let strategy = (
        frame_spec(),
        prop_oneof![2 => Just(None), 1 => any::<Index>().prop_map(Some)],
        prop_oneof![2 => Just(vec![]), 1 => prop::collection::vec(mutation(), 1..4)],
        prop::collection::vec(any::<u8>(), 0..100),
    );
    fuzz_harness::check(
        "fuzz_dns_packet_frames",
        strategy,
        |(spec, cut, mutations, noise)| {
            let built = spec.build();
            let full = built.frame.len();
            let len = cut.map_or(full, |c| c.index(full + 1));
            let frame = &built.frame[..len];
            let got = dns_packet(frame);
            let (src, dst) = spec.addrs();
            let refused = if spec.is_fragment() {
                Some(dnsnames::PacketError::Fragment)
            } else if spec.src_port != 53 {
                Some(dnsnames::PacketError::NotDns)
            } else {
                None
            };
            if len >= built.payload_start {
                let expected = match refused {
                    Some(e) => Err(e),
                    None => {
                        let (seq, flags) = spec.tcp.unwrap_or_default();
                        Ok(DnsPacket {
                            transport: if spec.tcp.is_some() {
                                Transport::Tcp
                            } else {
                                Transport::Udp
                            },
                            src,
                            dst,
                            src_port: spec.src_port,
                            dst_port: spec.dst_port,
                            tcp_seq: seq,
                            tcp_syn_or_fin: flags & 0x07 != 0,
                            payload: &built.frame[built.payload_start..len.min(built.payload_end)],
                            cut: len < built.payload_end,
                        })
                    }
                };
                prop_assert_eq!(got, expected);
            } else if refused.is_none() {
                prop_assert_eq!(got, Err(dnsnames::PacketError::FrameTruncated));
            } else {
                prop_assert!(got.is_err());
            }

            // The same frame mutated, and plain noise: no panic, and a payload inside the frame.
            let mut mutated = built.frame.clone();
            mutate(&mut mutated, &mutations, false);
            for frame in [&mutated, &noise] {
                match dns_packet(frame) {
                    Ok(p) => check_packet_within(frame, &p)?,
                    Err(e) => prop_assert!(PACKET_REASONS.contains(&e.reason())),
                }
            }
            Ok(())
        },
    );
}

// ---------------------------------------------------------------------------------------------
// TCP reassembly.
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
struct Delivery {
    /// Message lengths (QR set in each, so every message start looks like one).
    messages: Vec<u16>,
    cuts: Vec<Index>,
    resend: Vec<(bool, Index)>,
    max_stream_bytes: usize,
    seq0: u32,
}

fn delivery() -> impl Strategy<Value = Delivery> {
    (
        prop::collection::vec(prop_oneof![4 => 12u16..200, 1 => 200u16..1200], 1..6),
        prop::collection::vec(any::<Index>(), 0..12),
        prop::collection::vec(any::<(bool, Index)>(), 0..12),
        prop_oneof![Just(70_000usize), 100usize..1500],
        any::<u32>(),
    )
        .prop_map(
            |(messages, cuts, resend, max_stream_bytes, seq0)| Delivery {
                messages,
                cuts,
                resend,
                max_stream_bytes,
                seq0,
            },
        )
}

#[test]
fn fuzz_tcp_in_order_with_retransmissions() {
    fuzz_harness::check("fuzz_tcp_in_order_with_retransmissions", delivery(), |d| {
        let messages: Vec<Vec<u8>> = d
            .messages
            .iter()
            .enumerate()
            .map(|(i, &len)| {
                let mut m = vec![i as u8; usize::from(len)];
                m[2] = 0x81;
                m
            })
            .collect();
        let mut stream = Vec::new();
        for m in &messages {
            stream.extend((m.len() as u16).to_be_bytes());
            stream.extend(m);
        }
        let mut points: Vec<usize> = d.cuts.iter().map(|c| c.index(stream.len())).collect();
        points.extend([0, stream.len()]);
        points.sort_unstable();
        points.dedup();
        let mut r = Reassembler::new(2, d.max_stream_bytes, u64::MAX);
        let mut out = Vec::new();
        let packet = |from: usize, to: usize| DnsPacket {
            transport: Transport::Tcp,
            src: IpAddr::from([192, 0, 2, 53]),
            dst: IpAddr::from([198, 51, 100, 1]),
            src_port: 53,
            dst_port: 40_000,
            tcp_seq: d.seq0.wrapping_add(from as u32),
            tcp_syn_or_fin: false,
            payload: &stream[from..to],
            cut: false,
        };
        for (k, w) in points.windows(2).enumerate() {
            out.extend(r.push(&packet(w[0], w[1]), 0));
            if let Some((true, back)) = d.resend.get(k) {
                // Any range of what was already sent.
                let from = back.index(w[1]);
                out.extend(r.push(&packet(from, w[1]), 0));
            }
            prop_assert!(r.streams() <= 1);
        }
        let expected: Vec<Vec<u8>> = messages
            .iter()
            .filter(|m| m.len() + 2 <= d.max_stream_bytes)
            .cloned()
            .collect();
        let skipped = (messages.len() - expected.len()) as u64;
        prop_assert_eq!(out, expected);
        let stats = r.stats();
        prop_assert_eq!(stats.overflows, skipped);
        prop_assert_eq!((stats.gaps, stats.desyncs, stats.evicted), (0, 0, 0));
        Ok(())
    });
}

#[derive(Clone, Debug)]
struct Segment {
    stream: u8,
    seq: u32,
    payload: Vec<u8>,
    reset: bool,
    cut: bool,
    dt: u64,
}

fn segment() -> impl Strategy<Value = Segment> {
    (
        0u8..6,
        prop_oneof![0u32..400, any::<u32>()],
        prop_oneof![
            prop::collection::vec(any::<u8>(), 0..80),
            (12u16..120).prop_map(|len| {
                let mut p = len.to_be_bytes().to_vec();
                p.extend([0, 0, 0x81, 0x80]);
                p
            }),
        ],
        prop::bool::weighted(0.1),
        prop::bool::weighted(0.1),
        prop_oneof![Just(0u64), 0u64..2_000],
    )
        .prop_map(|(stream, seq, payload, reset, cut, dt)| Segment {
            stream,
            seq,
            payload,
            reset,
            cut,
            dt,
        })
}

#[test]
fn fuzz_tcp_random_segments() {
    let strategy = (
        prop::collection::vec(segment(), 1..60),
        0usize..4,
        0usize..300,
    );
    fuzz_harness::check(
        "fuzz_tcp_random_segments",
        strategy,
        |(segments, max_streams, max_stream_bytes)| {
            let mut r = Reassembler::new(max_streams, max_stream_bytes, 1_000);
            let mut now = 0;
            for s in &segments {
                now += s.dt;
                let p = DnsPacket {
                    transport: Transport::Tcp,
                    src: IpAddr::from([192, 0, 2, 53]),
                    dst: IpAddr::from([198, 51, 100, s.stream]),
                    src_port: 53,
                    dst_port: 40_000,
                    tcp_seq: s.seq,
                    tcp_syn_or_fin: s.reset,
                    payload: &s.payload,
                    cut: s.cut,
                };
                for m in r.push(&p, now) {
                    prop_assert!(m.len() >= 12 && m.len() + 2 <= max_stream_bytes);
                    check_decoded(&decode_response(&m))?;
                }
                prop_assert!(r.streams() <= max_streams);
            }
            Ok(())
        },
    );
}

// ---------------------------------------------------------------------------------------------
// The store, beside a model.
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
enum Op {
    Insert {
        client: u8,
        addr: u8,
        chain: u8,
        ttl: u32,
        resolver: u8,
        dt: u64,
    },
    Expire {
        live: u8,
        dt: u64,
    },
}

const CHAINS: &[&[&str]] = &[
    &["a.example"],
    &["a.example", "edge.cdn.net"],
    &["b.example"],
    &["b.example", "edge.cdn.net", "x.cdn.net"],
    &["c.example"],
    &[],
];

fn op() -> impl Strategy<Value = Op> {
    let dt = prop_oneof![Just(0u64), 0u64..40, 0u64..400];
    prop_oneof![
        4 => (
            0u8..3,
            0u8..6,
            0u8..CHAINS.len() as u8,
            prop_oneof![Just(0u32), 0u32..100, any::<u32>()],
            0u8..2,
            dt.clone(),
        )
            .prop_map(|(client, addr, chain, ttl, resolver, dt)| Op::Insert {
                client,
                addr,
                chain,
                ttl,
                resolver,
                dt,
            }),
        1 => (any::<u8>(), dt).prop_map(|(live, dt)| Op::Expire { live, dt }),
    ]
}

fn store_config() -> impl Strategy<Value = StoreConfig> {
    (0u64..50, 0u64..200, 0u64..100, 1usize..10, 1usize..4).prop_map(
        |(floor, cap, grace, max_entries, per_name)| StoreConfig {
            ttl_floor_ns: floor,
            ttl_cap_ns: cap,
            grace_ns: grace,
            max_entries,
            max_addresses_per_name: per_name,
        },
    )
}

#[derive(Clone, Debug)]
struct ModelEntry {
    entry: Entry,
    /// When last inserted or refreshed: orders every eviction and the lookup fallback.
    touched: u64,
}

#[derive(Default)]
struct Model {
    entries: Vec<ModelEntry>,
    touches: u64,
    stats: StoreStats,
}

fn group_of(e: &Entry) -> (IpAddr, String) {
    (
        e.client,
        e.names.first().map(|n| n.to_string()).unwrap_or_default(),
    )
}

impl Model {
    fn evict_oldest(&mut self, among: impl Fn(&Entry) -> bool) {
        let oldest = self
            .entries
            .iter()
            .enumerate()
            .filter(|(_, m)| among(&m.entry))
            .min_by_key(|(_, m)| m.touched)
            .map(|(i, _)| i);
        if let Some(i) = oldest {
            self.entries.remove(i);
        }
    }

    fn insert(&mut self, cfg: &StoreConfig, entry: Entry) -> Inserted {
        self.touches += 1;
        let group = group_of(&entry);
        let in_group = |m: &Model, skip: Option<IpAddr>| {
            m.entries
                .iter()
                .filter(|m| group_of(&m.entry) == group && Some(m.entry.addr) != skip)
                .count()
        };
        if let Some(i) = self
            .entries
            .iter()
            .position(|m| m.entry.client == entry.client && m.entry.addr == entry.addr)
        {
            let moved = group_of(&self.entries[i].entry) != group;
            self.entries[i] = ModelEntry {
                entry: entry.clone(),
                touched: self.touches,
            };
            if moved && in_group(self, Some(entry.addr)) >= cfg.max_addresses_per_name {
                let (client, addr) = (entry.client, entry.addr);
                let g = group.clone();
                self.evict_oldest(|e| group_of(e) == g && !(e.client == client && e.addr == addr));
                self.stats.evicted_name_cap += 1;
            }
            self.stats.refreshed += 1;
            return Inserted::Refreshed;
        }
        if in_group(self, None) >= cfg.max_addresses_per_name {
            let g = group.clone();
            self.evict_oldest(|e| group_of(e) == g);
            self.stats.evicted_name_cap += 1;
        }
        if self.entries.len() >= cfg.max_entries {
            self.evict_oldest(|_| true);
            self.stats.evicted_lru += 1;
        }
        self.entries.push(ModelEntry {
            entry,
            touched: self.touches,
        });
        self.stats.inserted += 1;
        Inserted::New
    }

    fn expire(&mut self, cfg: &StoreConfig, now: u64, live: &dyn Fn(IpAddr) -> bool) -> usize {
        let before = self.entries.len();
        let mut kept = Vec::new();
        for mut m in std::mem::take(&mut self.entries) {
            if m.entry.expires_ns > now {
                kept.push(m);
            } else if live(m.entry.addr) {
                m.entry.expires_ns = now.saturating_add(cfg.grace_ns);
                m.entry.held = true;
                self.stats.held += 1;
                kept.push(m);
            }
        }
        self.entries = kept;
        let removed = before - self.entries.len();
        self.stats.expired += removed as u64;
        removed
    }

    fn lookup(&self, client: Option<IpAddr>, addr: IpAddr) -> Option<&Entry> {
        let exact = self
            .entries
            .iter()
            .find(|m| Some(m.entry.client) == client && m.entry.addr == addr);
        exact
            .or_else(|| {
                self.entries
                    .iter()
                    .filter(|m| m.entry.addr == addr)
                    .max_by_key(|m| m.touched)
            })
            .map(|m| &m.entry)
    }
}

fn sorted_entries<'a>(entries: impl Iterator<Item = &'a Entry>) -> Vec<Entry> {
    let mut all: Vec<Entry> = entries.cloned().collect();
    all.sort_by_key(|e| (e.client, e.addr));
    all
}

#[test]
fn fuzz_store_against_a_model() {
    let strategy = (store_config(), prop::collection::vec(op(), 1..50));
    fuzz_harness::check("fuzz_store_against_a_model", strategy, |(cfg, ops)| {
        let mut store = NameStore::new(cfg);
        let mut model = Model::default();
        let clients: Vec<IpAddr> = (0..3).map(|c| IpAddr::from([10, 0, 0, c])).collect();
        let addrs: Vec<IpAddr> = (0..6).map(|a| IpAddr::from([203, 0, 113, a])).collect();
        let resolvers = [IpAddr::from([192, 0, 2, 53]), IpAddr::from([192, 0, 2, 54])];
        let mut now = 0u64;
        for op in &ops {
            match *op {
                Op::Insert {
                    client,
                    addr,
                    chain,
                    ttl,
                    resolver,
                    dt,
                } => {
                    now += dt;
                    let names: Vec<String> = CHAINS[usize::from(chain)]
                        .iter()
                        .map(|n| n.to_string())
                        .collect();
                    let learned = Learned {
                        addr: addrs[usize::from(addr)],
                        names: names.clone(),
                        ttl,
                    };
                    let client = clients[usize::from(client)];
                    let resolver = resolvers[usize::from(resolver)];
                    let lifetime = (u64::from(ttl) * 1_000_000_000)
                        .max(cfg.ttl_floor_ns)
                        .min(cfg.ttl_cap_ns);
                    let entry = Entry {
                        client,
                        addr: learned.addr,
                        names: names.iter().map(|n| Arc::from(n.as_str())).collect(),
                        ttl,
                        learned_ns: now,
                        expires_ns: now + lifetime,
                        held: false,
                        resolver,
                    };
                    let got = store.insert(client, resolver, &learned, now);
                    prop_assert_eq!(got, model.insert(&cfg, entry));
                }
                Op::Expire { live, dt } => {
                    now += dt;
                    let is_live = |a: IpAddr| match a {
                        IpAddr::V4(v4) => live & (1 << (v4.octets()[3] % 8)) != 0,
                        IpAddr::V6(_) => false,
                    };
                    let got = store.expire(now, &is_live);
                    prop_assert_eq!(got, model.expire(&cfg, now, &is_live));
                }
            }
            prop_assert!(store.len() <= cfg.max_entries);
            prop_assert_eq!(store.len(), model.entries.len());
            prop_assert_eq!(store.is_empty(), model.entries.is_empty());
            let mut groups = std::collections::HashMap::new();
            for e in store.iter() {
                *groups.entry(group_of(e)).or_insert(0usize) += 1;
            }
            prop_assert!(groups.values().all(|&n| n <= cfg.max_addresses_per_name));
            prop_assert_eq!(
                sorted_entries(store.iter()),
                sorted_entries(model.entries.iter().map(|m| &m.entry))
            );
            for &addr in &addrs {
                for client in clients.iter().copied().map(Some).chain([None]) {
                    prop_assert_eq!(store.lookup(client, addr), model.lookup(client, addr));
                }
                let mut all: Vec<Entry> = store.lookup_all(addr).into_iter().cloned().collect();
                let mut expected: Vec<&ModelEntry> = model
                    .entries
                    .iter()
                    .filter(|m| m.entry.addr == addr)
                    .collect();
                expected.sort_by_key(|m| std::cmp::Reverse(m.touched));
                let expected: Vec<Entry> = expected.into_iter().map(|m| m.entry.clone()).collect();
                prop_assert_eq!(std::mem::take(&mut all), expected);
            }
            prop_assert_eq!(
                store.next_expiry(),
                model.entries.iter().map(|m| m.entry.expires_ns).min()
            );
            let model_names: HashSet<String> =
                model.entries.iter().map(|m| group_of(&m.entry).1).collect();
            prop_assert_eq!(
                store.stats(),
                StoreStats {
                    entries: model.entries.len(),
                    names: model_names.len(),
                    ..model.stats
                }
            );
        }
        Ok(())
    });
}
