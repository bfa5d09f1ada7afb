//! Pub/Sub bindings against Google's emulator on 127.0.0.1:8085 (from
//! `.ci/services.sh`). Each test uses topics and subscriptions with unique
//! names and deletes only those. The emulator has no IAM: `PermissionDenied`
//! is covered by the status mapping's unit test, not here.

use std::time::Duration;

use gcloud_pubsub::client::Client;
use gcloud_pubsub::subscription::SubscriptionConfig;
use idemq_operator::broker::pool::PoolConfig;
use idemq_operator::broker::pubsub::{Connection, Plan, PubSub};
use idemq_operator::broker::BindError;

const EMULATOR: &str = "127.0.0.1:8085";
const PROJECT: &str = "idemq-operator-test";
const START: &str = "source .ci/services.sh && ensure_pubsub_emulator";

fn unique(base: &str) -> String {
    format!(
        "{base}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..10]
    )
}

fn binder() -> PubSub {
    PubSub::new(PoolConfig::default(), Some(EMULATOR.to_string()))
}

/// The emulator takes no key; a placeholder stands for the Secret's.
fn connection() -> Connection {
    Connection { key: "{}".into() }
}

/// Subscription `<topic>-sub` of `topic` with every setting the spec has.
fn plan(topic: &str) -> Plan {
    Plan {
        project: PROJECT.to_string(),
        topic: topic.to_string(),
        subscription: format!("{topic}-sub"),
        ack_deadline_seconds: 45,
        retry_policy: Some((Duration::from_secs(5), Duration::from_secs(120))),
        dead_letter_policy: Some((format!("{topic}-dead"), 7)),
        dead_letter_topic: None,
        exactly_once: true,
        ordering: true,
        filter: "attributes.kind = \"order\"".into(),
    }
}

/// The test's own client: makes the producers' topic, looks, cleans up.
struct Emulator {
    client: Client,
    topics: Vec<String>,
    subscriptions: Vec<String>,
}

impl Emulator {
    async fn new() -> Self {
        let client = idemq_sidecar::source::pubsub::client(PROJECT, Some(EMULATOR), None)
            .await
            .unwrap_or_else(|e| {
                panic!("the Pub/Sub emulator does not answer on {EMULATOR} ({e}); start it with: {START}")
            });
        Self {
            client,
            topics: Vec::new(),
            subscriptions: Vec::new(),
        }
    }

    async fn create_topic(&mut self, name: &str) {
        self.client
            .topic(name)
            .create(None, None)
            .await
            .unwrap_or_else(|e| panic!("create topic {name} ({e}); start the emulator: {START}"));
        self.topics.push(name.to_string());
    }

    async fn topic_exists(&self, name: &str) -> bool {
        self.client
            .topic(name)
            .exists(None)
            .await
            .expect("look up topic")
    }

    async fn config(&self, subscription: &str) -> Option<(String, SubscriptionConfig)> {
        self.client
            .subscription(subscription)
            .config(None)
            .await
            .ok()
    }

    /// Removes what the test and the binder made (every topic of `plan`).
    async fn delete(&self, plan: &Plan) {
        let _ = self
            .client
            .subscription(&plan.subscription)
            .delete(None)
            .await;
        for s in &self.subscriptions {
            let _ = self.client.subscription(s).delete(None).await;
        }
        let dead = plan.dead_letter_policy.iter().map(|(t, _)| t.clone());
        for t in self.topics.iter().cloned().chain(dead) {
            let _ = self.client.topic(&t).delete(None).await;
        }
    }
}

