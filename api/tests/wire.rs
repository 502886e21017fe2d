//! The wire format: answers as datapathd writes them today (field order, optional fields,
//! `null`s, enum spellings, numbers), read with this crate's types and written back byte for
//! byte. The answers follow the daemon's handlers (datapath/src/policyd.rs, policy.rs,
//! api.rs, main.rs) and what the namespace tests and docs/cli.md show of them.

use datapath_api::{
    ApiError, ApplyPolicy, CtFilter, CtFlow, CtState, CtStats, CtTable, Direction, ErrorCode,
    FlowEventView, FlowKind, FlowsQuery, FlushAnswer, Health, IpProtocol, PolicySpec, PolicyStatus,
    PortRange, StatusView,
};
use serde::{Serialize, de::DeserializeOwned};

/// `json` without the whitespace between tokens (strings untouched), so that the fixtures can
/// be written over several lines and still be compared byte for byte, order included.
fn minify(json: &str) -> String {
    let mut out = String::new();
    let (mut in_string, mut escaped) = (false, false);
    for c in json.chars() {
        if in_string {
            out.push(c);
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => in_string = false,
                _ => {}
            }
        } else if c == '"' {
            in_string = true;
            out.push(c);
        } else if !c.is_whitespace() {
            out.push(c);
        }
    }
    out
}

/// Reads `json` as a `T` and checks that writing it gives the very same bytes.
fn same_bytes<T: Serialize + DeserializeOwned>(json: &str) -> T {
    let wire = minify(json);
    let value: T = serde_json::from_str(&wire).unwrap_or_else(|e| panic!("{e}: {wire}"));
    assert_eq!(serde_json::to_string(&value).unwrap(), wire);
    value
}

const POLICY_STATUS: &str = r#"{
  "generation": 2,
  "policy": {"endpoints": [
    {"interface": "ep0", "default_ingress": "allow", "default_egress": "deny",
     "ingress": [],
     "egress": [
       {"name": "web", "cidr": "198.18.20.0/24", "protocol": "tcp", "ports": "8080",
        "action": "allow"},
       {"name": "blocked", "cidr": "0.0.0.0/0", "protocol": "tcp", "ports": "9000-9100",
        "action": "deny"},
       {"cidr": "198.19.0.0/16", "protocol": "any", "action": "log"}
     ]},
    {"interface": "veth*", "default_ingress": "deny", "default_egress": "allow",
     "ingress": [{"cidr": "10.0.0.1/32", "protocol": "icmp", "action": "allow"}],
     "egress": []}
  ]},
  "endpoints": [
    {"endpoint": "ep0", "interfaces": ["ep0"],
     "ingress": {"allowed": 0, "denied": 0, "default_hits": 0, "tracked": 0, "cut": 0},
     "egress": {"allowed": 3, "denied": 2, "default_hits": 1, "tracked": 3, "cut": 1}},
    {"endpoint": "veth*", "interfaces": [],
     "ingress": {"allowed": 0, "denied": 0, "default_hits": 0, "tracked": 0, "cut": 0},
     "egress": {"allowed": 0, "denied": 0, "default_hits": 0, "tracked": 0, "cut": 0}}
  ],
  "rules": [
    {"id": 0, "endpoint": "ep0", "direction": "egress", "index": 0, "name": "web",
     "cidr": "198.18.20.0/24", "protocol": "tcp", "ports": "8080", "action": "allow",
     "packets": 12, "bytes": 900},
    {"id": 1, "endpoint": "ep0", "direction": "egress", "index": 1, "name": "blocked",
     "cidr": "0.0.0.0/0", "protocol": "tcp", "ports": "9000-9100", "action": "deny",
     "packets": 4, "bytes": 240},
    {"id": 2, "endpoint": "ep0", "direction": "egress", "index": 2, "name": null,
     "cidr": "198.19.0.0/16", "protocol": "any", "ports": "0-65535", "action": "log",
     "packets": 0, "bytes": 0},
    {"id": 3, "endpoint": "veth*", "direction": "ingress", "index": 0, "name": null,
     "cidr": "10.0.0.1/32", "protocol": "icmp", "ports": "0-65535", "action": "allow",
     "packets": 18446744073709551615, "bytes": 0}
  ],
  "reasons": {"allow_default": 1, "allow_rule": 3, "drop_default": 1, "drop_rule": 2,
              "event_lost": 0, "pass_not_endpoint": 7}
}"#;

