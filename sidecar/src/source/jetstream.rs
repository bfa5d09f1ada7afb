//! NATS JetStream source: a durable pull consumer with explicit acks, each
//! message settled by the engine's verdict.
//!
//! A *session* is one connection: the source looks up the stream, creates
//! the durable consumer when it does not exist, then pulls batches of at most
//! `maxAckPending` minus what it already holds. Verdicts map to JetStream's
//! acknowledgements: `Ack` once the outcome is settled; `Nak(delay)` to give
//! a message back (a key in flight elsewhere, the store or the application
//! unavailable); a dead letter is published to `deadLetterSubject` (with the
//! reason, attempts and where it came from in headers), and only once
//! JetStream stored it is the original `Term`inated. While the application
//! works on a message, `Progress` goes out every third of AckWait, so a slow
//! application is not redelivered behind its back: the broker's lease,
//! renewed as the engine renews the claim's lease in the store.
//!
//! A session ends on shutdown, when the key store stops answering (fail
//! closed), when the circuit opens, or when the connection fails. It then
//! stops pulling, lets what is in flight settle, and naks what the current
//! batch still holds, so nothing waits for AckWait to come back. Whatever a
//! crash leaves unacknowledged, JetStream redelivers after AckWait, and the
//! dedup rules decide again.
//!
//! MaxDeliver: JetStream stops delivering a message after MaxDeliver
//! deliveries. A message on its last delivery that would be given back is
//! dead-lettered instead (reason `max_attempts`), so it is not dropped
//! silently.
//!
//! Flow control ([`crate::flow`]): nothing is pulled before the application
//! takes messages; each message is charged to the byte budget until settled;
//! a pull asks for at most the bytes left in the budget, so the client never
//! buffers much more than the budget.

use std::sync::Arc;
use std::time::Duration;

use async_nats::header::HeaderMap;
use async_nats::jetstream::consumer::pull::{self, Batch};
use async_nats::jetstream::consumer::{AckPolicy, PullConsumer};
use async_nats::jetstream::message::{AckKind, Acker};
use async_nats::jetstream::{self, Context};
use bytes::Bytes;
use futures::StreamExt;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::sessions::{SessionEnd, Sessions};
use super::{Common, DeadLetterReason, Envelope, Verdict};
use crate::config::JetStreamConfig;
use crate::engine::Engine;
use crate::flow::Permit;
use crate::metrics::Metrics;
use crate::secrets::BrokerAuth;
use crate::traces;

/// How long one pull request waits for messages on an idle stream.
const PULL_EXPIRES: Duration = Duration::from_secs(1);
/// Messages asked for in one pull, at most.
const MAX_BATCH: usize = 256;
/// The header JetStream deduplicates publishes on, and idemq's default key.
pub const MSG_ID: &str = "Nats-Msg-Id";

/// Everything a JetStream source needs.
pub struct Source {
    pub common: Common,
    /// The `broker.jetstream` section of `config`.
    pub jetstream: JetStreamConfig,
    /// Server URL, possibly with credentials.
    pub url: String,
    pub auth: BrokerAuth,
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("connect to {url}: {source}")]
    Connect {
        url: String,
        source: async_nats::ConnectError,
    },
    #[error("NATS credentials: {0}")]
    Credentials(std::io::Error),
    #[error("stream {stream}: {source}")]
    Stream {
        stream: String,
        source: jetstream::context::GetStreamError,
    },
    #[error("consumer {consumer} on stream {stream}: {source}")]
    Consumer {
        stream: String,
        consumer: String,
        source: jetstream::stream::ConsumerError,
    },
    #[error("pull from consumer {consumer}: {source}")]
    Pull {
        consumer: String,
        source: pull::BatchError,
    },
    #[error("pull from consumer {consumer}: {message}")]
    Pulled { consumer: String, message: String },
}

impl Source {
    /// Consumes until `shutdown` fires, reconnecting as needed.
    pub async fn run(&self, shutdown: CancellationToken) {
        let mut sessions = Sessions::new("JetStream", &self.common);
        while sessions.ready(&shutdown).await {
            let ended = self.session(&shutdown).await;
            if !sessions.ended(ended, &shutdown).await {
                break;
            }
        }
    }

