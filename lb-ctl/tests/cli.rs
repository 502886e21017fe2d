//! Runs the built `lb-ctl` against a small real HTTP server on a real Unix socket that records
//! what it is sent and answers as datapathd would.
use std::{
    convert::Infallible,
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
};

use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, body::Bytes, service::service_fn};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};

#[derive(Clone, Debug, PartialEq, Eq)]
struct Recorded {
    method: String,
    path: String,
    query: String,
    body: String,
}

type Answer = Arc<dyn Fn(&Recorded) -> (u16, String) + Send + Sync>;

struct FakeDaemon {
    _dir: tempfile::TempDir,
    sock: PathBuf,
    requests: Arc<Mutex<Vec<Recorded>>>,
    connections: Arc<AtomicUsize>,
}

impl FakeDaemon {
    fn start(answer: impl Fn(&Recorded) -> (u16, String) + Send + Sync + 'static) -> Self {
        let answer: Answer = Arc::new(answer);
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("api.sock");
        // Bound here, so the socket exists before lb-ctl runs.
        let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        listener.set_nonblocking(true).unwrap();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(AtomicUsize::new(0));
        let (reqs, conns) = (requests.clone(), connections.clone());
        // The test thread blocks on lb-ctl, so the server gets its own thread and runtime; it
        // ends with the test process.
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::UnixListener::from_std(listener).unwrap();
                loop {
                    let (stream, _) = listener.accept().await.unwrap();
                    conns.fetch_add(1, Ordering::SeqCst);
                    let (reqs, answer) = (reqs.clone(), answer.clone());
                    let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                        let (reqs, answer) = (reqs.clone(), answer.clone());
                        async move {
                            let method = req.method().to_string();
                            let path = req.uri().path().to_string();
                            let query = req.uri().query().unwrap_or("").to_string();
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            let rec = Recorded {
                                method,
                                path,
                                query,
                                body: String::from_utf8(body.to_vec()).unwrap(),
                            };
                            let (status, text) = answer(&rec);
                            reqs.lock().unwrap().push(rec);
                            Ok::<_, Infallible>(
                                Response::builder()
                                    .status(status)
                                    .header("content-type", "application/json")
                                    .body(Full::new(Bytes::from(text)))
                                    .unwrap(),
                            )
                        }
                    });
                    tokio::spawn(
                        hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), service),
                    );
                }
            });
        });
        Self {
            _dir: dir,
            sock,
            requests,
            connections,
        }
    }

    fn requests(&self) -> Vec<Recorded> {
        self.requests.lock().unwrap().clone()
    }

    fn run(&self, args: &[&str]) -> Output {
        lb_ctl(&self.sock, args)
    }
}

fn lb_ctl(sock: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lb-ctl"))
        .arg("--socket")
        .arg(sock)
        .args(args)
        .env_remove("LB_CTL_SOCKET")
        .output()
        .unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8(o.stdout.clone()).unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8(o.stderr.clone()).unwrap()
}

fn view() -> Value {
    json!({
        "vip": "198.18.0.10", "port": 80, "proto": "tcp", "mode": "full-nat", "source": "api",
        "id": 0,
        "backends": [{"addr": "198.18.1.1", "port": 8080, "weight": 1, "state": "active",
                      "id": 0, "table_entries": 65537,
                      "counters": {"packets": 3, "bytes": 180}}],
        "counters": {"packets": 3, "bytes": 180}
    })
}

fn ok_view(rec: &Recorded) -> (u16, String) {
    let status = if rec.method == "POST" { 201 } else { 200 };
    let body = match rec.path.as_str() {
        "/v1/services" if rec.method == "GET" => json!([view()]),
        "/v1/stats" => json!({"services": [view()], "reasons": {"fwd_tx": 3}}),
        _ => view(),
    };
    (status, body.to_string())
}

#[test]
fn daemon_not_running_exits_3() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("api.sock");
    let o = lb_ctl(&missing, &["service", "ls"]);
    assert_eq!(o.status.code(), Some(3));
    assert_eq!(
        stderr(&o),
        format!(
            "lb-ctl: error: cannot reach datapathd at {}: No such file or directory (os error 2) (is datapathd running?)\n",
            missing.display()
        )
    );
    assert_eq!(stdout(&o), "");

    // A socket left behind by a dead daemon refuses connections.
    drop(std::os::unix::net::UnixListener::bind(&missing).unwrap());
    let o = lb_ctl(&missing, &["-o", "json", "stats"]);
    assert_eq!(o.status.code(), Some(3));
    assert!(stderr(&o).contains("Connection refused"), "{}", stderr(&o));
    assert_eq!(stdout(&o), "");
}

