//! The operator against a real Kubernetes API server.
//!
//! The tests are `#[ignore]`d: `make e2e` builds the operator and runs them
//! against the cluster that `IDEMQ_E2E_KUBECONFIG` names (they fail, saying
//! so, when it names none). It installs the CRD, runs the operator
//! binary (watching only a temporary namespace, with its own leader Lease, and
//! authenticated as the chart's ServiceAccount with the chart's RBAC and no
//! more, so a rule the operator needs and the chart lacks fails here), and
//! checks what a user would: the injected sidecar, the owned objects, the
//! status conditions and Events, a policy change rolling the pods, and the
//! cleanup on deletion. The broker Secret points at the RabbitMQ or the Kafka
//! (tansu) on this machine (the operator runs here too). Without a kubelet,
//! pods stay Pending, so the managed Redis is never available: StoreReady
//! must then say so.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use idemq_operator::crd::IdempotentConsumer;
use idemq_tests::{
    chart_identity, client, delete_in_order, e2e_kubeconfig, eventually, install_crd, unique,
    workspace_binary,
};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Event, Namespace, Pod, Secret, Service};
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::Client;
use serde_json::json;

const WAIT: Duration = Duration::from_secs(60);
const AMQP: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
const KAFKA: &str = "127.0.0.1:9092";

struct Operator(Child);

impl Drop for Operator {
    /// SIGTERM, then SIGKILL if it has not stopped within 20 s (said on
    /// stderr: a clean stop is expected).
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        for _ in 0..200 {
            if !matches!(self.0.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!(
            "the operator (pid {}) did not stop within 20 s of SIGTERM: killed",
            self.0.id()
        );
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_operator(kubeconfig: &std::path::Path, namespace: &str) -> anyhow::Result<Operator> {
    start_operator_with(kubeconfig, namespace, &[], &[])
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn start_operator_with(
    kubeconfig: &std::path::Path,
    namespace: &str,
    extra: &[String],
    env: &[(&str, &str)],
) -> anyhow::Result<Operator> {
    let port = free_port()?;
    let child = Command::new(workspace_binary("idemq-operator")?)
        .args([
            "run",
            "--watch-namespace",
            namespace,
            "--lease-namespace",
            namespace,
        ])
        .args(["--admin-addr", &format!("127.0.0.1:{port}")])
        .args(extra)
        // The child gets the e2e kubeconfig explicitly, and only it.
        .env("KUBECONFIG", kubeconfig)
        .env("RUST_LOG", "warn")
        .envs(env.iter().copied())
        .stderr(Stdio::inherit())
        .spawn()?;
    Ok(Operator(child))
}

fn deployment(name: &str) -> Deployment {
    serde_json::from_value(json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": { "name": name },
        "spec": {
            "replicas": 1,
            "selector": { "matchLabels": { "app": name } },
            "template": {
                "metadata": { "labels": { "app": name } },
                "spec": { "containers": [{ "name": "app", "image": "example/worker:1", "ports": [{ "containerPort": 8080 }] }] }
            }
        }
    }))
    .expect("a valid Deployment")
}

fn policy(name: &str, target: &str, queue: &str) -> IdempotentConsumer {
    serde_json::from_value(json!({
        "apiVersion": "idemq.dev/v1alpha1", "kind": "IdempotentConsumer",
        "metadata": { "name": name },
        "spec": {
            "target": { "kind": "Deployment", "name": target },
            "broker": { "rabbitmq": { "connectionSecretRef": { "name": "rabbitmq" }, "queue": queue, "deleteOnCleanup": true } },
            "key": { "from": "messageId" },
            "delivery": { "port": 8080, "path": "/messages" }
        }
    }))
    .expect("a valid IdempotentConsumer")
}

fn condition(ic: &IdempotentConsumer, type_: &str) -> Option<(String, String)> {
    ic.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.clone(), c.reason.clone()))
}

#[tokio::test]
#[ignore = "needs a disposable cluster: IDEMQ_E2E_KUBECONFIG (make e2e)"]
async fn operator_injects_reports_rolls_and_cleans_up() -> anyhow::Result<()> {
    let kubeconfig = e2e_kubeconfig()?;
    let client = client(&kubeconfig).await?;
    install_crd(&client).await?;
    let ns = unique("idemq-e2e");
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({ "metadata": { "name": ns } }))?,
        )
        .await?;
    let identity = chart_identity(&client, &kubeconfig, &ns).await?;
    let operator = start_operator(identity.path(), &ns)?;
    let result = scenario(&client, &ns).await;
    // The scenario deletes its policies; if it failed before, they go here,
    // while the operator runs to finish them.
    let ics: Api<IdempotentConsumer> = Api::namespaced(client.clone(), &ns);
    let cleaned = delete_in_order(&ics, &["ghost", "orders"], WAIT).await;
    drop(operator);
    namespaces.delete(&ns, &DeleteParams::default()).await?;
    result.and(cleaned)
}

async fn scenario(client: &Client, ns: &str) -> anyhow::Result<()> {
    let queue = unique("e2e-orders");
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    secrets
        .create(
            &PostParams::default(),
            &serde_json::from_value(
                json!({ "metadata": { "name": "rabbitmq" }, "stringData": { "url": AMQP } }),
            )?,
        )
        .await?;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), ns);
    deployments
        .create(&PostParams::default(), &deployment("worker"))
        .await?;
    let ics: Api<IdempotentConsumer> = Api::namespaced(client.clone(), ns);
    ics.create(&PostParams::default(), &policy("orders", "worker", &queue))
        .await?;

    // Injected and bound; the store's readiness is reported as it is.
    let ic = eventually(WAIT, "SidecarInjected and BrokerBound", || async {
        let ic = ics.get("orders").await?;
        let injected = condition(&ic, "SidecarInjected").is_some_and(|c| c.0 == "True");
        let bound = condition(&ic, "BrokerBound").is_some_and(|c| c.0 == "True");
        Ok((injected && bound).then_some(ic))
    })
    .await?;
    let status = ic.status.clone().expect("status");
    assert_eq!(status.observed_generation, ic.metadata.generation);
    assert!(status
        .conditions
        .iter()
        .all(|c| c.observed_generation == ic.metadata.generation));
    let store = condition(&ic, "StoreReady").expect("StoreReady");
    let ready = condition(&ic, "Ready").expect("Ready");
    match store.0.as_str() {
        "True" => assert_eq!(ready, ("True".into(), "AllReady".into())),
        _ => {
            assert_eq!(
                store.1, "RedisNotReady",
                "no kubelet: Redis cannot be available"
            );
            assert_eq!(ready, ("False".into(), "NotReady".into()));
        }
    }

    let worker = deployments.get("worker").await?;
    let template = worker.spec.expect("spec").template;
    let pod = template.spec.expect("pod spec");
    assert_eq!(pod.containers.len(), 1, "the app container is untouched");
    let sidecar = pod
        .init_containers
        .unwrap_or_default()
        .into_iter()
        .find(|c| c.name == "idemq-sidecar")
        .expect("sidecar");
    assert_eq!(sidecar.restart_policy.as_deref(), Some("Always"));
    let hash = template
        .metadata
        .and_then(|m| m.annotations)
        .and_then(|a| a.get("idemq.dev/config-hash").cloned());
    assert_eq!(
        hash, status.config_hash,
        "the pod template carries the config hash"
    );

    let cm = Api::<ConfigMap>::namespaced(client.clone(), ns)
        .get("orders-idemq")
        .await?;
    let config = idemq_sidecar::Config::from_yaml(&cm.data.expect("data")["sidecar.yaml"])?;
    assert_eq!(config.consumer, format!("{ns}.orders"));
    for owned in [
        Api::<k8s_openapi::api::apps::v1::StatefulSet>::namespaced(client.clone(), ns)
            .get("orders-idemq-redis")
            .await?
            .metadata,
        Api::<Service>::namespaced(client.clone(), ns)
            .get("orders-idemq-redis")
            .await?
            .metadata,
        secrets.get("orders-idemq-redis").await?.metadata,
    ] {
        let owner = &owned.owner_references.expect("owned")[0];
        assert_eq!(
            (owner.kind.as_str(), owner.name.as_str()),
            ("IdempotentConsumer", "orders")
        );
    }
    let events: Api<Event> = Api::namespaced(client.clone(), ns);
    eventually(WAIT, "an Injected event", || async {
        let list = events.list(&ListParams::default()).await?;
        Ok(list
            .items
            .iter()
            .any(|e| e.reason.as_deref() == Some("Injected"))
            .then_some(()))
    })
    .await?;

    // A policy change rolls the pods through a new config hash.
    ics.patch(
        "orders",
        &PatchParams::default(),
        &Patch::Merge(json!({ "spec": { "maxAttempts": 9 } })),
    )
    .await?;
    let old_hash = status.config_hash.clone();
    eventually(WAIT, "a new config hash on the pod template", || async {
        let d = deployments.get("worker").await?;
        let hash = d
            .spec
            .and_then(|s| s.template.metadata)
            .and_then(|m| m.annotations)
            .and_then(|a| a.get("idemq.dev/config-hash").cloned());
        Ok((hash.is_some() && hash != old_hash).then_some(()))
    })
    .await?;

    // A policy whose target is missing says so, and does not crash anything.
    ics.create(
        &PostParams::default(),
        &policy("ghost", "no-such-worker", &unique("e2e-ghost")),
    )
    .await?;
    eventually(WAIT, "TargetNotFound", || async {
        let ic = ics.get("ghost").await?;
        Ok(
            (condition(&ic, "SidecarInjected") == Some(("False".into(), "TargetNotFound".into())))
                .then_some(()),
        )
    })
    .await?;

    // Deletion withdraws the sidecar and removes what the policy owned.
    for name in ["orders", "ghost"] {
        ics.delete(name, &DeleteParams::default()).await?;
    }
    eventually(WAIT, "the policies to be gone (finalizer done)", || async {
        Ok(ics
            .list(&ListParams::default())
            .await?
            .items
            .is_empty()
            .then_some(()))
    })
    .await?;
    let worker = deployments.get("worker").await?;
    let pod = worker.spec.expect("spec").template;
    assert!(
        pod.spec
            .as_ref()
            .and_then(|s| s.init_containers.as_ref())
            .is_none_or(|c| c.is_empty()),
        "sidecar withdrawn"
    );
    assert!(
        pod.spec
            .as_ref()
            .and_then(|s| s.volumes.as_ref())
            .is_none_or(|v| v.is_empty()),
        "volume withdrawn"
    );
    assert!(pod
        .metadata
        .and_then(|m| m.annotations)
        .is_none_or(|a| !a.contains_key("idemq.dev/config-hash")));
    assert!(Api::<ConfigMap>::namespaced(client.clone(), ns)
        .get_opt("orders-idemq")
        .await?
        .is_none());
    assert!(secrets.get_opt("orders-idemq-redis").await?.is_none());
    println!("e2e: injected, reported (StoreReady={}), rolled on change, TargetNotFound reported, cleaned up", store.0);
    Ok(())
}

