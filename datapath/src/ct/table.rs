//! The conntrack tables as the API shows them: [`CtFlow`], the listing filter [`CtFilter`].

use crate::policy::spec::dir_name;
use std::net::IpAddr;

use bpf_common::{
    PROTO_ICMP, PROTO_TCP, PROTO_UDP,
    ct::{CtEntry, CtKey, RULE_DEFAULT},
};
use conntrack::state_name;
use serde::{Deserialize, Serialize};

/// `CtFlow::table` of the tc programs' `CT_FLOWS`.
pub const TABLE_POLICY: &str = "policy";
/// `CtFlow::table` of the XDP load balancer's `LB_FLOWS`.
pub const TABLE_LB: &str = "lb";

fn policy_table() -> String {
    TABLE_POLICY.into()
}

/// A tracked flow, as listed by `lb-ctl conntrack list`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CtFlow {
    /// The conntrack table holding it: [`TABLE_POLICY`] (`CT_FLOWS`) or [`TABLE_LB`]
    /// (`LB_FLOWS`, whose records are the same `CtEntry`).
    #[serde(default = "policy_table")]
    pub table: String,
    pub protocol: String,
    /// Original direction: source and destination.
    pub src: String,
    pub src_port: u16,
    pub dst: String,
    pub dst_port: u16,
    pub state: String,
    pub packets_orig: u64,
    pub bytes_orig: u64,
    pub packets_reply: u64,
    pub bytes_reply: u64,
    pub rtt_ns: u64,
    pub age_ns: u64,
    pub idle_ns: u64,
    pub ifindex: u32,
    /// Deciding rule id, or `None` for the default action.
    pub rule: Option<u32>,
    pub policy_direction: String,
    /// The name the source asked DNS for the destination (the `dns` module), if any.
    #[serde(default)]
    pub dst_name: Option<String>,
    /// The name the destination asked DNS for the source.
    #[serde(default)]
    pub src_name: Option<String>,
    /// The process that opened the connection (the `exec` module), if known.
    #[serde(default)]
    pub pid: Option<u32>,
    /// That process's program.
    #[serde(default)]
    pub exe: Option<String>,
}

/// The protocol name of an IP protocol number.
pub fn proto_name(proto: u8) -> String {
    match proto {
        PROTO_TCP => "tcp".into(),
        PROTO_UDP => "udp".into(),
        PROTO_ICMP => "icmp".into(),
        lb_core::parse6::PROTO_ICMPV6 => "icmpv6".into(),
        p => p.to_string(),
    }
}

/// An address of a map key (`bpf_common::Addr16`, wire order) of family `family`.
pub use bpf_common::ip_from_addr16 as key_addr;

/// The original-direction tuple of a canonical key: (src, sport, dst, dport), ports in host
/// byte order.
pub fn original_tuple(key: &CtKey, orig_side: u8) -> (IpAddr, u16, IpAddr, u16) {
    let a = key_addr(&key.addr_a, key.family);
    let b = key_addr(&key.addr_b, key.family);
    let pa = u16::from_be(key.port_a_be);
    let pb = u16::from_be(key.port_b_be);
    if orig_side == 0 {
        (a, pa, b, pb)
    } else {
        (b, pb, a, pa)
    }
}

impl CtFlow {
    pub fn from_entry(key: &CtKey, e: &CtEntry, now_ns: u64) -> Self {
        let (src, sp, dst, dp) = original_tuple(key, e.orig_side);
        CtFlow {
            table: TABLE_POLICY.into(),
            protocol: proto_name(key.proto),
            src: src.to_string(),
            src_port: sp,
            dst: dst.to_string(),
            dst_port: dp,
            state: state_name(key.proto, e.state).to_string(),
            packets_orig: e.packets[0],
            bytes_orig: e.bytes[0],
            packets_reply: e.packets[1],
            bytes_reply: e.bytes[1],
            rtt_ns: e.rtt_ns,
            age_ns: now_ns.saturating_sub(e.created_ns),
            idle_ns: now_ns.saturating_sub(e.last_seen_ns),
            ifindex: e.ifindex,
            rule: (e.rule_id != RULE_DEFAULT).then_some(e.rule_id),
            policy_direction: dir_name(e.policy_dir).to_string(),
            dst_name: None,
            src_name: None,
            pid: None,
            exe: None,
        }
    }
}

impl CtFlow {
    /// A load-balancer flow: its conntrack record, without the policy fields (it was admitted
    /// by no rule; `ifindex` is where its first packet arrived).
    pub fn from_lb_entry(key: &CtKey, e: &bpf_common::FlowEntry, now_ns: u64) -> Self {
        CtFlow {
            table: TABLE_LB.into(),
            rule: None,
            policy_direction: "-".into(),
            ..CtFlow::from_entry(key, &e.ct, now_ns)
        }
    }
}

/// The order of `lb-ctl conntrack list`: by table, protocol, then the original tuple.
pub fn sort_flows(flows: &mut [CtFlow]) {
    flows.sort_by(|a, b| {
        (
            &a.table,
            &a.protocol,
            &a.src,
            a.src_port,
            &a.dst,
            a.dst_port,
        )
            .cmp(&(
                &b.table,
                &b.protocol,
                &b.src,
                b.src_port,
                &b.dst,
                b.dst_port,
            ))
    });
}

/// Filters of `conntrack list` / `flush`: every given field must match.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CtFilter {
    /// Either endpoint's address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// Either endpoint's port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    /// State name, case-insensitive (`established`, `time_wait`, `replied`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    /// `policy` or `lb`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table: Option<String>,
}

