//! Fuzz target `policy`: the policy file parser `datapath::policy::PolicySpec::parse` and its
//! compilation (see `docs/fuzzing.md`).
//!
//! Properties:
//! - arbitrary text, word soups and mutations of the documented examples never panic;
//! - a rejected file gives `Error::Policy` with a non-empty one-line message and, when it names
//!   a line, a line of the file;
//! - an accepted file compiles, survives the daemon's own persistence (JSON, as the policy
//!   module saves and restores it) unchanged, and its compiled rule lists decide every probe
//!   packet (remote address, protocol, port, both directions) exactly as the documented
//!   semantics do: first rule in file order whose CIDR, protocol and port range match, else
//!   the endpoint's default;
//! - interfaces go to the first endpoint whose pattern matches, and the one pattern matcher
//!   (`text::glob_match`, shared with the configuration) means what `*` and `?` mean;
//! - generated policies (random endpoints and rules, written out as YAML here) are accepted
//!   exactly when they follow the documented rules, and then mean what was generated.

#[path = "../../lb-core/tests/fuzz_harness/mod.rs"]
mod fuzz_harness;
mod fuzz_yaml;

use std::net::{IpAddr, Ipv4Addr};

use bpf_common::{
    PROTO_ICMP, PROTO_TCP, PROTO_UDP,
    ct::{POLICY_DIR_EGRESS, POLICY_DIR_INGRESS, RULE_DEFAULT},
    policy::{ACTION_ALLOW, ACTION_DENY, ACTION_LOG},
};
use datapath::{
    Error,
    config::glob_match,
    policy::{
        Action, Cidr, CompiledPolicy, EndpointSpec, PolicySpec, PortRange, RuleProtocol, RuleSpec,
        pattern_matches,
    },
};
use proptest::prelude::*;

const POLICY_WORDS: &[&str] = &[
    "endpoints:",
    "interface:",
    "default_ingress:",
    "default_egress:",
    "ingress:",
    "egress:",
    "name:",
    "cidr:",
    "protocol:",
    "ports:",
    "action:",
    "colour:",
    "allow",
    "deny",
    "log",
    "maybe",
    "any",
    "tcp",
    "udp",
    "icmp",
    "sctp",
    "ep0",
    "ep1",
    "\"veth*\"",
    "\"*\"",
    "eth?",
    "a_very_long_interface_name",
    "0.0.0.0/0",
    "10.0.0.0/8",
    "10.0.0.1/8",
    "10.1.0.0/16",
    "198.18.0.0/15",
    "1.2.3.4",
    "1.2.3.4/32",
    "1.2.3.4/33",
    "1.2.3.4/",
    "/8",
    "256.1.1.1/8",
    "::1/128",
    "80",
    "23",
    "53",
    "\"80-90\"",
    "\"90-80\"",
    "\"80-\"",
    "\"-\"",
    "1-2-3",
    "8080",
];

/// The documented example (README, "Policy file format"), the module documentation's, the tc
/// fixtures', and flow-style forms from the unit tests.
fn seeds() -> Vec<String> {
    let readme = include_str!("../../README.md");
    vec![
        fuzz_yaml::yaml_block_after(readme, "### Policy file format"),
        "endpoints:\n  - interface: \"veth*\"\n    default_ingress: deny\n    default_egress: allow\n    ingress:\n      - name: web\n        cidr: 198.18.0.0/15\n        protocol: tcp\n        ports: 8080\n        action: allow\n    egress: []\n".into(),
        "endpoints:\n  - interface: \"ep*\"\n    default_ingress: deny\n    default_egress: deny\n    ingress:\n      - name: web\n        cidr: 198.18.0.0/16\n        protocol: tcp\n        ports: 8080\n        action: allow\n      - name: no-telnet\n        protocol: tcp\n        ports: 23\n        action: deny\n      - name: dns\n        protocol: udp\n        ports: 53\n        action: log\n    egress:\n      - name: out-web\n        protocol: tcp\n        ports: 80-443\n        action: allow\n".into(),
        "endpoints:\n  - interface: ep0\n    ingress:\n      - {cidr: 0.0.0.0/0, protocol: tcp, ports: 80, action: allow}\n      - {cidr: 10.0.0.0/8, action: deny}\n      - {cidr: 10.1.0.0/16, protocol: udp, ports: \"53-54\", action: log}\n".into(),
        "{endpoints: [{interface: a, egress: [{action: deny, protocol: icmp}]}, {interface: b}]}\n"
            .into(),
        String::new(),
    ]
}