#[tokio::test]
#[ignore = "needs a disposable cluster: IDEMQ_E2E_KUBECONFIG (make e2e)"]
async fn only_one_replica_leads_and_an_expired_lease_is_taken_over() -> anyhow::Result<()> {
    use idemq_operator::leader::Elector;
    use k8s_openapi::api::coordination::v1::Lease;
    let kubeconfig = e2e_kubeconfig()?;
    let client = client(&kubeconfig).await?;
    let ns = unique("idemq-e2e-lease");
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({ "metadata": { "name": ns } }))?,
        )
        .await?;
    let elector = |identity: &str| Elector {
        api: Api::<Lease>::namespaced(client.clone(), &ns),
        name: "idemq-operator".into(),
        identity: identity.into(),
        duration: Duration::from_secs(1),
    };
    let (a, b) = (elector("replica-a"), elector("replica-b"));
    let result = async {
        assert!(
            a.try_acquire().await?,
            "the first candidate takes the lease"
        );
        assert!(
            !b.try_acquire().await?,
            "the second does not while it is held"
        );
        assert!(a.try_acquire().await?, "the holder renews");
        tokio::time::sleep(Duration::from_millis(2500)).await;
        assert!(b.try_acquire().await?, "an expired lease is taken over");
        assert!(!a.try_acquire().await?, "the old holder has lost it");
        let lease = Api::<Lease>::namespaced(client.clone(), &ns)
            .get("idemq-operator")
            .await?;
        let spec = lease.spec.expect("spec");
        assert_eq!(spec.holder_identity.as_deref(), Some("replica-b"));
        assert_eq!(spec.lease_transitions, Some(1));
        anyhow::Ok(())
    }
    .await;
    namespaces.delete(&ns, &DeleteParams::default()).await?;
    result
}

#[tokio::test]
#[ignore = "needs a disposable cluster: IDEMQ_E2E_KUBECONFIG (make e2e)"]
async fn two_policies_on_one_deployment_one_serves_it_the_other_reports_target_conflict(
) -> anyhow::Result<()> {
    let kubeconfig = e2e_kubeconfig()?;
    let client = client(&kubeconfig).await?;
    install_crd(&client).await?;
    let ns = unique("idemq-e2e-conflict");
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({ "metadata": { "name": ns } }))?,
        )
        .await?;
    let identity = chart_identity(&client, &kubeconfig, &ns).await?;
    let operator = start_operator(identity.path(), &ns)?;
    let result = conflict(&client, &ns).await;
    // While the operator runs: payments first (deleting orders first would
    // hand the worker to payments, a rollout for nothing), each gone before
    // the next; then the operator stops, then the namespace goes.
    let ics: Api<IdempotentConsumer> = Api::namespaced(client.clone(), &ns);
    let cleaned = delete_in_order(&ics, &["payments", "orders"], WAIT).await;
    drop(operator);
    namespaces.delete(&ns, &DeleteParams::default()).await?;
    result.and(cleaned)
}

async fn conflict(client: &Client, ns: &str) -> anyhow::Result<()> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    secrets
        .create(
            &PostParams::default(),
            &serde_json::from_value(
                json!({ "metadata": { "name": "rabbitmq" }, "stringData": { "url": AMQP } }),
            )?,
        )
        .await?;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), ns);
    deployments
        .create(&PostParams::default(), &deployment("worker"))
        .await?;
    let ics: Api<IdempotentConsumer> = Api::namespaced(client.clone(), ns);
    // `orders` is the older: it serves the worker, whichever is reconciled first.
    ics.create(
        &PostParams::default(),
        &policy("orders", "worker", &unique("e2e-orders")),
    )
    .await?;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    ics.create(
        &PostParams::default(),
        &policy("payments", "worker", &unique("e2e-payments")),
    )
    .await?;

    let payments = eventually(WAIT, "payments: Ready=False TargetConflict", || async {
        let ic = ics.get("payments").await?;
        Ok(
            (condition(&ic, "Ready") == Some(("False".into(), "TargetConflict".into())))
                .then_some(ic),
        )
    })
    .await?;
    eventually(WAIT, "orders: SidecarInjected", || async {
        let ic = ics.get("orders").await?;
        Ok(condition(&ic, "SidecarInjected")
            .is_some_and(|c| c.0 == "True")
            .then_some(()))
    })
    .await?;
    let message = payments
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"))
        .map(|c| c.message.clone())
        .unwrap_or_default();
    assert!(
        message.contains("IdempotentConsumer orders"),
        "names the other: {message}"
    );
    let events: Api<Event> = Api::namespaced(client.clone(), ns);
    eventually(WAIT, "a TargetConflict Warning Event", || async {
        let list = events.list(&ListParams::default()).await?;
        Ok(list
            .items
            .iter()
            .any(|e| {
                e.reason.as_deref() == Some("TargetConflict")
                    && e.type_.as_deref() == Some("Warning")
            })
            .then_some(()))
    })
    .await?;
    let worker = deployments.get("worker").await?;
    assert_eq!(
        worker
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get("idemq.dev/consumer"))
            .map(String::as_str),
        Some("orders")
    );
    let sidecars = worker
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .and_then(|p| p.init_containers.as_ref())
        .map_or(0, |c| {
            c.iter().filter(|c| c.name == "idemq-sidecar").count()
        });
    assert_eq!(sidecars, 1);

    // The Deployment's generation holds still for a minute.
    let before = worker.metadata.generation;
    let rv_before = worker.metadata.resource_version.clone();
    tokio::time::sleep(Duration::from_secs(60)).await;
    let after = deployments.get("worker").await?;
    println!(
        "e2e conflict: Deployment generation {before:?} -> {:?} over 60 s (resourceVersion {rv_before:?} -> {:?}); payments: {message}",
        after.metadata.generation, after.metadata.resource_version
    );
    assert_eq!(after.metadata.generation, before, "no rollout in a loop");
    Ok(())
}

fn kafka_policy(name: &str, target: &str, topic: &str) -> IdempotentConsumer {
    serde_json::from_value(json!({
        "apiVersion": "idemq.dev/v1alpha1", "kind": "IdempotentConsumer",
        "metadata": { "name": name },
        "spec": {
            "target": { "kind": "Deployment", "name": target },
            "broker": { "kafka": { "connectionSecretRef": { "name": "kafka" }, "topics": [topic],
                                   "deadLetterPartitions": 2, "ordering": "perKey" } },
            "key": { "from": "recordKey" },
            "delivery": { "port": 8080, "path": "/events" }
        }
    }))
    .expect("a valid IdempotentConsumer")
}

/// The test's admin client on the local Kafka: makes the producers' topic,
/// looks at what exists, deletes what the test made.
fn kafka_admin(
) -> anyhow::Result<rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext>> {
    Ok(rdkafka::ClientConfig::new()
        .set("bootstrap.servers", KAFKA)
        .create()?)
}

/// Partitions of `topic`, None when it does not exist (asks for every topic,
/// so looking never creates one).
fn kafka_partitions(
    admin: &rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext>,
    topic: &str,
) -> anyhow::Result<Option<usize>> {
    let metadata = admin
        .inner()
        .fetch_metadata(None, Duration::from_secs(10))
        .map_err(|e| {
            anyhow::anyhow!(
                "Kafka on {KAFKA} ({e}); start it with: source .ci/services.sh && ensure_kafka"
            )
        })?;
    Ok(metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic && t.error().is_none())
        .map(|t| t.partitions().len()))
}

#[tokio::test]
#[ignore = "needs a disposable cluster: IDEMQ_E2E_KUBECONFIG (make e2e)"]
async fn a_kafka_policy_reports_a_missing_topic_then_binds_and_creates_its_dead_letter_topic(
) -> anyhow::Result<()> {
    let kubeconfig = e2e_kubeconfig()?;
    let client = client(&kubeconfig).await?;
    install_crd(&client).await?;
    let ns = unique("idemq-e2e-kafka");
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({ "metadata": { "name": ns } }))?,
        )
        .await?;
    let topic = unique("e2e-billing");
    let dead = format!("{topic}.dead");
    let identity = chart_identity(&client, &kubeconfig, &ns).await?;
    let operator = start_operator(identity.path(), &ns)?;
    let result = kafka_scenario(&client, &ns, &topic).await;
    let ics: Api<IdempotentConsumer> = Api::namespaced(client.clone(), &ns);
    let cleaned = delete_in_order(&ics, &["billing"], WAIT).await;
    drop(operator);
    namespaces.delete(&ns, &DeleteParams::default()).await?;
    let admin = kafka_admin()?;
    let opts = rdkafka::admin::AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let _ = admin.delete_topics(&[&topic, &dead], &opts).await;
    result.and(cleaned)
}

