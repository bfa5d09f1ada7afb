//! The exact requests of each reconcile, against a mocked API server.

use std::sync::{Arc, Mutex};

use http::{Method, StatusCode};
use serde_json::{json, Value};

use super::reconcile;
use crate::crd::IdempotentConsumer;
use crate::fixtures::{self, not_found, Expect};

const IC: &str = "/apis/idemq.dev/v1alpha1/namespaces/shop/idempotentconsumers/orders";
const CM: &str = "/api/v1/namespaces/shop/configmaps/orders-idemq";
const REDIS_SECRET: &str = "/api/v1/namespaces/shop/secrets/orders-idemq-redis";
const BROKER_SECRET: &str = "/api/v1/namespaces/shop/secrets/rabbitmq-orders";
const REDIS_SVC: &str = "/api/v1/namespaces/shop/services/orders-idemq-redis";
const REDIS_DEPLOY: &str = "/apis/apps/v1/namespaces/shop/deployments/orders-idemq-redis";
const TARGET: &str = "/apis/apps/v1/namespaces/shop/deployments/orders-worker";
const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/shop/events";

fn broker_secret() -> Value {
    // "amqp://guest:guest@rabbit:5672" in base64.
    json!({ "apiVersion": "v1", "kind": "Secret", "metadata": { "name": "rabbitmq-orders", "namespace": "shop" },
            "data": { "url": "YW1xcDovL2d1ZXN0Omd1ZXN0QHJhYmJpdDo1Njcy" } })
}

fn target() -> Value {
    json!({ "apiVersion": "apps/v1", "kind": "Deployment", "metadata": { "name": "orders-worker", "namespace": "shop" } })
}

fn event(reason: &'static str) -> Expect {
    Expect::new(Method::POST, EVENTS, StatusCode::CREATED, Value::Null).with_body(move |e| {
        assert_eq!(e["reason"], reason, "event {e}");
        assert!(
            !e.to_string().contains("guest:guest"),
            "no secret in events"
        );
    })
}

/// The requests that apply the store, the bindings and the ConfigMap.
fn apply_prefix() -> Vec<Expect> {
    vec![
        Expect::get(CM, StatusCode::NOT_FOUND, not_found()),
        Expect::apply(CM).with_body(|cm| {
            assert!(cm["data"]["sidecar.yaml"]
                .as_str()
                .is_some_and(|y| !y.contains("amqp://")))
        }),
        Expect::get(REDIS_SECRET, StatusCode::NOT_FOUND, not_found()),
        Expect::get(REDIS_SECRET, StatusCode::NOT_FOUND, not_found()),
        Expect::apply(REDIS_SECRET)
            .with_body(|s| assert_eq!(s["data"]["password"].as_str().map(str::len), Some(44))),
        Expect::get(REDIS_SVC, StatusCode::NOT_FOUND, not_found()),
        Expect::apply(REDIS_SVC),
        Expect::get(REDIS_DEPLOY, StatusCode::NOT_FOUND, not_found()),
        Expect::apply(REDIS_DEPLOY),
        Expect::get(BROKER_SECRET, StatusCode::OK, broker_secret()),
    ]
}

async fn run(
    ic: IdempotentConsumer,
    expected: Vec<Expect>,
) -> Result<kube::runtime::controller::Action, super::Error> {
    let (ctx, handle) = fixtures::context();
    let server = tokio::spawn(fixtures::serve(handle, expected));
    let result = reconcile(Arc::new(ic), ctx).await;
    if let Err(e) = &result {
        eprintln!("reconcile failed: {e:?}");
    }
    server
        .await
        .expect("every expected request came, as expected");
    result
}

/// Captures the status a status patch sends.
fn status_patch(into: Arc<Mutex<Option<Value>>>) -> Expect {
    let answer = serde_json::to_value(fixtures::policy()).expect("json");
    Expect::new(
        Method::PATCH,
        &format!("{IC}/status"),
        StatusCode::OK,
        answer,
    )
    .with_body(move |b| {
        *into.lock().expect("lock") = Some(b["status"].clone());
    })
}

