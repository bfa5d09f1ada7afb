//! RabbitMQ source: consumes one queue with manual acks and settles every
//! message by the engine's verdict.
//!
//! A *session* is one connection with a consuming channel and a publishing
//! channel (in confirm mode, for dead letters and audit copies). A session ends
//! on shutdown, when the key store stops answering (fail closed), or when the
//! broker drops the connection; the run loop then waits (for the store, or a
//! back-off) and starts a new one. Messages not yet acknowledged when a session
//! ends go back to the queue: the broker redelivers them and the dedup rules
//! decide again, so nothing is lost and nothing completed is processed twice.
//!
//! Acks are batched: a settled message is acknowledged with `multiple` once
//! every message before it on the channel is settled too. Nacks and dead
//! letters are sent one by one, always before the batched ack that passes them.
//!
//! Flow control ([`crate::flow`]): no session starts before the application
//! takes messages, a session ends when the circuit opens (what it holds goes
//! back to the queue uncounted), and each delivery is charged to the byte
//! budget until it is settled. RabbitMQ ignores `prefetch_size` and pushes up
//! to `prefetch` messages, which lapin buffers whether or not they are taken,
//! so the prefetch itself is what bounds memory: a session's prefetch is
//! `maxInFlightBytes / largest message seen` (at most the configured
//! prefetch). Before any message is seen (and without
//! `expectedMessageBytes`) the first session takes one message to learn its
//! size, then consumes again on the same channel with the prefetch that fits
//! (RabbitMQ applies a new prefetch only to consumers started after it); the
//! message taken goes on meanwhile, so a slow first message holds up nothing.
//! A larger message than the prefetch allows ends the session, and the next
//! one starts with a lower prefetch: messages the broker already pushed to the
//! channel must go back to the queue, which only closing the channel does.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::uri::AMQPUri;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::acks::AckTracker;
use super::publish::{self, Confirming, PublishError};
use super::sessions::{SessionEnd, Sessions};
use super::{Common, Envelope, Verdict};
use crate::config::RabbitMqConfig;
use crate::engine::Engine;
use crate::flow::Permit;
use crate::metrics::Metrics;
use crate::traces::Origin;

/// Settled messages behind one pending this long are acked one by one.
const STUCK_AFTER: Duration = Duration::from_millis(20);

/// Everything a RabbitMQ source needs.
pub struct Source {
    pub common: Common,
    /// The `broker.rabbitmq` section of `config`.
    pub rabbit: RabbitMqConfig,
    /// Parsed once: the parser's error messages quote the URL, password included.
    pub uri: AMQPUri,
    /// The largest message body seen (or expected), in bytes; 0 before any.
    pub largest_message: AtomicU64,
}

/// The prefetch that keeps `prefetch × largest` within `budget`: at least 1, at
/// most `configured`; 1 while the size of messages is unknown.
pub fn prefetch_for(configured: u16, budget: u64, largest: u64) -> u16 {
    if largest == 0 {
        return 1;
    }
    (budget / largest).clamp(1, u64::from(configured.max(1))) as u16
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("broker: {0}")]
    Broker(#[from] lapin::Error),
    #[error("the consumer was cancelled by the broker")]
    ConsumerEnded,
}

/// Parses a broker URL; the error names the URL without its credentials.
pub fn parse_url(url: &str) -> Result<AMQPUri, String> {
    url.parse::<AMQPUri>().map_err(|_| {
        format!(
            "the broker URL {} is not a valid AMQP URL",
            crate::secrets::redact(url)
        )
    })
}