async fn kafka_scenario(client: &Client, ns: &str, topic: &str) -> anyhow::Result<()> {
    let ics: Api<IdempotentConsumer> = Api::namespaced(client.clone(), ns);
    // The API server itself refuses two brokers, and a Kafka key Kafka lacks.
    let mut both = kafka_policy("both", "worker", topic);
    both.spec.broker.rabbitmq = policy("x", "worker", "q").spec.broker.rabbitmq;
    let refused = ics
        .create(&PostParams::default(), &both)
        .await
        .expect_err("two brokers are refused");
    println!("e2e kafka: two brokers refused: {refused}");
    assert!(
        refused.to_string().contains("set exactly one broker"),
        "{refused}"
    );
    let mut message_id = kafka_policy("message-id", "worker", topic);
    message_id.spec.key.from = idemq_operator::crd::KeyFrom::MessageId;
    let refused = ics
        .create(&PostParams::default(), &message_id)
        .await
        .expect_err("messageId on Kafka is refused");
    assert!(
        refused
            .to_string()
            .contains("Kafka records have no message id"),
        "{refused}"
    );

    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    secrets
        .create(
            &PostParams::default(),
            &serde_json::from_value(
                json!({ "metadata": { "name": "kafka" }, "stringData": { "bootstrapServers": KAFKA } }),
            )?,
        )
        .await?;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), ns);
    deployments
        .create(&PostParams::default(), &deployment("worker"))
        .await?;
    ics.create(
        &PostParams::default(),
        &kafka_policy("billing", "worker", topic),
    )
    .await?;
    let admin = kafka_admin()?;

    // The topic does not exist yet: TopicNotFound, a Warning Event, nothing created.
    let missing = eventually(WAIT, "BrokerBound=False TopicNotFound", || async {
        let ic = ics.get("billing").await?;
        Ok(
            (condition(&ic, "BrokerBound") == Some(("False".into(), "TopicNotFound".into())))
                .then_some(ic),
        )
    })
    .await?;
    let message = missing
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == "BrokerBound"))
        .map(|c| c.message.clone())
        .unwrap_or_default();
    assert!(message.contains(topic), "names the topic: {message}");
    let events: Api<Event> = Api::namespaced(client.clone(), ns);
    eventually(WAIT, "a TopicNotFound Warning Event", || async {
        let list = events.list(&ListParams::default()).await?;
        Ok(list
            .items
            .iter()
            .any(|e| {
                e.reason.as_deref() == Some("TopicNotFound")
                    && e.type_.as_deref() == Some("Warning")
                    && e.message.as_deref().is_some_and(|n| n.contains(topic))
            })
            .then_some(()))
    })
    .await?;
    assert_eq!(
        kafka_partitions(&admin, topic)?,
        None,
        "not created by the operator"
    );
    assert_eq!(kafka_partitions(&admin, &format!("{topic}.dead"))?, None);

    // Its producers create it: the operator's next attempt binds.
    let opts = rdkafka::admin::AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    for result in admin
        .create_topics(
            &[rdkafka::admin::NewTopic::new(
                topic,
                3,
                rdkafka::admin::TopicReplication::Fixed(1),
            )],
            &opts,
        )
        .await?
    {
        result.map_err(|(t, code)| anyhow::anyhow!("create topic {t}: {code}"))?;
    }
    let created_at = std::time::Instant::now();
    let bound = eventually(Duration::from_secs(120), "BrokerBound=True", || async {
        let ic = ics.get("billing").await?;
        Ok((condition(&ic, "BrokerBound") == Some(("True".into(), "Bound".into()))).then_some(ic))
    })
    .await?;
    let dead_partitions = kafka_partitions(&admin, &format!("{topic}.dead"))?;
    assert_eq!(
        dead_partitions,
        Some(2),
        "the dead-letter topic, with deadLetterPartitions"
    );
    assert_eq!(
        kafka_partitions(&admin, topic)?,
        Some(3),
        "the topic is untouched"
    );
    assert_eq!(
        condition(&bound, "SidecarInjected"),
        Some(("True".into(), "Injected".into()))
    );

    // The sidecar reads the connection from the Secret, the rest from its config.
    let worker = deployments.get("worker").await?;
    let sidecar = worker
        .spec
        .and_then(|s| s.template.spec)
        .and_then(|p| p.init_containers)
        .unwrap_or_default()
        .into_iter()
        .find(|c| c.name == "idemq-sidecar")
        .expect("sidecar");
    let bootstrap = sidecar
        .env
        .unwrap_or_default()
        .into_iter()
        .find(|e| e.name == "IDEMQ_KAFKA_BOOTSTRAP_SERVERS")
        .and_then(|e| e.value_from)
        .and_then(|v| v.secret_key_ref)
        .expect("a Secret reference");
    assert_eq!(
        (bootstrap.name.as_str(), bootstrap.key.as_str()),
        ("kafka", "bootstrapServers")
    );
    let cm = Api::<ConfigMap>::namespaced(client.clone(), ns)
        .get("billing-idemq")
        .await?;
    let yaml = cm.data.expect("data")["sidecar.yaml"].clone();
    assert!(!yaml.contains(KAFKA), "no connection in the ConfigMap");
    let config = idemq_sidecar::Config::from_yaml(&yaml)?;
    let kafka = config
        .broker
        .and_then(|b| b.kafka)
        .expect("a Kafka section");
    assert_eq!(kafka.topics, [topic.to_string()]);
    assert_eq!(kafka.group_id, format!("{ns}.billing"));

    // Deletion withdraws the sidecar; the topics stay (they are not idemq's to delete).
    ics.delete("billing", &DeleteParams::default()).await?;
    eventually(WAIT, "the policy to be gone (finalizer done)", || async {
        Ok(ics.get_opt("billing").await?.is_none().then_some(()))
    })
    .await?;
    assert_eq!(
        kafka_partitions(&admin, topic)?,
        Some(3),
        "kept after deletion"
    );
    println!(
        "e2e kafka: TopicNotFound reported ({message}); bound {:.1?} after the topic was created, {topic}.dead created with {} partitions; sidecar env from Secret; cleaned up",
        created_at.elapsed(),
        dead_partitions.unwrap_or_default()
    );
    Ok(())
}

const PUBSUB_EMULATOR: &str = "127.0.0.1:8085";
const PUBSUB_PROJECT: &str = "idemq-e2e";

/// A Pub/Sub consumer of `topic` through `subscription` with an ack
/// deadline of 30 s and a dead-letter policy to `<topic>-dead`.
fn pubsub_policy(name: &str, target: &str, topic: &str, subscription: &str) -> IdempotentConsumer {
    serde_json::from_value(json!({
        "apiVersion": "idemq.dev/v1alpha1", "kind": "IdempotentConsumer",
        "metadata": { "name": name },
        "spec": {
            "target": { "kind": "Deployment", "name": target },
            "broker": { "pubsub": {
                "credentialsSecretRef": { "name": "pubsub" },
                "project": PUBSUB_PROJECT, "topic": topic, "subscription": subscription,
                "ackDeadlineSeconds": 30,
                "deadLetterPolicy": { "topic": format!("{topic}-dead"), "maxDeliveryAttempts": 6 } } },
            "key": { "from": "attribute", "name": "event-id" },
            "delivery": { "port": 8080, "path": "/events" }
        }
    }))
    .expect("a valid IdempotentConsumer")
}

#[tokio::test]
#[ignore = "needs a disposable cluster: IDEMQ_E2E_KUBECONFIG (make e2e)"]
async fn a_pubsub_policy_creates_its_subscription_and_reports_another_ones_settings(
) -> anyhow::Result<()> {
    let kubeconfig = e2e_kubeconfig()?;
    let client = client(&kubeconfig).await?;
    install_crd(&client).await?;
    let pubsub = idemq_sidecar::source::pubsub::client(PUBSUB_PROJECT, Some(PUBSUB_EMULATOR), None)
        .await
        .map_err(|e| anyhow::anyhow!("the Pub/Sub emulator on {PUBSUB_EMULATOR} ({e}); start it with: source .ci/services.sh && ensure_pubsub_emulator"))?;
    let ns = unique("idemq-e2e-pubsub");
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({ "metadata": { "name": ns } }))?,
        )
        .await?;
    let topic = unique("e2e-orders");
    pubsub.topic(&topic).create(None, None).await?;
    let identity = chart_identity(&client, &kubeconfig, &ns).await?;
    // The operator talks to the emulator, as Google's clients do with this variable.
    let operator = start_operator_with(
        identity.path(),
        &ns,
        &[],
        &[("PUBSUB_EMULATOR_HOST", PUBSUB_EMULATOR)],
    )?;
    let result = pubsub_scenario(&client, &pubsub, &ns, &topic).await;
    let ics: Api<IdempotentConsumer> = Api::namespaced(client.clone(), &ns);
    let cleaned = delete_in_order(&ics, &["billing", "audit"], WAIT).await;
    drop(operator);
    namespaces.delete(&ns, &DeleteParams::default()).await?;
    for s in [format!("{topic}-billing"), format!("{topic}-audit")] {
        let _ = pubsub.subscription(&s).delete(None).await;
    }
    for t in [topic.clone(), format!("{topic}-dead")] {
        let _ = pubsub.topic(&t).delete(None).await;
    }
    result.and(cleaned)
}

