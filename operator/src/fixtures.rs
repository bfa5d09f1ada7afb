//! Test fixtures: a mocked API server that verifies the exact requests a
//! reconcile sends, in order, and answers each with a realistic object
//! (the kube-rs controller-rs convention, on `tower_test::mock::pair`).
//!
//! A missing request shows as a timeout; an unexpected one as a mismatch
//! naming what was expected; an extra one as the reconcile failing on a closed
//! service.

use std::collections::HashMap;
use std::sync::Arc;

use http::{Method, Request, Response, StatusCode};
use kube::client::Body;
use kube::runtime::events::{Recorder, Reporter};
use kube::Client;
use serde_json::{json, Value};

use crate::broker::{BindError, Binder, Connection, Plan};
use crate::controller::Context;
use crate::crd::IdempotentConsumer;
use crate::metrics::Metrics;

pub type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

/// A binder that succeeds without a broker.
pub struct NoBroker;

#[async_trait::async_trait]
impl Binder for NoBroker {
    async fn bind(&self, _connection: &Connection, _plan: &Plan) -> Result<(), BindError> {
        Ok(())
    }
    async fn delete_queues(&self, _connection: &Connection, _plan: &Plan) -> Result<(), BindError> {
        Ok(())
    }
}

/// A context whose client talks to the returned mock API server.
pub fn context() -> (Arc<Context>, Handle) {
    context_with(
        Arc::new(NoBroker),
        crate::controller::DEFAULT_BROKER_OPERATIONS,
    )
}

/// A check on a request's JSON body.
pub type BodyCheck = Box<dyn Fn(&Value) + Send>;

/// One expected request and the answer to give.
pub struct Expect {
    pub method: Method,
    pub path: String,
    /// Query parameters that must be present with these values.
    pub query: Vec<(&'static str, &'static str)>,
    /// Checks on the request body (parsed JSON).
    pub body: Option<BodyCheck>,
    pub status: StatusCode,
    pub answer: Value,
}

impl Expect {
    pub fn new(method: Method, path: &str, status: StatusCode, answer: Value) -> Self {
        Self {
            method,
            path: path.to_string(),
            query: Vec::new(),
            body: None,
            status,
            answer,
        }
    }

    /// A server-side apply by idemq's field manager; answers with the applied object.
    pub fn apply(path: &str) -> Self {
        let mut e = Self::new(Method::PATCH, path, StatusCode::OK, Value::Null);
        e.query = vec![("fieldManager", "idemq-operator"), ("force", "true")];
        e
    }

    pub fn get(path: &str, status: StatusCode, answer: Value) -> Self {
        Self::new(Method::GET, path, status, answer)
    }

    pub fn with_body(mut self, check: impl Fn(&Value) + Send + 'static) -> Self {
        self.body = Some(Box::new(check));
        self
    }

    pub fn answering(mut self, answer: Value) -> Self {
        self.answer = answer;
        self
    }
}

pub fn not_found() -> Value {
    json!({ "kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": "not found" })
}

/// Serves `expected` in order.
pub async fn serve(mut handle: Handle, expected: Vec<Expect>) {
    serve_on(&mut handle, expected).await;
}

/// Serves `expected` in order, then checks that no other request comes
/// before the client is gone (the reconcile ended and dropped it).
pub async fn serve_only(mut handle: Handle, expected: Vec<Expect>) {
    serve_on(&mut handle, expected).await;
    let next = tokio::time::timeout(std::time::Duration::from_secs(2), handle.next_request())
        .await
        .expect("the reconcile neither sent another request nor ended");
    if let Some((request, _)) = next {
        panic!(
            "unexpected request after the last expected one: {} {}",
            request.method(),
            request.uri().path()
        );
    }
}

