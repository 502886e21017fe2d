//! Names learned from DNS answers (`GET /v1/dns`, `GET /v1/dns/names`, `lb-ctl dns`): the
//! capture's counters and the name store.

use std::{collections::BTreeMap, net::IpAddr};

use serde::{Deserialize, Serialize};

use crate::{error::Error, routes::query_string};

/// One entry of the name store: what `client` was told `address` is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnsEntryView {
    /// Who asked (the answer's destination).
    pub client: IpAddr,
    pub address: IpAddr,
    /// The name asked for, then the CNAME chain to the record that gave the address.
    pub names: Vec<String>,
    /// The TTL as answered, in seconds.
    pub ttl: u32,
    /// Seconds since the answer.
    pub age_seconds: u64,
    /// Seconds until it expires (past its TTL while `held`: until the grace period ends).
    pub expires_in_seconds: u64,
    /// Kept past its TTL because the conntrack holds a live flow to the address.
    pub held: bool,
    /// Who answered.
    pub resolver: IpAddr,
}

/// Query of `GET /v1/dns/names`: every filter given must match.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsNamesQuery {
    /// The learned address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// Who asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client: Option<String>,
    /// A name of the entry (the name asked for or one of its CNAMEs), case-insensitive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl DnsNamesQuery {
    /// The addresses, parsed; a malformed one is an invalid argument.
    pub fn parsed(&self) -> Result<(Option<IpAddr>, Option<IpAddr>), Error> {
        let parse = |what: &'static str, v: &Option<String>| -> Result<Option<IpAddr>, Error> {
            v.as_deref()
                .map(|s| {
                    s.parse::<IpAddr>()
                        .map_err(|_| Error::Address(what, s.to_owned()))
                })
                .transpose()
        };
        Ok((
            parse("address", &self.address)?,
            parse("client", &self.client)?,
        ))
    }

    pub fn to_query(&self) -> String {
        query_string(&[
            ("address", self.address.clone()),
            ("client", self.client.clone()),
            ("name", self.name.clone()),
        ])
    }
}

/// `GET /v1/dns`: the module, its capture and its store.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnsStatus {
    pub enabled: bool,
    pub up: bool,
    /// Why it is off, when it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Interfaces the capture runs on (`lo` on ingress only).
    pub interfaces: Vec<String>,
    /// Responses copied by the programs.
    pub captured: u64,
    /// Responses not seen, by cause, counted in the kernel: `rate_limited`, `buffer_full` (the
    /// ring buffer was full).
    pub lost: BTreeMap<String, u64>,
    /// Responses cut at the snap length (parsed as far as they go).
    pub snap_cut: u64,
    /// DNS messages decoded (UDP datagrams and reassembled TCP messages).
    pub messages: u64,
    /// Duplicates dropped (the same response seen on two interfaces).
    pub duplicates: u64,
    /// Answers with the TC bit (truncated by the server: the client retries over TCP).
    pub truncated_answers: u64,
    /// Addresses learned (new or refreshed entries).
    pub answers: u64,
    /// Problems met, by reason (a message may count several).
    pub parse_errors: BTreeMap<String, u64>,
    /// Entries and distinct names in the store.
    pub entries: u64,
    pub names: u64,
    /// Entries kept past their TTL by a live flow.
    pub held: u64,
    pub expired: u64,
    /// Entries evicted, by cause: `lru` (the store is full), `name_cap` (too many addresses
    /// for one name).
    pub evictions: BTreeMap<String, u64>,
    /// TCP streams being reassembled.
    pub tcp_streams: u64,
}
