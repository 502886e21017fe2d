//! One DNS message decoded record by record, keeping only the names its question explains.
//!
//! hickory-proto decodes the header, the question and each record. Records are taken one at a
//! time rather than as a whole `Message` so that one bad record costs only itself: when a record
//! does not decode but its extent can still be found on the wire (owner name walked without
//! following pointers, then type, class, TTL and RDLENGTH), it is skipped and decoding goes on.
//!
//! An address is learned only when its owner is the query name or a name the answer section's
//! CNAME records lead to from it: a response must never teach a name it was not asked about.
//! The rules, exactly:
//! - only answer records of class IN count; authority and additional records teach nothing;
//! - from the query name, the first CNAME owned by the current name is followed, at most
//!   [`MAX_CNAME_HOPS`] times and never back to a name already on the chain (`CnameLoop`);
//! - each A/AAAA owned by a name on that chain is learned with the chain up to its owner and
//!   the smallest TTL of it and the CNAMEs followed to reach it (a TTL with the top bit set
//!   counts as 0, RFC 2181); an address seen again is kept as first learned; an A/AAAA owned
//!   by any other name is `Unrelated`;
//! - names compare case-insensitively, as their stored text: lowercase, no trailing dot,
//!   bytes other than printable ASCII (and '.' or '\\' inside a label) written `\DDD`.

use std::{collections::HashSet, fmt::Write as _, net::IpAddr};

use hickory_proto::{
    op::{Header, MessageType, OpCode, Query, ResponseCode},
    rr::{DNSClass, Name, RData, Record, RecordType},
    serialize::binary::{BinDecodable, BinDecoder, DecodeError},
};

/// CNAME records followed from the query name; a longer chain is taken for a loop.
pub const MAX_CNAME_HOPS: usize = 16;

/// Longest name in text form without the trailing dot (255 bytes on the wire).
pub const MAX_NAME_LEN: usize = 253;

const HEADER_LEN: usize = 12;

/// An address and the names that lead to it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Learned {
    pub addr: IpAddr,
    /// The query name, then each CNAME target up to the address record's owner.
    pub names: Vec<String>,
    /// The smallest TTL along the chain (the address record's and every CNAME used), seconds.
    pub ttl: u32,
}

/// What one message said, and every problem met reading it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Decoded {
    pub id: u16,
    /// The TC bit.
    pub truncated_flag: bool,
    pub rcode: u16,
    /// The (first) query name as stored (empty for the root) and the query type.
    pub question: Option<(String, u16)>,
    pub learned: Vec<Learned>,
    /// In the order met.
    pub errors: Vec<WireError>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Section {
    Question,
    Answer,
    Authority,
    Additional,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, thiserror::Error)]
pub enum WireError {
    #[error("not a response (QR=0)")]
    NotResponse,
    #[error("opcode {0} is not QUERY")]
    Opcode(u8),
    #[error("response code {0}")]
    Rcode(u16),
    /// Answers can be attributed to a question only when there is exactly one.
    #[error("{0} questions, not 1")]
    Questions(u16),
    /// The query name is the root, which names nothing to learn.
    #[error("the query name is the root")]
    InvalidName,
    #[error("{section:?} section claims {claimed} records, the message holds {found}")]
    SectionCount {
        section: Section,
        claimed: u16,
        found: u16,
    },
    #[error("{0} bytes after the last record")]
    TrailingBytes(usize),
    #[error("address record for a name the question does not lead to")]
    Unrelated,
    #[error("CNAME chain loops or is longer than {MAX_CNAME_HOPS}")]
    CnameLoop,
    #[error("compression pointer loop or forward pointer")]
    BadPointer,
    #[error("label longer than 63 bytes")]
    LabelTooLong,
    #[error("name longer than 255 bytes")]
    NameTooLong,
    #[error("message ends inside a record")]
    Truncated,
    #[error("malformed record data")]
    BadRdata,
    #[error("{0}")]
    Other(String),
}

/// Every [`WireError::reason`], for metrics that list all labels up front.
pub const WIRE_REASONS: &[&str] = &[
    "not_response",
    "opcode",
    "rcode",
    "questions",
    "invalid_name",
    "section_count",
    "trailing_bytes",
    "unrelated",
    "cname_loop",
    "bad_pointer",
    "label_too_long",
    "name_too_long",
    "truncated",
    "bad_rdata",
    "other",
];

