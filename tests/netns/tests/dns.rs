//! DNS names learned from the datapath, with no proxy, end to end. A real dnsmasq runs on
//! backend b1 (IPv4 and IPv6), `dig` and the system resolver (`getent`) run in the client
//! namespace, and datapathd on the LB node in between captures the answers with its TCX
//! programs on `lbc` and `lbb` (each answer crosses both: the second copy is a duplicate) and
//! tracks the client's connections with its policy module. A scripted server on b2 sends
//! crafted answers. Everything is real: the kernel, the programs, the sockets, the servers.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Result;
use datapath_api::{CtFlow, DnsEntryView, DnsStatus};
use netns_tests::{
    Daemon, Lab, LabOptions, TopologyOptions,
    client::connect_in,
    cmd,
    dns::{Crafter, DNS_PORT, Dnsmasq, ScriptedServer, dig, getent, query_name},
    http, privileged,
    topology::{LB_CLIENT_IP, ip_in, sysctl_in},
    wait::eventually,
};

const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
const RESOLVER: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 11);
const RESOLVER6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 0x11);
const HOSTILE: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 12);
/// Backends b2 and b3, whose servers listen on 8080: the addresses names resolve to.
const WEB: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 12);
const HELD: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 13);
/// Addresses for `many.test` (more than the per-name cap).
const MANY: u8 = 80;
const PER_NAME_CAP: usize = 50;

fn ok<T>(what: &str, r: Result<T>) -> T {
    r.unwrap_or_else(|e| panic!("{what}: {e:#}"))
}

/// The daemon's configuration: the policy (for the conntrack) and the DNS capture on the LB
/// node's interfaces, with short TTL bounds so expiry is seen within the test.
const CONFIG: &str = "\
reload:
  watch: false
policy:
  enabled: true
  interfaces: [lbc, lbb]
dns:
  enabled: true
  interfaces: [lbc, lbb]
  ttl_floor_seconds: 2
  grace_seconds: 2
  max_addresses_per_name: 50
";

/// Allow all, and log the client's TCP flows (so `lb-ctl flows` has events to name).
const POLICY: &str = "\
endpoints:
  - interface: \"lb*\"
    default_ingress: allow
    default_egress: allow
    ingress:
      - name: web
        protocol: tcp
        ports: 8080
        action: log
";

/// IPv6 between the client and b1 through the LB node.
fn ipv6(lab: &Lab) -> Result<()> {
    let t = &lab.topo;
    let b1 = &t.backend("b1").ns;
    ip_in(
        &t.client,
        &[
            "-6",
            "addr",
            "add",
            "2001:db8::1/64",
            "dev",
            "eth0",
            "nodad",
        ],
    )?;
    ip_in(
        &t.client,
        &[
            "-6",
            "route",
            "add",
            "2001:db8:1::/64",
            "via",
            "2001:db8::2",
        ],
    )?;
    ip_in(
        &t.lb,
        &["-6", "addr", "add", "2001:db8::2/64", "dev", "lbc", "nodad"],
    )?;
    ip_in(
        &t.lb,
        &[
            "-6",
            "addr",
            "add",
            "2001:db8:1::1/64",
            "dev",
            "lbb",
            "nodad",
        ],
    )?;
    sysctl_in(&t.lb, &[("net.ipv6.conf.all.forwarding", "1")])?;
    ip_in(
        b1,
        &[
            "-6",
            "addr",
            "add",
            "2001:db8:1::11/64",
            "dev",
            "eth0",
            "nodad",
        ],
    )?;
    ip_in(
        b1,
        &[
            "-6",
            "route",
            "add",
            "2001:db8::/64",
            "via",
            "2001:db8:1::1",
        ],
    )?;
    // Neighbour discovery and the router's state settle within a moment: wait until the
    // client reaches b1 (bounded).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut ping = std::process::Command::new("ping");
        ping.args(["-6", "-c1", "-W1", "2001:db8:1::11"]);
        netns_tests::netns::command_in(&mut ping, &t.client)?;
        if cmd::output_timeout(&mut ping, Duration::from_secs(5))?
            .status
            .success()
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            anyhow::bail!("the client does not reach b1 over IPv6");
        }
    }
}

