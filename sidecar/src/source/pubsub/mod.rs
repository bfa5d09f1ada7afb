//! Google Cloud Pub/Sub source: a streaming pull on one subscription, each
//! message settled by the engine's verdict.
//!
//! A *session* is one client: it reads the subscription's settings (ack
//! deadline, message ordering, dead-letter policy), opens the streaming pull
//! with the configured flow control (`maxOutstandingMessages`,
//! `maxOutstandingBytes`) and hands each message to a task.
//!
//! **Ack deadlines as a lease.** From receipt to settlement a message is
//! *held*: every third of its ack deadline one `modifyAckDeadline` extends
//! the deadlines of all held messages, so Pub/Sub does not hand a message the
//! application is still working on to someone else. The deadline is the
//! subscription's, or `dedup.lease` when that is longer: after a crash Pub/Sub
//! redelivers only once the claim in the store has lapsed too, so the
//! redelivery is claimable at once. A message is acked only after the
//! engine's verdict (the outcome is recorded in the store first); it is given
//! back with a nack (deadline 0), or with a deadline of the back-off when it
//! should come back later. A key in flight elsewhere is waited for here,
//! deadline extended, rather than given back: every nack counts as a
//! delivery attempt toward a dead-letter policy.
//!
//! **Exactly-once subscriptions** answer each ack. An ack refused because its
//! ack id expired means Pub/Sub delivers the message again; its key is
//! completed in the store, so that delivery is acked as a duplicate: nothing
//! is lost and nothing is processed twice. The failure is counted
//! (`idemq_broker_ack_failures_total`).
//!
//! **Ordering keys.** With message ordering on, at most one message per
//! ordering key is in flight, in the order Pub/Sub delivered them.
//!
//! **Dead letters.** When the subscription has a dead-letter policy, Pub/Sub
//! moves a message after its last delivery attempt: the sidecar nacks it
//! (after a back-off) until then. Otherwise it publishes the message to
//! `deadLetterTopic` with the attributes `idemq-reason`, `idemq-attempts`,
//! `idemq-subscription` and `idemq-message-id`, and acks it only once Pub/Sub
//! stored the dead letter.
//!
//! **Store outage.** The session ends when the key store stops answering
//! (fail closed): the sidecar stops taking messages from the stream, those in
//! flight are given back (nacked) as their verdicts come, and whatever is
//! still held after `shutdownGrace` is nacked; what Pub/Sub sends meanwhile
//! waits in the client and comes again once its deadline lapsed (see
//! [`Connection`]). Consumption resumes when the store answers. On shutdown
//! the stream closes first (the client nacks what it buffered), then what is
//! still held is nacked. A crash leaves held messages to their deadlines.
//!
//! The session also ends when the subscription stops answering (checked every
//! few seconds), or the client's stream gives up; it then reconnects with a
//! back-off. `idemq_broker_connected` and readiness follow.

mod client;
mod settle;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use gcloud_gax::grpc::Status;
use gcloud_googleapis::pubsub::v1::PubsubMessage;
use gcloud_pubsub::client::{google_cloud_auth, Client};
use gcloud_pubsub::publisher::PublisherConfig;
use gcloud_pubsub::subscriber::ReceivedMessage;
use gcloud_pubsub::subscription::{Subscription, SubscriptionConfig};
use tokio::sync::oneshot;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

pub use self::client::{ack_deadline, client, connect, subscribe_config};
use self::settle::{DeadLetters, Leases, Settler};
use super::sessions::{SessionEnd, Sessions};
use super::{Common, Envelope};
use crate::config::PubSubConfig;
use crate::engine::Engine;
use crate::flow::Permit;
use crate::traces;

/// Every call to Pub/Sub, the client's own retries included.
const RPC_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a session checks that the subscription still answers.
const PROBE_EVERY: Duration = Duration::from_secs(5);
/// Messages the client buffers between the stream and the sidecar. Their
/// deadlines are not extended until the sidecar takes them, so few.
const BUFFERED: usize = 16;

/// The dead-letter attributes.
pub const REASON: &str = "idemq-reason";
pub const ATTEMPTS: &str = "idemq-attempts";
pub const SUBSCRIPTION: &str = "idemq-subscription";
pub const MESSAGE_ID: &str = "idemq-message-id";

/// Everything a Pub/Sub source needs.
pub struct Source {
    pub common: Common,
    /// The `broker.pubsub` section of `config`.
    pub pubsub: PubSubConfig,
    /// An emulator's `host:port` (`PUBSUB_EMULATOR_HOST`): no credentials.
    pub emulator_host: Option<String>,
}

