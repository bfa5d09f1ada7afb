//! The NATS JetStream side of the pipeline benchmark (`--broker jetstream`):
//! a stream per scenario on the server at 127.0.0.1:4222, publishing,
//! waiting until the durable consumer has acknowledged everything, and the
//! two baselines:
//! - `raw`: an async-nats pull consumer → HTTP POST → ack, no dedup, with
//!   the sidecar's consumer settings ([`consumer_config`]: explicit acks,
//!   MaxAckPending = `--prefetch`) and its pull loop (batches of at most
//!   MaxAckPending minus what is in flight, 256 at most, 1 s expiry);
//! - `naive`: one message at a time, the naive step (`naive.rs`), then an
//!   ack that waits for the server's confirmation.
//!
//! Each message's key travels in the header `Bench-Key`, not `Nats-Msg-Id`:
//! JetStream would drop the repeated ids at publish (its duplicate window is
//! two minutes), and the copies are what idemq is measured on.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::{self, stream};
use async_nats::HeaderMap;
use futures::StreamExt;
use idemq_sidecar::config::JetStreamConfig;
use idemq_sidecar::source::jetstream::consumer_config;
use tokio_util::sync::CancellationToken;

pub const URL: &str = "nats://127.0.0.1:4222";
/// The header each message's key travels in.
pub const KEY_HEADER: &str = "Bench-Key";
/// Messages asked for in one pull, at most (the sidecar's `MAX_BATCH`).
const MAX_BATCH: usize = 256;
const PULL_EXPIRES: Duration = Duration::from_secs(1);

async fn context() -> anyhow::Result<jetstream::Context> {
    let client = async_nats::connect(URL)
        .await
        .context("NATS on 127.0.0.1:4222 (start it with: source .ci/services.sh && ensure_nats)")?;
    Ok(jetstream::new(client))
}

/// The durable consumer every consumer of a scenario's stream uses.
pub fn consumer_name(stream: &str) -> String {
    format!("{stream}-c")
}

/// The subject a scenario's messages are published to.
fn subject(stream: &str) -> String {
    format!("{stream}.in")
}

/// The subject dead letters would go to (none are expected).
pub fn dead_letter_subject(stream: &str) -> String {
    format!("{stream}.dead")
}

/// The sidecar's settings for the consumer of `stream`: raw and naive
/// create the consumer with them, as the sidecar does.
pub fn settings(stream: &str, max_ack_pending: u16) -> JetStreamConfig {
    JetStreamConfig {
        url: None,
        stream: stream.to_string(),
        consumer: consumer_name(stream),
        filter_subjects: Vec::new(),
        max_ack_pending: u32::from(max_ack_pending),
        ack_wait: Duration::from_secs(30),
        max_deliver: None,
        dead_letter_subject: dead_letter_subject(stream),
    }
}

/// A scenario's stream. Stream names take no dots.
pub struct Stream {
    pub name: String,
    js: jetstream::Context,
}

impl Stream {
    pub async fn create(name: &str) -> anyhow::Result<Self> {
        let js = context().await?;
        let name = name.replace('.', "_");
        js.create_stream(stream::Config {
            name: name.clone(),
            subjects: vec![subject(&name)],
            ..Default::default()
        })
        .await
        .with_context(|| format!("create stream {name}"))?;
        Ok(Self { name, js })
    }

    /// Publishes every id in the key header with `body`; at `rate` per
    /// second when given. The send time travels in the `sent` header.
    pub async fn publish_all(
        &self,
        ids: &[String],
        body: &[u8],
        rate: Option<u64>,
        sent_header: &'static str,
    ) -> anyhow::Result<()> {
        let pace = crate::pipeline::Pace::new(rate);
        let body = bytes::Bytes::copy_from_slice(body);
        let mut acks = Vec::with_capacity(1000);
        for (i, id) in ids.iter().enumerate() {
            pace.wait(i).await;
            let mut headers = HeaderMap::new();
            headers.insert(KEY_HEADER, id.as_str());
            headers.insert(sent_header, super::pipeline::now_us().to_string().as_str());
            acks.push(
                self.js
                    .publish_with_headers(subject(&self.name), headers, body.clone())
                    .await?,
            );
            if acks.len() >= 1000 {
                for ack in acks.drain(..) {
                    ack.await?;
                }
            }
        }
        for ack in acks {
            ack.await?;
        }
        Ok(())
    }