async fn serve_on(handle: &mut Handle, expected: Vec<Expect>) {
    for (i, e) in expected.into_iter().enumerate() {
        let (request, send) =
            tokio::time::timeout(std::time::Duration::from_secs(2), handle.next_request())
                .await
                .unwrap_or_else(|_| {
                    panic!("request #{i} never came: expected {} {}", e.method, e.path)
                })
                .unwrap_or_else(|| {
                    panic!(
                        "the reconcile ended before request #{i}: {} {}",
                        e.method, e.path
                    )
                });
        let (parts, body) = request.into_parts();
        assert_eq!(
            (&parts.method, parts.uri.path()),
            (&e.method, e.path.as_str()),
            "request #{i}"
        );
        let query: HashMap<String, String> = parts
            .uri
            .query()
            .map(|q| {
                q.split('&')
                    .filter_map(|kv| kv.split_once('='))
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect()
            })
            .unwrap_or_default();
        for (k, v) in &e.query {
            assert_eq!(
                query.get(*k).map(String::as_str),
                Some(*v),
                "request #{i} {}: query {k}",
                e.path
            );
        }
        let bytes = body.collect_bytes().await.expect("request body");
        let sent: Value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).expect("JSON body")
        };
        if let Some(check) = &e.body {
            check(&sent);
        }
        // An apply without a prepared answer echoes the applied object back.
        let answer = if e.answer.is_null() { sent } else { e.answer };
        let response = Response::builder()
            .status(e.status)
            .body(Body::from(serde_json::to_vec(&answer).expect("JSON")))
            .expect("response");
        send.send_response(response);
    }
}

/// The sample policy as the API server returns it, with a finalizer.
pub fn policy() -> IdempotentConsumer {
    stored(include_str!("../tests/data/policy.yaml"))
}

/// The sample Kafka policy (topics `orders` and `refunds`), as stored.
pub fn kafka_policy() -> IdempotentConsumer {
    stored(include_str!("../tests/data/kafka-policy.yaml"))
}

/// A JetStream consumer with user and password, a dead-letter stream.
pub fn jetstream_policy() -> IdempotentConsumer {
    stored(include_str!("../tests/data/jetstream-policy.yaml"))
}

/// The sample MQTT policy (filter `devices/+/readings`), as stored.
pub fn mqtt_policy() -> IdempotentConsumer {
    stored(include_str!("../tests/data/mqtt-policy.yaml"))
}

/// The sample Pub/Sub policy (topic `orders`, subscription `orders-billing`), as stored.
pub fn pubsub_policy() -> IdempotentConsumer {
    stored(include_str!("../tests/data/pubsub-policy.yaml"))
}

/// The sample ZeroMQ policy (a ROUTER endpoint on port 5555, CURVE keys
/// in Secret `zeromq-orders`, a NetworkPolicy), as stored.
pub fn zeromq_policy() -> IdempotentConsumer {
    stored(include_str!("../tests/data/zeromq-policy.yaml"))
}

fn stored(yaml: &str) -> IdempotentConsumer {
    let mut ic: IdempotentConsumer = serde_yaml::from_str(yaml).expect("sample");
    ic.metadata.uid = Some("3f7c8a2e-0000-4000-8000-000000000001".into());
    ic.metadata.generation = Some(1);
    ic.metadata.resource_version = Some("100".into());
    ic.metadata.finalizers = Some(vec![crate::labels::FINALIZER.into()]);
    ic
}

/// A pod of the sample policy's target as the kubelet reports it: the
/// sidecar injected, its readiness `ready` (None: not started yet).
pub fn pod(name: &str, consumer: &str, ready: Option<bool>) -> k8s_openapi::api::core::v1::Pod {
    let statuses = match ready {
        Some(ready) => json!([
            { "name": "idemq-sidecar", "ready": ready, "restartCount": 0, "image": "img", "imageID": "",
              "state": { "running": {} } }
        ]),
        None => json!([]),
    };
    serde_json::from_value(json!({
        "metadata": { "name": name, "namespace": "shop", "uid": format!("uid-{name}"),
                      "labels": { "idemq.dev/consumer": consumer },
                      "annotations": { "big": "x".repeat(1000) } },
        "spec": { "containers": [{ "name": "app", "image": "app:1" }],
                  "initContainers": [{ "name": "idemq-sidecar", "image": "img", "restartPolicy": "Always" }] },
        "status": { "phase": "Running", "initContainerStatuses": statuses,
                    "containerStatuses": [{ "name": "app", "ready": true, "restartCount": 0, "image": "app:1", "imageID": "" }] }
    }))
    .expect("pod")
}

/// Puts `pod` into a pod cache as the watch would: trimmed.
pub fn cache_pod(
    writer: &mut kube::runtime::reflector::store::Writer<k8s_openapi::api::core::v1::Pod>,
    mut pod: k8s_openapi::api::core::v1::Pod,
) {
    crate::controller::pods::trim(&mut pod);
    writer.apply_watcher_event(&kube::runtime::watcher::Event::Apply(pod));
}