/// A client and its streaming pull. It outlives a pause (store or
/// application unavailable): the client cannot end a streaming pull short of
/// closing its connection (the request side stays open), and a stream left
/// open keeps receiving messages that nobody would read. While paused, the
/// sidecar takes nothing from it; what Pub/Sub sends meanwhile waits in the
/// client, its deadline not extended, and comes again once it lapsed.
struct Connection {
    client: Client,
    subscription: Subscription,
    stream: gcloud_pubsub::subscription::MessageStream,
    /// The ack deadline the sidecar keeps, in seconds.
    deadline: i32,
}

impl Connection {
    /// Closes the streaming pull; the client nacks what it buffered.
    async fn close(self) {
        let buffered = self.stream.dispose().await;
        tracing::debug!(buffered, "streaming pull closed");
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("read the service-account key {path}: {source}")]
    KeyFile {
        path: String,
        source: google_cloud_auth::error::Error,
    },
    #[error("Google Cloud credentials: {0}")]
    Credentials(google_cloud_auth::error::Error),
    #[error("connect to Pub/Sub: {0}")]
    Connect(gcloud_pubsub::client::Error),
    #[error("subscription {subscription}: {source}")]
    Subscription {
        subscription: String,
        source: Status,
    },
    #[error("subscription {subscription}: no answer within {RPC_TIMEOUT:?}")]
    Timeout { subscription: String },
    #[error("subscription {subscription} has no dead-letter policy and broker.pubsub.deadLetterTopic is not set: dead letters would have nowhere to go")]
    NoDeadLetterRoute { subscription: String },
    #[error("the streaming pull on {subscription} ended: the client gave up on an error it does not retry")]
    StreamEnded { subscription: String },
}

impl Source {
    /// Consumes until `shutdown` fires, reconnecting as needed.
    pub async fn run(&self, shutdown: CancellationToken) {
        let mut sessions = Sessions::new("Pub/Sub", &self.common);
        let mut connection = None;
        while sessions.ready(&shutdown).await {
            let ended = self.session(&mut connection, &shutdown).await;
            if !sessions.ended(ended, &shutdown).await {
                break;
            }
        }
        if let Some(open) = connection.take() {
            open.close().await;
        }
    }

    /// Opens the client and the streaming pull.
    async fn connect(&self) -> Result<Connection, SourceError> {
        let client = connect(&self.pubsub, self.emulator_host.as_deref()).await?;
        let subscription = client.subscription(&self.pubsub.subscription);
        let settings = self.settings(&subscription).await?;
        let deadline = ack_deadline(
            settings.ack_deadline_seconds,
            self.common.config.dedup.lease,
        );
        let stream = subscription
            .subscribe(Some(subscribe_config(&self.pubsub, deadline)))
            .await
            .map_err(|source| SourceError::Subscription {
                subscription: self.pubsub.subscription.clone(),
                source,
            })?;
        Ok(Connection {
            client,
            subscription,
            stream,
            deadline,
        })
    }

    async fn session(
        &self,
        connection: &mut Option<Connection>,
        shutdown: &CancellationToken,
    ) -> Result<SessionEnd, SourceError> {
        let conn = match connection {
            Some(conn) => conn,
            None => connection.insert(self.connect().await?),
        };
        // Read at every session: the operator or someone else may have
        // changed the subscription meanwhile.
        let settings = self.settings(&conn.subscription).await?;
        let dead_letters = match (&settings.dead_letter_policy, &self.pubsub.dead_letter_topic) {
            (Some(policy), _) => DeadLetters::Policy {
                max_attempts: policy.max_delivery_attempts,
            },
            (None, Some(topic)) => DeadLetters::Topic(
                conn.client
                    .topic(topic)
                    .new_publisher(Some(dead_letter_publishing())),
            ),
            (None, None) => {
                return Err(SourceError::NoDeadLetterRoute {
                    subscription: self.pubsub.subscription.clone(),
                })
            }
        };
        tracing::info!(
            project = %self.pubsub.project,
            subscription = %self.pubsub.subscription,
            ack_deadline_seconds = conn.deadline,
            ordering = settings.enable_message_ordering,
            exactly_once = settings.enable_exactly_once_delivery,
            dead_letters = %dead_letters,
            max_outstanding_messages = self.pubsub.max_outstanding_messages,
            budget = self.common.flow.budget(),
            "consuming"
        );
        self.common.health.set(true);
        self.common.metrics.broker_connected.set(1);

        let (initial_backoff, max_backoff) = self.delivery_backoff();
        let settle = Arc::new(Settler {
            subscription: conn.subscription.clone(),
            subscription_id: self.pubsub.subscription.clone(),
            leases: Leases::default(),
            dead_letters,
            initial_backoff,
            max_backoff,
            store_down: CancellationToken::new(),
            metrics: self.common.metrics.clone(),
        });
        let extender = tokio::spawn(settle.clone().extend_leases(conn.deadline));
        let outcome = self
            .consume(conn, &settle, settings.enable_message_ordering, shutdown)
            .await;
        // After a shutdown or an error the stream closes (a pause keeps it),
        // before what is still held is given back: Pub/Sub would push it
        // right back into a stream still open.
        if matches!(outcome, Ok(SessionEnd::Shutdown) | Err(_)) {
            if let Some(closed) = connection.take() {
                closed.close().await;
            }
        }
        settle.nack_all().await;
        self.common.health.set(false);
        self.common.metrics.broker_connected.set(0);
        extender.abort();
        outcome
    }

