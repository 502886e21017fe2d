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
    /// The counters of `service` and its backends (and the reasons); a plane with many
    /// services reads only these.
    fn service_stats(&self, _service: &ServiceSpec) -> Result<StatsSnapshot> {
        self.stats()
    }
    /// Entries of `service`'s live Maglev table, by backend id.
    fn table_entries(&self, service: &ServiceSpec) -> Result<BTreeMap<u32, u32>>;
}

impl PlaneStats for Dataplane {
    fn stats(&self) -> Result<StatsSnapshot> {
        Dataplane::stats(self)
    }

    fn service_stats(&self, service: &ServiceSpec) -> Result<StatsSnapshot> {
        Dataplane::service_stats(self, service)
    }

    fn table_entries(&self, service: &ServiceSpec) -> Result<BTreeMap<u32, u32>> {
        Dataplane::table_entries(self, service)
    }
}

/// A dataplane the API can drive: [`Dataplane`] in the daemon.
pub trait Plane: ServicePlane + PlaneStats + Send + 'static {}
impl<T: ServicePlane + PlaneStats + Send + 'static> Plane for T {}

/// The desired-state store and the dataplane it programs, changed only together.
pub struct Controller<P> {
    store: Store,
    plane: P,
    neighbour_of: Option<NeighbourLookup>,
}

/// The kernel's neighbour state (NUD name) of the entry a backend's packets need, as the
/// netlink controller learned it; `None` when unknown.
pub type NeighbourLookup = Arc<dyn Fn(IpAddr) -> Option<String> + Send + Sync>;

/// The controller as the API server shares it.
pub type SharedController<P> = Arc<Mutex<Controller<P>>>;

impl<P: Plane> Controller<P> {
    pub fn new(store: Store, plane: P) -> Self {
        Self {
            store,
            plane,
            neighbour_of: None,
        }
    }

    /// Views then carry each backend's neighbour state (with the netlink controller on).
    pub fn set_neighbour_lookup(&mut self, lookup: NeighbourLookup) {
        self.neighbour_of = Some(lookup);
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
        self.view(spec, &self.plane.service_stats(spec)?)
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
            syn_flood: Some(stats.syn_flood),
        })
    }

    pub fn create_service(&mut self, req: &CreateService) -> Result<ServiceView> {
        let spec = self.store.create_service(&mut self.plane, req)?;
        Ok(self.view_after_change(&spec))
    }

    /// Removes a service; the view is its last reading before removal. `force`: even one
    /// another source owns (the API's changes are refused there otherwise).
    pub fn delete_service(&mut self, key: &ServiceKey, force: bool) -> Result<ServiceView> {
        let view = self.view_after_change(self.store.service(key)?);
        self.store.check_api_may_change(key, force)?;
        self.store.delete_service(&mut self.plane, key)?;
        Ok(view)
    }

    pub fn add_backend(
        &mut self,
        key: &ServiceKey,
        req: &AddBackend,
        force: bool,
    ) -> Result<ServiceView> {
        self.store.service(key)?;
        self.store.check_api_may_change(key, force)?;
        let spec = self.store.add_backend(&mut self.plane, key, req)?;
        Ok(self.view_after_change(&spec))
    }

    pub fn remove_backend(
        &mut self,
        key: &ServiceKey,
        backend: &BackendKey,
        force: bool,
    ) -> Result<ServiceView> {
        self.store.service(key)?;
        self.store.check_api_may_change(key, force)?;
        let spec = self.store.remove_backend(&mut self.plane, key, backend)?;
        Ok(self.view_after_change(&spec))
    }

    pub fn update_backend(
        &mut self,
        key: &ServiceKey,
        backend: &BackendKey,
        req: &UpdateBackend,
        force: bool,
    ) -> Result<ServiceView> {
        self.store.service(key)?;
        self.store.check_api_may_change(key, force)?;
        let spec = self
            .store
            .update_backend(&mut self.plane, key, backend, req)?;
        Ok(self.view_after_change(&spec))
    }

    /// Writes the state file if a source's deferred batch left it behind.
    pub fn flush(&mut self) -> Result<()> {
        self.store.flush()
    }

    /// See [`Store::take_unsaved`].
    pub fn take_unsaved(&mut self) -> Option<crate::lb::store::PendingWrite> {
        self.store.take_unsaved()
    }

    /// See [`Store::mark_unsaved`].
    pub fn mark_unsaved(&mut self) {
        self.store.mark_unsaved()
    }

    /// Makes the services of `source` exactly `declared` (see [`Store::replace_source`]).
    pub fn replace_source(
        &mut self,
        source: datapath_api::ServiceSource,
        scope: Option<&std::collections::BTreeSet<String>>,
        declared: Vec<datapath_api::DeclaredService>,
        durability: crate::lb::store::Durability,
    ) -> Result<crate::lb::store::SourceReport> {
        self.store
            .replace_source(&mut self.plane, source, scope, declared, durability)
    }

    fn view(&self, spec: &ServiceSpec, stats: &StatsSnapshot) -> Result<ServiceView> {
        let entries = self.plane.table_entries(spec)?;
        Ok(make_view(spec, stats, &entries, self.neighbour_of.as_ref()))
    }

    /// The view answering a change that has already happened: failing to read counters must
    /// not turn that answer into an error, so they read as zero (with a warning) instead.
    fn view_after_change(&self, spec: &ServiceSpec) -> ServiceView {
        let stats = self.plane.service_stats(spec).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "cannot read the datapath counters");
            StatsSnapshot::default()
        });
        let entries = self.plane.table_entries(spec).unwrap_or_else(|e| {
            tracing::warn!(service = %spec.key, error = %e, "cannot read the Maglev table");
            BTreeMap::new()
        });
        make_view(spec, &stats, &entries, self.neighbour_of.as_ref())
    }
}

