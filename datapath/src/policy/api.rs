//! The policy routes.
use std::sync::Arc;

use axum::{Json, Router, extract::State, routing::get};

use super::{ApplyPolicy, PolicyController, PolicyStatus};
use crate::{
    Error, Result,
    server::{ApiFailure, ApiJson},
};

type Shared = Arc<PolicyController>;
type Answer<T> = std::result::Result<Json<T>, ApiFailure>;

async fn blocking<T: Send + 'static>(
    p: &Shared,
    f: impl FnOnce(&PolicyController) -> Result<T> + Send + 'static,
) -> Answer<T> {
    let p = Arc::clone(p);
    match tokio::task::spawn_blocking(move || f(&p)).await {
        Ok(r) => r.map(Json).map_err(ApiFailure::from),
        Err(e) => Err(ApiFailure::from(Error::Internal(format!(
            "policy request failed: {e}"
        )))),
    }
}

async fn get_policy(State(p): State<Shared>) -> Answer<PolicyStatus> {
    blocking(&p, |p| p.status()).await
}

async fn put_policy(
    State(p): State<Shared>,
    ApiJson(req): ApiJson<ApplyPolicy>,
) -> Answer<PolicyStatus> {
    blocking(&p, move |p| p.apply_text(&req.text)).await
}

async fn delete_policy(State(p): State<Shared>) -> Answer<PolicyStatus> {
    blocking(&p, |p| p.delete()).await
}

pub(super) fn router(p: Shared) -> Router {
    Router::new()
        .route(
            "/v1/policy",
            get(get_policy).put(put_policy).delete(delete_policy),
        )
        .with_state(p)
}
