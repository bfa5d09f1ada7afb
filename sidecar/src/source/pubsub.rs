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

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use gcloud_gax::conn::{ConnectionOptions, Environment};
use gcloud_gax::grpc::{Code, Status};
use gcloud_googleapis::pubsub::v1::{ModifyAckDeadlineRequest, PubsubMessage};
use gcloud_pubsub::client::google_cloud_auth;
use gcloud_pubsub::client::{Client, ClientConfig};
use gcloud_pubsub::publisher::Publisher;
use gcloud_pubsub::subscriber::{ReceivedMessage, SubscriberConfig};
use gcloud_pubsub::subscription::{SubscribeConfig, Subscription, SubscriptionConfig};
use tokio::sync::oneshot;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::sessions::{SessionEnd, Sessions};
use super::{Common, DeadLetterReason, Envelope, InFlightWait, Verdict};
use crate::config::PubSubConfig;
use crate::engine::{backoff, Engine};
use crate::flow::Permit;
use crate::metrics::{Metrics, OutcomeLabel};
use crate::traces::{self, MessageSpan};

/// Every call to Pub/Sub, the client's own retries included.
const RPC_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a session checks that the subscription still answers.
const PROBE_EVERY: Duration = Duration::from_secs(5);
/// Messages the client buffers between the stream and the sidecar. Their
/// deadlines are not extended until the sidecar takes them, so few.
const BUFFERED: usize = 16;
/// Ack ids in one `modifyAckDeadline`.
const MAX_ACK_IDS: usize = 1000;
/// Pub/Sub's bounds on an ack deadline, in seconds.
const MIN_DEADLINE: i32 = 10;
const MAX_DEADLINE: i32 = 600;

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
            (None, Some(topic)) => DeadLetters::Topic(conn.client.topic(topic).new_publisher(None)),
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
                next = async {
                    if !self.common.flow.ready(shutdown).await {
                        std::future::pending::<()>().await;
                    }
                    conn.stream.next().await
                }, if room => match next {
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

/// A Pub/Sub client of `pubsub.project`: the emulator at `emulator_host`
/// without credentials, or Google Cloud with the key file or Application
/// Default Credentials (Workload Identity).
pub async fn connect(
    pubsub: &PubSubConfig,
    emulator_host: Option<&str>,
) -> Result<Client, SourceError> {
    let key = match (&pubsub.credentials_file, emulator_host) {
        (Some(path), None) => Some(
            google_cloud_auth::credentials::CredentialsFile::new_from_file(path.clone())
                .await
                .map_err(|source| SourceError::KeyFile {
                    path: path.clone(),
                    source,
                })?,
        ),
        _ => None,
    };
    client(&pubsub.project, emulator_host, key).await
}

/// A Pub/Sub client of `project`: the emulator at `emulator_host` without
/// credentials, or Google Cloud with the service-account `key` or, without
/// one, Application Default Credentials. The operator's client too.
pub async fn client(
    project: &str,
    emulator_host: Option<&str>,
    key: Option<google_cloud_auth::credentials::CredentialsFile>,
) -> Result<Client, SourceError> {
    let mut config = ClientConfig {
        project_id: Some(project.to_string()),
        connection_option: ConnectionOptions {
            connect_timeout: Some(Duration::from_secs(5)),
            ..ConnectionOptions::default()
        },
        ..ClientConfig::default()
    };
    match emulator_host {
        Some(host) => config.environment = Environment::Emulator(host.to_string()),
        None => {
            // TLS to Google Cloud: the process-wide provider (ring).
            let _ = rustls::crypto::ring::default_provider().install_default();
            config = match key {
                Some(key) => config.with_credentials(key).await,
                None => config.with_auth().await,
            }
            .map_err(SourceError::Credentials)?;
        }
    }
    Client::new(config).await.map_err(SourceError::Connect)
}

/// The streaming pull's settings: the flow control of `pubsub`, the ack
/// deadline the sidecar keeps, and few messages buffered in the client.
pub fn subscribe_config(pubsub: &PubSubConfig, deadline: i32) -> SubscribeConfig {
    SubscribeConfig::default()
        .with_channel_capacity(BUFFERED)
        .with_subscriber_config(SubscriberConfig {
            stream_ack_deadline_seconds: deadline,
            max_outstanding_messages: i64::from(pubsub.max_outstanding_messages),
            max_outstanding_bytes: i64::try_from(pubsub.max_outstanding_bytes).unwrap_or(i64::MAX),
            ..SubscriberConfig::default()
        })
}

/// The ack deadline the sidecar keeps: the subscription's, or the claim
/// lease when that is longer, within Pub/Sub's bounds.
pub fn ack_deadline(subscription_seconds: i32, lease: Duration) -> i32 {
    let lease = i32::try_from(lease.as_secs_f64().ceil() as u64).unwrap_or(MAX_DEADLINE);
    subscription_seconds
        .max(lease)
        .clamp(MIN_DEADLINE, MAX_DEADLINE)
}

/// Whole seconds of a deadline that gives a message back after `delay`.
fn deadline_seconds(delay: Duration) -> i32 {
    i32::try_from(delay.as_secs_f64().ceil() as u64)
        .unwrap_or(MAX_DEADLINE)
        .min(MAX_DEADLINE)
}

/// Where dead letters go.
enum DeadLetters {
    /// The subscription's dead-letter policy: Pub/Sub moves a message after
    /// this many delivery attempts.
    Policy { max_attempts: i32 },
    /// `deadLetterTopic`: the sidecar publishes them.
    Topic(Publisher),
}

impl std::fmt::Display for DeadLetters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Policy { max_attempts } => write!(
                f,
                "the subscription's dead-letter policy (after {max_attempts} attempts)"
            ),
            Self::Topic(_) => write!(f, "published by the sidecar to deadLetterTopic"),
        }
    }
}