fn action_code(a: Action) -> u8 {
    match a {
        Action::Allow => ACTION_ALLOW,
        Action::Deny => ACTION_DENY,
        Action::Log => ACTION_LOG,
    }
}

fn proto_code(p: RuleProtocol) -> u8 {
    match p {
        RuleProtocol::Any => 0,
        RuleProtocol::Tcp => PROTO_TCP,
        RuleProtocol::Udp => PROTO_UDP,
        RuleProtocol::Icmp => PROTO_ICMP,
        RuleProtocol::Icmpv6 => 58,
    }
}

/// A probe: a new flow's remote address, protocol and destination port.
#[derive(Clone, Copy, Debug)]
struct Probe {
    remote: Ipv4Addr,
    proto: u8,
    port: u16,
}

/// The documented semantics: first rule (file order) whose CIDR contains the remote address,
/// whose protocol matches and whose port range contains the port (0 for protocols without
/// ports), else the default. Returns (action, index of the rule in its list).
fn spec_decision(ep: &EndpointSpec, dir: u8, p: Probe) -> (u8, Option<usize>) {
    let (rules, default) = if dir == POLICY_DIR_INGRESS {
        (&ep.ingress, ep.default_ingress)
    } else {
        (&ep.egress, ep.default_egress)
    };
    for (i, r) in rules.iter().enumerate() {
        let ports = r.ports.unwrap_or(PortRange::ALL);
        if r.cidr.contains(&Cidr {
            addr: IpAddr::V4(p.remote),
            len: 32,
        }) && (r.protocol == RuleProtocol::Any || proto_code(r.protocol) == p.proto)
            && ports.min <= p.port
            && p.port <= ports.max
        {
            return (action_code(r.action), Some(i));
        }
    }
    (action_code(default), None)
}

/// What the tc program decides from the compiled maps: the longest prefix of the endpoint's
/// lists for the direction that contains the address, then the first rule of that list whose
/// protocol and ports match (as `bpf-tc`'s rule walk), else the default.
fn compiled_decision(c: &CompiledPolicy, endpoint: usize, dir: u8, p: Probe) -> (u8, u32) {
    let ep = &c.endpoints[endpoint];
    let default = if dir == POLICY_DIR_INGRESS {
        ep.policy.default_ingress
    } else {
        ep.policy.default_egress
    };
    let host = Cidr {
        addr: IpAddr::V4(p.remote),
        len: 32,
    };
    // The kernel's trie keeps each family's prefixes apart (`RULE_DIR_IPV6`).
    let Some((_, _, list)) = ep
        .lists
        .iter()
        .filter(|(d, prefix, _)| {
            *d == dir && prefix.addr.is_ipv4() == host.addr.is_ipv4() && prefix.contains(&host)
        })
        .max_by_key(|(_, prefix, _)| prefix.len)
    else {
        return (default, RULE_DEFAULT);
    };
    for rule in &list.rules[..list.count as usize] {
        if (rule.proto == 0 || rule.proto == p.proto)
            && rule.port_min <= p.port
            && p.port <= rule.port_max
        {
            return (rule.action, rule.rule_id);
        }
    }
    (default, RULE_DEFAULT)
}

/// Probe addresses around every rule's prefix (first, last, just outside) and a few others.
fn probe_addresses(spec: &PolicySpec, extra: &[u32]) -> Vec<Ipv4Addr> {
    let mut out: Vec<u32> = extra.to_vec();
    for ep in &spec.endpoints {
        for r in ep.ingress.iter().chain(&ep.egress) {
            // The generated policies are IPv4 only.
            let IpAddr::V4(base) = r.cidr.addr else {
                continue;
            };
            let base = u32::from(base);
            let size = if r.cidr.len == 0 {
                u32::MAX
            } else {
                (1u32 << (32 - u32::from(r.cidr.len))) - 1
            };
            out.extend([
                base,
                base.wrapping_add(size),
                base.wrapping_sub(1),
                base.wrapping_add(size).wrapping_add(1),
                base.wrapping_add(size / 2),
            ]);
        }
    }
    out.into_iter().map(Ipv4Addr::from).collect()
}