async fn pubsub_scenario(
    client: &Client,
    pubsub: &gcloud_pubsub::client::Client,
    ns: &str,
    topic: &str,
) -> anyhow::Result<()> {
    let ics: Api<IdempotentConsumer> = Api::namespaced(client.clone(), ns);
    // The API server refuses a header key (Pub/Sub has attributes) and a
    // consumer whose dead letters have nowhere to go.
    let mut header = pubsub_policy("header", "worker", topic, "s-header");
    header.spec.key.from = idemq_operator::crd::KeyFrom::Header;
    let refused = ics
        .create(&PostParams::default(), &header)
        .await
        .expect_err("a header key is refused");
    assert!(
        refused
            .to_string()
            .contains("Pub/Sub messages carry attributes"),
        "{refused}"
    );
    let mut nowhere = pubsub_policy("nowhere", "worker", topic, "s-nowhere");
    if let Some(ps) = nowhere.spec.broker.pubsub.as_mut() {
        ps.dead_letter_policy = None;
    }
    let refused = ics
        .create(&PostParams::default(), &nowhere)
        .await
        .expect_err("no dead-letter route is refused");
    assert!(
        refused
            .to_string()
            .contains("dead letters need somewhere to go"),
        "{refused}"
    );

    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    // The emulator takes no key: a placeholder stands for the service account's.
    secrets
        .create(
            &PostParams::default(),
            &serde_json::from_value(
                json!({ "metadata": { "name": "pubsub" }, "stringData": { "key.json": "{\"private_key\":\"e2e-s3cret\"}" } }),
            )?,
        )
        .await?;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), ns);
    for name in ["worker", "auditor"] {
        deployments
            .create(&PostParams::default(), &deployment(name))
            .await?;
    }
    // Someone else's subscription, with Pub/Sub's default ack deadline.
    let audit = format!("{topic}-audit");
    pubsub
        .subscription(&audit)
        .create(
            &format!("projects/{PUBSUB_PROJECT}/topics/{topic}"),
            gcloud_pubsub::subscription::SubscriptionConfig {
                ack_deadline_seconds: 10,
                ..Default::default()
            },
            None,
        )
        .await?;
    let billing = format!("{topic}-billing");
    ics.create(
        &PostParams::default(),
        &pubsub_policy("billing", "worker", topic, &billing),
    )
    .await?;
    ics.create(
        &PostParams::default(),
        &pubsub_policy("audit", "auditor", topic, &audit),
    )
    .await?;

    // The missing subscription is created with the spec's settings.
    broker_bound(&ics, "billing", "True", "Bound").await?;
    let (attached, created) = pubsub.subscription(&billing).config(None).await?;
    assert_eq!(
        attached,
        format!("projects/{PUBSUB_PROJECT}/topics/{topic}")
    );
    assert_eq!(created.ack_deadline_seconds, 30);
    let dead = created.dead_letter_policy.expect("a dead-letter policy");
    assert_eq!(
        (dead.dead_letter_topic.as_str(), dead.max_delivery_attempts),
        (
            format!("projects/{PUBSUB_PROJECT}/topics/{topic}-dead").as_str(),
            6
        )
    );

    // The existing one is reported, with a Warning Event, and left as it is.
    let mismatch = broker_bound(&ics, "audit", "False", "SubscriptionMismatch").await?;
    let message = mismatch
        .status
        .iter()
        .flat_map(|s| s.conditions.iter())
        .find(|c| c.type_ == "BrokerBound")
        .map(|c| c.message.clone())
        .unwrap_or_default();
    assert!(
        message.contains("ackDeadlineSeconds 10 (the spec: 30)"),
        "names the setting: {message}"
    );
    let events: Api<Event> = Api::namespaced(client.clone(), ns);
    eventually(WAIT, "a SubscriptionMismatch Warning Event", || async {
        let list = events.list(&ListParams::default()).await?;
        Ok(list
            .items
            .iter()
            .any(|e| {
                e.reason.as_deref() == Some("SubscriptionMismatch")
                    && e.type_.as_deref() == Some("Warning")
            })
            .then_some(()))
    })
    .await?;
    let (_, unchanged) = pubsub.subscription(&audit).config(None).await?;
    assert_eq!(unchanged.ack_deadline_seconds, 10, "never changed");
    assert!(unchanged.dead_letter_policy.is_none());

    // The key reaches the sidecar as a file from the Secret, never through the ConfigMap.
    let worker = deployments.get("worker").await?;
    let pod = worker.spec.and_then(|s| s.template.spec).expect("pod spec");
    let volume = pod
        .volumes
        .unwrap_or_default()
        .into_iter()
        .find(|v| v.name == "idemq-pubsub-key")
        .and_then(|v| v.secret)
        .expect("the key's volume");
    assert_eq!(volume.secret_name.as_deref(), Some("pubsub"));
    let cm = Api::<ConfigMap>::namespaced(client.clone(), ns)
        .get("billing-idemq")
        .await?;
    let yaml = cm.data.expect("data")["sidecar.yaml"].clone();
    assert!(!yaml.contains("e2e-s3cret"), "no key in the ConfigMap");
    let config = idemq_sidecar::Config::from_yaml(&yaml)?;
    let section = config
        .broker
        .and_then(|b| b.pubsub)
        .expect("a Pub/Sub section");
    assert_eq!(section.subscription, billing);
    println!(
        "e2e pubsub: {billing} created (ackDeadlineSeconds {}, dead letters to {} after {}); {audit}: SubscriptionMismatch ({message}), left at ackDeadlineSeconds {}",
        created.ack_deadline_seconds,
        dead.dead_letter_topic,
        dead.max_delivery_attempts,
        unchanged.ack_deadline_seconds
    );
    Ok(())
}

#[tokio::test]
#[ignore = "needs a disposable cluster: IDEMQ_E2E_KUBECONFIG (make e2e)"]
async fn sidecars_ready_follows_the_pods_sidecar_readiness_both_ways() -> anyhow::Result<()> {
    let kubeconfig = e2e_kubeconfig()?;
    let client = client(&kubeconfig).await?;
    install_crd(&client).await?;
    let ns = unique("idemq-e2e-pods");
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({ "metadata": { "name": ns } }))?,
        )
        .await?;
    let identity = chart_identity(&client, &kubeconfig, &ns).await?;
    let operator = start_operator(identity.path(), &ns)?;
    let result = sidecars(&client, &ns).await;
    let ics: Api<IdempotentConsumer> = Api::namespaced(client.clone(), &ns);
    let cleaned = delete_in_order(&ics, &["orders"], WAIT).await;
    drop(operator);
    namespaces.delete(&ns, &DeleteParams::default()).await?;
    result.and(cleaned)
}

/// A pod of the worker as the injected template makes it. No scheduler or
/// kubelet runs, so the test plays the kubelet: it writes the pod's status.
fn injected_pod(name: &str) -> anyhow::Result<Pod> {
    Ok(serde_json::from_value(json!({
        "metadata": { "name": name, "labels": { "app": "worker", "idemq.dev/consumer": "orders" } },
        "spec": {
            "automountServiceAccountToken": false,
            "initContainers": [{ "name": "idemq-sidecar", "image": "example/idemq-sidecar:1", "restartPolicy": "Always" }],
            "containers": [{ "name": "app", "image": "example/worker:1" }]
        }
    }))?)
}

/// The pod status a kubelet reports with the sidecar `ready` or not.
fn kubelet_status(ready: bool) -> serde_json::Value {
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    json!({ "status": {
        "phase": "Running",
        "conditions": [{ "type": "Ready", "status": if ready { "True" } else { "False" } }],
        "initContainerStatuses": [{
            "name": "idemq-sidecar", "ready": ready, "started": true, "restartCount": 0,
            "image": "example/idemq-sidecar:1", "imageID": "",
            "state": { "running": { "startedAt": now } }
        }],
        "containerStatuses": [{
            "name": "app", "ready": true, "started": true, "restartCount": 0,
            "image": "example/worker:1", "imageID": "",
            "state": { "running": { "startedAt": now } }
        }]
    }})
}

async fn sidecars(client: &Client, ns: &str) -> anyhow::Result<()> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    secrets
        .create(
            &PostParams::default(),
            &serde_json::from_value(
                json!({ "metadata": { "name": "rabbitmq" }, "stringData": { "url": AMQP } }),
            )?,
        )
        .await?;
    // No replicas: the test's own pod is the worker's only one.
    let mut worker = deployment("worker");
    worker.spec.as_mut().expect("spec").replicas = Some(0);
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), ns);
    deployments.create(&PostParams::default(), &worker).await?;
    let ics: Api<IdempotentConsumer> = Api::namespaced(client.clone(), ns);
    ics.create(
        &PostParams::default(),
        &policy("orders", "worker", &unique("e2e-pods")),
    )
    .await?;
    let sidecars_ready = |want: (&'static str, &'static str, &'static str)| {
        let ics = ics.clone();
        async move {
            let ic = ics.get("orders").await?;
            let c = ic
                .status
                .as_ref()
                .and_then(|s| s.conditions.iter().find(|c| c.type_ == "SidecarsReady"))
                .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()));
            anyhow::Ok(
                (c.as_ref()
                    .is_some_and(|c| (c.0.as_str(), c.1.as_str(), c.2.as_str()) == want))
                .then_some(ic),
            )
        }
    };
    eventually(WAIT, "SidecarsReady=False NoPods", || {
        sidecars_ready(("False", "NoPods", "no running pod has the sidecar yet"))
    })
    .await?;

    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    pods.create(&PostParams::default(), &injected_pod("worker-1")?)
        .await?;
    let mut flips = Vec::new();
    for (ready, want) in [
        (true, ("True", "PodsReady", "1 of 1 pods ready")),
        (
            false,
            (
                "False",
                "PodsNotReady",
                "0 of 1 pods ready; not ready: worker-1",
            ),
        ),
        (true, ("True", "PodsReady", "1 of 1 pods ready")),
    ] {
        let patched = std::time::Instant::now();
        pods.patch_status(
            "worker-1",
            &PatchParams::default(),
            &Patch::Merge(kubelet_status(ready)),
        )
        .await?;
        let ic = eventually(WAIT, &format!("SidecarsReady {want:?}"), || {
            sidecars_ready(want)
        })
        .await?;
        flips.push(format!("{} after {:.1?}", want.0, patched.elapsed()));
        // Nothing changes now: the operator writes nothing.
        let version = ic.metadata.resource_version.clone();
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(
            ics.get("orders").await?.metadata.resource_version,
            version,
            "no status write while the pods hold still"
        );
    }
    let events: Api<Event> = Api::namespaced(client.clone(), ns);
    let said: Vec<(String, String)> = events
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter(|e| e.reason.as_deref().is_some_and(|r| r.starts_with("Pods")))
        .map(|e| (e.type_.unwrap_or_default(), e.reason.unwrap_or_default()))
        .collect();
    assert!(
        said.contains(&("Warning".into(), "PodsNotReady".into()))
            && said.contains(&("Normal".into(), "PodsReady".into())),
        "the flips are Events: {said:?}"
    );

    // The pod goes: no pod runs the sidecar any more.
    pods.delete("worker-1", &DeleteParams::default().grace_period(0))
        .await?;
    eventually(
        WAIT,
        "SidecarsReady=False NoPods after the pod is gone",
        || sidecars_ready(("False", "NoPods", "no running pod has the sidecar yet")),
    )
    .await?;
    println!(
        "e2e pods: SidecarsReady {}; then NoPods once the pod was deleted; events {said:?}",
        flips.join(", ")
    );
    Ok(())
}

