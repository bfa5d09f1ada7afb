//! The operator never writes in a loop: a reconcile that changes nothing
//! sends no write, bindings are declared again only when they may have
//! changed, and two resources naming one workload settle on one owner.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use serde_json::{json, Value};

use super::{reconcile, Context};
use crate::broker::{BindError, Binder, Connection, Plan};
use crate::crd::IdempotentConsumer;
use crate::fixtures::{self, Cluster};

const TARGET: &str = "/apis/apps/v1/namespaces/shop/deployments/orders-worker";
const BROKER_SECRET: &str = "/api/v1/namespaces/shop/secrets/rabbitmq-orders";

fn ic_path(name: &str) -> String {
    format!("/apis/idemq.dev/v1alpha1/namespaces/shop/idempotentconsumers/{name}")
}

#[derive(Default)]
struct CountingBinder {
    binds: AtomicUsize,
}

#[async_trait::async_trait]
impl Binder for CountingBinder {
    async fn bind(&self, _connection: &Connection, _plan: &Plan) -> Result<(), BindError> {
        self.binds.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    async fn delete_queues(&self, _connection: &Connection, _plan: &Plan) -> Result<(), BindError> {
        Ok(())
    }
}

fn secret(url: &str) -> Value {
    json!({ "apiVersion": "v1", "kind": "Secret", "metadata": { "name": "rabbitmq-orders", "namespace": "shop" },
            "data": { "url": k8s_openapi::ByteString(url.as_bytes().to_vec()) } })
}

/// A cluster with the target, the broker Secret and the given resources.
fn cluster(resources: &[&IdempotentConsumer]) -> Arc<Cluster> {
    let cluster = Arc::new(Cluster::default());
    cluster.put(
        TARGET,
        json!({ "apiVersion": "apps/v1", "kind": "Deployment",
                "metadata": { "name": "orders-worker", "namespace": "shop", "generation": 1 },
                "spec": { "template": { "spec": { "containers": [{ "name": "app", "image": "app:1" }] } } } }),
    );
    cluster.put(BROKER_SECRET, secret("amqp://guest:guest@rabbit:5672"));
    for ic in resources {
        cluster.put(
            &ic_path(&kube::ResourceExt::name_any(*ic)),
            serde_json::to_value(ic).expect("json"),
        );
    }
    cluster
}

/// Reconciles `name` as the cluster now has it (status included).
async fn reconcile_stored(cluster: &Cluster, ctx: &Arc<Context>, name: &str) {
    let ic: IdempotentConsumer =
        serde_json::from_value(cluster.get(&ic_path(name)).expect("stored")).expect("resource");
    reconcile(Arc::new(ic), ctx.clone())
        .await
        .expect("reconciles");
}

fn generation(cluster: &Cluster) -> i64 {
    cluster.get(TARGET).expect("target")["metadata"]["generation"]
        .as_i64()
        .expect("generation")
}

fn ready(cluster: &Cluster, name: &str) -> (String, String, String) {
    let ic = cluster.get(&ic_path(name)).expect("stored");
    let ready = ic["status"]["conditions"]
        .as_array()
        .expect("conditions")
        .iter()
        .find(|c| c["type"] == "Ready")
        .cloned()
        .expect("Ready");
    (
        ready["status"].as_str().unwrap_or_default().into(),
        ready["reason"].as_str().unwrap_or_default().into(),
        ready["message"].as_str().unwrap_or_default().into(),
    )
}

#[tokio::test]
async fn a_reconcile_that_changes_nothing_writes_nothing() {
    let binder = Arc::new(CountingBinder::default());
    let (ctx, handle) = fixtures::context_with(binder.clone(), 4);
    let cluster = cluster(&[&fixtures::policy()]);
    let server = tokio::spawn(cluster.clone().serve(handle));

    reconcile_stored(&cluster, &ctx, "orders").await;
    let first = cluster.write_count();
    assert!(first > 0, "the first reconcile applies");
    assert_eq!(generation(&cluster), 2, "one new pod template");
    for _ in 0..3 {
        reconcile_stored(&cluster, &ctx, "orders").await;
    }
    println!(
        "writes: {first} by the first reconcile, {} by the next three",
        cluster.write_count() - first
    );
    assert_eq!(
        cluster.write_count(),
        first,
        "no write when nothing changed"
    );
    assert_eq!(generation(&cluster), 2);
    assert_eq!(binder.binds.load(Ordering::SeqCst), 1, "bound once");

    // A spec change reaches the ConfigMap, the target and the status once,
    // and does not declare the unchanged bindings again.
    let mut ic = cluster.get(&ic_path("orders")).expect("stored");
    ic["spec"]["maxAttempts"] = json!(9);
    ic["metadata"]["generation"] = json!(2);
    cluster.put(&ic_path("orders"), ic);
    let before = cluster.write_count();
    reconcile_stored(&cluster, &ctx, "orders").await;
    assert!(cluster.writes_to("configmaps/orders-idemq") >= 2);
    assert_eq!(generation(&cluster), 3, "the pods roll once");
    let after_change = cluster.write_count();
    assert!(after_change > before);
    reconcile_stored(&cluster, &ctx, "orders").await;
    assert_eq!(cluster.write_count(), after_change);
    assert_eq!(binder.binds.load(Ordering::SeqCst), 1);

    // New credentials in the Secret: the bindings are declared again.
    cluster.put(BROKER_SECRET, secret("amqp://other:pw@rabbit:5672"));
    reconcile_stored(&cluster, &ctx, "orders").await;
    assert_eq!(binder.binds.load(Ordering::SeqCst), 2);
    drop(ctx);
    server.abort();
}

fn created(mut ic: IdempotentConsumer, name: &str, at: i64) -> IdempotentConsumer {
    ic.metadata.name = Some(name.into());
    ic.metadata.uid = Some(format!("uid-{name}"));
    ic.metadata.creation_timestamp = Some(Time(
        k8s_openapi::jiff::Timestamp::from_second(at).expect("time"),
    ));
    ic.spec
        .broker
        .rabbitmq
        .as_mut()
        .expect("a RabbitMQ policy")
        .queue = name.into();
    ic.spec.store.mode = crate::crd::StoreMode::External;
    ic.spec.store.external = Some(crate::crd::ExternalStore {
        secret_ref: crate::crd::SecretKeyRef {
            name: "rabbitmq-orders".into(),
            key: "url".into(),
        },
        cluster: false,
        sentinel: None,
        ca_key: None,
    });
    ic
}

#[tokio::test]
async fn the_second_resource_on_one_workload_gets_target_conflict_and_never_touches_it() {
    let orders = created(fixtures::policy(), "orders", 1_000);
    let payments = created(fixtures::policy(), "payments", 2_000);
    let binder = Arc::new(CountingBinder::default());
    let (ctx, handle) = fixtures::context_with(binder, 4);
    // The controller's cache holds both, as after a restart.
    let (cache, mut writer) = kube::runtime::reflector::store::<super::Guarded>();
    for ic in [&orders, &payments] {
        let guard: super::Guarded =
            serde_json::from_value(serde_json::to_value(ic).expect("json")).expect("guard");
        writer.apply_watcher_event(&kube::runtime::watcher::Event::Apply(guard));
    }
    ctx.add_cache(cache);
    let cluster = cluster(&[&orders, &payments]);
    let server = tokio::spawn(cluster.clone().serve(handle));

    // The younger is reconciled first: it still leaves the workload alone.
    reconcile_stored(&cluster, &ctx, "payments").await;
    assert_eq!(cluster.writes_to("deployments/orders-worker"), 0);
    let (status, reason, message) = ready(&cluster, "payments");
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("False", "TargetConflict")
    );
    assert!(message.contains("IdempotentConsumer orders"), "{message}");
    // The store is ready (external) and the broker bound: the one Warning
    // Event is the conflict's.
    assert_eq!(ready(&cluster, "payments").0, "False");
    assert_eq!(cluster.writes_to("events"), 1, "one Warning Event");

