//! The tc (TCX) policy: the policy file format, its compilation into the maps of `bpf-tc`,
//! and [`PolicyPlane`], which loads the programs, attaches them to interfaces, applies
//! policies atomically and reads the shared conntrack table.
//!
//! # Policy file
//!
//! ```yaml
//! endpoints:
//!   - interface: "veth*"          # an interface name or a pattern (`*`, `?`)
//!     default_ingress: deny       # allow | deny | log (default: allow)
//!     default_egress: allow
//!     ingress:                    # packets the interface receives
//!       - name: web
//!         cidr: 198.18.0.0/15     # remote address (default 0.0.0.0/0)
//!         protocol: tcp           # any | tcp | udp | icmp (default any)
//!         ports: 8080             # a port or "lo-hi" (default: all)
//!         action: allow
//!     egress: []                  # packets the interface sends
//! ```
//!
//! Rules are matched first to last; the first rule whose CIDR contains the remote address
//! (source for ingress, destination for egress), whose protocol matches and whose port range
//! contains the destination port decides. Without a match the default action applies. Only
//! new flows are matched: replies and related ICMP errors of admitted flows pass through the
//! conntrack.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    os::fd::AsFd as _,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, LpmTrie, MapData, PerCpuArray, PerCpuValues, lpm_trie::Key as LpmKey},
    programs::{
        SchedClassifier, TcAttachType,
        links::{FdLink, PinnedLink},
        tc::SchedClassifierLink,
    },
    util::nr_cpus,
};
use bpf_common::{
    Counter, PROTO_ICMP, PROTO_TCP, PROTO_UDP,
    ct::{CtEntry, CtKey, POLICY_DIR_EGRESS, POLICY_DIR_INGRESS, RULE_DEFAULT},
    policy::{
        ACTION_ALLOW, ACTION_DENY, ACTION_LOG, EndpointKey, EndpointPolicy, EndpointStats,
        MAX_ENDPOINTS, MAX_RULE_LISTS, MAX_RULES, MAX_RULES_PER_LIST, RULE_PREFIX_HEADER_BITS,
        Rule, RuleList, RulePrefix, defaults, globals, map_names, reason,
    },
};
use conntrack::{Timeouts, ct_timeout, is_expired, state_name};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::{
    Error, Result,
    error::{map_error, program_error, single_line},
};

/// The compiled tc object, embedded like the XDP one.
pub static TC_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/bpf-tc"));

pub const PROGRAM_INGRESS: &str = "tc_ingress";
pub const PROGRAM_EGRESS: &str = "tc_egress";

// ---------------------------------------------------------------------------------------------
// The policy file.
// ---------------------------------------------------------------------------------------------

/// What a rule or a default does with a new flow.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    #[default]
    Allow,
    Deny,
    /// Allow and report the flow as a `logged` event.
    Log,
}

impl Action {
    fn code(self) -> u8 {
        match self {
            Action::Allow => ACTION_ALLOW,
            Action::Deny => ACTION_DENY,
            Action::Log => ACTION_LOG,
        }
    }
}

/// Protocol a rule matches.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RuleProtocol {
    #[default]
    Any,
    Tcp,
    Udp,
    Icmp,
}

impl RuleProtocol {
    fn code(self) -> u8 {
        match self {
            RuleProtocol::Any => 0,
            RuleProtocol::Tcp => PROTO_TCP,
            RuleProtocol::Udp => PROTO_UDP,
            RuleProtocol::Icmp => PROTO_ICMP,
        }
    }
}

/// An IPv4 prefix, written `a.b.c.d/len` or a bare address (`/32`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cidr {
    pub addr: Ipv4Addr,
    pub len: u8,
}

impl Cidr {
    pub const ANY: Cidr = Cidr {
        addr: Ipv4Addr::UNSPECIFIED,
        len: 0,
    };

    fn mask(len: u8) -> u32 {
        if len == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(len))
        }
    }

    /// True when `self` contains every address of `other`.
    pub fn contains(&self, other: &Cidr) -> bool {
        self.len <= other.len
            && u32::from(self.addr) & Self::mask(self.len)
                == u32::from(other.addr) & Self::mask(self.len)
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl std::str::FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let (addr, len) = match s.split_once('/') {
            Some((a, l)) => (
                a,
                l.parse::<u8>()
                    .ok()
                    .filter(|l| *l <= 32)
                    .ok_or_else(|| format!("invalid prefix length in CIDR {s:?}"))?,
            ),
            None => (s, 32),
        };
        let addr: Ipv4Addr = addr
            .parse()
            .map_err(|_| format!("invalid CIDR {s:?} (expected a.b.c.d/len; IPv4 only)"))?;
        if u32::from(addr) & !Cidr::mask(len) != 0 {
            return Err(format!("CIDR {s:?} has host bits set"));
        }
        Ok(Cidr { addr, len })
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl Serialize for Cidr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// An inclusive destination port range: `8080` or `"8000-8100"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortRange {
    pub min: u16,
    pub max: u16,
}

impl PortRange {
    pub const ALL: PortRange = PortRange {
        min: 0,
        max: u16::MAX,
    };
}

impl std::fmt::Display for PortRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.min == self.max {
            write!(f, "{}", self.min)
        } else {
            write!(f, "{}-{}", self.min, self.max)
        }
    }
}

impl std::str::FromStr for PortRange {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let port = |p: &str| {
            p.trim()
                .parse::<u16>()
                .map_err(|_| format!("invalid port {p:?} in {s:?} (0-65535)"))
        };
        let (min, max) = match s.split_once('-') {
            Some((a, b)) => (port(a)?, port(b)?),
            None => (port(s)?, port(s)?),
        };
        if min > max {
            return Err(format!("port range {s:?} is empty (start > end)"));
        }
        Ok(PortRange { min, max })
    }
}

