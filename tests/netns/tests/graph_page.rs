//! The graph's web page (`datapath/src/graph/web/index.html`) in a real browser: Debian's
//! headless Chromium loads it from a small HTTP server on the loopback of a network namespace
//! made for the test, next to a sample `GET /v1/graph` answer (`data/graph-sample.json`, a
//! `GraphView`). No daemon: what is checked is what the page does with a graph. It draws every
//! node and every edge with their ids, fetches the graph again by itself (live update), shows
//! the figures of the edge or node named by `?select=` in its side panel, escapes the text it
//! was given, keeps the last graph and says so when a fetch fails, and asks nothing of anyone
//! but its own origin. A 1280x800 screenshot goes to `target/graph-artifacts/graph-page.png`.
//!
//! Run with `cargo test -p netns-tests --test graph_page` (as root, with `chromium`).

use std::{
    collections::BTreeMap,
    io::{ErrorKind, Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use datapath_api::{GraphEdge, GraphView};
use netns_tests::{
    browser,
    netns::{self, OwnedNetns},
    privilege, privileged,
    topology::unique_prefix,
};

const PAGE: &str = include_str!("../../../datapath/src/graph/web/index.html");
const SAMPLE: &str = include_str!("data/graph-sample.json");

/// The server stops after this long, or after [`MAX_CONNECTIONS`], whichever comes first.
const SERVER_LIFETIME: Duration = Duration::from_secs(300);
const MAX_CONNECTIONS: usize = 400;
/// How long a connection may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Under this prefix the first graph is served, then every fetch fails.
const FLAKY: &str = "/flaky/";

fn ok<T>(what: &str, r: anyhow::Result<T>) -> T {
    r.unwrap_or_else(|e| panic!("{what}: {e:#}"))
}

fn sample() -> GraphView {
    serde_json::from_str(SAMPLE).unwrap_or_else(|e| panic!("data/graph-sample.json: {e}"))
}

/// A real HTTP/1.1 server (one request per connection) on 127.0.0.1 inside a namespace: the
/// page at `/` and at [`FLAKY`], the sample graph at `v1/graph` under both. Logs every request
/// target. Bounded: [`MAX_CONNECTIONS`] and [`SERVER_LIFETIME`]; stops on drop.
struct PageServer {
    addr: SocketAddr,
    log: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl PageServer {
    fn start(ns: &str) -> anyhow::Result<Self> {
        let listener = netns::run_in(ns, || TcpListener::bind((Ipv4Addr::LOCALHOST, 0)))??;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let log = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (log, stop) = (Arc::clone(&log), Arc::clone(&stop));
            thread::spawn(move || accept_loop(listener, log, stop))
        };
        Ok(PageServer {
            addr,
            log,
            stop,
            thread: Some(thread),
        })
    }

    fn url(&self, target: &str) -> String {
        format!("http://{}{target}", self.addr)
    }

    /// The request targets logged since the last call.
    fn take_log(&self) -> Vec<String> {
        std::mem::take(&mut *self.log.lock().unwrap())
    }
}

impl Drop for PageServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn accept_loop(listener: TcpListener, log: Arc<Mutex<Vec<String>>>, stop: Arc<AtomicBool>) {
    let deadline = Instant::now() + SERVER_LIFETIME;
    let flaky_graphs = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    while !stop.load(Ordering::Relaxed)
        && Instant::now() < deadline
        && workers.len() < MAX_CONNECTIONS
    {
        match listener.accept() {
            Ok((stream, _)) => {
                let (log, flaky_graphs) = (Arc::clone(&log), Arc::clone(&flaky_graphs));
                workers.push(thread::spawn(move || {
                    if let Err(e) = answer(stream, &log, &flaky_graphs) {
                        eprintln!("page server: {e:#}");
                    }
                }));
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => thread::sleep(Duration::from_millis(5)),
            Err(e) => {
                eprintln!("page server: accept: {e}");
                thread::sleep(Duration::from_millis(50));
            }
        }
    }
    for w in workers {
        let _ = w.join();
    }
}

/// Reads one request (its head, at most 16 KiB, within [`REQUEST_TIMEOUT`]) and answers it.
fn answer(
    mut stream: TcpStream,
    log: &Mutex<Vec<String>>,
    flaky_graphs: &AtomicUsize,
) -> anyhow::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(REQUEST_TIMEOUT))?;
    stream.set_write_timeout(Some(REQUEST_TIMEOUT))?;
    let mut head = Vec::new();
    let mut buf = [0u8; 2048];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf) {
            // A connection opened ahead of time and closed unused.
            Ok(0) => return Ok(()),
            Ok(n) => head.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        }
        anyhow::ensure!(head.len() <= 16 * 1024, "request head over 16 KiB");
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let mut words = head.lines().next().unwrap_or("").split_whitespace();
    let (method, target) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    log.lock().unwrap().push(target.to_string());
    let path = target.split('?').next().unwrap_or("");
    let (status, kind, body) = match (method, path) {
        ("GET", "/") => ("200 OK", "text/html; charset=utf-8", PAGE.to_string()),
        ("GET", FLAKY) => ("200 OK", "text/html; charset=utf-8", PAGE.to_string()),
        ("GET", "/v1/graph") => ("200 OK", "application/json", SAMPLE.to_string()),
        ("GET", p) if p == format!("{FLAKY}v1/graph") => {
            if flaky_graphs.fetch_add(1, Ordering::Relaxed) == 0 {
                ("200 OK", "application/json", SAMPLE.to_string())
            } else {
                (
                    "503 Service Unavailable",
                    "application/json",
                    r#"{"error":"graph controller stopped"}"#.to_string(),
                )
            }
        }
        _ => ("404 Not Found", "text/plain", "not found\n".to_string()),
    };
    write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    stream.flush()?;
    Ok(())
}

