//! The broker under test: what the pipeline scenarios ([`super::scenarios`])
//! need from a broker, so that each scenario is written once and run against
//! every broker the sidecar consumes. A broker adds an implementation here
//! (see `rabbitmq.rs`), and its test file instantiates the scenarios.

use std::time::Duration;

use idemq_sidecar::secrets::Secrets;

/// One message to publish: its idempotency key (none when `None`) and body.
#[derive(Debug, Clone)]
pub struct Message {
    pub key: Option<String>,
    pub body: Vec<u8>,
}

impl Message {
    pub fn keyed(key: impl Into<String>, body: Vec<u8>) -> Self {
        Self {
            key: Some(key.into()),
            body,
        }
    }

    pub fn unkeyed(body: Vec<u8>) -> Self {
        Self { key: None, body }
    }
}

/// A dead letter as read back from the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// The `x-idemq-reason` header.
    pub reason: String,
    /// The key the message was published with.
    pub key: Option<String>,
}

/// A broker with a topology of its own (work queue or topic, dead-letter
/// destination, consumer group) unique to one test.
#[allow(async_fn_in_trait)]
pub trait BrokerUnderTest: Sized {
    /// The broker's name in printed figures.
    const NAME: &'static str;

    /// How long what a killed consumer held may take to come back to the
    /// next one.
    const REDELIVERY_WAIT: Duration = super::scenarios::WAIT;

    /// Creates the topology of `test`, with names no other test uses. Panics,
    /// saying how to start the broker, when it does not answer.
    async fn create(test: &str) -> Self;

    /// The sidecar config's `broker:` section for this topology (indented
    /// under `broker:`), letting at most `max_in_flight` messages be in flight.
    fn broker_yaml(&self, max_in_flight: u32) -> String;

    /// Lines under `dedup:` that make the sidecar read the key [`Message::key`]
    /// travels in (empty when the default `messageId` does).
    fn dedup_key_yaml(&self) -> String;

    /// Secrets of an in-process sidecar.
    fn secrets(&self) -> Secrets;

    /// Environment of a sidecar run as a child process.
    fn env(&self) -> Vec<(String, String)>;

    /// Publishes every message, in order, and waits until the broker has them.
    async fn publish(&self, messages: Vec<Message>);

    /// Messages not settled by the consumer: ready in the queue, or past the
    /// group's committed offsets.
    async fn backlog(&self) -> u64;

    /// Takes every dead letter published so far.
    async fn dead_letters(&self) -> Vec<DeadLetter>;

    /// Deletes what `create` made, and nothing else.
    async fn delete(self);
}

/// A broker the sidecar can lose mid-stream and get back.
#[allow(async_fn_in_trait)]
pub trait LosesBroker: BrokerUnderTest {
    /// How the broker is lost, in printed figures.
    const LOSS: &'static str;
    /// How long the broker stays away before [`LosesBroker::restore`]; zero
    /// when only the sidecar's connection is cut and the broker stays up.
    const AWAY: Duration;
    /// Messages published before the loss: enough that it lands mid-stream.
    const MESSAGES: usize;

    /// Cuts the sidecar `consumer` off the broker, as a broker restart or a
    /// network cut would.
    async fn cut(&self, consumer: &str);

    /// Brings the broker back (when it went away) and waits until it answers.
    async fn restore(&self);
}