fn check_decisions(spec: &PolicySpec, extra: &[u32]) -> Result<(), TestCaseError> {
    let compiled = spec.compile().expect("an accepted policy compiles");
    prop_assert_eq!(compiled.endpoints.len(), spec.endpoints.len());
    let addresses = probe_addresses(spec, extra);
    for (e, ep) in spec.endpoints.iter().enumerate() {
        let mut ports: Vec<u16> = vec![0, 1, 22, 23, 53, 80, 443, 8080, 65535];
        for r in ep.ingress.iter().chain(&ep.egress) {
            if let Some(p) = r.ports {
                ports.extend([p.min, p.max, p.min.wrapping_sub(1), p.max.wrapping_add(1)]);
            }
        }
        for dir in [POLICY_DIR_INGRESS, POLICY_DIR_EGRESS] {
            for &remote in &addresses {
                for proto in [PROTO_TCP, PROTO_UDP, PROTO_ICMP, 47] {
                    let port_list: &[u16] = if proto == PROTO_TCP || proto == PROTO_UDP {
                        &ports
                    } else {
                        &[0]
                    };
                    for &port in port_list {
                        let probe = Probe {
                            remote,
                            proto,
                            port,
                        };
                        let (want, index) = spec_decision(ep, dir, probe);
                        let (got, rule_id) = compiled_decision(&compiled, e, dir, probe);
                        prop_assert_eq!(got, want, "endpoint {} dir {} {:?}", e, dir, probe);
                        match index {
                            None => prop_assert_eq!(rule_id, RULE_DEFAULT),
                            Some(i) => {
                                let info = &compiled.rules[rule_id as usize];
                                let dir_name = if dir == POLICY_DIR_INGRESS {
                                    "ingress"
                                } else {
                                    "egress"
                                };
                                prop_assert_eq!(
                                    (&info.endpoint, info.direction.as_str(), info.index),
                                    (&ep.interface, dir_name, i),
                                    "{:?}",
                                    probe
                                );
                            }
                        }
                    }
                }
            }
        }
    }
    Ok(())
}

/// What every policy text must satisfy, accepted or not.
fn check_policy_text(text: &str, extra: &[u32]) -> Result<(), TestCaseError> {
    match PolicySpec::parse(text) {
        Err(e) => {
            fuzz_yaml::check_message(&e.to_string())?;
            let Error::Policy { line, reason } = &e else {
                return Err(TestCaseError::fail(format!("not a policy error: {e}")));
            };
            prop_assert!(!reason.trim().is_empty());
            if let Some(line) = line {
                // YAML's lines (NEL and the Unicode separators break lines too); an error at
                // the end of the input may name the line after the last.
                let lines = fuzz_yaml::yaml_lines(text) + 1;
                prop_assert!(
                    (1..=lines).contains(line),
                    "line {} of a {}-line file: {}",
                    line,
                    lines,
                    e
                );
            }
        }
        Ok(spec) => {
            // The policy module saves the applied policy as JSON and restores it at start.
            let saved = serde_json::to_string_pretty(&spec).expect("serialise");
            let restored: PolicySpec = serde_json::from_str(&saved).map_err(|e| {
                TestCaseError::fail(format!("saved policy does not load back: {e}\n{saved}"))
            })?;
            prop_assert_eq!(&restored, &spec, "saved policy round trip");
            check_decisions(&spec, extra)?;
            // Interfaces: the first endpoint whose pattern matches.
            let compiled = spec.compile().expect("compiles");
            for name in ["ep0", "ep1", "veth0", "eth0", "eth1", "lbc", "a", "b", "x"] {
                let want = spec
                    .endpoints
                    .iter()
                    .position(|ep| pattern_matches(&ep.interface, name));
                let got = compiled.endpoint_for(name).map(|ep| ep.id as usize);
                prop_assert_eq!(got, want, "endpoint for {}", name);
            }
        }
    }
    Ok(())
}