    async fn connect(&self) -> Result<async_nats::Client, SourceError> {
        let mut options = async_nats::ConnectOptions::new()
            .name(format!("idemq-sidecar {}", self.common.config.consumer))
            .connection_timeout(Duration::from_secs(5))
            .request_timeout(Some(Duration::from_secs(5)));
        if let Some(creds) = &self.auth.creds {
            options = options
                .credentials(creds)
                .map_err(SourceError::Credentials)?;
        }
        if let Some(token) = &self.auth.token {
            options = options.token(token.clone());
        }
        if let (Some(user), Some(password)) = (&self.auth.user, &self.auth.password) {
            options = options.user_and_password(user.clone(), password.clone());
        }
        options
            .connect(self.url.as_str())
            .await
            .map_err(|source| SourceError::Connect {
                url: crate::secrets::redact(&self.url),
                source,
            })
    }

    /// The durable consumer, created with the configured settings when it
    /// does not exist yet.
    async fn consumer(&self, js: &Context) -> Result<PullConsumer, SourceError> {
        let cfg = &self.jetstream;
        let stream = js
            .get_stream(&cfg.stream)
            .await
            .map_err(|source| SourceError::Stream {
                stream: cfg.stream.clone(),
                source,
            })?;
        stream
            .get_or_create_consumer(&cfg.consumer, consumer_config(cfg))
            .await
            .map_err(|source| SourceError::Consumer {
                stream: cfg.stream.clone(),
                consumer: cfg.consumer.clone(),
                source,
            })
    }

