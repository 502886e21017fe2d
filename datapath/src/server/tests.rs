use std::path::PathBuf;

use datapath_api::{Counter, StatsSnapshot};
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::{net::UnixStream, sync::oneshot, task::JoinHandle};

use super::*;
use crate::state::{Limits, testing::MemPlane};

impl PlaneStats for MemPlane {
    fn stats(&self) -> Result<StatsSnapshot> {
        if let Some((entered, release)) = &self.stats_gate {
            entered.send(()).unwrap();
            release.recv().unwrap();
        }
        Ok(self.stats.clone())
    }

    fn table_entries(&self, service: &ServiceSpec) -> Result<BTreeMap<u32, u32>> {
        Ok(self.entries(service.id))
    }
}

struct Server {
    dir: tempfile::TempDir,
    sock: PathBuf,
    ctl: SharedController<MemPlane>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<()>>,
}

impl Server {
    async fn start(plane: MemPlane) -> Self {
        Self::start_with(plane, Router::new()).await
    }

    /// The API's routes and `extra` merged in, served as the daemon serves them (through
    /// [`serve_router`]), like main.rs merges the status and policy routes.
    async fn start_with(plane: MemPlane, extra: Router) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("run/api.sock");
        let store = Store::open(
            dir.path().join("state/state.json"),
            Limits {
                max_services: 4,
                max_backends: 8,
            },
        )
        .unwrap();
        let ctl = Arc::new(Mutex::new(Controller::new(store, plane)));
        let listener = bind(&sock).await.unwrap();
        let (tx, rx) = oneshot::channel();
        let task = tokio::spawn(serve_router(
            listener,
            router(ctl.clone()).merge(extra),
            async {
                let _ = rx.await;
            },
        ));
        Self {
            dir,
            sock,
            ctl,
            stop: Some(tx),
            task,
        }
    }

    async fn call(&self, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
        let (status, _, value) = self
            .call_bytes(method, path, body.unwrap_or("").as_bytes().to_vec())
            .await;
        (status, value)
    }

    /// Status, headers and JSON body of one request.
    async fn call_bytes(
        &self,
        method: &str,
        path: &str,
        body: Vec<u8>,
    ) -> (u16, hyper::HeaderMap, Value) {
        let stream = UnixStream::connect(&self.sock).await.unwrap();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "localhost")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .unwrap();
        let resp = sender.send_request(req).await.unwrap();
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        let value = serde_json::from_slice(&bytes)
            .unwrap_or_else(|e| panic!("{method} {path}: body is not JSON ({e}): {bytes:?}"));
        (status, headers, value)
    }

    async fn stop(mut self) {
        self.stop.take().unwrap().send(()).unwrap();
        self.task.await.unwrap().unwrap();
    }
}

const SVC: &str = "/v1/services/tcp/198.18.0.10/80";

fn assert_error(got: &(u16, Value), status: u16, code: &str, text: &str) {
    assert_eq!(got.0, status, "{got:?}");
    assert_eq!(got.1["code"], code, "{got:?}");
    let msg = got.1["error"].as_str().unwrap();
    assert!(msg.contains(text), "{msg:?} lacks {text:?}");
    assert!(!msg.contains('\n'), "one line: {msg:?}");
}