#[tokio::test]
#[ignore = "needs a disposable cluster: IDEMQ_E2E_KUBECONFIG (make e2e)"]
async fn a_secret_created_later_binds_at_once_and_a_rotated_one_rolls_the_pods(
) -> anyhow::Result<()> {
    let kubeconfig = e2e_kubeconfig()?;
    let client = client(&kubeconfig).await?;
    install_crd(&client).await?;
    let ns = unique("idemq-e2e-secret");
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({ "metadata": { "name": ns } }))?,
        )
        .await?;
    let identity = chart_identity(&client, &kubeconfig, &ns).await?;
    let operator = start_operator(identity.path(), &ns)?;
    let result = secret_scenario(&client, &ns).await;
    let ics: Api<IdempotentConsumer> = Api::namespaced(client.clone(), &ns);
    let cleaned = delete_in_order(&ics, &["orders"], WAIT).await;
    drop(operator);
    namespaces.delete(&ns, &DeleteParams::default()).await?;
    result.and(cleaned)
}

/// The pod template's secrets-hash annotation of Deployment `name`.
async fn secrets_hash(deployments: &Api<Deployment>, name: &str) -> anyhow::Result<Option<String>> {
    Ok(deployments
        .get(name)
        .await?
        .spec
        .and_then(|s| s.template.metadata)
        .and_then(|m| m.annotations)
        .and_then(|a| a.get("idemq.dev/secrets-hash").cloned()))
}

async fn secret_scenario(client: &Client, ns: &str) -> anyhow::Result<()> {
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), ns);
    deployments
        .create(&PostParams::default(), &deployment("worker"))
        .await?;
    let ics: Api<IdempotentConsumer> = Api::namespaced(client.clone(), ns);
    ics.create(
        &PostParams::default(),
        &policy("orders", "worker", &unique("e2e-secret")),
    )
    .await?;
    eventually(WAIT, "SecretNotFound", || async {
        let ic = ics.get("orders").await?;
        Ok(
            (condition(&ic, "BrokerBound") == Some(("False".into(), "SecretNotFound".into())))
                .then_some(()),
        )
    })
    .await?;
    // Let the back-off grow past the wait below (5 s, 10 s, 20 s, …): only
    // the Secret's own event can bind the resource in time.
    tokio::time::sleep(Duration::from_secs(30)).await;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let created = std::time::Instant::now();
    secrets
        .create(
            &PostParams::default(),
            &serde_json::from_value(
                json!({ "metadata": { "name": "rabbitmq" }, "stringData": { "url": AMQP } }),
            )?,
        )
        .await?;
    eventually(
        Duration::from_secs(10),
        "BrokerBound after the Secret's creation",
        || async {
            let ic = ics.get("orders").await?;
            Ok(condition(&ic, "BrokerBound")
                .is_some_and(|c| c.0 == "True")
                .then_some(()))
        },
    )
    .await?;
    println!(
        "e2e: bound {:.1} s after the missing Secret was created",
        created.elapsed().as_secs_f64()
    );

    // Rotation: the same broker under a changed URL rolls the pod template.
    let before = eventually(WAIT, "a secrets-hash on the pod template", || async {
        secrets_hash(&deployments, "worker").await
    })
    .await?;
    let rotated = std::time::Instant::now();
    secrets
        .patch(
            "rabbitmq",
            &PatchParams::default(),
            &Patch::Merge(json!({ "stringData": { "url": format!("{AMQP}?heartbeat=30") } })),
        )
        .await?;
    eventually(
        Duration::from_secs(10),
        "a new secrets-hash after the rotation",
        || async {
            let now = secrets_hash(&deployments, "worker").await?;
            Ok((now.is_some() && now.as_ref() != Some(&before)).then_some(()))
        },
    )
    .await?;
    println!(
        "e2e: the pod template rolled {:.1} s after the Secret changed",
        rotated.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The chart's webhook configuration as a test cluster can reach it: the API
/// server calls 127.0.0.1 (no kube-proxy routes a Service here), for the
/// labelled pods of namespace `ns` only.
fn webhook_configuration(port: u16, ns: &str) -> serde_json::Value {
    json!({
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
        "metadata": { "name": WEBHOOK_CONFIGURATION },
        "webhooks": [{
            "name": "pods.idemq.dev",
            "admissionReviewVersions": ["v1"],
            "clientConfig": { "url": format!("https://127.0.0.1:{port}/mutate") },
            "rules": [{ "apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"],
                        "resources": ["pods"], "scope": "Namespaced" }],
            "objectSelector": { "matchLabels": { "idemq.dev/inject": "enabled" } },
            "namespaceSelector": { "matchLabels": { "kubernetes.io/metadata.name": ns } },
            "failurePolicy": "Fail",
            "timeoutSeconds": 5,
            "sideEffects": "None",
            "reinvocationPolicy": "IfNeeded"
        }]
    })
}

/// The chart's names (release `idemq`): its RBAC grants these by name.
const WEBHOOK_CONFIGURATION: &str = "idemq-operator";
const WEBHOOK_SECRET: &str = "idemq-operator-webhook-tls";

fn pod_policy(name: &str, queue: &str) -> anyhow::Result<IdempotentConsumer> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "idemq.dev/v1alpha1", "kind": "IdempotentConsumer",
        "metadata": { "name": name },
        "spec": {
            "injection": "pod",
            "target": { "selector": { "matchLabels": { "app": "worker" } } },
            "broker": { "rabbitmq": { "connectionSecretRef": { "name": "rabbitmq" }, "queue": queue, "deleteOnCleanup": true } },
            "delivery": { "port": 8080, "path": "/messages" }
        }
    }))?)
}

fn bare_pod(name: &str, labels: serde_json::Value) -> anyhow::Result<Pod> {
    Ok(serde_json::from_value(json!({
        "metadata": { "name": name, "labels": labels },
        "spec": { "containers": [{ "name": "app", "image": "example/worker:1" }] }
    }))?)
}

fn has_sidecar(pod: &Pod) -> bool {
    pod.spec
        .as_ref()
        .and_then(|s| s.init_containers.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.name == "idemq-sidecar"))
}

/// The certificate the webhook serves on `port`, verified against `ca` (PEM) for 127.0.0.1.
fn served_certificate(port: u16, ca: &[u8]) -> anyhow::Result<Vec<u8>> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName};
    use std::io::Write;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca) {
        roots.add(cert?)?;
    }
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let name = ServerName::try_from("127.0.0.1")?;
    let mut connection = rustls::ClientConnection::new(std::sync::Arc::new(config), name)?;
    let mut tcp = std::net::TcpStream::connect(("127.0.0.1", port))?;
    while connection.is_handshaking() {
        connection.complete_io(&mut tcp)?;
    }
    connection.writer().flush()?;
    let chain = connection
        .peer_certificates()
        .ok_or_else(|| anyhow::anyhow!("no certificate served"))?;
    Ok(chain[0].to_vec())
}

fn pem_der(pem: &[u8]) -> anyhow::Result<Vec<u8>> {
    use rustls::pki_types::pem::PemObject;
    Ok(rustls::pki_types::CertificateDer::from_pem_slice(pem)?.to_vec())
}

#[tokio::test]
#[ignore = "needs a disposable cluster: IDEMQ_E2E_KUBECONFIG (make e2e)"]
async fn the_webhook_injects_pods_and_leaves_their_workloads_alone() -> anyhow::Result<()> {
    let kubeconfig = e2e_kubeconfig()?;
    let client = client(&kubeconfig).await?;
    install_crd(&client).await?;
    let ns = unique("idemq-e2e-webhook");
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({ "metadata": { "name": ns } }))?,
        )
        .await?;
    let port = free_port()?;
    // The configuration of an earlier run (its caBundle from another CA) goes first.
    let configs: Api<DynamicObject> = Api::all_with(
        client.clone(),
        &kube::discovery::ApiResource::erase::<
            k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration,
        >(&()),
    );
    if configs.get_opt(WEBHOOK_CONFIGURATION).await?.is_some() {
        configs
            .delete(WEBHOOK_CONFIGURATION, &DeleteParams::default())
            .await?;
    }
    configs
        .patch(
            WEBHOOK_CONFIGURATION,
            &PatchParams::apply("idemq-e2e").force(),
            &Patch::Apply(webhook_configuration(port, &ns)),
        )
        .await?;
    let identity = chart_identity(&client, &kubeconfig, &ns).await?;
    // A 30-second certificate: renewed at 20 s, checked every 3 s.
    let args: Vec<String> = [
        format!("--webhook-addr=127.0.0.1:{port}"),
        "--webhook-names=127.0.0.1".to_string(),
        format!("--webhook-namespace={ns}"),
        format!("--webhook-secret={WEBHOOK_SECRET}"),
        format!("--webhook-configuration={WEBHOOK_CONFIGURATION}"),
        "--webhook-cert-lifetime=30s".to_string(),
    ]
    .into();
    let operator = start_operator_with(identity.path(), &ns, &args, &[])?;
    // The scenario stops the operator (the failure policy); it runs again to
    // finish the resource (its queue), then everything goes.
    let result = webhook_scenario(&client, &ns, port, operator).await;
    let operator = start_operator_with(identity.path(), &ns, &args, &[])?;
    let ics: Api<IdempotentConsumer> = Api::namespaced(client.clone(), &ns);
    let cleaned = delete_in_order(&ics, &["orders"], WAIT).await;
    drop(operator);
    configs
        .delete(WEBHOOK_CONFIGURATION, &DeleteParams::default())
        .await?;
    namespaces.delete(&ns, &DeleteParams::default()).await?;
    result.and(cleaned)
}