fn make_view(
    spec: &ServiceSpec,
    stats: &StatsSnapshot,
    entries: &BTreeMap<u32, u32>,
    neighbour_of: Option<&NeighbourLookup>,
) -> ServiceView {
    ServiceView {
        vip: spec.key.vip,
        port: spec.key.port,
        proto: spec.key.proto,
        mode: spec.mode,
        source: spec.source,
        owner: spec.owner.clone(),
        source_ranges: spec.source_ranges.clone(),
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
                neighbour: neighbour_of.and_then(|f| f(b.addr)),
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
            Error::OwnedByOtherSource(_) => (ErrorCode::OwnedByOtherSource, e.to_string()),
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
            Error::Config { .. } | Error::Policy { .. } | Error::ServicesFile { .. } => {
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

/// `?force=true` on a change: even of a service another source owns.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForceQuery {
    #[serde(default)]
    force: bool,
}

/// The query of a change; a malformed one is a 400 `invalid_argument` like a bad body.
pub struct Force(bool);

impl<S: Send + Sync> FromRequestParts<S> for Force {
    type Rejection = ApiFailure;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let q = axum::extract::Query::<ForceQuery>::try_from_uri(&parts.uri).map_err(|e| {
            ApiFailure::invalid(format!(
                "invalid query {:?}: {}",
                parts.uri.query().unwrap_or(""),
                e.body_text()
            ))
        })?;
        Ok(Self(q.0.force))
    }
}

async fn delete_service<P: Plane>(
    State(ctl): State<SharedController<P>>,
    ServicePath(key): ServicePath,
    Force(force): Force,
) -> Answer<ServiceView> {
    locked(&ctl, move |c| c.delete_service(&key, force))
        .await
        .map(Json)
}

async fn add_backend<P: Plane>(
    State(ctl): State<SharedController<P>>,
    ServicePath(key): ServicePath,
    Force(force): Force,
    ApiJson(req): ApiJson<AddBackend>,
) -> Created<ServiceView> {
    let view = locked(&ctl, move |c| c.add_backend(&key, &req, force)).await?;
    Ok((StatusCode::CREATED, Json(view)))
}

async fn update_backend<P: Plane>(
    State(ctl): State<SharedController<P>>,
    BackendPath(key, backend): BackendPath,
    Force(force): Force,
    ApiJson(req): ApiJson<UpdateBackend>,
) -> Answer<ServiceView> {
    locked(&ctl, move |c| c.update_backend(&key, &backend, &req, force))
        .await
        .map(Json)
}

async fn remove_backend<P: Plane>(
    State(ctl): State<SharedController<P>>,
    BackendPath(key, backend): BackendPath,
    Force(force): Force,
) -> Answer<ServiceView> {
    locked(&ctl, move |c| c.remove_backend(&key, &backend, force))
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
mod tests;

/// A controller's GET route answering `answer()` as JSON, computed on the blocking pool (it
/// reads maps); a failed task answers the default.
pub fn get_blocking<T, F>(answer: F) -> axum::routing::MethodRouter
where
    T: serde::Serialize + Default + Send + 'static,
    F: Fn() -> T + Clone + Send + Sync + 'static,
{
    get(move || {
        let answer = answer.clone();
        async move {
            Json(
                tokio::task::spawn_blocking(answer)
                    .await
                    .unwrap_or_default(),
            )
        }
    })
}

/// A controller's GET route with a typed query, answered by `answer(query)` on the blocking
/// pool. A query that does not parse is a 400 `invalid_argument`, as an error of `answer`
/// is its own status.
pub fn get_query_blocking<Q, T, F>(answer: F) -> axum::routing::MethodRouter
where
    Q: DeserializeOwned + Send + 'static,
    T: serde::Serialize + Send + 'static,
    F: Fn(Q) -> Result<T> + Clone + Send + Sync + 'static,
{
    get(
        move |q: std::result::Result<
            axum::extract::Query<Q>,
            axum::extract::rejection::QueryRejection,
        >| {
            let answer = answer.clone();
            async move {
                let q = match q {
                    Ok(axum::extract::Query(q)) => q,
                    Err(e) => {
                        return ApiFailure::from(Error::InvalidArgument(format!(
                            "invalid query: {}",
                            e.body_text()
                        )))
                        .into_response();
                    }
                };
                match tokio::task::spawn_blocking(move || answer(q)).await {
                    Ok(Ok(v)) => Json(v).into_response(),
                    Ok(Err(e)) => ApiFailure::from(e).into_response(),
                    Err(e) => ApiFailure::from(Error::Internal(format!("task failed: {e}")))
                        .into_response(),
                }
            }
        },
    )
}