impl<'de> Deserialize<'de> for PortRange {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Num(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Num(n) => u16::try_from(n)
                .map(|p| PortRange { min: p, max: p })
                .map_err(|_| serde::de::Error::custom(format!("port {n} out of range 0-65535"))),
            Raw::Text(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

impl Serialize for PortRange {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

fn any_cidr() -> Cidr {
    Cidr::ANY
}

/// One rule of a policy file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default = "any_cidr")]
    pub cidr: Cidr,
    #[serde(default)]
    pub protocol: RuleProtocol,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<PortRange>,
    pub action: Action,
}

/// The policy of one endpoint: an interface name or pattern.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointSpec {
    pub interface: String,
    #[serde(default)]
    pub default_ingress: Action,
    #[serde(default)]
    pub default_egress: Action,
    #[serde(default)]
    pub ingress: Vec<RuleSpec>,
    #[serde(default)]
    pub egress: Vec<RuleSpec>,
}

/// A whole policy file.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicySpec {
    #[serde(default)]
    pub endpoints: Vec<EndpointSpec>,
}

/// The 1-based line of each endpoint's `interface:` key, in file order, when the file writes
/// every endpoint in block style (the common case). Only endpoints have an `interface` key
/// (rules refuse unknown keys), so the k-th such line is endpoint k's. `None` when the count
/// does not match (flow style, or a key spread over lines): no line rather than a wrong one.
fn endpoint_lines(text: &str, endpoints: usize) -> Option<Vec<usize>> {
    let lines: Vec<usize> = text
        .lines()
        .enumerate()
        .filter(|(_, l)| {
            let l = l.trim_start();
            let l = l.strip_prefix('-').map_or(l, str::trim_start);
            ["interface:", "\"interface\":", "'interface':"]
                .iter()
                .any(|k| l.starts_with(k))
        })
        .map(|(i, _)| i + 1)
        .collect();
    (lines.len() == endpoints).then_some(lines)
}

impl PolicySpec {
    /// Parses and validates a policy file. Errors name the line and the reason.
    pub fn parse(text: &str) -> Result<PolicySpec> {
        let spec: PolicySpec = if text.trim().is_empty() {
            PolicySpec::default()
        } else {
            serde_yaml_ng::from_str(text).map_err(|e| {
                let mut reason = e.to_string();
                if let Some(at) = reason.find(" at line ") {
                    reason.truncate(at);
                }
                // A value error is reported at the enclosing mapping: point at the line
                // holding the offending value when the reason quotes it.
                let mut line = e.location().map(|l| l.line());
                if let (Some(start), Some(value)) = (line, reason.split('"').nth(1))
                    && !value.is_empty()
                    && let Some(found) = text
                        .lines()
                        .enumerate()
                        .skip(start - 1)
                        .find(|(_, l)| l.contains(value))
                {
                    line = Some(found.0 + 1);
                }
                Error::Policy {
                    line,
                    reason: single_line(&reason),
                }
            })?
        };
        spec.compile_located()
            .map_err(|(endpoint, reason)| Error::Policy {
                line: endpoint.and_then(|i| {
                    endpoint_lines(text, spec.endpoints.len())
                        .and_then(|lines| lines.get(i).copied())
                }),
                reason: single_line(&reason),
            })?;
        Ok(spec)
    }

    /// Compiles the policy into map contents (endpoint ids are positions in the file).
    pub fn compile(&self) -> Result<CompiledPolicy> {
        self.compile_located().map_err(|(_, reason)| Error::Policy {
            line: None,
            reason: single_line(&reason),
        })
    }

    /// [`Self::compile`], with the index of the endpoint an error is about.
    fn compile_located(&self) -> std::result::Result<CompiledPolicy, (Option<usize>, String)> {
        let invalid = |reason: String| (None, reason);
        if self.endpoints.len() > MAX_ENDPOINTS as usize {
            return Err(invalid(format!(
                "{} endpoints; at most {MAX_ENDPOINTS}",
                self.endpoints.len()
            )));
        }
        let mut seen = BTreeSet::new();
        let mut compiled = CompiledPolicy::default();
        for (id, ep) in self.endpoints.iter().enumerate() {
            if ep.interface.is_empty() || ep.interface.len() > 15 {
                return Err((
                    Some(id),
                    format!(
                        "endpoint `{}`: interface names and patterns have 1 to 15 characters",
                        ep.interface
                    ),
                ));
            }
            if !seen.insert(ep.interface.clone()) {
                return Err((
                    Some(id),
                    format!("endpoint `{}` appears twice", ep.interface),
                ));
            }
            let mut out = CompiledEndpoint {
                pattern: ep.interface.clone(),
                id: id as u32,
                policy: EndpointPolicy {
                    endpoint_id: id as u32,
                    default_ingress: ep.default_ingress.code(),
                    default_egress: ep.default_egress.code(),
                    _pad: [0; 2],
                },
                lists: Vec::new(),
            };
            for (dir, rules) in [
                (POLICY_DIR_INGRESS, &ep.ingress),
                (POLICY_DIR_EGRESS, &ep.egress),
            ] {
                let first_id = compiled.rules.len() as u32;
                for (i, r) in rules.iter().enumerate() {
                    if r.ports.is_some()
                        && !matches!(r.protocol, RuleProtocol::Tcp | RuleProtocol::Udp)
                    {
                        return Err((
                            Some(id),
                            format!(
                                "endpoint `{}`: {} rule {}: ports need protocol tcp or udp",
                                ep.interface,
                                dir_name(dir),
                                i + 1
                            ),
                        ));
                    }
                    compiled.rules.push(RuleInfo {
                        id: compiled.rules.len() as u32,
                        endpoint: ep.interface.clone(),
                        direction: dir_name(dir).to_string(),
                        index: i,
                        name: r.name.clone(),
                        cidr: r.cidr,
                        protocol: r.protocol,
                        ports: r.ports.unwrap_or(PortRange::ALL),
                        action: r.action,
                    });
                }
                if compiled.rules.len() > MAX_RULES as usize {
                    return Err(invalid(format!("more than {MAX_RULES} rules in all")));
                }
                // One list per distinct prefix: every rule whose CIDR contains it, in order.
                let prefixes: BTreeSet<Cidr> = rules.iter().map(|r| r.cidr).collect();
                for prefix in prefixes {
                    let mut list = RuleList::default();
                    let matching: Vec<(usize, &RuleSpec)> = rules
                        .iter()
                        .enumerate()
                        .filter(|(_, r)| r.cidr.contains(&prefix))
                        .collect();
                    if matching.len() > MAX_RULES_PER_LIST {
                        return Err((
                            Some(id),
                            format!(
                                "endpoint `{}`: {} addresses in {prefix} match {} rules; at most \
                             {MAX_RULES_PER_LIST} rules may apply to one prefix",
                                ep.interface,
                                dir_name(dir),
                                matching.len()
                            ),
                        ));
                    }
                    list.count = matching.len() as u32;
                    for (slot, (i, r)) in list.rules.iter_mut().zip(matching) {
                        let ports = r.ports.unwrap_or(PortRange::ALL);
                        *slot = Rule {
                            rule_id: first_id + i as u32,
                            port_min: ports.min,
                            port_max: ports.max,
                            proto: r.protocol.code(),
                            action: r.action.code(),
                            _pad: [0; 2],
                        };
                    }
                    out.lists.push((dir, prefix, list));
                }
            }
            compiled.list_count += out.lists.len();
            compiled.endpoints.push(out);
        }
        if compiled.list_count > MAX_RULE_LISTS as usize {
            return Err(invalid(format!(
                "{} distinct (endpoint, direction, CIDR) combinations; at most {MAX_RULE_LISTS}",
                compiled.list_count
            )));
        }
        Ok(compiled)
    }
}

fn dir_name(dir: u8) -> &'static str {
    if dir == POLICY_DIR_INGRESS {
        "ingress"
    } else {
        "egress"
    }
}