impl WireError {
    pub fn reason(&self) -> &'static str {
        match self {
            WireError::NotResponse => "not_response",
            WireError::Opcode(_) => "opcode",
            WireError::Rcode(_) => "rcode",
            WireError::Questions(_) => "questions",
            WireError::InvalidName => "invalid_name",
            WireError::SectionCount { .. } => "section_count",
            WireError::TrailingBytes(_) => "trailing_bytes",
            WireError::Unrelated => "unrelated",
            WireError::CnameLoop => "cname_loop",
            WireError::BadPointer => "bad_pointer",
            WireError::LabelTooLong => "label_too_long",
            WireError::NameTooLong => "name_too_long",
            WireError::Truncated => "truncated",
            WireError::BadRdata => "bad_rdata",
            WireError::Other(_) => "other",
        }
    }

    fn is_name_error(&self) -> bool {
        matches!(
            self,
            WireError::BadPointer | WireError::LabelTooLong | WireError::NameTooLong
        )
    }
}

/// hickory's decode error as a reason, by kind.
fn classify(e: &DecodeError) -> WireError {
    match e {
        DecodeError::PointerNotPriorToLabel { .. } | DecodeError::LabelOverlapsWithOther { .. } => {
            WireError::BadPointer
        }
        // A length byte of 0x40..=0xbf is not a pointer: read as a length it is over 63 (the
        // extended label types it could also be are not in use).
        DecodeError::LabelBytesTooLong(_) | DecodeError::UnrecognizedLabelCode(_) => {
            WireError::LabelTooLong
        }
        DecodeError::DomainNameTooLong(_) => WireError::NameTooLong,
        DecodeError::InsufficientBytes => WireError::Truncated,
        DecodeError::IncorrectRDataLengthRead { .. }
        | DecodeError::InvalidEmptyRecord
        | DecodeError::EdnsNameNotRoot(_)
        | DecodeError::UnknownRecordTypeValue(_)
        | DecodeError::Utf8(_)
        | DecodeError::CaaTagInvalid
        | DecodeError::NaptrFlagsInvalid
        | DecodeError::SvcParamsOutOfOrder
        | DecodeError::SvcParamMissingValue
        | DecodeError::NsecBitmapOutOfBounds
        | DecodeError::UnknownAddressFamily(_)
        | DecodeError::UnrecognizedCsyncFlags(_)
        | DecodeError::UnrecognizedNsec3Flags(_)
        | DecodeError::UnknownNsec3HashAlgorithm(_)
        | DecodeError::UnknownDigestAlgorithm(_) => WireError::BadRdata,
        other => WireError::Other(other.to_string()),
    }
}

/// A label byte kept as it is in the text form; anything else is written `\DDD`, so the text
/// is always printable and a '.' inside a label cannot pass for a separator.
fn is_plain(b: u8) -> bool {
    b.is_ascii_graphic() && b != b'.' && b != b'\\'
}

/// The name as stored: lowercase, without the trailing dot, odd bytes escaped. `None` for the
/// root or a name outside the limits (labels 1..=63 bytes, at most 253 bytes with the dots).
pub(crate) fn name_text(name: &Name) -> Option<String> {
    let mut text = String::with_capacity(name.len());
    let mut wire_len = 0usize;
    for (i, label) in name.iter().enumerate() {
        if label.is_empty() || label.len() > 63 {
            return None;
        }
        if i > 0 {
            text.push('.');
            wire_len += 1;
        }
        wire_len += label.len();
        for &b in label {
            let b = b.to_ascii_lowercase();
            if is_plain(b) {
                text.push(char::from(b));
            } else {
                let _ = write!(text, "\\{b:03}");
            }
        }
    }
    (wire_len > 0 && wire_len <= MAX_NAME_LEN).then_some(text)
}

/// RFC 2181 section 8: a TTL with the top bit set is taken as zero.
fn effective_ttl(ttl: u32) -> u32 {
    if ttl > i32::MAX as u32 { 0 } else { ttl }
}

/// Where the name starting at `at` ends on the wire, without following pointers.
fn name_end(msg: &[u8], mut at: usize) -> Result<usize, WireError> {
    loop {
        let Some(&len) = msg.get(at) else {
            return Err(WireError::Truncated);
        };
        match len & 0xc0 {
            0x00 if len == 0 => return Ok(at + 1),
            0x00 => at += 1 + usize::from(len),
            0xc0 if at + 2 <= msg.len() => return Ok(at + 2),
            0xc0 => return Err(WireError::Truncated),
            _ => return Err(WireError::LabelTooLong),
        }
    }
}

/// Where the resource record starting at `at` ends, from its RDLENGTH.
fn record_end(msg: &[u8], at: usize) -> Result<usize, WireError> {
    let fixed = name_end(msg, at)?;
    let rdlength = msg.get(fixed + 8..fixed + 10).ok_or(WireError::Truncated)?;
    let end = fixed + 10 + usize::from(u16::from_be_bytes([rdlength[0], rdlength[1]]));
    if end > msg.len() {
        return Err(WireError::Truncated);
    }
    Ok(end)
}

/// A decoder positioned at `at` (at most `msg.len()`).
fn decoder_at(msg: &[u8], at: usize) -> BinDecoder<'_> {
    let mut decoder = BinDecoder::new(msg);
    // Cannot fail: callers only pass offsets inside the message.
    let _ = decoder.read_slice(at.min(msg.len()));
    decoder
}