    async fn session(&self, shutdown: &CancellationToken) -> Result<SessionEnd, SourceError> {
        let client = self.connect().await?;
        let js = jetstream::new(client.clone());
        let consumer = self.consumer(&js).await?;
        let info = consumer.cached_info();
        // The consumer's own settings win: it may have been made by the
        // operator or by hand.
        let ack_wait = info.config.ack_wait;
        let max_deliver = info.config.max_deliver;
        let max_ack_pending = usize::try_from(info.config.max_ack_pending)
            .ok()
            .filter(|n| *n > 0)
            .unwrap_or(self.jetstream.max_ack_pending as usize);
        tracing::info!(
            stream = %self.jetstream.stream,
            consumer = %self.jetstream.consumer,
            max_ack_pending,
            ack_wait = ?ack_wait,
            max_deliver,
            budget = self.common.flow.budget(),
            "consuming"
        );
        self.common.health.set(true);
        self.common.metrics.broker_connected.set(1);

        let settle = Arc::new(Settler {
            js,
            jetstream: self.jetstream.clone(),
            ack_wait,
            max_deliver,
            store_down: CancellationToken::new(),
            metrics: self.common.metrics.clone(),
        });
        let mut tasks = JoinSet::new();
        let mut batch: Option<Batch> = None;
        // After a pull the server refused for its size, ask for one message
        // without a byte limit (a message larger than what is left).
        let mut one_unbounded = false;
        let outcome = loop {
            if batch.is_none() {
                // Pull only when a message may be taken, and no more than
                // MaxAckPending lets JetStream deliver.
                let room = max_ack_pending.saturating_sub(tasks.len()).min(MAX_BATCH);
                tokio::select! {
                    _ = shutdown.cancelled() => break Ok(SessionEnd::Shutdown),
                    _ = settle.store_down.cancelled() => break Ok(SessionEnd::StoreDown),
                    _ = self.common.flow.unavailable() => break Ok(SessionEnd::AppDown),
                    Some(_) = tasks.join_next(), if room == 0 => continue,
                    ready = self.common.flow.ready(shutdown), if room > 0 => if !ready {
                        break Ok(SessionEnd::Shutdown);
                    },
                }
                let mut pull = consumer.batch().expires(PULL_EXPIRES);
                if std::mem::take(&mut one_unbounded) {
                    pull = pull.max_messages(1);
                } else {
                    let left = self
                        .common
                        .flow
                        .budget()
                        .saturating_sub(self.common.flow.held_bytes());
                    pull = pull
                        .max_messages(room)
                        .max_bytes(usize::try_from(left.max(1)).unwrap_or(usize::MAX));
                }
                match pull.messages().await {
                    Ok(b) => batch = Some(b),
                    Err(source) => {
                        break Err(SourceError::Pull {
                            consumer: self.jetstream.consumer.clone(),
                            source,
                        })
                    }
                }
            }
            let Some(pulled) = batch.as_mut() else {
                continue;
            };
            tokio::select! {
                _ = shutdown.cancelled() => break Ok(SessionEnd::Shutdown),
                _ = settle.store_down.cancelled() => break Ok(SessionEnd::StoreDown),
                _ = self.common.flow.unavailable() => break Ok(SessionEnd::AppDown),
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
                // Takes the next message only when the flow has room for it.
                next = self.common.flow.when_ready(shutdown, pulled.next()) => match next {
                    Some(Ok(message)) => {
                        let permit = self.common.flow.take(message.payload.len());
                        tasks.spawn(Box::pin(handle(message, permit, self.common.engine.clone(), settle.clone(), shutdown.clone())));
                    }
                    Some(Err(e)) => {
                        let message = e.to_string();
                        if message.contains("MaxBytes") {
                            tracing::debug!(error = %message, "a message larger than the budget left: pulling it alone");
                            one_unbounded = true;
                            batch = None;
                        } else {
                            break Err(SourceError::Pulled {
                                consumer: self.jetstream.consumer.clone(),
                                message,
                            });
                        }
                    }
                    None => batch = None,
                },
            }
        };
        self.common.health.set(false);
        self.common.metrics.broker_connected.set(0);

        // Give back what the pull still holds (it ends within PULL_EXPIRES),
        // and let what is in flight settle.
        let give_back = async {
            if let Some(mut pulled) = batch {
                while let Some(Ok(message)) = pulled.next().await {
                    if let Err(e) = message.ack_with(AckKind::Nak(None)).await {
                        tracing::debug!(error = %e, "nak failed; AckWait gives the message back");
                    }
                }
            }
        };
        let grace = self.common.config.shutdown_grace;
        let drained = tokio::time::timeout(grace, async {
            tokio::join!(give_back, async {
                while tasks.join_next().await.is_some() {}
            })
        })
        .await;
        if drained.is_err() {
            tracing::warn!(grace = ?grace, left = tasks.len(), "in-flight deliveries did not finish in time; JetStream redelivers them after AckWait");
            tasks.abort_all();
        }
        // Acks are published without waiting: make sure they left.
        if let Err(e) = client.flush().await {
            tracing::warn!(error = %e, "flushing acknowledgements failed; JetStream redelivers what they covered");
        }
        outcome
    }
}

/// The durable consumer's settings from the config. One filter subject goes
/// in `filter_subject`, which servers before 2.10 understand too.
pub fn consumer_config(cfg: &JetStreamConfig) -> pull::Config {
    let (filter_subject, filter_subjects) = match cfg.filter_subjects.as_slice() {
        [one] => (one.clone(), Vec::new()),
        many => (String::new(), many.to_vec()),
    };
    pull::Config {
        durable_name: Some(cfg.consumer.clone()),
        filter_subject,
        filter_subjects,
        ack_policy: AckPolicy::Explicit,
        ack_wait: cfg.ack_wait,
        max_ack_pending: i64::from(cfg.max_ack_pending),
        max_deliver: cfg.max_deliver.map_or(-1, i64::from),
        ..Default::default()
    }
}

/// Handles one message: the engine decides while `Progress` keeps JetStream
/// from redelivering it, then the settler applies the verdict. The body is
/// the client's buffer, moved into the envelope.
async fn handle(
    message: jetstream::Message,
    permit: Permit,
    engine: Arc<Engine>,
    settle: Arc<Settler>,
    shutdown: CancellationToken,
) {
    let _in_flight = settle.metrics.received();
    let (deliveries, origin) = match message.info() {
        Ok(info) => (
            info.delivered,
            Origin {
                stream: info.stream.to_string(),
                sequence: info.stream_sequence,
            },
        ),
        Err(_) => (1, Origin::default()),
    };
    let (message, acker) = message.split();
    let subject = message.subject.to_string();
    let headers = message.headers.unwrap_or_default();
    let envelope = envelope(&headers, own_allocation(message.payload), deliveries > 1);
    let span = engine.trace(
        &envelope,
        traces::Origin {
            system: "nats",
            destination: &subject,
        },
    );
    let verdict = settle
        .progressing(&acker, engine.handle(&envelope, &span, &shutdown))
        .await;
    let verdict = settle.last_delivery(verdict, deliveries);
    let step = span.settlement(&verdict);
    settle
        .apply(&acker, &subject, &origin, headers, envelope.body, verdict)
        .await;
    drop((step, span, permit));
}

