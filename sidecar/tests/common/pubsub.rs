//! Google's Pub/Sub emulator on 127.0.0.1:8085 as a [`BrokerUnderTest`]: a
//! topic and subscription unique to one test, a dead-letter topic with a
//! subscription the test reads dead letters from, each message's key in the
//! `event-id` attribute (the key the sidecar reads), and deletion of only
//! those. The backlog is what a pull finds: messages neither acked nor held.

use std::collections::HashMap;
use std::time::Duration;

use gcloud_gax::conn::Environment;
use gcloud_googleapis::pubsub::v1::{
    DeadLetterPolicy, ModifyAckDeadlineRequest, PubsubMessage, PullRequest,
};
use gcloud_pubsub::client::{Client, ClientConfig};
use gcloud_pubsub::publisher::PublisherConfig;
use gcloud_pubsub::subscription::{Subscription, SubscriptionConfig};
use idemq_sidecar::secrets::Secrets;

use super::broker::{BrokerUnderTest, DeadLetter, Message};

pub const EMULATOR: &str = "127.0.0.1:8085";
pub const PROJECT: &str = "idemq-tests";
/// The attribute each test message carries its key in.
pub const KEY: &str = "event-id";

/// How a test's subscription is made.
#[derive(Debug, Clone)]
pub struct Settings {
    pub ack_deadline_seconds: i32,
    pub ordering: bool,
    pub exactly_once: bool,
    /// A dead-letter policy moving messages to the test's dead-letter topic
    /// after this many delivery attempts.
    pub dead_letter_policy: Option<i32>,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            ack_deadline_seconds: 10,
            ordering: false,
            exactly_once: false,
            dead_letter_policy: None,
        }
    }
}

pub struct PubSub {
    pub topic: String,
    pub subscription: String,
    pub dead_letter_topic: String,
    pub dead_letter_subscription: String,
    pub client: Client,
}

pub async fn client() -> Client {
    let config = ClientConfig {
        project_id: Some(PROJECT.to_string()),
        environment: Environment::Emulator(EMULATOR.to_string()),
        ..ClientConfig::default()
    };
    Client::new(config).await.unwrap_or_else(|e| {
        panic!("the Pub/Sub emulator does not answer on {EMULATOR} ({e}); start it with: gcloud beta emulators pubsub start --host-port={EMULATOR} &")
    })
}

impl PubSub {
    /// A topology of `test` whose subscription has `settings`.
    pub async fn create_with(test: &str, settings: Settings) -> Self {
        let client = client().await;
        let topic = super::unique(test);
        let subscription = format!("{topic}-sub");
        let dead_letter_topic = format!("{topic}-dead");
        let dead_letter_subscription = format!("{topic}-dead-sub");
        for name in [&topic, &dead_letter_topic] {
            client
                .create_topic(name, None, None)
                .await
                .unwrap_or_else(|e| {
                    panic!("create topic {name} on the emulator at {EMULATOR}: {e}")
                });
        }
        client
            .create_subscription(
                &dead_letter_subscription,
                &dead_letter_topic,
                SubscriptionConfig::default(),
                None,
            )
            .await
            .expect("create the dead-letter subscription");
        let config = SubscriptionConfig {
            ack_deadline_seconds: settings.ack_deadline_seconds,
            enable_message_ordering: settings.ordering,
            enable_exactly_once_delivery: settings.exactly_once,
            dead_letter_policy: settings.dead_letter_policy.map(|max| DeadLetterPolicy {
                dead_letter_topic: client.fully_qualified_topic_name(&dead_letter_topic),
                max_delivery_attempts: max,
            }),
            ..SubscriptionConfig::default()
        };
        client
            .create_subscription(&subscription, &topic, config, None)
            .await
            .expect("create the subscription");
        Self {
            topic,
            subscription,
            dead_letter_topic,
            dead_letter_subscription,
            client,
        }
    }

    /// Publishes messages as they are, in chunks, waiting for each id.
    pub async fn publish_raw(&self, messages: Vec<PubsubMessage>) {
        let mut publisher = self
            .client
            .topic(&self.topic)
            .new_publisher(Some(PublisherConfig {
                workers: 3,
                flush_interval: Duration::from_millis(10),
                bundle_size: 500,
                retry_setting: None,
            }));
        for chunk in messages.chunks(500) {
            for awaiter in publisher.publish_bulk(chunk.to_vec()).await {
                awaiter
                    .get()
                    .await
                    .expect("the emulator stored the message");
            }
        }
        publisher.shutdown().await;
    }

