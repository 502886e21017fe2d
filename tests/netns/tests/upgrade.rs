//! Upgrade from the previous landed build: the old `datapathd` and `lb-ctl` (the commit named
//! in `tests/netns/upgrade-from`, built by `cargo xtask test` into the directory
//! `DATAPATH_UPGRADE_FROM_BIN` names) set up services and a policy under TCP and UDP traffic;
//! the old daemon stops (SIGTERM: its datapath stays attached and forwarding) and this build's
//! daemon starts on the same pin root, state file and configuration. Checked: no TCP
//! connection opened before the upgrade breaks (each still carries data both ways, whole),
//! UDP flows are still answered by their backend, the services and the policy read back the
//! same through the new `lb-ctl`, the policy is still enforced, and the new daemon is ready.
//!
//! Only behaviour is checked, never where the daemon keeps its pins: the point is that a
//! daemon which lays its pins out differently still takes over from the old one.
//!
//! Run with `cargo xtask test --only netns`, or as root after `cargo build -p datapath -p lb-ctl`
//! and building the old commit's binaries into a directory:
//! `DATAPATH_UPGRADE_FROM_BIN=<dir> cargo test -p netns-tests --test upgrade -- --test-threads=1`.

use std::{
    collections::BTreeSet,
    io::ErrorKind,
    net::{SocketAddr, SocketAddrV4, TcpStream, UdpSocket},
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Result, bail};
use netns_tests::{
    BackendServer, Binaries, Conn, Daemon, DaemonOptions, Lab, LabOptions,
    client::{self, sock},
    netns, privilege, privileged,
    topology::{CLIENT_IP, TopologyOptions, VIP},
};
use serde_json::{Value, json};

/// The directory holding the previous landed build's `datapathd` and `lb-ctl`.
const UPGRADE_FROM_ENV: &str = "DATAPATH_UPGRADE_FROM_BIN";

const THREE: [&str; 3] = ["b1", "b2", "b3"];
/// Direct server return, TCP and UDP: the backends hold the VIP and serve on this port.
const DSR_PORT: u16 = 80;
/// Full-NAT, TCP: to the backends' own addresses, port [`FULL_NAT_BACKEND_PORT`].
const FULL_NAT_TCP_PORT: u16 = 81;
/// Full-NAT, UDP.
const FULL_NAT_UDP_PORT: u16 = 53;
const FULL_NAT_BACKEND_PORT: u16 = 8080;
/// The port the policy denies from the client to the backends (TCP and UDP); a server listens
/// there on b1, so a failure to reach it is the policy's doing.
const DENIED_PORT: u16 = 9090;
/// Long-lived connections per TCP service: at least this many on each backend.
const CONNS_PER_BACKEND: usize = 2;
/// How long each phase (old daemon, no daemon, new daemon) carries traffic at least.
const PHASE: Duration = Duration::from_millis(700);
/// Longest the traffic threads run, whatever happens.
const TRAFFIC_LIMIT: Duration = Duration::from_secs(120);
/// Bytes each connection sends and receives in one piece after the upgrade.
const BULK: usize = 256 * 1024;
/// Longest a probe of the policy waits for a connection or an answer.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

const POLICY: &str = "\
endpoints:
  - interface: lbc
    default_ingress: allow
    default_egress: allow
    ingress:
      - name: no-9090-tcp
        protocol: tcp
        ports: 9090
        action: deny
      - name: no-9090-udp
        protocol: udp
        ports: 9090
        action: deny
  - interface: lbb
    default_ingress: allow
    default_egress: allow
";

/// The traffic's phases, as the threads see them.
const OLD: usize = 0;
const NONE: usize = 1;
const NEW: usize = 2;
const PHASE_NAMES: [&str; 3] = ["old daemon", "no daemon", "new daemon"];

fn ok<T>(what: &str, r: Result<T>) -> T {
    r.unwrap_or_else(|e| panic!("{what}: {e:#}"))
}

/// The old build's binaries, or `None` (skip) when the run does not provide them and
/// privileged tests are not required.
fn old_binaries() -> Option<Binaries> {
    match std::env::var_os(UPGRADE_FROM_ENV) {
        Some(dir) => Some(ok(
            &format!("the previous landed build ({UPGRADE_FROM_ENV})"),
            Binaries::in_dir(&PathBuf::from(dir)),
        )),
        None => {
            let reason = format!(
                "{UPGRADE_FROM_ENV} is not set: `cargo xtask test --only netns` builds the \
                 previous landed build (tests/netns/upgrade-from) and sets it"
            );
            assert!(
                !privilege::required(),
                "{}=1 but {reason}",
                privilege::REQUIRE_ENV
            );
            eprintln!("skipped: {reason}");
            None
        }
    }
}