#[test]
fn policy_status() {
    let status: PolicyStatus = same_bytes(POLICY_STATUS);
    assert_eq!(status.generation, 2);
    let rule = &status.rules[2].rule;
    assert_eq!(rule.name, None);
    assert_eq!(rule.label(), "#2");
    assert_eq!(rule.ports, PortRange::ALL);
    assert_eq!(rule.direction, Direction::Egress);
    assert_eq!(status.rules[3].packets, u64::MAX);
    assert_eq!(status.endpoints[0].egress.cut, 1);
    // The policy in force as the daemon echoes it: absent `name` and `ports` stay absent.
    assert_eq!(status.policy.endpoints[0].egress[2].name, None);
    assert_eq!(status.policy.endpoints[0].egress[2].ports, None);
}

/// No policy applied yet (module up): every list empty, generation 0.
#[test]
fn policy_status_without_a_policy() {
    let status: PolicyStatus = same_bytes(
        r#"{"generation":0,"policy":{"endpoints":[]},"endpoints":[],"rules":[],
            "reasons":{"pass_not_endpoint":0}}"#,
    );
    assert_eq!(status.policy, PolicySpec::default());
}

/// A policy file read with the types (the daemon parses its YAML with them): defaults filled
/// in, ports as a number or a string, unknown keys and bad values refused with the texts the
/// daemon answers.
#[test]
fn policy_file_defaults_and_refusals() {
    let spec: PolicySpec = serde_json::from_str(
        r#"{"endpoints":[{"interface":"veth*","ingress":[
            {"protocol":"tcp","ports":8080,"action":"allow"},
            {"name":"range","cidr":"198.18.0.7","ports":"8000-8100","action":"deny"}]}]}"#,
    )
    .unwrap();
    assert_eq!(
        serde_json::to_string(&spec).unwrap(),
        minify(
            r#"{"endpoints":[{"interface":"veth*","default_ingress":"allow",
                "default_egress":"allow","ingress":[
                {"cidr":"0.0.0.0/0","protocol":"tcp","ports":"8080","action":"allow"},
                {"name":"range","cidr":"198.18.0.7/32","protocol":"any","ports":"8000-8100",
                 "action":"deny"}],"egress":[]}]}"#
        )
    );
    let refused = |rule: &str| {
        let text = format!(r#"{{"endpoints":[{{"interface":"e","ingress":[{rule}]}}]}}"#);
        serde_json::from_str::<PolicySpec>(&text)
            .unwrap_err()
            .to_string()
    };
    for (rule, want) in [
        (
            r#"{"cidr":"198.18.0.0/40","action":"deny"}"#,
            r#"invalid prefix length in CIDR "198.18.0.0/40""#,
        ),
        (
            r#"{"cidr":"198.18.0.300/8","action":"deny"}"#,
            r#"invalid CIDR "198.18.0.300/8" (expected ADDR/LEN: a.b.c.d/len or an IPv6 prefix)"#,
        ),
        (
            r#"{"cidr":"2001:db8::/129","action":"deny"}"#,
            r#"invalid prefix length in CIDR "2001:db8::/129""#,
        ),
        (
            r#"{"cidr":"2001:db8::1/32","action":"deny"}"#,
            r#"CIDR "2001:db8::1/32" has host bits set"#,
        ),
        (
            r#"{"cidr":"10.0.0.1/8","action":"deny"}"#,
            r#"CIDR "10.0.0.1/8" has host bits set"#,
        ),
        (
            r#"{"ports":"80-x","action":"deny"}"#,
            r#"invalid port "x" in "80-x" (0-65535)"#,
        ),
        (
            r#"{"ports":"90-80","action":"deny"}"#,
            r#"port range "90-80" is empty (start > end)"#,
        ),
        (
            r#"{"ports":70000,"action":"deny"}"#,
            "port 70000 out of range 0-65535",
        ),
        (
            r#"{"ports":-1,"action":"deny"}"#,
            "port -1 out of range 0-65535",
        ),
        (r#"{"action":"drop"}"#, "unknown variant `drop`"),
        (
            r#"{"action":"deny","color":"red"}"#,
            "unknown field `color`",
        ),
        (r#"{"cidr":"10.0.0.0/8"}"#, "missing field `action`"),
    ] {
        let got = refused(rule);
        assert!(got.starts_with(want), "{rule}: {got}");
    }
}

#[test]
fn apply_policy_body() {
    let body: ApplyPolicy = same_bytes(r#"{"text":"endpoints: []\n"}"#);
    assert_eq!(body.text, "endpoints: []\n");
    assert!(serde_json::from_str::<ApplyPolicy>(r#"{"text":"","x":1}"#).is_err());
}

const CONNTRACK: &str = r#"[
  {"table": "lb", "protocol": "tcp", "src": "198.18.0.1", "src_port": 41234,
   "dst": "198.18.100.1", "dst_port": 80, "state": "ESTABLISHED", "packets_orig": 6,
   "bytes_orig": 402, "packets_reply": 5, "bytes_reply": 391, "rtt_ns": 81234,
   "age_ns": 2100000000, "idle_ns": 300000000, "ifindex": 7, "rule": null,
   "policy_direction": "-", "dst_name": null, "src_name": null,
   "pid": 4242, "exe": "/usr/bin/curl"},
  {"table": "policy", "protocol": "icmp", "src": "198.18.0.1", "src_port": 4711,
   "dst": "198.18.20.2", "dst_port": 0, "state": "NEW", "packets_orig": 1,
   "bytes_orig": 84, "packets_reply": 0, "bytes_reply": 0, "rtt_ns": 0, "age_ns": 5,
   "idle_ns": 5, "ifindex": 12, "rule": null, "policy_direction": "ingress", "dst_name": "api.example.test", "src_name": null, "pid": null, "exe": null},
  {"table": "policy", "protocol": "tcp", "src": "198.18.0.1", "src_port": 41240,
   "dst": "198.18.20.2", "dst_port": 8080, "state": "CLOSE", "packets_orig": 9,
   "bytes_orig": 600, "packets_reply": 7, "bytes_reply": 500, "rtt_ns": 40000,
   "age_ns": 9000000000, "idle_ns": 1000, "ifindex": 12, "rule": 0,
   "policy_direction": "egress", "dst_name": null, "src_name": null, "pid": null, "exe": null},
  {"table": "policy", "protocol": "udp", "src": "198.18.0.1", "src_port": 5353,
   "dst": "198.18.20.2", "dst_port": 53, "state": "REPLIED", "packets_orig": 1,
   "bytes_orig": 60, "packets_reply": 1, "bytes_reply": 90, "rtt_ns": 0, "age_ns": 10,
   "idle_ns": 10, "ifindex": 12, "rule": 4294967294, "policy_direction": "egress", "dst_name": null, "src_name": null, "pid": null, "exe": null},
  {"table": "policy", "protocol": "47", "src": "198.18.0.1", "src_port": 0,
   "dst": "198.18.20.2", "dst_port": 0, "state": "NEW", "packets_orig": 1,
   "bytes_orig": 60, "packets_reply": 0, "bytes_reply": 0, "rtt_ns": 0, "age_ns": 1,
   "idle_ns": 1, "ifindex": 12, "rule": null, "policy_direction": "ingress", "dst_name": null, "src_name": null, "pid": null, "exe": null}
]"#;

#[test]
fn conntrack_list() {
    let flows: Vec<CtFlow> = same_bytes(CONNTRACK);
    assert_eq!(flows[0].table, CtTable::Lb);
    assert_eq!(flows[0].policy_direction, None);
    assert_eq!(flows[1].protocol, IpProtocol::ICMP);
    assert_eq!(flows[2].state, CtState::Close);
    assert_eq!(flows[2].policy_direction, Some(Direction::Egress));
    assert_eq!(flows[4].protocol, IpProtocol(47));
    // Answers from before the load balancer's table was listed have no `table`: policy.
    let mut old = minify(CONNTRACK);
    old = old.replacen(r#""table":"lb","#, "", 1);
    let flows: Vec<CtFlow> = serde_json::from_str(&old).unwrap();
    assert_eq!(flows[0].table, CtTable::Policy);
    assert_eq!(flows[1].dst_name.as_deref(), Some("api.example.test"));
    // Answers from before the DNS module have no names: none.
    let old = minify(CONNTRACK).replace(r#","dst_name":null,"src_name":null"#, "");
    let flows: Vec<CtFlow> = serde_json::from_str(&old).unwrap();
    assert!(flows.iter().all(|f| f.src_name.is_none()));
    // The process that opened a flow (the exec module); answers from before it have none.
    let flows: Vec<CtFlow> = same_bytes(CONNTRACK);
    assert_eq!(
        (flows[0].pid, flows[0].exe.as_deref()),
        (Some(4242), Some("/usr/bin/curl"))
    );
    let old = minify(CONNTRACK)
        .replace(r#","pid":null,"exe":null"#, "")
        .replace(r#","pid":4242,"exe":"/usr/bin/curl""#, "");
    let flows: Vec<CtFlow> = serde_json::from_str(&old).unwrap();
    assert!(flows.iter().all(|f| f.pid.is_none() && f.exe.is_none()));
}

#[test]
fn conntrack_filter_query() {
    let all = CtFilter {
        address: Some("198.18.0.1".into()),
        port: Some(0),
        protocol: Some("tcp".into()),
        state: Some("established".into()),
        table: Some("lb".into()),
    };
    assert_eq!(
        all.to_query(),
        "?address=198.18.0.1&port=0&protocol=tcp&state=established&table=lb"
    );
    assert_eq!(CtFilter::default().to_query(), "");
    let odd = CtFilter {
        state: Some("a&b=c d".into()),
        ..CtFilter::default()
    };
    assert_eq!(odd.to_query(), "?state=a%26b%3Dc%20d");
    // The daemon reads the query with the type (a form: every value a string): unknown
    // parameters refused.
    let q: CtFilter = serde_json::from_str(r#"{"port":80,"state":"NEW"}"#).unwrap();
    assert_eq!(q.port, Some(80));
    assert!(serde_json::from_str::<CtFilter>(r#"{"color":"red"}"#).is_err());
}

#[test]
fn conntrack_filter_validates_and_matches_as_the_daemon() {
    let refused = |f: CtFilter| f.validate().unwrap_err().to_string();
    assert_eq!(
        refused(CtFilter {
            state: Some("bogus".into()),
            ..CtFilter::default()
        }),
        "unknown state \"bogus\": accepted: none, syn_sent, syn_recv, established, fin_wait, \
         close_wait, time_wait, close, new, replied"
    );
    assert_eq!(
        refused(CtFilter {
            protocol: Some("sctp".into()),
            ..CtFilter::default()
        }),
        "unknown protocol \"sctp\": accepted: tcp, udp, icmp, icmpv6, or a number 0-255"
    );
    assert_eq!(
        refused(CtFilter {
            table: Some("nat".into()),
            ..CtFilter::default()
        }),
        "unknown table \"nat\": accepted: policy, lb"
    );
    let ok = CtFilter {
        protocol: Some("ICMP".into()),
        state: Some("Syn_Sent".into()),
        table: Some("LB".into()),
        ..CtFilter::default()
    };
    assert_eq!(ok.validate(), Ok(()));

    let flows: Vec<CtFlow> = serde_json::from_str(CONNTRACK).unwrap();
    let count = |f: CtFilter| flows.iter().filter(|fl| f.matches(fl)).count();
    assert_eq!(count(CtFilter::default()), 5);
    let by = |address: Option<&str>, port, protocol: Option<&str>, state: Option<&str>| {
        count(CtFilter {
            address: address.map(Into::into),
            port,
            protocol: protocol.map(Into::into),
            state: state.map(Into::into),
            table: None,
        })
    };
    assert_eq!(by(Some("198.18.100.1"), None, None, None), 1);
    assert_eq!(by(None, Some(8080), None, None), 1);
    assert_eq!(by(None, None, Some("TCP"), None), 2);
    assert_eq!(by(None, None, Some("6"), None), 2);
    assert_eq!(by(None, None, Some("47"), Some("new")), 1);
    assert_eq!(by(None, None, None, Some("established")), 1);
    assert_eq!(
        count(CtFilter {
            table: Some("Policy".into()),
            ..CtFilter::default()
        }),
        4
    );
}

#[test]
fn conntrack_flush_and_stats() {
    let flushed: FlushAnswer = same_bytes(r#"{"removed": 3}"#);
    assert_eq!(flushed.removed, 3);
    let stats: CtStats = same_bytes(
        r#"{"entries": 2, "capacity": 65536,
            "by_state": {"ESTABLISHED": 1, "REPLIED": 1},
            "by_protocol": {"tcp": 1, "udp": 1},
            "gc_sweeps": 10, "gc_expired": 1, "events_received": 7,
            "events_lost": {"rate_limited": 0, "ring_full": 2, "slow_reader": 0},
            "timeouts": {"other": 30, "tcp_closing": 10, "tcp_established": 3600,
                         "tcp_syn": 60, "udp": 30}}"#,
    );
    assert_eq!(stats.events_lost["ring_full"], 2);
}

const EVENTS: &str = r#"[
  {"kind": "opened", "ts_ns": 123456789012, "protocol": "tcp", "src": "198.18.0.1",
   "src_port": 41234, "dst": "198.18.20.2", "dst_port": 8080, "interface": "ep0",
   "direction": "egress", "rule": 0, "rule_name": "web", "state": "SYN_SENT",
   "packets_orig": 1, "packets_reply": 0, "bytes_orig": 60, "bytes_reply": 0,
   "duration_ns": 0, "rtt_ns": 0, "dst_name": "web.example.test", "src_name": null, "pid": null, "exe": null},
  {"kind": "denied", "ts_ns": 123456789999, "protocol": "tcp", "src": "198.18.0.1",
   "src_port": 41240, "dst": "198.18.20.2", "dst_port": 7070, "interface": "ep0",
   "direction": "egress", "rule": null, "rule_name": null, "state": "NONE",
   "packets_orig": 1, "packets_reply": 0, "bytes_orig": 60, "bytes_reply": 0,
   "duration_ns": 0, "rtt_ns": 0, "dst_name": null, "src_name": null, "pid": null, "exe": null},
  {"kind": "closed", "ts_ns": 123999999999, "protocol": "tcp", "src": "198.18.0.1",
   "src_port": 41234, "dst": "198.18.20.2", "dst_port": 8080, "interface": "ep0",
   "direction": "egress", "rule": 0, "rule_name": "web", "state": "TIME_WAIT",
   "packets_orig": 6, "packets_reply": 5, "bytes_orig": 402, "bytes_reply": 391,
   "duration_ns": 543000000, "rtt_ns": 81234, "dst_name": null, "src_name": null, "pid": null, "exe": null},
  {"kind": "expired", "ts_ns": 124000000000, "protocol": "udp", "src": "198.18.0.1",
   "src_port": 5353, "dst": "198.18.20.2", "dst_port": 53, "interface": "if12",
   "direction": "ingress", "rule": 2, "rule_name": "ep0/ingress[0]", "state": "REPLIED",
   "packets_orig": 1, "packets_reply": 1, "bytes_orig": 60, "bytes_reply": 90,
   "duration_ns": 1000, "rtt_ns": 0, "dst_name": null, "src_name": null, "pid": null, "exe": null},
  {"kind": "unknown", "ts_ns": 1, "protocol": "icmp", "src": "198.18.0.1",
   "src_port": 1, "dst": "198.18.20.2", "dst_port": 0, "interface": "ep0",
   "direction": "ingress", "rule": null, "rule_name": null, "state": "NEW",
   "packets_orig": 0, "packets_reply": 0, "bytes_orig": 0, "bytes_reply": 0,
   "duration_ns": 0, "rtt_ns": 0, "dst_name": null, "src_name": null, "pid": null, "exe": null}
]"#;

#[test]
fn recent_flow_events() {
    let events: Vec<FlowEventView> = same_bytes(EVENTS);
    let kinds: Vec<FlowKind> = events.iter().map(|e| e.kind).collect();
    assert_eq!(
        kinds,
        [
            FlowKind::Opened,
            FlowKind::Denied,
            FlowKind::Closed,
            FlowKind::Expired,
            FlowKind::Unknown
        ]
    );
    assert_eq!(events[1].rule, None);
    assert_eq!(events[3].rule_name.as_deref(), Some("ep0/ingress[0]"));
    assert!(events[2].kind.ends_flow() && !events[0].kind.ends_flow());
}

/// The follow stream: each line one event, written as `serde_json::to_vec` writes it.
#[test]
fn follow_stream_lines() {
    let events: Vec<serde_json::Value> = serde_json::from_str(EVENTS).unwrap();
    let stream: String = serde_json::from_str::<Vec<FlowEventView>>(EVENTS)
        .unwrap()
        .iter()
        .map(|e| serde_json::to_string(e).unwrap() + "\n")
        .collect();
    assert_eq!(stream.lines().count(), events.len());
    for line in stream.lines() {
        let _: FlowEventView = same_bytes(line);
    }
}

#[test]
fn flows_query() {
    assert_eq!(FlowsQuery::default().to_query(), "");
    assert_eq!(FlowsQuery::follow(None, None).to_query(), "?follow=true");
    assert_eq!(
        FlowsQuery::follow(Some(3), Some(60)).to_query(),
        "?follow=true&count=3&timeout_seconds=60"
    );
    let q: FlowsQuery = serde_json::from_str(r#"{"follow":true,"count":2}"#).unwrap();
    assert_eq!(q, FlowsQuery::follow(Some(2), None));
    assert!(serde_json::from_str::<FlowsQuery>(r#"{"since":1}"#).is_err());
}

#[test]
fn status_and_health() {
    let status: StatusView = same_bytes(
        r#"{"version": "0.1.0", "ready": false, "config_file": "/etc/datapath/config.yaml",
            "config_reloads": 2, "config_reload_failures": 1,
            "last_reload_error": "config /etc/datapath/config.yaml line 3: key `x`: unknown",
            "interfaces": [{"name": "eth0", "xdp_mode": "native"},
                           {"name": "eth1", "xdp_mode": "adopted"}],
            "modules": [{"name": "lb", "enabled": true, "up": true, "restarts": 0},
                        {"name": "prog_stats", "enabled": false, "up": false,
                         "reason": "disabled by the configuration", "restarts": 0},
                        {"name": "policy", "enabled": true, "up": false,
                         "reason": "kernel feature tcx missing or forced off", "restarts": 0},
                        {"name": "conntrack", "enabled": true, "up": true, "restarts": 2,
                         "last_failure": "panicked: injected"}],
            "features": [{"name": "tcx", "available": false, "detail": "kernel 6.1"}]}"#,
    );
    assert_eq!(status.modules[2].reason.as_deref().map(str::len), Some(40));
    // Without a configuration file and a refused reload, both keys are absent.
    let _: StatusView = same_bytes(
        r#"{"version":"0.1.0","ready":true,"config_reloads":0,"config_reload_failures":0,
            "interfaces":[],"modules":[],"features":[]}"#,
    );
    assert_eq!(same_bytes::<Health>(r#"{"status":"ok"}"#), Health::ok());
}

#[test]
fn error_bodies() {
    for code in ErrorCode::ALL {
        let body = format!(r#"{{"code":"{}","error":"why"}}"#, code.as_str());
        let e: ApiError = same_bytes(&body);
        assert_eq!(e.code, code);
    }
    let e: ApiError =
        same_bytes(r#"{"code":"not_found","error":"service tcp/198.18.0.99:80 not found"}"#);
    assert_eq!(e.code.http_status(), 404);
}

/// The states a flow shows are the conntrack's names, in its order: TCP's, then the
/// pseudo-states UDP and ICMP share.
#[test]
fn state_names_are_the_conntracks() {
    let mut names: Vec<&str> = conntrack::TcpState::ALL.iter().map(|s| s.name()).collect();
    names.extend([
        conntrack::UdpState::New.name(),
        conntrack::UdpState::Replied.name(),
    ]);
    assert_eq!(
        conntrack::IcmpState::New.name(),
        conntrack::UdpState::New.name()
    );
    assert_eq!(
        conntrack::IcmpState::Replied.name(),
        conntrack::UdpState::Replied.name()
    );
    assert_eq!(CtState::ALL.map(CtState::name).to_vec(), names);
    for state in CtState::ALL {
        assert_eq!(
            serde_json::to_string(&state).unwrap(),
            format!("\"{}\"", state.name())
        );
        assert_eq!(state.name().to_ascii_lowercase().parse(), Ok(state));
    }
}

const PROC_EVENTS: &str = r#"[
  {"kind": "exec", "process": {"pid": 31337, "start_ticks": 2477048, "ppid": 31300,
   "exe": "/opt/bin/denied", "args": ["/opt/bin/denied", "-c", "true"], "comm": "denied",
   "uid": 0, "cgroup_id": 3103, "cgroup": "/datapath-test", "pod_uid": null,
   "container_id": null, "exit_code": null, "exited": false, "from_proc": false},
   "verdict": "denied", "rule": 0},
  {"kind": "exit", "pid": 31337, "start_ticks": 2477048, "code": 9},
  {"kind": "connect", "connect": {"ts_ns": 5, "pid": 31338, "start_ticks": 2477050,
   "exe": "/bin/bash", "comm": "bash", "uid": 0, "cgroup_id": 3103, "protocol": "tcp",
   "src": "198.18.0.1", "src_port": 41234, "dst": "198.18.100.1", "dst_port": 80,
   "outcome": "established"}},
  {"kind": "connect", "connect": {"ts_ns": 6, "pid": 31339, "start_ticks": 0, "exe": null,
   "comm": "", "uid": 0, "cgroup_id": 3103, "protocol": "tcp", "src": "0.0.0.0",
   "src_port": 0, "dst": "2001:db8::1", "dst_port": 9, "outcome": "checked",
   "verdict": "audited", "rule": 1}}
]"#;

#[test]
fn proc_follow_events() {
    use datapath_api::ProcEventView;
    let events: Vec<ProcEventView> = same_bytes(PROC_EVENTS);
    assert!(matches!(&events[0],
        ProcEventView::Exec { verdict: Some(v), rule: Some(0), .. } if v == "denied"));
    assert!(matches!(events[1], ProcEventView::Exit { code: 9, .. }));
    let ProcEventView::Connect { connect } = &events[3] else {
        panic!("{events:?}")
    };
    assert!(connect.dst.is_ipv6() && connect.verdict.as_deref() == Some("audited"));
}

#[test]
fn lb_stats_with_and_without_the_syn_flood_mode() {
    let now: datapath_api::StatsView = same_bytes(
        r#"{"services": [],
            "reasons": {"fwd_redirect": 12, "new_flow": 3, "new_flow_untracked": 9},
            "syn_flood": {"rate_per_cpu": 125000, "cpus_flooding": 1, "cpus": 2,
                          "entered": 4}}"#,
    );
    let flood = now.syn_flood.expect("syn_flood");
    assert_eq!((flood.cpus_flooding, flood.entered), (1, 4));
    // A daemon from before the mode answers without it.
    let before: datapath_api::StatsView =
        same_bytes(r#"{"services": [], "reasons": {"fwd_redirect": 12}}"#);
    assert_eq!(before.syn_flood, None);
}

#[test]
fn cidrs_of_both_families_parse_and_contain_by_family() {
    use datapath_api::policy::Cidr;
    let c = |s: &str| s.parse::<Cidr>().unwrap_or_else(|e| panic!("{s}: {e}"));
    assert_eq!(c("2001:db8::1"), c("2001:db8::1/128"));
    assert_eq!(c("198.18.0.1"), c("198.18.0.1/32"));
    assert_eq!(c("2001:db8::/32").to_string(), "2001:db8::/32");
    assert!(c("2001:db8::/32").contains(&c("2001:db8:1::/48")));
    assert!(!c("2001:db8::/32").contains(&c("2001:db9::/48")));
    assert!(!c("2001:db8::/48").contains(&c("2001:db8::/32")));
    assert!(c("198.18.0.0/15").contains(&c("198.19.1.0/24")));
    // 0.0.0.0/0 is every address of both families; ::/0 only IPv6's; others their own.
    assert!(Cidr::ANY.contains(&c("2001:db8::/32")));
    assert!(Cidr::ANY.contains(&c("198.18.0.0/15")));
    assert!(c("::/0").contains(&c("2001:db8::/32")));
    assert!(!c("::/0").contains(&c("198.18.0.0/15")));
    assert!(!c("198.18.0.0/15").contains(&c("::ffff:198.18.0.0/111")));
    assert!(!c("::/1").contains(&c("198.18.0.0/15")));
}

#[test]
fn graph_view() {
    // The web view's page test serves this answer; it is written in the daemon's field order.
    let g: datapath_api::GraphView = same_bytes(include_str!(
        "../../tests/netns/tests/data/graph-sample.json"
    ));
    assert!(g.edges.iter().any(|e| e.failures.no_backend > 0));
    assert!(g.nodes.iter().any(|n| n.namespace.is_none()));
    let dot = g.to_dot();
    assert_eq!(dot.matches(" -> ").count(), g.edges.len(), "{dot}");
}
