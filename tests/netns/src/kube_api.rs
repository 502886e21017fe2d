//! **The one stand-in of the test suite: a Kubernetes API server.** Kubernetes cannot run on
//! these machines, so tests of the Kubernetes service-map source talk to this server instead.
//! It replays real recorded objects (`../shared/k8s-recorded/`) in the API server's real wire
//! format: discovery documents, `List` answers carrying `metadata.resourceVersion`, and watches
//! as a chunked stream of newline-delimited `{"type","object"}` events from a resourceVersion,
//! with BOOKMARKs when asked for them and `410 Gone` for a resourceVersion older than the
//! server keeps. Everything else in the tests is real. `kube_api_stand_in_speaks_to_kubectl`
//! checks the protocol with the real `kubectl`.
//!
//! Served: `/api`, `/apis`, `/api/v1`, `/apis/discovery.k8s.io/v1`, and list/watch of
//! `services` (core/v1) and `endpointslices` (discovery.k8s.io/v1), cluster-wide or by
//! namespace, and of `nodes` (core/v1, cluster-scoped). A `fieldSelector` on `metadata.name`
//! or `metadata.namespace` (`=`, `==`, `!=`, comma-joined) filters lists and watches; any other
//! field is refused with 400, as the real server refuses a field it does not index. Nothing
//! else (no writes: tests change objects through [`KubeApi`]'s methods).

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc, Condvar, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

/// The longest a watch stays open: the real server ends watches too (minutes there).
const WATCH_LIMIT: Duration = Duration::from_secs(60);
/// Between BOOKMARKs on a watch that asked for them.
const BOOKMARK_EVERY: Duration = Duration::from_millis(500);

/// The resources served, by their plural name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Resource {
    Services,
    EndpointSlices,
    /// Cluster-scoped: served only at `/api/v1/nodes`.
    Nodes,
}

impl Resource {
    fn kind(self) -> &'static str {
        match self {
            Resource::Services => "Service",
            Resource::EndpointSlices => "EndpointSlice",
            Resource::Nodes => "Node",
        }
    }

    fn api_version(self) -> &'static str {
        match self {
            Resource::Services | Resource::Nodes => "v1",
            Resource::EndpointSlices => "discovery.k8s.io/v1",
        }
    }

    fn namespaced(self) -> bool {
        self != Resource::Nodes
    }
}

#[derive(Debug, Clone)]
struct Event {
    rv: u64,
    kind: &'static str,
    resource: Resource,
    object: Value,
}

#[derive(Debug, Default)]
struct Store {
    rv: u64,
    /// (resource, namespace, name) -> object.
    objects: BTreeMap<(Resource, String, String), Value>,
    events: Vec<Event>,
    /// Watches from a resourceVersion older than this get 410 Gone.
    compacted_below: u64,
}

impl Store {
    /// The objects of `resource` that `admits` admits, as a list or a watch's start sends them.
    fn current(&self, resource: Resource, admits: &dyn Fn(&Value) -> bool) -> Vec<Value> {
        self.objects
            .iter()
            .filter(|((r, _, _), o)| *r == resource && admits(o))
            .map(|(_, o)| o.clone())
            .collect()
    }

    /// The `List` answer: the objects are encoded straight from the store, not copied first (a
    /// list of 10,000 slices is answered in tens of milliseconds, as a real server answers from
    /// its watch cache).
    fn list_body(&self, resource: Resource, admits: &dyn Fn(&Value) -> bool) -> Result<Vec<u8>> {
        let mut out = format!(
            r#"{{"kind":"{}List","apiVersion":"{}","metadata":{{"resourceVersion":"{}"}},"items":["#,
            resource.kind(),
            resource.api_version(),
            self.rv
        )
        .into_bytes();
        let mut first = true;
        for ((r, _, _), o) in &self.objects {
            if *r != resource || !admits(o) {
                continue;
            }
            if !first {
                out.push(b',');
            }
            first = false;
            serde_json::to_writer(&mut out, o)?;
        }
        out.extend_from_slice(b"]}");
        Ok(out)
    }

    /// The events after `rv` (the history is in resourceVersion order).
    fn events_after(&self, rv: u64) -> &[Event] {
        &self.events[self.events.partition_point(|e| e.rv <= rv)..]
    }
}

/// A BOOKMARK event at `rv`: only the object's kind and metadata, as the real server sends;
/// `initial_end` marks the end of a streaming list's initial events.
fn bookmark(resource: Resource, rv: u64, initial_end: bool) -> Value {
    let mut metadata = json!({"resourceVersion": rv.to_string()});
    if initial_end {
        metadata["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    json!({"type": "BOOKMARK", "object": {"kind": resource.kind(),
        "apiVersion": resource.api_version(), "metadata": metadata}})
}