/// A file removed when dropped.
struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The services as `lb-ctl service list -o json` shows them, reduced to what an operator
/// declared (address, port, protocol, mode, SNAT address, backends with weight and state),
/// sorted: ids and counters may differ between daemons.
fn declared_services(list: &Value) -> Vec<Value> {
    let mut services: Vec<Value> = list
        .as_array()
        .unwrap_or_else(|| panic!("service list is not an array: {list:#}"))
        .iter()
        .map(|s| {
            let mut backends: Vec<Value> = s["backends"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|b| {
                    json!({
                        "addr": b["addr"],
                        "port": b["port"],
                        "weight": b["weight"],
                        "state": b["state"],
                    })
                })
                .collect();
            backends.sort_by_key(Value::to_string);
            json!({
                "vip": s["vip"],
                "port": s["port"],
                "proto": s["proto"],
                "mode": s["mode"],
                "snat_addr": s["snat_addr"],
                "backends": backends,
            })
        })
        .collect();
    services.sort_by_key(Value::to_string);
    services
}

/// What the test declares: (service port, protocol, mode, backend port).
const SERVICES: [(u16, &str, &str, u16); 4] = [
    (DSR_PORT, "tcp", "dsr", DSR_PORT),
    (DSR_PORT, "udp", "dsr", DSR_PORT),
    (FULL_NAT_TCP_PORT, "tcp", "full-nat", FULL_NAT_BACKEND_PORT),
    (FULL_NAT_UDP_PORT, "udp", "full-nat", FULL_NAT_BACKEND_PORT),
];

/// [`SERVICES`] in the form of [`declared_services`].
fn expected_services(lab: &Lab) -> Vec<Value> {
    let mut services: Vec<Value> = SERVICES
        .iter()
        .map(|&(port, proto, mode, backend_port)| {
            let mut backends: Vec<Value> = THREE
                .iter()
                .map(|b| {
                    json!({
                        "addr": lab.topo.backend(b).ip.to_string(),
                        "port": backend_port,
                        "weight": 1,
                        "state": "active",
                    })
                })
                .collect();
            backends.sort_by_key(Value::to_string);
            json!({
                "vip": VIP.to_string(),
                "port": port,
                "proto": proto,
                "mode": mode,
                "snat_addr": Value::Null,
                "backends": backends,
            })
        })
        .collect();
    services.sort_by_key(Value::to_string);
    services
}

/// Declares [`SERVICES`] with the daemon's (old) `lb-ctl`.
fn declare_services(lab: &Lab) -> Result<()> {
    let d = lab.daemon();
    for (port, proto, mode, backend_port) in SERVICES {
        let svc = sock(VIP, port).to_string();
        d.lb_ctl_ok(&["service", "add", &svc, "--proto", proto, "--mode", mode])?;
        for b in THREE {
            let backend = sock(lab.topo.backend(b).ip, backend_port).to_string();
            d.lb_ctl_ok(&[
                "backend", "add", &svc, &backend, "--proto", proto, "--weight", "1",
            ])?;
        }
    }
    Ok(())
}

/// Whether a TCP connection from the client to `addr` gets the server's greeting within
/// [`PROBE_TIMEOUT`].
fn tcp_passes(lab: &Lab, addr: SocketAddr) -> Result<bool> {
    netns::run_in(lab.client_ns(), || -> Result<bool> {
        let Ok(mut stream) = TcpStream::connect_timeout(&addr, PROBE_TIMEOUT) else {
            return Ok(false);
        };
        stream.set_read_timeout(Some(PROBE_TIMEOUT))?;
        let mut greeting = [0u8; 16];
        Ok(std::io::Read::read(&mut stream, &mut greeting).is_ok_and(|n| n > 0))
    })?
}