    /// Waits until the consumer has acknowledged every message.
    pub async fn wait_settled(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(120);
        let stream = self.js.get_stream(&self.name).await?;
        loop {
            let left = match stream.consumer_info(consumer_name(&self.name)).await {
                Ok(info) => info.num_pending + info.num_ack_pending as u64,
                Err(e) => bail!("consumer of {}: {e}", self.name),
            };
            if left == 0 {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "stream {} still has {left} unacknowledged messages",
                    self.name
                );
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Deletes the stream (its consumer goes with it).
    pub async fn delete(self) {
        let _ = self.js.delete_stream(&self.name).await;
    }
}

/// The durable consumer with the sidecar's settings, created if missing.
async fn consumer(stream: &str, max_ack_pending: u16) -> anyhow::Result<PullConsumer> {
    let js = context().await?;
    let settings = settings(stream, max_ack_pending);
    Ok(js
        .get_stream(stream)
        .await?
        .get_or_create_consumer(&settings.consumer, consumer_config(&settings))
        .await?)
}

/// The `sent` and key headers of a message, to pass to the app.
fn header(message: &async_nats::Message, name: &str) -> Option<String> {
    message.headers.as_ref().and_then(|h| {
        h.iter()
            .find(|(k, _)| k.to_string().eq_ignore_ascii_case(name))
            .and_then(|(_, v)| v.first())
            .map(|v| v.as_str().to_string())
    })
}

/// The raw baseline: the sidecar's consumer settings and pull loop, POST,
/// ack; no dedup.
pub async fn raw(
    stream: String,
    max_ack_pending: u16,
    url: String,
    sent_header: &'static str,
    stop: CancellationToken,
) {
    let result: anyhow::Result<()> = async {
        let consumer = consumer(&stream, max_ack_pending).await?;
        let post = crate::post::Post::new(&url)?;
        let slots = Arc::new(tokio::sync::Semaphore::new(usize::from(max_ack_pending)));
        'pulls: loop {
            let room = slots.available_permits().min(MAX_BATCH);
            if room == 0 {
                // Wait for one delivery to settle, as the sidecar does.
                tokio::select! {
                    _ = stop.cancelled() => break,
                    permit = slots.clone().acquire_owned() => drop(permit?),
                }
                continue;
            }
            let mut batch = consumer
                .batch()
                .expires(PULL_EXPIRES)
                .max_messages(room)
                .messages()
                .await?;
            loop {
                let next = tokio::select! {
                    _ = stop.cancelled() => break 'pulls,
                    next = batch.next() => next,
                };
                let Some(message) = next else { break };
                let message = message.map_err(|e| anyhow::anyhow!("pull: {e}"))?;
                let slot = slots.clone().acquire_owned().await?;
                let post = post.clone();
                tokio::spawn(async move {
                    let sent = header(&message, sent_header).map(|sent| (sent_header, sent));
                    post.send(message.payload.clone(), None, sent).await;
                    if let Err(e) = message.ack().await {
                        eprintln!("raw jetstream ack: {e}");
                    }
                    drop(slot);
                });
            }
        }
        // Let what is in flight settle.
        let _ = slots.acquire_many(u32::from(max_ack_pending)).await;
        Ok(())
    }
    .await;
    if let Err(e) = result {
        eprintln!("raw jetstream consumer failed: {e:#}");
    }
}

/// The tutorial consumer: one message at a time, the naive step, an ack
/// confirmed by the server.
pub async fn naive(
    stream: String,
    max_ack_pending: u16,
    url: String,
    run_id: String,
    stop: CancellationToken,
) {
    let result: anyhow::Result<()> = async {
        let consumer = consumer(&stream, max_ack_pending).await?;
        let mut messages = consumer.messages().await?;
        let mut naive = crate::naive::Naive::connect(url, &run_id).await?;
        loop {
            let next = tokio::select! {
                _ = stop.cancelled() => break,
                next = messages.next() => next,
            };
            let Some(message) = next else { break };
            let message = message.map_err(|e| anyhow::anyhow!("pull: {e}"))?;
            let id = header(&message, KEY_HEADER).unwrap_or_default();
            let sent = header(&message, crate::pipeline::SENT_HEADER);
            naive.step(&id, message.payload.clone(), sent).await?;
            message
                .double_ack()
                .await
                .map_err(|e| anyhow::anyhow!("ack: {e}"))?;
        }
        Ok(())
    }
    .await;
    if let Err(e) = result {
        eprintln!("naive jetstream consumer failed: {e:#}");
    }
}