#[test]
fn invalid_arguments_exit_2_without_connecting() {
    let d = FakeDaemon::start(ok_view);
    for (args, want) in [
        (
            &["backend", "add", "198.18.0.10:80", "x"][..],
            r#"lb-ctl: error: invalid backend address "x": expected ADDR:PORT"#,
        ),
        (
            &["service", "add", "198.18.0.10:0"],
            r#"lb-ctl: error: invalid service address "198.18.0.10:0": port must not be 0"#,
        ),
        (
            &[
                "backend",
                "add",
                "198.18.0.10:80",
                "198.18.1.1:8080",
                "--weight",
                "0",
            ],
            r#"lb-ctl: error: invalid weight "0": weights start at 1"#,
        ),
        (
            &[
                "backend",
                "set-weight",
                "198.18.0.10:80",
                "198.18.1.1:8080",
                "0",
            ],
            r#"lb-ctl: error: invalid weight "0""#,
        ),
        (
            &["service", "add", "198.18.0.10:80", "--proto", "sctp"],
            "lb-ctl: error: invalid value 'sctp' for '--proto <PROTO>': accepted: tcp, udp\n",
        ),
    ] {
        let o = d.run(args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).starts_with(want), "{args:?}: {}", stderr(&o));
        assert_eq!(stdout(&o), "", "{args:?}");
    }
    // A valid command afterwards is the first and only one the server saw: connections are
    // accepted in order, so none of the above reached it.
    assert_eq!(d.run(&["service", "ls"]).status.code(), Some(0));
    assert_eq!(d.connections.load(Ordering::SeqCst), 1);
    assert_eq!(d.requests().len(), 1);
}

#[test]
fn commands_send_the_api_requests() {
    let d = FakeDaemon::start(ok_view);
    let cases: [(&[&str], &str, &str, Value); 11] = [
        (
            &["service", "add", "198.18.0.10:80"],
            "POST",
            "/v1/services",
            json!({"vip": "198.18.0.10", "port": 80, "proto": "tcp", "mode": "full-nat"}),
        ),
        (
            &[
                "service",
                "add",
                "[2001:db8::10]:53",
                "--proto",
                "udp",
                "--mode",
                "dsr",
            ],
            "POST",
            "/v1/services",
            json!({"vip": "2001:db8::10", "port": 53, "proto": "udp", "mode": "dsr"}),
        ),
        (
            &["service", "rm", "[2001:db8::10]:53", "--proto", "udp"],
            "DELETE",
            "/v1/services/udp/2001:db8::10/53",
            Value::Null,
        ),
        (
            &["service", "show", "198.18.0.10:80"],
            "GET",
            "/v1/services/tcp/198.18.0.10/80",
            Value::Null,
        ),
        (
            &[
                "backend",
                "add",
                "198.18.0.10:80",
                "198.18.1.1:8080",
                "--weight",
                "3",
            ],
            "POST",
            "/v1/services/tcp/198.18.0.10/80/backends",
            json!({"addr": "198.18.1.1", "port": 8080, "weight": 3, "state": "active"}),
        ),
        (
            &["backend", "drain", "198.18.0.10:80", "198.18.1.1:8080"],
            "PATCH",
            "/v1/services/tcp/198.18.0.10/80/backends/198.18.1.1/8080",
            json!({"state": "draining"}),
        ),
        (
            &["backend", "activate", "198.18.0.10:80", "198.18.1.1:8080"],
            "PATCH",
            "/v1/services/tcp/198.18.0.10/80/backends/198.18.1.1/8080",
            json!({"state": "active"}),
        ),
        (
            &[
                "backend",
                "set-weight",
                "198.18.0.10:80",
                "198.18.1.1:8080",
                "5",
            ],
            "PATCH",
            "/v1/services/tcp/198.18.0.10/80/backends/198.18.1.1/8080",
            json!({"weight": 5}),
        ),
        (
            &["backend", "rm", "198.18.0.10:80", "198.18.1.1:8080"],
            "DELETE",
            "/v1/services/tcp/198.18.0.10/80/backends/198.18.1.1/8080",
            Value::Null,
        ),
        // --force asks the daemon to change a service another source owns.
        (
            &[
                "backend",
                "drain",
                "198.18.0.10:80",
                "198.18.1.1:8080",
                "--force",
            ],
            "PATCH",
            "/v1/services/tcp/198.18.0.10/80/backends/198.18.1.1/8080?force=true",
            json!({"state": "draining"}),
        ),
        (
            &["--force", "service", "rm", "198.18.0.10:80"],
            "DELETE",
            "/v1/services/tcp/198.18.0.10/80?force=true",
            Value::Null,
        ),
    ];
    for (args, method, path, body) in cases {
        let o = d.run(args);
        assert_eq!(o.status.code(), Some(0), "{args:?}: {}", stderr(&o));
        let rec = d.requests().pop().unwrap();
        let target = if rec.query.is_empty() {
            rec.path.clone()
        } else {
            format!("{}?{}", rec.path, rec.query)
        };
        assert_eq!(
            (rec.method.as_str(), target.as_str()),
            (method, path),
            "{args:?}"
        );
        let sent: Value = if rec.body.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&rec.body).unwrap()
        };
        assert_eq!(sent, body, "{args:?}");
    }
}

