//! The claim API driven over real HTTP, against the in-memory store and the
//! real Redis.

mod common;

use std::sync::Arc;
use std::time::Duration;

use idemq_sidecar::config::Config;
use idemq_sidecar::store::memory::MemoryStore;
use idemq_sidecar::store::redis::{RedisOptions, RedisStore};
use idemq_sidecar::store::KeyStore;
use reqwest::StatusCode;
use serde_json::{json, Value};

fn gate_config() -> Config {
    Config::from_yaml("consumer: api-test\nmode: gate\ndedup:\n  lease: 30s\n  retention: 1h\n")
        .expect("valid")
}

struct Api {
    sidecar: common::sidecar::Running,
    http: reqwest::Client,
}

impl Api {
    async fn start(store: Arc<dyn KeyStore>) -> Self {
        Self::start_with(gate_config(), store).await
    }

    async fn start_with(config: Config, store: Arc<dyn KeyStore>) -> Self {
        let sidecar = common::sidecar::start(config, store).await;
        let api = Self {
            sidecar,
            http: reqwest::Client::new(),
        };
        api.wait_ready().await;
        api
    }

    async fn wait_ready(&self) {
        for _ in 0..50 {
            if let Ok(r) = self
                .http
                .get(self.sidecar.admin_url("/readyz"))
                .send()
                .await
            {
                if r.status() == StatusCode::OK {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("sidecar did not become ready");
    }

    async fn post(&self, path: &str, body: impl Into<reqwest::Body>) -> (StatusCode, Value) {
        let response = self
            .http
            .post(self.sidecar.gate_url(path))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .expect("request");
        let status = response.status();
        let bytes = response.bytes().await.expect("body");
        let value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).expect("JSON body")
        };
        (status, value)
    }

    async fn claim(&self, body: Value) -> (StatusCode, Value) {
        self.post("/v1/claims", body.to_string()).await
    }

    async fn settle(&self, key: &str, action: &str, token: &str) -> StatusCode {
        let path = format!("/v1/claims/{}/{action}", encode(key));
        self.post(&path, json!({ "token": token }).to_string())
            .await
            .0
    }
}

/// Percent-encodes a key for a path segment.
fn encode(key: &str) -> String {
    key.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

async fn redis_store(test: &str) -> Arc<RedisStore> {
    Arc::new(common::redis::store(test).await)
}

/// Runs one behaviour against both stores.
macro_rules! for_both_stores {
    ($($name:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(std::sync::Arc::new(idemq_sidecar::store::memory::MemoryStore::new())).await;
                }
            )*
        }
        mod redis {
            $(
                #[tokio::test]
                async fn $name() {
                    let store = super::redis_store(stringify!($name)).await;
                    super::$name(store.clone()).await;
                    crate::common::redis::cleanup(store.prefix()).await;
                }
            )*
        }
    };
}

for_both_stores!(
    claim_complete_and_duplicate_over_http,
    in_flight_conflict_and_release_over_http,
    stale_tokens_are_refused_with_409,
    bad_requests_name_the_problem,
    two_concurrent_clients_one_wins,
);