#[tokio::test]
async fn service_and_backend_lifecycle() {
    let mut plane = MemPlane::default();
    plane.stats.backends.insert(
        1,
        Counter {
            packets: 10,
            bytes: 640,
        },
    );
    let s = Server::start(plane).await;
    assert_eq!(
        s.call("GET", "/healthz", None).await,
        (200, json!({"status": "ok"}))
    );
    assert_eq!(s.call("GET", "/v1/services", None).await, (200, json!([])));

    let (st, v) = s
        .call(
            "POST",
            "/v1/services",
            Some(r#"{"vip":"198.18.0.10","port":80,"proto":"tcp"}"#),
        )
        .await;
    assert_eq!(st, 201, "{v}");
    assert_eq!(v["mode"], "full-nat");
    assert_eq!(v["id"], 0);
    assert_eq!(v["backends"], json!([]));

    for (addr, weight) in [("198.18.1.1", 1), ("198.18.1.2", 3)] {
        let body = format!(r#"{{"addr":"{addr}","port":8080,"weight":{weight}}}"#);
        let (st, v) = s
            .call("POST", &format!("{SVC}/backends"), Some(&body))
            .await;
        assert_eq!(st, 201, "{v}");
    }
    let (st, v) = s.call("GET", SVC, None).await;
    assert_eq!(st, 200);
    let backends = v["backends"].as_array().unwrap();
    assert_eq!(backends.len(), 2);
    assert_eq!(backends[1]["addr"], "198.18.1.2");
    assert_eq!(backends[1]["table_entries"], 3);
    assert_eq!(
        backends[1]["counters"],
        json!({"packets": 10, "bytes": 640})
    );

    let (st, v) = s
        .call(
            "PATCH",
            &format!("{SVC}/backends/198.18.1.2/8080"),
            Some(r#"{"state":"draining"}"#),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["backends"][1]["state"], "draining");
    assert_eq!(v["backends"][1]["table_entries"], 0);

    let (st, v) = s
        .call("DELETE", &format!("{SVC}/backends/198.18.1.1/8080"), None)
        .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["backends"].as_array().unwrap().len(), 1);

    let (st, v) = s.call("GET", "/v1/stats", None).await;
    assert_eq!(st, 200);
    assert_eq!(v["services"][0]["port"], 80);

    let (st, v) = s.call("DELETE", SVC, None).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["vip"], "198.18.0.10");
    assert_eq!(s.call("GET", "/v1/services", None).await, (200, json!([])));
    assert!(s.ctl.lock().await.plane().live.is_empty());
    s.stop().await;
}

#[tokio::test]
async fn errors_are_api_errors() {
    let s = Server::start(MemPlane::default()).await;
    let create = r#"{"vip":"198.18.0.10","port":80,"proto":"tcp"}"#;
    assert_eq!(s.call("POST", "/v1/services", Some(create)).await.0, 201);

    let cases = [
        (
            "POST",
            "/v1/services".to_string(),
            Some(create),
            409,
            "already_exists",
            "already exists",
        ),
        (
            "POST",
            "/v1/services".into(),
            Some("{nope"),
            400,
            "invalid_argument",
            "invalid request body",
        ),
        (
            "POST",
            "/v1/services".into(),
            Some(r#"{"vip":"198.18.0.11","port":80,"proto":"tcp","color":"red"}"#),
            400,
            "invalid_argument",
            "unknown field `color`",
        ),
        (
            "POST",
            "/v1/services".into(),
            Some(r#"{"vip":"198.18.0.300","port":80,"proto":"tcp"}"#),
            400,
            "invalid_argument",
            "invalid IP address",
        ),
        (
            "POST",
            "/v1/services".into(),
            Some(r#"{"vip":"2001:db8::1","port":80,"proto":"tcp","snat_addr":"198.18.1.1"}"#),
            400,
            "invalid_argument",
            "it is IPv4 but VIP 2001:db8::1 is IPv6",
        ),
        (
            "GET",
            "/v1/services/tcp/198.18.0.99/80".into(),
            None,
            404,
            "not_found",
            "service tcp/198.18.0.99:80 not found",
        ),
        (
            "GET",
            "/v1/services/sctp/198.18.0.10/80".into(),
            None,
            400,
            "invalid_argument",
            "unknown protocol",
        ),
        (
            "GET",
            "/v1/services/tcp/198.18.0.10/http".into(),
            None,
            400,
            "invalid_argument",
            "invalid service port \"http\"",
        ),
        (
            "POST",
            format!("{SVC}/backends"),
            Some(r#"{"addr":"198.18.1.1","port":80,"weight":0}"#),
            400,
            "invalid_argument",
            "weight 0",
        ),
        (
            "PATCH",
            format!("{SVC}/backends/198.18.1.1/80"),
            Some("{}"),
            404,
            "not_found",
            "backend 198.18.1.1:80 of service tcp/198.18.0.10:80 not found",
        ),
        (
            "GET",
            "/v2/nothing".into(),
            None,
            404,
            "not_found",
            "no such endpoint",
        ),
        (
            "PUT",
            "/v1/services".into(),
            None,
            405,
            "invalid_argument",
            "not allowed",
        ),
    ];
    for (method, path, body, status, code, text) in cases {
        let got = s.call(method, &path, body).await;
        assert_error(&got, status, code, text);
    }
    s.stop().await;
}

/// Routes merged in from elsewhere, as main.rs merges `/v1/status` and the policy routes:
/// one answering with a body like the status route, one taking a JSON body, and handlers
/// answering errors that are not JSON.
fn merged_routes() -> Router {
    async fn status() -> Json<Value> {
        Json(json!({"ready": true}))
    }
    async fn put_text(ApiJson(v): ApiJson<Value>) -> Json<Value> {
        Json(v)
    }
    async fn plain_503() -> (StatusCode, &'static str) {
        (StatusCode::SERVICE_UNAVAILABLE, "module down\ntry later")
    }
    async fn empty_409() -> StatusCode {
        StatusCode::CONFLICT
    }
    Router::new()
        .route("/v1/status", get(status))
        .route("/v1/policy", get(status).put(put_text))
        .route("/test/plain", get(plain_503))
        .route("/test/empty", get(empty_409))
}

fn allow(headers: &hyper::HeaderMap) -> Vec<String> {
    let mut methods: Vec<String> = headers
        .get_all(header::ALLOW)
        .iter()
        .flat_map(|v| v.to_str().unwrap().split(','))
        .map(|m| m.trim().to_string())
        .collect();
    methods.sort();
    methods
}

#[tokio::test]
async fn wrong_methods_and_unknown_routes_are_api_errors() {
    let s = Server::start_with(MemPlane::default(), merged_routes()).await;
    assert_eq!(
        s.call("GET", "/v1/status", None).await,
        (200, json!({"ready": true}))
    );
    for (method, path, allowed) in [
        ("POST", "/v1/status", &["GET", "HEAD"][..]),
        ("DELETE", "/v1/policy", &["GET", "HEAD", "PUT"]),
        ("PUT", "/v1/services", &["GET", "HEAD", "POST"]),
        ("GET", "/v1/services/tcp/198.18.0.10/80/backends", &["POST"]),
        ("PATCH", SVC, &["DELETE", "GET", "HEAD"]),
    ] {
        let (status, headers, body) = s.call_bytes(method, path, Vec::new()).await;
        assert_error(
            &(status, body),
            405,
            "invalid_argument",
            &format!("method {method} not allowed on {path}"),
        );
        assert_eq!(allow(&headers), allowed, "{method} {path}");
    }
    for path in ["/v1/statuses", "/v2/status", "/", "/v1/services/tcp"] {
        let (status, _, body) = s.call_bytes("POST", path, Vec::new()).await;
        assert_error(
            &(status, body),
            404,
            "not_found",
            &format!("no such endpoint: POST {path}"),
        );
    }
    s.stop().await;
}

#[tokio::test]
async fn a_body_over_the_limit_is_413() {
    let s = Server::start_with(MemPlane::default(), merged_routes()).await;
    // Valid JSON, one byte too long: the size alone refuses it.
    let mut big = br#"{"vip":"198.18.0.10","port":80,"proto":"tcp","x":""#.to_vec();
    big.resize(MAX_BODY_BYTES - 2, b'a');
    big.extend_from_slice(br#""}"#);
    assert_eq!(big.len(), MAX_BODY_BYTES);
    // At the limit: read whole, then refused for what it says.
    let (status, _, body) = s.call_bytes("POST", "/v1/services", big.clone()).await;
    assert_error(
        &(status, body),
        400,
        "invalid_argument",
        "unknown field `x`",
    );
    big.insert(big.len() - 2, b'a');
    for (method, path) in [("POST", "/v1/services"), ("PUT", "/v1/policy")] {
        let (status, _, body) = s.call_bytes(method, path, big.clone()).await;
        assert_error(
            &(status, body),
            413,
            "invalid_argument",
            &format!("request body too large: the limit is {MAX_BODY_BYTES} bytes"),
        );
    }
    assert_eq!(s.call("GET", "/v1/services", None).await, (200, json!([])));
    s.stop().await;
}

#[tokio::test]
async fn error_answers_that_are_not_json_become_api_errors() {
    let s = Server::start_with(MemPlane::default(), merged_routes()).await;
    let (status, headers, body) = s.call_bytes("GET", "/test/plain", Vec::new()).await;
    assert_eq!(headers[header::CONTENT_TYPE], "application/json");
    assert_error(&(status, body), 503, "unavailable", "module down try later");
    let (status, _, body) = s.call_bytes("GET", "/test/empty", Vec::new()).await;
    assert_error(&(status, body), 409, "already_exists", "conflict");
    s.stop().await;
}

#[test]
fn status_codes_map_to_error_codes() {
    for (status, code) in [
        (400, ErrorCode::InvalidArgument),
        (404, ErrorCode::NotFound),
        (405, ErrorCode::InvalidArgument),
        (409, ErrorCode::AlreadyExists),
        (413, ErrorCode::InvalidArgument),
        (500, ErrorCode::Internal),
        (503, ErrorCode::Unavailable),
        (507, ErrorCode::CapacityExhausted),
    ] {
        assert_eq!(code_for_status(StatusCode::from_u16(status).unwrap()), code);
    }
}

#[tokio::test]
async fn dataplane_failure_is_500_and_changes_nothing() {
    let s = Server::start(MemPlane::default()).await;
    s.ctl.lock().await.plane.fail_all = true;
    let got = s
        .call(
            "POST",
            "/v1/services",
            Some(r#"{"vip":"198.18.0.10","port":80,"proto":"tcp"}"#),
        )
        .await;
    assert_error(
        &got,
        500,
        "dataplane_failure",
        "the previous state keeps serving",
    );
    assert_eq!(s.call("GET", "/v1/services", None).await, (200, json!([])));
    let saved: Value =
        serde_json::from_slice(&fs::read(s.dir.path().join("state/state.json")).unwrap()).unwrap();
    assert_eq!(saved["services"], json!([]));
    s.stop().await;
}

#[tokio::test]
async fn persistence_failure_is_500_and_rolled_back() {
    let s = Server::start(MemPlane::default()).await;
    // Root ignores permission bits: take the state directory away instead.
    fs::remove_dir_all(s.dir.path().join("state")).unwrap();
    let got = s
        .call(
            "POST",
            "/v1/services",
            Some(r#"{"vip":"198.18.0.10","port":80,"proto":"tcp"}"#),
        )
        .await;
    assert_error(&got, 500, "persistence_failure", "rolled back");
    assert_eq!(s.call("GET", "/v1/services", None).await, (200, json!([])));
    assert!(s.ctl.lock().await.plane().live.is_empty());
    s.stop().await;
}

#[tokio::test]
async fn bind_refuses_a_live_daemon_and_replaces_a_stale_socket() {
    let s = Server::start(MemPlane::default()).await;
    let mode = fs::metadata(&s.sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let e = bind(&s.sock).await.unwrap_err().to_string();
    assert!(e.contains("another datapathd is serving"), "{e}");
    assert_eq!(
        s.call("GET", "/healthz", None).await.0,
        200,
        "the live one still serves"
    );
    let dir = tempfile::tempdir().unwrap();
    let stale = dir.path().join("api.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    assert!(stale.exists());
    let _l = bind(&stale).await.unwrap();

    let file = dir.path().join("not-a-socket");
    fs::write(&file, "x").unwrap();
    let e = bind(&file).await.unwrap_err().to_string();
    assert!(e.contains("not a socket"), "{e}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_the_in_flight_request_finish() {
    let (entered_tx, entered_rx) = std::sync::mpsc::channel();
    let (release_tx, release_rx) = std::sync::mpsc::channel();
    let plane = MemPlane {
        stats_gate: Some((entered_tx, release_rx)),
        ..MemPlane::default()
    };
    let s = Server::start(plane).await;
    let sock = s.sock.clone();
    let pending = tokio::spawn(async move {
        let stream = UnixStream::connect(&sock).await.unwrap();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        let req = Request::builder()
            .uri("/v1/stats")
            .header("host", "localhost")
            .body(Full::new(Bytes::new()))
            .unwrap();
        sender.send_request(req).await.unwrap().status().as_u16()
    });
    // The request is inside the handler once the plane is asked for counters.
    tokio::task::spawn_blocking(move || entered_rx.recv().unwrap())
        .await
        .unwrap();
    let Server { stop, task, .. } = s;
    stop.unwrap().send(()).unwrap();
    release_tx.send(()).unwrap();
    assert_eq!(pending.await.unwrap(), 200);
    task.await.unwrap().unwrap();
}
