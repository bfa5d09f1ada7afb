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
const REDIS_STS: &str = "/apis/apps/v1/namespaces/shop/statefulsets/orders-idemq-redis";
const REDIS_PDB: &str = "/apis/policy/v1/namespaces/shop/poddisruptionbudgets/orders-idemq-redis";
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
        // Read first: a Service that turns headless is re-created.
        Expect::get(REDIS_SVC, StatusCode::NOT_FOUND, not_found()),
        Expect::get(REDIS_SVC, StatusCode::NOT_FOUND, not_found()),
        Expect::apply(REDIS_SVC),
        // No Deployment from an earlier version is left to serve beside it.
        Expect::get(REDIS_DEPLOY, StatusCode::NOT_FOUND, not_found()),
        Expect::get(REDIS_STS, StatusCode::NOT_FOUND, not_found()),
        Expect::apply(REDIS_STS).with_body(|s| {
            let claims = &s["spec"]["volumeClaimTemplates"];
            assert_eq!(claims[0]["spec"]["resources"]["requests"]["storage"], "1Gi");
        }),
        Expect::get(REDIS_PDB, StatusCode::NOT_FOUND, not_found()),
        Expect::apply(REDIS_PDB),
        // Read once: the digest of the Secrets' content in the pod
        // template takes it from this read.
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

fn with_status(mut ic: IdempotentConsumer, status: &Mutex<Option<Value>>) -> IdempotentConsumer {
    let value = status
        .lock()
        .expect("lock")
        .clone()
        .expect("a status was written");
    ic.status = Some(
        serde_json::from_value::<crate::crd::IdempotentConsumerStatus>(value).expect("status"),
    );
    ic
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
async fn a_finalizer_added_meanwhile_is_an_ordinary_retry_not_an_error() {
    // The cached object predates a finalizer added by an earlier reconcile:
    // the guarded patch is refused with 422, and the reconcile retries soon.
    let mut ic = fixtures::policy();
    ic.metadata.finalizers = None;
    let refused = Expect::new(
        Method::PATCH,
        IC,
        StatusCode::UNPROCESSABLE_ENTITY,
        json!({ "kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Invalid",
                "code": 422, "message": "the server rejected our request due to an error in our request" }),
    );
    let action = run(ic, vec![refused]).await.expect("not an error");
    assert_eq!(
        action,
        kube::runtime::controller::Action::requeue(std::time::Duration::from_secs(1))
    );
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
            ("SidecarsReady".into(), "False".into(), "NoPods".into()),
        ]
    );
    let written = status.lock().expect("lock").clone().expect("status");
    assert!(written["bindingHash"].is_string(), "{written}");
}

/// A store password Secret that cannot be read now is not a missing one:
/// the reconcile fails (and is retried) without writing a new password over
/// the one the store and every sidecar use.
#[tokio::test]
async fn an_unreadable_store_password_is_retried_and_never_replaced() {
    let unavailable = serde_json::json!({
        "kind": "Status", "apiVersion": "v1", "status": "Failure",
        "reason": "InternalError", "code": 500, "message": "etcdserver: request timed out"
    });
    let expected = vec![
        Expect::get(CM, StatusCode::NOT_FOUND, not_found()),
        Expect::apply(CM),
        Expect::get(REDIS_SECRET, StatusCode::INTERNAL_SERVER_ERROR, unavailable),
    ];
    let (ctx, handle) = fixtures::context();
    let server = tokio::spawn(fixtures::serve_only(handle, expected));
    let result = reconcile(Arc::new(fixtures::policy()), ctx).await;
    server.await.expect("no request after the failed read");
    assert!(result.is_err(), "the reconcile fails and is retried");
}