async fn webhook_scenario(
    client: &Client,
    ns: &str,
    port: u16,
    operator: Operator,
) -> anyhow::Result<()> {
    let configs: Api<k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration> =
        Api::all(client.clone());
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    // The operator created its CA and certificate and made the API server trust them.
    let ca = eventually(WAIT, "the caBundle patched in", || async {
        let config = configs.get(WEBHOOK_CONFIGURATION).await?;
        Ok(config
            .webhooks
            .unwrap_or_default()
            .first()
            .and_then(|w| w.client_config.ca_bundle.clone()))
    })
    .await?;
    let tls = secrets.get(WEBHOOK_SECRET).await?.data.unwrap_or_default();
    assert_eq!(
        tls.get("ca.crt").map(|b| &b.0),
        Some(&ca.0),
        "the Secret's CA"
    );

    secrets
        .create(
            &PostParams::default(),
            &serde_json::from_value(
                json!({ "metadata": { "name": "rabbitmq" }, "stringData": { "url": AMQP } }),
            )?,
        )
        .await?;
    let ics: Api<IdempotentConsumer> = Api::namespaced(client.clone(), ns);
    ics.create(
        &PostParams::default(),
        &pod_policy("orders", &unique("e2e-webhook"))?,
    )
    .await?;
    let hash = eventually(WAIT, "SidecarInjected (at pod creation)", || async {
        let ic = ics.get("orders").await?;
        let injected = condition(&ic, "SidecarInjected")
            .is_some_and(|c| c == ("True".into(), "InjectedAtPodCreation".into()));
        Ok(injected
            .then(|| ic.status.and_then(|s| s.config_hash))
            .flatten())
    })
    .await?;

    // A Deployment: its pods get the sidecar, the Deployment stays as it was.
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), ns);
    let mut worker = deployment("worker");
    if let Some(labels) = worker
        .spec
        .as_mut()
        .and_then(|s| s.template.metadata.as_mut())
        .and_then(|m| m.labels.as_mut())
    {
        labels.insert("idemq.dev/inject".into(), "enabled".into());
    }
    let created = deployments.create(&PostParams::default(), &worker).await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let pod = eventually(WAIT, "a pod of the Deployment", || async {
        let list = pods
            .list(&ListParams::default().labels("app=worker"))
            .await?;
        Ok(list.items.into_iter().find(|p| {
            p.metadata
                .owner_references
                .iter()
                .flatten()
                .any(|o| o.kind == "ReplicaSet")
        }))
    })
    .await?;
    assert!(has_sidecar(&pod), "the Deployment's pod has the sidecar");
    let meta = &pod.metadata;
    assert_eq!(
        meta.labels
            .as_ref()
            .and_then(|l| l.get("idemq.dev/consumer")),
        Some(&"orders".to_string())
    );
    assert_eq!(
        meta.annotations
            .as_ref()
            .and_then(|a| a.get("idemq.dev/config-hash")),
        Some(&hash)
    );
    assert!(pod
        .spec
        .as_ref()
        .and_then(|s| s.volumes.as_ref())
        .is_some_and(|v| v.iter().any(|v| v
            .config_map
            .as_ref()
            .is_some_and(|c| c.name == "orders-idemq"))));
    // Give the operator a reconcile or two: nothing writes the Deployment.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = deployments.get("worker").await?;
    assert_eq!(
        serde_json::to_string(&after.spec)?,
        serde_json::to_string(&created.spec)?,
        "the Deployment's spec is byte-for-byte what was created"
    );
    assert_eq!(after.metadata.generation, created.metadata.generation);
    // (The Deployment controller adds its revision annotation; idemq adds none.)
    assert!(after
        .metadata
        .annotations
        .iter()
        .flatten()
        .all(|(k, _)| !k.starts_with("idemq.dev/")));
    assert!(after
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .all(|f| f.manager.as_deref() != Some("idemq-operator")));
    println!(
        "webhook e2e: Deployment pod {} injected (config {hash}); Deployment generation {:?} and spec unchanged",
        pod.metadata.name.clone().unwrap_or_default(),
        after.metadata.generation
    );

    // A Job's pod gets it too.
    let jobs: Api<k8s_openapi::api::batch::v1::Job> = Api::namespaced(client.clone(), ns);
    jobs.create(
        &PostParams::default(),
        &serde_json::from_value(json!({
            "metadata": { "name": "nightly" },
            "spec": { "template": {
                "metadata": { "labels": { "app": "worker", "idemq.dev/inject": "enabled" } },
                "spec": { "restartPolicy": "Never",
                          "containers": [{ "name": "app", "image": "example/worker:1" }] }
            } }
        }))?,
    )
    .await?;
    let job_pod = eventually(WAIT, "a pod of the Job", || async {
        Ok(pods
            .list(&ListParams::default().labels("job-name=nightly"))
            .await?
            .items
            .into_iter()
            .next())
    })
    .await?;
    assert!(has_sidecar(&job_pod), "the Job's pod has the sidecar");

    // The status counts the running pods with the current configuration.
    let counted = eventually(WAIT, "status.injectedPods", || async {
        let status = ics.get("orders").await?.status.unwrap_or_default();
        Ok(status
            .injected_pods
            .filter(|n| *n >= 2)
            .map(|n| (n, status.current_pods)))
    })
    .await?;
    assert_eq!(
        counted.1,
        Some(counted.0),
        "every pod has the current configuration"
    );
    println!(
        "webhook e2e: Job pod injected; status injectedPods {} currentPods {:?}",
        counted.0, counted.1
    );

    // Rotation: the 30 s certificate is renewed from the same CA, and
    // served without a restart; a pod created afterwards still gets its sidecar.
    let first = tls.get("tls.crt").map(|b| b.0.clone()).unwrap_or_default();
    assert_eq!(served_certificate(port, &ca.0)?, pem_der(&first)?);
    let renewed = eventually(
        Duration::from_secs(45),
        "the certificate renewed",
        || async {
            let data = secrets.get(WEBHOOK_SECRET).await?.data.unwrap_or_default();
            let cert = data.get("tls.crt").map(|b| b.0.clone()).unwrap_or_default();
            Ok((cert != first).then_some((cert, data.get("ca.crt").map(|b| b.0.clone()))))
        },
    )
    .await?;
    assert_eq!(
        renewed.1.as_ref(),
        Some(&ca.0),
        "the same CA: the caBundle stays"
    );
    let served = eventually(
        Duration::from_secs(10),
        "the renewed certificate served",
        || async {
            let served = served_certificate(port, &ca.0)?;
            Ok((served == pem_der(&renewed.0)?).then_some(served))
        },
    )
    .await?;
    assert!(!served.is_empty());
    pods.create(
        &PostParams::default(),
        &bare_pod(
            "after-rotation",
            json!({ "app": "worker", "idemq.dev/inject": "enabled" }),
        )?,
    )
    .await?;
    assert!(
        has_sidecar(&pods.get("after-rotation").await?),
        "served after rotation"
    );
    println!("webhook e2e: certificate renewed and served without a restart; a pod created after it was injected");

    // With the operator down, the failure policy holds: a labelled pod is
    // refused; an unlabelled one never reaches the webhook and is created.
    drop(operator);
    let refused = pods
        .create(
            &PostParams::default(),
            &bare_pod(
                "while-down",
                json!({ "app": "worker", "idemq.dev/inject": "enabled" }),
            )?,
        )
        .await;
    match refused {
        Err(kube::Error::Api(status)) => {
            assert!(
                status.message.contains("pods.idemq.dev"),
                "{}",
                status.message
            );
            println!(
                "webhook e2e: operator down, labelled pod refused: {}",
                status.message
            );
        }
        other => anyhow::bail!("a labelled pod was not refused with the operator down: {other:?}"),
    }
    let unrelated = pods
        .create(
            &PostParams::default(),
            &bare_pod("unrelated", json!({ "app": "worker" }))?,
        )
        .await?;
    assert!(
        !has_sidecar(&unrelated),
        "not labelled: no webhook, no sidecar"
    );
    println!("webhook e2e: operator down, unlabelled pod created without the webhook");
    Ok(())
}

const NATS: &str = "nats://127.0.0.1:4222";

fn jetstream_policy(name: &str, target: &str, stream: &str) -> IdempotentConsumer {
    serde_json::from_value(json!({
        "apiVersion": "idemq.dev/v1alpha1", "kind": "IdempotentConsumer",
        "metadata": { "name": name },
        "spec": {
            "target": { "kind": "Deployment", "name": target },
            "broker": { "jetstream": { "connectionSecretRef": { "name": "nats" }, "stream": stream,
                                       "filterSubjects": [format!("{stream}.in")], "maxAckPending": 20,
                                       "ackWait": "20s", "deadLetterSubject": format!("{stream}.dead") } },
            "key": { "from": "messageId" },
            "delivery": { "port": 8080, "path": "/orders" }
        }
    }))
    .expect("a valid IdempotentConsumer")
}

/// The message of a resource's condition `type_`.
fn condition_message(ic: &IdempotentConsumer, type_: &str) -> String {
    ic.status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == type_))
        .map(|c| c.message.clone())
        .unwrap_or_default()
}

