//! A client of datapathd's API: one HTTP/1.1 request per connection over the Unix socket.
use std::{
    io,
    path::{Path, PathBuf},
    time::Duration,
};

use datapath_api::{
    AddBackend, ApiError, BackendKey, CreateService, ServiceKey, ServiceView, StatsView,
    StatusView, UpdateBackend,
};
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, body::Bytes};
use hyper_util::rt::TokioIo;
use serde::{Serialize, de::DeserializeOwned};
use tokio::net::UnixStream;

use crate::error::{Error, Result};

/// How long to wait for an answer. Changes are a few map updates and an fsync; a daemon that
/// takes longer is stuck, and a script is better told so than left hanging.
pub const TIMEOUT: Duration = Duration::from_secs(30);

pub struct Client {
    socket: PathBuf,
}

fn service_path(key: &ServiceKey) -> String {
    // IpAddr's Display writes IPv6 without brackets, as the API's paths want.
    format!("/v1/services/{}/{}/{}", key.proto, key.vip, key.port)
}

fn backend_path(key: &ServiceKey, backend: &BackendKey) -> String {
    format!(
        "{}/backends/{}/{}",
        service_path(key),
        backend.addr,
        backend.port
    )
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
        self.call(Method::GET, "/v1/status", None::<&()>).await
    }

    pub async fn list_services(&self) -> Result<Vec<ServiceView>> {
        self.call(Method::GET, "/v1/services", None::<&()>).await
    }

    pub async fn show_service(&self, key: &ServiceKey) -> Result<ServiceView> {
        self.call(Method::GET, &service_path(key), None::<&()>)
            .await
    }

    pub async fn create_service(&self, req: &CreateService) -> Result<ServiceView> {
        self.call(Method::POST, "/v1/services", Some(req)).await
    }

    pub async fn delete_service(&self, key: &ServiceKey) -> Result<ServiceView> {
        self.call(Method::DELETE, &service_path(key), None::<&()>)
            .await
    }

    pub async fn add_backend(&self, key: &ServiceKey, req: &AddBackend) -> Result<ServiceView> {
        let path = format!("{}/backends", service_path(key));
        self.call(Method::POST, &path, Some(req)).await
    }

    pub async fn update_backend(
        &self,
        key: &ServiceKey,
        backend: &BackendKey,
        req: &UpdateBackend,
    ) -> Result<ServiceView> {
        self.call(Method::PATCH, &backend_path(key, backend), Some(req))
            .await
    }

    pub async fn remove_backend(
        &self,
        key: &ServiceKey,
        backend: &BackendKey,
    ) -> Result<ServiceView> {
        self.call(Method::DELETE, &backend_path(key, backend), None::<&()>)
            .await
    }

    pub async fn stats(&self) -> Result<StatsView> {
        self.call(Method::GET, "/v1/stats", None::<&()>).await
    }

    /// Sends one request and decodes the answer: the `T` of a 2xx, or the [`ApiError`] of any
    /// other status.
    pub async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<T> {
        let stream = UnixStream::connect(&self.socket).await.map_err(|source| {
            let hint = match source.kind() {
                io::ErrorKind::PermissionDenied => "the API socket is root's: run lb-ctl as root",
                _ => "is datapathd running?",
            };
            Error::Unreachable {
                socket: self.socket.clone(),
                source,
                hint,
            }
        })?;
        let exchange = async {
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .map_err(|e| lost(&e))?;
            tokio::spawn(conn);
            let body = match body {
                Some(b) => {
                    Bytes::from(serde_json::to_vec(b).map_err(|e| Error::Protocol(e.to_string()))?)
                }
                None => Bytes::new(),
            };
            let req = Request::builder()
                .method(method.clone())
                .uri(path)
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
}

impl Client {
    /// `GET path` whose answer streams JSON lines: calls `on_line` with each complete line
    /// as it arrives, until the daemon ends the answer.
    pub async fn stream_lines(
        &self,
        path: &str,
        mut on_line: impl FnMut(&str) -> Result<()>,
    ) -> Result<()> {
        let stream = UnixStream::connect(&self.socket).await.map_err(|source| {
            let hint = match source.kind() {
                io::ErrorKind::PermissionDenied => "the API socket is root's: run lb-ctl as root",
                _ => "is datapathd running?",
            };
            Error::Unreachable {
                socket: self.socket.clone(),
                source,
                hint,
            }
        })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| lost(&e))?;
        tokio::spawn(conn);
        let req = Request::builder()
            .method(Method::GET)
            .uri(path)
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