/// Whether a UDP datagram from the client to `addr` is answered (two tries of
/// [`PROBE_TIMEOUT`]).
fn udp_passes(lab: &Lab, addr: SocketAddr) -> Result<bool> {
    netns::run_in(lab.client_ns(), || -> Result<bool> {
        let socket = UdpSocket::bind(SocketAddrV4::new(CLIENT_IP, 0))?;
        socket.set_read_timeout(Some(PROBE_TIMEOUT))?;
        let mut buf = [0u8; 2048];
        for _try in 0..2 {
            socket.send_to(b"probe", addr)?;
            match socket.recv_from(&mut buf) {
                Ok((_, from)) if from == addr => return Ok(true),
                Ok(_) => {}
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(false)
    })?
}

/// The policy's verdicts on the client's direct flows to b1: `(allowed TCP, allowed UDP,
/// denied TCP, denied UDP)` passing or not.
fn policy_verdicts(lab: &Lab) -> Result<[bool; 4]> {
    let b1 = lab.topo.backend("b1").ip;
    Ok([
        tcp_passes(lab, sock(b1, FULL_NAT_BACKEND_PORT))?,
        udp_passes(lab, sock(b1, FULL_NAT_BACKEND_PORT))?,
        tcp_passes(lab, sock(b1, DENIED_PORT))?,
        udp_passes(lab, sock(b1, DENIED_PORT))?,
    ])
}

/// What the policy must do: the allowed port passes, the denied one does not.
const ENFORCED: [bool; 4] = [true, true, false, false];

/// The policy in force as `lb-ctl policy list -o json` shows it (without counters).
fn policy_in_force(d: &Daemon) -> Result<Value> {
    let status = d.lb_ctl_json(&["policy", "list"])?;
    Ok(status["policy"].clone())
}

/// One long-lived UDP flow (one client socket) to a service, and what it saw per phase.
struct UdpFlow {
    addr: SocketAddr,
    socket: UdpSocket,
    answered: [u64; 3],
    lost: [u64; 3],
    /// Every backend that answered this flow.
    backends: BTreeSet<String>,
}

impl UdpFlow {
    /// Sends datagram `seq` and waits (500 ms) for its own answer; late answers to earlier
    /// datagrams are skipped.
    fn exchange(&mut self, seq: u64, phase: usize) -> Result<()> {
        let payload = format!("upgrade {seq}");
        self.socket.send_to(payload.as_bytes(), self.addr)?;
        let deadline = Instant::now() + Duration::from_millis(500);
        let mut buf = [0u8; 2048];
        loop {
            let now = Instant::now();
            if now >= deadline {
                self.lost[phase] += 1;
                return Ok(());
            }
            self.socket.set_read_timeout(Some(deadline - now))?;
            match self.socket.recv_from(&mut buf) {
                Ok((n, from)) => {
                    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                    if from != self.addr {
                        bail!("answer {text:?} came from {from}, not from {}", self.addr);
                    }
                    if let Some((backend, echoed)) = text.split_once(' ')
                        && echoed == payload
                    {
                        self.answered[phase] += 1;
                        self.backends.insert(backend.to_string());
                        return Ok(());
                    }
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// The long-lived TCP connections and what happened to them.
struct TcpTraffic {
    conns: Vec<Conn>,
    /// Connections that failed, with why (index into `conns`).
    broken: Vec<(usize, String)>,
    /// Rounds (one echo on every live connection) completed per phase.
    rounds: [u64; 3],
}

impl TcpTraffic {
    /// Echoes a line on every connection not yet broken.
    fn round(&mut self) {
        for (i, conn) in self.conns.iter_mut().enumerate() {
            if self.broken.iter().any(|(b, _)| *b == i) {
                continue;
            }
            if let Err(e) = conn.ping() {
                self.broken.push((i, format!("{conn:?}: {e:#}")));
            }
        }
    }
}

#[test]
fn upgrade_from_the_previous_landed_build_keeps_connections_services_and_policy() {
    if !privileged() {
        return;
    }
    let Some(old) = old_binaries() else {
        return;
    };
    let new = Binaries::from_env();

    // DSR topology: the backends hold the VIP and serve TCP and UDP on it (port 80); they also
    // serve full-NAT traffic on their own addresses, and b1 serves the port the policy denies.
    let mut lab = ok(
        "setting up the lab",
        Lab::start(LabOptions {
            topology: TopologyOptions {
                backends: THREE.len(),
                dsr: true,
                ipv6: false,
            },
            daemon: None,
        }),
    );
    for b in THREE {
        let node = lab.topo.backend(b).clone();
        let server = ok(
            "starting a full-NAT server",
            BackendServer::start(&node.ns, b, sock(node.ip, FULL_NAT_BACKEND_PORT)),
        );
        lab.servers.push(server);
    }
    let b1 = lab.topo.backend("b1").clone();
    let denied_server = ok(
        "starting the server behind the denied port",
        BackendServer::start(&b1.ns, "b1-denied", sock(b1.ip, DENIED_PORT)),
    );
    lab.servers.push(denied_server);
    assert_eq!(
        ok("reaching b1 without a policy", policy_verdicts(&lab)),
        [true; 4],
        "before any policy, the client reaches b1 on both ports, TCP and UDP"
    );

    // The load balancer on lbc and lbb, and the policy module on the same interfaces.
    let config =
        TempFile(std::env::temp_dir().join(format!("datapath-{}-upgrade.yaml", lab.topo.prefix)));
    ok(
        "writing the config",
        std::fs::write(
            &config.0,
            "reload:\n  watch: false\npolicy:\n  enabled: true\n  interfaces: [lbc, lbb]\n",
        )
        .map_err(Into::into),
    );
    let daemon = ok(
        "starting the old datapathd",
        Daemon::start_with(
            &lab.topo.lb,
            &lab.topo.prefix,
            old,
            DaemonOptions {
                extra_args: vec!["--config".into(), config.0.display().to_string()],
                ..DaemonOptions::default()
            },
        ),
    );
    lab.daemon = Some(daemon);

    // Services and policy, with the old lb-ctl.
    ok(
        "declaring services with the old lb-ctl",
        declare_services(&lab),
    );
    let services_before = declared_services(&ok(
        "old lb-ctl service list",
        lab.daemon().lb_ctl_json(&["service", "list"]),
    ));
    assert_eq!(
        services_before,
        expected_services(&lab),
        "the old daemon shows the services as declared"
    );
    let policy_file = lab.daemon().dir.join("policy.yaml");
    ok(
        "writing the policy",
        std::fs::write(&policy_file, POLICY).map_err(Into::into),
    );
    ok(
        "applying the policy with the old lb-ctl",
        lab.daemon()
            .lb_ctl_ok(&["policy", "apply", "-f", &policy_file.display().to_string()]),
    );
    let policy_before = ok("old lb-ctl policy list", policy_in_force(lab.daemon()));
    assert!(
        policy_before.to_string().contains("no-9090-tcp"),
        "the old daemon shows the applied policy: {policy_before:#}"
    );
    assert_eq!(
        ok("the old daemon's policy verdicts", policy_verdicts(&lab)),
        ENFORCED,
        "under the old daemon: (allowed tcp, allowed udp, denied tcp, denied udp) pass"
    );

    // Long-lived TCP connections through both TCP services, on every backend.
    let mut conns = ok(
        "connections to the DSR service",
        client::connect_until_each_in(
            lab.client_ns(),
            sock(VIP, DSR_PORT),
            &THREE,
            CONNS_PER_BACKEND,
            40,
        ),
    );
    conns.extend(ok(
        "connections to the full-NAT service",
        client::connect_until_each_in(
            lab.client_ns(),
            sock(VIP, FULL_NAT_TCP_PORT),
            &THREE,
            CONNS_PER_BACKEND,
            40,
        ),
    ));
    let opened = conns.len();
    let udp_sockets = ok(
        "UDP sockets in the client namespace",
        netns::run_in(lab.client_ns(), || -> Result<Vec<UdpSocket>> {
            (0..2)
                .map(|_| Ok(UdpSocket::bind(SocketAddrV4::new(CLIENT_IP, 0))?))
                .collect()
        })
        .and_then(|r| r),
    );
    let udp_flows: Vec<UdpFlow> = udp_sockets
        .into_iter()
        .zip([sock(VIP, DSR_PORT), sock(VIP, FULL_NAT_UDP_PORT)])
        .map(|(socket, addr)| UdpFlow {
            addr,
            socket,
            answered: [0; 3],
            lost: [0; 3],
            backends: BTreeSet::new(),
        })
        .collect();

    let phase = Arc::new(AtomicUsize::new(OLD));
    let stop = Arc::new(AtomicBool::new(false));
    let tcp = {
        let (phase, stop) = (phase.clone(), stop.clone());
        thread::spawn(move || {
            let mut traffic = TcpTraffic {
                conns,
                broken: Vec::new(),
                rounds: [0; 3],
            };
            let started = Instant::now();
            while !stop.load(Ordering::SeqCst) && started.elapsed() < TRAFFIC_LIMIT {
                traffic.round();
                traffic.rounds[phase.load(Ordering::SeqCst)] += 1;
                thread::sleep(Duration::from_millis(5));
            }
            traffic
        })
    };
    let udp = {
        let (phase, stop) = (phase.clone(), stop.clone());
        thread::spawn(move || -> Result<Vec<UdpFlow>> {
            let mut flows = udp_flows;
            let started = Instant::now();
            let mut seq = 0u64;
            while !stop.load(Ordering::SeqCst) && started.elapsed() < TRAFFIC_LIMIT {
                for flow in &mut flows {
                    flow.exchange(seq, phase.load(Ordering::SeqCst))?;
                    seq += 1;
                }
                thread::sleep(Duration::from_millis(5));
            }
            Ok(flows)
        })
    };

    // The upgrade: the old daemon stops, its datapath keeps forwarding alone for a while, and
    // this build's daemon starts on the same pin root, state file and configuration.
    thread::sleep(PHASE);
    ok("stopping the old datapathd", lab.daemon_mut().stop());
    phase.store(NONE, Ordering::SeqCst);
    thread::sleep(PHASE);
    lab.daemon_mut().bins = new;
    ok("starting the new datapathd", lab.daemon_mut().restart());
    phase.store(NEW, Ordering::SeqCst);
    thread::sleep(PHASE);
    stop.store(true, Ordering::SeqCst);
    let mut tcp = tcp.join().expect("TCP traffic thread");
    let udp = ok("UDP traffic", udp.join().expect("UDP traffic thread"));

    // Every connection opened before the upgrade still carries data both ways, whole.
    for i in 0..tcp.conns.len() {
        if tcp.broken.iter().any(|(b, _)| *b == i) {
            continue;
        }
        let conn = &mut tcp.conns[i];
        let after = conn
            .ping()
            .and_then(|()| conn.bulk_upload(BULK))
            .and_then(|()| conn.bulk_download(BULK))
            .and_then(|()| conn.ping());
        if let Err(e) = after {
            tcp.broken
                .push((i, format!("{conn:?} after the upgrade: {e:#}")));
        }
    }
    println!(
        "upgrade: {opened} TCP connections, {} broken; echo rounds per phase {:?} ({PHASE_NAMES:?})",
        tcp.broken.len(),
        tcp.rounds
    );
    for flow in &udp {
        println!(
            "upgrade: UDP flow to {}: answered {:?}, lost {:?}, backends {:?}",
            flow.addr, flow.answered, flow.lost, flow.backends
        );
    }
    assert_eq!(tcp.conns.len(), opened);
    assert!(
        tcp.broken.is_empty(),
        "{} of {opened} TCP connections broke over the upgrade: {:#?}",
        tcp.broken.len(),
        tcp.broken
    );
    for (p, name) in PHASE_NAMES.iter().enumerate() {
        assert!(
            tcp.rounds[p] > 0,
            "no echo round completed with {name}: {:?}",
            tcp.rounds
        );
    }

    // UDP: the flows are answered after the upgrade, by the backend that answered them before.
    for flow in &udp {
        assert!(
            flow.answered[OLD] > 0 && flow.answered[NEW] > 0,
            "UDP flow to {}: answered per phase {:?} ({PHASE_NAMES:?})",
            flow.addr,
            flow.answered
        );
        assert_eq!(
            flow.backends.len(),
            1,
            "UDP flow to {} kept its backend: {:?}",
            flow.addr,
            flow.backends
        );
    }
    for (port, proto, _, _) in SERVICES {
        let addr = sock(VIP, port);
        if proto == "udp" {
            let answers = ok(
                &format!("a new UDP flow to {addr} after the upgrade"),
                client::udp_one_flow_in(lab.client_ns(), addr, 5),
            );
            assert_eq!(answers.len(), 5);
        } else {
            let spread = ok(
                &format!("new TCP connections to {addr}"),
                client::tcp_spread_in(lab.client_ns(), addr, 12),
            );
            assert!(
                spread.errors.is_empty() && spread.answered() == 12,
                "new connections to {addr} after the upgrade: {:#?}\n{}",
                spread.errors,
                spread.table()
            );
        }
    }

    // The services and the policy, through the new lb-ctl: the same, and still enforced.
    let d = lab.daemon();
    let services_after = declared_services(&ok(
        "new lb-ctl service list",
        d.lb_ctl_json(&["service", "list"]),
    ));
    assert_eq!(
        services_after, services_before,
        "the new daemon shows the services the old one had"
    );
    let policy_after = ok("new lb-ctl policy list", policy_in_force(d));
    assert_eq!(
        policy_after, policy_before,
        "the new daemon has the policy the old one had"
    );
    assert_eq!(
        ok("the new daemon's policy verdicts", policy_verdicts(&lab)),
        ENFORCED,
        "under the new daemon: (allowed tcp, allowed udp, denied tcp, denied udp) pass"
    );
    let status = ok("new lb-ctl status", d.lb_ctl_json(&["status"]));
    assert_eq!(
        status["ready"],
        json!(true),
        "the new daemon reports ready: {status:#}"
    );
    drop(config);
}
