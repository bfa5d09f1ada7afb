//! Kafka bindings against the real Kafka-protocol broker on 127.0.0.1:9092
//! (tansu, from `.ci/services.sh`). Each test uses topics with unique names
//! and deletes only those. Refused credentials are tried on a tansu of the
//! test's own that requires authentication.

use std::time::{Duration, Instant};

use idemq_operator::broker::kafka::{Connection, Kafka, Plan};
use idemq_operator::broker::pool::PoolConfig;
use idemq_operator::broker::BindError;
use idemq_sidecar::config::{SaslMechanism, SecurityProtocol};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::ClientConfig;

const BOOTSTRAP: &str = "127.0.0.1:9092";
const START: &str = "source .ci/services.sh && ensure_kafka";
const TIMEOUT: Duration = Duration::from_secs(10);

fn unique(base: &str) -> String {
    format!(
        "{base}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..10]
    )
}

fn connection(bootstrap: &str) -> Connection {
    Connection {
        bootstrap_servers: bootstrap.to_string(),
        security_protocol: SecurityProtocol::Plaintext,
        sasl_mechanism: None,
        username: None,
        password: None,
        ca_pem: None,
    }
}

fn plan(topics: &[&str], partitions: i32, replication: Option<i32>) -> Plan {
    Plan {
        topics: topics.iter().map(|t| t.to_string()).collect(),
        dead_letter_topics: topics.iter().map(|t| format!("{t}.dead")).collect(),
        dead_letter_partitions: partitions,
        dead_letter_replication_factor: replication,
    }
}

/// The test's own admin client: makes the producers' topics, looks, cleans up.
struct Topics {
    admin: AdminClient<DefaultClientContext>,
}

impl Topics {
    fn new() -> Self {
        let admin = ClientConfig::new()
            .set("bootstrap.servers", BOOTSTRAP)
            .create()
            .expect("kafka admin client");
        Self { admin }
    }

    async fn create(&self, topic: &str, partitions: i32) {
        let opts = AdminOptions::new().operation_timeout(Some(TIMEOUT));
        let results = self
            .admin
            .create_topics(
                &[NewTopic::new(topic, partitions, TopicReplication::Fixed(1))],
                &opts,
            )
            .await
            .unwrap_or_else(|e| {
                panic!("Kafka does not answer on {BOOTSTRAP} ({e}); start it with: {START}")
            });
        for r in results {
            r.unwrap_or_else(|(name, code)| panic!("create topic {name}: {code}"));
        }
    }

    /// Partitions of `topic`, None when it does not exist. Asks for every
    /// topic, so looking never creates one.
    fn partitions(&self, topic: &str) -> Option<usize> {
        let metadata = self
            .admin
            .inner()
            .fetch_metadata(None, TIMEOUT)
            .unwrap_or_else(|e| panic!("metadata from {BOOTSTRAP} ({e}); start it with: {START}"));
        metadata
            .topics()
            .iter()
            .find(|t| t.name() == topic && t.error().is_none())
            .map(|t| t.partitions().len())
    }

    async fn delete(&self, topics: &[&str]) {
        let opts = AdminOptions::new().operation_timeout(Some(TIMEOUT));
        let _ = self.admin.delete_topics(topics, &opts).await;
    }
}

#[tokio::test]
async fn missing_topics_are_reported_by_name_and_never_created() {
    let topics = Topics::new();
    let present = unique("op-kafka-present");
    let missing = unique("op-kafka-missing");
    let also = unique("op-kafka-also-missing");
    topics.create(&present, 1).await;
    let kafka = Kafka::default();
    let result = kafka
        .bind(
            &connection(BOOTSTRAP),
            &plan(&[&present, &missing, &also], 1, Some(1)),
        )
        .await;
    let missing_exist = [topics.partitions(&missing), topics.partitions(&also)];
    let dead_created = topics.partitions(&format!("{present}.dead"));
    topics
        .delete(&[&present, &missing, &also, &format!("{present}.dead")])
        .await;
    assert_eq!(
        result,
        Err(BindError::TopicNotFound(vec![
            missing.clone(),
            also.clone()
        ]))
    );
    let message = result.expect_err("missing").to_string();
    println!("{message}");
    assert!(
        message.contains(&format!("topics {missing:?}, {also:?} do not exist"))
            && message.contains("their producers own them"),
        "{message}"
    );
    assert_eq!(
        missing_exist,
        [None, None],
        "the consumer's topics are not created"
    );
    assert_eq!(
        dead_created, None,
        "nothing is created while a topic is missing"
    );
}