/// The ack ids held from receipt to settlement, whose deadlines are extended.
#[derive(Default)]
struct Leases {
    held: Mutex<HashSet<String>>,
}

impl Leases {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }
    fn hold(&self, ack_id: &str) {
        self.lock().insert(ack_id.to_string());
    }
    fn release(&self, ack_id: &str) {
        self.lock().remove(ack_id);
    }
    fn all(&self) -> Vec<String> {
        self.lock().iter().cloned().collect()
    }
    fn take_all(&self) -> Vec<String> {
        self.lock().drain().collect()
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
    let started = Instant::now();
    settle.metrics.in_flight.inc();
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
    settle.metrics.in_flight.dec();
    settle
        .metrics
        .end_to_end_duration
        .observe(started.elapsed().as_secs_f64());
}

/// Applies verdicts with Pub/Sub's acks, nacks and deadlines.
struct Settler {
    subscription: Subscription,
    subscription_id: String,
    leases: Leases,
    dead_letters: DeadLetters,
    initial_backoff: Duration,
    max_backoff: Duration,
    store_down: CancellationToken,
    metrics: Arc<Metrics>,
}

impl Settler {
    /// The engine's verdict. A key in flight elsewhere is waited for here,
    /// the message still held (its deadline extended), instead of given back.
    async fn decide(
        &self,
        engine: &Engine,
        envelope: &Envelope,
        span: &MessageSpan,
        shutdown: &CancellationToken,
    ) -> Verdict {
        let mut wait = InFlightWait::default();
        loop {
            match engine.handle(envelope, span, shutdown).await {
                Verdict::Requeue { delay } if !delay.is_zero() => {
                    self.metrics.message("in_flight_requeued");
                    if !wait.sleep(delay, shutdown).await {
                        return Verdict::Requeue {
                            delay: Duration::ZERO,
                        };
                    }
                }
                verdict => return verdict,
            }
        }
    }