#[test]
fn table_and_json_output() {
    let d = FakeDaemon::start(ok_view);
    let o = d.run(&["service", "add", "198.18.0.10:80"]);
    assert_eq!(
        stdout(&o),
        "service tcp/198.18.0.10:80 added (full-nat, id 0); add backends with: lb-ctl backend add\n"
    );
    let o = d.run(&["backend", "drain", "198.18.0.10:80", "198.18.1.1:8080"]);
    assert_eq!(
        stdout(&o),
        "backend 198.18.1.1:8080 of service tcp/198.18.0.10:80 is draining: it keeps its established flows and gets no new ones\n"
    );
    let o = d.run(&["service", "ls"]);
    let out = stdout(&o);
    assert!(out.starts_with("SERVICE "), "{out}");
    assert!(out.contains("  -> 198.18.1.1:8080"), "{out}");
    assert!(out.contains("100.0%"), "{out}");

    // JSON is the API's answer, as it came.
    let o = d.run(&["-o", "json", "service", "ls"]);
    let got: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(got, json!([view()]));
    let o = d.run(&[
        "backend",
        "set-weight",
        "-o",
        "json",
        "198.18.0.10:80",
        "198.18.1.1:8080",
        "2",
    ]);
    let got: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(got, view());
    let o = d.run(&["stats", "--output", "json"]);
    let got: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(got["reasons"], json!({"fwd_tx": 3}));
    let o = d.run(&["stats"]);
    assert!(stdout(&o).contains("fwd_tx"), "{}", stdout(&o));
}

#[test]
fn api_errors_map_to_exit_codes() {
    let d = FakeDaemon::start(|rec| {
        let (status, code) = match rec.path.rsplit('/').next().unwrap() {
            "1" => (400, "invalid_argument"),
            "2" => (404, "not_found"),
            "3" => (409, "already_exists"),
            "4" => (507, "capacity_exhausted"),
            "5" => (500, "dataplane_failure"),
            "6" => (500, "persistence_failure"),
            _ => return (502, "<html>\n bad gateway\n</html>".into()),
        };
        (
            status,
            json!({"code": code, "error": format!("the {code} reason")}).to_string(),
        )
    });
    for (port, exit) in [("1", 2), ("2", 4), ("3", 5), ("4", 6), ("5", 1), ("6", 1)] {
        for output in ["table", "json"] {
            let o = d.run(&[
                "-o",
                output,
                "service",
                "show",
                &format!("198.18.0.10:{port}"),
            ]);
            assert_eq!(o.status.code(), Some(exit), "port {port}");
            let err = stderr(&o);
            assert!(err.starts_with("lb-ctl: error: the "), "{err}");
            assert_eq!(err.lines().count(), 1, "{err}");
            assert_eq!(stdout(&o), "", "stdout stays empty on error");
        }
    }
    let o = d.run(&["service", "show", "198.18.0.10:7"]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        stderr(&o),
        "lb-ctl: error: datapathd answered 502 Bad Gateway: <html> bad gateway </html>\n"
    );
}

#[test]
fn socket_from_the_environment() {
    let d = FakeDaemon::start(ok_view);
    let o = Command::new(env!("CARGO_BIN_EXE_lb-ctl"))
        .args(["service", "ls"])
        .env("LB_CTL_SOCKET", &d.sock)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(d.requests().len(), 1);
}

#[test]
fn help_documents_the_exit_codes() {
    let o = Command::new(env!("CARGO_BIN_EXE_lb-ctl"))
        .arg("--help")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0));
    let help = stdout(&o);
    assert!(help.contains("3  datapathd not reachable"), "{help}");
}