/// A rule as the policy listing shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RuleInfo {
    /// Index in the rule counters.
    pub id: u32,
    pub endpoint: String,
    pub direction: String,
    /// Position in the endpoint's rules of that direction (0-based).
    pub index: usize,
    pub name: Option<String>,
    pub cidr: Cidr,
    pub protocol: RuleProtocol,
    pub ports: PortRange,
    pub action: Action,
}

#[derive(Clone, Debug)]
pub struct CompiledEndpoint {
    pub pattern: String,
    pub id: u32,
    pub policy: EndpointPolicy,
    /// (direction, prefix, rules that apply to it).
    pub lists: Vec<(u8, Cidr, RuleList)>,
}

/// Map contents of a policy.
#[derive(Clone, Debug, Default)]
pub struct CompiledPolicy {
    pub endpoints: Vec<CompiledEndpoint>,
    pub rules: Vec<RuleInfo>,
    pub list_count: usize,
}

impl RuleInfo {
    /// The rule's user-visible name: its `name`, else `#<index>` (its position among the
    /// endpoint's rules of its direction). The `rule` label of the metrics.
    pub fn label(&self) -> String {
        self.name
            .clone()
            .unwrap_or_else(|| format!("#{}", self.index))
    }

    /// What identifies the rule across policy generations (see [`PolicyPlane`] on counters).
    fn identity(&self) -> RuleIdentity {
        (self.endpoint.clone(), self.direction.clone(), self.label())
    }
}

/// (endpoint pattern, direction, label): a rule's identity across generations.
type RuleIdentity = (String, String, String);

impl CompiledPolicy {
    /// The endpoint governing interface `name`: the first whose pattern matches.
    pub fn endpoint_for(&self, name: &str) -> Option<&CompiledEndpoint> {
        self.endpoints
            .iter()
            .find(|ep| pattern_matches(&ep.pattern, name))
    }
}