    /// Takes messages from the stream until the session ends, then gives
    /// back what is held.
    async fn consume(
        &self,
        conn: &mut Connection,
        settle: &Arc<Settler>,
        ordering: bool,
        shutdown: &CancellationToken,
    ) -> Result<SessionEnd, SourceError> {
        let mut tasks = JoinSet::new();
        let mut lanes = Lanes::default();
        let mut probe = tokio::time::interval(PROBE_EVERY);
        probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        probe.tick().await;
        // Pub/Sub enforces the flow control too, but the emulator does not:
        // never hold more than maxOutstandingMessages.
        let most = self.pubsub.max_outstanding_messages as usize;
        let outcome = loop {
            let room = tasks.len() < most;
            tokio::select! {
                _ = shutdown.cancelled() => break Ok(SessionEnd::Shutdown),
                _ = settle.store_down.cancelled() => break Ok(SessionEnd::StoreDown),
                _ = self.common.flow.unavailable() => break Ok(SessionEnd::AppDown),
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
                _ = probe.tick() => {
                    if let Err(e) = self.settings(&conn.subscription).await {
                        break Err(e);
                    }
                }
                // Takes the next message only when the flow has room for it.
                next = self.common.flow.when_ready(shutdown, conn.stream.next()), if room => match next {
                    Some(message) => {
                        let permit = self.common.flow.take(message.message.data.len());
                        settle.leases.hold(&message.ack_id);
                        let turn = (ordering && !message.message.ordering_key.is_empty())
                            .then(|| lanes.next(&message.message.ordering_key));
                        tasks.spawn(Box::pin(handle(
                            message,
                            permit,
                            turn,
                            self.common.engine.clone(),
                            settle.clone(),
                            shutdown.clone(),
                        )));
                    }
                    None => break Err(SourceError::StreamEnded {
                        subscription: self.pubsub.subscription.clone(),
                    }),
                },
            }
        };

        // Let what is in flight settle; deadlines are still being extended.
        let grace = self.common.config.shutdown_grace;
        let drained =
            tokio::time::timeout(grace, async { while tasks.join_next().await.is_some() {} }).await;
        if drained.is_err() {
            tracing::warn!(grace = ?grace, left = tasks.len(), "in-flight deliveries did not finish in time: giving them back");
            tasks.abort_all();
            while tasks.join_next().await.is_some() {}
        }
        outcome
    }

    /// The subscription's settings, which also shows it answers.
    async fn settings(
        &self,
        subscription: &Subscription,
    ) -> Result<SubscriptionConfig, SourceError> {
        let id = || self.pubsub.subscription.clone();
        match tokio::time::timeout(RPC_TIMEOUT, subscription.config(None)).await {
            Ok(Ok((_topic, settings))) => Ok(settings),
            Ok(Err(source)) => Err(SourceError::Subscription {
                subscription: id(),
                source,
            }),
            Err(_) => Err(SourceError::Timeout { subscription: id() }),
        }
    }

    fn delivery_backoff(&self) -> (Duration, Duration) {
        self.common
            .config
            .delivery
            .as_ref()
            .map(|d| (d.initial_backoff, d.max_backoff))
            .unwrap_or((Duration::from_secs(1), Duration::from_secs(60)))
    }
}