#[test]
fn fuzz_policy_arbitrary_text() {
    let strategy = (
        prop_oneof![
            any::<String>(),
            fuzz_yaml::word_soup(POLICY_WORDS),
            "[ -~\n]{0,200}",
        ],
        proptest::collection::vec(any::<u32>(), 0..4),
    );
    fuzz_harness::check("policy_arbitrary_text", strategy, |(text, extra)| {
        check_policy_text(&text, &extra)
    });
}

#[test]
fn fuzz_policy_mutated_examples() {
    let seeds = seeds();
    let strategy = (
        0..seeds.len(),
        proptest::collection::vec(fuzz_yaml::text_mutation(), 1..5),
        proptest::collection::vec(any::<u32>(), 0..4),
    );
    fuzz_harness::check(
        "policy_mutated_examples",
        strategy,
        |(seed, mutations, extra)| {
            let text = fuzz_yaml::mutate(&seeds[seed], &mutations, POLICY_WORDS);
            check_policy_text(&text, &extra)
        },
    );
}

#[test]
fn every_seed_is_accepted() {
    for seed in seeds() {
        let spec = PolicySpec::parse(&seed).unwrap_or_else(|e| panic!("{e}\n{seed}"));
        check_decisions(&spec, &[0x0a00_0001, 0xc612_0001]).expect("decisions");
    }
}

// ---------------------------------------------------------------------------------------------
// Generated policies.
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
struct GenRule {
    name: Option<String>,
    /// Address and prefix length as written (host bits possible).
    cidr: Option<(u32, u8)>,
    protocol: Option<RuleProtocol>,
    /// As written: one port or a range, possibly out of order.
    ports: Option<(u32, Option<u32>)>,
    action: Action,
    flow_style: bool,
}

#[derive(Clone, Debug)]
struct GenEndpoint {
    interface: String,
    default_ingress: Option<Action>,
    default_egress: Option<Action>,
    ingress: Vec<GenRule>,
    egress: Vec<GenRule>,
}

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![Just(Action::Allow), Just(Action::Deny), Just(Action::Log)]
}

fn gen_rule() -> impl Strategy<Value = GenRule> {
    (
        proptest::option::of(prop_oneof![
            Just("web".to_string()),
            Just("no-telnet".to_string()),
            Just("a b".to_string()),
            Just("#x".to_string()),
            Just("123".to_string()),
            Just("true".to_string()),
            Just("null".to_string()),
            Just(String::new()),
            any::<String>(),
        ]),
        proptest::option::of((
            prop_oneof![
                Just(0u32),
                Just(0x0a00_0000),
                Just(0xc612_0000),
                any::<u32>()
            ],
            prop_oneof![Just(0u8), Just(8), Just(16), Just(24), Just(32), 0u8..=34],
        )),
        proptest::option::of(prop_oneof![
            Just(RuleProtocol::Any),
            Just(RuleProtocol::Tcp),
            Just(RuleProtocol::Udp),
            Just(RuleProtocol::Icmp),
            Just(RuleProtocol::Icmpv6),
        ]),
        proptest::option::of((
            prop_oneof![Just(0u32), Just(80), Just(65535), Just(65536), 0u32..70_000],
            proptest::option::of(prop_oneof![Just(0u32), Just(90), Just(65535), 0u32..70_000]),
        )),
        action(),
        any::<bool>(),
    )
        .prop_map(
            |(name, cidr, protocol, ports, action, flow_style)| GenRule {
                name,
                cidr,
                protocol,
                ports,
                action,
                flow_style,
            },
        )
}

fn gen_endpoint() -> impl Strategy<Value = GenEndpoint> {
    (
        prop_oneof![
            Just("ep0".to_string()),
            Just("ep1".to_string()),
            Just("veth*".to_string()),
            Just("eth?".to_string()),
            Just("*".to_string()),
            Just("exactly15chars_".to_string()),
            Just("sixteen_chars_xx".to_string()),
            Just(String::new()),
            "[a-z0-9*?]{1,16}",
        ],
        proptest::option::of(action()),
        proptest::option::of(action()),
        proptest::collection::vec(gen_rule(), 0..5),
        proptest::collection::vec(gen_rule(), 0..5),
    )
        .prop_map(
            |(interface, default_ingress, default_egress, ingress, egress)| GenEndpoint {
                interface,
                default_ingress,
                default_egress,
                ingress,
                egress,
            },
        )
}

