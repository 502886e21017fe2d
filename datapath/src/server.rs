//! The HTTP/JSON API over a Unix socket (routes and types: the `datapath-api` crate).
//!
//! Every request runs under one lock over the [`Controller`], so changes are serialized and a
//! reader never sees half of one. The work itself (map updates, fsync) blocks, so it runs on
//! tokio's blocking pool; a client that hangs up mid-request does not cut a change short.
use std::{
    collections::BTreeMap,
    fs::{self, DirBuilder, Permissions},
    future::Future,
    io,
    net::IpAddr,
    os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt},
    path::Path,
    sync::Arc,
};

use axum::{
    Json, Router,
    body::{Body, Bytes},
    extract::{DefaultBodyLimit, FromRequest, FromRequestParts, Request, State},
    http::{HeaderValue, Method, StatusCode, Uri, header, request::Parts},
    response::{IntoResponse, Response},
    routing::{get, patch},
};
use datapath_api::{
    AddBackend, ApiError, BackendKey, BackendView, CreateService, ErrorCode, Protocol, ServiceKey,
    ServiceSpec, ServiceView, StatsSnapshot, StatsView, UpdateBackend,
};
use serde::de::DeserializeOwned;
use tokio::{net::UnixListener, sync::Mutex};

use crate::{
    dataplane::Dataplane,
    error::{Error, Result},
    state::{ServicePlane, Store},
};

/// What the API reads from the dataplane besides programming it.
pub trait PlaneStats {
    /// Every counter, summed over CPUs.
    fn stats(&self) -> Result<StatsSnapshot>;
    /// Entries of service `service_id`'s live Maglev table, by backend id.
    fn table_entries(&self, service_id: u32) -> Result<BTreeMap<u32, u32>>;
}

impl PlaneStats for Dataplane {
    fn stats(&self) -> Result<StatsSnapshot> {
        Dataplane::stats(self)
    }

    fn table_entries(&self, service_id: u32) -> Result<BTreeMap<u32, u32>> {
        Dataplane::table_entries(self, service_id)
    }
}

/// A dataplane the API can drive: [`Dataplane`] in the daemon.
pub trait Plane: ServicePlane + PlaneStats + Send + 'static {}
impl<T: ServicePlane + PlaneStats + Send + 'static> Plane for T {}

/// The desired-state store and the dataplane it programs, changed only together.
pub struct Controller<P> {
    store: Store,
    plane: P,
}

/// The controller as the API server shares it.
pub type SharedController<P> = Arc<Mutex<Controller<P>>>;

