//! Copies of messages published with the broker's word that it has them:
//! on RabbitMQ a channel in confirm mode ([`Confirming`]), on Kafka a
//! producer with `acks=all` whose delivery report is awaited
//! ([`KafkaDeadLetters`]). The RabbitMQ and Kafka sources dead-letter through
//! them, and so does the ZeroMQ source when its dead letters go to RabbitMQ
//! or Kafka: a message counts as dead-lettered only once the broker confirmed
//! its copy, whichever source it came from.
//!
//! The headers of a dead letter say why ([`REASON`]), after how many
//! attempts ([`ATTEMPTS`]), and where the message came from (each source
//! adds its own `x-idemq-original-*`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, ExchangeKind};
use rdkafka::client::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, ProducerContext};
use tokio::sync::oneshot;

/// Why the message was dead-lettered ([`super::DeadLetterReason`], or
/// `malformed` for a ZeroMQ request that breaks the wire protocol).
pub const REASON: &str = "x-idemq-reason";
/// How many times the application was tried.
pub const ATTEMPTS: &str = "x-idemq-attempts";

/// The largest dead letter a Kafka producer sends: the most a consumer
/// receives (librdkafka's `receive.message.max.bytes` default).
const KAFKA_MAX_BYTES: &str = "100000000";
/// How long a Kafka send waits for room in the producer's queue.
const KAFKA_QUEUE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one wait of the Kafka producer's thread for delivery reports
/// lasts (reports are served as they come, whatever this is).
const KAFKA_POLL: Duration = Duration::from_secs(1);

/// Why a copy was not confirmed.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("publish: {0}")]
    Broker(#[from] lapin::Error),
    #[error("the broker nacked the publish")]
    Nacked,
    #[error("no queue takes routing key {routing_key:?} on exchange {exchange:?}: the broker returned the message")]
    Unroutable {
        exchange: String,
        routing_key: String,
    },
}

impl PublishError {
    /// The channel or its connection is gone: a new one is needed.
    pub fn is_channel_lost(&self) -> bool {
        matches!(self, Self::Broker(_))
    }
}

/// A RabbitMQ channel in confirm mode: each publish is answered by the
/// broker's ack (it has the message) or nack.
#[derive(Clone)]
pub struct Confirming {
    channel: Channel,
}

impl Confirming {
    /// Opens a channel on `conn` and puts it in confirm mode.
    pub async fn open(conn: &Connection) -> Result<Self, lapin::Error> {
        let channel = conn.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok(Self { channel })
    }

    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    /// Checks that `exchange` exists (a passive declare), so that a missing
    /// one is found at once rather than by the broker closing the channel at
    /// the first publish.
    pub async fn exchange_exists(&self, exchange: &str) -> Result<(), lapin::Error> {
        self.channel
            .exchange_declare(
                ShortString::from(exchange),
                ExchangeKind::Direct,
                ExchangeDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
    }

    /// Publishes and waits for the broker's confirm. With `mandatory`, a
    /// message no queue takes comes back and is an error too (without it,
    /// the broker drops such a message and still acks it).
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
        mandatory: bool,
    ) -> Result<(), PublishError> {
        let confirm = self
            .channel
            .basic_publish(
                ShortString::from(exchange),
                ShortString::from(routing_key),
                BasicPublishOptions {
                    mandatory,
                    ..BasicPublishOptions::default()
                },
                body,
                properties,
            )
            .await?
            .await?;
        if !confirm.is_ack() {
            return Err(PublishError::Nacked);
        }
        if confirm.take_message().is_some() {
            return Err(PublishError::Unroutable {
                exchange: exchange.to_string(),
                routing_key: routing_key.to_string(),
            });
        }
        Ok(())
    }

    pub async fn close(&self) {
        let _ = self.channel.close(200, "idemq: session over".into()).await;
    }
}

/// A RabbitMQ text header value.
pub fn amqp_text(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

/// A RabbitMQ dead letter's headers: `headers` (the original's), the reason,
/// the attempts (a number) and the source's `origin` headers.
pub fn amqp_dead_letter_headers(
    mut headers: FieldTable,
    reason: &str,
    attempts: u32,
    origin: &[(&str, &str)],
) -> FieldTable {
    headers.insert(REASON.into(), amqp_text(reason));
    headers.insert(ATTEMPTS.into(), AMQPValue::LongLongInt(i64::from(attempts)));
    for (name, value) in origin {
        headers.insert((*name).into(), amqp_text(value));
    }
    headers
}

/// A Kafka dead letter's headers: `original` (the message's own), then the
/// reason, the attempts and the source's `origin` headers.
pub fn kafka_dead_letter_headers<'a>(
    original: impl ExactSizeIterator<Item = (&'a str, Option<&'a [u8]>)>,
    reason: &str,
    attempts: u32,
    origin: &[(&str, &str)],
) -> OwnedHeaders {
    let mut headers = OwnedHeaders::new_with_capacity(original.len() + 2 + origin.len());
    for (key, value) in original {
        headers = headers.insert(Header { key, value });
    }
    let attempts = attempts.to_string();
    for (key, value) in [(REASON, reason), (ATTEMPTS, attempts.as_str())]
        .into_iter()
        .chain(origin.iter().copied())
    {
        headers = headers.insert(Header {
            key,
            value: Some(value),
        });
    }
    headers
}