    for _ in 0..5 {
        reconcile_stored(&cluster, &ctx, "orders").await;
        reconcile_stored(&cluster, &ctx, "payments").await;
    }
    println!(
        "target writes after 11 reconciles of two resources on one Deployment: {}; generation {}",
        cluster.writes_to("deployments/orders-worker"),
        generation(&cluster)
    );
    assert_eq!(
        cluster.writes_to("deployments/orders-worker"),
        1,
        "orders injects once"
    );
    assert_eq!(generation(&cluster), 2, "the generation stays put");
    let target = cluster.get(TARGET).expect("target");
    assert_eq!(
        target["metadata"]["annotations"]["idemq.dev/consumer"],
        "orders"
    );
    assert_eq!(ready(&cluster, "payments").1, "TargetConflict");
    assert_eq!(
        cluster.writes_to(
            "PATCH /apis/idemq.dev/v1alpha1/namespaces/shop/idempotentconsumers/payments/status"
        ),
        1,
        "the conflict is written once"
    );

    // Without the cache (it lags), the target's annotation names the owner.
    let (ctx, handle) = fixtures::context_with(Arc::new(CountingBinder::default()), 4);
    let server2 = tokio::spawn(cluster.clone().serve(handle));
    let mut fresh = cluster.get(&ic_path("payments")).expect("stored");
    fresh["status"] = Value::Null;
    cluster.put(&ic_path("payments"), fresh);
    reconcile_stored(&cluster, &ctx, "payments").await;
    assert_eq!(cluster.writes_to("deployments/orders-worker"), 1);
    assert_eq!(ready(&cluster, "payments").1, "TargetConflict");
    server.abort();
    server2.abort();
}