fn conditions(status: &Mutex<Option<Value>>) -> Vec<(String, String, String)> {
    status.lock().expect("lock").as_ref().expect("status")["conditions"]
        .as_array()
        .expect("conditions")
        .iter()
        .map(|c| {
            (
                c["type"].as_str().unwrap_or_default().into(),
                c["status"].as_str().unwrap_or_default().into(),
                c["reason"].as_str().unwrap_or_default().into(),
            )
        })
        .collect()
}

#[tokio::test]
async fn a_new_policy_first_gets_the_finalizer() {
    let mut ic = fixtures::policy();
    ic.metadata.finalizers = None;
    let added = Expect::new(
        Method::PATCH,
        IC,
        StatusCode::OK,
        serde_json::to_value(fixtures::policy()).expect("json"),
    )
    .with_body(|patch| assert!(patch.to_string().contains("idemq.dev/cleanup"), "{patch}"));
    run(ic, vec![added]).await.expect("reconciles");
}

#[tokio::test]
async fn create_applies_everything_writes_status_and_sends_events() {
    let status = Arc::new(Mutex::new(None));
    let mut create = apply_prefix();
    create.push(Expect::get(TARGET, StatusCode::OK, target()));
    create.push(Expect::apply(TARGET).with_body(|p| {
        let pod = &p["spec"]["template"]["spec"];
        assert_eq!(pod["initContainers"][0]["name"], "idemq-sidecar");
        assert_eq!(pod["initContainers"][0]["restartPolicy"], "Always");
        assert_eq!(p["metadata"]["annotations"]["idemq.dev/consumer"], "orders");
        assert!(p["spec"].get("replicas").is_none());
    }));
    create.push(status_patch(status.clone()));
    create.push(event("Injected"));
    create.push(event("RedisNotReady"));
    run(fixtures::policy(), create).await.expect("reconciles");
    assert_eq!(
        conditions(&status),
        [
            ("StoreReady".into(), "False".into(), "RedisNotReady".into()),
            ("BrokerBound".into(), "True".into(), "Bound".into()),
            ("SidecarInjected".into(), "True".into(), "Injected".into()),
            ("Ready".into(), "False".into(), "NotReady".into()),
        ]
    );
    let written = status.lock().expect("lock").clone().expect("status");
    assert!(written["bindingHash"].is_string(), "{written}");
}

#[tokio::test]
async fn a_missing_target_is_reported_not_patched() {
    let status = Arc::new(Mutex::new(None));
    let mut expected = apply_prefix();
    expected.push(Expect::get(TARGET, StatusCode::NOT_FOUND, not_found()));
    expected.push(status_patch(status.clone()));
    expected.push(event("RedisNotReady"));
    expected.push(event("TargetNotFound"));
    let action = run(fixtures::policy(), expected)
        .await
        .expect("reconciles without error");
    assert!(conditions(&status).contains(&(
        "SidecarInjected".into(),
        "False".into(),
        "TargetNotFound".into()
    )));
    assert_eq!(
        action,
        kube::runtime::controller::Action::requeue(std::time::Duration::from_secs(5)),
        "backs off"
    );
}

#[tokio::test]
async fn an_invalid_spec_gets_a_condition_and_an_event_then_waits_for_a_change() {
    // Passes the schema's pattern, but the sidecar needs a lease of at least 100ms.
    let mut ic = fixtures::policy();
    ic.spec.lease = Some("5ms".into());
    let status = Arc::new(Mutex::new(None));
    let expected = vec![
        status_patch(status.clone()),
        Expect::new(Method::POST, EVENTS, StatusCode::CREATED, Value::Null).with_body(|e| {
            assert_eq!(e["reason"], "InvalidSpec");
            assert_eq!(e["type"], "Warning");
            assert!(
                e["note"]
                    .as_str()
                    .is_some_and(|n| n.contains("dedup.lease")),
                "{e}"
            );
        }),
    ];
    let (ctx, handle) = fixtures::context();
    let server = tokio::spawn(fixtures::serve(handle, expected));
    let ic = Arc::new(ic);
    let error = reconcile(ic.clone(), ctx.clone())
        .await
        .expect_err("an invalid spec is an error");
    server.await.expect("every expected request came");
    assert_eq!(
        conditions(&status),
        [("Ready".into(), "False".into(), "InvalidSpec".into())]
    );
    assert_eq!(
        super::error_policy(ic, &error, ctx),
        kube::runtime::controller::Action::await_change(),
        "retrying cannot fix it"
    );
}