/// A context whose broker operations go to `binder`.
pub fn context_with(binder: Arc<dyn Binder>, broker_operations: usize) -> (Arc<Context>, Handle) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "shop");
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "idemq-operator".into(),
            instance: None,
        },
    );
    let ctx = Context::new(
        client,
        recorder,
        binder,
        "img:test".into(),
        Arc::new(Metrics::new()),
    )
    .with_broker_operations(broker_operations);
    (Arc::new(ctx), handle)
}

/// A small stand-in for the API server when the order of requests does not
/// matter (many reconciles at once, or the same one repeated): it keeps the
/// objects, answers reads from them, merges applies into them (bumping
/// `metadata.generation` when `spec` changes) and counts every write.
#[derive(Default)]
pub struct Cluster {
    pub objects: std::sync::Mutex<HashMap<String, Value>>,
    /// Writes by "METHOD path" (Events included).
    pub writes: std::sync::Mutex<HashMap<String, usize>>,
}

impl Cluster {
    pub fn put(&self, path: &str, object: Value) {
        self.objects
            .lock()
            .expect("lock")
            .insert(path.to_string(), object);
    }

    pub fn get(&self, path: &str) -> Option<Value> {
        self.objects.lock().expect("lock").get(path).cloned()
    }

    /// Every write so far, total.
    pub fn write_count(&self) -> usize {
        self.writes.lock().expect("lock").values().sum()
    }

    /// Writes so far whose "METHOD path" contains `part`.
    pub fn writes_to(&self, part: &str) -> usize {
        self.writes
            .lock()
            .expect("lock")
            .iter()
            .filter(|(k, _)| k.contains(part))
            .map(|(_, n)| n)
            .sum()
    }

    /// Answers requests until the client side goes away.
    pub async fn serve(self: Arc<Self>, mut handle: Handle) {
        while let Some((request, send)) = handle.next_request().await {
            let cluster = self.clone();
            tokio::spawn(async move {
                let (parts, body) = request.into_parts();
                let bytes = body.collect_bytes().await.expect("request body");
                let sent: Value = if bytes.is_empty() {
                    Value::Null
                } else {
                    serde_json::from_slice(&bytes).expect("JSON body")
                };
                let (status, answer) = cluster.answer(&parts.method, parts.uri.path(), sent);
                let response = Response::builder()
                    .status(status)
                    .body(Body::from(serde_json::to_vec(&answer).expect("JSON")))
                    .expect("response");
                send.send_response(response);
            });
        }
    }

    fn answer(&self, method: &Method, path: &str, sent: Value) -> (StatusCode, Value) {
        if *method != Method::GET {
            *self
                .writes
                .lock()
                .expect("lock")
                .entry(format!("{method} {path}"))
                .or_default() += 1;
        }
        let mut objects = self.objects.lock().expect("lock");
        match *method {
            Method::GET => match objects.get(path) {
                Some(o) => (StatusCode::OK, o.clone()),
                None => (StatusCode::NOT_FOUND, not_found()),
            },
            Method::POST => (StatusCode::CREATED, sent),
            Method::DELETE => match objects.remove(path) {
                Some(_) => (
                    StatusCode::OK,
                    json!({ "kind": "Status", "apiVersion": "v1", "status": "Success" }),
                ),
                None => (StatusCode::NOT_FOUND, not_found()),
            },
            _ => {
                let (path, status) = match path.strip_suffix("/status") {
                    Some(object) => (object, true),
                    None => (path, false),
                };
                let current = objects.get(path).cloned();
                if status && current.is_none() {
                    return (StatusCode::NOT_FOUND, not_found());
                }
                let mut next = current.clone().unwrap_or(Value::Null);
                if status {
                    merge(&mut next["status"], &sent["status"]);
                } else {
                    merge(&mut next, &sent);
                }
                let old_spec = current.as_ref().map(|c| c["spec"].clone());
                if old_spec.as_ref() != Some(&next["spec"]) || current.is_none() {
                    let generation = next["metadata"]["generation"].as_i64().unwrap_or(0);
                    next["metadata"]["generation"] = json!(generation + 1);
                }
                objects.insert(path.to_string(), next.clone());
                (StatusCode::OK, next)
            }
        }
    }
}

/// A JSON merge patch (RFC 7386): objects merge, anything else replaces.
fn merge(into: &mut Value, patch: &Value) {
    match (into, patch) {
        (Value::Object(into), Value::Object(patch)) => {
            for (k, v) in patch {
                if v.is_null() {
                    into.remove(k);
                } else {
                    merge(into.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        (into, patch) => *into = patch.clone(),
    }
}