/// Why the item at `at` did not decode, given hickory's error and whether its extent is known:
/// an owner name that fails is a name problem, running out of bytes when the whole record is
/// there is its data lying about its own length.
fn failure(msg: &[u8], at: usize, e: &DecodeError, extent: &Result<usize, WireError>) -> WireError {
    let raw = classify(e);
    let owner = Name::read(&mut decoder_at(msg, at));
    match (owner, extent) {
        (Err(owner_err), Ok(_)) => match classify(&owner_err) {
            // The name's own bytes are all there: a pointer led out of the message.
            WireError::Truncated => WireError::BadPointer,
            other => other,
        },
        (Err(owner_err), Err(extent_err)) => {
            let owner_err = classify(&owner_err);
            if owner_err.is_name_error() {
                owner_err
            } else {
                extent_err.clone()
            }
        }
        (Ok(_), Err(extent_err)) => extent_err.clone(),
        (Ok(_), Ok(_)) if raw == WireError::Truncated => WireError::BadRdata,
        (Ok(_), Ok(_)) => raw,
    }
}

/// The record at `at` (or why not) and where the next one starts, when that can be found.
fn next_record(msg: &[u8], at: usize) -> (Result<Record, WireError>, Option<usize>) {
    let extent = record_end(msg, at);
    let mut decoder = decoder_at(msg, at);
    match Record::read(&mut decoder) {
        // Our walk and hickory agree on well-formed records; the walk is what skipping uses.
        Ok(record) => {
            let end = extent.unwrap_or_else(|_| decoder.index());
            (Ok(record), Some(end))
        }
        Err(e) => {
            let reason = failure(msg, at, &e, &extent);
            (Err(reason), extent.ok())
        }
    }
}

fn next_question(msg: &[u8], at: usize) -> Result<(Query, usize), WireError> {
    let extent = name_end(msg, at).and_then(|end| {
        if end + 4 <= msg.len() {
            Ok(end + 4)
        } else {
            Err(WireError::Truncated)
        }
    });
    let mut decoder = decoder_at(msg, at);
    match Query::read(&mut decoder) {
        Ok(q) => Ok((q, decoder.index())),
        Err(e) => Err(failure(msg, at, &e, &extent)),
    }
}

struct Cname {
    owner: Option<String>,
    target: Option<String>,
    ttl: u32,
}

struct Address {
    owner: Option<String>,
    addr: IpAddr,
    ttl: u32,
}

/// Decodes one DNS response and learns the addresses its question leads to.
///
/// Never fails as a whole: `errors` says what went wrong, `learned` keeps what decoded before.
/// Nothing is learned from a query, another opcode, an error response or a message without
/// exactly one question. Authority and additional records are decoded (to find the message's
/// end and its problems) but teach nothing.
pub fn decode_response(msg: &[u8]) -> Decoded {
    let mut out = Decoded::default();
    let header = match Header::read(&mut BinDecoder::new(msg)) {
        Ok(h) => h,
        Err(_) => {
            out.errors.push(WireError::Truncated);
            return out;
        }
    };
    out.id = header.metadata.id;
    out.truncated_flag = header.metadata.truncation;
    out.rcode = u16::from(header.metadata.response_code);
    let counts = header.counts;

    let mut refuse = false;
    if header.metadata.message_type != MessageType::Response {
        out.errors.push(WireError::NotResponse);
        refuse = true;
    }
    if header.metadata.op_code != OpCode::Query {
        out.errors
            .push(WireError::Opcode(u8::from(header.metadata.op_code)));
        refuse = true;
    }
    if header.metadata.response_code != ResponseCode::NoError {
        out.errors.push(WireError::Rcode(out.rcode));
        refuse = true;
    }

    let mut at = HEADER_LEN;
    let mut query_name = None;
    for found in 0..counts.queries {
        if at == msg.len() {
            out.errors.push(WireError::SectionCount {
                section: Section::Question,
                claimed: counts.queries,
                found,
            });
            return out;
        }
        match next_question(msg, at) {
            Ok((query, end)) => {
                if found == 0 {
                    let text = name_text(query.name());
                    out.question = Some((
                        text.clone().unwrap_or_default(),
                        u16::from(query.query_type()),
                    ));
                    query_name = text;
                }
                at = end;
            }
            Err(e) => {
                out.errors.push(e);
                return out;
            }
        }
    }
    if counts.queries != 1 {
        out.errors.push(WireError::Questions(counts.queries));
        return out;
    }
    let Some(query_name) = query_name else {
        out.errors.push(WireError::InvalidName);
        return out;
    };
    if refuse {
        return out;
    }

    let mut cnames = Vec::new();
    let mut addresses = Vec::new();
    let sections = [
        (Section::Answer, counts.answers),
        (Section::Authority, counts.authorities),
        (Section::Additional, counts.additionals),
    ];
    let mut complete = true;
    'sections: for (section, claimed) in sections {
        for found in 0..claimed {
            if at == msg.len() {
                out.errors.push(WireError::SectionCount {
                    section,
                    claimed,
                    found,
                });
                complete = false;
                break 'sections;
            }
            let (record, next) = next_record(msg, at);
            match record {
                Ok(record) if section == Section::Answer => {
                    collect(&record, &mut cnames, &mut addresses, &mut out.errors);
                }
                Ok(_) => {}
                Err(e) => out.errors.push(e),
            }
            match next {
                Some(next) => at = next,
                None => {
                    complete = false;
                    break 'sections;
                }
            }
        }
    }
    if complete && at < msg.len() {
        out.errors.push(WireError::TrailingBytes(msg.len() - at));
    }

    out.learned = resolve(query_name, &cnames, &addresses, &mut out.errors);
    out
}

