//! The operator's cost is bounded by configuration: many resources reconciled
//! at once never hold more broker operations or connections than configured.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use super::reconcile;
use crate::broker::pool::tests::Counting;
use crate::broker::pool::{Pool, PoolConfig};
use crate::broker::{BindError, Binder, Connection, Plan};
use crate::crd::IdempotentConsumer;
use crate::fixtures::{self, Cluster};

/// A binder that takes a pooled (counted) client per operation and records
/// the most operations in flight at once.
struct PooledFake {
    pool: Arc<Pool<Arc<Counting>>>,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    bound: AtomicUsize,
}

#[async_trait::async_trait]
impl Binder for PooledFake {
    async fn bind(&self, connection: &Connection, _plan: &Plan) -> Result<(), BindError> {
        let Connection::RabbitMq { url } = connection else {
            return Err(BindError::Refused("a RabbitMQ test".into()));
        };
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_in_flight.fetch_max(now, Ordering::SeqCst);
        let client = self.pool.get(url).await;
        tokio::time::sleep(Duration::from_millis(2)).await;
        drop(client);
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        self.bound.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    async fn delete_queues(&self, _connection: &Connection, _plan: &Plan) -> Result<(), BindError> {
        Ok(())
    }
}

fn secret(name: &str, key: &str, value: &str) -> Value {
    // ByteString serializes as base64, as the API server sends Secret data.
    let data = k8s_openapi::ByteString(value.as_bytes().to_vec());
    json!({ "apiVersion": "v1", "kind": "Secret", "metadata": { "name": name, "namespace": "shop" },
            "data": { key: data } })
}

/// Resource `i`: its own target and queue, an external store, and one of
/// `endpoints` broker URLs (users differ, so the pool keys differ).
fn resource(i: usize, endpoints: usize, cluster: &Cluster) -> IdempotentConsumer {
    let mut ic = fixtures::policy();
    let name = format!("orders-{i}");
    ic.metadata.name = Some(name.clone());
    ic.metadata.uid = Some(format!("uid-{i}"));
    ic.spec.target.name = Some(format!("worker-{i}"));
    let broker = format!("rabbitmq-{}", i % endpoints);
    let rabbit = ic.spec.broker.rabbitmq.as_mut().expect("a RabbitMQ policy");
    rabbit.queue = format!("orders-{i}");
    rabbit.connection_secret_ref.name = broker.clone();
    ic.spec.store.mode = crate::crd::StoreMode::External;
    ic.spec.store.external = Some(crate::crd::ExternalStore {
        secret_ref: crate::crd::SecretKeyRef {
            name: "redis".into(),
            key: "url".into(),
        },
        cluster: false,
        sentinel: None,
        ca_key: None,
    });
    let ns = "/api/v1/namespaces/shop";
    cluster.put(
        &format!("/apis/idemq.dev/v1alpha1/namespaces/shop/idempotentconsumers/{name}"),
        serde_json::to_value(&ic).expect("json"),
    );
    cluster.put(
        &format!("/apis/apps/v1/namespaces/shop/deployments/worker-{i}"),
        json!({ "apiVersion": "apps/v1", "kind": "Deployment",
                "metadata": { "name": format!("worker-{i}"), "namespace": "shop", "generation": 1 } }),
    );
    cluster.put(
        &format!("{ns}/secrets/{broker}"),
        secret(
            &broker,
            "url",
            &format!("amqp://user{}:pw@rabbit:5672", i % endpoints),
        ),
    );
    ic
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_resources_at_once_hold_no_more_broker_operations_and_connections_than_configured(
) {
    const RESOURCES: usize = 1000;
    const OPERATIONS: usize = 6;
    const CONNECTIONS: usize = 3;
    const ENDPOINTS: usize = 10;
    let counting = Arc::new(Counting::default());
    let binder = Arc::new(PooledFake {
        pool: Pool::new(
            counting.clone(),
            PoolConfig {
                max_connections: CONNECTIONS,
                idle: Duration::from_secs(60),
            },
        ),
        in_flight: AtomicUsize::new(0),
        max_in_flight: AtomicUsize::new(0),
        bound: AtomicUsize::new(0),
    });
    let (ctx, handle) = fixtures::context_with(binder.clone(), OPERATIONS);
    let cluster = Arc::new(Cluster::default());
    cluster.put(
        "/api/v1/namespaces/shop/secrets/redis",
        secret("redis", "url", "redis://redis:6379"),
    );
    let resources: Vec<_> = (0..RESOURCES)
        .map(|i| resource(i, ENDPOINTS, &cluster))
        .collect();
    let server = tokio::spawn(cluster.clone().serve(handle));

    let results = futures::future::join_all(
        resources
            .into_iter()
            .map(|ic| tokio::spawn(reconcile(Arc::new(ic), ctx.clone()))),
    )
    .await;
    for r in results {
        r.expect("no panic").expect("reconciles");
    }

    let max_ops = binder.max_in_flight.load(Ordering::SeqCst);
    let max_connections = counting.max_open.load(Ordering::SeqCst);
    println!(
        "{RESOURCES} resources: {} bound, at most {max_ops} broker operations (bound {OPERATIONS}) and {max_connections} connections (pool {CONNECTIONS}) at once, {} connects",
        binder.bound.load(Ordering::SeqCst),
        counting.connects.load(Ordering::SeqCst),
    );
    assert_eq!(binder.bound.load(Ordering::SeqCst), RESOURCES);
    assert!(max_ops <= OPERATIONS, "{max_ops} operations at once");
    assert!(
        max_connections <= CONNECTIONS,
        "{max_connections} connections at once"
    );
    // The bound is what limited them: they did run side by side.
    assert!(max_ops > 1, "operations ran one at a time");
    drop(ctx);
    server.abort();
}