#[tokio::test]
async fn a_malformed_object_gets_a_condition_and_an_event_once_per_generation() {
    // Stored under an older schema: `target` was a plain string.
    let guard: super::Guarded = serde_json::from_value(json!({
        "apiVersion": "idemq.dev/v1alpha1", "kind": "IdempotentConsumer",
        "metadata": { "name": "orders", "namespace": "shop", "uid": "u-1", "generation": 3 },
        "spec": { "target": "orders-worker" }
    }))
    .expect("a guard always deserializes");
    assert!(guard.0.is_err(), "the object is malformed");
    let status = Arc::new(Mutex::new(None));
    let expected = vec![
        status_patch(status.clone()),
        Expect::new(Method::POST, EVENTS, StatusCode::CREATED, Value::Null).with_body(|e| {
            assert_eq!(e["reason"], "Malformed");
            assert_eq!(e["type"], "Warning");
            assert_eq!(e["regarding"]["name"], "orders");
            assert!(
                e["note"]
                    .as_str()
                    .is_some_and(|n| n.contains("Expected struct Target")),
                "the note names the problem: {e}"
            );
        }),
    ];
    let (ctx, handle) = fixtures::context();
    let server = tokio::spawn(fixtures::serve(handle, expected));
    let guard = Arc::new(guard);
    let action = super::reconcile_guarded(guard.clone(), ctx.clone())
        .await
        .expect("reported, not failed");
    server.await.expect("every expected request came");
    assert_eq!(action, kube::runtime::controller::Action::await_change());
    assert_eq!(
        conditions(&status),
        [("Ready".into(), "False".into(), "Malformed".into())]
    );
    let written = status.lock().expect("lock").clone().expect("status");
    assert_eq!(written["observedGeneration"], 3);

    // Its own status write comes back as a watch event: no second report
    // (the mock API server is gone, so any request would fail).
    super::reconcile_guarded(guard, ctx)
        .await
        .expect("nothing more to say about this generation");
}

#[tokio::test]
async fn deletion_withdraws_the_sidecar_deletes_owned_objects_and_drops_the_finalizer() {
    let mut ic = fixtures::policy();
    ic.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        k8s_openapi::jiff::Timestamp::now(),
    ));
    let deleted = json!({ "kind": "Status", "apiVersion": "v1", "status": "Success", "code": 200 });
    let mut gone = ic.clone();
    gone.metadata.finalizers = None;
    let expected = vec![
        Expect::get(TARGET, StatusCode::OK, target()),
        Expect::apply(TARGET).with_body(|p| {
            assert!(
                p.get("spec").is_none(),
                "an empty apply withdraws idemq's fields: {p}"
            )
        }),
        Expect::new(Method::DELETE, CM, StatusCode::OK, deleted.clone()),
        Expect::new(
            Method::DELETE,
            REDIS_DEPLOY,
            StatusCode::OK,
            deleted.clone(),
        ),
        Expect::new(
            Method::DELETE,
            REDIS_SVC,
            StatusCode::NOT_FOUND,
            not_found(),
        ),
        Expect::new(Method::DELETE, REDIS_SECRET, StatusCode::OK, deleted),
        event("CleanedUp"),
        Expect::new(
            Method::PATCH,
            IC,
            StatusCode::OK,
            serde_json::to_value(&gone).expect("json"),
        )
        .with_body(|patch| {
            assert!(
                patch.to_string().contains("remove") || patch.to_string().contains("finalizers"),
                "{patch}"
            )
        }),
    ];
    run(ic, expected).await.expect("cleans up");
}