#[tokio::test]
async fn dead_letter_topics_are_created_as_the_spec_says_and_binding_again_changes_nothing() {
    let topics = Topics::new();
    let orders = unique("op-kafka-orders");
    let refunds = unique("op-kafka-refunds");
    topics.create(&orders, 2).await;
    topics.create(&refunds, 2).await;
    let dead = [format!("{orders}.dead"), format!("{refunds}.dead")];
    let kafka = Kafka::default();
    let plan = plan(&[&orders, &refunds], 3, Some(1));
    let first = kafka.bind(&connection(BOOTSTRAP), &plan).await;
    let created: Vec<_> = dead.iter().map(|t| topics.partitions(t)).collect();
    let again = kafka.bind(&connection(BOOTSTRAP), &plan).await;
    let consumed: Vec<_> = [&orders, &refunds]
        .iter()
        .map(|t| topics.partitions(t))
        .collect();
    topics
        .delete(&[&orders, &refunds, &dead[0], &dead[1]])
        .await;
    assert_eq!(first, Ok(()));
    assert_eq!(
        created,
        [Some(3), Some(3)],
        "each <topic>.dead, with the spec's partitions"
    );
    assert_eq!(
        again,
        Ok(()),
        "existing dead-letter topics are left as they are"
    );
    assert_eq!(
        consumed,
        [Some(2), Some(2)],
        "the consumed topics are untouched"
    );
}

#[tokio::test]
async fn without_a_replication_factor_the_brokers_default_applies() {
    let topics = Topics::new();
    let orders = unique("op-kafka-default-rf");
    topics.create(&orders, 1).await;
    let dead = format!("{orders}.dead");
    let result = Kafka::default()
        .bind(&connection(BOOTSTRAP), &plan(&[&orders], 1, None))
        .await;
    let created = topics.partitions(&dead);
    topics.delete(&[&orders, &dead]).await;
    assert_eq!(result, Ok(()));
    assert_eq!(created, Some(1));
}

#[tokio::test]
async fn an_unreachable_broker_is_reported_as_unreachable_in_bounded_time() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let started = Instant::now();
    let result = Kafka::default()
        .bind(
            &connection(&format!("127.0.0.1:{port}")),
            &plan(&["orders"], 1, None),
        )
        .await;
    let Err(BindError::Unreachable(reason)) = result else {
        panic!("expected Unreachable, got {result:?}");
    };
    println!("unreachable after {:?}: {reason}", started.elapsed());
    assert!(started.elapsed() < Duration::from_secs(15), "{reason}");
    assert!(
        reason.contains("Connection refused"),
        "says what librdkafka saw: {reason}"
    );
}

#[tokio::test]
async fn admin_clients_are_shared_per_endpoint_bounded_and_closed_when_idle() {
    let topics = Topics::new();
    let orders = unique("op-kafka-pool");
    topics.create(&orders, 1).await;
    let dead = format!("{orders}.dead");
    let kafka = Kafka::new(PoolConfig {
        max_connections: 1,
        idle: Duration::from_millis(300),
    });
    let plan = plan(&[&orders], 1, Some(1));
    // Twenty resources on one endpoint: one client.
    let local = connection(BOOTSTRAP);
    let binds = futures::future::join_all((0..20).map(|_| kafka.bind(&local, &plan))).await;
    let shared = kafka.clients();
    // Another endpoint (the same broker by another name) waits for the one
    // slot, then takes it.
    let other = kafka.bind(&connection("localhost:9092"), &plan).await;
    let bounded = kafka.clients();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let idle = kafka.clients();
    topics.delete(&[&orders, &dead]).await;
    assert!(binds.iter().all(Result::is_ok), "{binds:?}");
    assert_eq!(shared, 1, "one admin client for one endpoint");
    assert_eq!(other, Ok(()));
    assert_eq!(bounded, 1, "never more than max_connections");
    assert_eq!(idle, 0, "closed when idle");
}

/// A tansu of the test's own that requires SASL authentication and knows no
/// user, on a free port; stopped on drop.
struct AuthenticatingBroker {
    port: u16,
    child: std::process::Child,
}

impl AuthenticatingBroker {
    async fn start() -> Self {
        let tansu = concat!(env!("CARGO_MANIFEST_DIR"), "/../.tools/bin/tansu");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let url = format!("tcp://127.0.0.1:{port}");
        let child = std::process::Command::new(tansu)
            .args([
                "broker",
                "--authentication",
                "--storage-engine",
                "memory://tansu/",
            ])
            .args(["--listener-url", &url, "--advertised-listener-url", &url])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "start {tansu} ({e}); install it with: source .ci/services.sh && ensure_kafka"
                )
            });
        // Owned from here: dropping it stops the process, whatever happens next.
        let broker = Self { port, child };
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                return broker;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("own tansu did not listen on {port}");
    }
}

impl Drop for AuthenticatingBroker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn refused_credentials_are_an_authentication_failure_that_never_shows_the_password() {
    let broker = AuthenticatingBroker::start().await;
    let password = "never-in-a-message-7f3a";
    let connection = Connection {
        bootstrap_servers: format!("127.0.0.1:{}", broker.port),
        security_protocol: SecurityProtocol::SaslPlaintext,
        sasl_mechanism: Some(SaslMechanism::ScramSha512),
        username: Some("billing".into()),
        password: Some(password.into()),
        ca_pem: None,
    };
    let result = Kafka::default()
        .bind(&connection, &plan(&["orders"], 1, None))
        .await;
    let Err(BindError::AuthenticationFailed(reason)) = &result else {
        panic!("expected AuthenticationFailed, got {result:?}");
    };
    println!("authentication failed: {reason}");
    assert!(!reason.contains(password), "{reason}");
    assert!(
        reason.contains("check username, password and saslMechanism"),
        "{reason}"
    );
}