    async fn apply(&self, message: &ReceivedMessage, envelope: &Envelope, verdict: Verdict) {
        match verdict {
            Verdict::Ack => {
                self.metrics.message("delivered");
                self.ack(message).await;
            }
            Verdict::Duplicate => {
                self.metrics.message("duplicate");
                self.ack(message).await;
            }
            Verdict::Requeue { .. } | Verdict::AppUnavailable => {
                self.nack(message, Duration::ZERO).await;
            }
            Verdict::StoreUnavailable => {
                self.nack(message, Duration::ZERO).await;
                self.store_down.cancel();
            }
            Verdict::DeadLetter { reason, attempts } => {
                self.dead_letter(message, envelope, reason, attempts).await;
            }
        }
    }

    async fn dead_letter(
        &self,
        message: &ReceivedMessage,
        envelope: &Envelope,
        reason: DeadLetterReason,
        attempts: u32,
    ) {
        let attempt = message.delivery_attempt.unwrap_or(1);
        let publisher = match &self.dead_letters {
            DeadLetters::Policy { max_attempts } => {
                let last = i64::try_from(attempt).unwrap_or(i64::MAX) >= i64::from(*max_attempts);
                tracing::warn!(
                    reason = reason.as_str(),
                    attempt,
                    max_attempts,
                    "dead letter: the subscription's dead-letter policy moves it after its last attempt"
                );
                if last {
                    self.metrics.dead_letter(reason.as_str());
                }
                let delay = backoff(
                    self.initial_backoff,
                    self.max_backoff,
                    u32::try_from(attempt).unwrap_or(u32::MAX),
                );
                self.nack(message, if last { Duration::ZERO } else { delay })
                    .await;
                return;
            }
            DeadLetters::Topic(publisher) => publisher,
        };
        let mut attributes = message.message.attributes.clone();
        attributes.insert(REASON.into(), reason.as_str().into());
        attributes.insert(ATTEMPTS.into(), attempts.to_string());
        attributes.insert(SUBSCRIPTION.into(), self.subscription_id.clone());
        attributes.insert(MESSAGE_ID.into(), message.message.message_id.clone());
        let dead = PubsubMessage {
            data: envelope.body.to_vec(),
            attributes,
            ..PubsubMessage::default()
        };
        let stored = tokio::time::timeout(RPC_TIMEOUT, async {
            publisher.publish(dead).await.get().await
        })
        .await;
        match stored {
            Ok(Ok(_)) => {
                tracing::info!(reason = reason.as_str(), attempts, "dead-lettered");
                self.metrics.dead_letter(reason.as_str());
                self.ack(message).await;
            }
            failed => {
                // Never ack a message whose dead letter is not stored.
                let error = match failed {
                    Ok(Err(status)) => status.to_string(),
                    _ => format!("no answer within {RPC_TIMEOUT:?}"),
                };
                tracing::warn!(error, "dead letter not published (does deadLetterTopic exist?): the message goes back");
                let delay = backoff(self.initial_backoff, self.max_backoff, attempts.max(1));
                self.nack(message, delay).await;
            }
        }
    }

    /// Acks a settled message. A failed ack loses nothing: Pub/Sub delivers
    /// the message again, and the store, which holds its outcome, makes that
    /// delivery a duplicate.
    async fn ack(&self, message: &ReceivedMessage) {
        self.leases.release(&message.ack_id);
        let failure = match tokio::time::timeout(RPC_TIMEOUT, message.ack()).await {
            Ok(Ok(())) => return,
            Ok(Err(status)) => ack_failure(&status),
            Err(_) => "failed",
        };
        self.metrics
            .broker_ack_failures
            .get_or_create(&OutcomeLabel { outcome: failure })
            .inc();
        tracing::warn!(
            outcome = failure,
            message_id = %message.message.message_id,
            "Pub/Sub did not take the ack: it delivers the message again, and the store makes that delivery a duplicate"
        );
    }