/// A Kafka producer of dead letters: `acks=all`, and a send returns only
/// once the brokers acknowledged the record (or failed to).
///
/// A `BaseProducer` polled by a thread of its own rather than rdkafka's
/// `FutureProducer`: the latter's thread waits in 100 ms polls and spins
/// through the last millisecond of each (rdkafka rounds the time left down to
/// whole milliseconds), about 1% of a core in every idle sidecar. Polls of a
/// second spin a tenth as much.
pub struct KafkaDeadLetters {
    producer: Arc<BaseProducer<Reports>>,
    polling: Arc<AtomicBool>,
}

/// Hands each record's delivery report to the send waiting for it.
struct Reports;

impl ClientContext for Reports {}

impl ProducerContext for Reports {
    type DeliveryOpaque = Box<oneshot::Sender<KafkaResult<()>>>;

    fn delivery(&self, result: &DeliveryResult<'_>, waiting: Self::DeliveryOpaque) {
        let _ = waiting.send(result.as_ref().map(|_| ()).map_err(|(e, _)| e.clone()));
    }
}

impl KafkaDeadLetters {
    /// A producer on `client` (the connection's settings). With
    /// `delivery_timeout`, a record the brokers have not acknowledged by then
    /// fails (librdkafka's `message.timeout.ms`; its default is 5 minutes).
    pub fn create(
        mut client: ClientConfig,
        delivery_timeout: Option<Duration>,
    ) -> Result<Self, KafkaError> {
        client
            .set("acks", "all")
            .set("linger.ms", "5")
            // A dead letter is as large as the message it copies, and a topic
            // may take records above librdkafka's default (1 MB), which would
            // refuse to send it again and again: the brokers' limits decide.
            .set("message.max.bytes", KAFKA_MAX_BYTES);
        if let Some(timeout) = delivery_timeout {
            client.set("message.timeout.ms", timeout.as_millis().to_string());
        }
        let producer: Arc<BaseProducer<Reports>> = Arc::new(client.create_with_context(Reports)?);
        let polling = Arc::new(AtomicBool::new(true));
        let (p, run) = (producer.clone(), polling.clone());
        std::thread::Builder::new()
            .name("idemq-dead-letters".into())
            .spawn(move || {
                while run.load(Ordering::Relaxed) {
                    p.poll(KAFKA_POLL);
                }
            })
            .map_err(|e| {
                KafkaError::ClientCreation(format!("starting the producer's thread: {e}"))
            })?;
        Ok(Self { producer, polling })
    }

    /// Sends one record and waits for the brokers' acknowledgement.
    pub async fn send(
        &self,
        topic: &str,
        key: Option<&[u8]>,
        body: &[u8],
        headers: OwnedHeaders,
    ) -> Result<(), KafkaError> {
        let (report, reported) = oneshot::channel();
        let mut record: BaseRecord<'_, [u8], [u8], _> =
            BaseRecord::with_opaque_to(topic, Box::new(report))
                .payload(body)
                .headers(headers);
        if let Some(key) = key {
            record = record.key(key);
        }
        // librdkafka's queue full: wait a while for room.
        let until = Instant::now() + KAFKA_QUEUE_TIMEOUT;
        while let Err((e, again)) = self.producer.send(record) {
            let full = e.rdkafka_error_code() == Some(RDKafkaErrorCode::QueueFull);
            if !full || Instant::now() >= until {
                return Err(e);
            }
            record = again;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        reported.await.map_err(|_| KafkaError::Canceled)?
    }
}

impl Drop for KafkaDeadLetters {
    /// The thread ends within a poll, and drops the producer.
    fn drop(&mut self) {
        self.polling.store(false, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::message::Headers;

    #[test]
    fn dead_letter_headers_carry_reason_attempts_and_origin_on_both_brokers() {
        let amqp = amqp_dead_letter_headers(
            FieldTable::default(),
            "poison",
            3,
            &[("x-idemq-original-queue", "orders")],
        );
        assert_eq!(amqp.inner().get(REASON), Some(&amqp_text("poison")));
        assert_eq!(amqp.inner().get(ATTEMPTS), Some(&AMQPValue::LongLongInt(3)));
        assert_eq!(
            amqp.inner().get("x-idemq-original-queue"),
            Some(&amqp_text("orders"))
        );
        let original = [("tenant", Some(&b"acme"[..]))];
        let kafka = kafka_dead_letter_headers(
            original.iter().map(|(k, v)| (*k, *v)),
            "missing_key",
            0,
            &[("x-idemq-original-topic", "orders")],
        );
        let pairs: Vec<(String, Option<Vec<u8>>)> = kafka
            .iter()
            .map(|h| (h.key.to_string(), h.value.map(<[u8]>::to_vec)))
            .collect();
        assert_eq!(
            pairs,
            vec![
                ("tenant".into(), Some(b"acme".to_vec())),
                (REASON.into(), Some(b"missing_key".to_vec())),
                (ATTEMPTS.into(), Some(b"0".to_vec())),
                ("x-idemq-original-topic".into(), Some(b"orders".to_vec())),
            ]
        );
    }
}