/// At most one message per ordering key in flight, in the order received:
/// each message waits until the one before it with the same key is settled
/// (its sender dropped).
#[derive(Default)]
struct Lanes {
    last: HashMap<String, oneshot::Receiver<()>>,
}

/// Lanes kept before the finished ones are swept.
const LANES_SWEPT_AT: usize = 4096;

impl Lanes {
    /// The turn of the next message with `key`: it waits for `.0`, and drops
    /// `.1` once settled.
    fn next(&mut self, key: &str) -> (Option<oneshot::Receiver<()>>, oneshot::Sender<()>) {
        let (done, turn) = oneshot::channel();
        let before = self.last.insert(key.to_string(), turn);
        if self.last.len() > LANES_SWEPT_AT {
            self.last.retain(|_, turn| {
                matches!(turn.try_recv(), Err(oneshot::error::TryRecvError::Empty))
            });
        }
        (before, done)
    }
}

/// Handles one message: waits for its ordering key's turn, lets the engine
/// decide, then settles it.
async fn handle(
    mut message: ReceivedMessage,
    permit: Permit,
    turn: Option<(Option<oneshot::Receiver<()>>, oneshot::Sender<()>)>,
    engine: Arc<Engine>,
    settle: Arc<Settler>,
    shutdown: CancellationToken,
) {
    let _done = match turn {
        Some((before, done)) => {
            if let Some(before) = before {
                let _ = before.await;
            }
            Some(done)
        }
        None => None,
    };
    let _in_flight = settle.metrics.received();
    let envelope = envelope(&mut message.message, message.delivery_attempt);
    let span = engine.trace(
        &envelope,
        traces::Origin {
            system: "gcp_pubsub",
            destination: &settle.subscription_id,
        },
    );
    let verdict = settle.decide(&engine, &envelope, &span, &shutdown).await;
    let step = span.settlement(&verdict);
    settle.apply(&message, &envelope, verdict).await;
    drop((step, span, permit));
}

/// The broker-neutral view of a message: its attributes are the headers, and
/// the `content-type` attribute (Pub/Sub's CloudEvents binding) its media
/// type. The body moves out of the message.
fn envelope(message: &mut PubsubMessage, delivery_attempt: Option<usize>) -> Envelope {
    let headers: Vec<(String, String)> = message
        .attributes
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let content_type = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-type"))
        .map(|(_, v)| v.clone());
    Envelope {
        message_id: Some(message.message_id.clone()).filter(|id| !id.is_empty()),
        headers,
        content_type,
        body: Bytes::from(std::mem::take(&mut message.data)),
        redelivered: delivery_attempt.is_some_and(|a| a > 1),
        ..Envelope::default()
    }
}

/// The dead-letter publisher sends each dead letter at once (the client's
/// default bundles 3 and waits up to 100 ms for them), and its workers,
/// which wake at every flush interval even when idle, wake every 10 s.
fn dead_letter_publishing() -> PublisherConfig {
    PublisherConfig {
        bundle_size: 1,
        flush_interval: Duration::from_secs(10),
        ..PublisherConfig::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_are_headers_and_the_message_id_is_pubsubs() {
        let mut message = PubsubMessage {
            data: b"{}".to_vec(),
            attributes: [("order-id".to_string(), "o-1".to_string())].into(),
            message_id: "1234".into(),
            ..PubsubMessage::default()
        };
        let e = envelope(&mut message, Some(2));
        assert_eq!(e.message_id.as_deref(), Some("1234"));
        assert_eq!(e.header("Order-Id"), Some("o-1"));
        assert_eq!(&e.body[..], b"{}");
        assert!(e.redelivered);
        assert!(!envelope(&mut PubsubMessage::default(), None).redelivered);
    }

    #[tokio::test]
    async fn one_message_per_ordering_key_at_a_time_in_order() {
        let mut lanes = Lanes::default();
        let (none, first) = lanes.next("a");
        assert!(none.is_none(), "the first of a key goes at once");
        let (after_first, second) = lanes.next("a");
        let (other, _) = lanes.next("b");
        assert!(other.is_none(), "another key does not wait");
        let mut after_first = after_first.expect("the second waits for the first");
        assert!(matches!(
            after_first.try_recv(),
            Err(oneshot::error::TryRecvError::Empty)
        ));
        drop(first);
        after_first
            .await
            .expect_err("released when the first is settled");
        drop(second);
    }
}