    /// Gives a message back: Pub/Sub delivers it again after `delay`
    /// (whole seconds; at once when zero).
    async fn nack(&self, message: &ReceivedMessage, delay: Duration) {
        self.leases.release(&message.ack_id);
        let seconds = deadline_seconds(delay);
        let error =
            match tokio::time::timeout(RPC_TIMEOUT, message.modify_ack_deadline(seconds)).await {
                Ok(Ok(())) => return,
                Ok(Err(status)) => status.to_string(),
                Err(_) => format!("no answer within {RPC_TIMEOUT:?}"),
            };
        tracing::debug!(
            error,
            "nack failed: the message comes back when its deadline passes"
        );
    }

    /// Gives back every message still held.
    async fn nack_all(&self) {
        let held = self.leases.take_all();
        if held.is_empty() {
            return;
        }
        tracing::info!(messages = held.len(), "giving back the messages still held");
        if let Err(e) = self.modify(held, 0).await {
            tracing::warn!(error = %e, "nack failed: the messages come back when their deadlines pass");
        }
    }

    /// Every third of the deadline, extends the deadlines of the messages held.
    async fn extend_leases(self: Arc<Self>, deadline: i32) {
        let every = Duration::from_secs(u64::try_from(deadline).unwrap_or(10)) / 3;
        loop {
            tokio::time::sleep(every).await;
            let held = self.leases.all();
            if held.is_empty() {
                continue;
            }
            let count = held.len() as u64;
            let outcome = match self.modify(held, deadline).await {
                Ok(()) => "extended",
                Err(e) => {
                    tracing::warn!(error = %e, "extending ack deadlines failed: messages whose deadline passes are delivered again, and the store decides again");
                    "failed"
                }
            };
            self.metrics
                .broker_lease_extensions
                .get_or_create(&OutcomeLabel { outcome })
                .inc_by(count);
        }
    }

    /// One `modifyAckDeadline` per `MAX_ACK_IDS` ack ids.
    async fn modify(&self, ack_ids: Vec<String>, seconds: i32) -> Result<(), String> {
        let client = self.subscription.get_client();
        let mut failed = None;
        for chunk in ack_ids.chunks(MAX_ACK_IDS) {
            let request = ModifyAckDeadlineRequest {
                subscription: self.subscription.fully_qualified_name().to_string(),
                ack_ids: chunk.to_vec(),
                ack_deadline_seconds: seconds,
            };
            match tokio::time::timeout(RPC_TIMEOUT, client.modify_ack_deadline(request, None)).await
            {
                Ok(Ok(_)) => {}
                Ok(Err(status)) => failed = Some(status.to_string()),
                Err(_) => failed = Some(format!("no answer within {RPC_TIMEOUT:?}")),
            }
        }
        failed.map_or(Ok(()), Err)
    }
}

/// Why an ack failed: `expired` when Pub/Sub refused the ack id (an
/// exactly-once subscription says so when the deadline had passed or the
/// message was delivered again), `failed` otherwise.
fn ack_failure(status: &Status) -> &'static str {
    match status.code() {
        Code::InvalidArgument | Code::FailedPrecondition => "expired",
        _ => "failed",
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ack_deadline_covers_the_claim_lease_within_pubsub_bounds() {
        assert_eq!(ack_deadline(10, Duration::from_secs(30)), 30);
        assert_eq!(ack_deadline(60, Duration::from_secs(30)), 60);
        assert_eq!(ack_deadline(0, Duration::from_secs(2)), MIN_DEADLINE);
        assert_eq!(ack_deadline(10, Duration::from_millis(10_500)), 11);
        assert_eq!(ack_deadline(10, Duration::from_secs(3600)), MAX_DEADLINE);
        assert_eq!(deadline_seconds(Duration::from_millis(20)), 1);
        assert_eq!(deadline_seconds(Duration::ZERO), 0);
    }

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

    #[test]
    fn a_refused_ack_id_is_told_from_a_failure_to_answer() {
        assert_eq!(
            ack_failure(&Status::new(Code::InvalidArgument, "")),
            "expired"
        );
        assert_eq!(
            ack_failure(&Status::new(Code::FailedPrecondition, "")),
            "expired"
        );
        assert_eq!(ack_failure(&Status::new(Code::Unavailable, "")), "failed");
    }
}