/// dnsmasq's records: a two-level CNAME chain, A and AAAA, chosen TTLs (0 among them), and a
/// name with more addresses than a UDP answer without EDNS holds.
fn records(lab: &mut Lab) -> Result<Vec<String>> {
    let hosts: String = (1..=MANY)
        .map(|i| format!("198.18.3.{i} many.test\n"))
        .collect();
    let many = lab.write_file("many.hosts", &hosts)?;
    Ok(vec![
        format!("--host-record=web.test,{WEB},2001:db8:1::12,300"),
        "--cname=www.test,web.test".into(),
        "--cname=edge.test,www.test".into(),
        format!("--host-record=held.test,{HELD},3"),
        "--host-record=zero.test,198.18.2.1,0".into(),
        "--host-record=short.test,198.18.2.2,4".into(),
        "--host-record=tcp.test,198.18.2.3,300".into(),
        "--host-record=getent.test,198.18.2.4,300".into(),
        format!("--addn-hosts={}", many.display()),
        "--local-ttl=300".into(),
    ])
}

fn dns_status(d: &Daemon) -> DnsStatus {
    let v = ok("dns status", d.lb_ctl_json(&["dns", "status"]));
    ok(
        "dns status json",
        serde_json::from_value(v).map_err(Into::into),
    )
}

fn lookup(d: &Daemon, addr: IpAddr) -> Vec<DnsEntryView> {
    let v = ok(
        "dns lookup",
        d.lb_ctl_json(&["dns", "lookup", &addr.to_string()]),
    );
    ok(
        "dns lookup json",
        serde_json::from_value(v).map_err(Into::into),
    )
}

fn named(d: &Daemon, name: &str) -> Vec<DnsEntryView> {
    let v = ok("dns list", d.lb_ctl_json(&["dns", "list", "--name", name]));
    ok(
        "dns list json",
        serde_json::from_value(v).map_err(Into::into),
    )
}

fn conntrack(d: &Daemon) -> Vec<CtFlow> {
    let v = ok("conntrack list", d.lb_ctl_json(&["conntrack", "list"]));
    ok(
        "conntrack json",
        serde_json::from_value(v).map_err(Into::into),
    )
}

/// The entry as the test expects it, the times aside.
fn entry(client: IpAddr, addr: IpAddr, names: &[&str], ttl: u32, resolver: IpAddr) -> DnsEntryView {
    DnsEntryView {
        client,
        address: addr,
        names: names.iter().map(|n| n.to_string()).collect(),
        ttl,
        age_seconds: 0,
        expires_in_seconds: 0,
        held: false,
        resolver,
    }
}

/// `e` with its times zeroed, to compare whole entries.
fn timeless(e: &DnsEntryView) -> DnsEntryView {
    DnsEntryView {
        age_seconds: 0,
        expires_in_seconds: 0,
        ..e.clone()
    }
}

fn lab() -> Lab {
    let mut lab = ok(
        "lab",
        Lab::start(LabOptions {
            topology: TopologyOptions {
                backends: 3,
                dsr: false,
                ipv6: false,
            },
            daemon: None,
        }),
    );
    ok("ipv6", ipv6(&lab));
    ok("daemon", lab.start_daemon_with_config(CONFIG));
    let policy = ok("policy file", lab.write_file("policy.yaml", POLICY));
    ok(
        "policy",
        lab.daemon()
            .lb_ctl_ok(&["policy", "apply", "-f", &policy.display().to_string()])
            .map(drop),
    );
    let st = dns_status(lab.daemon());
    assert!(st.up, "{st:#?}\n{}", lab.daemon().log());
    assert_eq!(st.interfaces, ["lbb", "lbc", "lo"], "{st:#?}");
    lab
}