/// Bodies at least this large get an allocation of their own.
const LARGE_BODY: usize = 64 * 1024;

/// `payload`, in an allocation of its own when it is large. The client reads
/// each message as a slice of its connection's read buffer, which it grows
/// for a large message; a held slice keeps that whole buffer alive, so large
/// messages held in flight would each cost more than their size, beyond what
/// the byte budget accounts for. A small body is not worth the copy.
fn own_allocation(payload: Bytes) -> Bytes {
    if payload.len() >= LARGE_BODY {
        Bytes::copy_from_slice(&payload)
    } else {
        payload
    }
}

/// Where a message was stored.
#[derive(Default)]
struct Origin {
    stream: String,
    sequence: u64,
}

/// Applies verdicts with JetStream's acknowledgements.
struct Settler {
    js: Context,
    jetstream: JetStreamConfig,
    ack_wait: Duration,
    max_deliver: i64,
    store_down: CancellationToken,
    metrics: Arc<Metrics>,
}

impl Settler {
    /// Runs `work`, telling JetStream every third of AckWait that the
    /// message is still being worked on.
    async fn progressing<T>(&self, acker: &Acker, work: impl std::future::Future<Output = T>) -> T {
        let every = (self.ack_wait / 3).max(Duration::from_millis(100));
        let progress = async {
            loop {
                tokio::time::sleep(every).await;
                if let Err(e) = acker.ack_with(AckKind::Progress).await {
                    tracing::warn!(error = %e, "telling JetStream the message is in progress failed; it may be redelivered after AckWait");
                }
            }
        };
        tokio::pin!(work);
        tokio::select! {
            biased;
            out = &mut work => out,
            () = progress => work.await,
        }
    }

    /// On its last delivery (MaxDeliver), a message given back would never
    /// come again: it is dead-lettered instead.
    fn last_delivery(&self, verdict: Verdict, deliveries: i64) -> Verdict {
        let last = self.max_deliver > 0 && deliveries >= self.max_deliver;
        let gives_back = matches!(
            verdict,
            Verdict::Requeue { .. } | Verdict::StoreUnavailable | Verdict::AppUnavailable
        );
        if last && gives_back {
            tracing::warn!(
                deliveries,
                max_deliver = self.max_deliver,
                "the consumer's MaxDeliver is reached: dead-lettering the message rather than letting JetStream drop it"
            );
            if verdict == Verdict::StoreUnavailable {
                self.store_down.cancel();
            }
            return Verdict::DeadLetter {
                reason: DeadLetterReason::MaxAttempts,
                attempts: u32::try_from(deliveries).unwrap_or(u32::MAX),
            };
        }
        verdict
    }