impl<P: Plane> Controller<P> {
    pub fn new(store: Store, plane: P) -> Self {
        Self { store, plane }
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn plane(&self) -> &P {
        &self.plane
    }

    /// The desired state and the dataplane, the latter mutably (module start, reloads).
    pub fn parts_mut(&mut self) -> (&Store, &mut P) {
        (&self.store, &mut self.plane)
    }

    pub fn into_parts(self) -> (Store, P) {
        (self.store, self.plane)
    }

    /// Every service, with live counters and table shares.
    pub fn list(&self) -> Result<Vec<ServiceView>> {
        let stats = self.plane.stats()?;
        self.store
            .state()
            .services
            .values()
            .map(|s| self.view(s, &stats))
            .collect()
    }

    pub fn show(&self, key: &ServiceKey) -> Result<ServiceView> {
        let spec = self.store.service(key)?;
        self.view(spec, &self.plane.stats()?)
    }

    pub fn stats(&self) -> Result<StatsView> {
        let stats = self.plane.stats()?;
        let services = self
            .store
            .state()
            .services
            .values()
            .map(|s| self.view(s, &stats))
            .collect::<Result<_>>()?;
        Ok(StatsView {
            services,
            reasons: stats.reasons,
        })
    }

    pub fn create_service(&mut self, req: &CreateService) -> Result<ServiceView> {
        let spec = self.store.create_service(&mut self.plane, req)?;
        Ok(self.view_after_change(&spec))
    }

    /// Removes a service; the view is its last reading before removal.
    pub fn delete_service(&mut self, key: &ServiceKey) -> Result<ServiceView> {
        let view = self.view_after_change(self.store.service(key)?);
        self.store.delete_service(&mut self.plane, key)?;
        Ok(view)
    }

    pub fn add_backend(&mut self, key: &ServiceKey, req: &AddBackend) -> Result<ServiceView> {
        let spec = self.store.add_backend(&mut self.plane, key, req)?;
        Ok(self.view_after_change(&spec))
    }

    pub fn remove_backend(
        &mut self,
        key: &ServiceKey,
        backend: &BackendKey,
    ) -> Result<ServiceView> {
        let spec = self.store.remove_backend(&mut self.plane, key, backend)?;
        Ok(self.view_after_change(&spec))
    }

    pub fn update_backend(
        &mut self,
        key: &ServiceKey,
        backend: &BackendKey,
        req: &UpdateBackend,
    ) -> Result<ServiceView> {
        let spec = self
            .store
            .update_backend(&mut self.plane, key, backend, req)?;
        Ok(self.view_after_change(&spec))
    }

    fn view(&self, spec: &ServiceSpec, stats: &StatsSnapshot) -> Result<ServiceView> {
        let entries = self.plane.table_entries(spec.id)?;
        Ok(make_view(spec, stats, &entries))
    }

    /// The view answering a change that has already happened: failing to read counters must
    /// not turn that answer into an error, so they read as zero (with a warning) instead.
    fn view_after_change(&self, spec: &ServiceSpec) -> ServiceView {
        let stats = self.plane.stats().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "cannot read the datapath counters");
            StatsSnapshot::default()
        });
        let entries = self.plane.table_entries(spec.id).unwrap_or_else(|e| {
            tracing::warn!(service = %spec.key, error = %e, "cannot read the Maglev table");
            BTreeMap::new()
        });
        make_view(spec, &stats, &entries)
    }
}

fn make_view(
    spec: &ServiceSpec,
    stats: &StatsSnapshot,
    entries: &BTreeMap<u32, u32>,
) -> ServiceView {
    ServiceView {
        vip: spec.key.vip,
        port: spec.key.port,
        proto: spec.key.proto,
        mode: spec.mode,
        snat_addr: spec.snat_addr,
        id: spec.id,
        backends: spec
            .backends
            .iter()
            .map(|b| BackendView {
                addr: b.addr,
                port: b.port,
                weight: b.weight,
                state: b.state,
                id: b.id,
                table_entries: entries.get(&b.id).copied().unwrap_or(0),
                counters: stats.backends.get(&b.id).copied().unwrap_or_default(),
            })
            .collect(),
        counters: stats.services.get(&spec.id).copied().unwrap_or_default(),
    }
}

/// An error answer: the status and the [`ApiError`] body.
#[derive(Debug)]
pub struct ApiFailure {
    status: StatusCode,
    body: ApiError,
}

impl ApiFailure {
    fn new(code: ErrorCode, error: impl Into<String>) -> Self {
        Self {
            status: StatusCode::from_u16(code.http_status())
                .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            body: ApiError {
                code,
                error: error.into(),
            },
        }
    }

    fn invalid(error: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidArgument, error)
    }
}

impl From<Error> for ApiFailure {
    fn from(e: Error) -> Self {
        let (code, message) = match e.root() {
            Error::InvalidArgument(_) => (ErrorCode::InvalidArgument, e.to_string()),
            Error::NotFound(_) => (ErrorCode::NotFound, e.to_string()),
            Error::Unavailable(_) => (ErrorCode::Unavailable, e.to_string()),
            Error::AlreadyExists(_) => (ErrorCode::AlreadyExists, e.to_string()),
            Error::CapacityExhausted(_) => (ErrorCode::CapacityExhausted, e.to_string()),
            Error::Program { .. } | Error::Load { .. } | Error::Map { .. } | Error::Pin { .. } => (
                ErrorCode::DataplaneFailure,
                format!("{e}; nothing changed, the previous state keeps serving"),
            ),
            Error::Persistence { .. } => (
                ErrorCode::PersistenceFailure,
                format!("{e}; the change was rolled back"),
            ),
            Error::CorruptState { .. } | Error::Io { .. } | Error::Internal(_) => {
                (ErrorCode::Internal, e.to_string())
            }
            Error::Context { .. } => unreachable!("root() is never a Context"),
            Error::Config { .. } | Error::Policy { .. } => {
                (ErrorCode::InvalidArgument, e.to_string())
            }
        };
        if code.http_status() >= 500 {
            tracing::error!(error = %message, "request failed");
        }
        Self::new(code, message)
    }
}