fn action_word(a: Action) -> &'static str {
    match a {
        Action::Allow => "allow",
        Action::Deny => "deny",
        Action::Log => "log",
    }
}

fn proto_word(p: RuleProtocol) -> &'static str {
    match p {
        RuleProtocol::Any => "any",
        RuleProtocol::Tcp => "tcp",
        RuleProtocol::Udp => "udp",
        RuleProtocol::Icmp => "icmp",
        RuleProtocol::Icmpv6 => "icmpv6",
    }
}

/// A YAML double-quoted scalar: printable characters as they are, everything else (and YAML
/// 1.1's extra line breaks) escaped.
fn quoted(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        let n = u32::from(c);
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            _ if (0x20..=0x7e).contains(&n)
                || ((0xa0..=0xd7ff).contains(&n) && n != 0x2028 && n != 0x2029)
                || ((0xe000..=0xfffd).contains(&n) && n != 0xfeff)
                || n >= 0x10000 =>
            {
                out.push(c)
            }
            _ => out.push_str(&format!("\\u{n:04x}")),
        }
    }
    out.push('"');
    out
}

fn ports_text(p: (u32, Option<u32>)) -> String {
    match p {
        (a, None) => a.to_string(),
        (a, Some(b)) => format!("\"{a}-{b}\""),
    }
}

/// Where the parts of a rendered policy are: each endpoint's `interface:` line, and each
/// rule's first and last line (ingress rules, then egress rules), 1-based.
struct Layout {
    interface_line: Vec<usize>,
    rule_lines: Vec<Vec<(usize, usize)>>,
}

/// Writes a generated policy as YAML, block style with some rules in flow style.
fn render(endpoints: &[GenEndpoint]) -> (String, Layout) {
    let mut out = String::from("# generated\nendpoints:\n");
    let mut layout = Layout {
        interface_line: Vec::new(),
        rule_lines: Vec::new(),
    };
    let next_line = |out: &String| out.matches('\n').count() + 1;
    for ep in endpoints {
        layout.interface_line.push(next_line(&out));
        let mut spans = Vec::new();
        out.push_str(&format!("  - interface: {}\n", quoted(&ep.interface)));
        if let Some(a) = ep.default_ingress {
            out.push_str(&format!("    default_ingress: {}\n", action_word(a)));
        }
        if let Some(a) = ep.default_egress {
            out.push_str(&format!("    default_egress: {}\n", action_word(a)));
        }
        for (key, rules) in [("ingress", &ep.ingress), ("egress", &ep.egress)] {
            if rules.is_empty() {
                continue;
            }
            out.push_str(&format!("    {key}:\n"));
            for r in rules {
                let first = next_line(&out);
                let mut fields = Vec::new();
                if let Some(n) = &r.name {
                    fields.push(format!("name: {}", quoted(n)));
                }
                if let Some((addr, len)) = r.cidr {
                    fields.push(format!("cidr: {}/{len}", Ipv4Addr::from(addr)));
                }
                if let Some(p) = r.protocol {
                    fields.push(format!("protocol: {}", proto_word(p)));
                }
                if let Some(p) = r.ports {
                    fields.push(format!("ports: {}", ports_text(p)));
                }
                fields.push(format!("action: {}", action_word(r.action)));
                if r.flow_style {
                    out.push_str(&format!("      - {{{}}}\n", fields.join(", ")));
                } else {
                    for (i, f) in fields.iter().enumerate() {
                        let lead = if i == 0 { "      - " } else { "        " };
                        out.push_str(&format!("{lead}{f}\n"));
                    }
                }
                spans.push((first, next_line(&out) - 1));
            }
        }
        layout.rule_lines.push(spans);
    }
    (out, layout)
}

