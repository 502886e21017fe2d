//! From captured frames to the name store: the frame's transport (UDP, or TCP reassembled),
//! the message decoded record by record (`dnsnames`), duplicates dropped, every problem
//! counted by reason.
use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    hash::{Hash as _, Hasher as _},
    net::IpAddr,
};

use dnsnames::{
    packet::{Transport, dns_packet},
    store::{NameStore, StoreConfig},
    tcp::Reassembler,
    wire::decode_response,
};

use crate::config::DnsSettings;

/// The same response seen again within this long (on a second interface of its path) is a
/// duplicate.
const DEDUP_WINDOW_NS: u64 = 2_000_000_000;
/// Fingerprints remembered for that (a bound on memory under a flood).
const DEDUP_MAX: usize = 8_192;
/// TCP streams reassembled at once, their buffer bound (one whole message of the largest
/// size), and how long one may wait for its next segment.
const TCP_STREAMS: usize = 1_024;
const TCP_STREAM_BYTES: usize = 65_537;
const TCP_IDLE_NS: u64 = 10_000_000_000;

/// One answer as the bus carries it (topic `dns.answers`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DnsAnswer {
    /// CLOCK_MONOTONIC of the capture.
    pub ts_ns: u64,
    pub client: IpAddr,
    pub resolver: IpAddr,
    pub question: String,
    pub qtype: u16,
    pub tcp: bool,
    /// (address, the name asked then its CNAME chain, TTL as answered).
    pub addresses: Vec<(IpAddr, Vec<String>, u32)>,
}

/// Counters of what the learner saw.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LearnCounters {
    pub messages: u64,
    pub duplicates: u64,
    pub truncated_answers: u64,
    pub answers: u64,
    pub parse_errors: BTreeMap<&'static str, u64>,
}

/// Who said what, keyed for duplicate detection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Fingerprint {
    src: IpAddr,
    dst: IpAddr,
    ports: (u16, u16),
    tcp_seq: u32,
    payload_hash: u64,
}

pub struct Learner {
    pub store: NameStore,
    tcp: Reassembler,
    seen: HashMap<Fingerprint, u64>,
    seen_order: VecDeque<(u64, Fingerprint)>,
    pub counters: LearnCounters,
}

pub fn store_config(s: &DnsSettings) -> StoreConfig {
    StoreConfig {
        ttl_floor_ns: s.ttl_floor.as_nanos() as u64,
        ttl_cap_ns: s.ttl_cap.as_nanos() as u64,
        grace_ns: s.grace.as_nanos() as u64,
        max_entries: s.max_entries,
        max_addresses_per_name: s.max_addresses_per_name,
    }
}

impl Learner {
    pub fn new(settings: &DnsSettings) -> Self {
        Self {
            store: NameStore::new(store_config(settings)),
            tcp: Reassembler::new(TCP_STREAMS, TCP_STREAM_BYTES, TCP_IDLE_NS),
            seen: HashMap::new(),
            seen_order: VecDeque::new(),
            counters: LearnCounters::default(),
        }
    }

    fn count(&mut self, reason: &'static str) {
        *self.counters.parse_errors.entry(reason).or_default() += 1;
    }

    /// Whether this response was seen within the window (and remembers it).
    fn duplicate(&mut self, fp: Fingerprint, now_ns: u64) -> bool {
        while let Some((at, old)) = self.seen_order.front().copied() {
            if now_ns.saturating_sub(at) <= DEDUP_WINDOW_NS && self.seen_order.len() < DEDUP_MAX {
                break;
            }
            self.seen_order.pop_front();
            if self.seen.get(&old) == Some(&at) {
                self.seen.remove(&old);
            }
        }
        if let Some(at) = self.seen.get(&fp)
            && now_ns.saturating_sub(*at) <= DEDUP_WINDOW_NS
        {
            return true;
        }
        self.seen.insert(fp, now_ns);
        self.seen_order.push_back((now_ns, fp));
        false
    }