#[derive(Debug, Default)]
struct Shared {
    store: Mutex<Store>,
    changed: Condvar,
    stopping: AtomicBool,
}

/// A running stand-in API server on 127.0.0.1 (or an address in a namespace's loopback).
pub struct KubeApi {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: Option<thread::JoinHandle<()>>,
}

fn key_of(resource: Resource, object: &Value) -> Result<(Resource, String, String)> {
    let meta = &object["metadata"];
    let name = meta["name"]
        .as_str()
        .context("object without metadata.name")?
        .to_string();
    let ns = if resource.namespaced() {
        meta["namespace"].as_str().unwrap_or("default")
    } else {
        ""
    };
    Ok((resource, ns.to_string(), name))
}

/// A kubeconfig for a client of the stand-in at `url` (no credentials: the stand-in asks for
/// none).
pub fn kubeconfig(url: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: stand-in\n  cluster:\n    server: {url}\n\
         users:\n- name: test\n  user: {{}}\ncontexts:\n- name: test\n  context:\n    cluster: \
         stand-in\n    user: test\ncurrent-context: test\n"
    )
}

/// Reads a recorded YAML object as the JSON the API server would send.
pub fn yaml_object(text: &str) -> Result<Value> {
    let v: Value = serde_yaml_ng::from_str(text).context("recorded object is not YAML")?;
    Ok(v)
}

impl KubeApi {
    /// Listens on `listener` (bound by the caller, e.g. inside a namespace).
    pub fn serve(listener: TcpListener) -> Result<Self> {
        Self::serve_prepared(listener, |_| Ok(()))
    }

    /// Like [`Self::serve`], with `prepare` run on the server before it answers anything
    /// (connections queue in the listener meanwhile): a server that comes back with its
    /// objects in place and its history compacted.
    pub fn serve_prepared(
        listener: TcpListener,
        prepare: impl FnOnce(&KubeApi) -> Result<()>,
    ) -> Result<Self> {
        let addr = listener.local_addr()?;
        listener.set_nonblocking(true)?;
        let mut api = Self {
            addr,
            shared: Arc::new(Shared::default()),
            accept: None,
        };
        prepare(&api)?;
        let shared = Arc::clone(&api.shared);
        let s = Arc::clone(&shared);
        let accept = thread::spawn(move || {
            while !s.stopping.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let s = Arc::clone(&s);
                        thread::spawn(move || {
                            let _ = handle(stream, &s);
                        });
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        // Woken by the next connection at once, by the stop flag within 50 ms.
                        let mut ready = libc::pollfd {
                            fd: std::os::fd::AsRawFd::as_raw_fd(&listener),
                            events: libc::POLLIN,
                            revents: 0,
                        };
                        // SAFETY: one valid pollfd for the listener, which outlives the call.
                        unsafe { libc::poll(&mut ready, 1, 50) };
                    }
                    Err(_) => thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        api.accept = Some(accept);
        Ok(api)
    }

    /// Listens on 127.0.0.1, on a free port.
    pub fn start() -> Result<Self> {
        Self::serve(TcpListener::bind("127.0.0.1:0")?)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn record(&self, resource: Resource, kind: &'static str, mut object: Value) -> Result<u64> {
        let key = key_of(resource, &object)?;
        let mut st = self.shared.store.lock().unwrap();
        st.rv += 1;
        let rv = st.rv;
        object["kind"] = json!(resource.kind());
        object["apiVersion"] = json!(resource.api_version());
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        match kind {
            "DELETED" => {
                if st.objects.remove(&key).is_none() {
                    bail!("no {} {}/{} to delete", resource.kind(), key.1, key.2);
                }
            }
            _ => {
                st.objects.insert(key, object.clone());
            }
        }
        st.events.push(Event {
            rv,
            kind,
            resource,
            object,
        });
        drop(st);
        self.shared.changed.notify_all();
        Ok(rv)
    }

    /// Adds or replaces an object (ADDED or MODIFIED); answers its new resourceVersion.
    pub fn apply(&self, resource: Resource, object: Value) -> Result<u64> {
        let key = key_of(resource, &object)?;
        let exists = self.shared.store.lock().unwrap().objects.contains_key(&key);
        self.record(resource, if exists { "MODIFIED" } else { "ADDED" }, object)
    }

    /// Deletes an object; `namespace` is ignored for a cluster-scoped resource (Nodes).
    pub fn delete(&self, resource: Resource, namespace: &str, name: &str) -> Result<u64> {
        let object = self
            .shared
            .store
            .lock()
            .unwrap()
            .objects
            .get(&(
                resource,
                if resource.namespaced() { namespace } else { "" }.to_string(),
                name.to_string(),
            ))
            .cloned()
            .with_context(|| format!("no {} {namespace}/{name}", resource.kind()))?;
        self.record(resource, "DELETED", object)
    }

    /// Forgets the event history: a watch from a resourceVersion older than the current one
    /// gets 410 Gone, as after an etcd compaction, and open watches end. A watch from the
    /// current resourceVersion (a fresh list's) stays valid, as on a real server.
    pub fn compact(&self) {
        let mut st = self.shared.store.lock().unwrap();
        st.compacted_below = st.rv;
        st.events.clear();
        drop(st);
        self.shared.changed.notify_all();
    }

    pub fn resource_version(&self) -> u64 {
        self.shared.store.lock().unwrap().rv
    }
}

impl Drop for KubeApi {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        self.shared.changed.notify_all();
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

struct Request {
    path: String,
    query: BTreeMap<String, String>,
}

fn read_request(stream: &TcpStream) -> Result<Option<Request>> {
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Ok(None);
    }
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h == "\r\n" || h == "\n" {
            break;
        }
    }
    if method != "GET" {
        bail!("only GET is served, not {method}");
    }
    let (path, q) = target.split_once('?').unwrap_or((target, ""));
    let query = q
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decoded(k), percent_decoded(v))
        })
        .collect();
    Ok(Some(Request {
        path: path.to_string(),
        query,
    }))
}

