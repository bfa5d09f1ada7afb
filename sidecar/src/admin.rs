//! The admin listener: `/healthz` (the process is alive), `/readyz` (every
//! component is up; the body names each) and `/metrics` (Prometheus text).
//! It is separate from the claim API because the kubelet and Prometheus must
//! reach it on the pod's address, while the claim API stays on loopback.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

use crate::health::Health;
use crate::metrics::Metrics;

#[derive(Clone)]
pub struct AdminState {
    pub health: Health,
    pub metrics: Arc<Metrics>,
}

pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn readyz(State(state): State<AdminState>) -> impl IntoResponse {
    let report = state.health.report();
    let body: String = report
        .iter()
        .map(|(name, _, word)| format!("{name}: {word}\n"))
        .collect();
    let status = if report.iter().all(|(_, up, _)| *up) {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, body)
}

async fn metrics(State(state): State<AdminState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.encode(),
    )
}