#[test]
fn dns_names_from_real_answers_reach_the_conntrack_and_expire() {
    if !privileged() {
        return;
    }
    for tool in ["dnsmasq", "dig", "getent", "unshare"] {
        assert!(
            cmd::available(tool, "--version") || cmd::available(tool, "-v"),
            "{tool} missing"
        );
    }
    let mut lab = lab();
    let recs = ok("records", records(&mut lab));
    let b1 = lab.topo.backend("b1").ns.clone();
    let _dnsmasq = ok(
        "dnsmasq",
        Dnsmasq::start(
            &b1,
            &[IpAddr::V4(RESOLVER), IpAddr::V6(RESOLVER6)],
            DNS_PORT,
            &recs,
            ("web.test", &WEB.to_string()),
        ),
    );
    let client_ns = lab.client_ns().to_string();
    let d = lab.daemon();
    let (client, resolver) = (IpAddr::V4(CLIENT), IpAddr::V4(RESOLVER));
    let q = |args: &[&str]| ok("dig", dig(&client_ns, resolver, args));

    // A CNAME chain over UDP: the name asked for, then the chain, at the A record's address.
    let out = q(&["edge.test", "A", "+tries=1", "+time=2"]);
    assert!(out.contains(&WEB.to_string()), "{out}");
    let web = eventually("edge.test learned", Duration::from_secs(5), || {
        lookup(d, IpAddr::V4(WEB))
            .into_iter()
            .find(|e| e.client == client)
    });
    assert_eq!(
        timeless(&web),
        entry(
            client,
            IpAddr::V4(WEB),
            &["edge.test", "www.test", "web.test"],
            300,
            resolver
        )
    );
    assert!((295..=300).contains(&web.expires_in_seconds), "{web:?}");

    // AAAA, asked over IPv6.
    let out = ok(
        "dig aaaa",
        dig(
            &client_ns,
            IpAddr::V6(RESOLVER6),
            &["web.test", "AAAA", "+tries=1", "+time=2"],
        ),
    );
    assert!(out.contains("2001:db8:1::12"), "{out}");
    let v6: IpAddr = "2001:db8:1::12".parse().unwrap();
    let web6 = eventually("web.test AAAA learned", Duration::from_secs(5), || {
        lookup(d, v6).into_iter().next()
    });
    assert_eq!(
        timeless(&web6),
        entry(
            IpAddr::V6(CLIENT6),
            v6,
            &["web.test"],
            300,
            IpAddr::V6(RESOLVER6)
        )
    );

    // TCP.
    let before = dns_status(d);
    let out = q(&["+tcp", "tcp.test", "+tries=1", "+time=2"]);
    assert!(out.contains("198.18.2.3"), "{out}");
    let tcp = eventually("tcp.test learned", Duration::from_secs(5), || {
        lookup(d, "198.18.2.3".parse().unwrap()).into_iter().next()
    });
    assert_eq!(tcp.names, ["tcp.test"]);
    let after = dns_status(d);
    assert!(after.messages > before.messages, "{after:#?}");
    // Each answer crossed lbb then lbc: the second copy is dropped as a duplicate.
    assert!(after.duplicates > before.duplicates, "{after:#?}");

    // The system resolver (glibc, through /etc/resolv.conf) as a client.
    let resolv = ok(
        "resolv.conf",
        lab.write_file(
            "resolv.conf",
            &format!("nameserver {RESOLVER}\noptions attempts:1\n"),
        ),
    );
    let d = lab.daemon();
    let out = ok("getent", getent(&client_ns, &resolv, "getent.test"));
    assert!(out.contains("198.18.2.4"), "getent: {out:?}");
    let g = eventually("getent.test learned", Duration::from_secs(5), || {
        lookup(d, "198.18.2.4".parse().unwrap()).into_iter().next()
    });
    assert_eq!(
        timeless(&g),
        entry(
            client,
            "198.18.2.4".parse().unwrap(),
            &["getent.test"],
            300,
            resolver
        )
    );

    // A truncated answer (no EDNS: 512 bytes hold fewer than 80 addresses), then the same over
    // TCP, as a client retries: every address arrives, and the per-name cap keeps 50.
    let before = dns_status(d);
    let out = q(&["many.test", "+noedns", "+ignore", "+tries=1", "+time=2"]);
    assert!(
        out.contains("flags: qr aa tc") || out.contains(" tc"),
        "{out}"
    );
    eventually(
        "the truncated answer counted",
        Duration::from_secs(5),
        || (dns_status(d).truncated_answers > before.truncated_answers).then_some(()),
    );
    let out = q(&["many.test", "+noedns", "+tries=1", "+time=2"]);
    assert_eq!(
        out.lines().filter(|l| l.contains("198.18.3.")).count(),
        MANY as usize,
        "{out}"
    );
    let many = eventually("many.test learned over TCP", Duration::from_secs(5), || {
        let m = named(d, "many.test");
        (m.len() == PER_NAME_CAP).then_some(m)
    });
    assert!(
        many.iter()
            .all(|e| e.names == ["many.test"] && e.client == client)
    );
    let st = dns_status(d);
    assert!(
        st.evictions["name_cap"] >= u64::from(MANY) - PER_NAME_CAP as u64,
        "{st:#?}"
    );

    // TTL 0 lives for the floor (2 s), then goes; a TTL of 4 s lives 4 s.
    q(&["zero.test", "+tries=1", "+time=2"]);
    let learned = Instant::now();
    let zero = eventually("zero.test learned", Duration::from_secs(5), || {
        lookup(d, "198.18.2.1".parse().unwrap()).into_iter().next()
    });
    assert_eq!(zero.ttl, 0);
    assert!(zero.expires_in_seconds <= 2, "{zero:?}");
    eventually("zero.test expired", Duration::from_secs(6), || {
        lookup(d, "198.18.2.1".parse().unwrap())
            .is_empty()
            .then_some(())
    });
    assert!(
        learned.elapsed() >= Duration::from_millis(1500),
        "expired before the floor"
    );

    q(&["short.test", "+tries=1", "+time=2"]);
    let learned = Instant::now();
    eventually("short.test learned", Duration::from_secs(5), || {
        lookup(d, "198.18.2.2".parse().unwrap()).into_iter().next()
    });
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        lookup(d, "198.18.2.2".parse().unwrap()).len(),
        1,
        "gone before its TTL"
    );
    eventually("short.test expired", Duration::from_secs(6), || {
        lookup(d, "198.18.2.2".parse().unwrap())
            .is_empty()
            .then_some(())
    });
    assert!(
        learned.elapsed() >= Duration::from_millis(3500),
        "expired before its TTL"
    );
    assert!(dns_status(d).expired >= 2);

    // A connection to a resolved address shows the name in the conntrack, and in the flow
    // events.
    q(&["held.test", "+tries=1", "+time=2"]);
    eventually("held.test learned", Duration::from_secs(5), || {
        lookup(d, IpAddr::V4(HELD)).into_iter().next()
    });
    let held = ok(
        "connect held",
        connect_in(&client_ns, SocketAddr::new(IpAddr::V4(HELD), 8080)),
    );
    let web_conn = ok(
        "connect web",
        connect_in(&client_ns, SocketAddr::new(IpAddr::V4(WEB), 8080)),
    );
    let flow_to = |flows: &[CtFlow], dst: Ipv4Addr| -> Option<CtFlow> {
        flows
            .iter()
            .find(|f| f.dst == IpAddr::V4(dst) && f.dst_port == 8080 && f.src == client)
            .cloned()
    };
    let flows = conntrack(d);
    assert_eq!(
        flow_to(&flows, HELD).and_then(|f| f.dst_name).as_deref(),
        Some("held.test"),
        "{flows:#?}"
    );
    assert_eq!(
        flow_to(&flows, WEB).and_then(|f| f.dst_name).as_deref(),
        Some("edge.test"),
        "{flows:#?}"
    );
    let table = ok("conntrack table", d.lb_ctl_ok(&["conntrack", "list"]));
    assert!(
        table.contains("NAME") && table.contains("held.test"),
        "{table}"
    );
    let events = ok("flows", d.lb_ctl_json(&["flows"]));
    assert!(
        events
            .as_array()
            .into_iter()
            .flatten()
            .any(|e| { e["dst"] == HELD.to_string() && e["dst_name"] == "held.test" }),
        "{events:#}"
    );

    // Kept open past its TTL (3 s) and the grace (2 s), the flow keeps its name.
    std::thread::sleep(Duration::from_secs(7));
    let kept = lookup(d, IpAddr::V4(HELD));
    assert_eq!(
        kept.len(),
        1,
        "a live flow's name must stay: {:#?}",
        dns_status(d)
    );
    assert!(kept[0].held, "{kept:?}");
    assert_eq!(
        flow_to(&conntrack(d), HELD)
            .and_then(|f| f.dst_name)
            .as_deref(),
        Some("held.test")
    );
    // Closed, it goes within the grace period (and a sweep).
    drop(held);
    eventually(
        "held.test expired after its flow closed",
        Duration::from_secs(8),
        || lookup(d, IpAddr::V4(HELD)).is_empty().then_some(()),
    );
    drop(web_conn);

    // The metrics, promtool clean.
    let (_, metrics) = ok(
        "/metrics",
        http::get_in(
            &client_ns,
            SocketAddr::new(IpAddr::V4(LB_CLIENT_IP), 9477),
            "/metrics",
        ),
    );
    for family in [
        "datapath_dns_captured_total",
        "datapath_dns_answers_total",
        "datapath_dns_parse_errors_total",
        "datapath_dns_entries",
        "datapath_dns_evictions_total{cause=\"name_cap\"}",
        "datapath_dns_lost_total{cause=\"rate_limited\"} 0",
    ] {
        assert!(metrics.contains(family), "{family} missing:\n{metrics}");
    }
    ok("promtool", cmd::promtool_check(&metrics));
}

