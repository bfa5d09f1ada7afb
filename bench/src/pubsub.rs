//! The Google Cloud Pub/Sub side of the pipeline benchmark (`--broker
//! pubsub`): a topic and subscription per scenario on Google's emulator at
//! 127.0.0.1:8085 (project `idemq-bench`), and the two baselines:
//! - `raw`: the sidecar's client and streaming pull ([`subscribe_config`]:
//!   the same flow control, ack deadline and client buffer; at most
//!   `maxOutstandingMessages` in flight, which the sidecar enforces itself
//!   since the emulator does not) → HTTP POST → ack, one `Acknowledge` per
//!   message as the sidecar does; no dedup and no deadline extension (the
//!   POSTs take far less than a deadline);
//! - `naive`: the same streaming pull with one message outstanding, the
//!   naive step (`naive.rs`) on the key attribute, ack.
//!
//! Each message's key travels in the attribute `bench-key` (the sidecar's
//! key: `from: attribute`), its send time in the latency attribute.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use futures::StreamExt;
use gcloud_googleapis::pubsub::v1::PubsubMessage;
use gcloud_pubsub::client::Client;
use gcloud_pubsub::publisher::PublisherConfig;
use gcloud_pubsub::subscription::SubscriptionConfig;
use idemq_sidecar::config::{DedupConfig, PubSubConfig};
use idemq_sidecar::source::pubsub::{ack_deadline, connect, subscribe_config};
use tokio_util::sync::CancellationToken;

use crate::pipeline::SENT_HEADER;

pub const EMULATOR: &str = "127.0.0.1:8085";
pub const PROJECT: &str = "idemq-bench";
/// The attribute each message's key travels in.
pub const KEY_ATTRIBUTE: &str = "bench-key";
/// The subscription's ack deadline (Pub/Sub's default).
const ACK_DEADLINE_SECONDS: i32 = 10;
/// Messages published in one request.
const BUNDLE: usize = 500;

/// The sidecar's `broker.pubsub` settings for a scenario's subscription:
/// raw and naive pull with them too.
pub fn settings(subscription: &Subscription, max_outstanding: u16) -> PubSubConfig {
    PubSubConfig {
        max_outstanding_messages: u32::from(max_outstanding),
        dead_letter_topic: Some(subscription.dead_letter_topic.clone()),
        ..PubSubConfig::new(PROJECT, &subscription.subscription)
    }
}

async fn client() -> anyhow::Result<Client> {
    connect(&PubSubConfig::new(PROJECT, ""), Some(EMULATOR))
        .await
        .context("the Pub/Sub emulator on 127.0.0.1:8085 (start it with: source .ci/services.sh && ensure_pubsub_emulator)")
}

/// A scenario's topic, subscription and dead-letter topic (none are expected).
pub struct Subscription {
    pub topic: String,
    pub subscription: String,
    pub dead_letter_topic: String,
    client: Client,
}

impl Subscription {
    pub async fn create(name: &str) -> anyhow::Result<Self> {
        let client = client().await?;
        let t = Self {
            topic: name.to_string(),
            subscription: format!("{name}-sub"),
            dead_letter_topic: format!("{name}-dead"),
            client,
        };
        for topic in [&t.topic, &t.dead_letter_topic] {
            t.client
                .create_topic(topic, None, None)
                .await
                .with_context(|| format!("create topic {topic}"))?;
        }
        let config = SubscriptionConfig {
            ack_deadline_seconds: ACK_DEADLINE_SECONDS,
            ..SubscriptionConfig::default()
        };
        t.client
            .create_subscription(&t.subscription, &t.topic, config, None)
            .await
            .with_context(|| format!("create subscription {}", t.subscription))?;
        Ok(t)
    }