// ---- reading the DOM Chromium dumped (its serializer: `name="value"`, entities escaped) ----

/// The attributes of every start tag that has attribute `name`.
fn tags_with(dom: &str, name: &str) -> Vec<BTreeMap<String, String>> {
    let needle = format!(" {name}=\"");
    let mut tags = Vec::new();
    let mut from = 0;
    while let Some(i) = dom[from..].find(&needle) {
        let at = from + i;
        let start = dom[..at].rfind('<').expect("an attribute is inside a tag");
        let end = start + tag_end(&dom[start..]);
        tags.push(attributes(&dom[start..end]));
        from = end;
    }
    tags
}

/// Where the tag `html` starts with ends (its `>`, outside quoted values).
fn tag_end(html: &str) -> usize {
    let mut quoted = false;
    for (i, c) in html.char_indices() {
        match c {
            '"' => quoted = !quoted,
            '>' if !quoted => return i,
            _ => {}
        }
    }
    panic!("a tag does not end: {html}")
}

/// `<tag a="x" b="y"` -> {a: x, b: y} (values unescaped).
fn attributes(tag: &str) -> BTreeMap<String, String> {
    let mut attrs = BTreeMap::new();
    let mut rest = tag.trim_start_matches('<');
    rest = rest.split_once(' ').map_or("", |(_, r)| r);
    while let Some((name, after)) = rest.split_once("=\"") {
        let Some((value, next)) = after.split_once('"') else {
            break;
        };
        attrs.insert(
            name.trim().to_string(),
            netns_tests::http::unescape_entities(value),
        );
        rest = next;
    }
    attrs
}

/// The serialized element that starts with `open` (e.g. `<aside id="details"`), up to its end
/// tag (no nested element of the same name).
fn element<'a>(dom: &'a str, open: &str) -> &'a str {
    let start = dom
        .find(open)
        .unwrap_or_else(|| panic!("no {open} in the DOM:\n{dom}"));
    let name = open.trim_start_matches('<').split(' ').next().unwrap();
    let close = format!("</{name}>");
    let end = dom[start..]
        .find(&close)
        .unwrap_or_else(|| panic!("{open} does not end"));
    &dom[start..start + end + close.len()]
}

