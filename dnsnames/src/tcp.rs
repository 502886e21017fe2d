//! Best-effort reassembly of DNS over TCP from captured resolver segments.
//!
//! Only what the resolver sends is seen, and some of it may be missing, so this is not a TCP
//! stack: a stream is a buffer that takes segments in sequence order, gives up on a gap and
//! starts again at the next segment that looks like the start of a message. Memory is bounded:
//! at most `max_streams` streams, each holding less than one message of at most
//! `max_stream_bytes` (longer messages are skipped, not buffered).

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
};

use crate::packet::{DnsPacket, Transport};

/// A DNS header is 12 bytes; a shorter length prefix means we are not at a message boundary.
const MIN_MESSAGE_LEN: usize = 12;

/// (resolver, client, resolver port, client port)
type StreamKey = (IpAddr, IpAddr, u16, u16);

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpStats {
    /// Segments not contiguous with the buffer, or cut by the snap length: buffer dropped.
    pub gaps: u64,
    /// Messages longer than `max_stream_bytes`: skipped.
    pub overflows: u64,
    /// Streams dropped because the table was full (the least recently active one).
    pub evicted: u64,
    /// Streams dropped after `idle_ns` without a segment.
    pub expired: u64,
    /// A length prefix too small for a DNS message: not at a boundary after all, dropped.
    pub desyncs: u64,
    /// Whole messages answered.
    pub messages: u64,
}

#[derive(Debug)]
struct Stream {
    /// Sequence number of the next byte expected.
    next_seq: u32,
    /// The start of one message (its length prefix included), never a whole one.
    buf: Vec<u8>,
    /// Bytes of an over-long message still to pass over.
    skip: usize,
    /// Key into `Reassembler::by_activity`.
    active: (u64, u64),
}

/// The length prefix does not fit a DNS message: the stream is not at a boundary.
struct Desync;

impl Stream {
    /// Takes the next contiguous bytes of the stream; whole messages go to `out`.
    fn feed(
        &mut self,
        mut data: &[u8],
        max_bytes: usize,
        out: &mut Vec<Vec<u8>>,
        stats: &mut TcpStats,
    ) -> Result<(), Desync> {
        loop {
            let passed = self.skip.min(data.len());
            self.skip -= passed;
            data = &data[passed..];
            if data.is_empty() {
                return Ok(());
            }
            if self.buf.len() < 2 {
                let take = (2 - self.buf.len()).min(data.len());
                self.buf.extend_from_slice(&data[..take]);
                data = &data[take..];
                if self.buf.len() < 2 {
                    return Ok(());
                }
            }
            let len = usize::from(u16::from_be_bytes([self.buf[0], self.buf[1]]));
            if len < MIN_MESSAGE_LEN {
                return Err(Desync);
            }
            let total = 2 + len;
            if total > max_bytes {
                stats.overflows += 1;
                self.skip = total - self.buf.len();
                self.buf = Vec::new();
                continue;
            }
            if self.buf.len() == 2 && data.len() >= len {
                // The whole message is in this segment: no copy through the buffer.
                if !is_response(&data[..len]) {
                    return Err(Desync);
                }
                out.push(data[..len].to_vec());
                stats.messages += 1;
                data = &data[len..];
                self.buf.clear();
                continue;
            }
            self.buf.reserve_exact(total - self.buf.len());
            let take = (total - self.buf.len()).min(data.len());
            self.buf.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.buf.len() == total {
                let mut message = std::mem::take(&mut self.buf);
                message.drain(..2);
                if !is_response(&message) {
                    return Err(Desync);
                }
                out.push(message);
                stats.messages += 1;
            }
        }
    }
}

/// The resolver only sends responses: a message without QR means we are not at a boundary.
fn is_response(message: &[u8]) -> bool {
    message.get(2).is_some_and(|flags| flags & 0x80 != 0)
}

/// Could `payload` start a DNS response (length prefix, then a header with QR set), as far as
/// it shows? A one-byte segment may; `Stream::feed` checks each message when it is whole.
fn can_start(payload: &[u8]) -> bool {
    let len_ok = payload
        .get(..2)
        .is_none_or(|p| usize::from(u16::from_be_bytes([p[0], p[1]])) >= MIN_MESSAGE_LEN);
    let qr_ok = payload
        .get(2..)
        .is_none_or(|m| m.len() < 3 || is_response(m));
    !payload.is_empty() && len_ok && qr_ok
}

