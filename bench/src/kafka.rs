//! The Kafka side of the pipeline benchmark (`--broker kafka`): a topic per
//! scenario on the broker at 127.0.0.1:9092, publishing, waiting until the
//! group has committed everything, and the two baselines:
//! - `raw`: an rdkafka consumer → HTTP POST, no dedup, with idemq's in-flight
//!   limit, pre-fetch settings and commit strategy (per partition below the
//!   lowest unsettled record, every second, after every `maxInFlight`
//!   settlements, and when idle with everything settled), the same `Offsets`
//!   tracker as the sidecar;
//! - `naive`: one record at a time, the naive step (`naive.rs`), a
//!   synchronous commit after each record.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use idemq_sidecar::source::kafka::prefetch_settings;
use idemq_sidecar::source::offsets::{Offsets, TopicPartition};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::{ClientConfig, Message};
use tokio_util::sync::CancellationToken;

pub const BOOTSTRAP: &str = "127.0.0.1:9092";
const TIMEOUT: Duration = Duration::from_secs(10);
/// No record for this long: the consumer is idle (the sidecar's poll timeout).
const IDLE: Duration = Duration::from_millis(100);
pub const PARTITIONS: i32 = 4;
/// The sidecar's byte budget in the benchmark (`delivery.maxInFlightBytes`'s default).
const DEFAULT_BUDGET: u64 = 32 * 1024 * 1024;

fn client() -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", BOOTSTRAP);
    c
}

/// The group every consumer of a scenario's topic uses.
pub fn group(topic: &str) -> String {
    format!("{topic}-group")
}

/// A scenario's topic and its dead-letter topic.
pub struct Topic {
    pub name: String,
    admin: AdminClient<DefaultClientContext>,
    producer: FutureProducer,
}

impl Topic {
    pub async fn create(name: &str) -> anyhow::Result<Self> {
        let admin: AdminClient<DefaultClientContext> = client().create()?;
        let dead = format!("{name}.dead");
        let opts = AdminOptions::new().operation_timeout(Some(TIMEOUT));
        let results = admin
            .create_topics(
                &[
                    NewTopic::new(name, PARTITIONS, TopicReplication::Fixed(1)),
                    NewTopic::new(&dead, 1, TopicReplication::Fixed(1)),
                ],
                &opts,
            )
            .await
            .context(
                "Kafka on 127.0.0.1:9092 (start it with: source .ci/services.sh && ensure_kafka)",
            )?;
        for r in results {
            if let Err((topic, code)) = r {
                bail!("create topic {topic}: {code}");
            }
        }
        // One record per batch: the test broker (tansu) reports a high
        // watermark one past the last batch's base offset.
        let producer: FutureProducer = client()
            .set("linger.ms", "0")
            .set("batch.num.messages", "1")
            .create()?;
        Ok(Self {
            name: name.to_string(),
            admin,
            producer,
        })
    }

    /// Publishes every id as a record key with `body`; at `rate` per second
    /// when given. The send time travels in the `sent` header.
    pub async fn publish_all(
        &self,
        ids: &[String],
        body: &[u8],
        rate: Option<u64>,
        sent_header: &str,
    ) -> anyhow::Result<()> {
        let pace = crate::pipeline::Pace::new(rate);
        let mut pending = Vec::with_capacity(1000);
        for (i, id) in ids.iter().enumerate() {
            pace.wait(i).await;
            let sent = super::pipeline::now_us().to_string();
            let headers = OwnedHeaders::new().insert(Header {
                key: sent_header,
                value: Some(sent.as_str()),
            });
            let record: FutureRecord<'_, str, [u8]> = FutureRecord::to(&self.name)
                .key(id.as_str())
                .payload(body)
                .headers(headers);
            // Enqueued now, at its send time: `send` is lazy and would enqueue
            // only when its future is first polled, a whole chunk later.
            let delivery = match self.producer.send_result(record) {
                Ok(delivery) => delivery,
                Err((e, _)) => bail!("enqueue record {id}: {e}"),
            };
            pending.push(delivery);
            if pending.len() >= 1000 {
                delivered(pending.drain(..)).await?;
            }
        }
        delivered(pending.drain(..)).await
    }