/// The text of `html`: tags dropped, entities decoded, blanks squeezed.
fn text_of(html: &str) -> String {
    let mut text = String::new();
    let mut in_tag = false;
    for c in html.chars() {
        match c {
            '<' => {
                in_tag = true;
                text.push(' ');
            }
            '>' => in_tag = false,
            c if !in_tag => text.push(c),
            _ => {}
        }
    }
    netns_tests::http::unescape_entities(&text)
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// The text of the first element of `html` with `data-field="field"` (a leaf).
fn field(html: &str, field: &str) -> String {
    let needle = format!("data-field=\"{field}\"");
    let at = html
        .find(&needle)
        .unwrap_or_else(|| panic!("no {needle} in {html}"));
    let from = at + tag_end(&html[at..]) + 1;
    let to = from + html[from..].find("</").unwrap();
    text_of(&html[from..to])
}

fn failed(e: &GraphEdge) -> u64 {
    let f = &e.failures;
    f.reset + f.refused + f.denied + f.no_backend
}

/// The edges drawn: id -> (the attributes of its `<g class="edge">`, the group serialized).
fn edge_groups(dom: &str) -> BTreeMap<String, (BTreeMap<String, String>, &str)> {
    let starts: Vec<usize> = dom
        .match_indices("<g class=\"edge")
        .map(|(i, _)| i)
        .collect();
    let ends = dom.find("<g id=\"nodes\"").expect("the nodes' layer");
    starts
        .iter()
        .enumerate()
        .map(|(k, &at)| {
            let end = starts.get(k + 1).copied().unwrap_or(ends);
            let group = &dom[at..end];
            let attrs = attributes(&group[..tag_end(group)]);
            (attrs["data-edge-id"].clone(), (attrs, group))
        })
        .collect()
}

/// Every node and edge of `g` is drawn, with its id and kind; an edge's label says its
/// protocol, port and connections, and its failures when it has some.
fn check_drawn(dom: &str, g: &GraphView) {
    let nodes: BTreeMap<String, String> = tags_with(dom, "data-node-id")
        .into_iter()
        .filter(|a| {
            a.get("class")
                .is_some_and(|c| c.split(' ').any(|c| c == "node"))
        })
        .map(|a| (a["data-node-id"].clone(), a["data-kind"].clone()))
        .collect();
    let want: BTreeMap<String, String> = g
        .nodes
        .iter()
        .map(|n| {
            let kind = serde_json::to_value(n.kind).unwrap();
            (n.id.clone(), kind.as_str().unwrap().to_string())
        })
        .collect();
    assert_eq!(nodes, want, "the drawn nodes (id -> data-kind)");

    let edges = edge_groups(dom);
    let ids: Vec<&String> = edges.keys().collect();
    let want: Vec<&String> = g.edges.iter().map(|e| &e.id).collect();
    assert_eq!(ids, want, "the drawn edges");
    for e in &g.edges {
        let (attrs, group) = &edges[&e.id];
        assert!(
            group.contains("<path") && group.contains("marker-end=\"url(#arrow"),
            "edge {} has no path with an arrowhead: {group}",
            e.id
        );
        let label = text_of(group);
        let tag = format!("{}/{} ×{}", e.protocol, e.port, e.connections);
        assert!(
            label.contains(&tag),
            "edge {}: {label:?} lacks {tag:?}",
            e.id
        );
        let n = failed(e);
        let class = &attrs["class"];
        if n > 0 {
            assert!(
                class.contains("failing"),
                "edge {} not failing: {class}",
                e.id
            );
            assert!(
                group.contains(&format!("class=\"failed\">&nbsp;✗{n}<"))
                    || group.contains(&format!("class=\"failed\"> ✗{n}<")),
                "edge {}: no red ✗{n} in {group}",
                e.id
            );
        } else {
            assert!(!class.contains("failing"), "edge {} failing: {class}", e.id);
            assert!(!label.contains('✗'), "edge {}: {label:?}", e.id);
        }
    }
}

fn status_line(dom: &str) -> String {
    text_of(element(dom, "<span id=\"status\""))
}

/// `updated HH:MM:SS`, at the start of the status line.
fn check_updated(status: &str) {
    let time = status
        .strip_prefix("updated ")
        .unwrap_or_else(|| panic!("status {status:?}"));
    let b = time.as_bytes();
    assert!(
        b.len() >= 8
            && [0, 1, 3, 4, 6, 7].iter().all(|&i| b[i].is_ascii_digit())
            && b[2] == b':'
            && b[5] == b':',
        "status {status:?}"
    );
}

/// The targets a page load asked for are its own page, its graph (with `window`) and at most
/// the favicon; returns how many graph fetches there were.
fn check_requests(log: &[String], page: &str, window: &str) -> usize {
    let prefix = page.split('?').next().unwrap();
    let graph = format!("{prefix}v1/graph?window={window}");
    let mut graphs = 0;
    for target in log {
        if target == &graph {
            graphs += 1;
        } else {
            assert!(
                target == page || target == "/favicon.ico",
                "the page asked for {target:?} (all: {log:?})"
            );
        }
    }
    assert!(
        log.iter().any(|t| t == page),
        "{page} was not loaded: {log:?}"
    );
    graphs
}

/// The page is one file: no script, style or image from anywhere, no URL of another origin, and
/// data only ever set as text.
#[test]
fn page_is_self_contained() {
    for banned in [
        "http://",
        "https://",
        "<script src",
        "<link",
        "@import",
        "<iframe",
        "<img",
        "innerHTML",
        "outerHTML",
        "insertAdjacentHTML",
        "document.write",
        "eval(",
        "new Function",
    ] {
        assert!(!PAGE.contains(banned), "the page contains {banned:?}");
    }
    // `url(` only for the page's own markers, e.g. `url(#arrow)`.
    for (i, _) in PAGE.match_indices("url(") {
        assert!(
            PAGE[i..].starts_with("url(#"),
            "the page refers to {}",
            &PAGE[i..(i + 40).min(PAGE.len())]
        );
    }
    assert_eq!(PAGE.matches("fetch(").count(), 1, "one fetch in the page");
    assert!(PAGE.contains("fetch(graphUrl()"));
    assert!(
        PAGE.contains("return 'v1/graph?'"),
        "the graph URL is relative"
    );
}

#[test]
fn page_draws_the_graph_in_a_browser() {
    if !privileged() || !privilege::may_run(browser::unavailable_reason()) {
        return;
    }
    let g = sample();
    assert_eq!(g.nodes.len(), 5);
    assert_eq!(g.edges.len(), 4);
    let failing = g
        .edges
        .iter()
        .find(|e| failed(e) > 0)
        .expect("the sample has an edge with failures");

    let ns = ok(
        "namespace",
        OwnedNetns::create(&format!("{}w", unique_prefix())),
    );
    let server = ok("page server", PageServer::start(ns.name()));
    let dom_of = |target: &str| -> String {
        ok(
            &format!("chromium on {target}"),
            browser::dump_dom(Some(ns.name()), &server.url(target)),
        )
    };

    // 1. Everything drawn; fetched again by itself; the status line.
    let dom = dom_of("/");
    check_drawn(&dom, &g);
    let graphs = check_requests(&server.take_log(), "/", "5m");
    assert!(
        graphs >= 2,
        "the page fetched the graph {graphs} time(s): no live update"
    );
    let status = status_line(&dom);
    check_updated(&status);
    assert!(
        status.contains("5 nodes") && status.contains("4 edges"),
        "{status:?}"
    );
    assert!(
        element(&dom, "<span id=\"error\"").contains(" hidden"),
        "an error shown: {dom}"
    );
    assert!(
        element(&dom, "<button type=\"button\" data-window=\"5m\"")
            .contains("aria-pressed=\"true\""),
        "5m is not the window shown"
    );

    // 2. `?select=<edge>`: its figures in the side panel, its exe names escaped.
    let target = format!("/?select={}", netns_tests::http::encode_query(&failing.id));
    let dom = dom_of(&target);
    check_requests(&server.take_log(), &target, "5m");
    check_drawn(&dom, &g);
    let panel = element(&dom, "<aside id=\"details\"");
    let text = text_of(panel);
    assert_eq!(field(panel, "connections"), failing.connections.to_string());
    let f = &failing.failures;
    for (cause, n) in [
        ("reset", f.reset),
        ("refused", f.refused),
        ("denied", f.denied),
        ("no_backend", f.no_backend),
    ] {
        assert_eq!(field(panel, &format!("failures.{cause}")), n.to_string());
    }
    assert_eq!(field(panel, "failures"), failed(failing).to_string());
    assert_eq!(field(panel, "rtt_p50"), "85 µs");
    assert_eq!(field(panel, "rtt_p99"), "610 µs");
    assert_eq!(field(panel, "bytes_sent"), "60.0 KiB (61,440 B)");
    assert_eq!(field(panel, "bytes_received"), "2.50 MiB (2,621,440 B)");
    for p in &failing.processes {
        assert!(
            text.contains(&p.exe),
            "{:?} not in the panel: {text}",
            p.exe
        );
    }
    assert!(
        text.contains(&failing.caller) && text.contains(&failing.callee),
        "{text}"
    );
    assert!(
        !dom.contains("<img") && panel.contains("&lt;img src=x onerror=alert(1)&gt;"),
        "an exe was not escaped: {panel}"
    );
    assert!(
        dom.contains("class=\"edge failing selected near\"")
            || dom.contains("class=\"edge failing near selected\""),
        "the selected edge is not highlighted"
    );

    // 3. `?select=<node>` and another window: kind, namespace, addresses, names, its edges.
    let node = g
        .nodes
        .iter()
        .find(|n| n.id == "service:shop/frontend")
        .unwrap();
    let target = format!(
        "/?window=1h&select={}",
        netns_tests::http::encode_query(&node.id)
    );
    let dom = dom_of(&target);
    check_requests(&server.take_log(), &target, "1h");
    let panel = element(&dom, "<aside id=\"details\"");
    assert_eq!(field(panel, "kind"), "service");
    assert_eq!(field(panel, "namespace"), "shop");
    let listed = |attr: &str| -> Vec<String> {
        let needle = format!("data-field=\"{attr}\">");
        panel
            .match_indices(&needle)
            .map(|(i, _)| {
                let from = i + needle.len();
                netns_tests::http::unescape_entities(
                    &panel[from..from + panel[from..].find('<').unwrap()],
                )
            })
            .collect()
    };
    assert_eq!(listed("address"), node.addresses);
    assert_eq!(listed("name"), node.names);
    let linked: Vec<String> = tags_with(panel, "data-select")
        .into_iter()
        .map(|a| a["data-select"].clone())
        .filter(|id| id.contains(" -> "))
        .collect();
    let want: Vec<String> = g
        .edges
        .iter()
        .filter(|e| e.caller == node.id)
        .chain(g.edges.iter().filter(|e| e.callee == node.id))
        .map(|e| e.id.clone())
        .collect();
    assert_eq!(linked, want, "the node's out and in edges");
    assert!(
        element(&dom, "<button type=\"button\" data-window=\"1h\"")
            .contains("aria-pressed=\"true\""),
        "1h is not the window shown"
    );

    // 4. Behind a prefix, with every fetch after the first failing: the graph stays, the
    //    error is shown.
    let dom = dom_of(FLAKY);
    let graphs = check_requests(&server.take_log(), FLAKY, "5m");
    assert!(graphs >= 2, "{graphs} graph fetch(es) under {FLAKY}");
    check_drawn(&dom, &g);
    let error = element(&dom, "<span id=\"error\"");
    assert!(!error.contains(" hidden"), "no error shown: {error}");
    let error = text_of(error);
    assert!(
        error.contains("HTTP 503") && error.contains("graph controller stopped"),
        "{error:?}"
    );
    assert!(error.contains("showing the one of"), "{error:?}");
    check_updated(&status_line(&dom));

    // 5. The screenshot, with the failing edge selected.
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let dir = root.join("target/graph-artifacts");
    ok(
        "artifacts dir",
        std::fs::create_dir_all(&dir).map_err(Into::into),
    );
    let png = dir.join("graph-page.png");
    let target = format!("/?select={}", netns_tests::http::encode_query(&failing.id));
    ok(
        "screenshot",
        browser::screenshot(Some(ns.name()), &server.url(&target), &png, 1280, 800),
    );
    check_requests(&server.take_log(), &target, "5m");
    let size = std::fs::metadata(&png).map(|m| m.len()).unwrap_or(0);
    assert!(size > 10_000, "{} is {size} bytes", png.display());
    eprintln!("screenshot: {}", png.display());
}