/// Every usage error is one line on stderr with exit status 2, naming what was rejected and
/// what is accepted there; nothing reaches the daemon.
#[test]
fn usage_errors_are_one_line() {
    let d = FakeDaemon::start(ok_view);
    let cases: [(&[&str], &str); 15] = [
        // An unknown --mode.
        (
            &["service", "add", "198.18.0.10:80", "--mode", "nat"],
            "invalid value 'nat' for '--mode <MODE>': accepted: full-nat, dsr",
        ),
        // An unknown --proto.
        (
            &[
                "backend",
                "rm",
                "198.18.0.10:80",
                "198.18.1.1:80",
                "--proto",
                "sctp",
            ],
            "invalid value 'sctp' for '--proto <PROTO>': accepted: tcp, udp",
        ),
        // A negative weight, as an option and as the positional of set-weight.
        (
            &[
                "backend",
                "add",
                "198.18.0.10:80",
                "198.18.1.1:80",
                "--weight",
                "-1",
            ],
            r#"invalid weight "-1": expected a number from 1 to 4294967295"#,
        ),
        (
            &[
                "backend",
                "set-weight",
                "198.18.0.10:80",
                "198.18.1.1:80",
                "-1",
            ],
            r#"invalid weight "-1": expected a number from 1 to 4294967295"#,
        ),
        // An unknown subcommand, at the top and one level down.
        (
            &["servic", "ls"],
            "unrecognized subcommand 'servic' for 'lb-ctl': accepted: service, backend, \
             stats, status, node, sources, socklb, policy, conntrack, flows, dns, proc, graph, help; did you mean 'service'?",
        ),
        (
            &["backend", "bogus"],
            "unrecognized subcommand 'bogus' for 'lb-ctl backend': accepted: add, remove|rm, \
             drain, activate, set-weight, help",
        ),
        // An unknown output format.
        (
            &["-o", "yaml", "stats"],
            "invalid value 'yaml' for '--output <OUTPUT>': accepted: table, json, dot",
        ),
        // DOT is the graph's alone (refused before anything is sent).
        (
            &["-o", "dot", "stats"],
            r#"invalid output "dot": only `lb-ctl graph` writes DOT; use table or json"#,
        ),
        (
            &["graph", "--window", "2m"],
            "invalid value '2m' for '--window <WINDOW>': accepted: 1m, 5m, 1h",
        ),
        // An extra argument.
        (
            &["service", "ls", "extra"],
            "unexpected argument 'extra' for 'lb-ctl service list': usage: lb-ctl service list \
             [OPTIONS]",
        ),
        // A missing argument.
        (
            &["backend", "add", "198.18.0.10:80"],
            "missing argument <ADDR:PORT> for 'lb-ctl backend add': usage: lb-ctl backend add \
             <VIP:PORT> <ADDR:PORT>",
        ),
        // A negative count.
        (
            &["flows", "--follow", "--count", "-1"],
            "invalid value '-1' for '--count <N>': accepted: a whole number from 0 to \
             18446744073709551615",
        ),
        // Ports out of range in a service or backend address.
        (
            &["service", "add", "198.18.0.10:65536"],
            r#"invalid service address "198.18.0.10:65536": port 65536 is out of range (accepted: 1-65535)"#,
        ),
        (
            &["backend", "add", "198.18.0.10:80", "198.18.1.1:-1"],
            r#"invalid backend address "198.18.1.1:-1": port -1 is out of range (accepted: 1-65535)"#,
        ),
        // A subcommand missing.
        (
            &["service"],
            "'lb-ctl service' needs a subcommand: accepted: add, remove|rm, list|ls, show, help",
        ),
    ];
    for (args, want) in cases {
        let o = d.run(args);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: one line: {err}");
        assert_eq!(err, format!("lb-ctl: error: {want}\n"), "{args:?}");
        assert_eq!(stdout(&o), "", "{args:?}");
    }
    // An unknown option lists the options that are accepted, and a near miss.
    let o = d.run(&["service", "add", "198.18.0.10:80", "--prot", "udp"]);
    assert_eq!(o.status.code(), Some(2));
    assert_eq!(
        stderr(&o),
        "lb-ctl: error: unknown option '--prot' for 'lb-ctl service add': accepted: --proto, \
         --mode, --snat-addr, --socket, -o/--output, --force, -h/--help; did you mean \
         '--proto'?\n"
    );
    assert_eq!(d.connections.load(Ordering::SeqCst), 0, "nothing was sent");
}