/// A query component as clients send it (`metadata.name%3Dnode-1`, `+` for a space).
fn percent_decoded(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(v) => {
                        out.push(v);
                        i += 3;
                        continue;
                    }
                    None => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// One term of a field selector: the field, whether it must equal (`=`, `==`) or differ
/// (`!=`), and the value.
type FieldTerm = (String, bool, String);

/// Parses a `fieldSelector`; `Err` names the first field this server cannot select on.
fn field_selector(selector: &str) -> std::result::Result<Vec<FieldTerm>, String> {
    let mut terms = Vec::new();
    for term in selector.split(',').filter(|t| !t.is_empty()) {
        let (field, equal, value) = if let Some((f, v)) = term.split_once("!=") {
            (f, false, v)
        } else if let Some((f, v)) = term.split_once("==") {
            (f, true, v)
        } else if let Some((f, v)) = term.split_once('=') {
            (f, true, v)
        } else {
            return Err(format!("invalid field selector term: {term:?}"));
        };
        if field != "metadata.name" && field != "metadata.namespace" {
            return Err(format!("field label not supported: {field}"));
        }
        terms.push((field.to_string(), equal, value.to_string()));
    }
    Ok(terms)
}

fn selected(terms: &[FieldTerm], object: &Value) -> bool {
    terms.iter().all(|(field, equal, value)| {
        let meta = &object["metadata"];
        let have = match field.as_str() {
            "metadata.name" => meta["name"].as_str().unwrap_or(""),
            _ => meta["namespace"].as_str().unwrap_or(""),
        };
        (have == value) == *equal
    })
}

fn respond(stream: &mut TcpStream, code: u16, body: &Value) -> Result<()> {
    respond_text(stream, code, body.to_string().as_bytes())
}

fn respond_text(stream: &mut TcpStream, code: u16, text: &[u8]) -> Result<()> {
    let reason = match code {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        410 => "Gone",
        _ => "Error",
    };
    write!(
        stream,
        "HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        text.len()
    )?;
    stream.write_all(text)?;
    Ok(())
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

fn discovery(path: &str) -> Option<Value> {
    let resource = |name: &str, kind: &str, namespaced: bool, short: &[&str]| {
        json!({"name": name, "singularName": "", "namespaced": namespaced, "kind": kind,
               "verbs": ["get", "list", "watch"], "shortNames": short})
    };
    Some(match path {
        "/api" => json!({"kind": "APIVersions", "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": ""}]}),
        "/apis" => json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": [{
            "name": "discovery.k8s.io",
            "versions": [{"groupVersion": "discovery.k8s.io/v1", "version": "v1"}],
            "preferredVersion": {"groupVersion": "discovery.k8s.io/v1", "version": "v1"}}]}),
        "/api/v1" => json!({"kind": "APIResourceList", "groupVersion": "v1",
            "resources": [resource("services", "Service", true, &["svc"]),
                          resource("nodes", "Node", false, &["no"])]}),
        "/apis/discovery.k8s.io/v1" => json!({"kind": "APIResourceList",
            "apiVersion": "v1", "groupVersion": "discovery.k8s.io/v1",
            "resources": [resource("endpointslices", "EndpointSlice", true, &[])]}),
        _ => return None,
    })
}