    /// Waits until the group has committed every record of the topic.
    pub async fn wait_committed(&self) -> anyhow::Result<()> {
        let reader: StreamConsumer = client()
            .set("group.id", group(&self.name))
            .set("enable.auto.commit", "false")
            .create()?;
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let mut tpl = TopicPartitionList::new();
            for p in 0..PARTITIONS {
                tpl.add_partition(&self.name, p);
            }
            let committed = reader.committed_offsets(tpl, TIMEOUT)?;
            let mut behind = 0;
            for p in 0..PARTITIONS {
                let (_, end) = reader.fetch_watermarks(&self.name, p, TIMEOUT)?;
                let at = match committed.find_partition(&self.name, p).map(|e| e.offset()) {
                    Some(Offset::Offset(o)) => o,
                    _ => 0,
                };
                behind += (end - at).max(0);
            }
            if behind == 0 {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("topic {} still has {behind} uncommitted records", self.name);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Deletes the topics and the group (the producer goes first: see the
    /// tests' note on tansu's metadata for deleted topics).
    pub async fn delete(self) {
        let Self {
            name,
            admin,
            producer,
        } = self;
        drop(producer);
        let opts = AdminOptions::new().operation_timeout(Some(TIMEOUT));
        let dead = format!("{name}.dead");
        let _ = admin.delete_topics(&[&name, &dead], &opts).await;
        let _ = admin.delete_groups(&[&group(&name)], &opts).await;
    }
}

fn consumer(topic: &str) -> anyhow::Result<StreamConsumer> {
    let consumer = client()
        .set("group.id", group(topic))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "6000")
        .set("heartbeat.interval.ms", "2000")
        .clone();
    // The sidecar's pre-fetch for its default byte budget, so that both
    // fetch alike.
    let mut consumer = consumer;
    for (key, value) in prefetch_settings(DEFAULT_BUDGET) {
        consumer.set(key, value);
    }
    let consumer: StreamConsumer = consumer.create()?;
    consumer.subscribe(&[topic])?;
    Ok(consumer)
}

fn sent(message: &rdkafka::message::BorrowedMessage<'_>, header: &str) -> Option<String> {
    message.headers().and_then(|h| {
        h.iter()
            .find(|h| h.key == header)
            .and_then(|h| h.value)
            .map(|v| String::from_utf8_lossy(v).into_owned())
    })
}

fn commit(consumer: &StreamConsumer, offsets: &Mutex<Offsets>) {
    let commits = offsets.lock().expect("lock").take_commits(None);
    if commits.is_empty() {
        return;
    }
    let mut tpl = TopicPartitionList::new();
    for (tp, o) in commits {
        let _ = tpl.add_partition_offset(&tp.topic, tp.partition, Offset::Offset(o));
    }
    if let Err(e) = consumer.commit(&tpl, CommitMode::Async) {
        eprintln!("raw kafka commit: {e}");
    }
}

/// The raw baseline: idemq's in-flight limit and commit strategy, no dedup.
pub async fn raw(
    topic: String,
    max_in_flight: u16,
    url: String,
    sent_header: &'static str,
    stop: CancellationToken,
) {
    let result: anyhow::Result<()> = async {
        let consumer = consumer(&topic)?;
        let post = crate::post::Post::new(&url)?;
        let offsets = Arc::new(Mutex::new(Offsets::default()));
        for p in 0..PARTITIONS {
            offsets
                .lock()
                .expect("lock")
                .assign(TopicPartition::new(&topic, p));
        }
        let slots = Arc::new(tokio::sync::Semaphore::new(usize::from(max_in_flight)));
        // The sidecar's commit strategy: every second (`commitInterval`),
        // after every `maxInFlight` settlements, and when idle.
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let settled = Arc::new(AtomicU64::new(0));
        loop {
            if settled.load(Ordering::Relaxed) >= u64::from(max_in_flight) {
                settled.store(0, Ordering::Relaxed);
                commit(&consumer, &offsets);
            }
            let slot = tokio::select! {
                _ = stop.cancelled() => break,
                _ = tick.tick() => { commit(&consumer, &offsets); continue; }
                slot = slots.clone().acquire_owned() => slot?,
            };
            // The tick also commits while no record comes (the backlog drained).
            let message = tokio::select! {
                _ = stop.cancelled() => break,
                _ = tick.tick() => { commit(&consumer, &offsets); continue; }
                m = tokio::time::timeout(IDLE, consumer.recv()) => match m {
                    Ok(m) => m?,
                    // Idle with everything settled: commit at once, as the sidecar does.
                    Err(_) => {
                        drop(slot);
                        if slots.available_permits() == usize::from(max_in_flight)
                            && settled.swap(0, Ordering::Relaxed) > 0
                        {
                            commit(&consumer, &offsets);
                        }
                        continue;
                    }
                },
            };
            let tp = TopicPartition::new(message.topic(), message.partition());
            let offset = message.offset();
            let generation = {
                let mut o = offsets.lock().expect("lock");
                o.taken(&tp, offset);
                o.generation(&tp).unwrap_or(0)
            };
            let body = message.payload().unwrap_or_default().to_vec();
            let sent = sent(&message, sent_header).map(|sent| (sent_header, sent));
            let (post, offsets, settled) = (post.clone(), offsets.clone(), settled.clone());
            tokio::spawn(async move {
                post.send(body, None, sent).await;
                offsets
                    .lock()
                    .expect("lock")
                    .settled(&tp, generation, offset);
                settled.fetch_add(1, Ordering::Relaxed);
                drop(slot);
            });
        }
        // Let what is in flight settle, then commit it.
        let _ = slots.acquire_many(u32::from(max_in_flight)).await;
        commit(&consumer, &offsets);
        Ok(())
    }
    .await;
    if let Err(e) = result {
        eprintln!("raw kafka consumer failed: {e:#}");
    }
}

/// The tutorial consumer: one record at a time, the naive step, a
/// synchronous commit.
pub async fn naive(topic: String, url: String, run_id: String, stop: CancellationToken) {
    let result: anyhow::Result<()> = async {
        let consumer = consumer(&topic)?;
        let mut naive = crate::naive::Naive::connect(url, &run_id).await?;
        loop {
            let message = tokio::select! {
                _ = stop.cancelled() => break,
                m = consumer.recv() => m?,
            };
            let id = message
                .key()
                .map(|k| String::from_utf8_lossy(k).into_owned())
                .unwrap_or_default();
            let body = message.payload().unwrap_or_default().to_vec();
            naive
                .step(&id, body, sent(&message, crate::pipeline::SENT_HEADER))
                .await?;
            consumer.commit_message(&message, CommitMode::Sync)?;
        }
        Ok(())
    }
    .await;
    if let Err(e) = result {
        eprintln!("naive kafka consumer failed: {e:#}");
    }
}

/// Waits for the delivery reports of enqueued records; the first failure is
/// the error.
async fn delivered(
    reports: impl IntoIterator<Item = rdkafka::producer::DeliveryFuture>,
) -> anyhow::Result<()> {
    for report in futures::future::join_all(reports).await {
        report
            .context("the producer dropped a record")?
            .map_err(|(e, _)| e)
            .context("deliver a record")?;
    }
    Ok(())
}