pub struct Reassembler {
    max_streams: usize,
    max_stream_bytes: usize,
    idle_ns: u64,
    streams: HashMap<StreamKey, Stream>,
    /// (last segment time, serial) -> stream: the least recently active first.
    by_activity: BTreeMap<(u64, u64), StreamKey>,
    serial: u64,
    stats: TcpStats,
}

impl Reassembler {
    pub fn new(max_streams: usize, max_stream_bytes: usize, idle_ns: u64) -> Self {
        Reassembler {
            max_streams,
            max_stream_bytes,
            idle_ns,
            streams: HashMap::new(),
            by_activity: BTreeMap::new(),
            serial: 0,
            stats: TcpStats::default(),
        }
    }

    fn touch(&mut self, key: StreamKey, now_ns: u64) {
        self.serial += 1;
        let active = (now_ns, self.serial);
        if let Some(stream) = self.streams.get_mut(&key) {
            self.by_activity.remove(&stream.active);
            stream.active = active;
            self.by_activity.insert(active, key);
        }
    }

    fn drop_stream(&mut self, key: &StreamKey) -> bool {
        match self.streams.remove(key) {
            Some(stream) => {
                self.by_activity.remove(&stream.active);
                true
            }
            None => false,
        }
    }

    fn expire_idle(&mut self, now_ns: u64) {
        while let Some((&(active_ns, serial), &key)) = self.by_activity.first_key_value() {
            if active_ns.saturating_add(self.idle_ns) > now_ns {
                break;
            }
            self.by_activity.remove(&(active_ns, serial));
            self.streams.remove(&key);
            self.stats.expired += 1;
        }
    }