/// Waits until `name`'s BrokerBound condition has `status` and `reason`.
async fn broker_bound(
    ics: &Api<IdempotentConsumer>,
    name: &str,
    status: &str,
    reason: &str,
) -> anyhow::Result<IdempotentConsumer> {
    let what = format!("BrokerBound={status} {reason}");
    eventually(Duration::from_secs(120), &what, || async {
        let ic = ics.get(name).await?;
        Ok((condition(&ic, "BrokerBound") == Some((status.into(), reason.into()))).then_some(ic))
    })
    .await
}

/// A namespace of the test's own, the operator watching it as the chart's
/// ServiceAccount, `scenario` run in it; then the resources deleted in order,
/// the operator stopped and the namespace deleted.
async fn in_namespace<F, Fut>(base: &str, resources: &[&str], scenario: F) -> anyhow::Result<()>
where
    F: FnOnce(Client, String) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let kubeconfig = e2e_kubeconfig()?;
    let client = client(&kubeconfig).await?;
    install_crd(&client).await?;
    let ns = unique(base);
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({ "metadata": { "name": ns } }))?,
        )
        .await?;
    let identity = chart_identity(&client, &kubeconfig, &ns).await?;
    let operator = start_operator(identity.path(), &ns)?;
    let result = scenario(client.clone(), ns.clone()).await;
    let ics: Api<IdempotentConsumer> = Api::namespaced(client.clone(), &ns);
    let cleaned = delete_in_order(&ics, resources, WAIT).await;
    drop(operator);
    namespaces.delete(&ns, &DeleteParams::default()).await?;
    result.and(cleaned)
}

#[tokio::test]
#[ignore = "needs a disposable cluster: IDEMQ_E2E_KUBECONFIG (make e2e)"]
async fn a_jetstream_policy_reports_a_missing_stream_then_binds_and_creates_its_consumer(
) -> anyhow::Result<()> {
    let nats = async_nats::connect(NATS).await.map_err(|e| {
        anyhow::anyhow!(
            "NATS on {NATS} ({e}); start it with: source .ci/services.sh && ensure_nats"
        )
    })?;
    let js = async_nats::jetstream::new(nats);
    // Stream names take no dots; namespaces' dashes are fine.
    let stream = unique("E2E-ORDERS");
    let result = in_namespace("idemq-e2e-jetstream", &["orders"], |client, ns| {
        jetstream_scenario(client, ns, js.clone(), stream.clone())
    })
    .await;
    let _ = js.delete_stream(&stream).await;
    result
}

async fn jetstream_scenario(
    client: Client,
    ns: String,
    js: async_nats::jetstream::Context,
    stream: String,
) -> anyhow::Result<()> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    secrets
        .create(
            &PostParams::default(),
            &serde_json::from_value(
                json!({ "metadata": { "name": "nats" }, "stringData": { "url": NATS } }),
            )?,
        )
        .await?;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    deployments
        .create(&PostParams::default(), &deployment("worker"))
        .await?;
    let ics: Api<IdempotentConsumer> = Api::namespaced(client.clone(), &ns);
    ics.create(
        &PostParams::default(),
        &jetstream_policy("orders", "worker", &stream),
    )
    .await?;

    // The stream is its producers': missing, it is reported, not created.
    let missing = broker_bound(&ics, "orders", "False", "StreamNotFound").await?;
    let message = condition_message(&missing, "BrokerBound");
    assert!(message.contains(&stream), "names the stream: {message}");
    assert!(
        js.get_stream(&stream).await.is_err(),
        "the operator created no stream"
    );

    // Its producers create it: the operator's next attempt creates the
    // durable consumer with the spec's settings, and binds.
    js.create_stream(async_nats::jetstream::stream::Config {
        name: stream.clone(),
        subjects: vec![format!("{stream}.in")],
        ..Default::default()
    })
    .await?;
    let created_at = std::time::Instant::now();
    let bound = broker_bound(&ics, "orders", "True", "Bound").await?;
    let bound_after = created_at.elapsed();
    let durable = idemq_operator::labels::jetstream_consumer(&bound);
    let mut consumer: async_nats::jetstream::consumer::PullConsumer = js
        .get_stream(&stream)
        .await?
        .get_consumer(&durable)
        .await
        .map_err(|e| anyhow::anyhow!("the durable consumer {durable}: {e}"))?;
    let info = consumer.info().await?.clone();
    assert_eq!(info.config.durable_name.as_deref(), Some(durable.as_str()));
    assert_eq!(info.config.max_ack_pending, 20);
    assert_eq!(info.config.ack_wait, Duration::from_secs(20));
    assert_eq!(
        info.config.ack_policy,
        async_nats::jetstream::consumer::AckPolicy::Explicit
    );
    let filters = [
        info.config.filter_subjects.clone(),
        vec![info.config.filter_subject.clone()],
    ]
    .concat();
    assert!(
        filters.contains(&format!("{stream}.in")),
        "filtered on the spec's subject: {filters:?}"
    );
    assert_eq!(
        condition(&bound, "SidecarInjected"),
        Some(("True".into(), "Injected".into()))
    );

    // The sidecar is configured for that consumer, the URL kept in the Secret.
    let cm = Api::<ConfigMap>::namespaced(client.clone(), &ns)
        .get("orders-idemq")
        .await?;
    let yaml = cm.data.expect("data")["sidecar.yaml"].clone();
    assert!(!yaml.contains(NATS), "no connection in the ConfigMap");
    let config = idemq_sidecar::Config::from_yaml(&yaml)?;
    let section = config
        .broker
        .and_then(|b| b.jetstream)
        .expect("a JetStream section");
    assert_eq!(
        (section.stream.as_str(), section.consumer.as_str()),
        (stream.as_str(), durable.as_str())
    );

    // Deletion withdraws the sidecar; the stream and the durable consumer stay.
    ics.delete("orders", &DeleteParams::default()).await?;
    eventually(WAIT, "the policy to be gone (finalizer done)", || async {
        Ok(ics.get_opt("orders").await?.is_none().then_some(()))
    })
    .await?;
    assert!(
        js.get_stream(&stream)
            .await?
            .get_consumer::<async_nats::jetstream::consumer::pull::Config>(&durable)
            .await
            .is_ok(),
        "the durable consumer is kept"
    );
    println!(
        "e2e jetstream: StreamNotFound reported ({message}); bound {bound_after:.1?} after the stream was created, durable consumer {durable} (max ack pending {}, ack wait {:?}); cleaned up",
        info.config.max_ack_pending, info.config.ack_wait
    );
    Ok(())
}

fn mqtt_policy(name: &str, target: &str) -> IdempotentConsumer {
    serde_json::from_value(json!({
        "apiVersion": "idemq.dev/v1alpha1", "kind": "IdempotentConsumer",
        "metadata": { "name": name },
        "spec": {
            "target": { "kind": "Deployment", "name": target },
            "broker": { "mqtt": { "connectionSecretRef": { "name": "mqtt" }, "auth": "userPassword",
                                  "topics": ["devices/+/readings"], "deadLetterTopic": "devices/dead" } },
            "key": { "from": "messageId" },
            "delivery": { "port": 8080, "path": "/readings" }
        }
    }))
    .expect("a valid IdempotentConsumer")
}

/// A Mosquitto of the test's own that admits one user, killed on drop.
struct MqttBroker {
    port: u16,
    child: Child,
    _dir: tempfile::TempDir,
}

impl MqttBroker {
    async fn start(user: &str, password: &str) -> anyhow::Result<Self> {
        const INSTALL: &str = "source .ci/services.sh && ensure_mosquitto";
        let dir = tempfile::tempdir()?;
        let passwords = dir.path().join("passwords");
        let made = Command::new("mosquitto_passwd")
            .arg("-c")
            .arg("-b")
            .arg(&passwords)
            .args([user, password])
            .status()
            .map_err(|e| anyhow::anyhow!("mosquitto_passwd ({e}); install it with: {INSTALL}"))?;
        anyhow::ensure!(made.success(), "mosquitto_passwd failed");
        let port = free_port()?;
        let conf = dir.path().join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous false\npassword_file {}\npersistence false\n",
                passwords.display()
            ),
        )?;
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| anyhow::anyhow!("start mosquitto ({e}); install it with: {INSTALL}"))?;
        let broker = Self {
            port,
            child,
            _dir: dir,
        };
        eventually(Duration::from_secs(10), "mosquitto to answer", || async {
            Ok(tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .ok()
                .map(|_| ()))
        })
        .await?;
        Ok(broker)
    }
}

impl Drop for MqttBroker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
#[ignore = "needs a disposable cluster: IDEMQ_E2E_KUBECONFIG (make e2e)"]
async fn an_mqtt_policy_reports_refused_credentials_then_binds_with_the_right_ones(
) -> anyhow::Result<()> {
    let broker = MqttBroker::start("idemq", "right-pass").await?;
    let url = format!("mqtt://127.0.0.1:{}", broker.port);
    in_namespace("idemq-e2e-mqtt", &["readings"], |client, ns| {
        mqtt_scenario(client, ns, url)
    })
    .await
}