#[test]
fn help_and_version_still_print_and_exit_0() {
    for args in [
        &["--help"][..],
        &["-h"],
        &["service", "add", "--help"],
        &["help", "backend"],
        &["--version"],
        &["-V"],
    ] {
        let o = Command::new(env!("CARGO_BIN_EXE_lb-ctl"))
            .args(args)
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(0), "{args:?}: {}", stderr(&o));
        assert_eq!(stderr(&o), "", "{args:?}");
        let out = stdout(&o);
        if args[0].starts_with("-V") || args[0] == "--version" {
            assert_eq!(out, format!("lb-ctl {}\n", env!("CARGO_PKG_VERSION")));
        } else {
            assert!(out.contains("Usage: lb-ctl"), "{args:?}: {out}");
            assert!(out.lines().count() > 5, "{args:?}: {out}");
        }
    }
}

fn ct_answer(rec: &Recorded) -> (u16, String) {
    let body = match rec.method.as_str() {
        "DELETE" => json!({"removed": 0}),
        _ => json!([]),
    };
    (200, body.to_string())
}

/// An unknown state is refused before anything is sent, by list and by flush alike.
#[test]
fn conntrack_unknown_state_is_an_invalid_argument() {
    let d = FakeDaemon::start(ct_answer);
    for cmd in ["list", "flush"] {
        let o = d.run(&["conntrack", cmd, "--state", "bogus"]);
        assert_eq!(o.status.code(), Some(2), "{cmd}: {}", stderr(&o));
        assert_eq!(
            stderr(&o),
            "lb-ctl: error: invalid value 'bogus' for '--state <STATE>': accepted: none, \
             syn_sent, syn_recv, established, fin_wait, close_wait, time_wait, close, new, \
             replied\n"
        );
        assert_eq!(stdout(&o), "");
    }
    assert_eq!(d.connections.load(Ordering::SeqCst), 0);
}

/// The state names `conntrack list --help` shows are exactly the ones accepted: each is sent
/// to the daemon as it is spelled there, and so is the alias the help mentions.
#[test]
fn conntrack_help_names_exactly_the_accepted_states() {
    let o = Command::new(env!("CARGO_BIN_EXE_lb-ctl"))
        .args(["conntrack", "list", "--help"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0));
    let help = stdout(&o);
    let block = help
        .split("--state <STATE>")
        .nth(1)
        .and_then(|rest| rest.split("--table").next())
        .unwrap();
    assert!(
        block.contains("`closed` is also accepted for `close`"),
        "{block}"
    );
    let listed: Vec<&str> = block
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- "))
        .map(|l| l.split(':').next().unwrap())
        .collect();
    assert_eq!(
        listed,
        [
            "none",
            "syn_sent",
            "syn_recv",
            "established",
            "fin_wait",
            "close_wait",
            "time_wait",
            "close",
            "new",
            "replied"
        ]
    );
    // The short help lists the same.
    let o = Command::new(env!("CARGO_BIN_EXE_lb-ctl"))
        .args(["conntrack", "flush", "-h"])
        .output()
        .unwrap();
    assert!(
        stdout(&o).contains(&format!("[possible values: {}]", listed.join(", "))),
        "{}",
        stdout(&o)
    );

    let d = FakeDaemon::start(ct_answer);
    for name in listed.iter().copied().chain(["ESTABLISHED", "closed"]) {
        for cmd in ["list", "flush"] {
            let o = d.run(&["conntrack", cmd, "--state", name]);
            assert_eq!(o.status.code(), Some(0), "{cmd} {name}: {}", stderr(&o));
            let rec = d.requests().pop().unwrap();
            assert_eq!(rec.path, "/v1/conntrack");
            let sent = match name {
                "closed" => "close".to_string(),
                other => other.to_ascii_lowercase(),
            };
            assert_eq!(rec.query, format!("state={sent}"), "{cmd} {name}");
        }
    }
}

