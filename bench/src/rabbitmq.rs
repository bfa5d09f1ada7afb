//! The RabbitMQ side of the pipeline benchmark (`--broker rabbitmq`, the
//! default): a queue per scenario on the broker at 127.0.0.1:5672,
//! publishing with confirms, waiting until it is empty, and the two
//! baselines:
//! - `raw`: a lapin consumer → HTTP POST → ack, no dedup, with idemq's
//!   prefetch, concurrency and batched `multiple` acks (the sidecar's own
//!   `AckTracker`);
//! - `naive`: prefetch 1, the naive step (`naive.rs`), an ack per message.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures::StreamExt;
use idemq_sidecar::source::acks::AckTracker;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use tokio_util::sync::CancellationToken;

use crate::pipeline::{now_us, SENT_HEADER};

pub const URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// A scenario's queue and its dead-letter exchange.
pub struct Queue {
    pub name: String,
    pub dlx: String,
    channel: Channel,
    _conn: Connection,
}

impl Queue {
    /// Declares the queue `name` and the fanout exchange `<name>.dlx`.
    pub async fn create(name: &str) -> anyhow::Result<Self> {
        let conn = Connection::connect(URL, ConnectionProperties::default())
            .await
            .context("RabbitMQ on 127.0.0.1:5672 (start it with: rabbitmq-server -detached)")?;
        let channel = conn.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let queue = Self {
            name: name.to_string(),
            dlx: format!("{name}.dlx"),
            channel,
            _conn: conn,
        };
        queue.declare().await?;
        Ok(queue)
    }

    async fn declare(&self) -> anyhow::Result<()> {
        self.channel
            .queue_declare(
                self.name.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        self.channel
            .exchange_declare(
                self.dlx.as_str().into(),
                ExchangeKind::Fanout,
                ExchangeDeclareOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok(())
    }

    /// Publishes every id, confirmed, its send time in `sent_header`; at
    /// `rate` messages per second when given.
    pub async fn publish_all(
        &self,
        ids: &[String],
        body: &[u8],
        rate: Option<u64>,
        sent_header: &str,
    ) -> anyhow::Result<()> {
        let pace = crate::pipeline::Pace::new(rate);
        let mut confirms = Vec::with_capacity(1000);
        for (i, id) in ids.iter().enumerate() {
            pace.wait(i).await;
            let mut headers = FieldTable::default();
            headers.insert(
                sent_header.into(),
                AMQPValue::LongString(LongString::from(now_us().to_string())),
            );
            let properties = BasicProperties::default()
                .with_message_id(id.as_str().into())
                .with_headers(headers);
            confirms.push(
                self.channel
                    .basic_publish(
                        "".into(),
                        self.name.as_str().into(),
                        BasicPublishOptions::default(),
                        body,
                        properties,
                    )
                    .await?,
            );
            if confirms.len() >= 1000 {
                for c in confirms.drain(..) {
                    c.await?;
                }
            }
        }
        for c in confirms {
            c.await?;
        }
        Ok(())
    }

    /// Waits until the queue is empty: every message acked.
    pub async fn wait_settled(&self) -> anyhow::Result<()> {
        let queue = &self.name;
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let q = self
                .channel
                .queue_declare(
                    queue.as_str().into(),
                    QueueDeclareOptions {
                        passive: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await?;
            if q.message_count() == 0 {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("queue {queue} still has {} messages", q.message_count());
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    pub async fn delete(self) {
        let _ = self
            .channel
            .queue_delete(self.name.as_str().into(), QueueDeleteOptions::default())
            .await;
        let _ = self
            .channel
            .exchange_delete(self.dlx.as_str().into(), ExchangeDeleteOptions::default())
            .await;
    }
}

/// The value of the header `name` of a delivery, as text.
fn header(delivery: &lapin::message::Delivery, name: &str) -> Option<String> {
    match delivery.properties.headers().as_ref()?.inner().get(name)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        _ => None,
    }
}

/// The raw baseline: idemq's prefetch, concurrency and batched acks, no dedup.
pub async fn raw(
    queue: String,
    prefetch: u16,
    url: String,
    sent_header: &'static str,
    stop: CancellationToken,
) {
    let result: anyhow::Result<()> = async {
        let conn = Connection::connect(URL, ConnectionProperties::default()).await?;
        let channel = conn.create_channel().await?;
        channel.basic_qos(prefetch, BasicQosOptions::default()).await?;
        let mut consumer = channel
            .basic_consume(queue.as_str().into(), "raw".into(), BasicConsumeOptions::default(), FieldTable::default())
            .await?;
        let post = crate::post::Post::new(&url)?;
        let tracker = Arc::new(Mutex::new(AckTracker::default()));
        let settled = Arc::new(tokio::sync::Notify::new());
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = settled.notified() => {
                    // The same ack strategy as idemq's source.
                    let acks = tracker.lock().expect("lock").take(Instant::now(), Duration::from_millis(20));
                    if let Some(tag) = acks.multiple {
                        channel.basic_ack(tag, BasicAckOptions { multiple: true }).await?;
                    }
                    for tag in acks.single {
                        channel.basic_ack(tag, BasicAckOptions { multiple: false }).await?;
                    }
                }
                next = consumer.next() => {
                    let Some(delivery) = next else { break };
                    let delivery = delivery?;
                    tracker.lock().expect("lock").received(delivery.delivery_tag, Instant::now());
                    let (post, tracker, settled) = (post.clone(), tracker.clone(), settled.clone());
                    tokio::spawn(async move {
                        let sent = header(&delivery, sent_header).map(|sent| (sent_header, sent));
                        let ok = post.send(delivery.data.clone(), None, sent).await;
                        tracker.lock().expect("lock").settle(delivery.delivery_tag, ok);
                        settled.notify_one();
                    });
                }
            }
        }
        Ok(())
    }
    .await;
    if let Err(e) = result {
        eprintln!("raw consumer failed: {e:#}");
    }
}

/// The tutorial consumer: one message at a time (prefetch 1), the naive
/// step, ack.
pub async fn naive(queue: String, url: String, run_id: String, stop: CancellationToken) {
    let result: anyhow::Result<()> = async {
        let conn = Connection::connect(URL, ConnectionProperties::default()).await?;
        let channel = conn.create_channel().await?;
        channel.basic_qos(1, BasicQosOptions::default()).await?;
        let mut consumer = channel
            .basic_consume(
                queue.as_str().into(),
                "naive".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let mut naive = crate::naive::Naive::connect(url, &run_id).await?;
        loop {
            let next = tokio::select! {
                _ = stop.cancelled() => break,
                next = consumer.next() => next,
            };
            let Some(delivery) = next else { break };
            let delivery = delivery?;
            let id = delivery
                .properties
                .message_id()
                .as_ref()
                .map(|s| s.as_str().to_string())
                .unwrap_or_default();
            naive
                .step(&id, delivery.data.clone(), header(&delivery, SENT_HEADER))
                .await?;
            delivery.ack(BasicAckOptions::default()).await?;
        }
        Ok(())
    }
    .await;
    if let Err(e) = result {
        eprintln!("naive consumer failed: {e:#}");
    }
}