impl IntoResponse for ApiFailure {
    fn into_response(self) -> Response {
        (self.status, Json(self.body)).into_response()
    }
}

/// A JSON body whose rejections are [`ApiFailure`]s: bad JSON, unknown fields and invalid
/// values answer 400 `invalid_argument` with serde's one-line reason. No content type is
/// required.
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiFailure;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                too_large()
            } else {
                ApiFailure::invalid(format!("cannot read request body: {}", e.body_text()))
            }
        })?;
        serde_json::from_slice(&bytes)
            .map(ApiJson)
            .map_err(|e| ApiFailure::invalid(format!("invalid request body: {e}")))
    }
}

/// `{proto}/{vip}/{port}` of a service path.
struct ServicePath(ServiceKey);

/// A service path followed by `backends/{addr}/{backend_port}`.
struct BackendPath(ServiceKey, BackendKey);

async fn path_params<S: Send + Sync>(
    parts: &mut Parts,
    state: &S,
) -> Result<BTreeMap<String, String>, ApiFailure> {
    axum::extract::Path::<BTreeMap<String, String>>::from_request_parts(parts, state)
        .await
        .map(|p| p.0)
        .map_err(|e| ApiFailure::invalid(format!("invalid path: {}", e.body_text())))
}

fn param<'a>(params: &'a BTreeMap<String, String>, name: &str) -> Result<&'a str, ApiFailure> {
    params
        .get(name)
        .map(String::as_str)
        .ok_or_else(|| ApiFailure::new(ErrorCode::Internal, format!("route lacks {{{name}}}")))
}

fn parse_service(params: &BTreeMap<String, String>) -> Result<ServiceKey, ApiFailure> {
    let proto: Protocol = param(params, "proto")?
        .parse()
        .map_err(ApiFailure::invalid)?;
    let vip = parse_addr("VIP", param(params, "vip")?)?;
    let port = parse_port("service port", param(params, "port")?)?;
    Ok(ServiceKey { vip, port, proto })
}

fn parse_addr(what: &str, s: &str) -> Result<IpAddr, ApiFailure> {
    s.parse()
        .map_err(|e| ApiFailure::invalid(format!("invalid {what} {s:?} in path: {e}")))
}

fn parse_port(what: &str, s: &str) -> Result<u16, ApiFailure> {
    s.parse().map_err(|_| {
        ApiFailure::invalid(format!(
            "invalid {what} {s:?} in path: expected a number from 1 to 65535"
        ))
    })
}

impl<S: Send + Sync> FromRequestParts<S> for ServicePath {
    type Rejection = ApiFailure;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let params = path_params(parts, state).await?;
        Ok(Self(parse_service(&params)?))
    }
}

impl<S: Send + Sync> FromRequestParts<S> for BackendPath {
    type Rejection = ApiFailure;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let params = path_params(parts, state).await?;
        let service = parse_service(&params)?;
        let addr = parse_addr("backend address", param(&params, "addr")?)?;
        let port = parse_port("backend port", param(&params, "backend_port")?)?;
        Ok(Self(service, BackendKey { addr, port }))
    }
}

/// Runs `f` under the controller lock on the blocking pool.
async fn locked<P, T, F>(ctl: &SharedController<P>, f: F) -> Result<T, ApiFailure>
where
    P: Plane,
    T: Send + 'static,
    F: FnOnce(&mut Controller<P>) -> Result<T> + Send + 'static,
{
    let mut guard = ctl.clone().lock_owned().await;
    tokio::task::spawn_blocking(move || f(&mut guard))
        .await
        .map_err(|e| ApiFailure::new(ErrorCode::Internal, format!("request handler failed: {e}")))?
        .map_err(ApiFailure::from)
}

type Answer<T> = Result<Json<T>, ApiFailure>;
type Created<T> = Result<(StatusCode, Json<T>), ApiFailure>;