/// A file of tests/fixtures: answers of the policy, conntrack and flow routes as datapathd
/// writes them (the ones datapath-api's tests/wire.rs reads), and, in the `.txt` files, what
/// lb-ctl printed for them when it read them as `serde_json::Value` (made with that code).
fn fixture(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A golden output: with `LB_CTL_BLESS=1`, `actual` is written as the new golden first (review
/// the diff before committing it).
fn golden(name: &str, actual: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    if std::env::var_os("LB_CTL_BLESS").is_some() {
        std::fs::write(&path, actual).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    }
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn policy_answer(rec: &Recorded) -> (u16, String) {
    let file = match (rec.method.as_str(), rec.path.as_str(), rec.query.as_str()) {
        ("DELETE", "/v1/conntrack", _) => return (200, r#"{"removed":3}"#.into()),
        (_, "/v1/policy", _) => "policy.json",
        ("GET", "/v1/conntrack", _) => "conntrack.json",
        ("GET", "/v1/conntrack/stats", _) => "conntrack_stats.json",
        ("GET", "/v1/flows", "") => "flows.json",
        ("GET", "/v1/flows", _) => "follow.ndjson",
        _ => {
            return (
                404,
                json!({"code": "not_found", "error": "no such endpoint"}).to_string(),
            );
        }
    };
    (200, fixture(file))
}

/// Reading the answers with the API's types changed nothing lb-ctl prints, tables and `-o json`
/// alike, but for the names of the `dns` module and the processes of the `exec` module (their
/// own columns and fields).
#[test]
fn policy_conntrack_and_flow_output_is_unchanged() {
    let d = FakeDaemon::start(policy_answer);
    for (args, name) in [
        (&["policy", "list"][..], "policy"),
        (&["conntrack", "list"], "conntrack"),
        (&["conntrack", "stats"], "conntrack_stats"),
        (&["flows"], "flows"),
    ] {
        let o = d.run(args);
        assert_eq!(o.status.code(), Some(0), "{args:?}: {}", stderr(&o));
        let out = stdout(&o);
        assert_eq!(out, golden(&format!("{name}.table.txt"), &out), "{args:?}");
        let json_args: Vec<&str> = ["-o", "json"].iter().chain(args).copied().collect();
        let o = d.run(&json_args);
        assert_eq!(o.status.code(), Some(0), "{args:?}: {}", stderr(&o));
        let out = stdout(&o);
        assert_eq!(out, golden(&format!("{name}.json.txt"), &out), "{args:?}");
    }

    // Following: each event on its line as it comes, a line that is not one as it is; with
    // -o json the daemon's lines untouched.
    let o = d.run(&["flows", "--follow", "--count", "6", "--timeout", "9"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(stdout(&o), fixture("follow.table.txt"));
    assert_eq!(
        d.requests().pop().unwrap().query,
        "follow=true&count=6&timeout_seconds=9"
    );
    let o = d.run(&["-o", "json", "flows", "--follow"]);
    assert_eq!(stdout(&o), fixture("follow.ndjson"));
    assert_eq!(d.requests().pop().unwrap().query, "follow=true");

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("p.yaml");
    std::fs::write(&file, "endpoints: []\n").unwrap();
    let o = d.run(&["policy", "apply", "-f", file.to_str().unwrap()]);
    assert_eq!(
        stdout(&o),
        "policy applied (generation 2): 2 endpoint(s), 4 rule(s)\n"
    );
    let rec = d.requests().pop().unwrap();
    assert_eq!(
        (rec.method.as_str(), rec.path.as_str()),
        ("PUT", "/v1/policy")
    );
    assert_eq!(rec.body, r#"{"text":"endpoints: []\n"}"#);
    let o = d.run(&["policy", "rm"]);
    assert_eq!(
        stdout(&o),
        "policy deleted (generation 2): policed interfaces pass everything\n"
    );
    let o = d.run(&["conntrack", "flush", "--table", "lb"]);
    assert_eq!(stdout(&o), "3 tracked flow(s) removed\n");
    assert_eq!(d.requests().pop().unwrap().query, "table=lb");
    let o = d.run(&["-o", "json", "conntrack", "flush"]);
    assert_eq!(stdout(&o), "{\n  \"removed\": 3\n}\n");
}

/// The policy module off: 503 `unavailable`, exit 7, on every command it serves.
#[test]
fn module_off_exits_7() {
    let d = FakeDaemon::start(|_| {
        (
            503,
            json!({"code": "unavailable", "error": "the policy module is off (disabled by the configuration); enable it with `policy.enabled: true`"})
                .to_string(),
        )
    });
    for args in [
        &["policy", "list"][..],
        &["conntrack", "stats"],
        &["conntrack", "flush"],
        &["flows"],
        &["flows", "--follow"],
    ] {
        let o = d.run(args);
        assert_eq!(o.status.code(), Some(7), "{args:?}");
        assert!(stderr(&o).starts_with("lb-ctl: error: the policy module is off"));
        assert_eq!(stdout(&o), "");
    }
}
