//! The conntrack and flow-event routes.
use std::{convert::Infallible, sync::Arc, time::Duration};

use axum::{
    Json, Router,
    body::{Body, Bytes},
    extract::{Query, State},
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use serde::Deserialize;

use super::{ConntrackController, CtStats, FlowEventView, FlushAnswer, table::CtFilter};
use crate::{Error, Result, server::ApiFailure};

/// The subscriber name of `GET /v1/flows?follow=true` streams in the loss counters.
pub(super) const FOLLOWER: &str = "api_follow";

type Shared = Arc<ConntrackController>;
type Answer<T> = std::result::Result<Json<T>, ApiFailure>;

async fn blocking<T: Send + 'static>(
    ct: &Shared,
    f: impl FnOnce(&ConntrackController) -> Result<T> + Send + 'static,
) -> Answer<T> {
    super::blocking(ct, f)
        .await
        .and_then(|r| r)
        .map(Json)
        .map_err(ApiFailure::from)
}

/// Query of the conntrack routes.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct CtQuery {
    address: Option<String>,
    port: Option<u16>,
    protocol: Option<String>,
    state: Option<String>,
    table: Option<String>,
}

impl From<CtQuery> for CtFilter {
    fn from(q: CtQuery) -> Self {
        CtFilter {
            address: q.address,
            port: q.port,
            protocol: q.protocol,
            state: q.state,
            table: q.table,
        }
    }
}

type QueryResult<T> = std::result::Result<Query<T>, axum::extract::rejection::QueryRejection>;

fn ct_query(q: QueryResult<CtQuery>) -> std::result::Result<CtFilter, ApiFailure> {
    let filter: CtFilter = q.map(|Query(q)| q.into()).map_err(|e| {
        ApiFailure::from(Error::InvalidArgument(format!(
            "invalid filter: {}",
            e.body_text()
        )))
    })?;
    filter
        .validate()
        .map_err(|e| ApiFailure::from(Error::InvalidArgument(format!("invalid filter: {e}"))))?;
    Ok(filter)
}

async fn list_conntrack(
    State(ct): State<Shared>,
    q: QueryResult<CtQuery>,
) -> Answer<Vec<super::CtFlow>> {
    let filter = ct_query(q)?;
    blocking(&ct, move |ct| ct.list(&filter)).await
}

async fn flush_conntrack(State(ct): State<Shared>, q: QueryResult<CtQuery>) -> Answer<FlushAnswer> {
    let filter = ct_query(q)?;
    blocking(&ct, move |ct| {
        ct.flush(&filter).map(|removed| FlushAnswer { removed })
    })
    .await
}

async fn conntrack_stats(State(ct): State<Shared>) -> Answer<CtStats> {
    blocking(&ct, |ct| ct.stats()).await
}

/// Query of `GET /v1/flows`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FlowsQuery {
    /// Stream events as they come (JSON lines) instead of the recent ones.
    #[serde(default)]
    follow: bool,
    /// Stop after this many events.
    count: Option<u64>,
    /// Stop after this many seconds (default and most: one day).
    timeout_seconds: Option<u64>,
}

const MAX_FOLLOW: Duration = Duration::from_secs(86_400);

async fn flows(State(ct): State<Shared>, q: QueryResult<FlowsQuery>) -> Response {
    let q = match q {
        Ok(Query(q)) => q,
        Err(e) => {
            return ApiFailure::from(Error::InvalidArgument(format!(
                "invalid query: {}",
                e.body_text()
            )))
            .into_response();
        }
    };
    if !q.follow {
        return Json(ct.recent_events()).into_response();
    }
    let rx = ct.events.subscribe(FOLLOWER);
    let limit = q.count.unwrap_or(u64::MAX);
    let deadline = tokio::time::Instant::now()
        + q.timeout_seconds
            .map(Duration::from_secs)
            .unwrap_or(MAX_FOLLOW)
            .min(MAX_FOLLOW);
    let stop = ct.stopping.subscribe();
    let state = (rx, 0u64, stop, Arc::clone(&ct));
    let stream =
        futures_util::stream::unfold(state, move |(mut rx, sent, mut stop, ct)| async move {
            if sent >= limit || *stop.borrow() {
                return None;
            }
            let event: Arc<FlowEventView> = tokio::select! {
                got = tokio::time::timeout_at(deadline, rx.recv()) => got.ok()?,
                _ = stop.changed() => return None,
            };
            let mut line = serde_json::to_vec(&ct.named(&event)).unwrap_or_default();
            line.push(b'\n');
            Some((
                Ok::<_, Infallible>(Bytes::from(line)),
                (rx, sent + 1, stop, ct),
            ))
        });
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(stream),
    )
        .into_response()
}

/// The conntrack and flow routes.
pub(super) fn router(ct: Shared) -> Router {
    Router::new()
        .route("/v1/conntrack", get(list_conntrack).delete(flush_conntrack))
        .route("/v1/conntrack/stats", get(conntrack_stats))
        .route("/v1/flows", get(flows))
        .with_state(ct)
}