/// A DNS response header: id, flags (QR, RD, RA; NOERROR), counts.
fn header(id: u16, qd: u16, an: u16) -> Vec<u8> {
    let mut h = id.to_be_bytes().to_vec();
    h.extend([0x81, 0x80]);
    for n in [qd, an, 0, 0] {
        h.extend(n.to_be_bytes());
    }
    h
}

/// A name in wire form, uncompressed.
fn wire_name(name: &str) -> Vec<u8> {
    let mut out = Vec::new();
    for label in name.split('.') {
        out.push(label.len() as u8);
        out.extend(label.as_bytes());
    }
    out.push(0);
    out
}

/// An A record: owner (wire form), TTL 300, address.
fn a_record(owner: &[u8], addr: [u8; 4]) -> Vec<u8> {
    let mut r = owner.to_vec();
    r.extend([0, 1, 0, 1, 0, 0, 1, 0x2c, 0, 4]);
    r.extend(addr);
    r
}

/// The crafted answer for each hostile name (the question echoed, then the trouble).
fn hostile(query: &[u8]) -> Option<Vec<u8>> {
    let id = u16::from_be_bytes([*query.first()?, *query.get(1)?]);
    let name = query_name(query)?;
    let mut question = wire_name(&name);
    question.extend([0, 1, 0, 1]);
    let start = |an: u16| {
        let mut m = header(id, 1, an);
        m.extend(&question);
        m
    };
    let ptr_to_question = [0xc0, 12];
    Some(match name.as_str() {
        // The answer's owner is a pointer to itself.
        "loop.bad" => {
            let mut m = start(1);
            let here = m.len() as u16;
            m.extend([0xc0 | (here >> 8) as u8, here as u8]);
            m.extend([0, 1, 0, 1, 0, 0, 1, 0x2c, 0, 4, 198, 18, 9, 1]);
            m
        }
        // Five answers claimed, one present (and valid).
        "counts.bad" => {
            let mut m = start(5);
            m.extend(a_record(&ptr_to_question, [198, 18, 9, 2]));
            m
        }
        // A label of 64 bytes.
        "label.bad" => {
            let mut m = start(1);
            let mut owner = vec![64];
            owner.extend([b'a'; 64]);
            owner.extend(ptr_to_question);
            m.extend(a_record(&owner, [198, 18, 9, 3]));
            m
        }
        // A name of more than 255 bytes.
        "long.bad" => {
            let mut m = start(1);
            let mut owner = Vec::new();
            for _ in 0..5 {
                owner.push(60);
                owner.extend([b'b'; 60]);
            }
            owner.extend(ptr_to_question);
            m.extend(a_record(&owner, [198, 18, 9, 4]));
            m
        }
        // An answer about a name nobody asked for.
        "unrelated.bad" => {
            let mut m = start(1);
            m.extend(a_record(&wire_name("victim.test"), [198, 18, 9, 5]));
            m
        }
        // Random bytes after a response header.
        "random.bad" => {
            let mut m = header(id, 1, 3);
            let mut x: u32 = 0x9e37_79b9;
            for _ in 0..300 {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                m.push(x as u8);
            }
            m
        }
        // 64 KiB over TCP: valid records for the name, far more than the capture keeps.
        "big.bad" => {
            let mut m = start(4_000);
            for i in 0..4_000u32 {
                m.extend(a_record(
                    &ptr_to_question,
                    [198, 18, 10 + (i / 250) as u8, (i % 250) as u8],
                ));
            }
            m
        }
        _ => return None,
    })
}