/// Every state name a conntrack record can show (TCP's, then UDP's and ICMP's pseudo-states).
pub fn ct_state_names() -> Vec<&'static str> {
    let mut names: Vec<&'static str> = conntrack::TcpState::ALL.iter().map(|s| s.name()).collect();
    for extra in [
        conntrack::UdpState::New.name(),
        conntrack::UdpState::Replied.name(),
    ] {
        if !names.contains(&extra) {
            names.push(extra);
        }
    }
    names
}

impl CtFilter {
    /// Refuses a filter that can match nothing because a value is not one the table can hold:
    /// an unknown state, protocol or table is an invalid argument, not an empty answer.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if let Some(state) = &self.state {
            let names = ct_state_names();
            if !names.iter().any(|n| n.eq_ignore_ascii_case(state)) {
                let accepted: Vec<String> = names.iter().map(|n| n.to_ascii_lowercase()).collect();
                return Err(format!(
                    "unknown state {state:?}: accepted: {}",
                    accepted.join(", ")
                ));
            }
        }
        if let Some(protocol) = &self.protocol {
            let named = ["tcp", "udp", "icmp", "icmpv6"]
                .iter()
                .any(|p| p.eq_ignore_ascii_case(protocol));
            if !named && protocol.parse::<u8>().is_err() {
                return Err(format!(
                    "unknown protocol {protocol:?}: accepted: tcp, udp, icmp, icmpv6, or a number 0-255"
                ));
            }
        }
        if let Some(table) = &self.table
            && !["policy", "lb"]
                .iter()
                .any(|t| t.eq_ignore_ascii_case(table))
        {
            return Err(format!("unknown table {table:?}: accepted: policy, lb"));
        }
        Ok(())
    }

    pub fn matches(&self, f: &CtFlow) -> bool {
        // Compared as addresses, so any spelling of an IPv6 address matches.
        let same = |a: &str, b: &str| match (a.parse::<IpAddr>(), b.parse::<IpAddr>()) {
            (Ok(a), Ok(b)) => a == b,
            _ => a == b,
        };
        self.address
            .as_ref()
            .is_none_or(|a| same(a, &f.src) || same(a, &f.dst))
            && self.port.is_none_or(|p| p == f.src_port || p == f.dst_port)
            && self
                .protocol
                .as_ref()
                .is_none_or(|p| p.eq_ignore_ascii_case(&f.protocol))
            && self
                .state
                .as_ref()
                .is_none_or(|s| s.eq_ignore_ascii_case(&f.state))
            && self
                .table
                .as_ref()
                .is_none_or(|t| t.eq_ignore_ascii_case(&f.table))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_keys_list_as_ipv6_addresses_and_filter_by_any_spelling() {
        let key = CtKey {
            addr_a: bpf_common::addr16_from_ipv6_octets(
                "2001:db8::1"
                    .parse::<std::net::Ipv6Addr>()
                    .unwrap()
                    .octets(),
            ),
            addr_b: bpf_common::addr16_from_ipv6_octets(
                "2001:db8:64::10"
                    .parse::<std::net::Ipv6Addr>()
                    .unwrap()
                    .octets(),
            ),
            port_a_be: 40000u16.to_be(),
            port_b_be: 80u16.to_be(),
            proto: PROTO_TCP,
            family: bpf_common::FAMILY_IPV6,
            _pad: [0; 2],
        };
        let (src, sp, dst, dp) = original_tuple(&key, 1);
        assert_eq!(src.to_string(), "2001:db8:64::10");
        assert_eq!((sp, dp), (80, 40000));
        assert_eq!(dst.to_string(), "2001:db8::1");
        let flow = CtFlow::from_entry(&key, &CtEntry::default(), 0);
        let filter = CtFilter {
            address: Some("2001:0db8:0000::1".into()),
            ..CtFilter::default()
        };
        assert!(filter.matches(&flow));
        let v4 = CtKey {
            addr_a: [u32::from_ne_bytes([198, 18, 0, 1]), 0, 0, 0],
            family: bpf_common::FAMILY_IPV4,
            ..key
        };
        assert_eq!(original_tuple(&v4, 0).0.to_string(), "198.18.0.1");
    }

    #[test]
    fn conntrack_filters_with_unknown_values_are_refused() {
        let ok = |f: CtFilter| f.validate().unwrap_or_else(|e| panic!("{f:?}: {e}"));
        let bad = |f: CtFilter| f.validate().expect_err(&format!("{f:?} accepted"));
        ok(CtFilter::default());
        for state in [
            "established",
            "TIME_WAIT",
            "close",
            "syn_sent",
            "new",
            "Replied",
            "none",
        ] {
            ok(CtFilter {
                state: Some(state.into()),
                ..Default::default()
            });
        }
        for protocol in ["tcp", "UDP", "icmp", "47"] {
            ok(CtFilter {
                protocol: Some(protocol.into()),
                ..Default::default()
            });
        }
        for table in ["lb", "Policy"] {
            ok(CtFilter {
                table: Some(table.into()),
                ..Default::default()
            });
        }
        let e = bad(CtFilter {
            state: Some("bogus".into()),
            ..Default::default()
        });
        assert!(e.contains("\"bogus\"") && e.contains("time_wait"), "{e}");
        assert!(
            bad(CtFilter {
                state: Some("closed".into()),
                ..Default::default()
            })
            .contains("close")
        );
        bad(CtFilter {
            protocol: Some("sctp".into()),
            ..Default::default()
        });
        bad(CtFilter {
            protocol: Some("256".into()),
            ..Default::default()
        });
        bad(CtFilter {
            table: Some("nat".into()),
            ..Default::default()
        });
    }
}