async fn mqtt_scenario(client: Client, ns: String, url: String) -> anyhow::Result<()> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    secrets
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": { "name": "mqtt" },
                "stringData": { "url": url, "username": "idemq", "password": "wrong-pass" }
            }))?,
        )
        .await?;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    deployments
        .create(&PostParams::default(), &deployment("worker"))
        .await?;
    let ics: Api<IdempotentConsumer> = Api::namespaced(client.clone(), &ns);
    ics.create(&PostParams::default(), &mqtt_policy("readings", "worker"))
        .await?;

    // Refused credentials: said in the condition and a Warning Event, never
    // the password itself.
    let refused = broker_bound(&ics, "readings", "False", "BrokerAuthenticationFailed").await?;
    let message = condition_message(&refused, "BrokerBound");
    assert!(!message.contains("wrong-pass"), "no password: {message}");
    let events: Api<Event> = Api::namespaced(client.clone(), &ns);
    let event = eventually(
        WAIT,
        "a BrokerAuthenticationFailed Warning Event",
        || async {
            let list = events.list(&ListParams::default()).await?;
            Ok(list.items.into_iter().find(|e| {
                e.reason.as_deref() == Some("BrokerAuthenticationFailed")
                    && e.type_.as_deref() == Some("Warning")
            }))
        },
    )
    .await?;
    assert!(
        !event.message.unwrap_or_default().contains("wrong-pass"),
        "no password in the Event"
    );

    // The right password: the Secret's change binds it.
    let fixed = std::time::Instant::now();
    secrets
        .patch(
            "mqtt",
            &PatchParams::default(),
            &Patch::Merge(json!({ "stringData": { "password": "right-pass" } })),
        )
        .await?;
    let bound = broker_bound(&ics, "readings", "True", "Bound").await?;
    let bound_after = fixed.elapsed();
    let described = condition_message(&bound, "BrokerBound");
    let group = format!("{ns}.readings");
    assert!(
        described.contains(&format!("$share/{group}/devices/+/readings")),
        "the shared subscription: {described}"
    );

    // The sidecar's credentials come from the Secret, the subscription from its config.
    let worker = deployments.get("worker").await?;
    let env = worker
        .spec
        .and_then(|s| s.template.spec)
        .and_then(|p| p.init_containers)
        .unwrap_or_default()
        .into_iter()
        .find(|c| c.name == "idemq-sidecar")
        .and_then(|c| c.env)
        .unwrap_or_default();
    assert!(
        env.iter()
            .all(|e| e.value.as_deref().is_none_or(|v| !v.contains("pass"))),
        "no credential as a plain value"
    );
    let cm = Api::<ConfigMap>::namespaced(client.clone(), &ns)
        .get("readings-idemq")
        .await?;
    let yaml = cm.data.expect("data")["sidecar.yaml"].clone();
    assert!(!yaml.contains("right-pass"), "no password in the ConfigMap");
    let config = idemq_sidecar::Config::from_yaml(&yaml)?;
    let mqtt = config.broker.and_then(|b| b.mqtt).expect("an MQTT section");
    assert_eq!(mqtt.topics, ["devices/+/readings"]);
    assert_eq!(mqtt.shared_group.as_deref(), Some(group.as_str()));
    println!(
        "e2e mqtt: BrokerAuthenticationFailed reported ({message}); bound {bound_after:.1?} after the password was corrected: {described}"
    );
    Ok(())
}

fn zeromq_policy(name: &str, target: &str) -> IdempotentConsumer {
    serde_json::from_value(json!({
        "apiVersion": "idemq.dev/v1alpha1", "kind": "IdempotentConsumer",
        "metadata": { "name": name },
        "spec": {
            "target": { "kind": "Deployment", "name": target },
            "broker": { "zeromq": {
                "curve": { "secretName": "zeromq-keys" },
                "deadLetter": { "endpoint": "tcp://dead-letters:5556" },
                "networkPolicy": { "clientSelector": { "matchLabels": { "app": "client" } } }
            } },
            "delivery": { "port": 8080, "path": "/orders" }
        }
    }))
    .expect("a valid IdempotentConsumer")
}

/// Whether `meta` names the resource with `uid` as its controller.
fn controlled_by(
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    uid: &str,
) -> bool {
    meta.owner_references
        .iter()
        .flatten()
        .any(|o| o.uid == uid && o.controller == Some(true))
}

#[tokio::test]
#[ignore = "needs a disposable cluster: IDEMQ_E2E_KUBECONFIG (make e2e)"]
async fn a_zeromq_policy_waits_for_its_curve_keys_then_exposes_the_sidecars_through_an_owned_service(
) -> anyhow::Result<()> {
    in_namespace("idemq-e2e-zeromq", &["ingest"], zeromq_scenario).await
}

async fn zeromq_scenario(client: Client, ns: String) -> anyhow::Result<()> {
    use k8s_openapi::api::networking::v1::NetworkPolicy;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    deployments
        .create(&PostParams::default(), &deployment("worker"))
        .await?;
    let ics: Api<IdempotentConsumer> = Api::namespaced(client.clone(), &ns);
    ics.create(&PostParams::default(), &zeromq_policy("ingest", "worker"))
        .await?;
    let waiting = broker_bound(&ics, "ingest", "False", "SecretNotFound").await?;
    println!(
        "e2e zeromq: BrokerBound=False SecretNotFound: {}",
        condition_message(&waiting, "BrokerBound")
    );

    // A Secret whose server key is not a CURVE key: named, never quoted.
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let z85 = |key: &[u8]| zmq::z85_encode(key).map_err(|e| anyhow::anyhow!("z85: {e}"));
    let server = zmq::CurveKeyPair::new()?;
    let client_key = z85(&zmq::CurveKeyPair::new()?.public_key)?;
    let secret_key = z85(&server.secret_key)?;
    secrets
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({ "metadata": { "name": "zeromq-keys" },
                "stringData": { "serverSecretKey": "garbled-secret-value", "clientPublicKeys": client_key } }))?,
        )
        .await?;
    let invalid = broker_bound(&ics, "ingest", "False", "CurveKeyInvalid").await?;
    let message = condition_message(&invalid, "BrokerBound");
    anyhow::ensure!(
        !message.contains("garbled-secret-value"),
        "the key's value in the status: {message}"
    );
    println!("e2e zeromq: BrokerBound=False CurveKeyInvalid: {message}");

    secrets
        .patch(
            "zeromq-keys",
            &PatchParams::default(),
            &Patch::Merge(json!({ "stringData": { "serverSecretKey": secret_key } })),
        )
        .await?;
    let bound = broker_bound(&ics, "ingest", "True", "Bound").await?;
    println!(
        "e2e zeromq: BrokerBound=True Bound: {}",
        condition_message(&bound, "BrokerBound")
    );
    let uid = bound.metadata.uid.clone().unwrap_or_default();

    // The Service: owned, selecting the injected pods, the sidecars' port.
    let services: Api<Service> = Api::namespaced(client.clone(), &ns);
    let service = services.get("ingest").await?;
    anyhow::ensure!(
        controlled_by(&service.metadata, &uid),
        "the Service is owned: {service:?}"
    );
    let spec = service.spec.clone().unwrap_or_default();
    let port = spec
        .ports
        .iter()
        .flatten()
        .next()
        .cloned()
        .unwrap_or_default();
    anyhow::ensure!(
        port.port == 5555
            && port.target_port
                == Some(
                    k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(
                        "idemq-zmq".into()
                    )
                ),
        "Service port: {port:?}"
    );
    let selector = spec.selector.unwrap_or_default();
    anyhow::ensure!(
        selector
            .get("idemq.dev/zeromq-endpoint")
            .map(String::as_str)
            == Some("ingest"),
        "Service selector: {selector:?}"
    );

    // The pod template: the label the Service selects, the declared port,
    // the pod's address from the downward API, keys by reference.
    let template = eventually(WAIT, "the sidecar in the pod template", || async {
        let d = deployments.get("worker").await?;
        Ok(d.spec.map(|s| s.template).filter(|t| {
            t.spec
                .as_ref()
                .and_then(|s| s.init_containers.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.name == "idemq-sidecar"))
        }))
    })
    .await?;
    let labels = template.metadata.and_then(|m| m.labels).unwrap_or_default();
    anyhow::ensure!(
        labels.get("idemq.dev/zeromq-endpoint").map(String::as_str) == Some("ingest"),
        "pod labels: {labels:?}"
    );
    let sidecar = template
        .spec
        .and_then(|s| s.init_containers)
        .into_iter()
        .flatten()
        .find(|c| c.name == "idemq-sidecar")
        .ok_or_else(|| anyhow::anyhow!("no sidecar"))?;
    let rendered = serde_json::to_string(&sidecar)?;
    anyhow::ensure!(
        rendered.contains(r#""containerPort":5555"#)
            && rendered.contains(r#""fieldPath":"status.podIP""#)
            && !rendered.contains(&secret_key),
        "sidecar: {rendered}"
    );

    // The NetworkPolicy: owned, the clients on the port; deleted, it is
    // restored at once (an owned object); no longer asked for, it goes.
    let policies: Api<NetworkPolicy> = Api::namespaced(client.clone(), &ns);
    let policy = policies.get("ingest").await?;
    anyhow::ensure!(
        controlled_by(&policy.metadata, &uid),
        "the NetworkPolicy is owned"
    );
    let rules = serde_json::to_value(policy.spec.clone().unwrap_or_default().ingress)?;
    anyhow::ensure!(
        rules[0]["from"][0]["podSelector"]["matchLabels"]["app"] == "client"
            && rules[0]["ports"][0]["port"] == 5555
            && rules[1]["ports"][0]["endPort"] == 5554,
        "ingress rules: {rules}"
    );
    let old_uid = policy.metadata.uid.clone();
    let deleted = std::time::Instant::now();
    policies.delete("ingest", &DeleteParams::default()).await?;
    eventually(
        Duration::from_secs(20),
        "the NetworkPolicy restored",
        || async {
            Ok(policies
                .get_opt("ingest")
                .await?
                .filter(|p| p.metadata.uid != old_uid)
                .map(|_| ()))
        },
    )
    .await?;
    println!(
        "e2e zeromq: the deleted NetworkPolicy was restored in {:.1} s",
        deleted.elapsed().as_secs_f64()
    );
    ics.patch(
        "ingest",
        &PatchParams::default(),
        &Patch::Merge(json!({ "spec": { "broker": { "zeromq": { "networkPolicy": null } } } })),
    )
    .await?;
    eventually(WAIT, "the NetworkPolicy deleted", || async {
        Ok(policies.get_opt("ingest").await?.is_none().then_some(()))
    })
    .await?;

    // No key in any Event.
    let events: Api<Event> = Api::namespaced(client.clone(), &ns);
    let said = serde_json::to_string(&events.list(&ListParams::default()).await?.items)?;
    anyhow::ensure!(
        !said.contains(&secret_key) && !said.contains("garbled-secret-value"),
        "a key in the Events"
    );
    Ok(())
}