/// `(resource, namespace)` of a list/watch path.
fn route(path: &str) -> Option<(Resource, Option<String>)> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (prefix, rest): (&[&str], &[&str]) = match segs.as_slice() {
        ["api", "v1", rest @ ..] => (&["api", "v1"], rest),
        ["apis", "discovery.k8s.io", "v1", rest @ ..] => (&["apis"], rest),
        _ => return None,
    };
    let (ns, plural) = match rest {
        [plural] => (None, *plural),
        ["namespaces", ns, plural] => (Some(ns.to_string()), *plural),
        _ => return None,
    };
    let resource = match (prefix[0], plural) {
        ("api", "services") => Resource::Services,
        ("api", "nodes") if ns.is_none() => Resource::Nodes,
        ("apis", "endpointslices") => Resource::EndpointSlices,
        _ => return None,
    };
    Some((resource, ns))
}

fn handle(mut stream: TcpStream, shared: &Shared) -> Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    while let Some(req) = read_request(&stream)? {
        if let Some(doc) = discovery(&req.path) {
            respond(&mut stream, 200, &doc)?;
            continue;
        }
        let Some((resource, ns)) = route(&req.path) else {
            respond(
                &mut stream,
                404,
                &status(
                    404,
                    "NotFound",
                    "the server could not find the requested resource",
                ),
            )?;
            continue;
        };
        let terms = match field_selector(req.query.get("fieldSelector").map_or("", |s| s)) {
            Ok(t) => t,
            Err(e) => {
                respond(&mut stream, 400, &status(400, "BadRequest", &e))?;
                continue;
            }
        };
        let admits = |o: &Value| {
            ns.as_deref()
                .is_none_or(|ns| o["metadata"]["namespace"].as_str().unwrap_or("default") == ns)
                && selected(&terms, o)
        };
        if req
            .query
            .get("watch")
            .is_some_and(|w| w == "true" || w == "1")
        {
            return watch(stream, shared, resource, &req, &admits);
        }
        let list = shared.store.lock().unwrap().list_body(resource, &admits)?;
        respond_text(&mut stream, 200, &list)?;
    }
    Ok(())
}

fn chunk(stream: &mut TcpStream, line: &Value) -> std::io::Result<()> {
    let text = format!("{line}\n");
    write!(stream, "{:x}\r\n{text}\r\n", text.len())?;
    stream.flush()
}

fn watch(
    mut stream: TcpStream,
    shared: &Shared,
    resource: Resource,
    req: &Request,
    admits: &dyn Fn(&Value) -> bool,
) -> Result<()> {
    let from: u64 = req
        .query
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let bookmarks = req
        .query
        .get("allowWatchBookmarks")
        .is_some_and(|v| v == "true");
    let initial = req
        .query
        .get("sendInitialEvents")
        .is_some_and(|v| v == "true");
    write!(
        stream,
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    )?;
    let mut st = shared.store.lock().unwrap();
    // From "0" (or with sendInitialEvents) the watch starts with the current objects.
    let mut sent = if from == 0 || initial {
        let snapshot = st.current(resource, admits);
        let rv = st.rv;
        drop(st);
        for o in snapshot {
            chunk(&mut stream, &json!({"type": "ADDED", "object": o}))?;
        }
        if initial && bookmarks {
            chunk(&mut stream, &bookmark(resource, rv, true))?;
        }
        st = shared.store.lock().unwrap();
        rv
    } else if from < st.compacted_below {
        drop(st);
        let gone = status(410, "Expired", &format!("too old resource version: {from}"));
        chunk(&mut stream, &json!({"type": "ERROR", "object": gone}))?;
        write!(stream, "0\r\n\r\n")?;
        return Ok(());
    } else {
        from
    };
    let start = Instant::now();
    let mut last_bookmark = Instant::now();
    let compacted_at = st.compacted_below;
    loop {
        if shared.stopping.load(Ordering::SeqCst)
            || start.elapsed() > WATCH_LIMIT
            || st.compacted_below != compacted_at
        {
            break;
        }
        let due: Vec<Event> = st
            .events_after(sent)
            .iter()
            .filter(|e| e.rv > sent && e.resource == resource && admits(&e.object))
            .cloned()
            .collect();
        let newest = st.rv;
        drop(st);
        for e in due {
            chunk(&mut stream, &json!({"type": e.kind, "object": e.object}))?;
        }
        sent = sent.max(newest);
        if bookmarks && last_bookmark.elapsed() >= BOOKMARK_EVERY {
            chunk(&mut stream, &bookmark(resource, sent, false))?;
            last_bookmark = Instant::now();
        }
        st = shared.store.lock().unwrap();
        if st.rv == sent {
            st = shared
                .changed
                .wait_timeout(st, Duration::from_millis(100))
                .unwrap()
                .0;
        }
    }
    drop(st);
    write!(stream, "0\r\n\r\n")?;
    Ok(())
}