    /// Pulls what is available without waiting, holds it until nothing more
    /// comes, then gives it all back. Returns each message's attributes.
    pub async fn peek(&self, subscription: &str) -> Vec<HashMap<String, String>> {
        let sub = self.client.subscription(subscription);
        let (held, found) = pull_all(&sub).await;
        modify(&sub, held, 0).await;
        found
    }

    /// Pulls and acks every message available on `subscription`, returning
    /// its attributes.
    pub async fn take(&self, subscription: &str) -> Vec<HashMap<String, String>> {
        let sub = self.client.subscription(subscription);
        let (held, found) = pull_all(&sub).await;
        if !held.is_empty() {
            sub.ack(held).await.expect("ack what was pulled");
        }
        found
    }
}

/// Pulls until a pull comes back empty twice; returns the ack ids and the
/// messages' attributes.
async fn pull_all(sub: &Subscription) -> (Vec<String>, Vec<HashMap<String, String>>) {
    let client = sub.get_client();
    let (mut held, mut found, mut empty) = (Vec::new(), Vec::new(), 0);
    while empty < 2 {
        #[allow(deprecated)]
        let request = PullRequest {
            subscription: sub.fully_qualified_name().to_string(),
            return_immediately: true,
            max_messages: 1000,
        };
        let pulled = client
            .pull(request, None)
            .await
            .expect("pull")
            .into_inner()
            .received_messages;
        if pulled.is_empty() {
            empty += 1;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        for m in pulled {
            held.push(m.ack_id);
            found.push(m.message.map(|m| m.attributes).unwrap_or_default());
        }
    }
    (held, found)
}

async fn modify(sub: &Subscription, ack_ids: Vec<String>, seconds: i32) {
    for chunk in ack_ids.chunks(1000) {
        let request = ModifyAckDeadlineRequest {
            subscription: sub.fully_qualified_name().to_string(),
            ack_ids: chunk.to_vec(),
            ack_deadline_seconds: seconds,
        };
        sub.get_client()
            .modify_ack_deadline(request, None)
            .await
            .expect("give the messages back");
    }
}

impl BrokerUnderTest for PubSub {
    const NAME: &'static str = "pubsub";
    /// The emulator pushes everything to a stream, ignoring flow control, so a
    /// killed sidecar held most of the backlog; it comes back only at its
    /// deadlines, and not all at the first (as after a stream closed: see
    /// `tests/pubsub.rs`). The deadline is 10 s, but five runs of the crash
    /// test took 24 to 104 s in all, and in one more 100 of 600 messages were
    /// still out 90 s after the restart.
    const REDELIVERY_WAIT: Duration = Duration::from_secs(240);

    async fn create(test: &str) -> Self {
        Self::create_with(test, Settings::default()).await
    }

    fn broker_yaml(&self, max_in_flight: u32) -> String {
        format!(
            "  pubsub:\n    project: {PROJECT}\n    subscription: {}\n    maxOutstandingMessages: {max_in_flight}\n    deadLetterTopic: {}\n",
            self.subscription, self.dead_letter_topic
        )
    }

    fn dedup_key_yaml(&self) -> String {
        format!("  key:\n    from: attribute\n    name: {KEY}\n")
    }

    fn secrets(&self) -> Secrets {
        Secrets {
            pubsub_emulator_host: Some(EMULATOR.to_string()),
            ..Secrets::default()
        }
    }

    fn env(&self) -> Vec<(String, String)> {
        vec![("PUBSUB_EMULATOR_HOST".to_string(), EMULATOR.to_string())]
    }

    async fn publish(&self, messages: Vec<Message>) {
        let messages = messages
            .into_iter()
            .map(|Message { key, body }| PubsubMessage {
                data: body,
                attributes: key.map(|k| (KEY.to_string(), k)).into_iter().collect(),
                ..PubsubMessage::default()
            })
            .collect();
        self.publish_raw(messages).await;
    }

    async fn backlog(&self) -> u64 {
        self.peek(&self.subscription).await.len() as u64
    }

    async fn dead_letters(&self) -> Vec<DeadLetter> {
        self.take(&self.dead_letter_subscription)
            .await
            .into_iter()
            .map(|attributes| DeadLetter {
                reason: attributes
                    .get(idemq_sidecar::source::pubsub::REASON)
                    .cloned()
                    .unwrap_or_default(),
                key: attributes.get(KEY).cloned(),
            })
            .collect()
    }

    async fn delete(self) {
        for sub in [&self.subscription, &self.dead_letter_subscription] {
            let _ = self.client.subscription(sub).delete(None).await;
        }
        for topic in [&self.topic, &self.dead_letter_topic] {
            let _ = self.client.topic(topic).delete(None).await;
        }
    }
}