/// Every way a generated policy breaks the documented rules, each with the lines an error about
/// it may name: the value's rule for values refused while reading the file, the endpoint's
/// `interface:` line for what compiling refuses (as the unit tests expect).
fn defects(endpoints: &[GenEndpoint], layout: &Layout) -> Vec<(String, Vec<usize>)> {
    let mut out = Vec::new();
    for (e, ep) in endpoints.iter().enumerate() {
        let here = layout.interface_line[e];
        if ep.interface.is_empty() || ep.interface.len() > 15 {
            out.push((format!("endpoint {e}: interface length"), vec![here]));
        }
        if let Some(k) = endpoints[..e]
            .iter()
            .position(|o| o.interface == ep.interface)
        {
            out.push((
                format!("endpoint {e}: duplicate of {k}"),
                vec![layout.interface_line[k], here],
            ));
        }
        for (r, rule) in ep.ingress.iter().chain(&ep.egress).enumerate() {
            let (first, last) = layout.rule_lines[e][r];
            let span: Vec<usize> = (first..=last).collect();
            if let Some((addr, len)) = rule.cidr {
                let mask = if len == 0 || len > 32 {
                    0
                } else {
                    u32::MAX << (32 - u32::from(len))
                };
                if len > 32 || addr & !mask != 0 {
                    out.push((format!("endpoint {e} rule {r}: cidr"), span.clone()));
                }
            }
            if let Some((a, b)) = rule.ports {
                let b = b.unwrap_or(a);
                if a > 65535 || b > 65535 || a > b {
                    out.push((format!("endpoint {e} rule {r}: ports"), span.clone()));
                }
                if !matches!(rule.protocol, Some(RuleProtocol::Tcp | RuleProtocol::Udp)) {
                    out.push((
                        format!("endpoint {e} rule {r}: ports without tcp/udp"),
                        vec![here],
                    ));
                }
            }
        }
    }
    out
}

/// The policy a generated one means when it is valid by the documented rules, or `None`.
fn expected(endpoints: &[GenEndpoint]) -> Option<PolicySpec> {
    let mut seen = Vec::new();
    let mut out = PolicySpec::default();
    for ep in endpoints {
        if ep.interface.is_empty() || ep.interface.len() > 15 || seen.contains(&ep.interface) {
            return None;
        }
        seen.push(ep.interface.clone());
        let rules = |rules: &[GenRule]| -> Option<Vec<RuleSpec>> {
            rules
                .iter()
                .map(|r| {
                    let cidr = match r.cidr {
                        None => Cidr::ANY,
                        Some((addr, len)) => {
                            let mask = if len == 0 {
                                0
                            } else {
                                u32::MAX << (32 - u32::from(len.min(32)))
                            };
                            if len > 32 || addr & !mask != 0 {
                                return None;
                            }
                            Cidr {
                                addr: IpAddr::V4(Ipv4Addr::from(addr)),
                                len,
                            }
                        }
                    };
                    let ports = match r.ports {
                        None => None,
                        Some((a, b)) => {
                            let b = b.unwrap_or(a);
                            if a > 65535 || b > 65535 || a > b {
                                return None;
                            }
                            Some(PortRange {
                                min: a as u16,
                                max: b as u16,
                            })
                        }
                    };
                    let protocol = r.protocol.unwrap_or_default();
                    if ports.is_some() && !matches!(protocol, RuleProtocol::Tcp | RuleProtocol::Udp)
                    {
                        return None;
                    }
                    Some(RuleSpec {
                        name: r.name.clone(),
                        cidr,
                        protocol,
                        ports,
                        action: r.action,
                    })
                })
                .collect()
        };
        out.endpoints.push(EndpointSpec {
            interface: ep.interface.clone(),
            default_ingress: ep.default_ingress.unwrap_or_default(),
            default_egress: ep.default_egress.unwrap_or_default(),
            ingress: rules(&ep.ingress)?,
            egress: rules(&ep.egress)?,
        });
    }
    Some(out)
}