async fn claim_complete_and_duplicate_over_http(store: Arc<dyn KeyStore>) {
    let api = Api::start(store).await;
    // Keys may hold any character, `/` included: they travel percent-encoded.
    let key = "orders/2024/42?x=1";
    let (status, body) = api.claim(json!({"key": key, "fingerprint": "abc"})).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["status"], "acquired");
    let token = body["token"].as_str().expect("token").to_string();
    assert_eq!(
        api.settle(key, "complete", &token).await,
        StatusCode::NO_CONTENT
    );
    let (status, body) = api.claim(json!({"key": key, "fingerprint": "abc"})).await;
    assert_eq!(
        (status, body),
        (StatusCode::OK, json!({"status": "completed"}))
    );

    let metrics = api
        .http
        .get(api.sidecar.admin_url("/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(
        metrics.contains("idemq_claims_total{outcome=\"acquired\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("idemq_claims_total{outcome=\"completed\"} 1"),
        "{metrics}"
    );
    api.sidecar.stop().await.expect("clean stop");
}

async fn in_flight_conflict_and_release_over_http(store: Arc<dyn KeyStore>) {
    let api = Api::start(store).await;
    let (status, body) = api
        .claim(json!({"key": "k1", "fingerprint": "a", "leaseMs": 20000}))
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let token = body["token"].as_str().expect("token").to_string();

    let (status, body) = api.claim(json!({"key": "k1", "fingerprint": "a"})).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(body["status"], "in_flight");
    let retry = body["retryAfterMs"].as_u64().expect("retryAfterMs");
    assert!(retry > 0 && retry <= 20000, "retryAfterMs {retry}");

    let (status, body) = api.claim(json!({"key": "k1", "fingerprint": "b"})).await;
    assert_eq!(
        (status, body),
        (
            StatusCode::UNPROCESSABLE_ENTITY,
            json!({"status": "conflict"})
        )
    );

    assert_eq!(
        api.settle("k1", "release", &token).await,
        StatusCode::NO_CONTENT
    );
    let (status, _) = api.claim(json!({"key": "k1", "fingerprint": "a"})).await;
    assert_eq!(
        status,
        StatusCode::CREATED,
        "a released key is claimable at once"
    );
    api.sidecar.stop().await.expect("clean stop");
}

async fn stale_tokens_are_refused_with_409(store: Arc<dyn KeyStore>) {
    let api = Api::start(store).await;
    let (_, body) = api.claim(json!({"key": "k2", "leaseMs": 200})).await;
    let first = body["token"].as_str().expect("token").to_string();
    tokio::time::sleep(Duration::from_millis(400)).await;
    let (status, body) = api.claim(json!({"key": "k2"})).await;
    assert_eq!(
        status,
        StatusCode::CREATED,
        "the expired lease was taken over"
    );
    let second = body["token"].as_str().expect("token").to_string();

    assert_eq!(
        api.settle("k2", "complete", &first).await,
        StatusCode::CONFLICT
    );
    assert_eq!(
        api.settle("k2", "release", &first).await,
        StatusCode::CONFLICT
    );
    assert_eq!(
        api.settle("k2", "complete", "not-a-token").await,
        StatusCode::CONFLICT
    );
    assert_eq!(
        api.settle("k2", "complete", &second).await,
        StatusCode::NO_CONTENT
    );
    api.sidecar.stop().await.expect("clean stop");
}

async fn bad_requests_name_the_problem(store: Arc<dyn KeyStore>) {
    let api = Api::start(store).await;
    let cases = [
        (
            "/v1/claims",
            "{not json".to_string(),
            "invalid request body",
        ),
        (
            "/v1/claims",
            json!({"fingerprint": "x"}).to_string(),
            "missing field `key`",
        ),
        ("/v1/claims", json!({"key": 7}).to_string(), "invalid type"),
        (
            "/v1/claims",
            json!({"key": ""}).to_string(),
            "key must not be empty",
        ),
        (
            "/v1/claims",
            json!({"key": "k", "leaseMs": 5}).to_string(),
            "leaseMs must be between",
        ),
        (
            "/v1/claims",
            json!({"key": "k", "lease": 5}).to_string(),
            "unknown field `lease`",
        ),
        (
            "/v1/claims/k/complete",
            json!({}).to_string(),
            "missing field `token`",
        ),
        (
            "/v1/claims/k/release",
            "".to_string(),
            "invalid request body",
        ),
    ];
    for (path, body, expected) in cases {
        let (status, answer) = api.post(path, body.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path} {body}: {answer}");
        let message = answer["error"].as_str().expect("error message");
        assert!(message.contains(expected), "{path} {body}: {message}");
    }
    api.sidecar.stop().await.expect("clean stop");
}

async fn two_concurrent_clients_one_wins(store: Arc<dyn KeyStore>) {
    let api = Arc::new(Api::start(store).await);
    let tasks: Vec<_> = (0..2)
        .map(|_| {
            let api = api.clone();
            tokio::spawn(async move { api.claim(json!({"key": "k3"})).await.0 })
        })
        .collect();
    let mut statuses = Vec::new();
    for task in tasks {
        statuses.push(task.await.expect("task"));
    }
    statuses.sort();
    assert_eq!(statuses, [StatusCode::CREATED, StatusCode::CONFLICT]);
}

#[tokio::test]
async fn store_down_gives_503_and_not_ready() {
    // Nothing listens on port 1: the store never answers.
    let store = Arc::new(
        RedisStore::new(RedisOptions {
            timeout: Duration::from_millis(300),
            ..RedisOptions::new("redis://127.0.0.1:1", common::unique("down"))
        })
        .expect("options"),
    );
    let sidecar = common::sidecar::start(gate_config(), store).await;
    let http = reqwest::Client::new();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let ready = http
        .get(sidecar.admin_url("/readyz"))
        .send()
        .await
        .expect("readyz");
    assert_eq!(ready.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(ready.text().await.expect("text"), "store: down\n");
    let health = http
        .get(sidecar.admin_url("/healthz"))
        .send()
        .await
        .expect("healthz");
    assert_eq!(health.status(), StatusCode::OK, "alive even when not ready");

    let response = http
        .post(sidecar.gate_url("/v1/claims"))
        .body(json!({"key": "k"}).to_string())
        .send()
        .await
        .expect("claim");
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body: Value = serde_json::from_slice(&response.bytes().await.expect("body")).expect("json");
    assert!(body["error"]
        .as_str()
        .expect("error")
        .contains("unavailable"));

    let metrics = http
        .get(sidecar.admin_url("/metrics"))
        .send()
        .await
        .expect("m")
        .text()
        .await
        .expect("t");
    assert!(
        metrics.contains("idemq_store_errors_total{op=\"claim\""),
        "{metrics}"
    );
    assert!(metrics.contains("idemq_store_connected 0"), "{metrics}");
    sidecar.stop().await.expect("clean stop");
}

#[tokio::test]
async fn memory_store_is_ready_at_once() {
    let api = Api::start(Arc::new(MemoryStore::new())).await;
    let ready = api
        .http
        .get(api.sidecar.admin_url("/readyz"))
        .send()
        .await
        .expect("readyz");
    assert_eq!(ready.text().await.expect("text"), "store: up\n");
    api.sidecar.stop().await.expect("clean stop");
}

/// Gate mode on Redis: `order-7` completed under one retention, the sidecar
/// restarted with another (longer, then shorter), the duplicate is still
/// reported completed: a policy change forgets nothing.
#[tokio::test]
async fn retention_change_between_completion_and_duplicate_forgets_nothing() {
    for (before, after) in [("24h", "48h"), ("48h", "24h")] {
        let namespace = common::unique("retention");
        let config = |retention: &str| {
            Config::from_yaml(&format!(
                "consumer: {namespace}\nmode: gate\ndedup:\n  retention: {retention}\n"
            ))
            .expect("valid")
        };
        let store = |namespace: &str| -> Arc<RedisStore> {
            Arc::new(
                RedisStore::new(RedisOptions::new(common::redis::URL, namespace)).expect("options"),
            )
        };

        let first = store(&namespace);
        let api = Api::start_with(config(before), first.clone()).await;
        let (status, body) = api.claim(json!({"key": "order-7"})).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        let token = body["token"].as_str().expect("token").to_string();
        assert_eq!(
            api.settle("order-7", "complete", &token).await,
            StatusCode::NO_CONTENT
        );
        api.sidecar.stop().await.expect("stop");

        let api = Api::start_with(config(after), store(&namespace)).await;
        let (status, body) = api.claim(json!({"key": "order-7"})).await;
        assert_eq!(
            (status, body["status"].as_str()),
            (StatusCode::OK, Some("completed")),
            "retention {before} then {after}: {body}"
        );
        api.sidecar.stop().await.expect("stop");
        common::redis::cleanup(first.prefix()).await;
    }
}