/// Keeps the answer records that can lead to or be an address.
fn collect(
    record: &Record,
    cnames: &mut Vec<Cname>,
    addresses: &mut Vec<Address>,
    errors: &mut Vec<WireError>,
) {
    if record.dns_class != DNSClass::IN {
        return;
    }
    let ttl = effective_ttl(record.ttl);
    let addr = match &record.data {
        RData::A(a) => IpAddr::V4(a.0),
        RData::AAAA(aaaa) => IpAddr::V6(aaaa.0),
        RData::CNAME(target) => {
            cnames.push(Cname {
                owner: name_text(&record.name),
                target: name_text(&target.0),
                ttl,
            });
            return;
        }
        // RDLENGTH 0, which hickory reads as an update's "any data".
        RData::Update0(RecordType::A | RecordType::AAAA | RecordType::CNAME) => {
            errors.push(WireError::BadRdata);
            return;
        }
        _ => return,
    };
    addresses.push(Address {
        owner: name_text(&record.name),
        addr,
        ttl,
    });
}

/// Follows the CNAME chain from the query name and attributes each address to it.
fn resolve(
    query_name: String,
    cnames: &[Cname],
    addresses: &[Address],
    errors: &mut Vec<WireError>,
) -> Vec<Learned> {
    // (name, smallest CNAME TTL on the way to it)
    let mut chain: Vec<(String, u32)> = vec![(query_name, u32::MAX)];
    loop {
        let (current, ttl) = chain
            .last()
            .map(|(n, t)| (n.as_str(), *t))
            .unwrap_or_default();
        let Some(cname) = cnames.iter().find(|c| c.owner.as_deref() == Some(current)) else {
            break;
        };
        let Some(target) = &cname.target else {
            break;
        };
        if chain.len() > MAX_CNAME_HOPS || chain.iter().any(|(n, _)| n == target) {
            errors.push(WireError::CnameLoop);
            break;
        }
        chain.push((target.clone(), ttl.min(cname.ttl)));
    }

    let mut learned: Vec<Learned> = Vec::new();
    let mut seen = HashSet::new();
    for a in addresses {
        let position = a
            .owner
            .as_deref()
            .and_then(|owner| chain.iter().position(|(n, _)| n == owner));
        let Some(position) = position else {
            errors.push(WireError::Unrelated);
            continue;
        };
        // The same address twice (a repeated record): the first says it.
        if !seen.insert(a.addr) {
            continue;
        }
        learned.push(Learned {
            addr: a.addr,
            names: chain[..=position].iter().map(|(n, _)| n.clone()).collect(),
            ttl: chain[position].1.min(a.ttl),
        });
    }
    learned
}