#[tokio::test]
async fn a_missing_subscription_is_created_with_the_specs_settings_and_binds_again_unchanged() {
    let mut emulator = Emulator::new().await;
    let topic = unique("orders");
    emulator.create_topic(&topic).await;
    let plan = plan(&topic);
    let binder = binder();
    let first = binder.bind(&connection(), &plan).await;
    let again = binder.bind(&connection(), &plan).await;
    let created = emulator.config(&plan.subscription).await;
    let dead_letter_topic = emulator.topic_exists(&format!("{topic}-dead")).await;
    emulator.delete(&plan).await;
    assert_eq!(first, Ok(()));
    assert_eq!(again, Ok(()), "its own subscription matches the spec");
    let (attached, config) = created.expect("the subscription was created");
    let retry = config.retry_policy.expect("a retry policy");
    let dead = config.dead_letter_policy.expect("a dead-letter policy");
    let seconds = |d: Option<_>| d.and_then(|d| Duration::try_from(d).ok());
    println!(
        "created: topic {attached}, ackDeadlineSeconds {}, retry {:?}..{:?}, dead letters {} after {}, exactly-once {}, ordering {}, filter {:?}",
        config.ack_deadline_seconds,
        seconds(retry.minimum_backoff),
        seconds(retry.maximum_backoff),
        dead.dead_letter_topic,
        dead.max_delivery_attempts,
        config.enable_exactly_once_delivery,
        config.enable_message_ordering,
        config.filter
    );
    assert_eq!(attached, format!("projects/{PROJECT}/topics/{topic}"));
    assert_eq!(config.ack_deadline_seconds, 45);
    assert_eq!(
        (
            seconds(retry.minimum_backoff),
            seconds(retry.maximum_backoff)
        ),
        (Some(Duration::from_secs(5)), Some(Duration::from_secs(120)))
    );
    assert_eq!(
        (dead.dead_letter_topic, dead.max_delivery_attempts),
        (format!("projects/{PROJECT}/topics/{topic}-dead"), 7)
    );
    assert!(config.enable_exactly_once_delivery && config.enable_message_ordering);
    assert_eq!(config.filter, "attributes.kind = \"order\"");
    assert!(dead_letter_topic, "the dead-letter topic was created");
}

#[tokio::test]
async fn a_missing_topic_is_topic_not_found_and_nothing_is_created() {
    let emulator = Emulator::new().await;
    let topic = unique("missing");
    let plan = plan(&topic);
    let bound = binder().bind(&connection(), &plan).await;
    let subscription = emulator.config(&plan.subscription).await;
    let dead_letter_topic = emulator.topic_exists(&format!("{topic}-dead")).await;
    emulator.delete(&plan).await;
    println!("{bound:?}");
    assert_eq!(
        bound,
        Err(BindError::PubSubTopicNotFound(format!(
            "projects/{PROJECT}/topics/{topic}"
        )))
    );
    assert!(subscription.is_none(), "no subscription without its topic");
    assert!(
        !dead_letter_topic,
        "nothing is created before the topic exists"
    );
}

#[tokio::test]
async fn a_subscription_with_another_ack_deadline_is_subscription_mismatch_and_left_unchanged() {
    let mut emulator = Emulator::new().await;
    let topic = unique("orders");
    emulator.create_topic(&topic).await;
    let plan = plan(&topic);
    // Someone else's subscription: the same name, Pub/Sub's defaults.
    emulator
        .client
        .subscription(&plan.subscription)
        .create(
            &format!("projects/{PROJECT}/topics/{topic}"),
            SubscriptionConfig {
                ack_deadline_seconds: 10,
                ..SubscriptionConfig::default()
            },
            None,
        )
        .await
        .expect("create the other subscription");
    let bound = binder().bind(&connection(), &plan).await;
    let after = emulator.config(&plan.subscription).await;
    emulator.delete(&plan).await;
    println!("{bound:?}");
    let Err(BindError::SubscriptionMismatch(message)) = bound else {
        panic!("a mismatch: {bound:?}");
    };
    for setting in [
        "ackDeadlineSeconds 10 (the spec: 45)",
        "retryPolicy none (the spec: 5s..2m)",
        "enableExactlyOnceDelivery false (the spec: true)",
        "enableMessageOrdering false (the spec: true)",
    ] {
        assert!(message.contains(setting), "{setting} in {message}");
    }
    let (_, config) = after.expect("the subscription is still there");
    assert_eq!(config.ack_deadline_seconds, 10, "unchanged");
    assert!(config.retry_policy.is_none() && config.dead_letter_policy.is_none());
    assert!(!config.enable_exactly_once_delivery);
}

#[tokio::test]
async fn a_secret_that_is_not_a_key_is_authentication_failed_without_its_content() {
    // Google Cloud itself (no emulator): the key is parsed before any call.
    let binder = PubSub::new(PoolConfig::default(), None);
    let connection = Connection {
        key: "private_key: s3cret-material".into(),
    };
    let bound = binder.bind(&connection, &plan(&unique("orders"))).await;
    println!("{bound:?}");
    let Err(BindError::AuthenticationFailed(message)) = bound else {
        panic!("refused credentials: {bound:?}");
    };
    assert!(!message.contains("s3cret"), "{message}");
}