    /// Publishes every id in the key attribute with `body`, waiting for each
    /// message id; at `rate` per second when given (one message a request),
    /// else in bundles. The send time travels in the latency attribute.
    pub async fn publish_all(
        &self,
        ids: &[String],
        body: &[u8],
        rate: Option<u64>,
    ) -> anyhow::Result<()> {
        let mut publisher = self
            .client
            .topic(&self.topic)
            .new_publisher(Some(PublisherConfig {
                workers: 3,
                flush_interval: Duration::from_millis(1),
                bundle_size: if rate.is_some() { 1 } else { BUNDLE },
                retry_setting: None,
            }));
        let message = |id: &String| PubsubMessage {
            data: body.to_vec(),
            attributes: [
                (KEY_ATTRIBUTE.to_string(), id.clone()),
                (
                    SENT_HEADER.to_string(),
                    crate::pipeline::now_us().to_string(),
                ),
            ]
            .into(),
            ..PubsubMessage::default()
        };
        let pace = crate::pipeline::Pace::new(rate);
        let mut pending = Vec::with_capacity(BUNDLE);
        for (i, id) in ids.iter().enumerate() {
            pace.wait(i).await;
            pending.push(publisher.publish(message(id)).await);
            if pending.len() >= BUNDLE {
                for awaiter in pending.drain(..) {
                    awaiter.get().await.context("publish")?;
                }
            }
        }
        for awaiter in pending {
            awaiter.get().await.context("publish")?;
        }
        publisher.shutdown().await;
        Ok(())
    }

    /// Deletes the subscription and the topics.
    pub async fn delete(self) {
        let _ = self
            .client
            .subscription(&self.subscription)
            .delete(None)
            .await;
        for topic in [&self.topic, &self.dead_letter_topic] {
            let _ = self.client.topic(topic).delete(None).await;
        }
    }
}

/// The streaming pull on `pubsub.subscription`, opened as the sidecar opens it.
async fn subscribe(
    pubsub: &PubSubConfig,
) -> anyhow::Result<gcloud_pubsub::subscription::MessageStream> {
    let client = client().await?;
    let subscription = client.subscription(&pubsub.subscription);
    let (_, config) = subscription.config(None).await?;
    let deadline = ack_deadline(config.ack_deadline_seconds, DedupConfig::default().lease);
    Ok(subscription
        .subscribe(Some(subscribe_config(pubsub, deadline)))
        .await?)
}

/// The raw baseline: the sidecar's client, flow control and acks, no dedup.
pub async fn raw(pubsub: PubSubConfig, url: String, stop: CancellationToken) {
    let result: anyhow::Result<()> = async {
        let most = pubsub.max_outstanding_messages as usize;
        let mut stream = subscribe(&pubsub).await?;
        let post = crate::post::Post::new(&url)?;
        let slots = Arc::new(tokio::sync::Semaphore::new(most));
        loop {
            let slot = tokio::select! {
                _ = stop.cancelled() => break,
                slot = slots.clone().acquire_owned() => slot?,
            };
            let mut message = tokio::select! {
                _ = stop.cancelled() => break,
                next = stream.next() => match next {
                    Some(message) => message,
                    None => bail!("the streaming pull ended"),
                },
            };
            let body = std::mem::take(&mut message.message.data);
            let sent = message
                .message
                .attributes
                .get(SENT_HEADER)
                .map(|sent| (SENT_HEADER, sent.clone()));
            let post = post.clone();
            tokio::spawn(async move {
                post.send(body, None, sent).await;
                if let Err(e) = message.ack().await {
                    eprintln!("raw pubsub ack: {e}");
                }
                drop(slot);
            });
        }
        // Let what is in flight settle, then close the stream.
        let _ = slots.acquire_many(most as u32).await;
        stream.dispose().await;
        Ok(())
    }
    .await;
    if let Err(e) = result {
        eprintln!("raw pubsub consumer failed: {e:#}");
    }
}

/// The tutorial consumer: one message outstanding, the naive step, ack.
pub async fn naive(pubsub: PubSubConfig, url: String, run_id: String, stop: CancellationToken) {
    let result: anyhow::Result<()> = async {
        let pubsub = PubSubConfig {
            max_outstanding_messages: 1,
            ..pubsub
        };
        let mut stream = subscribe(&pubsub).await?;
        let mut naive = crate::naive::Naive::connect(url, &run_id).await?;
        loop {
            let mut message = tokio::select! {
                _ = stop.cancelled() => break,
                next = stream.next() => match next {
                    Some(message) => message,
                    None => bail!("the streaming pull ended"),
                },
            };
            let id = message
                .message
                .attributes
                .get(KEY_ATTRIBUTE)
                .cloned()
                .unwrap_or_default();
            let sent = message.message.attributes.get(SENT_HEADER).cloned();
            let body = std::mem::take(&mut message.message.data);
            naive.step(&id, body, sent).await?;
            message.ack().await.context("ack")?;
        }
        stream.dispose().await;
        Ok(())
    }
    .await;
    if let Err(e) = result {
        eprintln!("naive pubsub consumer failed: {e:#}");
    }
}