    async fn apply(
        &self,
        acker: &Acker,
        subject: &str,
        origin: &Origin,
        headers: HeaderMap,
        body: Bytes,
        verdict: Verdict,
    ) {
        match verdict {
            Verdict::Ack => {
                self.metrics.message("delivered");
                self.ack(acker, AckKind::Ack).await;
            }
            Verdict::Duplicate => {
                self.metrics.message("duplicate");
                self.ack(acker, AckKind::Ack).await;
            }
            Verdict::Requeue { delay } => {
                if !delay.is_zero() {
                    self.metrics.message("in_flight_requeued");
                }
                self.ack(acker, AckKind::Nak(Some(delay).filter(|d| !d.is_zero())))
                    .await;
            }
            Verdict::StoreUnavailable => {
                self.ack(acker, AckKind::Nak(None)).await;
                self.store_down.cancel();
            }
            // The session ends on its own: it watches the application's state.
            Verdict::AppUnavailable => self.ack(acker, AckKind::Nak(None)).await,
            Verdict::DeadLetter { reason, attempts } => {
                let mut headers = headers;
                headers.insert("Idemq-Reason", reason.as_str());
                headers.insert("Idemq-Attempts", attempts.to_string());
                headers.insert("Idemq-Original-Subject", subject);
                headers.insert("Idemq-Original-Stream", origin.stream.as_str());
                headers.insert("Idemq-Original-Sequence", origin.sequence.to_string());
                let stored = async {
                    self.js
                        .publish_with_headers(
                            self.jetstream.dead_letter_subject.clone(),
                            headers,
                            body,
                        )
                        .await?
                        .await
                };
                match stored.await {
                    Ok(_) => {
                        tracing::info!(reason = reason.as_str(), attempts, "dead-lettered");
                        self.metrics.dead_letter(reason.as_str());
                        self.ack(acker, AckKind::Term).await;
                    }
                    Err(e) => {
                        // Never terminate a message whose dead letter is not stored.
                        tracing::warn!(error = %e, subject = %self.jetstream.dead_letter_subject, "dead letter not stored (does a stream capture the dead-letter subject?): the message goes back");
                        self.ack(acker, AckKind::Nak(None)).await;
                    }
                }
            }
        }
    }

    async fn ack(&self, acker: &Acker, kind: AckKind) {
        if let Err(e) = acker.ack_with(kind).await {
            // The connection is gone: JetStream redelivers after AckWait.
            tracing::debug!(error = %e, "acknowledgement failed");
        }
    }
}

/// The broker-neutral view of a message; `Nats-Msg-Id` is its message id.
fn envelope(headers: &HeaderMap, body: Bytes, redelivered: bool) -> Envelope {
    let mut pairs = Vec::new();
    for (name, values) in headers.iter() {
        for value in values {
            pairs.push((name.to_string(), value.as_str().to_string()));
        }
    }
    // Not `HeaderMap::get`: a name parsed off the wire (`Nats-Msg-Id` is one
    // of the client's standard names) and the same name given as text are
    // different keys to it.
    let first = |name: &str| {
        pairs
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    };
    Envelope {
        message_id: first(MSG_ID),
        content_type: first("Content-Type"),
        headers: pairs,
        body,
        redelivered,
        ..Envelope::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_message_id_is_nats_msg_id_and_headers_are_kept() {
        let mut headers = HeaderMap::new();
        // As parsed off the wire: the client's standard name, not text.
        headers.insert(async_nats::header::NATS_MESSAGE_ID, "order-7");
        headers.insert("X-Tenant", "acme");
        let e = envelope(&headers, Bytes::from_static(b"{}"), false);
        assert_eq!(e.message_id.as_deref(), Some("order-7"));
        assert_eq!(e.header("x-tenant"), Some("acme"));
        let e = envelope(&HeaderMap::new(), Bytes::new(), true);
        assert_eq!(e.message_id, None);
        assert!(e.redelivered);
    }

    #[test]
    fn the_consumer_takes_the_configured_settings() {
        let cfg: JetStreamConfig = serde_yaml::from_str(
            "stream: ORDERS\nconsumer: billing\nfilterSubjects: [orders.created]\nmaxAckPending: 20\nackWait: 5s\nmaxDeliver: 10\ndeadLetterSubject: orders.dlq\n",
        )
        .expect("valid");
        let c = consumer_config(&cfg);
        assert_eq!(c.durable_name.as_deref(), Some("billing"));
        assert_eq!(c.filter_subject, "orders.created");
        assert_eq!(c.ack_policy, AckPolicy::Explicit);
        assert_eq!(
            (c.ack_wait, c.max_ack_pending, c.max_deliver),
            (Duration::from_secs(5), 20, 10)
        );
        let unlimited: JetStreamConfig = serde_yaml::from_str(
            "stream: ORDERS\nconsumer: billing\ndeadLetterSubject: orders.dlq\n",
        )
        .expect("valid");
        assert_eq!(consumer_config(&unlimited).max_deliver, -1);
    }
}