#[test]
fn dns_hostile_answers_are_counted_and_teach_nothing_wrong() {
    if !privileged() {
        return;
    }
    let lab = lab();
    let b2 = lab.topo.backend("b2").ns.clone();
    let crafter: Crafter = Arc::new(hostile);
    let _server = ok(
        "scripted server",
        ScriptedServer::start(&b2, IpAddr::V4(HOSTILE), crafter),
    );
    let client_ns = lab.client_ns().to_string();
    let d = lab.daemon();
    let errors = |st: &DnsStatus, reason: &str| st.parse_errors.get(reason).copied().unwrap_or(0);
    for (name, reason, tcp) in [
        ("loop.bad", "bad_pointer", false),
        ("counts.bad", "section_count", false),
        ("label.bad", "label_too_long", false),
        ("long.bad", "name_too_long", false),
        ("unrelated.bad", "unrelated", false),
        ("random.bad", "", false),
        ("big.bad", "", true),
    ] {
        let before = dns_status(d);
        let mut args = vec![name, "+tries=1", "+time=2"];
        if tcp {
            args.push("+tcp");
        }
        ok("dig", dig(&client_ns, IpAddr::V4(HOSTILE), &args));
        let after = eventually(&format!("{name} counted"), Duration::from_secs(5), || {
            let st = dns_status(d);
            let counted = if reason.is_empty() {
                // Whatever it was: a problem, a cut, or more addresses than a name keeps.
                let total = |s: &DnsStatus| {
                    s.parse_errors.values().sum::<u64>() + s.snap_cut + s.evictions["name_cap"]
                };
                total(&st) > total(&before)
            } else {
                errors(&st, reason) > errors(&before, reason)
            };
            counted.then_some(st)
        });
        assert!(after.up, "{name}: {after:#?}");
        let status = ok("status", d.lb_ctl(&["status"]));
        assert!(
            status.status.success(),
            "{name}: the daemon must keep running"
        );
    }
    // Nothing wrong was stored: no address of the broken answers, no name nobody asked for,
    // and the valid record of the miscounted answer is the one entry from 198.18.9.0/24.
    let entries: Vec<DnsEntryView> =
        serde_json::from_value(ok("dns list", d.lb_ctl_json(&["dns", "list"]))).unwrap();
    let in_nine: Vec<&DnsEntryView> = entries
        .iter()
        .filter(|e| matches!(e.address, IpAddr::V4(a) if a.octets()[..3] == [198, 18, 9]))
        .collect();
    assert_eq!(in_nine.len(), 1, "{entries:#?}");
    assert_eq!(in_nine[0].names, ["counts.bad"]);
    assert!(named(d, "victim.test").is_empty(), "{entries:#?}");
    assert!(
        entries.iter().all(|e| e
            .names
            .iter()
            .all(|n| n.len() <= 253 && n.bytes().all(|b| b.is_ascii_graphic()))),
        "{entries:#?}"
    );
    // The large TCP answer keeps at most the per-name cap.
    assert!(named(d, "big.bad").len() <= PER_NAME_CAP);
    if named(d, "big.bad").is_empty() {
        // Cut at the snap length, the stream was given up: counted as such.
        let st = dns_status(d);
        assert!(st.snap_cut > 0 || errors(&st, "tcp_gap") > 0, "{st:#?}");
    }
}
