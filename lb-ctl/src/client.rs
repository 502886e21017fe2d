//! A client of datapathd's API: one HTTP/1.1 request per connection over the Unix socket.
use std::{
    io,
    path::{Path, PathBuf},
    time::Duration,
};

use datapath_api::{
    AddBackend, ApiError, ApplyPolicy, BackendKey, CreateService, CtFilter, CtFlow, CtStats,
    FlowEventView, FlowsQuery, FlushAnswer, PolicyStatus, Route, ServiceKey, ServiceView,
    StatsView, StatusView, UpdateBackend,
    routes::{self, Body, ChangeQuery, Encoding, NoBody, NoQuery},
};
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, body::Bytes};
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;

use crate::error::{Error, Result};

/// How long to wait for an answer. Changes are a few map updates and an fsync; a daemon that
/// takes longer is stuck, and a script is better told so than left hanging.
pub const TIMEOUT: Duration = Duration::from_secs(30);

pub struct Client {
    socket: PathBuf,
}

fn method<R: Route>() -> Method {
    match R::METHOD {
        routes::Method::Get => Method::GET,
        routes::Method::Post => Method::POST,
        routes::Method::Put => Method::PUT,
        routes::Method::Patch => Method::PATCH,
        routes::Method::Delete => Method::DELETE,
    }
}

