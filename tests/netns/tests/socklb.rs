//! Socket-level load balancing end to end: datapathd attaches its cgroup sock_addr programs to
//! a cgroup made for the test (never the root), and processes in that cgroup, on the LB node
//! (the namespace where the daemon runs), reach the backends through a VIP that no route
//! leads to: only the socket LB can make those connections work. Everything is real: the
//! cgroup, the programs, TCP and UDP sockets, the backends' servers.
//!
//! The clients are small Python programs (`CLIENT`), started inside the test cgroup and the LB
//! node's network namespace; each prints one JSON line per exchange.

use std::{
    io::{BufRead, BufReader},
    net::{IpAddr, SocketAddr},
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use datapath_api::{Protocol, SockLbStatus};
use netns_tests::{
    Daemon, Lab, LabOptions, TopologyOptions,
    cgroup::TestCgroup,
    client::sock,
    cmd, http,
    lab::{TCP_SERVICE_PORT, UDP_SERVICE_PORT},
    netns, privileged,
    topology::{LB_CLIENT_IP, VIP, VIP6},
};
use serde_json::Value;

const CLIENT: &str = r#"
import json, socket, sys
mode, vip, port, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
# A mode ending in v6 ("tcpv6"): IPv6 sockets to an IPv6 VIP. Ending in 6 ("tcp6", "hold6"):
# IPv6 sockets to the IPv4-mapped VIP (::ffff:a.b.c.d).
if mode.endswith("v6"):
    family, host, mode = socket.AF_INET6, vip, mode[:-2]
elif mode.endswith("6"):
    family, host, mode = socket.AF_INET6, "::ffff:" + vip, mode.rstrip("6")
else:
    family, host = socket.AF_INET, vip
target = (host, port)

def tcp_connected():
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(target)
    return s

def greeting(s):
    got = b""
    while not got.endswith(b"\n"):
        chunk = s.recv(100)
        if not chunk:
            raise ConnectionError("closed before the greeting")
        got += chunk
    return got.decode().strip()

def udp_exchange(u, msg):
    u.send(msg)
    return u.recv(2048).decode().split()[0]

def udp_connected(uport):
    u = socket.socket(family, socket.SOCK_DGRAM)
    u.settimeout(5)
    u.connect((host, uport))
    return u

if mode == "hold":
    # n TCP connections and n connected UDP sockets (UDP port argv[5]), kept open; their
    # backends are printed, then after a line on stdin each is used again (and replaced by a
    # new one when it fails).
    uport = int(sys.argv[5])
    tcps = []
    for i in range(n):
        s = tcp_connected()
        tcps.append((s, greeting(s)))
    udps = []
    for i in range(n):
        u = udp_connected(uport)
        udps.append((u, udp_exchange(u, b"h%d" % i)))
    print(json.dumps({"tcp": [b for _, b in tcps], "udp": [b for _, b in udps]}), flush=True)
    sys.stdin.readline()
    out = {"tcp": [], "udp": []}
    for s, was in tcps:
        try:
            s.sendall(b"ping\n")
            if s.recv(100) != b"ping\n":
                raise ConnectionError("no echo")
            out["tcp"].append({"was": was, "ok": True})
        except OSError as e:
            s2 = tcp_connected()
            out["tcp"].append({"was": was, "ok": False, "error": repr(e), "now": greeting(s2)})
    for u, was in udps:
        try:
            out["udp"].append({"was": was, "ok": True, "now": udp_exchange(u, b"again")})
        except OSError as e:
            u2 = udp_connected(uport)
            out["udp"].append({"was": was, "ok": False, "error": repr(e),
                               "now": udp_exchange(u2, b"new")})
    print(json.dumps(out), flush=True)
    sys.exit(0)

for i in range(n):
    try:
        if mode == "tcp":
            s = socket.socket(family, socket.SOCK_STREAM)
            s.settimeout(5)
            s.connect(target)
            name = s.makefile().readline().strip()
            peer = "%s:%d" % s.getpeername()[:2]
            s.close()
            print(json.dumps({"backend": name, "peer": peer}), flush=True)
        elif mode == "udp":
            s = socket.socket(family, socket.SOCK_DGRAM)
            s.settimeout(5)
            s.sendto(b"q%d" % i, target)
            data, src = s.recvfrom(2048)
            s.close()
            print(json.dumps({"backend": data.decode().split()[0], "peer": "%s:%d" % src[:2]}),
                  flush=True)
        else:
            s = socket.socket(family, socket.SOCK_DGRAM)
            s.settimeout(5)
            s.connect(target)
            s.send(b"c%d" % i)
            data = s.recv(2048)
            peer = "%s:%d" % s.getpeername()[:2]
            s.close()
            print(json.dumps({"backend": data.decode().split()[0], "peer": peer}), flush=True)
    except OSError as e:
        print(json.dumps({"error": "%s: %s" % (type(e).__name__, e)}), flush=True)
"#;

fn ok<T>(what: &str, r: Result<T>) -> T {
    r.unwrap_or_else(|e| panic!("{what}: {e:#}"))
}

/// A lab of two backends (no daemon yet) and a cgroup made for the test.
fn lab_and_cgroup() -> (Lab, TestCgroup) {
    let lab = ok(
        "lab",
        Lab::start(LabOptions {
            topology: TopologyOptions {
                backends: 2,
                dsr: false,
                ipv6: false,
            },
            daemon: None,
        }),
    );
    let cgroup = ok(
        "test cgroup",
        TestCgroup::create(&format!("datapath-test-{}", lab.topo.prefix)),
    );
    (lab, cgroup)
}

/// The daemon's configuration: the socket LB on `cgroup`, with `socklb_keys` (indented lines)
/// in its section and `sections` after it.
fn socklb_config(cgroup: &TestCgroup, socklb_keys: &str, sections: &str) -> String {
    format!(
        "reload:\n  watch: false\nsocklb:\n  enabled: true\n  cgroup: {}\n{socklb_keys}{sections}",
        cgroup.path().display()
    )
}

/// The client's command in namespace `ns`, in `cgroup` when given (else where the test runs).
fn client_command(ns: &str, cgroup: Option<&Path>, args: &[String]) -> Command {
    let mut cmd = Command::new("python3");
    cmd.args(["-c", CLIENT]).args(args);
    in_cgroup(cmd, ns, cgroup)
}

/// `cmd` run in namespace `ns` and, when given, in `cgroup`, its output piped.
fn in_cgroup(mut cmd: Command, ns: &str, cgroup: Option<&Path>) -> Command {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    ok("the client's namespace", netns::command_in(&mut cmd, ns));
    if let Some(cg) = cgroup {
        netns_tests::cgroup::join_on_exec(&mut cmd, cg);
    }
    cmd
}

/// Runs the client (see [`client_command`]) and answers its JSON lines.
fn client(ns: &str, cgroup: Option<&Path>, mode: &str, port: u16, n: usize) -> Vec<Value> {
    client_to(ns, cgroup, mode, IpAddr::V4(VIP), port, n)
}

/// Like [`client`], to `addr` instead of the VIP.
fn client_to(
    ns: &str,
    cgroup: Option<&Path>,
    mode: &str,
    addr: IpAddr,
    port: u16,
    n: usize,
) -> Vec<Value> {
    let args = [
        mode.to_string(),
        addr.to_string(),
        port.to_string(),
        n.to_string(),
    ];
    let mut cmd = client_command(ns, cgroup, &args);
    let out = ok("python3 client", cmd.output().context("python3"));
    assert!(
        out.status.success(),
        "client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn socklb(d: &Daemon) -> SockLbStatus {
    ok(
        "lb-ctl socklb",
        d.lb_ctl_json(&["socklb"])
            .and_then(|v| Ok(serde_json::from_value(v)?)),
    )
}

/// The backends named in `answers`, each answer checked to come from the VIP.
fn backends_via_vip(what: &str, answers: &[Value], port: u16) -> Vec<String> {
    backends_via(
        what,
        answers,
        &SocketAddr::new(IpAddr::V4(VIP), port).to_string(),
    )
}

/// The backends named in `answers`, each answer checked to come from `vip` as printed.
fn backends_via(what: &str, answers: &[Value], vip: &str) -> Vec<String> {
    answers
        .iter()
        .map(|a| {
            assert!(a.get("error").is_none(), "{what}: {answers:#?}");
            assert_eq!(a["peer"], vip, "{what}: the peer is the VIP: {a}");
            a["backend"].as_str().unwrap().to_string()
        })
        .collect()
}

/// A client process that holds sockets; killed on drop, so that a failing test leaves no
/// process in the test cgroup (which could not be removed then).
struct Holder(std::process::Child);

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The port of the DNS service and of dnsmasq on the backends.
const DNS_PORT: u16 = 5300;

/// dnsmasq on a backend, answering `web.test` with 198.18.77.`n`; killed on drop.
/// dnsmasq on backend `backend`, answering web.test with 198.18.77.`n`.
fn dnsmasq(lab: &Lab, backend: &str, n: u8) -> Result<netns_tests::dns::Dnsmasq> {
    let ip = lab.backend_addr(backend).ip();
    let addr = format!("198.18.77.{n}");
    netns_tests::dns::Dnsmasq::start(
        &lab.topo.backend(backend).ns,
        &[ip],
        DNS_PORT,
        &[format!("--host-record=web.test,{addr}")],
        ("web.test", &addr),
    )
}

/// tcpdump in `ns` for packets to or from the VIP, until stopped.
struct Capture {
    /// Taken by `stop`; killed on drop otherwise (a failing test).
    child: Option<std::process::Child>,
}

impl Drop for Capture {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Capture {
    fn start(ns: &str) -> Result<Self> {
        Self::start_for(ns, IpAddr::V4(VIP))
    }

    /// Captures what carries `host` in namespace `ns`.
    fn start_for(ns: &str, host: IpAddr) -> Result<Self> {
        let mut cmd = Command::new("tcpdump");
        cmd.args(["-i", "any", "-n", "-l", "host", &host.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        netns::command_in(&mut cmd, ns)?;
        let mut capture = Self {
            child: Some(cmd.spawn().context("tcpdump")?),
        };
        // Ready once it says it listens (killed on drop if it never does).
        let stderr = capture
            .child
            .as_mut()
            .and_then(|c| c.stderr.take())
            .unwrap();
        let mut lines = BufReader::new(stderr).lines();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match lines.next() {
                Some(Ok(l)) if l.contains("listening on") => break,
                Some(Ok(_)) => {}
                _ => bail!("tcpdump ended before listening"),
            }
            if Instant::now() > deadline {
                bail!("tcpdump not listening in 10 s");
            }
        }
        Ok(capture)
    }

    /// Stops it; answers the packets it printed.
    fn stop(mut self) -> Vec<String> {
        std::thread::sleep(Duration::from_millis(300));
        let child = self.child.take().expect("stopped once");
        // SAFETY: a child we own; SIGINT makes tcpdump flush and exit.
        unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
        let out = child.wait_with_output().unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(str::to_string)
            .collect()
    }
}

#[test]
fn socket_lb_balances_connect_and_udp_in_the_test_cgroup_only() {
    if !privileged() {
        return;
    }
    let (mut lab, cgroup) = lab_and_cgroup();
    ok(
        "daemon",
        lab.start_daemon_with_config(&socklb_config(&cgroup, "", "")),
    );
    ok(
        "tcp service",
        lab.add_service(TCP_SERVICE_PORT, Protocol::Tcp, "full-nat", &["b1", "b2"])
            .map(drop),
    );
    ok(
        "udp service",
        lab.add_service(UDP_SERVICE_PORT, Protocol::Udp, "full-nat", &["b1", "b2"])
            .map(drop),
    );
    // dnsmasq on each backend, a UDP service in front of them.
    let _dns: Vec<_> = [("b1", 1), ("b2", 2)]
        .iter()
        .map(|(name, n)| ok("dnsmasq", dnsmasq(&lab, name, *n)))
        .collect();
    let dns_vip = SocketAddr::new(IpAddr::V4(VIP), DNS_PORT).to_string();
    let d = lab.daemon();
    ok(
        "dns service",
        d.lb_ctl_ok(&["service", "add", &dns_vip, "--proto", "udp"])
            .map(drop),
    );
    for name in ["b1", "b2"] {
        let b = SocketAddr::new(lab.backend_addr(name).ip(), DNS_PORT).to_string();
        ok(
            "dns backend",
            d.lb_ctl_ok(&["backend", "add", &dns_vip, &b, "--proto", "udp"])
                .map(drop),
        );
    }
    let st = socklb(d);
    assert!(st.up, "{st:#?}\n{}", d.log());
    assert_eq!(st.cgroup.as_deref(), Some(cgroup.path().to_str().unwrap()));
    assert_eq!(st.programs.len(), 8, "{st:#?}");
    let node = lab.topo.lb.clone();

    // Outside the test cgroup nothing is translated, and the VIP is routed nowhere here.
    let outside = client(&node, None, "tcp", TCP_SERVICE_PORT, 1);
    assert!(
        outside[0].get("error").is_some(),
        "a process outside the test cgroup must not reach the VIP: {outside:?}"
    );

    // TCP from the test cgroup: every connection reaches a backend, both are used, and
    // getpeername() answers the VIP. No packet to or from the VIP is on the wire.
    let capture = ok("tcpdump", Capture::start(&node));
    let tcp = client(&node, Some(cgroup.path()), "tcp", TCP_SERVICE_PORT, 40);
    let names = backends_via_vip("tcp", &tcp, TCP_SERVICE_PORT);
    assert_eq!(names.len(), 40);
    assert!(
        names.iter().any(|n| n == "b1") && names.iter().any(|n| n == "b2"),
        "both backends: {names:?}"
    );
    // Unconnected UDP: the replies come from the VIP (no "reply from unexpected source").
    let udp = client(&node, Some(cgroup.path()), "udp", UDP_SERVICE_PORT, 20);
    let udp_names = backends_via_vip("unconnected udp", &udp, UDP_SERVICE_PORT);
    assert_eq!(udp_names.len(), 20);
    // Connected UDP: getpeername() and the replies show the VIP.
    let udpc = client(&node, Some(cgroup.path()), "udpc", UDP_SERVICE_PORT, 20);
    assert_eq!(
        backends_via_vip("connected udp", &udpc, UDP_SERVICE_PORT).len(),
        20
    );
    // IPv6 sockets to the IPv4-mapped VIP, through the v6 hooks: translated the same way,
    // and they see the mapped VIP.
    let tcp6 = client(&node, Some(cgroup.path()), "tcp6", TCP_SERVICE_PORT, 10);
    let mapped = |port: u16| format!("::ffff:{VIP}:{port}");
    assert_eq!(
        backends_via("tcp over ipv6", &tcp6, &mapped(TCP_SERVICE_PORT)).len(),
        10
    );
    let udp6 = client(&node, Some(cgroup.path()), "udp6", UDP_SERVICE_PORT, 10);
    assert_eq!(
        backends_via("udp over ipv6", &udp6, &mapped(UDP_SERVICE_PORT)).len(),
        10
    );
    // A real DNS client against real DNS servers: dig through the VIP to dnsmasq on both
    // backends, each answering its own address for the name. dig checks that the reply comes
    // from where it sent the query ("reply from unexpected source" otherwise).
    let answers: Vec<String> = (0..16)
        .map(|_| {
            let mut dig = Command::new("dig");
            dig.args([
                &format!("@{VIP}"),
                "-p",
                &DNS_PORT.to_string(),
                "web.test",
                "A",
                "+tries=1",
                "+time=3",
            ]);
            let out = in_cgroup(dig, &node, Some(cgroup.path()))
                .output()
                .expect("dig");
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            assert!(out.status.success(), "dig: {text}");
            assert!(!text.contains("unexpected source"), "{text}");
            assert!(
                text.contains(&format!("SERVER: {VIP}#{DNS_PORT}")),
                "{text}"
            );
            text.lines()
                .find(|l| l.starts_with("web.test.") && l.contains("\tA\t"))
                .and_then(|l| l.split_whitespace().last())
                .unwrap_or_else(|| panic!("an A record: {text}"))
                .to_string()
        })
        .collect();
    for answer in ["198.18.77.1", "198.18.77.2"] {
        assert!(
            answers.iter().any(|a| a == answer),
            "both dnsmasq backends answered: {answers:?}"
        );
    }
    let on_wire = capture.stop();
    assert!(
        on_wire.is_empty(),
        "packets with the VIP on the wire: {on_wire:#?}"
    );
    // XDP saw none of it: the services' packet counters stay at zero.
    let stats = ok("lb-ctl stats", d.stats());
    for s in &stats.services {
        assert_eq!(
            s.counters.packets, 0,
            "XDP carried socket-LB traffic: {stats:#?}"
        );
    }

    // The module counted and published each decision.
    let st = socklb(d);
    // TCP, connected UDP and dig (which connects its socket); the process outside the cgroup
    // never ran the programs.
    assert_eq!(
        st.reasons["connect_translated"],
        40 + 20 + 10 + 16,
        "{st:#?}"
    );
    assert_eq!(st.reasons["sendmsg_translated"], 20 + 10, "{st:#?}");
    assert!(st.reasons["getpeername_reversed"] >= 60 + 10, "{st:#?}");
    // recvfrom() asks for the source; a connected recv() does not, and is not hooked.
    assert!(st.reasons["recvmsg_reversed"] >= 20 + 10 + 16, "{st:#?}");
    let tcp_count = st
        .services
        .iter()
        .find(|s| s.service == format!("tcp/{VIP}:{TCP_SERVICE_PORT}"))
        .map(|s| s.sockets);
    assert_eq!(tcp_count, Some(40 + 10), "{st:#?}");
    let last = st.recent.last().expect("recent decisions");
    assert_eq!(
        last.vip,
        SocketAddr::new(IpAddr::V4(VIP), DNS_PORT),
        "dig's, the last"
    );
    assert_eq!(last.proto, Protocol::Udp);
    assert!(
        last.pid > 0 && last.cgroup_id > 0 && last.cookie > 0,
        "{last:?}"
    );
    let table = ok("lb-ctl socklb", d.lb_ctl_ok(&["socklb"]));
    assert!(table.contains("connect_translated"), "{table}");
    // The same counts in /metrics, promtool clean.
    let (_, metrics) = ok(
        "/metrics",
        http::get_in(lab.client_ns(), sock(LB_CLIENT_IP, 9477), "/metrics"),
    );
    assert!(
        metrics.contains("datapath_socklb_outcomes_total{outcome=\"connect_translated\"} 86"),
        "{metrics}"
    );
    assert!(
        metrics.contains("datapath_socklb_sockets_destroyed_total 0"),
        "{metrics}"
    );
    cmd::promtool_check(&metrics).unwrap_or_else(|e| panic!("{e:#}"));

    // A restart: the links stay attached (the kernel lists them on the cgroup throughout),
    // and new connections are still balanced.
    ok("restart", lab.daemon_mut().restart());
    let d = lab.daemon();
    let listed = Command::new("bpftool")
        .args(["cgroup", "show"])
        .arg(cgroup.path())
        .output()
        .expect("bpftool");
    let listed = String::from_utf8_lossy(&listed.stdout);
    for hook in [
        "connect4",
        "sendmsg4",
        "recvmsg4",
        "getpeername4",
        "connect6",
        "sendmsg6",
        "recvmsg6",
        "getpeername6",
    ] {
        assert!(
            listed.contains(hook),
            "{hook} attached after the restart:\n{listed}"
        );
    }
    let after = client(&node, Some(cgroup.path()), "tcp", TCP_SERVICE_PORT, 20);
    let names = backends_via_vip("tcp after the restart", &after, TCP_SERVICE_PORT);
    assert!(
        names.iter().any(|n| n == "b1") && names.iter().any(|n| n == "b2"),
        "both backends after the restart: {names:?}"
    );
    assert!(socklb(d).up);
}

/// A backend removed under load: the TCP connections and connected UDP sockets the socket LB
/// sent to it are destroyed (SOCK_DESTROY), those to the other backend are not, and the
/// replacements reach the remaining backend; in the daemon's namespace and in another one (a
/// pod's, here the client namespace), whose sockets the daemon destroys from inside it.
#[test]
fn socket_lb_destroys_the_sockets_of_a_removed_backend() {
    if !privileged() {
        return;
    }
    const SOCKETS: usize = 12;
    let (mut lab, cgroup) = lab_and_cgroup();
    ok(
        "daemon",
        lab.start_daemon_with_config(&socklb_config(&cgroup, "", "")),
    );
    for (port, proto) in [
        (TCP_SERVICE_PORT, Protocol::Tcp),
        (UDP_SERVICE_PORT, Protocol::Udp),
    ] {
        ok(
            "service",
            lab.add_service(port, proto, "full-nat", &["b1", "b2"])
                .map(drop),
        );
    }
    let d = lab.daemon();
    let args = [
        "hold".to_string(),
        VIP.to_string(),
        TCP_SERVICE_PORT.to_string(),
        SOCKETS.to_string(),
        UDP_SERVICE_PORT.to_string(),
    ];
    // One holder on the node, one in another namespace.
    let mut holders = Vec::new();
    let mut expected = 0u64;
    // And IPv6 sockets to the IPv4-mapped VIP on the node (the v6 hooks, AF_INET6 in sock_diag).
    let mut args6 = args.clone();
    args6[0] = "hold6".into();
    for (ns, args) in [
        (lab.topo.lb.clone(), &args),
        (lab.client_ns().to_string(), &args),
        (lab.topo.lb.clone(), &args6),
    ] {
        let mut holder = Holder(
            client_command(&ns, Some(cgroup.path()), args)
                .stdin(Stdio::piped())
                .spawn()
                .expect("python3"),
        );
        let mut out = BufReader::new(holder.0.stdout.take().unwrap()).lines();
        let first: Value =
            serde_json::from_str(&out.next().expect("the held sockets").unwrap()).unwrap();
        let on = |proto: &str, name: &str| {
            first[proto]
                .as_array()
                .unwrap()
                .iter()
                .filter(|b| *b == name)
                .count()
        };
        for proto in ["tcp", "udp"] {
            assert!(
                on(proto, "b1") > 0 && on(proto, "b2") > 0,
                "{ns}: {SOCKETS} {proto} sockets on both backends: {first}"
            );
        }
        expected += (on("tcp", "b2") + on("udp", "b2")) as u64;
        holders.push((ns, holder, out));
    }

    // b2 leaves both services.
    let b2 = lab.backend_addr("b2").to_string();
    for (port, proto) in [(TCP_SERVICE_PORT, "tcp"), (UDP_SERVICE_PORT, "udp")] {
        let svc = SocketAddr::new(IpAddr::V4(VIP), port).to_string();
        ok(
            "backend remove",
            d.lb_ctl_ok(&["backend", "remove", &svc, &b2, "--proto", proto])
                .map(drop),
        );
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while socklb(d).sockets_destroyed < expected {
        assert!(
            Instant::now() < deadline,
            "{expected} sockets destroyed in 20 s: {:#?}\n{}",
            socklb(d),
            d.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(socklb(d).sockets_destroyed, expected, "only b2's sockets");

    // Each socket used again: b2's failed and their replacements reached b1; b1's still work.
    use std::io::Write as _;
    for (ns, mut holder, mut out) in holders {
        writeln!(holder.0.stdin.as_mut().unwrap(), "check").unwrap();
        let after: Value = serde_json::from_str(&out.next().expect("the check").unwrap()).unwrap();
        let _ = holder.0.wait();
        for proto in ["tcp", "udp"] {
            for s in after[proto].as_array().unwrap() {
                if s["was"] == "b2" {
                    assert_eq!(s["ok"], false, "{ns}: {proto} socket to b2 destroyed: {s}");
                    assert_eq!(s["now"], "b1", "{ns}: {proto}: the new one reaches b1: {s}");
                } else {
                    assert_eq!(s["ok"], true, "{ns}: {proto} socket to b1 untouched: {s}");
                }
            }
        }
    }
    let table = ok("lb-ctl socklb", d.lb_ctl_ok(&["socklb"]));
    assert!(
        table.contains(&format!("sockets destroyed: {expected}")),
        "{table}"
    );
    let stats = ok("lb-ctl stats", d.lb_ctl_ok(&["stats"]));
    assert!(
        stats.contains(&format!("socket LB: {expected} sockets destroyed")),
        "{stats}"
    );
}

/// The opt-outs: a child cgroup listed in `opt_out_cgroups` is left alone (its connections to
/// the unrouted VIP fail), and with `host_netns_only` a process of another network namespace
/// in the test cgroup keeps the VIP, so its traffic goes through XDP instead.
#[test]
fn socket_lb_leaves_opted_out_cgroups_and_other_namespaces_alone() {
    if !privileged() {
        return;
    }
    let (mut lab, cgroup) = lab_and_cgroup();
    // Dropped (removed) before its parent.
    let proxy = ok("child cgroup", cgroup.child("proxy"));
    let opt_out = format!(
        "  host_netns_only: true\n  opt_out_cgroups: [{}]\n",
        proxy.path().display()
    );
    ok(
        "daemon",
        lab.start_daemon_with_config(&socklb_config(&cgroup, &opt_out, "")),
    );
    ok(
        "tcp service",
        lab.add_service(TCP_SERVICE_PORT, Protocol::Tcp, "full-nat", &["b1", "b2"])
            .map(drop),
    );
    let d = lab.daemon();
    let st = socklb(d);
    assert!(st.up && st.host_netns_only, "{st:#?}");
    assert_eq!(st.opt_out_cgroups, vec![proxy.path().display().to_string()]);

    // The test cgroup on the node: translated.
    let tcp = client(
        &lab.topo.lb,
        Some(cgroup.path()),
        "tcp",
        TCP_SERVICE_PORT,
        5,
    );
    assert_eq!(
        backends_via_vip("translated", &tcp, TCP_SERVICE_PORT).len(),
        5
    );
    // Its opted-out child: left alone, and the VIP leads nowhere on the node.
    let proxied = client(&lab.topo.lb, Some(proxy.path()), "tcp", TCP_SERVICE_PORT, 3);
    assert!(
        proxied.iter().all(|a| a.get("error").is_some()),
        "an opted-out cgroup is not translated: {proxied:?}"
    );
    // Another namespace (the client's), in the test cgroup: left alone, so the VIP is routed
    // to the LB node and XDP balances it.
    let before = ok("stats", d.stats());
    let other = client(
        lab.client_ns(),
        Some(cgroup.path()),
        "tcp",
        TCP_SERVICE_PORT,
        5,
    );
    assert_eq!(
        backends_via_vip("through XDP", &other, TCP_SERVICE_PORT).len(),
        5
    );
    let after = ok("stats", d.stats());
    let packets = |s: &datapath_api::StatsView| -> u64 {
        s.services.iter().map(|v| v.counters.packets).sum()
    };
    assert!(
        packets(&after) > packets(&before),
        "the other namespace's connections went through XDP: {after:#?}"
    );
    let st = socklb(d);
    assert_eq!(st.reasons["connect_translated"], 5, "{st:#?}");
    assert_eq!(st.reasons["pass_opted_out"], 3, "{st:#?}");
    assert_eq!(st.reasons["pass_other_netns"], 5, "{st:#?}");
}

/// Only cluster VIPs are the socket LB's: a Kubernetes LoadBalancer Service (the recorded
/// `loadbalancer` scenario, served by the test suite's one stand-in API server) has its
/// ClusterIP translated, while its LoadBalancer ingress and NodePort frontends are marked
/// `xdp_only` and left alone (`pass_xdp_only`), to go through XDP as they arrive from outside.
#[test]
fn socket_lb_leaves_nodeport_and_load_balancer_frontends_to_xdp() {
    if !privileged() {
        return;
    }
    use netns_tests::kube_api::{KubeApi, Resource, yaml_object};
    const INGRESS: std::net::Ipv4Addr = std::net::Ipv4Addr::new(198, 18, 100, 2);
    const NODE_PORT: u16 = 30781;
    let (mut lab, cgroup) = lab_and_cgroup();
    let recorded = |file: &str| {
        let path = format!(
            "{}/../../../shared/k8s-recorded/cilium/loadbalancer/{file}",
            env!("CARGO_MANIFEST_DIR")
        );
        yaml_object(&std::fs::read_to_string(&path).unwrap()).unwrap()
    };
    let mut svc = recorded("service.yaml");
    svc["spec"]["clusterIP"] = VIP.to_string().into();
    svc["spec"]["clusterIPs"] = serde_json::json!([VIP.to_string()]);
    svc["spec"]["ports"][0]["port"] = TCP_SERVICE_PORT.into();
    svc["status"]["loadBalancer"]["ingress"][0]["ip"] = INGRESS.to_string().into();
    let mut slice = recorded("endpointslice.yaml");
    for (i, name) in ["b1", "b2"].iter().enumerate() {
        slice["endpoints"][i]["addresses"] =
            serde_json::json!([lab.backend_addr(name).ip().to_string()]);
    }
    slice["ports"][0]["port"] = netns_tests::lab::BACKEND_PORT.into();
    let listener = ok(
        "stand-in listener",
        netns::run_in(&lab.topo.lb, || std::net::TcpListener::bind("127.0.0.1:0"))
            .and_then(|l| Ok(l?)),
    );
    let api = ok("stand-in", KubeApi::serve(listener));
    ok("service", api.apply(Resource::Services, svc).map(drop));
    ok(
        "slice",
        api.apply(Resource::EndpointSlices, slice).map(drop),
    );

    let kubeconfig = ok(
        "kubeconfig",
        lab.write_file("kubeconfig", &netns_tests::kube_api::kubeconfig(&api.url())),
    );
    let kubernetes = format!(
        "kubernetes:\n  enabled: true\n  kubeconfig: {}\n  node_name: nodeport-worker\n",
        kubeconfig.display()
    );
    ok(
        "daemon",
        lab.start_daemon_with_config(&socklb_config(&cgroup, "", &kubernetes)),
    );
    let d = lab.daemon();
    // The ClusterIP, the ingress and NodePort on the node's addresses, each with both backends.
    let deadline = Instant::now() + Duration::from_secs(20);
    let node_port = SocketAddr::new(IpAddr::V4(LB_CLIENT_IP), NODE_PORT);
    loop {
        let services = ok("services", d.services());
        let has = |addr: IpAddr, port: u16| {
            services
                .iter()
                .any(|s| s.vip == addr && s.port == port && s.backends.len() == 2)
        };
        if has(IpAddr::V4(VIP), TCP_SERVICE_PORT)
            && has(IpAddr::V4(INGRESS), TCP_SERVICE_PORT)
            && has(node_port.ip(), NODE_PORT)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the Service's frontends: {services:#?}\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    let tcp = client(
        &lab.topo.lb,
        Some(cgroup.path()),
        "tcp",
        TCP_SERVICE_PORT,
        5,
    );
    assert_eq!(
        backends_via_vip("cluster ip", &tcp, TCP_SERVICE_PORT).len(),
        5
    );
    // Left alone: the ingress is routed nowhere on the node, and nothing listens on the
    // node's own address at the NodePort.
    for (addr, port) in [
        (IpAddr::V4(INGRESS), TCP_SERVICE_PORT),
        (node_port.ip(), NODE_PORT),
    ] {
        let answers = client_to(&lab.topo.lb, Some(cgroup.path()), "tcp", addr, port, 1);
        assert!(
            answers[0].get("error").is_some(),
            "{addr}:{port} is not translated: {answers:?}"
        );
    }
    let st = socklb(d);
    assert_eq!(st.reasons["connect_translated"], 5, "{st:#?}");
    assert_eq!(st.reasons["pass_xdp_only"], 2, "{st:#?}");
}

/// An IPv6 VIP through the v6 hooks (connect6, sendmsg6, recvmsg6, getpeername6): TCP,
/// unconnected and connected UDP from the test cgroup reach both backends' IPv6 addresses,
/// every peer shown is the VIP, and no packet carrying the VIP is on the wire.
#[test]
fn socket_lb_balances_an_ipv6_vip() {
    if !privileged() {
        return;
    }
    let mut lab = ok(
        "lab",
        Lab::start(LabOptions {
            topology: TopologyOptions {
                backends: 2,
                dsr: false,
                ipv6: true,
            },
            daemon: None,
        }),
    );
    let cgroup = ok(
        "test cgroup",
        TestCgroup::create(&format!("datapath-test-{}", lab.topo.prefix)),
    );
    ok(
        "daemon",
        lab.start_daemon_with_config(&socklb_config(&cgroup, "", "")),
    );
    for (port, proto) in [
        (TCP_SERVICE_PORT, Protocol::Tcp),
        (UDP_SERVICE_PORT, Protocol::Udp),
    ] {
        ok(
            "IPv6 service",
            lab.add_service_on(IpAddr::V6(VIP6), port, proto, "full-nat", &["b1", "b2"])
                .map(drop),
        );
    }
    let node = lab.topo.lb.clone();
    let vip = IpAddr::V6(VIP6);
    let capture = ok("tcpdump", Capture::start_for(&node, vip));
    let peer = |port: u16| format!("{VIP6}:{port}");
    for (mode, port, n) in [
        ("tcpv6", TCP_SERVICE_PORT, 30),
        ("udpv6", UDP_SERVICE_PORT, 20),
        ("udpcv6", UDP_SERVICE_PORT, 20),
    ] {
        let answers = client_to(&node, Some(cgroup.path()), mode, vip, port, n);
        let names = backends_via(mode, &answers, &peer(port));
        assert_eq!(names.len(), n, "{mode}");
        assert!(
            names.iter().any(|b| b == "b1") && names.iter().any(|b| b == "b2"),
            "{mode}: both backends: {names:?}"
        );
    }
    let seen = capture.stop();
    assert!(seen.is_empty(), "packets carrying the IPv6 VIP: {seen:#?}");
    let st = socklb(lab.daemon());
    assert!(st.reasons["connect_translated"] >= 30 + 20, "{st:#?}");
    assert!(st.reasons["sendmsg_translated"] >= 20, "{st:#?}");
    assert!(st.reasons["getpeername_reversed"] >= 30, "{st:#?}");
    assert!(st.reasons["recvmsg_reversed"] >= 20, "{st:#?}");
    let decision = st
        .recent
        .iter()
        .find(|d| d.vip.ip() == vip)
        .unwrap_or_else(|| panic!("no IPv6 decision in {st:#?}"));
    assert!(decision.backend.is_ipv6(), "{decision:?}");
    assert!(
        [lab.backend_addr6("b1"), lab.backend_addr6("b2")]
            .iter()
            .any(|b| b.ip() == decision.backend.ip()),
        "{decision:?}"
    );
}

/// The sockets of a removed IPv6 backend are destroyed (TCP and connected UDP, AF_INET6 in
/// sock_diag), the others left alone, and their replacements reach the remaining backend.
#[test]
fn socket_lb_destroys_the_sockets_of_a_removed_ipv6_backend() {
    if !privileged() {
        return;
    }
    const SOCKETS: usize = 12;
    let mut lab = ok(
        "lab",
        Lab::start(LabOptions {
            topology: TopologyOptions {
                backends: 2,
                dsr: false,
                ipv6: true,
            },
            daemon: None,
        }),
    );
    let cgroup = ok(
        "test cgroup",
        TestCgroup::create(&format!("datapath-test-{}", lab.topo.prefix)),
    );
    ok(
        "daemon",
        lab.start_daemon_with_config(&socklb_config(&cgroup, "", "")),
    );
    for (port, proto) in [
        (TCP_SERVICE_PORT, Protocol::Tcp),
        (UDP_SERVICE_PORT, Protocol::Udp),
    ] {
        ok(
            "IPv6 service",
            lab.add_service_on(IpAddr::V6(VIP6), port, proto, "full-nat", &["b1", "b2"])
                .map(drop),
        );
    }
    let d = lab.daemon();
    let args = [
        "holdv6".to_string(),
        VIP6.to_string(),
        TCP_SERVICE_PORT.to_string(),
        SOCKETS.to_string(),
        UDP_SERVICE_PORT.to_string(),
    ];
    let mut holder = Holder(
        client_command(&lab.topo.lb, Some(cgroup.path()), &args)
            .stdin(Stdio::piped())
            .spawn()
            .expect("python3"),
    );
    let mut out = BufReader::new(holder.0.stdout.take().unwrap()).lines();
    let first: Value =
        serde_json::from_str(&out.next().expect("the held sockets").unwrap()).unwrap();
    let on = |proto: &str, name: &str| {
        first[proto]
            .as_array()
            .unwrap()
            .iter()
            .filter(|b| *b == name)
            .count()
    };
    for proto in ["tcp", "udp"] {
        assert!(
            on(proto, "b1") > 0 && on(proto, "b2") > 0,
            "{proto}: {first}"
        );
    }
    let expected = (on("tcp", "b2") + on("udp", "b2")) as u64;
    let b2 = lab.backend_addr6("b2").to_string();
    for (port, proto) in [(TCP_SERVICE_PORT, "tcp"), (UDP_SERVICE_PORT, "udp")] {
        let svc = SocketAddr::new(IpAddr::V6(VIP6), port).to_string();
        ok(
            "backend remove",
            d.lb_ctl_ok(&["backend", "remove", &svc, &b2, "--proto", proto])
                .map(drop),
        );
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while socklb(d).sockets_destroyed < expected {
        assert!(
            Instant::now() < deadline,
            "{expected} sockets destroyed in 20 s: {:#?}\n{}",
            socklb(d),
            d.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(socklb(d).sockets_destroyed, expected, "only b2's sockets");
    use std::io::Write as _;
    writeln!(holder.0.stdin.as_mut().unwrap(), "check").unwrap();
    let after: Value = serde_json::from_str(&out.next().expect("the check").unwrap()).unwrap();
    let _ = holder.0.wait();
    for proto in ["tcp", "udp"] {
        for s in after[proto].as_array().unwrap() {
            if s["was"] == "b2" {
                assert_eq!(s["ok"], false, "{proto} socket to b2 destroyed: {s}");
                assert_eq!(s["now"], "b1", "{proto}: the new one reaches b1: {s}");
            } else {
                assert_eq!(s["ok"], true, "{proto} socket to b1 untouched: {s}");
            }
        }
    }
}
