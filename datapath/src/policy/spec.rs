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
//!         cidr: 198.18.0.0/15     # remote prefix, IPv4 or IPv6 (default 0.0.0.0/0: every
//!                                 # address of both families; ::/0 is every IPv6 one)
//!         protocol: tcp           # any | tcp | udp | icmp | icmpv6 (default any)
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

use std::collections::BTreeSet;

use bpf_common::{
    PROTO_ICMP, PROTO_TCP, PROTO_UDP,
    ct::{POLICY_DIR_EGRESS, POLICY_DIR_INGRESS},
    policy::{
        ACTION_ALLOW, ACTION_DENY, ACTION_LOG, EndpointPolicy, MAX_ENDPOINTS, MAX_RULE_LISTS,
        MAX_RULES, MAX_RULES_PER_LIST, Rule, RuleList,
    },
};
use serde::{Deserialize, Serialize};

use crate::{Error, Result, error::single_line};

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
    /// ICMP (IPv4).
    Icmp,
    /// ICMPv6 (neighbour discovery always passes whatever the rules say).
    Icmpv6,
}

impl RuleProtocol {
    fn code(self) -> u8 {
        match self {
            RuleProtocol::Any => 0,
            RuleProtocol::Tcp => PROTO_TCP,
            RuleProtocol::Udp => PROTO_UDP,
            RuleProtocol::Icmp => PROTO_ICMP,
            RuleProtocol::Icmpv6 => lb_core::parse6::PROTO_ICMPV6,
        }
    }
}

/// A rule's remote prefix: the API's, so the file, the wire and the tables agree (see
/// [`datapath_api::policy::Cidr`] on how `0.0.0.0/0` covers both families).
pub use datapath_api::policy::Cidr;

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
        let (min, max) = crate::text::parse_port_range(s)?;
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
    let lines = crate::text::key_lines(text, "interface");
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
                // `0.0.0.0/0` covers both families, so it stands for `::/0` too.
                let prefixes: BTreeSet<Cidr> = rules
                    .iter()
                    .flat_map(|r| {
                        let v6 = (r.cidr == Cidr::ANY).then_some(Cidr::ANY_V6);
                        std::iter::once(r.cidr).chain(v6)
                    })
                    .collect();
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

pub(crate) fn dir_name(dir: u8) -> &'static str {
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
    pub(crate) fn identity(&self) -> RuleIdentity {
        (self.endpoint.clone(), self.direction.clone(), self.label())
    }
}

/// (endpoint pattern, direction, label): a rule's identity across generations.
pub(crate) type RuleIdentity = (String, String, String);

impl CompiledPolicy {
    /// The endpoint governing interface `name`: the first whose pattern matches.
    pub fn endpoint_for(&self, name: &str) -> Option<&CompiledEndpoint> {
        self.endpoints
            .iter()
            .find(|ep| pattern_matches(&ep.pattern, name))
    }
}

/// Interface patterns of the policy file match as the configuration's do (one matcher).
pub use crate::text::glob_match as pattern_matches;

#[cfg(test)]
mod tests {
    use super::*;

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