impl Client {
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Self {
            socket: socket.into(),
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub async fn status(&self) -> Result<StatusView> {
        self.send::<routes::GetStatus>(&(), &NoQuery, &NoBody).await
    }

    pub async fn node(&self) -> Result<datapath_api::NodeView> {
        self.send::<routes::GetNode>(&(), &NoQuery, &NoBody).await
    }

    pub async fn sources(&self) -> Result<datapath_api::SourcesView> {
        self.send::<routes::GetSources>(&(), &NoQuery, &NoBody)
            .await
    }

    pub async fn socklb(&self) -> Result<datapath_api::SockLbStatus> {
        self.send::<routes::GetSockLb>(&(), &NoQuery, &NoBody).await
    }

    pub async fn processes(
        &self,
        q: &datapath_api::ProcQuery,
    ) -> Result<Vec<datapath_api::ProcessView>> {
        self.send::<routes::ListProcesses>(&(), q, &NoBody).await
    }

    pub async fn proc_rules(&self) -> Result<datapath_api::ProcRulesView> {
        self.send::<routes::GetProcRules>(&(), &NoQuery, &NoBody)
            .await
    }

    /// Follows the exec module's events: calls `on_line` with each line of the stream (one
    /// [`datapath_api::ProcEventView`]) as it arrives, until the daemon ends it.
    pub async fn follow_proc(
        &self,
        q: &datapath_api::ProcEventsQuery,
        on_line: impl FnMut(&str) -> Result<()>,
    ) -> Result<()> {
        self.stream::<routes::FollowProc>(&(), q, on_line).await
    }

    pub async fn proc_status(&self) -> Result<datapath_api::ProcStatus> {
        self.send::<routes::GetProcStatus>(&(), &NoQuery, &NoBody)
            .await
    }

    pub async fn graph(&self, q: &datapath_api::GraphQuery) -> Result<datapath_api::GraphView> {
        self.send::<routes::GetGraph>(&(), q, &NoBody).await
    }

    pub async fn dns(&self) -> Result<datapath_api::DnsStatus> {
        self.send::<routes::GetDns>(&(), &NoQuery, &NoBody).await
    }

    pub async fn dns_names(
        &self,
        q: &datapath_api::DnsNamesQuery,
    ) -> Result<Vec<datapath_api::DnsEntryView>> {
        self.send::<routes::ListDnsNames>(&(), q, &NoBody).await
    }

    pub async fn list_services(&self) -> Result<Vec<ServiceView>> {
        self.send::<routes::ListServices>(&(), &NoQuery, &NoBody)
            .await
    }

    pub async fn show_service(&self, key: &ServiceKey) -> Result<ServiceView> {
        self.send::<routes::GetService>(key, &NoQuery, &NoBody)
            .await
    }

    pub async fn create_service(&self, req: &CreateService) -> Result<ServiceView> {
        self.send::<routes::PostService>(&(), &NoQuery, req).await
    }

    pub async fn delete_service(&self, key: &ServiceKey, force: bool) -> Result<ServiceView> {
        self.send::<routes::DeleteService>(key, &ChangeQuery { force }, &NoBody)
            .await
    }

    pub async fn add_backend(
        &self,
        key: &ServiceKey,
        req: &AddBackend,
        force: bool,
    ) -> Result<ServiceView> {
        self.send::<routes::PostBackend>(key, &ChangeQuery { force }, req)
            .await
    }

    pub async fn update_backend(
        &self,
        key: &ServiceKey,
        backend: &BackendKey,
        req: &UpdateBackend,
        force: bool,
    ) -> Result<ServiceView> {
        self.send::<routes::PatchBackend>(&(*key, *backend), &ChangeQuery { force }, req)
            .await
    }

    pub async fn remove_backend(
        &self,
        key: &ServiceKey,
        backend: &BackendKey,
        force: bool,
    ) -> Result<ServiceView> {
        self.send::<routes::DeleteBackend>(&(*key, *backend), &ChangeQuery { force }, &NoBody)
            .await
    }

    pub async fn stats(&self) -> Result<StatsView> {
        self.send::<routes::GetStats>(&(), &NoQuery, &NoBody).await
    }

    pub async fn policy(&self) -> Result<PolicyStatus> {
        self.send::<routes::GetPolicy>(&(), &NoQuery, &NoBody).await
    }

    pub async fn apply_policy(&self, req: &ApplyPolicy) -> Result<PolicyStatus> {
        self.send::<routes::PutPolicy>(&(), &NoQuery, req).await
    }

    pub async fn delete_policy(&self) -> Result<PolicyStatus> {
        self.send::<routes::DeletePolicy>(&(), &NoQuery, &NoBody)
            .await
    }

    pub async fn conntrack(&self, filter: &CtFilter) -> Result<Vec<CtFlow>> {
        self.send::<routes::ListConntrack>(&(), filter, &NoBody)
            .await
    }

    pub async fn flush_conntrack(&self, filter: &CtFilter) -> Result<FlushAnswer> {
        self.send::<routes::FlushConntrack>(&(), filter, &NoBody)
            .await
    }

    pub async fn conntrack_stats(&self) -> Result<CtStats> {
        self.send::<routes::GetConntrackStats>(&(), &NoQuery, &NoBody)
            .await
    }

    pub async fn flows(&self) -> Result<Vec<FlowEventView>> {
        self.send::<routes::GetFlows>(&(), &FlowsQuery::default(), &NoBody)
            .await
    }

    /// Follows the flow events: calls `on_line` with each line of the stream (one
    /// [`FlowEventView`]) as it arrives, until the daemon ends it.
    pub async fn follow_flows(
        &self,
        count: Option<u64>,
        timeout_seconds: Option<u64>,
        on_line: impl FnMut(&str) -> Result<()>,
    ) -> Result<()> {
        self.stream::<routes::FollowFlows>(
            &(),
            &FlowsQuery::follow(count, timeout_seconds),
            on_line,
        )
        .await
    }

    async fn connect(&self) -> Result<UnixStream> {
        UnixStream::connect(&self.socket).await.map_err(|source| {
            let hint = match source.kind() {
                io::ErrorKind::PermissionDenied => "the API socket is root's: run lb-ctl as root",
                _ => "is datapathd running?",
            };
            Error::Unreachable {
                socket: self.socket.clone(),
                source,
                hint,
            }
        })
    }

    /// Sends route `R`'s request and decodes its answer: the `R::Answer` of a 2xx, or the
    /// [`ApiError`] of any other status.
    pub async fn send<R: Route>(
        &self,
        params: &R::Params,
        query: &R::Query,
        body: &R::Request,
    ) -> Result<R::Answer> {
        debug_assert_eq!(
            R::ENCODING,
            Encoding::Json,
            "{} streams: use stream",
            R::NAME
        );
        let method = method::<R>();
        let path = R::uri(params, query);
        let stream = self.connect().await?;
        let exchange = async {
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .map_err(|e| lost(&e))?;
            tokio::spawn(conn);
            let body = if R::Request::PRESENT {
                Bytes::from(serde_json::to_vec(body).map_err(|e| Error::Protocol(e.to_string()))?)
            } else {
                Bytes::new()
            };
            let req = Request::builder()
                .method(method.clone())
                .uri(&path)
                .header(hyper::header::HOST, "localhost")
                .header(hyper::header::CONTENT_TYPE, "application/json")
                .body(Full::new(body))
                .map_err(|e| Error::Protocol(format!("cannot build the request: {e}")))?;
            let resp = sender.send_request(req).await.map_err(|e| lost(&e))?;
            let status = resp.status();
            let bytes = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| lost(&e))?
                .to_bytes();
            Ok::<_, Error>((status, bytes))
        };
        let (status, bytes) = tokio::time::timeout(TIMEOUT, exchange)
            .await
            .map_err(|_| {
                Error::Protocol(format!(
                    "datapathd did not answer {method} {path} within {} s",
                    TIMEOUT.as_secs()
                ))
            })??;
        if status.is_success() {
            return serde_json::from_slice(&bytes).map_err(|e| {
                Error::Protocol(format!(
                    "datapathd sent an answer lb-ctl does not understand ({status}): {e}"
                ))
            });
        }
        match serde_json::from_slice::<ApiError>(&bytes) {
            Ok(e) => Err(Error::Api(e)),
            // Kept to one line, whatever the body holds.
            Err(_) => Err(Error::Protocol(format!(
                "datapathd answered {status}: {}",
                String::from_utf8_lossy(&bytes)
                    .split_whitespace()
                    .collect::<Vec<_>>()
                    .join(" ")
            ))),
        }
    }