    /// One captured frame (from its Ethernet header): answers what it taught.
    pub fn ingest(&mut self, frame: &[u8], now_ns: u64) -> Vec<DnsAnswer> {
        let pkt = match dns_packet(frame) {
            Ok(p) => p,
            Err(e) => {
                self.count(e.reason());
                return Vec::new();
            }
        };
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        pkt.payload.hash(&mut hasher);
        let fp = Fingerprint {
            src: pkt.src,
            dst: pkt.dst,
            ports: (pkt.src_port, pkt.dst_port),
            tcp_seq: pkt.tcp_seq,
            payload_hash: hasher.finish(),
        };
        if self.duplicate(fp, now_ns) {
            self.counters.duplicates += 1;
            return Vec::new();
        }
        let tcp = matches!(pkt.transport, Transport::Tcp);
        let messages: Vec<Vec<u8>> = if tcp {
            self.tcp.push(&pkt, now_ns)
        } else {
            vec![pkt.payload.to_vec()]
        };
        let (client, resolver) = (pkt.dst, pkt.src);
        let mut out = Vec::new();
        for msg in messages {
            self.counters.messages += 1;
            let decoded = decode_response(&msg);
            if decoded.truncated_flag {
                self.counters.truncated_answers += 1;
            }
            for e in &decoded.errors {
                self.count(e.reason());
            }
            if decoded.learned.is_empty() {
                continue;
            }
            for learned in &decoded.learned {
                self.store.insert(client, resolver, learned, now_ns);
                self.counters.answers += 1;
            }
            let (question, qtype) = decoded.question.clone().unwrap_or_default();
            out.push(DnsAnswer {
                ts_ns: now_ns,
                client,
                resolver,
                question,
                qtype,
                tcp,
                addresses: decoded
                    .learned
                    .iter()
                    .map(|l| (l.addr, l.names.clone(), l.ttl))
                    .collect(),
            });
        }
        out
    }

    /// TCP reassembly problems, as parse-error reasons.
    pub fn tcp_errors(&self) -> [(&'static str, u64); 4] {
        let s = self.tcp.stats();
        [
            ("tcp_gap", s.gaps),
            ("tcp_overflow", s.overflows),
            ("tcp_evicted", s.evicted),
            ("tcp_desync", s.desyncs),
        ]
    }

    pub fn tcp_streams(&self) -> usize {
        self.tcp.streams()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `web.test` CNAME `edge.test` A 198.18.2.7, from 198.18.1.11 to 198.18.0.1, as a frame.
    fn frame(id: u16) -> Vec<u8> {
        let mut m = id.to_be_bytes().to_vec();
        m.extend([0x81, 0x80, 0, 1, 0, 2, 0, 0, 0, 0]);
        m.extend(b"\x03web\x04test\x00\x00\x01\x00\x01");
        // CNAME: owner -> the question, target edge.test (at offset 12 + 14 + 12 = 38).
        m.extend([0xc0, 12, 0, 5, 0, 1, 0, 0, 0, 30, 0, 11]);
        m.extend(b"\x04edge\x04test\x00");
        m.extend([0xc0, 38, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 198, 18, 2, 7]);
        let b = etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 1, 11], [2, 0, 0, 0, 0, 1])
            .ipv4([198, 18, 1, 11], [198, 18, 0, 1], 64)
            .udp(53, 40_000);
        let mut out = Vec::new();
        b.write(&mut out, &m).unwrap();
        out
    }

    #[test]
    fn an_answer_is_learned_published_once_and_named_for_its_client() {
        let mut l = Learner::new(&DnsSettings::default());
        let answers = l.ingest(&frame(7), 1_000);
        let (client, resolver): (IpAddr, IpAddr) = (
            "198.18.0.1".parse().unwrap(),
            "198.18.1.11".parse().unwrap(),
        );
        assert_eq!(
            answers,
            [DnsAnswer {
                ts_ns: 1_000,
                client,
                resolver,
                question: "web.test".into(),
                qtype: 1,
                tcp: false,
                addresses: vec![(
                    "198.18.2.7".parse().unwrap(),
                    vec!["web.test".into(), "edge.test".into()],
                    30,
                )],
            }]
        );
        // The same answer seen on a second interface: a duplicate, not a second answer.
        assert!(l.ingest(&frame(7), 2_000).is_empty());
        assert_eq!(l.counters.duplicates, 1);
        // The next answer (another id) refreshes the entry.
        assert_eq!(l.ingest(&frame(8), 3_000).len(), 1);
        assert_eq!(l.counters.answers, 2);
        let e = l
            .store
            .lookup(Some(client), "198.18.2.7".parse().unwrap())
            .unwrap();
        assert_eq!(e.resolver, resolver);
        assert_eq!(e.ttl, 30);
        // Not DNS: counted by reason, nothing learned.
        assert!(l.ingest(&[0u8; 20], 4_000).is_empty());
        assert_eq!(
            l.counters.parse_errors.values().sum::<u64>(),
            1,
            "{:?}",
            l.counters
        );
    }
}