async fn list_services<P: Plane>(
    State(ctl): State<SharedController<P>>,
) -> Answer<Vec<ServiceView>> {
    locked(&ctl, |c| c.list()).await.map(Json)
}

async fn create_service<P: Plane>(
    State(ctl): State<SharedController<P>>,
    ApiJson(req): ApiJson<CreateService>,
) -> Created<ServiceView> {
    let view = locked(&ctl, move |c| c.create_service(&req)).await?;
    Ok((StatusCode::CREATED, Json(view)))
}

async fn show_service<P: Plane>(
    State(ctl): State<SharedController<P>>,
    ServicePath(key): ServicePath,
) -> Answer<ServiceView> {
    locked(&ctl, move |c| c.show(&key)).await.map(Json)
}

async fn delete_service<P: Plane>(
    State(ctl): State<SharedController<P>>,
    ServicePath(key): ServicePath,
) -> Answer<ServiceView> {
    locked(&ctl, move |c| c.delete_service(&key))
        .await
        .map(Json)
}

async fn add_backend<P: Plane>(
    State(ctl): State<SharedController<P>>,
    ServicePath(key): ServicePath,
    ApiJson(req): ApiJson<AddBackend>,
) -> Created<ServiceView> {
    let view = locked(&ctl, move |c| c.add_backend(&key, &req)).await?;
    Ok((StatusCode::CREATED, Json(view)))
}

async fn update_backend<P: Plane>(
    State(ctl): State<SharedController<P>>,
    BackendPath(key, backend): BackendPath,
    ApiJson(req): ApiJson<UpdateBackend>,
) -> Answer<ServiceView> {
    locked(&ctl, move |c| c.update_backend(&key, &backend, &req))
        .await
        .map(Json)
}

async fn remove_backend<P: Plane>(
    State(ctl): State<SharedController<P>>,
    BackendPath(key, backend): BackendPath,
) -> Answer<ServiceView> {
    locked(&ctl, move |c| c.remove_backend(&key, &backend))
        .await
        .map(Json)
}

async fn stats<P: Plane>(State(ctl): State<SharedController<P>>) -> Answer<StatsView> {
    locked(&ctl, |c| c.stats()).await.map(Json)
}

async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "ok" }))
}

async fn no_route(method: Method, uri: Uri) -> ApiFailure {
    ApiFailure::new(
        ErrorCode::NotFound,
        format!("no such endpoint: {method} {}", uri.path()),
    )
}

/// 405, with the route's methods in the `Allow` header (set by axum).
async fn wrong_method(method: Method, uri: Uri) -> ApiFailure {
    let mut f = ApiFailure::invalid(format!("method {method} not allowed on {}", uri.path()));
    f.status = StatusCode::METHOD_NOT_ALLOWED;
    f
}

/// The most a request body may hold; a larger one answers 413.
pub const MAX_BODY_BYTES: usize = 2 * 1024 * 1024;

fn too_large() -> ApiFailure {
    let mut f = ApiFailure::invalid(format!(
        "request body too large: the limit is {MAX_BODY_BYTES} bytes"
    ));
    f.status = StatusCode::PAYLOAD_TOO_LARGE;
    f
}

/// The [`ErrorCode`] of an error answer that did not come with one.
fn code_for_status(status: StatusCode) -> ErrorCode {
    match status.as_u16() {
        404 => ErrorCode::NotFound,
        409 => ErrorCode::AlreadyExists,
        507 => ErrorCode::CapacityExhausted,
        503 => ErrorCode::Unavailable,
        400..=499 => ErrorCode::InvalidArgument,
        _ => ErrorCode::Internal,
    }
}