    /// Feeds one segment from the resolver; answers the whole DNS messages it completes.
    pub fn push(&mut self, pkt: &DnsPacket<'_>, now_ns: u64) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        if pkt.transport != Transport::Tcp {
            return out;
        }
        self.expire_idle(now_ns);
        let key = (pkt.src, pkt.dst, pkt.src_port, pkt.dst_port);
        if pkt.cut {
            // Bytes past the snap length are lost for good: nothing after them can be placed.
            self.drop_stream(&key);
            self.stats.gaps += 1;
            return out;
        }
        if !pkt.payload.is_empty() {
            self.take_segment(key, pkt.tcp_seq, pkt.payload, now_ns, &mut out);
        }
        // SYN, FIN or RST: what follows (if anything) is a new connection.
        if pkt.tcp_syn_or_fin {
            self.drop_stream(&key);
        }
        out
    }

    fn take_segment(
        &mut self,
        key: StreamKey,
        seq: u32,
        payload: &[u8],
        now_ns: u64,
        out: &mut Vec<Vec<u8>>,
    ) {
        let end_seq = seq.wrapping_add(payload.len() as u32);
        if let Some(stream) = self.streams.get_mut(&key) {
            // Signed distance in sequence space, as TCP compares sequence numbers.
            let ahead = seq.wrapping_sub(stream.next_seq) as i32;
            if ahead <= 0 {
                let seen = ahead.unsigned_abs() as usize;
                if seen >= payload.len() {
                    return; // a retransmission of bytes already taken
                }
                stream.next_seq = end_seq;
                let fed = stream.feed(
                    &payload[seen..],
                    self.max_stream_bytes,
                    out,
                    &mut self.stats,
                );
                if fed.is_err() {
                    self.stats.desyncs += 1;
                    self.drop_stream(&key);
                } else {
                    self.touch(key, now_ns);
                }
                return;
            }
            self.stats.gaps += 1;
            self.drop_stream(&key);
        }

        if !can_start(payload) {
            return;
        }
        let mut stream = Stream {
            next_seq: end_seq,
            buf: Vec::new(),
            skip: 0,
            active: (0, 0),
        };
        if stream
            .feed(payload, self.max_stream_bytes, out, &mut self.stats)
            .is_err()
        {
            self.stats.desyncs += 1;
            return;
        }
        if self.max_streams == 0 {
            return;
        }
        if self.streams.len() >= self.max_streams
            && let Some((_, oldest)) = self.by_activity.pop_first()
        {
            self.streams.remove(&oldest);
            self.stats.evicted += 1;
        }
        self.streams.insert(key, stream);
        self.touch(key, now_ns);
    }

    pub fn stats(&self) -> TcpStats {
        self.stats
    }

    /// Streams held now.
    pub fn streams(&self) -> usize {
        self.streams.len()
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    const RESOLVER: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 53));
    const CLIENT: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 10));
    const ISN: u32 = 0xffff_fff0; // wraps inside the tests

    fn segment(client_port: u16, seq: u32, payload: &[u8]) -> DnsPacket<'_> {
        DnsPacket {
            transport: Transport::Tcp,
            src: RESOLVER,
            dst: CLIENT,
            src_port: 53,
            dst_port: client_port,
            tcp_seq: seq,
            tcp_syn_or_fin: false,
            payload,
            cut: false,
        }
    }

    /// A DNS-looking message of `len` bytes (QR set), framed with its length prefix.
    fn framed(len: usize, fill: u8) -> (Vec<u8>, Vec<u8>) {
        let mut message = vec![fill; len];
        message[2] = 0x81;
        let mut stream = (len as u16).to_be_bytes().to_vec();
        stream.extend(&message);
        (message, stream)
    }

    #[test]
    fn a_message_across_three_segments() {
        let (message, stream) = framed(40, 7);
        let mut r = Reassembler::new(8, 1024, 1_000_000_000);
        assert_eq!(
            r.push(&segment(1000, ISN, &stream[..1]), 0),
            Vec::<Vec<u8>>::new()
        );
        assert_eq!(r.streams(), 1);
        assert_eq!(
            r.push(&segment(1000, ISN, &stream[..10]), 1),
            Vec::<Vec<u8>>::new()
        );
        assert_eq!(
            r.push(&segment(1000, ISN.wrapping_add(10), &stream[10..30]), 2),
            Vec::<Vec<u8>>::new()
        );
        assert_eq!(
            r.push(&segment(1000, ISN.wrapping_add(30), &stream[30..]), 3),
            vec![message]
        );
        assert_eq!(r.streams(), 1);
        assert_eq!(
            r.stats(),
            TcpStats {
                messages: 1,
                ..TcpStats::default()
            }
        );
    }

    #[test]
    fn two_messages_in_one_segment_and_one_split() {
        let (m1, s1) = framed(12, 1);
        let (m2, s2) = framed(20, 2);
        let (m3, s3) = framed(30, 3);
        let stream: Vec<u8> = [s1, s2, s3].concat();
        let mut r = Reassembler::new(8, 1024, 1_000_000_000);
        assert_eq!(r.push(&segment(1, 100, &stream[..40]), 0), vec![m1, m2]);
        assert_eq!(r.push(&segment(1, 140, &stream[40..]), 0), vec![m3]);
    }

    #[test]
    fn retransmissions_are_ignored() {
        let (message, stream) = framed(40, 7);
        let (next, next_stream) = framed(12, 8);
        let mut r = Reassembler::new(8, 1024, 1_000_000_000);
        assert_eq!(
            r.push(&segment(1, 0, &stream[..20]), 0),
            Vec::<Vec<u8>>::new()
        );
        // The same segment again, then one overlapping what was seen.
        assert_eq!(
            r.push(&segment(1, 0, &stream[..20]), 1),
            Vec::<Vec<u8>>::new()
        );
        assert_eq!(r.push(&segment(1, 10, &stream[10..]), 2), vec![message]);
        assert_eq!(
            r.push(&segment(1, 10, &stream[10..]), 3),
            Vec::<Vec<u8>>::new()
        );
        assert_eq!(r.push(&segment(1, 42, &next_stream), 4), vec![next]);
        assert_eq!(r.stats().gaps, 0);
    }

    #[test]
    fn a_gap_drops_the_buffer() {
        let (_, stream) = framed(40, 7);
        let (next, next_stream) = framed(12, 8);
        let mut r = Reassembler::new(8, 1024, 1_000_000_000);
        r.push(&segment(1, 0, &stream[..10]), 0);
        // Bytes 10..20 never arrive; 20.. cannot start a message, so nothing is kept.
        assert_eq!(
            r.push(&segment(1, 20, &stream[20..]), 1),
            Vec::<Vec<u8>>::new()
        );
        assert_eq!(r.stats().gaps, 1);
        assert_eq!(r.streams(), 0);
        // The next message starts a new buffer.
        assert_eq!(r.push(&segment(1, 42, &next_stream), 2), vec![next]);
    }

    #[test]
    fn a_cut_segment_makes_the_stream_unusable() {
        let (_, stream) = framed(40, 7);
        let mut r = Reassembler::new(8, 1024, 1_000_000_000);
        r.push(&segment(1, 0, &stream[..10]), 0);
        let cut = DnsPacket {
            cut: true,
            ..segment(1, 10, &stream[10..20])
        };
        assert_eq!(r.push(&cut, 1), Vec::<Vec<u8>>::new());
        assert_eq!(r.streams(), 0);
        assert_eq!(
            r.push(&segment(1, 20, &stream[20..]), 2),
            Vec::<Vec<u8>>::new()
        );
        assert_eq!(r.stats().gaps, 1);
    }

    #[test]
    fn an_over_long_message_is_skipped() {
        let (_, big) = framed(300, 9);
        let (small, small_stream) = framed(20, 1);
        let stream: Vec<u8> = [big, small_stream].concat();
        let mut r = Reassembler::new(8, 100, 1_000_000_000);
        let mut out = Vec::new();
        for (i, chunk) in stream.chunks(64).enumerate() {
            out.extend(r.push(&segment(1, (i * 64) as u32, chunk), 0));
        }
        assert_eq!(out, vec![small]);
        assert_eq!(r.stats().overflows, 1);
    }

    #[test]
    fn the_oldest_stream_is_evicted() {
        let (_, stream) = framed(40, 7);
        let mut r = Reassembler::new(2, 1024, 1_000_000_000);
        r.push(&segment(1, 0, &stream[..10]), 0);
        r.push(&segment(2, 0, &stream[..10]), 1);
        r.push(&segment(1, 10, &stream[10..20]), 2);
        r.push(&segment(3, 0, &stream[..10]), 3);
        assert_eq!(r.streams(), 2);
        assert_eq!(r.stats().evicted, 1);
        // Stream 2 was the least recently active: its rest starts nothing.
        assert_eq!(
            r.push(&segment(2, 10, &stream[10..]), 4),
            Vec::<Vec<u8>>::new()
        );
        assert_eq!(r.push(&segment(1, 20, &stream[20..]), 5).len(), 1);
    }

    #[test]
    fn idle_streams_expire() {
        let (_, stream) = framed(40, 7);
        let mut r = Reassembler::new(8, 1024, 1_000);
        r.push(&segment(1, 0, &stream[..10]), 0);
        r.push(&segment(2, 0, &stream[..10]), 500);
        r.push(&segment(3, 0, &stream[..10]), 1_200);
        assert_eq!(r.streams(), 2);
        assert_eq!(r.stats().expired, 1);
    }

    #[test]
    fn syn_fin_rst_and_udp() {
        let (message, stream) = framed(40, 7);
        let mut r = Reassembler::new(8, 1024, 1_000_000_000);
        r.push(&segment(1, 0, &stream[..10]), 0);
        // The last bytes come with the FIN: the message completes, then the stream goes.
        let fin = DnsPacket {
            tcp_syn_or_fin: true,
            ..segment(1, 10, &stream[10..])
        };
        assert_eq!(r.push(&fin, 1), vec![message]);
        assert_eq!(r.streams(), 0);
        let udp = DnsPacket {
            transport: Transport::Udp,
            ..segment(1, 0, &stream)
        };
        assert_eq!(r.push(&udp, 2), Vec::<Vec<u8>>::new());
    }

    #[test]
    fn a_message_that_is_not_a_response_desyncs() {
        let mut r = Reassembler::new(8, 1024, 1_000_000_000);
        let (_, stream) = framed(20, 7);
        // Taken as a start from its first byte; the rest shows QR clear.
        r.push(&segment(1, 0, &stream[..1]), 0);
        let mut rest = stream[1..].to_vec();
        rest[3] = 0x01;
        assert_eq!(r.push(&segment(1, 1, &rest), 1), Vec::<Vec<u8>>::new());
        assert_eq!(r.stats().desyncs, 1);
        assert_eq!(r.streams(), 0);
    }

    #[test]
    fn a_length_too_small_for_dns_desyncs() {
        let mut r = Reassembler::new(8, 1024, 1_000_000_000);
        let (_, stream) = framed(12, 7);
        let mut bad = stream.clone();
        bad.extend([0, 3, 1, 2, 3]);
        assert_eq!(r.push(&segment(1, 0, &bad), 0).len(), 1);
        assert_eq!(r.stats().desyncs, 1);
        assert_eq!(r.streams(), 0);
    }
}
