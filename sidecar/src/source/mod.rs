//! Broker sources: where messages come from and how their fate is settled.
//!
//! The [`engine`](crate::engine) looks at an [`Envelope`] and returns a
//! [`Verdict`]; a source turns verdicts into the broker's own operations. Adding
//! a broker (Kafka, NATS JetStream, Pub/Sub) means writing a source that yields
//! envelopes and applies verdicts; the engine does not change.
//!
//! Each message is a task, spawned boxed (`Box::pin`): the future that
//! handles a message is a few kilobytes, and tokio moves a task's future by
//! value several times (into the task, then at each change of its stage).

pub mod acks;
pub mod jetstream;
pub mod kafka;
pub mod mqtt;
pub mod offsets;
pub mod publish;
pub mod pubsub;
pub mod rabbitmq;
pub mod sessions;
pub mod zeromq;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::engine::Engine;
use crate::flow::Flow;
use crate::health::Component;
use crate::metrics::Metrics;
use crate::store::KeyStore;

/// What every source is given, whatever its broker: the rest of a source's
/// fields are its broker's own. Cheap to clone: a source's tasks hold a clone.
#[derive(Clone)]
pub struct Common {
    pub config: Arc<Config>,
    /// Decides each message's fate.
    pub engine: Arc<Engine>,
    pub store: Arc<dyn KeyStore>,
    pub metrics: Arc<Metrics>,
    /// The broker's readiness.
    pub health: Component,
    /// Admits messages while the application takes them and their bytes fit.
    pub flow: Flow,
}

/// A message as the engine sees it, whatever broker it came from.
#[derive(Debug, Clone, Default)]
pub struct Envelope {
    pub message_id: Option<String>,
    /// Headers whose values are text (or numbers, rendered as text); a
    /// Pub/Sub message's attributes.
    pub headers: Vec<(String, String)>,
    pub content_type: Option<String>,
    pub body: Bytes,
    /// The broker says it delivered this message before.
    pub redelivered: bool,
    /// The Kafka record key, as text.
    pub record_key: Option<String>,
    /// Where the broker keeps the message (Kafka: `topic/partition/offset`).
    pub coordinates: Option<String>,
}

impl Envelope {
    /// A header's value; header names compare case-insensitively.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// How long a source that holds a message whose key is in flight elsewhere
/// (MQTT, Kafka, Pub/Sub, a ZeroMQ dealer: they cannot or should not give it
/// back) waits before the message is claimed again. The message holds one of
/// the in-flight slots meanwhile, and its offset or acknowledgement holds up
/// those behind it (MQTT's PUBACKs go in order, Kafka commits only up to it).
/// The holder usually finishes within milliseconds, so the first look comes
/// soon, and the waits double up to the engine's delay.
#[derive(Debug)]
pub struct InFlightWait(Duration);

impl Default for InFlightWait {
    fn default() -> Self {
        Self(Duration::from_millis(4))
    }
}

impl InFlightWait {
    /// The next wait, at most `delay` (the engine's).
    fn next(&mut self, delay: Duration) -> Duration {
        let wait = self.0.min(delay);
        self.0 = (self.0 * 2).min(delay);
        wait
    }

    /// Sleeps the next wait; false when `shutdown` came first.
    pub async fn sleep(&mut self, delay: Duration, shutdown: &CancellationToken) -> bool {
        let wait = self.next(delay);
        tokio::select! {
            _ = shutdown.cancelled() => false,
            _ = tokio::time::sleep(wait) => true,
        }
    }
}

/// Why a message was dead-lettered; sent in the `x-idemq-reason` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadLetterReason {
    MissingKey,
    Poison,
    MaxAttempts,
    Conflict,
}

impl DeadLetterReason {
    pub const ALL: [Self; 4] = [
        Self::MissingKey,
        Self::Poison,
        Self::MaxAttempts,
        Self::Conflict,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::MissingKey => "missing_key",
            Self::Poison => "poison",
            Self::MaxAttempts => "max_attempts",
            Self::Conflict => "conflict",
        }
    }
}

/// What must happen to a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Handled (or already handled before): acknowledge it.
    Ack,
    /// A duplicate of a completed key: acknowledge it, and copy it to the
    /// audit exchange when one is configured.
    Duplicate,
    /// Give it back to the broker after `delay`, to be delivered again.
    Requeue { delay: Duration },
    /// Publish it to the dead-letter exchange, then acknowledge it.
    DeadLetter {
        reason: DeadLetterReason,
        attempts: u32,
    },
    /// The key store did not answer: give the message back and stop
    /// consuming until the store answers again.
    StoreUnavailable,
    /// The application is not available (not ready yet, or the circuit is
    /// open): give the message back without counting an attempt, and stop
    /// consuming until [`Flow::until_available`](crate::flow::Flow::until_available)
    /// returns.
    AppUnavailable,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wait_for_an_in_flight_key_starts_short_and_doubles_up_to_the_engines_delay() {
        let ms = Duration::from_millis;
        let mut wait = InFlightWait::default();
        let waits: Vec<_> = (0..8).map(|_| wait.next(ms(250))).collect();
        assert_eq!(
            waits,
            [
                ms(4),
                ms(8),
                ms(16),
                ms(32),
                ms(64),
                ms(128),
                ms(250),
                ms(250)
            ]
        );
        // A shorter delay from the engine (the holder's lease nearly out) caps it.
        assert_eq!(InFlightWait::default().next(ms(1)), ms(1));
    }
}