#[test]
fn fuzz_policy_generated() {
    let strategy = (
        proptest::collection::vec(gen_endpoint(), 0..4),
        proptest::collection::vec(any::<u32>(), 0..4),
    );
    fuzz_harness::check("policy_generated", strategy, |(endpoints, extra)| {
        let (text, layout) = render(&endpoints);
        let parsed = PolicySpec::parse(&text);
        let defects = defects(&endpoints, &layout);
        prop_assert_eq!(defects.is_empty(), expected(&endpoints).is_some());
        match (expected(&endpoints), parsed) {
            (Some(want), Ok(got)) => prop_assert_eq!(got, want, "{}", text),
            (None, Err(e)) => {
                let Error::Policy { line, .. } = &e else {
                    return Err(TestCaseError::fail(format!("not a policy error: {e}")));
                };
                prop_assert!(
                    line.is_some(),
                    "a refused file names its line: {}\n{}",
                    e,
                    text
                );
                // With one defect, the line is the defect's.
                if let [(what, lines)] = defects.as_slice() {
                    let line = line.expect("checked");
                    if !lines.contains(&line) {
                        prop_assert!(
                            lines.contains(&line),
                            "{}: line {} named, expected one of {:?}: {}\n{}",
                            what,
                            line,
                            lines,
                            e,
                            text
                        );
                    }
                }
            }
            (Some(_), Err(e)) => {
                prop_assert!(false, "valid policy refused: {e}\n{text}")
            }
            (None, Ok(spec)) => prop_assert!(false, "invalid policy accepted: {spec:?}\n{text}"),
        }
        check_policy_text(&text, &extra)
    });
}

/// The daemon's one glob matcher (`text::glob_match`, reached through both paths the policy
/// endpoints and the configured interfaces use) matches what `*` (any run, empty included) and
/// `?` (one character) mean, by a reference dynamic programme.
#[test]
fn fuzz_policy_patterns_agree() {
    let strategy = ("[ab*?]{0,8}", "[ab]{0,8}");
    fuzz_harness::check("policy_patterns", strategy, |(pattern, name)| {
        let p = pattern_matches(&pattern, &name);
        prop_assert_eq!(p, glob_match(&pattern, &name), "{:?} {:?}", pattern, name);
        // Reference: a regex-free dynamic programme over characters.
        let (pc, nc): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
        let mut m = vec![vec![false; nc.len() + 1]; pc.len() + 1];
        m[0][0] = true;
        for i in 1..=pc.len() {
            for j in 0..=nc.len() {
                m[i][j] = match pc[i - 1] {
                    '*' => m[i - 1][j] || (j > 0 && m[i][j - 1]),
                    '?' => j > 0 && m[i - 1][j - 1],
                    c => j > 0 && nc[j - 1] == c && m[i - 1][j - 1],
                };
            }
        }
        prop_assert_eq!(p, m[pc.len()][nc.len()], "{:?} {:?}", pattern, name);
        Ok(())
    });
}

/// Found by `fuzz_policy_arbitrary_text` (minimized input `"{a\n\nA"`): an unknown key with a
/// line break is quoted verbatim, so the error message spans two lines (`lb-ctl policy apply`
/// prints two). `PolicySpec::parse` (datapath/src/policy.rs) puts serde's message into the
/// reason unescaped. Fixed: control characters are escaped (`error::single_line`).
#[test]
fn regression_policy_error_is_one_line() {
    let err = PolicySpec::parse("{a\n\nA").expect_err("unknown field");
    let message = err.to_string();
    assert!(!message.contains('\n'), "{message:?}");
}

/// Found by `fuzz_policy_generated` (minimized input: one endpoint with `interface: ""`): the
/// error names line 1, not the endpoint's line 3. `PolicySpec::parse` (datapath/src/policy.rs)
/// located compile errors with `line_of(text, &ep.interface)`, the first line containing the
/// name, which for "" is the first line of the file. Fixed: compile errors carry their
/// endpoint's index, and the line is that endpoint's `interface:` line.
#[test]
fn regression_policy_error_line_for_an_empty_interface() {
    let text = "endpoints:\n  - interface: ep0\n  - interface: \"\"\n";
    match PolicySpec::parse(text) {
        Err(Error::Policy { line, .. }) => assert_eq!(line, Some(3)),
        other => panic!("{other:?}"),
    }
}

/// The same bug with a name that is part of a key: endpoint `e`'s rule is refused (ports need
/// tcp or udp) and the error named line 1 (`endpoints:` contains an `e`), not line 3.
#[test]
fn regression_policy_error_line_for_an_interface_named_like_a_key() {
    let text = "endpoints:\n  - interface: ep0\n  - interface: e\n    ingress:\n      - {ports: 80, action: allow}\n";
    match PolicySpec::parse(text) {
        Err(Error::Policy { line, reason }) => {
            assert!(reason.contains("ports need protocol"), "{reason}");
            assert_eq!(line, Some(3), "{reason}");
        }
        other => panic!("{other:?}"),
    }
}