/// Splits a DNS-over-TCP byte stream (each message behind a 2-byte big-endian length) into its
/// whole messages; answers them and how many bytes they took, so the rest can wait for more.
pub fn tcp_messages(stream: &[u8]) -> (Vec<&[u8]>, usize) {
    let mut messages = Vec::new();
    let mut at = 0;
    while let Some(prefix) = stream.get(at..at + 2) {
        let len = usize::from(u16::from_be_bytes([prefix[0], prefix[1]]));
        let Some(message) = stream.get(at + 2..at + 2 + len) else {
            break;
        };
        messages.push(message);
        at += 2 + len;
    }
    (messages, at)
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use hickory_proto::{
        op::Message,
        rr::rdata::{A, AAAA, CNAME, TXT},
    };

    use super::*;

    fn name(s: &str) -> Name {
        Name::from_ascii(s).unwrap()
    }

    fn response(qname: &str, qtype: RecordType) -> Message {
        let mut m = Message::response(0x1234, OpCode::Query);
        m.add_query(Query::query(name(qname), qtype));
        m
    }

    fn a(owner: &str, ttl: u32, ip: [u8; 4]) -> Record {
        Record::from_rdata(name(owner), ttl, RData::A(A(Ipv4Addr::from(ip))))
    }

    fn aaaa(owner: &str, ttl: u32, ip: Ipv6Addr) -> Record {
        Record::from_rdata(name(owner), ttl, RData::AAAA(AAAA(ip)))
    }

    fn cname(owner: &str, ttl: u32, target: &str) -> Record {
        Record::from_rdata(name(owner), ttl, RData::CNAME(CNAME(name(target))))
    }

    fn learned(addr: impl Into<IpAddr>, names: &[&str], ttl: u32) -> Learned {
        Learned {
            addr: addr.into(),
            names: names.iter().map(|n| n.to_string()).collect(),
            ttl,
        }
    }

    fn encode(m: &Message) -> Vec<u8> {
        m.to_vec().unwrap()
    }

    /// A header followed by the question `www.example.com A IN`, built by hand.
    fn handmade(flags: u16, counts: [u16; 4]) -> Vec<u8> {
        let mut msg = vec![0xab, 0xcd];
        msg.extend(flags.to_be_bytes());
        for c in counts {
            msg.extend(c.to_be_bytes());
        }
        msg.extend(b"\x03www\x07example\x03com\x00\x00\x01\x00\x01");
        msg
    }

    /// Type A, class IN, TTL 60, RDLENGTH 4, 192.0.2.<last>.
    fn a_tail(last: u8) -> [u8; 14] {
        [0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 192, 0, 2, last]
    }

    const QUESTION_NAME_AT: u8 = 12;

    #[test]
    fn a_record() {
        let mut m = response("WWW.Example.COM.", RecordType::A);
        m.add_answer(a("www.example.com.", 300, [192, 0, 2, 1]));
        let d = decode_response(&encode(&m));
        assert_eq!(
            d,
            Decoded {
                id: 0x1234,
                truncated_flag: false,
                rcode: 0,
                question: Some(("www.example.com".into(), 1)),
                learned: vec![learned(
                    Ipv4Addr::new(192, 0, 2, 1),
                    &["www.example.com"],
                    300
                )],
                errors: vec![],
            }
        );
    }

    #[test]
    fn aaaa_records_and_a_repeated_address_once() {
        let ip: Ipv6Addr = "2001:db8::1".parse().unwrap();
        let ip2: Ipv6Addr = "2001:db8::2".parse().unwrap();
        let mut m = response("v6.example.", RecordType::AAAA);
        m.add_answer(aaaa("v6.example.", 30, ip));
        m.add_answer(aaaa("v6.example.", 30, ip2));
        m.add_answer(aaaa("v6.example.", 10, ip));
        let d = decode_response(&encode(&m));
        assert_eq!(d.question, Some(("v6.example".into(), 28)));
        assert_eq!(
            d.learned,
            vec![
                learned(ip, &["v6.example"], 30),
                learned(ip2, &["v6.example"], 30)
            ]
        );
        assert_eq!(d.errors, vec![]);
    }

    #[test]
    fn cname_chain_of_two_levels_with_min_ttl() {
        let mut m = response("www.example.com.", RecordType::A);
        // Out of order on purpose, and with the owners' case changed: matching ignores both.
        m.add_answer(a("EDGE.cdn.net.", 120, [198, 51, 100, 7]));
        m.add_answer(cname("www.example.com.", 300, "cdn.Example.NET."));
        m.add_answer(cname("cdn.example.net.", 60, "edge.cdn.net."));
        m.add_answer(a("cdn.example.net.", 900, [198, 51, 100, 8]));
        let d = decode_response(&encode(&m));
        assert_eq!(
            d.learned,
            vec![
                learned(
                    Ipv4Addr::new(198, 51, 100, 7),
                    &["www.example.com", "cdn.example.net", "edge.cdn.net"],
                    60
                ),
                // An address on the intermediate name: the chain up to it, its CNAME's TTL.
                learned(
                    Ipv4Addr::new(198, 51, 100, 8),
                    &["www.example.com", "cdn.example.net"],
                    300
                ),
            ]
        );
        assert_eq!(d.errors, vec![]);
    }

    #[test]
    fn unrelated_address_is_not_learned() {
        let mut m = response("www.example.com.", RecordType::A);
        m.add_answer(a("www.example.com.", 60, [192, 0, 2, 1]));
        m.add_answer(a("bank.example.org.", 60, [203, 0, 113, 66]));
        // A CNAME that does not start from the question leads nowhere either.
        m.add_answer(cname("other.example.", 60, "bank2.example.org."));
        m.add_answer(a("bank2.example.org.", 60, [203, 0, 113, 67]));
        // Additional records teach nothing, even for the query name.
        m.add_additional(a("www.example.com.", 60, [192, 0, 2, 99]));
        let d = decode_response(&encode(&m));
        assert_eq!(
            d.learned,
            vec![learned(
                Ipv4Addr::new(192, 0, 2, 1),
                &["www.example.com"],
                60
            )]
        );
        assert_eq!(d.errors, vec![WireError::Unrelated, WireError::Unrelated]);
    }

    #[test]
    fn cname_loop_is_bounded() {
        let mut m = response("a.example.", RecordType::A);
        m.add_answer(cname("a.example.", 60, "b.example."));
        m.add_answer(cname("b.example.", 60, "a.example."));
        m.add_answer(a("b.example.", 60, [192, 0, 2, 2]));
        let d = decode_response(&encode(&m));
        assert_eq!(
            d.learned,
            vec![learned(
                Ipv4Addr::new(192, 0, 2, 2),
                &["a.example", "b.example"],
                60
            )]
        );
        assert_eq!(d.errors, vec![WireError::CnameLoop]);
    }

    #[test]
    fn long_cname_chain_is_cut_at_the_cap() {
        let mut m = response("n0.example.", RecordType::A);
        for i in 0..20 {
            m.add_answer(cname(
                &format!("n{i}.example."),
                60,
                &format!("n{}.example.", i + 1),
            ));
        }
        m.add_answer(a("n16.example.", 60, [192, 0, 2, 16]));
        m.add_answer(a("n17.example.", 60, [192, 0, 2, 17]));
        let d = decode_response(&encode(&m));
        assert_eq!(d.learned.len(), 1);
        assert_eq!(d.learned[0].names.len(), MAX_CNAME_HOPS + 1);
        assert_eq!(d.learned[0].names[16], "n16.example");
        assert_eq!(d.errors, vec![WireError::CnameLoop, WireError::Unrelated]);
    }

    #[test]
    fn ttl_zero_and_top_bit_ttl() {
        let mut m = response("z.example.", RecordType::A);
        m.add_answer(a("z.example.", 0, [192, 0, 2, 1]));
        m.add_answer(a("z.example.", 0x8000_0000, [192, 0, 2, 2]));
        let d = decode_response(&encode(&m));
        assert_eq!(
            d.learned,
            vec![
                learned(Ipv4Addr::new(192, 0, 2, 1), &["z.example"], 0),
                learned(Ipv4Addr::new(192, 0, 2, 2), &["z.example"], 0),
            ]
        );
    }

    #[test]
    fn truncated_message_keeps_earlier_records() {
        let mut m = response("www.example.com.", RecordType::A);
        m.add_answer(a("www.example.com.", 60, [192, 0, 2, 1]));
        m.add_answer(a("www.example.com.", 60, [192, 0, 2, 2]));
        let bytes = encode(&m);
        let d = decode_response(&bytes[..bytes.len() - 3]);
        assert_eq!(
            d.learned,
            vec![learned(
                Ipv4Addr::new(192, 0, 2, 1),
                &["www.example.com"],
                60
            )]
        );
        assert_eq!(d.errors, vec![WireError::Truncated]);
        // Cut inside the header.
        assert_eq!(
            decode_response(&bytes[..7]).errors,
            vec![WireError::Truncated]
        );
    }

    #[test]
    fn section_count_too_high_and_too_low() {
        let mut m = response("www.example.com.", RecordType::A);
        m.add_answer(a("www.example.com.", 60, [192, 0, 2, 1]));
        m.add_answer(a("www.example.com.", 60, [192, 0, 2, 2]));
        let bytes = encode(&m);
        let both = vec![
            learned(Ipv4Addr::new(192, 0, 2, 1), &["www.example.com"], 60),
            learned(Ipv4Addr::new(192, 0, 2, 2), &["www.example.com"], 60),
        ];

        let mut more = bytes.clone();
        more[7] = 3;
        let d = decode_response(&more);
        assert_eq!(d.learned, both);
        assert_eq!(
            d.errors,
            vec![WireError::SectionCount {
                section: Section::Answer,
                claimed: 3,
                found: 2
            }]
        );

        let mut extra_additional = bytes.clone();
        extra_additional[11] = 1;
        let d = decode_response(&extra_additional);
        assert_eq!(d.learned, both);
        assert_eq!(
            d.errors,
            vec![WireError::SectionCount {
                section: Section::Additional,
                claimed: 1,
                found: 0
            }]
        );

        let mut fewer = bytes.clone();
        fewer[7] = 1;
        let d = decode_response(&fewer);
        assert_eq!(d.learned, both[..1].to_vec());
        assert_eq!(d.errors, vec![WireError::TrailingBytes(16)]);
    }

    #[test]
    fn trailing_bytes_are_reported() {
        let mut m = response("www.example.com.", RecordType::A);
        m.add_answer(a("www.example.com.", 60, [192, 0, 2, 1]));
        let mut bytes = encode(&m);
        bytes.extend([1, 2, 3]);
        let d = decode_response(&bytes);
        assert_eq!(d.learned.len(), 1);
        assert_eq!(d.errors, vec![WireError::TrailingBytes(3)]);
    }

    #[test]
    fn compression_loop_is_skipped_when_its_extent_is_known() {
        let mut msg = handmade(0x8180, [1, 2, 0, 0]);
        // Answer 1: the owner is a pointer to itself.
        let at = msg.len() as u8;
        msg.extend([0xc0, at]);
        msg.extend(a_tail(1));
        // Answer 2: a pointer to the question name.
        msg.extend([0xc0, QUESTION_NAME_AT]);
        msg.extend(a_tail(2));
        let d = decode_response(&msg);
        assert_eq!(
            d.learned,
            vec![learned(
                Ipv4Addr::new(192, 0, 2, 2),
                &["www.example.com"],
                60
            )]
        );
        assert_eq!(d.errors, vec![WireError::BadPointer]);
    }

    #[test]
    fn two_pointer_loop_in_the_question() {
        // The question name: label "a", then a pointer to 16, which points back to 12.
        let mut msg = vec![0, 1, 0x81, 0x80, 0, 1, 0, 0, 0, 0, 0, 0];
        msg.extend([1, b'a', 0xc0, 16, 0xc0, 12, 0, 1, 0, 1]);
        let d = decode_response(&msg);
        assert_eq!(d.question, None);
        assert_eq!(d.learned, vec![]);
        assert_eq!(d.errors, vec![WireError::BadPointer]);
    }

    #[test]
    fn label_of_64_bytes_stops_decoding() {
        let mut msg = handmade(0x8180, [1, 2, 0, 0]);
        msg.extend([0xc0, QUESTION_NAME_AT]);
        msg.extend(a_tail(1));
        msg.push(64);
        msg.extend([b'x'; 64]);
        msg.push(0);
        msg.extend(a_tail(2));
        let d = decode_response(&msg);
        assert_eq!(
            d.learned,
            vec![learned(
                Ipv4Addr::new(192, 0, 2, 1),
                &["www.example.com"],
                60
            )]
        );
        assert_eq!(d.errors, vec![WireError::LabelTooLong]);
    }

    #[test]
    fn name_over_255_bytes_is_skipped() {
        let mut msg = handmade(0x8180, [1, 2, 0, 0]);
        for _ in 0..5 {
            msg.push(63);
            msg.extend([b'y'; 63]);
        }
        msg.push(0);
        msg.extend(a_tail(1));
        msg.extend([0xc0, QUESTION_NAME_AT]);
        msg.extend(a_tail(2));
        let d = decode_response(&msg);
        assert_eq!(
            d.learned,
            vec![learned(
                Ipv4Addr::new(192, 0, 2, 2),
                &["www.example.com"],
                60
            )]
        );
        assert_eq!(d.errors, vec![WireError::NameTooLong]);
    }

    #[test]
    fn bad_rdata_is_skipped() {
        let mut msg = handmade(0x8180, [1, 3, 0, 0]);
        // An A record with 5 bytes of data, then one with none.
        msg.extend([
            0xc0,
            QUESTION_NAME_AT,
            0,
            1,
            0,
            1,
            0,
            0,
            0,
            60,
            0,
            5,
            1,
            2,
            3,
            4,
            5,
        ]);
        msg.extend([0xc0, QUESTION_NAME_AT, 0, 1, 0, 1, 0, 0, 0, 60, 0, 0]);
        msg.extend([0xc0, QUESTION_NAME_AT]);
        msg.extend(a_tail(3));
        let d = decode_response(&msg);
        assert_eq!(
            d.learned,
            vec![learned(
                Ipv4Addr::new(192, 0, 2, 3),
                &["www.example.com"],
                60
            )]
        );
        assert_eq!(d.errors, vec![WireError::BadRdata, WireError::BadRdata]);
    }

    #[test]
    fn rdata_cut_short_is_truncated() {
        let mut msg = handmade(0x8180, [1, 1, 0, 0]);
        msg.extend([0xc0, QUESTION_NAME_AT]);
        msg.extend(&a_tail(1)[..12]);
        let d = decode_response(&msg);
        assert_eq!(d.learned, vec![]);
        assert_eq!(d.errors, vec![WireError::Truncated]);
    }

    #[test]
    fn nxdomain_teaches_nothing() {
        let mut m = response("gone.example.", RecordType::A);
        m.metadata.response_code = ResponseCode::NXDomain;
        m.add_answer(a("gone.example.", 60, [192, 0, 2, 1]));
        let d = decode_response(&encode(&m));
        assert_eq!(d.rcode, 3);
        assert_eq!(d.question, Some(("gone.example".into(), 1)));
        assert_eq!(d.learned, vec![]);
        assert_eq!(d.errors, vec![WireError::Rcode(3)]);
    }

    #[test]
    fn a_query_teaches_nothing() {
        let mut m = Message::new(7, MessageType::Query, OpCode::Query);
        m.add_query(Query::query(name("www.example.com."), RecordType::A));
        m.add_answer(a("www.example.com.", 60, [192, 0, 2, 1]));
        let d = decode_response(&encode(&m));
        assert_eq!(d.id, 7);
        assert_eq!(d.learned, vec![]);
        assert_eq!(d.errors, vec![WireError::NotResponse]);

        let mut notify = Message::new(8, MessageType::Response, OpCode::Notify);
        notify.add_query(Query::query(name("www.example.com."), RecordType::A));
        notify.add_answer(a("www.example.com.", 60, [192, 0, 2, 1]));
        let d = decode_response(&encode(&notify));
        assert_eq!(d.learned, vec![]);
        assert_eq!(d.errors, vec![WireError::Opcode(4)]);
    }

    #[test]
    fn two_questions_teach_nothing() {
        let mut m = response("one.example.", RecordType::A);
        m.add_query(Query::query(name("two.example."), RecordType::A));
        m.add_answer(a("one.example.", 60, [192, 0, 2, 1]));
        let d = decode_response(&encode(&m));
        assert_eq!(d.question, Some(("one.example".into(), 1)));
        assert_eq!(d.learned, vec![]);
        assert_eq!(d.errors, vec![WireError::Questions(2)]);

        let d = decode_response(&handmade(0x8180, [0, 0, 0, 0])[..12]);
        assert_eq!(d.question, None);
        assert_eq!(d.errors, vec![WireError::Questions(0)]);
    }

    #[test]
    fn the_tc_flag_is_reported() {
        let mut m = response("big.example.", RecordType::A);
        m.metadata.truncation = true;
        m.add_answer(a("big.example.", 60, [192, 0, 2, 1]));
        let d = decode_response(&encode(&m));
        assert!(d.truncated_flag);
        assert_eq!(d.learned.len(), 1);
    }

    #[test]
    fn odd_bytes_in_names_are_escaped() {
        let odd = Name::from_labels([&b"A b.\x01\\"[..], b"Example"]).unwrap();
        let mut m = Message::response(1, OpCode::Query);
        m.add_query(Query::query(odd.clone(), RecordType::A));
        m.add_answer(Record::from_rdata(
            odd,
            60,
            RData::A(A(Ipv4Addr::new(192, 0, 2, 1))),
        ));
        let d = decode_response(&encode(&m));
        assert_eq!(
            d.learned,
            vec![learned(
                Ipv4Addr::new(192, 0, 2, 1),
                &["a\\032b\\046\\001\\092.example"],
                60
            )]
        );
    }

    #[test]
    fn other_records_are_passed_over() {
        let mut m = response("www.example.com.", RecordType::A);
        m.add_answer(Record::from_rdata(
            name("www.example.com."),
            60,
            RData::TXT(TXT::new(vec!["hello".into()])),
        ));
        m.add_answer(a("www.example.com.", 60, [192, 0, 2, 1]));
        let d = decode_response(&encode(&m));
        assert_eq!(d.learned.len(), 1);
        assert_eq!(d.errors, vec![]);
    }

    #[test]
    fn random_bytes_do_not_panic() {
        // xorshift: deterministic noise, with and without a plausible response header.
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for round in 0..2_000 {
            let len = (round % 200) + 1;
            let mut msg: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            if round % 2 == 0 && msg.len() >= 12 {
                msg[2..6].copy_from_slice(&[0x81, 0x80, 0, 1]);
            }
            let d = decode_response(&msg);
            for l in &d.learned {
                assert_eq!(Some(&l.names[0]), d.question.as_ref().map(|q| &q.0));
            }
        }
    }

    #[test]
    fn tcp_framing() {
        let stream = [0, 2, b'a', b'b', 0, 0, 0, 3, b'x'];
        let (messages, used) = tcp_messages(&stream);
        assert_eq!(messages, vec![&b"ab"[..], &b""[..]]);
        assert_eq!(used, 6);
        assert_eq!(tcp_messages(&[0]), (vec![], 0));
    }

    #[test]
    fn every_reason_is_listed() {
        let all = [
            WireError::NotResponse,
            WireError::Opcode(1),
            WireError::Rcode(2),
            WireError::Questions(0),
            WireError::InvalidName,
            WireError::SectionCount {
                section: Section::Answer,
                claimed: 1,
                found: 0,
            },
            WireError::TrailingBytes(1),
            WireError::Unrelated,
            WireError::CnameLoop,
            WireError::BadPointer,
            WireError::LabelTooLong,
            WireError::NameTooLong,
            WireError::Truncated,
            WireError::BadRdata,
            WireError::Other(String::new()),
        ];
        let reasons: Vec<&str> = all.iter().map(WireError::reason).collect();
        assert_eq!(reasons, WIRE_REASONS);
    }
}