/// Turns an error answer that is not JSON (axum's own rejections and fallbacks, a handler
/// answering plain text) into an [`ApiError`] with the same status and headers (`Allow`
/// included): its text on one line, or the status's reason when it had none.
async fn json_errors(res: Response) -> Response {
    let is_json = res
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if res.status().as_u16() < 400 || is_json {
        return res;
    }
    let (mut parts, body) = res.into_parts();
    let text = axum::body::to_bytes(body, 64 * 1024)
        .await
        .map(|b| {
            String::from_utf8_lossy(&b)
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default();
    let error = if text.is_empty() {
        parts
            .status
            .canonical_reason()
            .unwrap_or("error")
            .to_ascii_lowercase()
    } else {
        text
    };
    let body = ApiError {
        code: code_for_status(parts.status),
        error,
    };
    let bytes = serde_json::to_vec(&body).unwrap_or_default();
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Response::from_parts(parts, Body::from(bytes))
}

/// The API's error conventions over a whole router, also over routes merged in from elsewhere
/// (status, policy): 404 and 405 (with `Allow`) as [`ApiError`]s, bodies limited to
/// [`MAX_BODY_BYTES`] (413), and any other error answer that is not JSON made one.
pub fn with_api_errors(router: Router) -> Router {
    router
        .fallback(no_route)
        .method_not_allowed_fallback(wrong_method)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::map_response(json_errors))
}

/// The API's routes (see the `datapath-api` crate's route table).
pub fn router<P: Plane>(ctl: SharedController<P>) -> Router {
    const SERVICE: &str = "/v1/services/{proto}/{vip}/{port}";
    Router::new()
        .route(
            "/v1/services",
            get(list_services::<P>).post(create_service::<P>),
        )
        .route(SERVICE, get(show_service::<P>).delete(delete_service::<P>))
        .route(
            &format!("{SERVICE}/backends"),
            axum::routing::post(add_backend::<P>),
        )
        .route(
            &format!("{SERVICE}/backends/{{addr}}/{{backend_port}}"),
            patch(update_backend::<P>).delete(remove_backend::<P>),
        )
        .route("/v1/stats", get(stats::<P>))
        .route("/healthz", get(healthz))
        .fallback(no_route)
        .method_not_allowed_fallback(wrong_method)
        .with_state(ctl)
}

/// Listens on the Unix socket `path`: creates its directory (0755) if missing, refuses to
/// start if a live daemon answers there, replaces a stale socket, and makes the new socket
/// usable by root only (0600).
pub async fn bind(path: &Path) -> Result<UnixListener> {
    let context = || format!("cannot listen on {}", path.display());
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)
            .map_err(|e| Error::io(context(), e))?;
    }
    match fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => {
            return Err(Error::io(
                context(),
                io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    "the path exists and is not a socket; refusing to replace it",
                ),
            ));
        }
        Ok(_) => match tokio::net::UnixStream::connect(path).await {
            Ok(_) => {
                return Err(Error::io(
                    context(),
                    io::Error::new(
                        io::ErrorKind::AddrInUse,
                        "another datapathd is serving on this socket",
                    ),
                ));
            }
            // Nobody listens: a socket left behind by a daemon that died.
            Err(_) => fs::remove_file(path).map_err(|e| Error::io(context(), e))?,
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io(context(), e)),
    }
    // Until the chmod below the socket carries the umask's mode; connecting needs write
    // permission, which the usual umask (022) already withholds from others.
    let listener = UnixListener::bind(path).map_err(|e| Error::io(context(), e))?;
    fs::set_permissions(path, Permissions::from_mode(0o600))
        .map_err(|e| Error::io(context(), e))?;
    Ok(listener)
}

/// Like [`serve`], with a router built by the caller (the API's routes plus others); the
/// API's error conventions ([`with_api_errors`]) apply to all of it.
pub async fn serve_router(
    listener: UnixListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    axum::serve(listener, with_api_errors(router))
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(|e| Error::io("serving the API", e))
}

/// Serves the API on `listener` until `shutdown` completes, then stops accepting, lets
/// in-flight requests finish and returns.
pub async fn serve<P: Plane>(
    listener: UnixListener,
    ctl: SharedController<P>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    serve_router(listener, router(ctl), shutdown).await
}

#[cfg(test)]
mod tests {
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

        fn table_entries(&self, service_id: u32) -> Result<BTreeMap<u32, u32>> {
            Ok(self.entries(service_id))
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
                Some(r#"{"vip":"2001:db8::1","port":80,"proto":"tcp"}"#),
                400,
                "invalid_argument",
                "IPv6 VIPs are not supported yet",
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
            serde_json::from_slice(&fs::read(s.dir.path().join("state/state.json")).unwrap())
                .unwrap();
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
}
