//! The claim API (gate mode): for applications that consume from the broker
//! themselves and ask the sidecar whether to process each message.
//!
//! It listens on loopback only, since it has no authentication. Every answer
//! is JSON; a store that does not answer gives 503, never a guess.
//!
//! - `POST /v1/claims` `{"key", "fingerprint"?, "leaseMs"?}` → 201 acquired
//!   with a token, 200 completed, 409 in flight with `retryAfterMs`, 422 conflict.
//! - `POST /v1/claims/{key}/complete` `{"token"}` → 204, or 409 when the token
//!   no longer holds the key.
//! - `POST /v1/claims/{key}/release` `{"token"}` → 204, or 409 likewise.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::json;

use crate::store::{Claim, KeyStore, Token, Transition};

const MIN_LEASE: Duration = Duration::from_millis(100);
const MAX_LEASE: Duration = Duration::from_secs(3600);
/// Keys are digested, so their length costs nothing in the store; the bound
/// only stops a runaway client.
const MAX_KEY_BYTES: usize = 4096;

pub struct ApiState {
    pub store: Arc<dyn KeyStore>,
    pub lease: Duration,
    pub retention: Duration,
}

pub fn router(state: Arc<ApiState>) -> Router {
    Router::new()
        .route("/v1/claims", post(claim))
        .route("/v1/claims/{key}/complete", post(complete))
        .route("/v1/claims/{key}/release", post(release))
        .with_state(state)
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ClaimRequest {
    key: String,
    fingerprint: Option<String>,
    lease_ms: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenRequest {
    token: String,
}

/// A refused request: its status and a sentence saying why.
struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

fn error(status: StatusCode, message: impl Into<String>) -> ApiError {
    ApiError(status, message.into())
}

/// Parses a JSON body; serde's message names the missing or wrong field.
fn parse<T: DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        error(
            StatusCode::BAD_REQUEST,
            format!("invalid request body: {e}"),
        )
    })
}

fn check_key(key: &str) -> Result<(), ApiError> {
    if key.is_empty() {
        return Err(error(StatusCode::BAD_REQUEST, "key must not be empty"));
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(error(
            StatusCode::BAD_REQUEST,
            format!("key must be at most {MAX_KEY_BYTES} bytes"),
        ));
    }
    Ok(())
}

fn unavailable(e: crate::store::StoreError) -> Response {
    tracing::warn!(error = %e, "key store unavailable");
    let message = match e {
        crate::store::StoreError::ResetUnacknowledged { .. } => {
            "the key store lost its state and claims are paused until the reset is acknowledged"
        }
        _ => "the key store is unavailable; retry later",
    };
    error(StatusCode::SERVICE_UNAVAILABLE, message).into_response()
}

async fn claim(State(state): State<Arc<ApiState>>, body: Bytes) -> Response {
    let request: ClaimRequest = match parse(&body) {
        Ok(r) => r,
        Err(refused) => return refused.into_response(),
    };
    if let Err(refused) = check_key(&request.key) {
        return refused.into_response();
    }
    let lease = match request.lease_ms.map(Duration::from_millis) {
        None => state.lease,
        Some(lease) if (MIN_LEASE..=MAX_LEASE).contains(&lease) => lease,
        Some(_) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!(
                    "leaseMs must be between {} and {}",
                    MIN_LEASE.as_millis(),
                    MAX_LEASE.as_millis()
                ),
            )
            .into_response()
        }
    };
    let claimed = state
        .store
        .claim(
            &request.key,
            request.fingerprint.as_deref(),
            lease,
            state.retention,
        )
        .await;
    match claimed {
        Ok(Claim::Acquired { token }) => (
            StatusCode::CREATED,
            Json(json!({"status": "acquired", "token": token.0})),
        )
            .into_response(),
        Ok(Claim::Completed) => {
            (StatusCode::OK, Json(json!({"status": "completed"}))).into_response()
        }
        Ok(Claim::InFlight { retry_after }) => (
            StatusCode::CONFLICT,
            Json(json!({"status": "in_flight", "retryAfterMs": retry_after.as_millis() as u64})),
        )
            .into_response(),
        Ok(Claim::Conflict) => (
            StatusCode::UNPROCESSABLE_ENTITY,
            Json(json!({"status": "conflict"})),
        )
            .into_response(),
        Err(e) => unavailable(e),
    }
}

fn transition(result: Result<Transition, crate::store::StoreError>) -> Response {
    match result {
        Ok(Transition::Done) => StatusCode::NO_CONTENT.into_response(),
        Ok(Transition::Stale) => (
            StatusCode::CONFLICT,
            Json(json!({"status": "stale", "error": "the token does not hold this key"})),
        )
            .into_response(),
        Err(e) => unavailable(e),
    }
}

async fn complete(
    State(state): State<Arc<ApiState>>,
    Path(key): Path<String>,
    body: Bytes,
) -> Response {
    let request: TokenRequest = match parse(&body) {
        Ok(r) => r,
        Err(refused) => return refused.into_response(),
    };
    if let Err(refused) = check_key(&key) {
        return refused.into_response();
    }
    let token = Token(request.token);
    transition(state.store.complete(&key, &token, state.retention).await)
}

async fn release(
    State(state): State<Arc<ApiState>>,
    Path(key): Path<String>,
    body: Bytes,
) -> Response {
    let request: TokenRequest = match parse(&body) {
        Ok(r) => r,
        Err(refused) => return refused.into_response(),
    };
    if let Err(refused) = check_key(&key) {
        return refused.into_response();
    }
    transition(state.store.release(&key, &Token(request.token)).await)
}