#[tokio::test]
async fn a_rotated_broker_secret_rolls_the_pods_and_an_unchanged_one_does_not() {
    // The pod template's secrets-hash of one reconcile, given the Secret's URL.
    async fn secrets_hash(url_base64: &'static str) -> (String, String) {
        let seen = Arc::new(Mutex::new(None));
        let secret = move || {
            json!({ "apiVersion": "v1", "kind": "Secret",
                    "metadata": { "name": "rabbitmq-orders", "namespace": "shop" },
                    "data": { "url": url_base64 } })
        };
        let mut expected = apply_prefix();
        expected.truncate(expected.len() - 1);
        expected.push(Expect::get(BROKER_SECRET, StatusCode::OK, secret()));
        expected.push(Expect::get(TARGET, StatusCode::OK, target()));
        let into = seen.clone();
        expected.push(Expect::apply(TARGET).with_body(move |p| {
            let annotations = &p["spec"]["template"]["metadata"]["annotations"];
            *into.lock().expect("lock") = Some((
                annotations["idemq.dev/config-hash"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                annotations["idemq.dev/secrets-hash"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            ));
            assert!(
                !p.to_string().contains("guest"),
                "no credentials in the template"
            );
        }));
        expected.push(status_patch(Arc::new(Mutex::new(None))));
        expected.push(event("Injected"));
        expected.push(event("RedisNotReady"));
        run(fixtures::policy(), expected).await.expect("reconciles");
        let hashes = seen
            .lock()
            .expect("lock")
            .clone()
            .expect("the target was applied");
        hashes
    }
    // amqp://guest:guest@rabbit:5672, then the same with another password.
    let before = secrets_hash("YW1xcDovL2d1ZXN0Omd1ZXN0QHJhYmJpdDo1Njcy").await;
    let again = secrets_hash("YW1xcDovL2d1ZXN0Omd1ZXN0QHJhYmJpdDo1Njcy").await;
    let rotated = secrets_hash("YW1xcDovL2d1ZXN0Om5ld3Bhc3NAcmFiYml0OjU2NzI=").await;
    assert_eq!(before.1.len(), 24, "a digest: {before:?}");
    assert_eq!(before, again, "the same Secret: nothing rolls");
    assert_eq!(before.0, rotated.0, "the config is the same");
    assert_ne!(
        before.1, rotated.1,
        "a rotated Secret changes the pod template"
    );
}

#[tokio::test]
async fn the_sidecars_readiness_in_the_pods_becomes_a_condition_and_a_flip_an_event() {
    // Two pods of the worker: one sidecar ready, one not (its app is down).
    let (cache, mut pods) = kube::runtime::reflector::store();
    fixtures::cache_pod(&mut pods, fixtures::pod("worker-1", "orders", Some(true)));
    fixtures::cache_pod(&mut pods, fixtures::pod("worker-2", "orders", Some(false)));
    // A pod of another policy, and the managed Redis's pod with the same label.
    fixtures::cache_pod(&mut pods, fixtures::pod("other-1", "payments", Some(false)));
    let mut redis = fixtures::pod("orders-idemq-redis-0", "orders", None);
    redis.spec.as_mut().expect("spec").init_containers = None;
    fixtures::cache_pod(&mut pods, redis);

    let status = Arc::new(Mutex::new(None));
    let mut first = apply_prefix();
    first.push(Expect::get(TARGET, StatusCode::OK, target()));
    first.push(Expect::apply(TARGET));
    first.push(status_patch(status.clone()));
    first.push(event("Injected"));
    // Pods starting are no news: no SidecarsReady event the first time.
    first.push(event("RedisNotReady"));
    let (ctx, handle) = fixtures::context();
    ctx.add_pod_cache(cache);
    let server = tokio::spawn(fixtures::serve(handle, first));
    reconcile(Arc::new(fixtures::policy()), ctx.clone())
        .await
        .expect("reconciles");
    server.await.expect("every expected request came");
    let sidecars = |status: &Mutex<Option<Value>>| {
        status.lock().expect("lock").as_ref().expect("status")["conditions"]
            .as_array()
            .expect("conditions")
            .iter()
            .find(|c| c["type"] == "SidecarsReady")
            .cloned()
            .expect("SidecarsReady")
    };
    let condition = sidecars(&status);
    assert_eq!(condition["status"], "False");
    assert_eq!(condition["reason"], "PodsNotReady");
    assert_eq!(
        condition["message"],
        "1 of 2 pods ready; not ready: worker-2"
    );
    assert!(
        conditions(&status).contains(&("Ready".into(), "False".into(), "NotReady".into())),
        "Ready waits for the store only"
    );

    // worker-2's sidecar turns ready: the condition flips to True, with a
    // Normal Event saying so, and nothing else is said again.
    let ic = with_status(fixtures::policy(), &status);
    let flipped = Arc::new(Mutex::new(None));
    let mut second = apply_prefix();
    second.push(Expect::get(TARGET, StatusCode::OK, target()));
    second.push(Expect::apply(TARGET));
    second.push(status_patch(flipped.clone()));
    second.push(
        Expect::new(Method::POST, EVENTS, StatusCode::CREATED, Value::Null).with_body(|e| {
            assert_eq!(e["reason"], "PodsReady");
            assert_eq!(e["type"], "Normal");
            assert_eq!(e["note"], "2 of 2 pods ready");
        }),
    );
    let (ctx2, handle) = fixtures::context();
    let (cache2, mut pods2) = kube::runtime::reflector::store();
    for name in ["worker-1", "worker-2"] {
        fixtures::cache_pod(&mut pods2, fixtures::pod(name, "orders", Some(true)));
    }
    ctx2.add_pod_cache(cache2);
    let server = tokio::spawn(fixtures::serve(handle, second));
    reconcile(Arc::new(ic), ctx2).await.expect("reconciles");
    server.await.expect("every expected request came");
    let condition = sidecars(&flipped);
    assert_eq!(
        (condition["status"].as_str(), condition["reason"].as_str()),
        (Some("True"), Some("PodsReady"))
    );
    drop((ctx, pods));
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
            StatusCode::NOT_FOUND,
            not_found(),
        ),
        Expect::new(Method::DELETE, REDIS_STS, StatusCode::OK, deleted.clone()),
        Expect::new(Method::DELETE, REDIS_PDB, StatusCode::OK, deleted.clone()),
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

#[tokio::test]
async fn upgrade_from_the_redis_deployment_deletes_it_before_the_stateful_set_is_applied() {
    let deleted = json!({ "kind": "Status", "apiVersion": "v1", "status": "Success", "code": 200 });
    let mut expected = apply_prefix();
    // The Deployment of the former, ephemeral store exists: it goes first,
    // then the StatefulSet comes (the verifier checks the order).
    let old = json!({ "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": { "name": "orders-idemq-redis", "namespace": "shop" } });
    expected.splice(
        8..9,
        [
            Expect::get(REDIS_DEPLOY, StatusCode::OK, old),
            Expect::new(Method::DELETE, REDIS_DEPLOY, StatusCode::OK, deleted),
        ],
    );
    expected.push(Expect::get(TARGET, StatusCode::OK, target()));
    expected.push(Expect::apply(TARGET));
    expected.push(status_patch(Arc::new(Mutex::new(None))));
    expected.push(event("Injected"));
    expected.push(event("RedisNotReady"));
    run(fixtures::policy(), expected).await.expect("reconciles");
}

#[tokio::test]
async fn an_ephemeral_store_is_a_deployment_and_no_stateful_set_remains() {
    let mut ic = fixtures::policy();
    ic.spec.store.managed = Some(crate::crd::ManagedStore {
        ephemeral: Some(true),
        ..Default::default()
    });
    let deleted = json!({ "kind": "Status", "apiVersion": "v1", "status": "Success", "code": 200 });
    let mut expected = apply_prefix();
    expected.splice(
        8..13,
        [
            Expect::get(
                REDIS_STS,
                StatusCode::OK,
                json!({ "apiVersion": "apps/v1", "kind": "StatefulSet",
                    "metadata": { "name": "orders-idemq-redis", "namespace": "shop" } }),
            ),
            Expect::new(Method::DELETE, REDIS_STS, StatusCode::OK, deleted),
            Expect::get(REDIS_PDB, StatusCode::NOT_FOUND, not_found()),
            Expect::get(REDIS_DEPLOY, StatusCode::NOT_FOUND, not_found()),
            Expect::apply(REDIS_DEPLOY).with_body(|d| {
                assert!(d["spec"]["template"]["spec"]["volumes"][0]
                    .get("emptyDir")
                    .is_some())
            }),
        ],
    );
    expected.push(Expect::get(TARGET, StatusCode::OK, target()));
    expected.push(Expect::apply(TARGET));
    expected.push(status_patch(Arc::new(Mutex::new(None))));
    expected.push(event("Injected"));
    expected.push(event("RedisNotReady"));
    run(ic, expected).await.expect("reconciles");
}

#[tokio::test]
async fn adding_replicas_recreates_the_service_headless_and_keeps_the_stateful_set() {
    let mut ic = fixtures::policy();
    ic.spec.store.managed = Some(crate::crd::ManagedStore {
        replicas: Some(2),
        ..Default::default()
    });
    let deleted = json!({ "kind": "Status", "apiVersion": "v1", "status": "Success", "code": 200 });
    // The one Redis's Service, with its cluster IP: it cannot become
    // headless in place, so it goes first and comes back headless.
    let single = json!({ "apiVersion": "v1", "kind": "Service",
        "metadata": { "name": "orders-idemq-redis", "namespace": "shop" },
        "spec": { "clusterIP": "10.96.0.17", "ports": [{ "name": "redis", "port": 6379 }] } });
    let mut expected = apply_prefix();
    expected.splice(
        5..8,
        [
            Expect::get(REDIS_SVC, StatusCode::OK, single),
            Expect::new(Method::DELETE, REDIS_SVC, StatusCode::OK, deleted),
            Expect::get(REDIS_SVC, StatusCode::NOT_FOUND, not_found()),
            Expect::apply(REDIS_SVC).with_body(|s| {
                assert_eq!(s["spec"]["clusterIP"], "None");
                assert_eq!(s["spec"]["publishNotReadyAddresses"], true);
            }),
        ],
    );
    // The StatefulSet keeps its name and Service name; it grows to 3 pods
    // of Redis and Sentinel. The budget lets one pod go at a time.
    let sts = expected
        .iter()
        .position(|e| e.path == REDIS_STS && e.method == Method::PATCH)
        .expect("the StatefulSet is applied");
    expected[sts] = Expect::apply(REDIS_STS).with_body(|s| {
        assert_eq!(s["spec"]["replicas"], 3);
        assert_eq!(s["spec"]["serviceName"], "orders-idemq-redis");
        let containers = &s["spec"]["template"]["spec"]["containers"];
        assert_eq!(containers[1]["name"], "sentinel");
    });
    let pdb = expected
        .iter()
        .position(|e| e.path == REDIS_PDB && e.method == Method::PATCH)
        .expect("the budget is applied");
    expected[pdb] = Expect::apply(REDIS_PDB).with_body(|p| {
        assert_eq!(p["spec"]["maxUnavailable"], 1);
        assert!(p["spec"].get("minAvailable").is_none(), "{p}");
    });
    expected.push(Expect::get(TARGET, StatusCode::OK, target()));
    expected.push(Expect::apply(TARGET).with_body(|p| {
        assert!(
            p.to_string()
                .contains("redis://orders-idemq-redis-0.orders-idemq-redis.shop.svc:26379"),
            "the sidecars are given the Sentinels: {p}"
        );
    }));
    expected.push(status_patch(Arc::new(Mutex::new(None))));
    expected.push(event("Injected"));
    expected.push(event("RedisNotReady"));
    run(ic, expected).await.expect("reconciles");
}

/// A redis-server of the test's own (it is written to), stopped on drop.
struct OwnRedis {
    port: u16,
    child: std::process::Child,
}

impl OwnRedis {
    async fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let child = std::process::Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("start redis-server (apt-get install redis-server)");
        let redis = Self { port, child };
        for _ in 0..100 {
            if redis.connection().await.is_ok() {
                return redis;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        panic!("own redis-server did not answer");
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    async fn connection(&self) -> redis::RedisResult<redis::aio::MultiplexedConnection> {
        redis::Client::open(self.url())?
            .get_multiplexed_async_connection()
            .await
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn a_store_reset_is_reported_and_the_annotation_acknowledges_it() {
    const STORE_SECRET: &str = "/api/v1/namespaces/shop/secrets/orders-redis";
    let redis = OwnRedis::start().await;
    // What a sidecar writes when it finds the epoch changed.
    let record = "0a1b2c3d4e5f6071>8091a2b3c4d5e6f7@1764400000000";
    let mut conn = redis.connection().await.expect("own redis");
    let _: () = redis::cmd("HSET")
        .arg("idemq:{shop.orders}:m")
        .arg("reset")
        .arg(record)
        .query_async(&mut conn)
        .await
        .expect("HSET");

    let mut ic = fixtures::policy();
    ic.spec.store = serde_json::from_value(
        json!({ "mode": "external", "external": { "secretRef": { "name": "orders-redis", "key": "url" } } }),
    )
    .expect("store spec");
    let store_secret = json!({ "apiVersion": "v1", "kind": "Secret",
        "metadata": { "name": "orders-redis", "namespace": "shop" },
        "data": { "url": serde_json::to_value(k8s_openapi::ByteString(redis.url().into_bytes())).expect("base64") } });
    let reconcile_with =
        |status: Arc<Mutex<Option<Value>>>, before: Vec<Expect>, after: Vec<Expect>| {
            let mut expected = vec![
                Expect::get(CM, StatusCode::NOT_FOUND, not_found()),
                Expect::apply(CM),
                Expect::get(STORE_SECRET, StatusCode::OK, store_secret.clone()),
                Expect::get(BROKER_SECRET, StatusCode::OK, broker_secret()),
                // The digest of both Secrets' content: as read above.
                Expect::get(TARGET, StatusCode::OK, target()),
                Expect::apply(TARGET),
            ];
            expected.extend(before);
            expected.push(status_patch(status));
            expected.extend(after);
            expected
        };

    // Found: StoreReset True, quoting the record, and a Warning Event.
    let status = Arc::new(Mutex::new(None));
    let expected = reconcile_with(
        status.clone(),
        vec![event("StoreReset").with_body(move |e| {
            assert!(
                e["note"].as_str().is_some_and(|n| n.contains(record)),
                "{e}"
            )
        })],
        vec![event("Injected")],
    );
    run(ic.clone(), expected).await.expect("reconciles");
    assert!(conditions(&status).contains(&(
        "StoreReset".into(),
        "True".into(),
        "ResetDetected".into()
    )));

    // Acknowledged by the annotation: the record goes, the condition turns False.
    let mut acknowledged = with_status(ic, &status);
    acknowledged.metadata.annotations = Some(
        [(
            crate::labels::ACKNOWLEDGE_STORE_RESET.to_string(),
            record.to_string(),
        )]
        .into(),
    );
    let after = Arc::new(Mutex::new(None));
    // No Event: nothing new happened to the workload, and no reset is no news.
    let expected = reconcile_with(after.clone(), vec![], vec![]);
    run(acknowledged, expected).await.expect("reconciles");
    assert!(conditions(&after).contains(&(
        "StoreReset".into(),
        "False".into(),
        "ResetAcknowledged".into()
    )));
    let left: Option<String> = redis::cmd("HGET")
        .arg("idemq:{shop.orders}:m")
        .arg("reset")
        .query_async(&mut conn)
        .await
        .expect("HGET");
    assert_eq!(left, None, "the record is removed");
}

/// Kafka: the resource's topics on the real Kafka-protocol broker of
/// 127.0.0.1:9092 (tansu, `.ci/services.sh`), through the production binder;
/// the store is a Redis of the test's own, so that only the broker decides.
mod kafka {
    use std::time::Duration;

    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    use rdkafka::ClientConfig;

    use super::*;
    use crate::broker::Brokers;

    const KAFKA_SECRET: &str = "/api/v1/namespaces/shop/secrets/kafka-orders";
    const STORE_SECRET: &str = "/api/v1/namespaces/shop/secrets/orders-redis";
    const BOOTSTRAP: &str = "127.0.0.1:9092";
    const TIMEOUT: Duration = Duration::from_secs(10);

    fn admin() -> AdminClient<DefaultClientContext> {
        ClientConfig::new()
            .set("bootstrap.servers", BOOTSTRAP)
            .create()
            .expect("kafka admin client")
    }

    /// Partitions of `topic` on the broker; None when it does not exist.
    fn partitions(admin: &AdminClient<DefaultClientContext>, topic: &str) -> Option<usize> {
        let metadata = admin.inner().fetch_metadata(None, TIMEOUT).expect(
            "Kafka on 127.0.0.1:9092 (start it with: source .ci/services.sh && ensure_kafka)",
        );
        metadata
            .topics()
            .iter()
            .find(|t| t.name() == topic && t.error().is_none())
            .map(|t| t.partitions().len())
    }

    fn secret(name: &str, key: &str, value: &str) -> Value {
        json!({ "apiVersion": "v1", "kind": "Secret", "metadata": { "name": name, "namespace": "shop" },
                "data": { key: serde_json::to_value(k8s_openapi::ByteString(value.as_bytes().to_vec())).expect("base64") } })
    }

    /// The sample Kafka policy on `topic`, with the store of `redis`.
    fn policy(topic: &str, redis: &OwnRedis) -> (IdempotentConsumer, Value) {
        let mut ic = fixtures::kafka_policy();
        let kafka = ic.spec.broker.kafka.as_mut().expect("kafka");
        kafka.topics = vec![topic.to_string()];
        kafka.dead_letter_partitions = Some(2);
        ic.spec.store = serde_json::from_value(
            json!({ "mode": "external", "external": { "secretRef": { "name": "orders-redis", "key": "url" } } }),
        )
        .expect("store spec");
        (ic, secret("orders-redis", "url", &redis.url()))
    }

    /// Reconciles `ic` with the production binder; the API answers as given.
    async fn reconcile_kafka(
        ic: IdempotentConsumer,
        store_secret: Value,
        status: Arc<Mutex<Option<Value>>>,
        events: Vec<Expect>,
    ) {
        let mut expected = vec![
            Expect::get(CM, StatusCode::NOT_FOUND, not_found()),
            Expect::apply(CM).with_body(|cm| {
                let yaml = cm["data"]["sidecar.yaml"].as_str().unwrap_or_default();
                assert!(
                    yaml.contains("kafka:") && !yaml.contains(BOOTSTRAP),
                    "{yaml}"
                );
            }),
            Expect::get(STORE_SECRET, StatusCode::OK, store_secret.clone()),
            Expect::get(
                KAFKA_SECRET,
                StatusCode::OK,
                secret("kafka-orders", "bootstrapServers", BOOTSTRAP),
            ),
            // The digest of both Secrets' content: as read above.
            Expect::get(TARGET, StatusCode::OK, target()),
            Expect::apply(TARGET).with_body(|p| {
                let env = p["spec"]["template"]["spec"]["initContainers"][0]["env"].to_string();
                assert!(
                    env.contains("IDEMQ_KAFKA_BOOTSTRAP_SERVERS") && !env.contains(BOOTSTRAP),
                    "a reference, not the value: {env}"
                );
            }),
            status_patch(status),
        ];
        expected.extend(events);
        let (ctx, handle) = fixtures::context_with(
            Arc::new(Brokers::default()),
            crate::controller::DEFAULT_BROKER_OPERATIONS,
        );
        let server = tokio::spawn(fixtures::serve(handle, expected));
        let result = reconcile(Arc::new(ic), ctx).await;
        server.await.expect("every expected request came");
        result.expect("reconciles");
    }

    fn condition(status: &Mutex<Option<Value>>, type_: &str) -> (String, String, String) {
        let status = status.lock().expect("lock").clone().expect("status");
        let c = status["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["type"] == type_)
            .unwrap_or_else(|| panic!("no {type_} condition in {status}"));
        let text = |k: &str| c[k].as_str().unwrap_or_default().to_string();
        (text("status"), text("reason"), text("message"))
    }

    #[tokio::test]
    async fn a_missing_topic_is_topic_not_found_with_an_event_and_is_not_created() {
        let redis = OwnRedis::start().await;
        let topic = format!(
            "op-scn-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..10]
        );
        let (ic, store_secret) = policy(&topic, &redis);
        let status = Arc::new(Mutex::new(None));
        let named = topic.clone();
        let events = vec![
            event("Injected"),
            event("TopicNotFound").with_body(move |e| {
                assert_eq!(e["type"], "Warning");
                assert!(
                    e["note"].as_str().is_some_and(|n| n.contains(&named)),
                    "the Event names the topic: {e}"
                );
            }),
        ];
        reconcile_kafka(ic, store_secret, status.clone(), events).await;
        let admin = admin();
        let created = (
            partitions(&admin, &topic),
            partitions(&admin, &format!("{topic}.dead")),
        );
        let (bound, reason, message) = condition(&status, "BrokerBound");
        println!("BrokerBound={bound} reason={reason}: {message}");
        assert_eq!(
            (bound.as_str(), reason.as_str()),
            ("False", "TopicNotFound")
        );
        assert!(message.contains(&topic), "{message}");
        assert_eq!(condition(&status, "Ready").0, "False");
        assert_eq!(
            created,
            (None, None),
            "neither the topic nor its dead-letter topic is created"
        );
    }

    #[tokio::test]
    async fn present_topics_bind_the_resource_ready_and_the_dead_letter_topic_is_created() {
        let redis = OwnRedis::start().await;
        let topic = format!(
            "op-scn-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..10]
        );
        let dead = format!("{topic}.dead");
        let admin = admin();
        let opts = AdminOptions::new().operation_timeout(Some(TIMEOUT));
        admin
            .create_topics(
                &[NewTopic::new(&topic, 1, TopicReplication::Fixed(1))],
                &opts,
            )
            .await
            .expect(
                "Kafka on 127.0.0.1:9092 (start it with: source .ci/services.sh && ensure_kafka)",
            )
            .into_iter()
            .for_each(|r| {
                r.expect("topic created");
            });
        let (ic, store_secret) = policy(&topic, &redis);
        let status = Arc::new(Mutex::new(None));
        reconcile_kafka(ic, store_secret, status.clone(), vec![event("Injected")]).await;
        let dead_partitions = partitions(&admin, &dead);
        let _ = admin.delete_topics(&[&topic, &dead], &opts).await;
        for type_ in ["StoreReady", "BrokerBound", "SidecarInjected", "Ready"] {
            let (value, reason, message) = condition(&status, type_);
            println!("{type_}={value} reason={reason}: {message}");
            assert_eq!(value, "True", "{type_}: {reason}: {message}");
        }
        assert!(condition(&status, "BrokerBound").2.contains(&dead));
        assert_eq!(
            dead_partitions,
            Some(2),
            "created with deadLetterPartitions"
        );
    }
}

/// JetStream: the resource's stream on the real NATS of 127.0.0.1:4222
/// (`.ci/services.sh`), through the production binder; the store is a Redis
/// of the test's own, so that only the broker decides. Each test uses
/// streams of its own and deletes them.
mod jetstream {
    use async_nats::jetstream::{self as js, stream};

    use super::*;
    use crate::broker::Brokers;

    const NATS_SECRET: &str = "/api/v1/namespaces/shop/secrets/nats-orders";
    const STORE_SECRET: &str = "/api/v1/namespaces/shop/secrets/orders-redis";
    const URL: &str = "nats://127.0.0.1:4222";
    const START: &str = "source .ci/services.sh && ensure_nats";

    async fn context() -> js::Context {
        let client = async_nats::connect(URL).await.unwrap_or_else(|e| {
            panic!("NATS does not answer on {URL} ({e}); start it with: {START}")
        });
        js::new(client)
    }

    fn secret(name: &str, pairs: &[(&str, &str)]) -> Value {
        let data: serde_json::Map<String, Value> = pairs
            .iter()
            .map(|(k, v)| {
                (
                    k.to_string(),
                    serde_json::to_value(k8s_openapi::ByteString(v.as_bytes().to_vec()))
                        .expect("base64"),
                )
            })
            .collect();
        json!({ "apiVersion": "v1", "kind": "Secret", "metadata": { "name": name, "namespace": "shop" },
                "data": data })
    }

    /// The connection Secret of the sample policy, for the shared NATS
    /// (which takes any user and password: it requires none).
    fn nats_secret() -> Value {
        secret(
            "nats-orders",
            &[("url", URL), ("username", "orders"), ("password", "s3cret")],
        )
    }

    /// The sample JetStream policy on `stream`, with the store of `redis`.
    fn policy(stream: &str, redis: &OwnRedis) -> (IdempotentConsumer, Value) {
        let mut ic = fixtures::jetstream_policy();
        let binding = ic.spec.broker.jetstream.as_mut().expect("jetstream");
        binding.stream = stream.to_string();
        binding.filter_subjects = vec![format!("{stream}.in")];
        binding.dead_letter_subject = format!("{stream}.dead");
        binding.dead_letter_stream = Some(format!("{stream}-DEAD"));
        ic.spec.store = serde_json::from_value(
            json!({ "mode": "external", "external": { "secretRef": { "name": "orders-redis", "key": "url" } } }),
        )
        .expect("store spec");
        (ic, secret("orders-redis", &[("url", &redis.url())]))
    }

    /// Reconciles `ic` with the production binder; the API answers as given.
    async fn reconcile_jetstream(
        ic: IdempotentConsumer,
        store_secret: Value,
        status: Arc<Mutex<Option<Value>>>,
        events: Vec<Expect>,
    ) {
        let mut expected = vec![
            Expect::get(CM, StatusCode::NOT_FOUND, not_found()),
            Expect::apply(CM).with_body(|cm| {
                let yaml = cm["data"]["sidecar.yaml"].as_str().unwrap_or_default();
                assert!(
                    yaml.contains("jetstream:")
                        && yaml.contains("consumer: shop_orders")
                        && !yaml.contains("rabbitmq")
                        && !yaml.contains("kafka")
                        && !yaml.contains(URL),
                    "{yaml}"
                );
            }),
            Expect::get(STORE_SECRET, StatusCode::OK, store_secret.clone()),
            Expect::get(NATS_SECRET, StatusCode::OK, nats_secret()),
            // The digest of both Secrets' content: as read above.
            Expect::get(TARGET, StatusCode::OK, target()),
            Expect::apply(TARGET).with_body(|p| {
                let env = p["spec"]["template"]["spec"]["initContainers"][0]["env"].to_string();
                for var in [
                    "IDEMQ_BROKER_URL",
                    "IDEMQ_BROKER_USER",
                    "IDEMQ_BROKER_PASSWORD",
                ] {
                    assert!(env.contains(var), "{var} in {env}");
                }
                assert!(
                    !env.contains(URL) && !env.contains("s3cret"),
                    "references, not values: {env}"
                );
            }),
            status_patch(status),
        ];
        expected.extend(events);
        let (ctx, handle) = fixtures::context_with(
            Arc::new(Brokers::default()),
            crate::controller::DEFAULT_BROKER_OPERATIONS,
        );
        let server = tokio::spawn(fixtures::serve(handle, expected));
        let result = reconcile(Arc::new(ic), ctx).await;
        server.await.expect("every expected request came");
        result.expect("reconciles");
    }

    fn condition(status: &Mutex<Option<Value>>, type_: &str) -> (String, String, String) {
        let status = status.lock().expect("lock").clone().expect("status");
        let c = status["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["type"] == type_)
            .unwrap_or_else(|| panic!("no {type_} condition in {status}"));
        let text = |k: &str| c[k].as_str().unwrap_or_default().to_string();
        (text("status"), text("reason"), text("message"))
    }

    fn unique() -> String {
        format!(
            "op-scn-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..10]
        )
    }

    #[tokio::test]
    async fn a_missing_stream_is_stream_not_found_with_an_event_and_nothing_is_created() {
        let redis = OwnRedis::start().await;
        let name = unique();
        let (ic, store_secret) = policy(&name, &redis);
        let status = Arc::new(Mutex::new(None));
        let named = name.clone();
        let events = vec![
            event("Injected"),
            event("StreamNotFound").with_body(move |e| {
                assert_eq!(e["type"], "Warning");
                assert!(
                    e["note"].as_str().is_some_and(|n| n.contains(&named)),
                    "the Event names the stream: {e}"
                );
            }),
        ];
        reconcile_jetstream(ic, store_secret, status.clone(), events).await;
        let js = context().await;
        let dead_letter_stream = js.get_stream(format!("{name}-DEAD")).await.is_ok();
        let (bound, reason, message) = condition(&status, "BrokerBound");
        println!("BrokerBound={bound} reason={reason}: {message}");
        assert_eq!(
            (bound.as_str(), reason.as_str()),
            ("False", "StreamNotFound")
        );
        assert!(message.contains(&name), "{message}");
        assert_eq!(condition(&status, "Ready").0, "False");
        assert!(
            !dead_letter_stream,
            "nothing is created before the stream exists"
        );
    }

    #[tokio::test]
    async fn an_existing_stream_binds_ready_with_the_consumer_and_dead_letter_stream_created() {
        let redis = OwnRedis::start().await;
        let name = unique();
        let js = context().await;
        js.create_stream(stream::Config {
            name: name.clone(),
            subjects: vec![format!("{name}.in")],
            ..Default::default()
        })
        .await
        .expect("create the producers' stream");
        let (ic, store_secret) = policy(&name, &redis);
        let status = Arc::new(Mutex::new(None));
        reconcile_jetstream(ic, store_secret, status.clone(), vec![event("Injected")]).await;
        let consumer = match js.get_stream(&name).await {
            Ok(s) => s.consumer_info("shop_orders").await.ok(),
            Err(_) => None,
        };
        let dead = js.get_stream(format!("{name}-DEAD")).await.ok();
        let dead_subjects = dead.map(|s| s.cached_info().config.subjects.clone());
        for s in [name.clone(), format!("{name}-DEAD")] {
            let _ = js.delete_stream(s).await;
        }
        for type_ in ["StoreReady", "BrokerBound", "SidecarInjected", "Ready"] {
            let (value, reason, message) = condition(&status, type_);
            println!("{type_}={value} reason={reason}: {message}");
            assert_eq!(value, "True", "{type_}: {reason}: {message}");
        }
        let consumer = consumer.expect("the durable consumer was created");
        assert_eq!(
            (
                consumer.config.ack_wait,
                consumer.config.max_ack_pending,
                consumer.config.max_deliver
            ),
            (std::time::Duration::from_secs(20), 50, 10),
            "with the spec's settings"
        );
        assert_eq!(dead_subjects, Some(vec![format!("{name}.dead")]));
    }
}

/// MQTT: nothing to declare, the binding is the sidecar's subscription; the
/// operator checks that the broker answers and takes the credentials, through
/// the production binder, against the local Mosquitto (127.0.0.1:1883) and a
/// Mosquitto of the test's own that requires a password.
mod mqtt {
    use std::process::{Child, Command, Stdio};

    use super::*;
    use crate::broker::Brokers;

    const MQTT_SECRET: &str = "/api/v1/namespaces/shop/secrets/mqtt-telemetry";
    const STORE_SECRET: &str = "/api/v1/namespaces/shop/secrets/orders-redis";

    fn secret(name: &str, pairs: &[(&str, &str)]) -> Value {
        let data: serde_json::Map<String, Value> = pairs
            .iter()
            .map(|(k, v)| {
                let value = serde_json::to_value(k8s_openapi::ByteString(v.as_bytes().to_vec()))
                    .expect("base64");
                (k.to_string(), value)
            })
            .collect();
        json!({ "apiVersion": "v1", "kind": "Secret", "metadata": { "name": name, "namespace": "shop" }, "data": data })
    }

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port()
    }

    /// A Mosquitto of the test's own that takes only `user`/`password`.
    struct OwnMosquitto {
        port: u16,
        child: Child,
        dir: std::path::PathBuf,
    }

    impl OwnMosquitto {
        async fn with_password(user: &str, password: &str) -> Self {
            let port = free_port();
            let dir = std::env::temp_dir().join(format!("idemq-op-mosquitto-{port}"));
            std::fs::create_dir_all(&dir).expect("temp dir");
            let passwords = dir.join("passwords");
            let made = Command::new("mosquitto_passwd")
                .args(["-b", "-c"])
                .arg(&passwords)
                .args([user, password])
                .status()
                .expect("mosquitto_passwd (source .ci/services.sh && ensure_mosquitto)");
            assert!(made.success());
            let conf = dir.join("mosquitto.conf");
            std::fs::write(
                &conf,
                format!(
                    "listener {port} 127.0.0.1\nallow_anonymous false\npassword_file {}\n",
                    passwords.display()
                ),
            )
            .expect("write mosquitto.conf");
            let child = Command::new("mosquitto")
                .arg("-c")
                .arg(&conf)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start mosquitto (source .ci/services.sh && ensure_mosquitto)");
            let own = Self { port, child, dir };
            for _ in 0..200 {
                if tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .is_ok()
                {
                    return own;
                }
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            panic!("own mosquitto did not answer on {port}");
        }
    }

    impl Drop for OwnMosquitto {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    /// The sample MQTT policy with the store of `redis`; `auth` sets
    /// `auth: userPassword`.
    fn policy(redis: &OwnRedis, auth: bool) -> (IdempotentConsumer, Value) {
        let mut ic = fixtures::mqtt_policy();
        if auth {
            ic.spec.broker.mqtt.as_mut().expect("mqtt").auth = crate::crd::MqttAuth::UserPassword;
        }
        ic.spec.store = serde_json::from_value(
            json!({ "mode": "external", "external": { "secretRef": { "name": "orders-redis", "key": "url" } } }),
        )
        .expect("store spec");
        (ic, secret("orders-redis", &[("url", &redis.url())]))
    }

    /// Reconciles `ic` with the production binder; the broker Secret holds
    /// `broker`. Returns the status written.
    async fn reconcile_mqtt(
        ic: IdempotentConsumer,
        store_secret: Value,
        broker: Value,
        events: Vec<Expect>,
    ) -> Arc<Mutex<Option<Value>>> {
        let status = Arc::new(Mutex::new(None));
        let mut expected = vec![
            Expect::get(CM, StatusCode::NOT_FOUND, not_found()),
            Expect::apply(CM).with_body(|cm| {
                let yaml = cm["data"]["sidecar.yaml"].as_str().unwrap_or_default();
                assert!(
                    yaml.contains("mqtt:")
                        && yaml.contains("sharedGroup: shop.orders")
                        && !yaml.contains("mqtt://"),
                    "{yaml}"
                );
            }),
            Expect::get(STORE_SECRET, StatusCode::OK, store_secret.clone()),
            Expect::get(MQTT_SECRET, StatusCode::OK, broker),
            // The digest of both Secrets' content: as read above.
            Expect::get(TARGET, StatusCode::OK, target()),
            Expect::apply(TARGET).with_body(|p| {
                let env = p["spec"]["template"]["spec"]["initContainers"][0]["env"].to_string();
                assert!(
                    env.contains("IDEMQ_BROKER_URL") && !env.contains("mqtt://"),
                    "a reference, not the value: {env}"
                );
            }),
            status_patch(status.clone()),
        ];
        expected.extend(events);
        let (ctx, handle) = fixtures::context_with(
            Arc::new(Brokers::default()),
            crate::controller::DEFAULT_BROKER_OPERATIONS,
        );
        let server = tokio::spawn(fixtures::serve(handle, expected));
        let result = reconcile(Arc::new(ic), ctx).await;
        server.await.expect("every expected request came");
        result.expect("reconciles");
        status
    }

    fn condition(status: &Mutex<Option<Value>>, type_: &str) -> (String, String, String) {
        let status = status.lock().expect("lock").clone().expect("status");
        let c = status["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["type"] == type_)
            .unwrap_or_else(|| panic!("no {type_} condition in {status}"));
        let text = |k: &str| c[k].as_str().unwrap_or_default().to_string();
        (text("status"), text("reason"), text("message"))
    }

    #[tokio::test]
    async fn a_broker_that_answers_binds_the_resource_ready() {
        let redis = OwnRedis::start().await;
        let (ic, store_secret) = policy(&redis, false);
        let broker = secret("mqtt-telemetry", &[("url", "mqtt://127.0.0.1:1883")]);
        let status = reconcile_mqtt(ic, store_secret, broker, vec![event("Injected")]).await;
        for type_ in ["StoreReady", "BrokerBound", "SidecarInjected", "Ready"] {
            let (value, reason, message) = condition(&status, type_);
            println!("{type_}={value} reason={reason}: {message}");
            assert_eq!(
                value, "True",
                "{type_}: {reason}: {message} (is Mosquitto on 127.0.0.1:1883? source .ci/services.sh && ensure_mosquitto)"
            );
        }
        assert!(condition(&status, "BrokerBound")
            .2
            .contains("$share/shop.orders/devices/+/readings"));
    }

    #[tokio::test]
    async fn an_unreachable_broker_is_broker_unreachable_with_an_event() {
        let redis = OwnRedis::start().await;
        let (ic, store_secret) = policy(&redis, false);
        let url = format!("mqtt://127.0.0.1:{}", free_port());
        let broker = secret("mqtt-telemetry", &[("url", &url)]);
        let events = vec![
            event("Injected"),
            event("BrokerUnreachable").with_body(|e| assert_eq!(e["type"], "Warning")),
        ];
        let status = reconcile_mqtt(ic, store_secret, broker, events).await;
        let (bound, reason, message) = condition(&status, "BrokerBound");
        println!("BrokerBound={bound} reason={reason}: {message}");
        assert_eq!(
            (bound.as_str(), reason.as_str()),
            ("False", "BrokerUnreachable")
        );
        assert_eq!(condition(&status, "Ready").0, "False");
    }

    #[tokio::test]
    async fn refused_credentials_are_broker_authentication_failed_and_stay_out_of_the_status() {
        let redis = OwnRedis::start().await;
        let mosquitto = OwnMosquitto::with_password("telemetry", "right-s3cret").await;
        let url = format!("mqtt://127.0.0.1:{}", mosquitto.port);
        let (ic, store_secret) = policy(&redis, true);
        let wrong = secret(
            "mqtt-telemetry",
            &[
                ("url", &url),
                ("username", "telemetry"),
                ("password", "wrong-s3cret"),
            ],
        );
        let events = vec![
            event("Injected"),
            event("BrokerAuthenticationFailed").with_body(|e| {
                assert!(!e.to_string().contains("s3cret"), "{e}");
            }),
        ];
        let status = reconcile_mqtt(ic.clone(), store_secret.clone(), wrong, events).await;
        let (bound, reason, message) = condition(&status, "BrokerBound");
        println!("BrokerBound={bound} reason={reason}: {message}");
        assert_eq!(
            (bound.as_str(), reason.as_str()),
            ("False", "BrokerAuthenticationFailed")
        );
        assert!(!message.contains("s3cret"), "{message}");
        let right = secret(
            "mqtt-telemetry",
            &[
                ("url", &url),
                ("username", "telemetry"),
                ("password", "right-s3cret"),
            ],
        );
        let status = reconcile_mqtt(ic, store_secret, right, vec![event("Injected")]).await;
        assert_eq!(condition(&status, "BrokerBound").0, "True");
    }
}

/// Pub/Sub: the resource's topic on Google's emulator of 127.0.0.1:8085
/// (`.ci/services.sh`), through the production binder pointed at it; the
/// store is a Redis of the test's own, so that only the broker decides. Each
/// test uses topics and subscriptions of its own and deletes them.
mod pubsub {
    use gcloud_pubsub::client::Client;
    use gcloud_pubsub::subscription::SubscriptionConfig;

    use super::*;
    use crate::broker::pool::PoolConfig;
    use crate::broker::pubsub::PubSub;
    use crate::broker::Brokers;

    const KEY_SECRET: &str = "/api/v1/namespaces/shop/secrets/pubsub-orders";
    const STORE_SECRET: &str = "/api/v1/namespaces/shop/secrets/orders-redis";
    const EMULATOR: &str = "127.0.0.1:8085";
    const PROJECT: &str = "idemq-scenarios";
    /// Stands for a service-account key: the emulator takes none.
    const KEY: &str = r#"{"type":"service_account","private_key":"s3cret"}"#;

    async fn emulator() -> Client {
        idemq_sidecar::source::pubsub::client(PROJECT, Some(EMULATOR), None)
            .await
            .unwrap_or_else(|e| {
                panic!("no Pub/Sub emulator on {EMULATOR} ({e}); start it with: source .ci/services.sh && ensure_pubsub_emulator")
            })
    }

    fn secret(name: &str, key: &str, value: &str) -> Value {
        let value = serde_json::to_value(k8s_openapi::ByteString(value.as_bytes().to_vec()))
            .expect("base64");
        json!({ "apiVersion": "v1", "kind": "Secret", "metadata": { "name": name, "namespace": "shop" },
                "data": { key: value } })
    }

    /// The sample Pub/Sub policy on `topic` (subscription `<topic>-sub`,
    /// dead letters to `<topic>-dead`), with the store of `redis`.
    fn policy(topic: &str, redis: &OwnRedis) -> (IdempotentConsumer, Value) {
        let mut ic = fixtures::pubsub_policy();
        let binding = ic.spec.broker.pubsub.as_mut().expect("pubsub");
        binding.project = PROJECT.into();
        binding.topic = topic.into();
        binding.subscription = format!("{topic}-sub");
        binding.dead_letter_policy.as_mut().expect("policy").topic = format!("{topic}-dead");
        ic.spec.store = serde_json::from_value(
            json!({ "mode": "external", "external": { "secretRef": { "name": "orders-redis", "key": "url" } } }),
        )
        .expect("store spec");
        (ic, secret("orders-redis", "url", &redis.url()))
    }

    /// Reconciles `ic` with the production binder on the emulator; the API
    /// answers as given.
    async fn reconcile_pubsub(
        ic: IdempotentConsumer,
        store_secret: Value,
        status: Arc<Mutex<Option<Value>>>,
        events: Vec<Expect>,
    ) {
        let key_secret = secret("pubsub-orders", "key.json", KEY);
        let mut expected = vec![
            Expect::get(CM, StatusCode::NOT_FOUND, not_found()),
            Expect::apply(CM).with_body(|cm| {
                let yaml = cm["data"]["sidecar.yaml"].as_str().unwrap_or_default();
                assert!(
                    yaml.contains("pubsub:")
                        && yaml.contains("credentialsFile: /etc/idemq-pubsub/key.json")
                        && !yaml.contains("s3cret"),
                    "{yaml}"
                );
            }),
            Expect::get(STORE_SECRET, StatusCode::OK, store_secret.clone()),
            Expect::get(KEY_SECRET, StatusCode::OK, key_secret),
            // The digest of both Secrets' content: as read above.
            Expect::get(TARGET, StatusCode::OK, target()),
            Expect::apply(TARGET).with_body(|p| {
                let pod = &p["spec"]["template"]["spec"];
                assert_eq!(pod["volumes"][1]["secret"]["secretName"], "pubsub-orders");
                assert!(!pod.to_string().contains("s3cret"), "a reference: {pod}");
            }),
            status_patch(status),
        ];
        expected.extend(events);
        let brokers = Brokers {
            pubsub: PubSub::new(PoolConfig::default(), Some(EMULATOR.into())),
            ..Brokers::default()
        };
        let (ctx, handle) = fixtures::context_with(
            Arc::new(brokers),
            crate::controller::DEFAULT_BROKER_OPERATIONS,
        );
        let server = tokio::spawn(fixtures::serve(handle, expected));
        let result = reconcile(Arc::new(ic), ctx).await;
        server.await.expect("every expected request came");
        result.expect("reconciles");
    }

    fn condition(status: &Mutex<Option<Value>>, type_: &str) -> (String, String, String) {
        let status = status.lock().expect("lock").clone().expect("status");
        let c = status["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["type"] == type_)
            .unwrap_or_else(|| panic!("no {type_} condition in {status}"));
        let text = |k: &str| c[k].as_str().unwrap_or_default().to_string();
        (text("status"), text("reason"), text("message"))
    }

    fn unique() -> String {
        format!("scn-{}", &uuid::Uuid::new_v4().simple().to_string()[..10])
    }

    async fn delete(client: &Client, topic: &str) {
        let _ = client
            .subscription(&format!("{topic}-sub"))
            .delete(None)
            .await;
        for t in [topic.to_string(), format!("{topic}-dead")] {
            let _ = client.topic(&t).delete(None).await;
        }
    }

    #[tokio::test]
    async fn an_existing_topic_binds_ready_with_the_subscription_created_as_specified() {
        let redis = OwnRedis::start().await;
        let client = emulator().await;
        let topic = unique();
        client
            .topic(&topic)
            .create(None, None)
            .await
            .expect("create the producers' topic");
        let (ic, store_secret) = policy(&topic, &redis);
        let status = Arc::new(Mutex::new(None));
        reconcile_pubsub(ic, store_secret, status.clone(), vec![event("Injected")]).await;
        let created = client
            .subscription(&format!("{topic}-sub"))
            .config(None)
            .await;
        delete(&client, &topic).await;
        for type_ in ["StoreReady", "BrokerBound", "SidecarInjected", "Ready"] {
            let (value, reason, message) = condition(&status, type_);
            println!("{type_}={value} reason={reason}: {message}");
            assert_eq!(value, "True", "{type_}: {reason}: {message}");
        }
        let (_, config) = created.expect("the subscription was created");
        assert_eq!(config.ack_deadline_seconds, 30, "the spec's");
        assert_eq!(
            config
                .dead_letter_policy
                .map(|d| (d.dead_letter_topic, d.max_delivery_attempts)),
            Some((format!("projects/{PROJECT}/topics/{topic}-dead"), 5))
        );
    }

    #[tokio::test]
    async fn a_subscription_with_other_settings_is_subscription_mismatch_with_an_event_and_unchanged(
    ) {
        let redis = OwnRedis::start().await;
        let client = emulator().await;
        let topic = unique();
        client
            .topic(&topic)
            .create(None, None)
            .await
            .expect("create the producers' topic");
        client
            .subscription(&format!("{topic}-sub"))
            .create(
                &format!("projects/{PROJECT}/topics/{topic}"),
                SubscriptionConfig {
                    ack_deadline_seconds: 10,
                    ..SubscriptionConfig::default()
                },
                None,
            )
            .await
            .expect("someone else's subscription");
        let (ic, store_secret) = policy(&topic, &redis);
        let status = Arc::new(Mutex::new(None));
        let events = vec![
            event("Injected"),
            event("SubscriptionMismatch").with_body(|e| {
                assert_eq!(e["type"], "Warning");
                assert!(
                    e["note"]
                        .as_str()
                        .is_some_and(|n| n.contains("ackDeadlineSeconds 10 (the spec: 30)")),
                    "the Event names the setting: {e}"
                );
                assert!(!e.to_string().contains("s3cret"));
            }),
        ];
        reconcile_pubsub(ic, store_secret, status.clone(), events).await;
        let after = client
            .subscription(&format!("{topic}-sub"))
            .config(None)
            .await;
        delete(&client, &topic).await;
        let (bound, reason, message) = condition(&status, "BrokerBound");
        println!("BrokerBound={bound} reason={reason}: {message}");
        assert_eq!(
            (bound.as_str(), reason.as_str()),
            ("False", "SubscriptionMismatch")
        );
        assert_eq!(condition(&status, "Ready").0, "False");
        let (_, config) = after.expect("still there");
        assert_eq!(config.ack_deadline_seconds, 10, "never changed");
        assert!(config.dead_letter_policy.is_none());
    }

    #[tokio::test]
    async fn a_missing_topic_is_topic_not_found_with_an_event() {
        let redis = OwnRedis::start().await;
        let client = emulator().await;
        let topic = unique();
        let (ic, store_secret) = policy(&topic, &redis);
        let status = Arc::new(Mutex::new(None));
        let named = topic.clone();
        let events = vec![
            event("Injected"),
            event("TopicNotFound").with_body(move |e| {
                assert_eq!(e["type"], "Warning");
                assert!(
                    e["note"].as_str().is_some_and(|n| n.contains(&named)),
                    "the Event names the topic: {e}"
                );
            }),
        ];
        reconcile_pubsub(ic, store_secret, status.clone(), events).await;
        let subscription = client
            .subscription(&format!("{topic}-sub"))
            .exists(None)
            .await;
        delete(&client, &topic).await;
        let (bound, reason, message) = condition(&status, "BrokerBound");
        println!("BrokerBound={bound} reason={reason}: {message}");
        assert_eq!(
            (bound.as_str(), reason.as_str()),
            ("False", "TopicNotFound")
        );
        assert_eq!(subscription.ok(), Some(false), "nothing created");
    }
}

#[tokio::test]
async fn two_brokers_in_one_resource_are_an_invalid_spec_with_a_condition_and_an_event() {
    // Stored before the schema's rule, or written past it.
    let mut ic = fixtures::kafka_policy();
    ic.spec.broker.rabbitmq = fixtures::policy().spec.broker.rabbitmq;
    let status = Arc::new(Mutex::new(None));
    let expected = vec![
        status_patch(status.clone()),
        event("InvalidSpec").with_body(|e| {
            assert_eq!(e["type"], "Warning");
            assert!(
                e["note"]
                    .as_str()
                    .is_some_and(|n| n.contains("exactly one broker")),
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
        kube::runtime::controller::Action::await_change()
    );
}

/// The sample policy with injection: pod and rollout: evict.
fn evicting_policy() -> IdempotentConsumer {
    let mut ic = fixtures::policy();
    ic.spec.injection = crate::crd::Injection::Pod;
    ic.spec.target =
        serde_json::from_value(json!({ "selector": { "matchLabels": { "app": "worker" } } }))
            .expect("target");
    ic.spec.rollout = Some(crate::crd::Rollout::Evict);
    ic
}

/// A pod of the policy with configuration `hash`, owned by `owner` (kind),
/// Ready or not.
fn owned_pod(name: &str, hash: &str, owner: &str, ready: bool) -> k8s_openapi::api::core::v1::Pod {
    let mut pod = fixtures::pod(name, "orders", Some(true));
    pod.metadata.annotations =
        Some([("idemq.dev/config-hash".to_string(), hash.to_string())].into());
    pod.metadata.owner_references = Some(vec![serde_json::from_value(json!({
        "apiVersion": "apps/v1", "kind": owner, "name": format!("worker-{owner}"),
        "uid": "u", "controller": true
    }))
    .expect("owner")]);
    pod.status.as_mut().expect("status").conditions = Some(vec![serde_json::from_value(json!({
        "type": "Ready", "status": if ready { "True" } else { "False" }
    }))
    .expect("condition")]);
    pod
}

const EVICTION: &str = "/api/v1/namespaces/shop/pods/worker-b/eviction";

/// One reconcile of the evicting policy over `pods`, with `then` expected
/// after the status and its Events.
async fn reconcile_evicting(
    ic: IdempotentConsumer,
    pods: Vec<k8s_openapi::api::core::v1::Pod>,
    then: Vec<Expect>,
) -> kube::runtime::controller::Action {
    let (cache, mut writer) = kube::runtime::reflector::store();
    for pod in pods {
        fixtures::cache_pod(&mut writer, pod);
    }
    let mut expected = apply_prefix();
    expected.push(status_patch(Arc::new(Mutex::new(None))));
    expected.push(event("Injected"));
    expected.push(event("RedisNotReady"));
    expected.extend(then);
    let (ctx, handle) = fixtures::context();
    ctx.add_pod_cache(cache);
    let server = tokio::spawn(fixtures::serve(handle, expected));
    let action = reconcile(Arc::new(ic), ctx).await.expect("reconciles");
    server.await.expect("every expected request came");
    drop(writer);
    action
}

#[tokio::test]
async fn rollout_evict_evicts_one_stale_recreated_pod_at_a_time_through_the_eviction_api() {
    let (_, hash) = crate::render::config::config_map(&evicting_policy()).expect("renders");
    let pods = || {
        vec![
            owned_pod("worker-a", &hash, "ReplicaSet", true),
            owned_pod("worker-b", "old", "ReplicaSet", true),
            owned_pod("worker-c", "old", "StatefulSet", true),
            // A Job's pod is not re-created as it was: left alone.
            owned_pod("nightly-1", "old", "Job", true),
        ]
    };
    let evicted = hash.clone();
    reconcile_evicting(
        evicting_policy(),
        pods(),
        vec![
            Expect::new(Method::POST, EVICTION, StatusCode::CREATED, json!({ "kind": "Status", "apiVersion": "v1", "status": "Success", "code": 201 }))
                .with_body(|e| assert_eq!(e["metadata"]["name"], "worker-b")),
            Expect::new(Method::POST, EVENTS, StatusCode::CREATED, Value::Null).with_body(
                move |e| {
                    assert_eq!(e["reason"], "PodEvicted");
                    assert_eq!(e["type"], "Normal");
                    assert_eq!(
                        e["note"].as_str(),
                        Some(format!("evicted pod worker-b (configuration old) so that it is re-created with configuration {evicted}").as_str())
                    );
                },
            ),
        ],
    )
    .await;

    // worker-b's replacement is not ready yet: nothing more is evicted.
    let mut waiting = pods();
    waiting[1] = owned_pod("worker-b2", &hash, "ReplicaSet", false);
    // (An eviction tried against the closed mock would fail, and be retried
    // in 30 s: the not-ready store's 5 s back-off says none was.)
    let untouched = kube::runtime::controller::Action::requeue(std::time::Duration::from_secs(5));
    assert_eq!(
        reconcile_evicting(evicting_policy(), waiting, vec![]).await,
        untouched
    );

    // A PodDisruptionBudget refuses: tried again in 30 s, no Event.
    let refused = json!({ "kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "TooManyRequests", "code": 429,
                          "message": "Cannot evict pod as it would violate the pod's disruption budget." });
    let action = reconcile_evicting(
        evicting_policy(),
        pods(),
        vec![Expect::new(
            Method::POST,
            EVICTION,
            StatusCode::TOO_MANY_REQUESTS,
            refused,
        )],
    )
    .await;
    assert_eq!(
        action,
        kube::runtime::controller::Action::requeue(std::time::Duration::from_secs(30))
    );

    // Every re-created pod current: nothing to do.
    let mut done = pods();
    done[1] = owned_pod("worker-b", &hash, "ReplicaSet", true);
    done[2] = owned_pod("worker-c", &hash, "StatefulSet", true);
    assert_eq!(
        reconcile_evicting(evicting_policy(), done, vec![]).await,
        untouched
    );

    // rollout: manual (the default): the same stale pods stay as they are.
    let mut manual = evicting_policy();
    manual.spec.rollout = None;
    assert_eq!(reconcile_evicting(manual, pods(), vec![]).await, untouched);
}

#[test]
fn the_trimmed_pod_cache_keeps_what_the_roll_reads_and_other_resources_pods_are_not_taken() {
    let (_, hash) = crate::render::config::config_map(&evicting_policy()).expect("renders");
    let pods = [owned_pod("worker-b", "old", "ReplicaSet", true)];
    let mut trimmed = pods.clone();
    for pod in &mut trimmed {
        crate::controller::pods::trim(pod);
    }
    assert_eq!(
        super::rollout::next(&evicting_policy(), &hash, &trimmed).map(|p| p.metadata.name.clone()),
        Some(Some("worker-b".into())),
        "the trimmed cache keeps what the roll reads"
    );
    let other = fixtures::pod("worker-x", "payments", Some(true));
    assert!(super::rollout::next(&evicting_policy(), &hash, [&other]).is_none());
}

/// A ZeroMQ endpoint: no broker to reach, so the binding is the CURVE
/// Secret read and checked, and the Service (and NetworkPolicy) applied.
mod zeromq {
    use super::*;

    const KEYS_SECRET: &str = "/api/v1/namespaces/shop/secrets/zeromq-orders";
    const SVC: &str = "/api/v1/namespaces/shop/services/orders";
    const NETPOL: &str = "/apis/networking.k8s.io/v1/namespaces/shop/networkpolicies/orders";

    /// A Secret with a CURVE server secret key and two client public keys.
    fn keys_secret() -> (Value, String) {
        let z85 = |key: &[u8]| zmq::z85_encode(key).expect("z85");
        let server = zmq::CurveKeyPair::new().expect("CURVE");
        let clients: Vec<String> = (0..2)
            .map(|_| z85(&zmq::CurveKeyPair::new().expect("CURVE").public_key))
            .collect();
        let secret_key = z85(&server.secret_key);
        (
            keys_secret_with(&secret_key, &clients.join("\n")),
            secret_key,
        )
    }

    fn keys_secret_with(server: &str, clients: &str) -> Value {
        let b64 = |v: &str| {
            serde_json::to_value(k8s_openapi::ByteString(v.as_bytes().to_vec())).expect("base64")
        };
        json!({ "apiVersion": "v1", "kind": "Secret",
                "metadata": { "name": "zeromq-orders", "namespace": "shop" },
                "data": { "serverSecretKey": b64(server), "clientPublicKeys": b64(clients) } })
    }

    /// The store's requests (a managed Redis not yet available).
    fn store_prefix() -> Vec<Expect> {
        let mut prefix = apply_prefix();
        prefix.truncate(prefix.len() - 1);
        prefix
    }

    fn no_secret_in(secret_key: &str) -> impl Fn(&Value) + Send + 'static {
        let secret_key = secret_key.to_string();
        move |sent| {
            assert!(
                !sent.to_string().contains(&secret_key),
                "a key leaked: {sent}"
            )
        }
    }

    fn target_apply() -> Expect {
        Expect::apply(TARGET).with_body(|p| {
            let template = &p["spec"]["template"];
            assert_eq!(
                template["metadata"]["labels"]["idemq.dev/zeromq-endpoint"],
                "orders"
            );
            let sidecar = &template["spec"]["initContainers"][0];
            let ports = sidecar["ports"].as_array().expect("ports");
            assert!(ports
                .iter()
                .any(|p| p["name"] == "idemq-zmq" && p["containerPort"] == 5555));
            let env = sidecar["env"].as_array().expect("env");
            assert!(env.iter().any(|e| e["name"] == "POD_IP"
                && e["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"));
            assert!(env
                .iter()
                .any(|e| e["name"] == "IDEMQ_ZMQ_SERVER_SECRET_KEY"
                    && e["valueFrom"]["secretKeyRef"]["name"] == "zeromq-orders"));
        })
    }

    #[tokio::test]
    async fn a_missing_curve_secret_is_reported_and_nothing_is_exposed() {
        let status = Arc::new(Mutex::new(None));
        let mut expected = store_prefix();
        expected.extend([
            // Absent once is absent for the digest too: no second read.
            Expect::get(KEYS_SECRET, StatusCode::NOT_FOUND, not_found()),
            Expect::get(TARGET, StatusCode::OK, target()),
            target_apply(),
            status_patch(status.clone()),
            event("Injected"),
            event("RedisNotReady"),
            Expect::new(Method::POST, EVENTS, StatusCode::CREATED, Value::Null).with_body(|e| {
                assert_eq!(e["reason"], "SecretNotFound");
                assert_eq!(e["type"], "Warning");
                assert_eq!(e["note"], "Secret zeromq-orders does not exist");
            }),
        ]);
        run(fixtures::zeromq_policy(), expected)
            .await
            .expect("reconciles");
        assert!(conditions(&status).contains(&(
            "BrokerBound".into(),
            "False".into(),
            "SecretNotFound".into()
        )));
    }

    #[tokio::test]
    async fn a_garbled_key_is_named_without_its_value() {
        let status = Arc::new(Mutex::new(None));
        let secret = keys_secret_with("not-a-curve-key-but-a-secret", "also-not-a-key");
        let mut expected = store_prefix();
        expected.extend([
            Expect::get(KEYS_SECRET, StatusCode::OK, secret),
            Expect::get(TARGET, StatusCode::OK, target()),
            target_apply(),
            status_patch(status.clone()).with_body({
                let status = status.clone();
                move |b| {
                    assert!(!b.to_string().contains("not-a-curve-key"), "{b}");
                    *status.lock().expect("lock") = Some(b["status"].clone());
                }
            }),
            event("Injected"),
            event("RedisNotReady"),
            Expect::new(Method::POST, EVENTS, StatusCode::CREATED, Value::Null).with_body(|e| {
                assert_eq!(e["reason"], "CurveKeyInvalid");
                assert_eq!(
                    e["note"],
                    "key \"serverSecretKey\" of Secret zeromq-orders is not a Z85-encoded CURVE key (40 characters)"
                );
            }),
        ]);
        run(fixtures::zeromq_policy(), expected)
            .await
            .expect("reconciles");
        assert!(conditions(&status).contains(&(
            "BrokerBound".into(),
            "False".into(),
            "CurveKeyInvalid".into()
        )));
    }

    /// Dead letters to RabbitMQ through a Secret that lacks the URL key: the
    /// pods could not start, so the resource says why before exposing them.
    #[tokio::test]
    async fn a_dead_letter_broker_secret_without_its_key_is_reported() {
        const DEAD_SECRET: &str = "/api/v1/namespaces/shop/secrets/dead-letters";
        let mut ic = fixtures::zeromq_policy();
        ic.spec.broker.zeromq.as_mut().expect("zeromq").dead_letter = serde_yaml::from_str(
            "rabbitmq: { connectionSecretRef: { name: dead-letters }, queue: orders.dead }",
        )
        .expect("a deadLetter");
        let dead = json!({ "apiVersion": "v1", "kind": "Secret",
            "metadata": { "name": "dead-letters", "namespace": "shop" },
            "data": { "uri": "YW1xcDovL2d1ZXN0Omd1ZXN0QGxvY2FsaG9zdA==" } });
        let (secret, _) = keys_secret();
        let status = Arc::new(Mutex::new(None));
        let mut expected = store_prefix();
        expected.extend([
            Expect::get(KEYS_SECRET, StatusCode::OK, secret),
            // Both Secrets as read here make the digest.
            Expect::get(DEAD_SECRET, StatusCode::OK, dead),
            Expect::get(TARGET, StatusCode::OK, target()),
            Expect::apply(TARGET),
            status_patch(status.clone()),
            event("Injected"),
            event("RedisNotReady"),
            Expect::new(Method::POST, EVENTS, StatusCode::CREATED, Value::Null).with_body(|e| {
                assert_eq!(e["reason"], "SecretKeyMissing");
                assert_eq!(e["note"], "Secret dead-letters has no key \"url\"");
            }),
        ]);
        run(ic, expected).await.expect("reconciles");
        assert!(conditions(&status).contains(&(
            "BrokerBound".into(),
            "False".into(),
            "SecretKeyMissing".into()
        )));
    }

    /// Dead letters to Kafka through a Secret that does not exist: said
    /// with whose Secret it is, and read once (absent for the digest too).
    #[tokio::test]
    async fn an_absent_dead_letter_broker_secret_is_reported_as_the_dead_letter_brokers() {
        const DEAD_SECRET: &str = "/api/v1/namespaces/shop/secrets/kafka-dead";
        let mut ic = fixtures::zeromq_policy();
        ic.spec.broker.zeromq.as_mut().expect("zeromq").dead_letter = serde_yaml::from_str(
            "kafka: { connectionSecretRef: { name: kafka-dead }, topic: orders.dead }",
        )
        .expect("a deadLetter");
        let (secret, _) = keys_secret();
        let status = Arc::new(Mutex::new(None));
        let mut expected = store_prefix();
        expected.extend([
            Expect::get(KEYS_SECRET, StatusCode::OK, secret),
            Expect::get(DEAD_SECRET, StatusCode::NOT_FOUND, not_found()),
            Expect::get(TARGET, StatusCode::OK, target()),
            Expect::apply(TARGET),
            status_patch(status.clone()),
            event("Injected"),
            event("RedisNotReady"),
            Expect::new(Method::POST, EVENTS, StatusCode::CREATED, Value::Null).with_body(|e| {
                assert_eq!(e["reason"], "SecretNotFound");
                assert_eq!(
                    e["note"],
                    "Secret kafka-dead (the dead-letter broker's) does not exist"
                );
            }),
        ]);
        run(ic, expected).await.expect("reconciles");
        assert!(conditions(&status).contains(&(
            "BrokerBound".into(),
            "False".into(),
            "SecretNotFound".into()
        )));
    }

    #[tokio::test]
    async fn with_its_keys_the_endpoint_gets_an_owned_service_and_network_policy_and_is_bound() {
        let status = Arc::new(Mutex::new(None));
        let (secret, secret_key) = keys_secret();
        let mut expected = store_prefix();
        expected.extend([
            Expect::get(KEYS_SECRET, StatusCode::OK, secret),
            Expect::get(SVC, StatusCode::NOT_FOUND, not_found()),
            Expect::apply(SVC).with_body(|s| {
                assert_eq!(
                    s["metadata"]["ownerReferences"][0]["kind"],
                    "IdempotentConsumer"
                );
                assert_eq!(s["metadata"]["ownerReferences"][0]["controller"], true);
                assert_eq!(s["spec"]["selector"]["idemq.dev/zeromq-endpoint"], "orders");
                assert_eq!(s["spec"]["ports"][0]["port"], 5555);
                assert_eq!(s["spec"]["ports"][0]["targetPort"], "idemq-zmq");
            }),
            Expect::get(NETPOL, StatusCode::NOT_FOUND, not_found()),
            Expect::apply(NETPOL).with_body(|p| {
                assert_eq!(p["metadata"]["ownerReferences"][0]["controller"], true);
                assert_eq!(
                    p["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"]["app"],
                    "orders-client"
                );
                assert_eq!(p["spec"]["ingress"][0]["ports"][0]["port"], 5555);
            }),
            Expect::get(TARGET, StatusCode::OK, target()),
            target_apply().with_body(no_secret_in(&secret_key)),
            status_patch(status.clone()),
            event("Injected").with_body(no_secret_in(&secret_key)),
            event("RedisNotReady"),
        ]);
        run(fixtures::zeromq_policy(), expected)
            .await
            .expect("reconciles");
        assert!(conditions(&status).contains(&(
            "BrokerBound".into(),
            "True".into(),
            "Bound".into()
        )));
        let written = status.lock().expect("lock").clone().expect("status");
        assert!(!written.to_string().contains(&secret_key));
        assert!(
            written.to_string().contains(
                "Service orders exposes the sidecars' ROUTER socket on port 5555 (CURVE)"
            ),
            "{written}"
        );
    }

    #[tokio::test]
    async fn a_service_of_someone_elses_is_reported_never_taken_over() {
        let status = Arc::new(Mutex::new(None));
        let (secret, _) = keys_secret();
        let theirs = json!({ "apiVersion": "v1", "kind": "Service",
                             "metadata": { "name": "orders", "namespace": "shop" },
                             "spec": { "selector": { "app": "orders-api" } } });
        let mut expected = store_prefix();
        expected.extend([
            Expect::get(KEYS_SECRET, StatusCode::OK, secret),
            Expect::get(SVC, StatusCode::OK, theirs),
            Expect::get(TARGET, StatusCode::OK, target()),
            target_apply(),
            status_patch(status.clone()),
            event("Injected"),
            event("RedisNotReady"),
            event("NameTaken"),
        ]);
        run(fixtures::zeromq_policy(), expected)
            .await
            .expect("reconciles");
        assert!(conditions(&status).contains(&(
            "BrokerBound".into(),
            "False".into(),
            "NameTaken".into()
        )));
    }

    #[tokio::test]
    async fn a_plain_endpoint_reads_no_secret_and_drops_a_network_policy_no_longer_asked_for() {
        let mut ic = fixtures::zeromq_policy();
        let zmq = ic.spec.broker.zeromq.as_mut().expect("zeromq");
        zmq.curve = None;
        zmq.plain = Some(true);
        zmq.network_policy = None;
        let ours = json!({ "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": { "name": "orders", "namespace": "shop", "ownerReferences": [{
                "apiVersion": "idemq.dev/v1alpha1", "kind": "IdempotentConsumer", "name": "orders",
                "uid": "3f7c8a2e-0000-4000-8000-000000000001", "controller": true }] },
            "spec": { "podSelector": {} } });
        let status = Arc::new(Mutex::new(None));
        let mut expected = store_prefix();
        expected.extend([
            Expect::get(SVC, StatusCode::NOT_FOUND, not_found()),
            Expect::apply(SVC),
            Expect::get(NETPOL, StatusCode::OK, ours.clone()),
            Expect::new(Method::DELETE, NETPOL, StatusCode::OK, ours),
            Expect::get(TARGET, StatusCode::OK, target()),
            Expect::apply(TARGET).with_body(|p| {
                let env = p["spec"]["template"]["spec"]["initContainers"][0]["env"].to_string();
                assert!(!env.contains("IDEMQ_ZMQ"), "plain: no keys: {env}");
            }),
            status_patch(status.clone()),
            event("Injected"),
            event("RedisNotReady"),
        ]);
        run(ic, expected).await.expect("reconciles");
        let message = status
            .lock()
            .expect("lock")
            .clone()
            .expect("status")
            .to_string();
        assert!(
            message.contains("(plain TCP, no authentication)"),
            "{message}"
        );
    }
}