/// Shell-style pattern match with `*` and `?` (no character classes). Iterative, bounded by
/// the lengths of both strings.
pub fn pattern_matches(pattern: &str, name: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    let (mut pi, mut ni) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == n[ni]) {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ni));
            pi += 1;
        } else if let Some((sp, sn)) = star {
            pi = sp + 1;
            ni = sn + 1;
            star = Some((sp, sn + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

// ---------------------------------------------------------------------------------------------
// The plane: programs, maps, attachment.
// ---------------------------------------------------------------------------------------------

/// Settings of the policy plane.
#[derive(Clone, Debug)]
pub struct PolicyConfig {
    pub pin_root: PathBuf,
    /// Entries of `CT_FLOWS`.
    pub max_ct_flows: u32,
    /// Flow events per second and CPU.
    pub event_rate: u64,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self {
            pin_root: PathBuf::from(bpf_common::defaults::PIN_ROOT),
            max_ct_flows: defaults::MAX_CT_FLOWS,
            event_rate: defaults::EVENT_RATE,
        }
    }
}

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
}

/// The protocol name of an IP protocol number.
pub fn proto_name(proto: u8) -> String {
    match proto {
        PROTO_TCP => "tcp".into(),
        PROTO_UDP => "udp".into(),
        PROTO_ICMP => "icmp".into(),
        p => p.to_string(),
    }
}

/// The original-direction tuple of a canonical key: (src, sport, dst, dport), ports in host
/// byte order.
pub fn original_tuple(key: &CtKey, orig_side: u8) -> (Ipv4Addr, u16, Ipv4Addr, u16) {
    let a = Ipv4Addr::from(key.addr_a[0].to_ne_bytes());
    let b = Ipv4Addr::from(key.addr_b[0].to_ne_bytes());
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
            let named = ["tcp", "udp", "icmp"]
                .iter()
                .any(|p| p.eq_ignore_ascii_case(protocol));
            if !named && protocol.parse::<u8>().is_err() {
                return Err(format!(
                    "unknown protocol {protocol:?}: accepted: tcp, udp, icmp, or a number 0-255"
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
        self.address
            .as_ref()
            .is_none_or(|a| *a == f.src || *a == f.dst)
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

/// Counters of one rule (summed over CPUs).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RuleStats {
    #[serde(flatten)]
    pub rule: RuleInfo,
    pub packets: u64,
    pub bytes: u64,
}

/// Counters of one endpoint (summed over CPUs), by direction.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct EndpointCounters {
    pub endpoint: String,
    pub interfaces: Vec<String>,
    pub ingress: DirCounters,
    pub egress: DirCounters,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct DirCounters {
    pub allowed: u64,
    pub denied: u64,
    pub default_hits: u64,
    pub tracked: u64,
    pub cut: u64,
}

/// What `policy list` shows.
#[derive(Clone, Debug, Default, Serialize)]
pub struct PolicyStatus {
    pub generation: u32,
    pub policy: PolicySpec,
    pub endpoints: Vec<EndpointCounters>,
    pub rules: Vec<RuleStats>,
    pub reasons: BTreeMap<String, u64>,
}

/// The tc programs, their maps and their TCX links.
///
/// # Counters across applies
///
/// The programs count per rule id and endpoint id *within a slot* (`TC_RULE_STATS`,
/// `TC_EP_STATS`), and ids are positions in the policy file, so a slot's counters must be
/// zeroed before a new policy is written into it. Reporting them as they are would make the
/// exported Prometheus counters go down at every apply (and at every interface attach, which
/// rewrites the policy). Instead, what [`PolicyPlane::status`] reports is monotonic per
/// user-visible identity, a rule's (endpoint pattern, direction, name or `#index`) and an
/// endpoint's pattern:
///
/// `retired (folded totals) + the inactive slot (the previous generation) + the live slot`.
///
/// Before [`PolicyPlane::apply`] zeroes the inactive slot, it folds that slot's counters
/// (read with the policy this process wrote there) into `retired`. The slot has not been
/// live for a whole generation by then, so no packet still counts into it; the live and the
/// previous slot are both read at every status, so packets of the old generation still in
/// flight right after a flip are counted too. A rule that is renamed or an unnamed rule that
/// moves starts a new identity (as its metric labels do); one that disappears and comes back
/// continues from its total. The totals live in this process: a restarted daemon starts from
/// zero, like any Prometheus counter after a process restart.
pub struct PolicyPlane {
    bpf: Ebpf,
    config: PolicyConfig,
    /// Interface name -> (ifindex, ingress link, egress link). The links are pinned (see
    /// [`tcx_link_pin`]), so they outlive this process.
    links: BTreeMap<String, (u32, PinnedLink, PinnedLink)>,
    policy: PolicySpec,
    compiled: CompiledPolicy,
    /// The policy this process wrote into the inactive slot (the previous generation), whose
    /// counters still count; `None` when that slot was not written by this process or its
    /// counters were folded into `retired_*` already.
    previous: Option<CompiledPolicy>,
    /// Counters of generations whose slot was reused, by rule identity.
    retired_rules: BTreeMap<RuleIdentity, Counter>,
    /// Counters of generations whose slot was reused, by endpoint pattern.
    retired_endpoints: BTreeMap<String, EndpointStats>,
}

fn add_counter(into: &mut Counter, c: &Counter) {
    into.packets += c.packets;
    into.bytes += c.bytes;
}

fn add_endpoint_stats(into: &mut EndpointStats, s: &EndpointStats) {
    for d in 0..2 {
        into.allowed[d] += s.allowed[d];
        into.denied[d] += s.denied[d];
        into.default_hits[d] += s.default_hits[d];
        into.tracked[d] += s.tracked[d];
        into.cut[d] += s.cut[d];
    }
}

/// The layout this build's tc object gives its pinned maps with plain keys and values (the LPM
/// trie and the ring buffer are left out: their kernel sizes are not the ABI types' sizes).
fn tc_abi_layouts() -> [crate::dataplane::PinLayout; 8] {
    use bpf_common::policy::{MAX_ENDPOINTS, MAX_RULE_LISTS, MAX_RULES, RateBucket};
    use std::mem::size_of;
    [
        (
            map_names::CT_FLOWS,
            size_of::<CtKey>(),
            size_of::<CtEntry>(),
            None,
        ),
        (map_names::GENERATION, 4, 4, Some(1)),
        (
            map_names::ENDPOINTS,
            size_of::<EndpointKey>(),
            size_of::<EndpointPolicy>(),
            Some(MAX_ENDPOINTS * 2),
        ),
        (
            map_names::RULE_LISTS,
            4,
            size_of::<RuleList>(),
            Some(MAX_RULE_LISTS * 2),
        ),
        (
            map_names::RULE_STATS,
            4,
            size_of::<bpf_common::Counter>(),
            Some(MAX_RULES * 2),
        ),
        (
            map_names::EP_STATS,
            4,
            size_of::<EndpointStats>(),
            Some(MAX_ENDPOINTS * 2),
        ),
        (map_names::REASONS, 4, 8, Some(reason::COUNT)),
        (map_names::EVENT_RATE, 4, size_of::<RateBucket>(), Some(1)),
    ]
}

/// Where the TCX link of program `prog` on `interface` is pinned: beside the XDP links, so
/// `datapathd cleanup` removes it with them.
pub fn tcx_link_pin(pin_root: &Path, prog: &str, interface: &str) -> PathBuf {
    pin_root.join("links").join(format!("{prog}_{interface}"))
}

/// Unpins (and so detaches) every pinned TCX link under `pin_root` whose interface is not in
/// `keep`: what a previous run left for interfaces that are no longer configured, or for a
/// policy module that is now off.
pub fn unpin_tcx_links(pin_root: &Path, keep: &[String]) -> Result<()> {
    let dir = pin_root.join("links");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Ok(());
    };
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(format!("list {}", dir.display()), e))?;
        let file = entry.file_name().to_string_lossy().into_owned();
        let interface = [PROGRAM_INGRESS, PROGRAM_EGRESS]
            .iter()
            .find_map(|prog| file.strip_prefix(&format!("{prog}_")).map(str::to_string));
        if let Some(interface) = interface
            && !keep.contains(&interface)
        {
            std::fs::remove_file(entry.path()).map_err(|e| {
                Error::io(format!("remove pinned link {}", entry.path().display()), e)
            })?;
            info!(
                interface,
                link = file,
                "unpinned a TCX link of an interface no longer governed"
            );
        }
    }
    Ok(())
}

/// Names of the interfaces of the current network namespace (`if_nameindex`: `/sys/class/net`
/// shows the namespace sysfs was mounted in, not necessarily the process's own).
pub fn list_interfaces() -> Result<Vec<String>> {
    Ok(crate::config::interface_names())
}

impl PolicyPlane {
    /// Loads the tc object, reusing (or creating) the maps pinned under `config.pin_root`.
    pub fn start(config: &PolicyConfig) -> Result<Self> {
        if TC_OBJECT.is_empty() {
            return Err(Error::InvalidArgument(
                "this datapathd was built without its BPF programs (AYA_BUILD_SKIP)".into(),
            ));
        }
        std::fs::create_dir_all(&config.pin_root)
            .map_err(|e| Error::io(format!("create pin root {}", config.pin_root.display()), e))?;
        crate::dataplane::replace_incompatible_pins(&config.pin_root, &tc_abi_layouts())?;
        let mut loader = EbpfLoader::new();
        loader
            .default_map_pin_directory(&config.pin_root)
            .map_max_entries(map_names::CT_FLOWS, config.max_ct_flows)
            .override_global(globals::EVENT_RATE, &config.event_rate, true);
        let mut bpf = loader.load(TC_OBJECT).map_err(|source| Error::Load {
            source: Box::new(source),
            context: format!(
                "load the tc object with maps pinned under {}",
                config.pin_root.display()
            ),
        })?;
        for name in [PROGRAM_INGRESS, PROGRAM_EGRESS] {
            let program: &mut SchedClassifier = bpf
                .program_mut(name)
                .ok_or_else(|| Error::InvalidArgument(format!("program {name} missing")))?
                .try_into()
                .map_err(program_error(format!("{name} is not a classifier")))?;
            program
                .load()
                .map_err(program_error(format!("load {name}")))?;
        }
        Ok(Self {
            bpf,
            config: config.clone(),
            links: BTreeMap::new(),
            policy: PolicySpec::default(),
            compiled: CompiledPolicy::default(),
            previous: None,
            retired_rules: BTreeMap::new(),
            retired_endpoints: BTreeMap::new(),
        })
    }

    pub fn config(&self) -> &PolicyConfig {
        &self.config
    }

    /// The program for tc direction `dir` (for BPF_PROG_TEST_RUN).
    pub fn program(&self, dir: u8) -> Result<&SchedClassifier> {
        let name = if dir == POLICY_DIR_INGRESS {
            PROGRAM_INGRESS
        } else {
            PROGRAM_EGRESS
        };
        self.bpf
            .program(name)
            .ok_or_else(|| Error::InvalidArgument(format!("program {name} missing")))?
            .try_into()
            .map_err(program_error(format!("{name} is not a classifier")))
    }

    /// Attaches both programs (TCX ingress and egress) to `name`. Idempotent.
    pub fn attach(&mut self, name: &str) -> Result<()> {
        if self.links.contains_key(name) {
            return Ok(());
        }
        let ifindex = crate::dataplane::interface_index(name)?;
        let (ingress, ingress_created) = self.attach_pinned(PROGRAM_INGRESS, name)?;
        let egress = match self.attach_pinned(PROGRAM_EGRESS, name) {
            Ok((link, _)) => link,
            Err(e) => {
                // No half-attached interface: undo the ingress link this call created.
                if ingress_created {
                    let _ = ingress.unpin();
                }
                return Err(e);
            }
        };
        self.links
            .insert(name.to_string(), (ifindex, ingress, egress));
        // The new interface may be governed by the live policy.
        if !self.compiled.endpoints.is_empty() {
            let compiled = self.compiled.clone();
            self.write(&compiled)?;
        }
        Ok(())
    }

    /// Attaches program `prog` to `interface` through a pinned TCX link, or swaps this
    /// process's program into the link a previous run pinned (`bpf_link_update`: the
    /// interface is never without its policy across a daemon restart or upgrade). Returns the
    /// link and whether this call created it.
    fn attach_pinned(&mut self, prog: &str, interface: &str) -> Result<(PinnedLink, bool)> {
        let pin = tcx_link_pin(&self.config.pin_root, prog, interface);
        let at = if prog == PROGRAM_INGRESS {
            TcAttachType::Ingress
        } else {
            TcAttachType::Egress
        };
        let program: &mut SchedClassifier = self
            .bpf
            .program_mut(prog)
            .ok_or_else(|| Error::InvalidArgument(format!("program {prog} missing")))?
            .try_into()
            .map_err(program_error(format!("{prog} is not a classifier")))?;
        let link_error = |what: String| {
            move |e: aya::programs::links::LinkError| {
                Error::io(what, std::io::Error::other(e.to_string()))
            }
        };
        if pin.exists() {
            let replaced = PinnedLink::from_pin(&pin)
                .map_err(link_error(format!("open pinned link {}", pin.display())))
                .and_then(|pinned| {
                    SchedClassifierLink::try_from(FdLink::from(pinned)).map_err(link_error(
                        format!("pinned link {} is not a TCX link", pin.display()),
                    ))
                })
                .and_then(|link| {
                    program
                        .attach_to_link(link)
                        .map_err(program_error(format!("replace {prog} on {interface}")))
                });
            match replaced {
                Ok(id) => {
                    // The pin keeps the link, and the program now in it, alive.
                    let link = program
                        .take_link(id)
                        .map_err(program_error("take the updated TCX link"))?;
                    drop(link);
                    let pinned = PinnedLink::from_pin(&pin)
                        .map_err(link_error(format!("reopen pinned link {}", pin.display())))?;
                    info!(
                        interface,
                        program = prog,
                        "replaced the program in the pinned TCX link"
                    );
                    return Ok((pinned, false));
                }
                Err(e) => {
                    // A link whose interface was deleted (a pod's veth re-created under the
                    // same name) cannot be updated: attach afresh.
                    warn!(interface, program = prog, error = %e, "stale pinned TCX link replaced");
                    std::fs::remove_file(&pin).map_err(|e| {
                        Error::io(format!("remove stale pinned link {}", pin.display()), e)
                    })?;
                }
            }
        }
        let id = program
            .attach(interface, at)
            .map_err(program_error(format!("attach {prog} to {interface} (TCX)")))?;
        let link = program
            .take_link(id)
            .map_err(program_error("take the new TCX link"))?;
        let fd_link = FdLink::try_from(link).map_err(link_error(format!(
            "{prog} on {interface} was attached through netlink (kernel without TCX), which \
             cannot be pinned"
        )))?;
        if let Some(dir) = pin.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
        }
        let pinned = fd_link.pin(&pin).map_err(|source| Error::Pin {
            context: format!("pin the TCX link of {prog} on {interface}"),
            source: Box::new(source),
        })?;
        Ok((pinned, true))
    }

    /// Detaches both programs from `name`: unpinning the links releases their last reference.
    pub fn detach(&mut self, name: &str) -> Result<()> {
        let Some((_, ingress, egress)) = self.links.remove(name) else {
            return Ok(());
        };
        for link in [ingress, egress] {
            link.unpin()
                .map_err(|e| Error::io(format!("unpin the TCX links of {name}"), e))?;
        }
        Ok(())
    }

    /// Attaches to every interface matching one of `patterns`, detaches from attached ones
    /// that no longer match (or are gone). Returns the attached names.
    pub fn sync_interfaces(&mut self, patterns: &[String]) -> Result<Vec<String>> {
        let present = list_interfaces()?;
        let wanted: Vec<String> = present
            .into_iter()
            .filter(|n| patterns.iter().any(|p| pattern_matches(p, n)))
            .collect();
        let stale: Vec<String> = self
            .links
            .iter()
            .filter(|(n, (idx, _, _))| {
                !wanted.contains(n) || crate::dataplane::interface_index(n).ok() != Some(*idx)
            })
            .map(|(n, _)| n.clone())
            .collect();
        for name in stale {
            if self.detach(&name).is_err() {
                // The interface is gone with its links.
                self.links.remove(&name);
            }
        }
        for name in &wanted {
            self.attach(name)?;
        }
        // Links a previous run pinned for interfaces no longer configured.
        unpin_tcx_links(&self.config.pin_root, &self.interfaces())?;
        Ok(self.interfaces())
    }

    pub fn interfaces(&self) -> Vec<String> {
        self.links.keys().cloned().collect()
    }

    pub fn policy(&self) -> &PolicySpec {
        &self.policy
    }

    /// The live generation (0: no policy).
    pub fn generation(&self) -> Result<u32> {
        let map = self
            .bpf
            .map(map_names::GENERATION)
            .ok_or_else(|| Error::InvalidArgument("TC_GENERATION missing".into()))?;
        let array: Array<&MapData, u32> =
            Array::try_from(map).map_err(map_error("TC_GENERATION"))?;
        array.get(&0, 0).map_err(map_error("read TC_GENERATION"))
    }

    /// Applies a policy whole: it is written into the inactive slot, then the generation flips
    /// in one update. On any error before the flip the old policy stays in force.
    pub fn apply(&mut self, spec: &PolicySpec) -> Result<u32> {
        let compiled = spec.compile()?;
        let generation = self.write(&compiled)?;
        self.policy = spec.clone();
        self.compiled = compiled;
        Ok(generation)
    }

    /// Removes the policy: every attached interface passes everything again (the generation
    /// flips to an empty slot, so tracked flows are re-checked and pass).
    pub fn delete(&mut self) -> Result<u32> {
        self.apply(&PolicySpec::default())
    }

    fn write(&mut self, compiled: &CompiledPolicy) -> Result<u32> {
        let live = self.generation()?;
        let mut generation = live.wrapping_add(1);
        if generation == 0 {
            generation = 2;
        }
        let slot = generation & 1;

        // Fold the inactive slot's counters (the generation before the live one) into the
        // totals before they are zeroed: see "Counters across applies" on `PolicyPlane`.
        if let Some(previous) = &self.previous {
            let rules = self.slot_rule_counters(slot, previous)?;
            let endpoints = self.slot_endpoint_counters(slot, previous)?;
            for (rule, c) in previous.rules.iter().zip(&rules) {
                add_counter(self.retired_rules.entry(rule.identity()).or_default(), c);
            }
            for (ep, c) in previous.endpoints.iter().zip(&endpoints) {
                add_endpoint_stats(
                    self.retired_endpoints
                        .entry(ep.pattern.clone())
                        .or_default(),
                    c,
                );
            }
            // Counted once: from here on the slot's counters are only in the totals.
            self.previous = None;
        }

        // Clear the inactive slot.
        {
            let mut endpoints: HashMap<&mut MapData, EndpointKey, EndpointPolicy> =
                HashMap::try_from(self.map_mut(map_names::ENDPOINTS)?)
                    .map_err(map_error("TC_ENDPOINTS"))?;
            let stale: Vec<EndpointKey> = endpoints
                .keys()
                .filter_map(|k| k.ok())
                .filter(|k| k.slot == slot)
                .collect();
            for key in stale {
                endpoints
                    .remove(&key)
                    .map_err(map_error("clear TC_ENDPOINTS"))?;
            }
        }
        {
            let mut trie: LpmTrie<&mut MapData, RulePrefix, u32> =
                LpmTrie::try_from(self.map_mut(map_names::RULES_LPM)?)
                    .map_err(map_error("TC_RULES_LPM"))?;
            let stale: Vec<LpmKey<RulePrefix>> = trie
                .keys()
                .filter_map(|k| k.ok())
                .filter(|k| u32::from(k.data().slot) == slot)
                .collect();
            for key in stale {
                trie.remove(&key).map_err(map_error("clear TC_RULES_LPM"))?;
            }
        }
        let cpus = nr_cpus().map_err(|(_, e)| Error::io("count CPUs", e))?;
        {
            let mut stats: PerCpuArray<&mut MapData, Counter> =
                PerCpuArray::try_from(self.map_mut(map_names::RULE_STATS)?)
                    .map_err(map_error("TC_RULE_STATS"))?;
            for id in 0..compiled.rules.len() as u32 {
                let zero = PerCpuValues::try_from(vec![Counter::default(); cpus])
                    .map_err(|e| Error::io("zero counters", e))?;
                stats
                    .set(slot * MAX_RULES + id, zero, 0)
                    .map_err(map_error("reset TC_RULE_STATS"))?;
            }
        }
        {
            let mut stats: PerCpuArray<&mut MapData, EndpointStats> =
                PerCpuArray::try_from(self.map_mut(map_names::EP_STATS)?)
                    .map_err(map_error("TC_EP_STATS"))?;
            for ep in &compiled.endpoints {
                let zero = PerCpuValues::try_from(vec![EndpointStats::default(); cpus])
                    .map_err(|e| Error::io("zero counters", e))?;
                stats
                    .set(slot * MAX_ENDPOINTS + ep.id, zero, 0)
                    .map_err(map_error("reset TC_EP_STATS"))?;
            }
        }

        // Write the new policy into it.
        let mut next_list = 0u32;
        for ep in &compiled.endpoints {
            for (dir, prefix, list) in &ep.lists {
                let index = slot * MAX_RULE_LISTS + next_list;
                {
                    let mut lists: Array<&mut MapData, RuleList> =
                        Array::try_from(self.map_mut(map_names::RULE_LISTS)?)
                            .map_err(map_error("TC_RULE_LISTS"))?;
                    lists
                        .set(index, *list, 0)
                        .map_err(map_error("write TC_RULE_LISTS"))?;
                }
                let mut trie: LpmTrie<&mut MapData, RulePrefix, u32> =
                    LpmTrie::try_from(self.map_mut(map_names::RULES_LPM)?)
                        .map_err(map_error("TC_RULES_LPM"))?;
                let key = LpmKey::new(
                    RULE_PREFIX_HEADER_BITS + u32::from(prefix.len),
                    RulePrefix {
                        slot: slot as u8,
                        dir: *dir,
                        endpoint_be: (ep.id as u16).to_be(),
                        addr: bpf_common::addr16_from_ipv4_octets(prefix.addr.octets()),
                    },
                );
                trie.insert(&key, next_list, 0)
                    .map_err(map_error("write TC_RULES_LPM"))?;
                next_list += 1;
            }
        }
        {
            let links: Vec<(String, u32)> = self
                .links
                .iter()
                .map(|(n, (idx, _, _))| (n.clone(), *idx))
                .collect();
            let mut endpoints: HashMap<&mut MapData, EndpointKey, EndpointPolicy> =
                HashMap::try_from(self.map_mut(map_names::ENDPOINTS)?)
                    .map_err(map_error("TC_ENDPOINTS"))?;
            for (name, ifindex) in links {
                if let Some(ep) = compiled.endpoint_for(&name) {
                    endpoints
                        .insert(EndpointKey { ifindex, slot }, ep.policy, 0)
                        .map_err(map_error("write TC_ENDPOINTS"))?;
                }
            }
        }

        // Flip: one 4-byte update.
        let mut gen_map: Array<&mut MapData, u32> =
            Array::try_from(self.map_mut(map_names::GENERATION)?)
                .map_err(map_error("TC_GENERATION"))?;
        gen_map
            .set(0, generation, 0)
            .map_err(map_error("flip TC_GENERATION"))?;
        // The policy live until now keeps its counters in what is now the inactive slot.
        self.previous = Some(self.compiled.clone());
        Ok(generation)
    }

    /// Counters of `compiled`'s rules in `slot`, summed over CPUs, in `compiled.rules` order.
    fn slot_rule_counters(&self, slot: u32, compiled: &CompiledPolicy) -> Result<Vec<Counter>> {
        let map: PerCpuArray<&MapData, Counter> =
            PerCpuArray::try_from(self.map(map_names::RULE_STATS)?)
                .map_err(map_error("TC_RULE_STATS"))?;
        compiled
            .rules
            .iter()
            .map(|r| {
                let v = map
                    .get(&(slot * MAX_RULES + r.id), 0)
                    .map_err(map_error("read TC_RULE_STATS"))?;
                Ok(Counter {
                    packets: v.iter().map(|c| c.packets).sum(),
                    bytes: v.iter().map(|c| c.bytes).sum(),
                })
            })
            .collect()
    }

    /// Counters of `compiled`'s endpoints in `slot`, summed over CPUs, in
    /// `compiled.endpoints` order.
    fn slot_endpoint_counters(
        &self,
        slot: u32,
        compiled: &CompiledPolicy,
    ) -> Result<Vec<EndpointStats>> {
        let map: PerCpuArray<&MapData, EndpointStats> =
            PerCpuArray::try_from(self.map(map_names::EP_STATS)?)
                .map_err(map_error("TC_EP_STATS"))?;
        compiled
            .endpoints
            .iter()
            .map(|ep| {
                let v = map
                    .get(&(slot * MAX_ENDPOINTS + ep.id), 0)
                    .map_err(map_error("read TC_EP_STATS"))?;
                let mut sum = EndpointStats::default();
                for s in v.iter() {
                    add_endpoint_stats(&mut sum, s);
                }
                Ok(sum)
            })
            .collect()
    }

    fn map_mut(&mut self, name: &str) -> Result<&mut aya::maps::Map> {
        self.bpf
            .map_mut(name)
            .ok_or_else(|| Error::InvalidArgument(format!("map {name} missing from the tc object")))
    }

    fn map(&self, name: &str) -> Result<&aya::maps::Map> {
        self.bpf
            .map(name)
            .ok_or_else(|| Error::InvalidArgument(format!("map {name} missing from the tc object")))
    }

    /// Drop/verdict reasons, summed over CPUs.
    pub fn reasons(&self) -> Result<BTreeMap<String, u64>> {
        let map: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(self.map(map_names::REASONS)?)
            .map_err(map_error("TC_REASONS"))?;
        let mut out = BTreeMap::new();
        for (i, name) in reason::NAMES.iter().enumerate() {
            let values = map
                .get(&(i as u32), 0)
                .map_err(map_error("read TC_REASONS"))?;
            out.insert((*name).to_string(), values.iter().sum());
        }
        Ok(out)
    }

    /// Status of the live policy with its counters. Rule and endpoint counters are totals
    /// over every generation this process applied, by identity (see "Counters across
    /// applies" on [`PolicyPlane`]), so they never go down.
    pub fn status(&self) -> Result<PolicyStatus> {
        let generation = self.generation()?;
        let slot = generation & 1;
        // What earlier generations counted: the folded totals plus the previous slot.
        let mut carried_rules = self.retired_rules.clone();
        let mut carried_endpoints = self.retired_endpoints.clone();
        if let Some(previous) = &self.previous {
            let rules = self.slot_rule_counters(slot ^ 1, previous)?;
            for (rule, c) in previous.rules.iter().zip(&rules) {
                add_counter(carried_rules.entry(rule.identity()).or_default(), c);
            }
            let endpoints = self.slot_endpoint_counters(slot ^ 1, previous)?;
            for (ep, c) in previous.endpoints.iter().zip(&endpoints) {
                add_endpoint_stats(carried_endpoints.entry(ep.pattern.clone()).or_default(), c);
            }
        }
        let live_rules = self.slot_rule_counters(slot, &self.compiled)?;
        let mut rules = Vec::new();
        for (r, live) in self.compiled.rules.iter().zip(&live_rules) {
            let mut total = *live;
            // Two rules of one endpoint and direction with the same name share an identity:
            // the first one carries the history.
            if let Some(carried) = carried_rules.remove(&r.identity()) {
                add_counter(&mut total, &carried);
            }
            rules.push(RuleStats {
                rule: r.clone(),
                packets: total.packets,
                bytes: total.bytes,
            });
        }
        let live_endpoints = self.slot_endpoint_counters(slot, &self.compiled)?;
        let mut endpoints = Vec::new();
        for (ep, live) in self.compiled.endpoints.iter().zip(&live_endpoints) {
            let mut v = *live;
            if let Some(carried) = carried_endpoints.remove(&ep.pattern) {
                add_endpoint_stats(&mut v, &carried);
            }
            let dir = |d: usize| DirCounters {
                allowed: v.allowed[d],
                denied: v.denied[d],
                default_hits: v.default_hits[d],
                tracked: v.tracked[d],
                cut: v.cut[d],
            };
            endpoints.push(EndpointCounters {
                endpoint: ep.pattern.clone(),
                interfaces: self
                    .links
                    .keys()
                    .filter(|n| self.compiled.endpoint_for(n).is_some_and(|e| e.id == ep.id))
                    .cloned()
                    .collect(),
                ingress: dir(0),
                egress: dir(1),
            });
        }
        Ok(PolicyStatus {
            generation,
            policy: self.policy.clone(),
            endpoints,
            rules,
            reasons: self.reasons()?,
        })
    }

    /// Every tracked flow, read with `BPF_MAP_LOOKUP_BATCH` ([`crate::gc::lookup_batch_all`]): a few
    /// hundred syscalls for a million entries instead of two per entry, and no restart from
    /// the first key when the entry the iteration stood on is deleted meanwhile.
    pub fn ct_entries(&self) -> Result<Vec<(CtKey, CtEntry)>> {
        /// Entries per `BPF_MAP_LOOKUP_BATCH` call when reading `CT_FLOWS`.
        const CT_LOOKUP_BATCH: u32 = 4_096;
        let map = match self.map(map_names::CT_FLOWS)? {
            aya::maps::Map::LruHashMap(data) | aya::maps::Map::HashMap(data) => data,
            _ => {
                return Err(Error::InvalidArgument(
                    "CT_FLOWS is not a hash map in the tc object".into(),
                ));
            }
        };
        // The pinned map may predate a change of `max_ct_flows`: bound the walk by its own size.
        let max_entries = map
            .info()
            .map(|info| info.max_entries())
            .unwrap_or(self.config.max_ct_flows);
        crate::gc::lookup_batch_all(map.fd().as_fd(), max_entries, CT_LOOKUP_BATCH)
    }

    /// Tracked flows matching `filter`.
    pub fn ct_list(&self, filter: &CtFilter, now_ns: u64) -> Result<Vec<CtFlow>> {
        let mut flows: Vec<CtFlow> = self
            .ct_entries()?
            .iter()
            .map(|(k, e)| CtFlow::from_entry(k, e, now_ns))
            .filter(|f| filter.matches(f))
            .collect();
        sort_flows(&mut flows);
        Ok(flows)
    }

    /// Removes tracked flows matching `filter`; returns how many.
    pub fn ct_flush(&mut self, filter: &CtFilter, now_ns: u64) -> Result<u64> {
        let victims: Vec<CtKey> = self
            .ct_entries()?
            .iter()
            .filter(|(k, e)| filter.matches(&CtFlow::from_entry(k, e, now_ns)))
            .map(|(k, _)| *k)
            .collect();
        let mut map: HashMap<&mut MapData, CtKey, CtEntry> =
            HashMap::try_from(self.map_mut(map_names::CT_FLOWS)?).map_err(map_error("CT_FLOWS"))?;
        let mut removed = 0;
        for key in victims {
            if map.remove(&key).is_ok() {
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Removes flows idle past their timeout, at most `max_deletes`. Every candidate is read
    /// again right before its deletion and kept if a packet refreshed it since the scan, so a
    /// live entry is never removed. Returns the expired flows.
    pub fn ct_sweep(
        &mut self,
        timeouts: &Timeouts,
        now_ns: u64,
        max_deletes: usize,
    ) -> Result<Vec<(CtKey, CtEntry)>> {
        let candidates: Vec<CtKey> = self
            .ct_entries()?
            .iter()
            .filter(|(k, e)| {
                is_expired(
                    e.last_seen_ns,
                    now_ns,
                    ct_timeout(timeouts, k.proto, e.state),
                )
            })
            .map(|(k, _)| *k)
            .take(max_deletes)
            .collect();
        let mut map: HashMap<&mut MapData, CtKey, CtEntry> =
            HashMap::try_from(self.map_mut(map_names::CT_FLOWS)?).map_err(map_error("CT_FLOWS"))?;
        let mut expired = Vec::new();
        for key in candidates {
            let Ok(entry) = map.get(&key, 0) else {
                continue;
            };
            if !is_expired(
                entry.last_seen_ns,
                now_ns,
                ct_timeout(timeouts, key.proto, entry.state),
            ) {
                continue;
            }
            if map.remove(&key).is_ok() {
                expired.push((key, entry));
            }
        }
        Ok(expired)
    }

    /// Takes the flow-event ring buffer (once) for a reader task.
    pub fn take_events(&mut self) -> Option<aya::maps::RingBuf<aya::maps::MapData>> {
        let map = self.bpf.take_map(map_names::EVENTS)?;
        aya::maps::RingBuf::try_from(map).ok()
    }

    pub fn pin_root(&self) -> &Path {
        &self.config.pin_root
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn patterns() {
        let table = [
            ("veth*", "veth0", true),
            ("veth*", "veth", true),
            ("veth*", "eth0", false),
            ("ep?", "ep1", true),
            ("ep?", "ep12", false),
            ("*", "anything", true),
            ("a*b*c", "axxbyyc", true),
            ("a*b*c", "axxbyy", false),
            ("eth0", "eth0", true),
            ("eth0", "eth01", false),
        ];
        for (p, n, want) in table {
            assert_eq!(pattern_matches(p, n), want, "{p} {n}");
        }
    }

    #[test]
    fn lists_hold_every_covering_rule_in_order() {
        let spec = PolicySpec::parse(
            "endpoints:\n  - interface: ep0\n    ingress:\n      - {cidr: 0.0.0.0/0, protocol: tcp, ports: 80, action: allow}\n      - {cidr: 10.0.0.0/8, action: deny}\n      - {cidr: 10.1.0.0/16, protocol: udp, ports: \"53-54\", action: log}\n",
        )
        .expect("valid");
        let compiled = spec.compile().expect("compiles");
        let lists = &compiled.endpoints[0].lists;
        let ids = |prefix: &str| -> Vec<u32> {
            let cidr: Cidr = prefix.parse().expect("cidr");
            let (_, _, list) = lists.iter().find(|(_, p, _)| *p == cidr).expect("list");
            list.rules[..list.count as usize]
                .iter()
                .map(|r| r.rule_id)
                .collect()
        };
        assert_eq!(ids("0.0.0.0/0"), [0]);
        assert_eq!(ids("10.0.0.0/8"), [0, 1]);
        assert_eq!(ids("10.1.0.0/16"), [0, 1, 2]);
        let (_, _, list) = &lists[2];
        assert_eq!(list.rules[2].port_min, 53);
        assert_eq!(list.rules[2].port_max, 54);
        assert_eq!(list.rules[2].action, ACTION_LOG);
    }

    #[test]
    fn invalid_files_name_line_and_reason() {
        let cases = [
            (
                "endpoints:\n  - interface: ep0\n    ingress:\n      - {cidr: 10.0.0.1/8, action: allow}\n",
                4,
                "host bits",
            ),
            (
                "endpoints:\n  - interface: ep0\n    ingress:\n      - action: maybe\n",
                4,
                "unknown variant",
            ),
            (
                "endpoints:\n  - interface: ep0\n    ingress:\n      - {protocol: tcp, ports: \"90-80\", action: allow}\n",
                4,
                "empty",
            ),
            (
                "endpoints:\n  - interface: ep0\n    colour: blue\n",
                3,
                "unknown field",
            ),
            (
                "endpoints:\n  - interface: ep0\n    ingress:\n      - {ports: 80, action: allow}\n",
                2,
                "ports need protocol",
            ),
            (
                // The second occurrence is the duplicate.
                "endpoints:\n  - interface: ep0\n  - interface: ep0\n",
                3,
                "appears twice",
            ),
        ];
        for (text, line, reason) in cases {
            let err = PolicySpec::parse(text).expect_err(text);
            let Error::Policy {
                line: got,
                reason: why,
            } = &err
            else {
                panic!("{err}");
            };
            assert_eq!(*got, Some(line), "{text}: {err}");
            assert!(why.contains(reason), "{text}: {err}");
        }
    }
}