impl Source {
    /// Starts consuming the queue on `channel`; returns the consumer's tag.
    async fn consume(&self, channel: &Channel) -> Result<(String, lapin::Consumer), lapin::Error> {
        let tag = format!("idemq-{}", uuid::Uuid::new_v4().simple());
        let consumer = channel
            .basic_consume(
                self.rabbit.queue.as_str().into(),
                tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok((tag, consumer))
    }

    /// Cancels the consumer `tag` on `channel` and consumes again with
    /// `prefetch`: RabbitMQ applies a new prefetch only to consumers started
    /// after it. What the old consumer took stays unacked on the channel.
    async fn consume_again(
        &self,
        channel: &Channel,
        tag: &str,
        prefetch: u16,
    ) -> Result<(String, lapin::Consumer), lapin::Error> {
        channel
            .basic_cancel(tag.into(), BasicCancelOptions::default())
            .await?;
        channel
            .basic_qos(prefetch, BasicQosOptions::default())
            .await?;
        self.consume(channel).await
    }

    /// Consumes until `shutdown` fires, reconnecting as needed.
    pub async fn run(&self, shutdown: CancellationToken) {
        let mut sessions = Sessions::new("RabbitMQ", &self.common);
        while sessions.ready(&shutdown).await {
            let ended = self.session(&shutdown).await;
            if !sessions.ended(ended, &shutdown).await {
                break;
            }
        }
    }

    /// The prefetch for the next session, from the largest message seen.
    fn prefetch(&self) -> u16 {
        prefetch_for(
            self.rabbit.prefetch,
            self.common.flow.budget(),
            self.largest_message.load(Ordering::Relaxed),
        )
    }

    async fn session(&self, shutdown: &CancellationToken) -> Result<SessionEnd, SourceError> {
        let rabbit = &self.rabbit;
        let mut prefetch = self.prefetch();
        let properties = ConnectionProperties::default().with_connection_name(LongString::from(
            format!("idemq-sidecar {}", self.common.config.consumer),
        ));
        let conn = Connection::connect_uri(self.uri.clone(), properties).await?;
        let consuming = conn.create_channel().await?;
        consuming
            .basic_qos(prefetch, BasicQosOptions::default())
            .await?;
        let publishing = Confirming::open(&conn).await?;
        // A missing dead-letter exchange would close the channel at the first
        // dead letter; find out now, and say which exchange.
        publishing
            .exchange_exists(&rabbit.dead_letter_exchange)
            .await
            .inspect_err(|_| {
                tracing::error!(
                    exchange = %rabbit.dead_letter_exchange,
                    "the dead-letter exchange does not exist; declare it (the operator does)"
                )
            })?;
        let (mut tag, mut consumer) = self.consume(&consuming).await?;
        tracing::info!(
            queue = %rabbit.queue,
            prefetch,
            budget = self.common.flow.budget(),
            largest_message = self.largest_message.load(Ordering::Relaxed),
            "consuming"
        );
        self.common.health.set(true);
        self.common.metrics.broker_connected.set(1);

        let settle = Arc::new(Settler {
            consuming: consuming.clone(),
            publishing,
            tracker: Mutex::new(AckTracker::default()),
            settled: Notify::new(),
            store_down: CancellationToken::new(),
            rabbit: rabbit.clone(),
            metrics: self.common.metrics.clone(),
        });
        let mut tasks = JoinSet::new();
        // Wakes the loop to ack messages stuck behind a slow one even when
        // nothing else settles; only while settled messages wait, so that an
        // idle sidecar is not woken 50 times a second. (A message that comes
        // to wait is settled, which wakes the loop and enables the tick.)
        let mut stuck_check = tokio::time::interval(STUCK_AFTER);
        stuck_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let outcome = loop {
            tokio::select! {
                _ = stuck_check.tick(), if settle.lock().holds_settled() => {
                    if let Err(e) = settle.flush().await {
                        break Err(e.into());
                    }
                }
                _ = shutdown.cancelled() => break Ok(SessionEnd::Shutdown),
                _ = settle.store_down.cancelled() => break Ok(SessionEnd::StoreDown),
                _ = self.common.flow.unavailable() => break Ok(SessionEnd::AppDown),
                _ = settle.settled.notified() => {
                    if let Err(e) = settle.flush().await {
                        break Err(e.into());
                    }
                }
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
                // Takes the next delivery only when the flow has room for it.
                next = self.common.flow.when_ready(shutdown, consumer.next()) => match next {
                    Some(Ok(delivery)) => {
                        settle.received(delivery.delivery_tag);
                        let size = delivery.data.len() as u64;
                        let permit = self.common.flow.take(delivery.data.len());
                        self.largest_message.fetch_max(size, Ordering::Relaxed);
                        tasks.spawn(Box::pin(handle(delivery, permit, self.common.engine.clone(), settle.clone(), shutdown.clone())));
                        let fits = self.prefetch();
                        if fits < prefetch {
                            tracing::info!(size, prefetch, next_prefetch = fits, "the largest message seen lowers the prefetch that fits maxInFlightBytes: starting again with the new prefetch");
                            break Ok(SessionEnd::Restart);
                        }
                        if fits > prefetch {
                            // The first message of the session, taken at
                            // prefetch 1: nothing else was pushed to this
                            // consumer, and the message goes on while the
                            // channel consumes again with the prefetch that fits.
                            tracing::info!(size, prefetch, next_prefetch = fits, "the first message's size sets the prefetch that fits maxInFlightBytes: consuming again with it");
                            match self.consume_again(&consuming, &tag, fits).await {
                                Ok(again) => (tag, consumer) = again,
                                Err(e) => break Err(e.into()),
                            }
                            prefetch = fits;
                        }
                    }
                    Some(Err(e)) => break Err(e.into()),
                    None => break Err(SourceError::ConsumerEnded),
                },
            }
        };
        self.common.health.set(false);
        self.common.metrics.broker_connected.set(0);

        // Stop the flow, let what is in flight finish, ack what is settled;
        // closing the channels then returns every unacked message to the queue.
        let _ = consuming
            .basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
            .await;
        let grace = self.common.config.shutdown_grace;
        let drained = tokio::time::timeout(grace, async {
            while tasks.join_next().await.is_some() {
                let _ = settle.flush().await;
            }
        })
        .await;
        if drained.is_err() {
            tracing::warn!(grace = ?grace, left = tasks.len(), "in-flight deliveries did not finish in time; they go back to the queue");
            tasks.abort_all();
        }
        let _ = settle.flush().await;
        let _ = consuming.close(200, "idemq: session over".into()).await;
        settle.publishing.close().await;
        let _ = conn.close(200, "idemq: session over".into()).await;
        outcome
    }
}

/// Handles one delivery: the engine decides, the settler applies. The body
/// moves from the delivery into the envelope (no copy), and is held until the
/// message is settled, as the permit says.
async fn handle(
    mut delivery: Delivery,
    permit: Permit,
    engine: Arc<Engine>,
    settle: Arc<Settler>,
    shutdown: CancellationToken,
) {
    let _in_flight = settle.metrics.received();
    let body = Bytes::from(std::mem::take(&mut delivery.data));
    let envelope = envelope(&delivery, body);
    let span = engine.trace(
        &envelope,
        Origin {
            system: "rabbitmq",
            destination: &settle.rabbit.queue,
        },
    );
    let verdict = engine.handle(&envelope, &span, &shutdown).await;
    let step = span.settlement(&verdict);
    settle
        .apply(&delivery, &envelope.body, verdict, &shutdown)
        .await;
    drop((step, span, permit));
}

/// Applies verdicts on one session's channels.
struct Settler {
    consuming: Channel,
    publishing: Confirming,
    tracker: Mutex<AckTracker>,
    settled: Notify,
    store_down: CancellationToken,
    rabbit: RabbitMqConfig,
    metrics: Arc<Metrics>,
}

impl Settler {
    fn received(&self, tag: u64) {
        self.lock().received(tag, Instant::now());
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, AckTracker> {
        self.tracker.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn settled(&self, tag: u64, ack: bool) {
        self.lock().settle(tag, ack);
        self.settled.notify_one();
    }

    /// Acks what is settled: the prefix with one `multiple` ack, and alone
    /// those stuck behind a slow message. Only the session loop calls this,
    /// so acks never cross.
    async fn flush(&self) -> Result<(), lapin::Error> {
        let acks = self.lock().take(Instant::now(), STUCK_AFTER);
        if let Some(tag) = acks.multiple {
            self.consuming
                .basic_ack(tag, BasicAckOptions { multiple: true })
                .await?;
        }
        for tag in acks.single {
            self.consuming
                .basic_ack(tag, BasicAckOptions { multiple: false })
                .await?;
        }
        Ok(())
    }

    async fn apply(
        &self,
        delivery: &Delivery,
        body: &[u8],
        verdict: Verdict,
        shutdown: &CancellationToken,
    ) {
        let tag = delivery.delivery_tag;
        match verdict {
            Verdict::Ack => {
                self.metrics.message("delivered");
                self.settled(tag, true);
            }
            Verdict::Duplicate => {
                self.metrics.message("duplicate");
                if let Some(exchange) = &self.rabbit.audit_exchange {
                    let mut headers = FieldTable::default();
                    headers.insert(publish::REASON.into(), publish::amqp_text("duplicate"));
                    // An audit copy is best effort: the duplicate is acked anyway.
                    if let Err(e) = self.publish(exchange, delivery, body, headers).await {
                        tracing::warn!(error = %e, "audit copy of a duplicate was not confirmed");
                    }
                }
                self.settled(tag, true);
            }
            Verdict::Requeue { delay } => {
                if !delay.is_zero() {
                    tokio::select! {
                        _ = shutdown.cancelled() => {}
                        _ = tokio::time::sleep(delay) => {}
                    }
                    self.metrics.message("in_flight_requeued");
                }
                self.requeue(tag).await;
            }
            Verdict::StoreUnavailable => {
                self.requeue(tag).await;
                self.store_down.cancel();
            }
            // The session ends on its own: it watches the application's state.
            Verdict::AppUnavailable => self.requeue(tag).await,
            Verdict::DeadLetter { reason, attempts } => {
                let headers = publish::amqp_dead_letter_headers(
                    delivery.properties.headers().clone().unwrap_or_default(),
                    reason.as_str(),
                    attempts,
                    &[("x-idemq-original-queue", &self.rabbit.queue)],
                );
                let exchange = self.rabbit.dead_letter_exchange.clone();
                match self.publish(&exchange, delivery, body, headers).await {
                    Ok(()) => {
                        tracing::info!(reason = reason.as_str(), attempts, "dead-lettered");
                        self.metrics.dead_letter(reason.as_str());
                        self.settled(tag, true);
                    }
                    Err(e) => {
                        // Never ack a message whose dead letter is not confirmed.
                        tracing::warn!(error = %e, "dead letter not confirmed: message goes back to the queue");
                        self.requeue(tag).await;
                    }
                }
            }
        }
    }

    /// Gives a message back to the queue. The nack goes out before the
    /// message counts as settled, so no batched ack can cover it first.
    async fn requeue(&self, tag: u64) {
        let nack = BasicNackOptions {
            multiple: false,
            requeue: true,
        };
        if let Err(e) = self.consuming.basic_nack(tag, nack).await {
            // The channel is gone: the broker requeues the message itself.
            tracing::debug!(error = %e, "nack failed");
        }
        self.settled(tag, false);
    }

    /// Publishes a copy of `delivery` with `headers` and waits for the confirm.
    async fn publish(
        &self,
        exchange: &str,
        delivery: &Delivery,
        body: &[u8],
        headers: FieldTable,
    ) -> Result<(), PublishError> {
        let routing_key = self
            .rabbit
            .dead_letter_routing_key
            .as_deref()
            .unwrap_or(&self.rabbit.queue);
        let properties: BasicProperties = delivery.properties.clone().with_headers(headers);
        // Not mandatory: the operator binds `<queue>.dead` to the exchange,
        // and a user's own exchange may route dead letters as it likes.
        self.publishing
            .publish(exchange, routing_key, body, properties, false)
            .await
    }
}

/// The broker-neutral view of a delivery, whose body was taken out of it.
fn envelope(delivery: &Delivery, body: Bytes) -> Envelope {
    let p = &delivery.properties;
    let headers = p
        .headers()
        .as_ref()
        .map(|table| {
            table
                .inner()
                .iter()
                .filter_map(|(k, v)| header_text(v).map(|v| (k.as_str().to_string(), v)))
                .collect()
        })
        .unwrap_or_default();
    Envelope {
        message_id: p.message_id().as_ref().map(|s| s.as_str().to_string()),
        headers,
        content_type: p.content_type().as_ref().map(|s| s.as_str().to_string()),
        body,
        redelivered: delivery.redelivered,
        ..Envelope::default()
    }
}

/// Text form of a header value; tables, arrays and binary are left out.
fn header_text(value: &AMQPValue) -> Option<String> {
    Some(match value {
        AMQPValue::LongString(s) => String::from_utf8(s.as_bytes().to_vec()).ok()?,
        AMQPValue::ShortString(s) => s.as_str().to_string(),
        AMQPValue::Boolean(b) => b.to_string(),
        AMQPValue::ShortShortInt(n) => n.to_string(),
        AMQPValue::ShortShortUInt(n) => n.to_string(),
        AMQPValue::ShortInt(n) => n.to_string(),
        AMQPValue::ShortUInt(n) => n.to_string(),
        AMQPValue::LongInt(n) => n.to_string(),
        AMQPValue::LongUInt(n) => n.to_string(),
        AMQPValue::LongLongInt(n) => n.to_string(),
        AMQPValue::Timestamp(n) => n.to_string(),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::prefetch_for;

    #[test]
    fn the_prefetch_keeps_the_largest_message_times_prefetch_within_the_budget() {
        const MIB: u64 = 1024 * 1024;
        assert_eq!(
            prefetch_for(100, 32 * MIB, 0),
            1,
            "size unknown: one message"
        );
        assert_eq!(
            prefetch_for(100, 32 * MIB, 256),
            100,
            "small: as configured"
        );
        assert_eq!(prefetch_for(100, 32 * MIB, 2 * MIB), 16);
        assert_eq!(
            prefetch_for(100, 32 * MIB, 64 * MIB),
            1,
            "larger than the budget"
        );
    }

    #[test]
    fn a_bad_broker_url_is_reported_without_its_password() {
        let err = super::parse_url("amqp://user:s3cret@rabbit:notaport/vhost").unwrap_err();
        assert!(!err.contains("s3cret"), "{err}");
        assert!(super::parse_url("amqp://user:s3cret@rabbit:5672/%2f").is_ok());
    }
}