    /// Sends route `R`'s request, whose answer streams JSON lines (one `R::Answer` each):
    /// calls `on_line` with each complete line as it arrives, until the daemon ends the
    /// answer. The lines are handed over as text, so that `-o json` prints what the daemon
    /// sent.
    pub async fn stream<R: Route<Request = NoBody>>(
        &self,
        params: &R::Params,
        query: &R::Query,
        mut on_line: impl FnMut(&str) -> Result<()>,
    ) -> Result<()> {
        debug_assert_eq!(R::ENCODING, Encoding::NdJson, "{} does not stream", R::NAME);
        let path = R::uri(params, query);
        let stream = self.connect().await?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| lost(&e))?;
        tokio::spawn(conn);
        let req = Request::builder()
            .method(method::<R>())
            .uri(&path)
            .header(hyper::header::HOST, "localhost")
            .body(Full::new(Bytes::new()))
            .map_err(|e| Error::Protocol(format!("cannot build the request: {e}")))?;
        let resp = tokio::time::timeout(TIMEOUT, sender.send_request(req))
            .await
            .map_err(|_| Error::Protocol(format!("datapathd did not answer GET {path}")))?
            .map_err(|e| lost(&e))?;
        let status = resp.status();
        let mut body = resp.into_body();
        if !status.is_success() {
            let bytes = body.collect().await.map_err(|e| lost(&e))?.to_bytes();
            return Err(match serde_json::from_slice::<ApiError>(&bytes) {
                Ok(e) => Error::Api(e),
                Err(_) => Error::Protocol(format!("datapathd answered {status}")),
            });
        }
        let mut pending: Vec<u8> = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| lost(&e))?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            pending.extend_from_slice(&data);
            while let Some(end) = pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = pending.drain(..=end).collect();
                on_line(String::from_utf8_lossy(&line[..line.len() - 1]).trim())?;
            }
        }
        Ok(())
    }
}

fn lost(e: &hyper::Error) -> Error {
    Error::Protocol(format!("lost the connection to datapathd: {e}"))
}