#[tokio::test]
async fn sidecar_readiness_writes_status_once_per_change_and_never_when_it_holds() {
    let binder = Arc::new(CountingBinder::default());
    let (ctx, handle) = fixtures::context_with(binder, 4);
    let (pods, mut writer) = kube::runtime::reflector::store();
    ctx.add_pod_cache(pods);
    for name in ["worker-1", "worker-2", "worker-3"] {
        fixtures::cache_pod(&mut writer, fixtures::pod(name, "orders", Some(true)));
    }
    let cluster = cluster(&[&fixtures::policy()]);
    let server = tokio::spawn(cluster.clone().serve(handle));
    let status_writes = || {
        cluster.writes_to(
            "PATCH /apis/idemq.dev/v1alpha1/namespaces/shop/idempotentconsumers/orders/status",
        )
    };
    let sidecars = || {
        let ic = cluster.get(&ic_path("orders")).expect("stored");
        let c = ic["status"]["conditions"]
            .as_array()
            .expect("conditions")
            .iter()
            .find(|c| c["type"] == "SidecarsReady")
            .cloned()
            .expect("SidecarsReady");
        (
            c["status"].as_str().unwrap_or_default().to_string(),
            c["message"].as_str().unwrap_or_default().to_string(),
        )
    };

    reconcile_stored(&cluster, &ctx, "orders").await;
    assert_eq!(sidecars(), ("True".into(), "3 of 3 pods ready".into()));
    let (writes, events) = (status_writes(), cluster.writes_to("events"));
    for _ in 0..3 {
        reconcile_stored(&cluster, &ctx, "orders").await;
    }
    assert_eq!(status_writes(), writes, "pods unchanged: no write");

    // worker-2's application goes down: its sidecar turns not ready.
    fixtures::cache_pod(
        &mut writer,
        fixtures::pod("worker-2", "orders", Some(false)),
    );
    for _ in 0..3 {
        reconcile_stored(&cluster, &ctx, "orders").await;
    }
    assert_eq!(
        sidecars(),
        (
            "False".into(),
            "2 of 3 pods ready; not ready: worker-2".into()
        )
    );
    assert_eq!(status_writes(), writes + 1, "one write for the change");
    assert_eq!(cluster.writes_to("events"), events + 1, "one Warning Event");

    // It comes back: one write, one Normal Event; then quiet again.
    fixtures::cache_pod(&mut writer, fixtures::pod("worker-2", "orders", Some(true)));
    for _ in 0..3 {
        reconcile_stored(&cluster, &ctx, "orders").await;
    }
    assert_eq!(sidecars().0, "True");
    assert_eq!(status_writes(), writes + 2);
    assert_eq!(cluster.writes_to("events"), events + 2);
    println!(
        "status writes: {writes} to settle, then 1 per readiness change over 9 reconciles; events: {events} + 2"
    );
    server.abort();
}
