//! Kafka source: a member of a consumer group that delivers records through
//! the engine and commits, per partition, only offsets below the lowest
//! record that is not settled yet ([`super::offsets`]).
//!
//! librdkafka is driven from one thread of its own (the *poll thread*): it
//! polls the consumer, takes as many records as there are free in-flight
//! slots and hands them to the runtime together (one wake-up of the poll
//! thread per batch of settled records, not one per record), commits settled
//! offsets in batches (every `commitInterval`, after `maxInFlight`
//! settlements, and at once when no record comes and everything taken is
//! settled), and pauses or resumes the assigned partitions. Rebalance
//! callbacks run on that thread, so a revoke can block it: it stops taking
//! records of the revoked partitions, waits (at most `shutdownGrace`) for their
//! records in flight to settle, commits them, and only then gives them up.
//! With cooperative-sticky assignment only the moved partitions are touched.
//!
//! Pausing keeps the member in its group (no rebalance storm): partitions are
//! paused while the key store or the application is unavailable, and while
//! every in-flight slot has been busy for a while, so that the poll thread
//! keeps serving group events instead of waiting for a slot. A record that
//! cannot be decided (store or application unavailable, its key in flight
//! elsewhere) stays in flight and is tried again in-process; its offset is not
//! committed meanwhile. Dead letters go to `<topic>.dead` (or
//! `deadLetterTopic`) before their record counts as settled.
//!
//! librdkafka reconnects to the brokers by itself; its statistics (every few
//! seconds) drive `idemq_broker_connected`, readiness and the per-partition
//! `idemq_consumer_lag` gauge.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::FutureExt;
use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Headers};
use rdkafka::statistics::Statistics;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::Message;
use tokio::runtime::Handle;
use tokio::sync::{oneshot, Notify, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use super::offsets::{Offsets, TopicPartition};
use super::publish::{self, KafkaDeadLetters};
use super::{DeadLetterReason, Envelope, InFlightWait, Verdict};
use crate::config::{
    Config, KafkaConfig, KafkaSecurity, OffsetReset, Ordering, SaslMechanism, SecurityProtocol,
};
use crate::engine::Engine;
use crate::flow::Flow;
use crate::health::Component;
use crate::key::{self, KeyDecision};
use crate::metrics::{Metrics, PartitionLabels};
use crate::store::KeyStore;
use crate::traces;

/// How long the poll thread waits in one call for a record or an event.
const POLL: Duration = Duration::from_millis(100);
/// How soon librdkafka fetches again after finding its pre-fetch queue full.
const FETCH_QUEUE_BACKOFF_MS: u32 = 50;
/// When every in-flight slot is busy, the poll thread waits for
/// `maxInFlight / SLOT_BATCH` of them to be free before it takes records again.
const SLOT_BATCH: u32 = 8;
/// Every in-flight slot busy this long: pause the partitions and keep polling.
const STARVED_AFTER: Duration = Duration::from_secs(1);
const STORE_POLL: Duration = Duration::from_millis(500);
/// Statistics (lag, broker state) are refreshed this often.
const STATS_INTERVAL_MS: &str = "2000";

/// The secrets of a Kafka connection, from the environment.
#[derive(Clone, Default)]
pub struct KafkaSecrets {
    pub bootstrap_servers: String,
    pub username: Option<String>,
    pub password: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("create the kafka {what}: {source}")]
    Create {
        what: &'static str,
        source: KafkaError,
    },
    #[error("subscribe to {topics:?}: {source}")]
    Subscribe {
        topics: Vec<String>,
        source: KafkaError,
    },
    #[error("the kafka poll thread: {0}")]
    Thread(String),
}

/// Everything a Kafka source needs.
pub struct Source {
    pub config: Arc<Config>,
    /// The `broker.kafka` section of `config`.
    pub kafka: KafkaConfig,
    pub secrets: KafkaSecrets,
    pub engine: Arc<Engine>,
    pub store: Arc<dyn KeyStore>,
    pub metrics: Arc<Metrics>,
    pub health: Component,
    pub flow: Flow,
}

/// The librdkafka settings of a connection: the consumer's and the
/// dead-letter producer's (also a ZeroMQ endpoint's Kafka dead letters').
pub fn client_config(
    kafka: KafkaSecurity<'_>,
    secrets: &KafkaSecrets,
    client_id: &str,
) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &secrets.bootstrap_servers)
        .set("client.id", client_id)
        .set(
            "security.protocol",
            match kafka.security_protocol {
                SecurityProtocol::Plaintext => "plaintext",
                SecurityProtocol::Ssl => "ssl",
                SecurityProtocol::SaslPlaintext => "sasl_plaintext",
                SecurityProtocol::SaslSsl => "sasl_ssl",
            },
        );
    if let Some(mechanism) = kafka.sasl_mechanism {
        c.set(
            "sasl.mechanism",
            match mechanism {
                SaslMechanism::Plain => "PLAIN",
                SaslMechanism::ScramSha256 => "SCRAM-SHA-256",
                SaslMechanism::ScramSha512 => "SCRAM-SHA-512",
            },
        );
    }
    if let Some(user) = &secrets.username {
        c.set("sasl.username", user);
    }
    if let Some(password) = &secrets.password {
        c.set("sasl.password", password);
    }
    if let Some(ca) = kafka.ca_file {
        c.set("ssl.ca.location", ca);
    }
    c
}

/// librdkafka's pre-fetch settings for a byte budget (`delivery.maxInFlightBytes`).
///
/// The pre-fetch queue comes on top of the bodies in flight: a quarter of the
/// budget keeps the sidecar within the memory the operator gives it
/// (64 MiB + 2 × budget) with large records, and still holds thousands of
/// small ones. librdkafka postpones the next fetch by `fetch.queue.backoff.ms`
/// once the queue is full; with a queue this small its default (1 s) would
/// leave the queue empty for most of that second under load, so the fetcher
/// looks again soon.
pub fn prefetch_settings(budget: u64) -> [(&'static str, String); 3] {
    let queued_kb = (budget / 4 / 1024).clamp(1024, 2_097_151);
    [
        ("queued.max.messages.kbytes", queued_kb.to_string()),
        (
            "fetch.max.bytes",
            (queued_kb * 1024).min(52_428_800).to_string(),
        ),
        ("fetch.queue.backoff.ms", FETCH_QUEUE_BACKOFF_MS.to_string()),
    ]
}

impl Source {
    /// Consumes until `shutdown` fires, then drains (within `shutdownGrace`)
    /// and commits what settled.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), SourceError> {
        // Nothing is taken before the application takes messages.
        if !self.flow.until_available(&shutdown).await {
            return Ok(());
        }
        let kafka = &self.kafka;
        let client_id = format!("idemq-sidecar {}", self.config.consumer);
        let shared = Arc::new(Shared {
            offsets: Mutex::new(Offsets::default()),
            paused: AtomicBool::new(false),
            finishing: AtomicBool::new(false),
            drain_timeout: self.config.shutdown_grace,
            metrics: self.metrics.clone(),
            health: self.health.clone(),
        });
        let session_ms = kafka.session_timeout.as_millis();
        let mut consumer_config = client_config(kafka.security(), &self.secrets, &client_id);
        consumer_config
            .set("group.id", &kafka.group_id)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "false")
            .set(
                "auto.offset.reset",
                match kafka.auto_offset_reset {
                    OffsetReset::Earliest => "earliest",
                    OffsetReset::Latest => "latest",
                },
            )
            .set("session.timeout.ms", session_ms.to_string())
            .set(
                "heartbeat.interval.ms",
                (session_ms / 3).clamp(100, 3000).to_string(),
            )
            .set("partition.assignment.strategy", &kafka.assignment_strategy)
            .set("statistics.interval.ms", STATS_INTERVAL_MS);
        for (key, value) in prefetch_settings(self.flow.budget()) {
            consumer_config.set(key, value);
        }
        let consumer: BaseConsumer<KafkaContext> = consumer_config
            .create_with_context(KafkaContext {
                shared: shared.clone(),
            })
            .map_err(|source| SourceError::Create {
                what: "consumer",
                source,
            })?;
        let topics: Vec<&str> = kafka.topics.iter().map(String::as_str).collect();
        consumer
            .subscribe(&topics)
            .map_err(|source| SourceError::Subscribe {
                topics: kafka.topics.clone(),
                source,
            })?;
        let producer = KafkaDeadLetters::create(
            client_config(kafka.security(), &self.secrets, &client_id),
            None,
        )
        .map_err(|source| SourceError::Create {
            what: "dead-letter producer",
            source,
        })?;
        tracing::info!(
            topics = ?kafka.topics,
            group = %kafka.group_id,
            max_in_flight = kafka.max_in_flight,
            ordering = ?kafka.ordering,
            "consuming"
        );

        let dispatch = Arc::new(Dispatch {
            runtime: Handle::current(),
            engine: self.engine.clone(),
            store: self.store.clone(),
            flow: self.flow.clone(),
            producer,
            shared: shared.clone(),
            kafka: kafka.clone(),
            config: self.config.clone(),
            slots: Arc::new(Semaphore::new(kafka.max_in_flight as usize)),
            lanes: Mutex::new(HashMap::new()),
            in_flight: AtomicUsize::new(0),
            drained: Notify::new(),
            settled_since_commit: AtomicU64::new(0),
            store_waiters: AtomicUsize::new(0),
            app_waiters: AtomicUsize::new(0),
            stop_taking: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            work: shutdown.child_token(),
        });
        let (done_tx, done_rx) = oneshot::channel();
        // Should this future be dropped (its runtime going away), the poll
        // thread still commits what settled and leaves the group.
        let _stop_on_drop = StopOnDrop(dispatch.clone());
        let thread_dispatch = dispatch.clone();
        std::thread::Builder::new()
            .name("idemq-kafka".into())
            .spawn(move || {
                poll_loop(&consumer, &thread_dispatch);
                // The final commit, then leave the group.
                thread_dispatch
                    .shared
                    .finishing
                    .store(true, AtomicOrdering::SeqCst);
                commit(&consumer, &thread_dispatch.shared, None, CommitMode::Sync);
                drop(consumer);
                let _ = done_tx.send(());
            })
            .map_err(|e| SourceError::Thread(e.to_string()))?;

        shutdown.cancelled().await;
        // Stop taking records, let what is in flight settle, then commit.
        dispatch.stop_taking.store(true, AtomicOrdering::SeqCst);
        let grace = self.config.shutdown_grace;
        let drained = tokio::time::timeout(grace, async {
            loop {
                let notified = dispatch.drained.notified();
                if dispatch.in_flight.load(AtomicOrdering::SeqCst) == 0 {
                    break;
                }
                notified.await;
            }
        })
        .await;
        if drained.is_err() {
            tracing::warn!(grace = ?grace, left = dispatch.in_flight.load(AtomicOrdering::SeqCst), "in-flight records did not settle in time; their offsets stay uncommitted and the group delivers them again");
        }
        dispatch.stop.store(true, AtomicOrdering::SeqCst);
        let _ = done_rx.await;
        self.health.set(false);
        self.metrics.broker_connected.set(0);
        Ok(())
    }
}

struct StopOnDrop(Arc<Dispatch>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.stop.store(true, AtomicOrdering::SeqCst);
        self.0.work.cancel();
    }
}

/// State shared by the poll thread, the rebalance callbacks and the record tasks.
struct Shared {
    offsets: Mutex<Offsets>,
    /// The assigned partitions are paused (new assignments get paused too).
    paused: AtomicBool,
    /// Leaving: a revoke commits without waiting.
    finishing: AtomicBool,
    drain_timeout: Duration,
    metrics: Arc<Metrics>,
    health: Component,
}

impl Shared {
    fn offsets(&self) -> MutexGuard<'_, Offsets> {
        self.offsets.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn connected(&self, up: bool) {
        if up != self.health.is_up() {
            if up {
                tracing::info!("kafka brokers answer");
            } else {
                tracing::warn!("no kafka broker answers; librdkafka keeps reconnecting");
            }
        }
        self.health.set(up);
        self.metrics.broker_connected.set(i64::from(up));
    }
}

fn labels(tp: &TopicPartition) -> PartitionLabels {
    PartitionLabels {
        topic: tp.topic.clone(),
        partition: tp.partition.to_string(),
    }
}

fn partitions(tpl: &TopicPartitionList) -> Vec<TopicPartition> {
    tpl.elements()
        .iter()
        .map(|e| TopicPartition::new(e.topic(), e.partition()))
        .collect()
}

/// Commits the settled offsets of `tps` (all when `None`).
fn commit(
    consumer: &BaseConsumer<KafkaContext>,
    shared: &Shared,
    tps: Option<&[TopicPartition]>,
    mode: CommitMode,
) {
    let commits = shared.offsets().take_commits(tps);
    if commits.is_empty() {
        return;
    }
    let mut tpl = TopicPartitionList::new();
    for (tp, offset) in &commits {
        if let Err(e) = tpl.add_partition_offset(&tp.topic, tp.partition, Offset::Offset(*offset)) {
            tracing::warn!(error = %e, "building the commit list");
        }
    }
    if let Err(e) = consumer.commit(&tpl, mode) {
        tracing::warn!(error = %e, "commit failed; it is retried with the next batch");
        let mut offsets = shared.offsets();
        for (tp, offset) in &commits {
            offsets.commit_failed(tp, *offset);
        }
    }
}

/// The consumer's callbacks: rebalances, commits, statistics, errors, logs.
struct KafkaContext {
    shared: Arc<Shared>,
}

impl ClientContext for KafkaContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error => tracing::error!(fac, "librdkafka: {message}"),
            RDKafkaLogLevel::Warning => tracing::warn!(fac, "librdkafka: {message}"),
            RDKafkaLogLevel::Notice => tracing::info!(fac, "librdkafka: {message}"),
            RDKafkaLogLevel::Info | RDKafkaLogLevel::Debug => {
                tracing::debug!(fac, "librdkafka: {message}")
            }
        }
    }

    fn stats(&self, stats: Statistics) {
        self.shared
            .connected(stats.brokers.values().any(|b| b.state == "UP"));
        let offsets = self.shared.offsets();
        for (topic, t) in &stats.topics {
            for (partition, p) in &t.partitions {
                let tp = TopicPartition::new(topic, *partition);
                if *partition >= 0 && p.consumer_lag >= 0 && offsets.generation(&tp).is_some() {
                    self.shared
                        .metrics
                        .consumer_lag
                        .get_or_create(&labels(&tp))
                        .set(p.consumer_lag);
                }
            }
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(error = %error, reason, "kafka client error");
        if matches!(
            error.rdkafka_error_code(),
            Some(RDKafkaErrorCode::AllBrokersDown)
        ) {
            self.shared.connected(false);
        }
    }
}

impl ConsumerContext for KafkaContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(tpl) = rebalance else {
            return;
        };
        let tps = partitions(tpl);
        let lost = consumer.assignment_lost();
        let shared = &self.shared;
        if !lost && !shared.finishing.load(AtomicOrdering::SeqCst) {
            // Their records are no longer taken (the poll thread is here);
            // let those in flight settle before giving the partitions up.
            let started = Instant::now();
            while shared.offsets().unsettled(Some(&tps)) > 0
                && started.elapsed() < shared.drain_timeout
            {
                std::thread::sleep(Duration::from_millis(10));
            }
            let left = shared.offsets().unsettled(Some(&tps));
            if left > 0 {
                tracing::warn!(left, "revoked partitions still had records in flight; the next owner delivers them again");
            }
        }
        if lost {
            tracing::warn!(partitions = ?tps, "assignment lost: its offsets cannot be committed");
        } else {
            commit(consumer, shared, Some(&tps), CommitMode::Sync);
        }
        let mut offsets = shared.offsets();
        for tp in &tps {
            offsets.revoke(tp);
            shared.metrics.consumer_lag.remove(&labels(tp));
        }
        shared.metrics.revoked_partitions.inc_by(tps.len() as u64);
        shared
            .metrics
            .assigned_partitions
            .set(offsets.assigned().len() as i64);
        tracing::info!(partitions = ?tps, "partitions revoked");
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Assign(tpl) = rebalance else {
            return;
        };
        let tps = partitions(tpl);
        let shared = &self.shared;
        {
            let mut offsets = shared.offsets();
            for tp in &tps {
                offsets.assign(tp.clone());
            }
            shared
                .metrics
                .assigned_partitions
                .set(offsets.assigned().len() as i64);
        }
        if shared.paused.load(AtomicOrdering::SeqCst) {
            if let Err(e) = consumer.pause(tpl) {
                tracing::warn!(error = %e, "pausing newly assigned partitions");
            }
        }
        shared.connected(true);
        tracing::info!(partitions = ?tps, "partitions assigned");
    }

    fn commit_callback(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        if let Err(e) = result {
            tracing::warn!(error = %e, "commit not accepted; retried with the next batch");
            let mut tracked = self.shared.offsets();
            for e in offsets.elements() {
                if let Offset::Offset(o) = e.offset() {
                    tracked.commit_failed(&TopicPartition::new(e.topic(), e.partition()), o);
                }
            }
        }
    }
}

/// Which records must not be delivered at the same time.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Lane {
    Partition(TopicPartition),
    Key(String),
}

/// Hands records to tasks; shared by the poll thread and the tasks.
struct Dispatch {
    runtime: Handle,
    engine: Arc<Engine>,
    store: Arc<dyn KeyStore>,
    flow: Flow,
    producer: KafkaDeadLetters,
    shared: Arc<Shared>,
    kafka: KafkaConfig,
    config: Arc<Config>,
    /// One permit per record in flight (`maxInFlight`).
    slots: Arc<Semaphore>,
    /// Per lane, the completion of the last record given to it.
    lanes: Mutex<HashMap<Lane, oneshot::Receiver<()>>>,
    in_flight: AtomicUsize,
    drained: Notify,
    settled_since_commit: AtomicU64,
    /// Records waiting for the store / the application to come back.
    store_waiters: AtomicUsize,
    app_waiters: AtomicUsize,
    /// Shutdown: take no more records.
    stop_taking: AtomicBool,
    /// Shutdown: in-flight work is over, leave.
    stop: AtomicBool,
    /// Cancelled on shutdown: back-offs and waits end early.
    work: CancellationToken,
}

/// One record, as taken from the consumer.
struct Record {
    tp: TopicPartition,
    generation: u64,
    offset: i64,
    key: Option<Vec<u8>>,
    headers: Vec<(String, Option<Vec<u8>>)>,
    envelope: Envelope,
}

/// The poll thread: takes records while slots are free, serves group events,
/// commits in batches, pauses and resumes.
fn poll_loop(consumer: &BaseConsumer<KafkaContext>, d: &Arc<Dispatch>) {
    let commit_every = u64::from(d.kafka.max_in_flight);
    let mut last_commit = Instant::now();
    let mut starved_since: Option<Instant> = None;
    let mut starved = false;
    let mut paused = false;
    // No record came in the last poll.
    let mut idle = false;
    while !d.stop.load(AtomicOrdering::SeqCst) {
        let settled = d.settled_since_commit.load(AtomicOrdering::Relaxed);
        // Idle with everything settled: commit now rather than at the next
        // interval, so that what a drained backlog settled is committed at once.
        let all_settled = idle && settled > 0 && d.in_flight.load(AtomicOrdering::SeqCst) == 0;
        if last_commit.elapsed() >= d.kafka.commit_interval
            || settled >= commit_every
            || all_settled
        {
            d.settled_since_commit.store(0, AtomicOrdering::Relaxed);
            commit(consumer, &d.shared, None, CommitMode::Async);
            last_commit = Instant::now();
        }
        let stopping = d.stop_taking.load(AtomicOrdering::SeqCst);
        let unavailable = d.store_waiters.load(AtomicOrdering::SeqCst) > 0
            || d.app_waiters.load(AtomicOrdering::SeqCst) > 0;
        let want_paused = stopping || unavailable || starved;
        if want_paused != paused {
            set_paused(consumer, &d.shared, want_paused, stopping, unavailable);
            paused = want_paused;
        }
        let slots = if stopping || unavailable {
            None
        } else {
            d.free_slots()
        };
        match slots {
            Some(slots) => {
                starved_since = None;
                starved = false;
                idle = !d.take_batch(consumer, slots);
            }
            None => {
                if !stopping && !unavailable {
                    let since = *starved_since.get_or_insert_with(Instant::now);
                    starved = since.elapsed() >= STARVED_AFTER;
                }
                if paused {
                    // Paused: only group events come; serve them.
                    match consumer.poll(POLL) {
                        Some(Ok(message)) if !stopping => {
                            d.start(d.take(&message, None).into_iter().collect())
                        }
                        Some(Ok(_)) => {}
                        Some(Err(e)) => poll_error(&d.shared, &e),
                        None => {}
                    }
                }
            }
        }
    }
}

fn poll_error(shared: &Shared, e: &KafkaError) {
    tracing::warn!(error = %e, "kafka consumer error");
    if matches!(
        e.rdkafka_error_code(),
        Some(RDKafkaErrorCode::AllBrokersDown)
    ) {
        shared.connected(false);
    }
}

fn set_paused(
    consumer: &BaseConsumer<KafkaContext>,
    shared: &Shared,
    pause: bool,
    stopping: bool,
    unavailable: bool,
) {
    shared.paused.store(pause, AtomicOrdering::SeqCst);
    let assignment = match consumer.assignment() {
        Ok(a) => a,
        Err(e) => {
            tracing::warn!(error = %e, "reading the assignment");
            return;
        }
    };
    let result = if pause {
        consumer.pause(&assignment)
    } else {
        consumer.resume(&assignment)
    };
    match result {
        Ok(()) if unavailable && !stopping => {
            if pause {
                tracing::warn!(partitions = assignment.count(), "store or application unavailable: partitions paused (the member stays in its group)");
            }
        }
        Ok(()) => tracing::debug!(
            pause,
            partitions = assignment.count(),
            "partitions paused or resumed"
        ),
        Err(e) => tracing::warn!(error = %e, pause, "pausing or resuming partitions"),
    }
    if !pause {
        tracing::debug!("partitions resumed");
    }
}

/// A record taken from the consumer, with what it holds until it is settled.
struct Taken {
    record: Record,
    slot: Option<OwnedSemaphorePermit>,
    permit: crate::flow::Permit,
    wait_for: Option<oneshot::Receiver<()>>,
    done: Option<oneshot::Sender<()>>,
}

impl Dispatch {
    /// Free slots within the in-flight limit and the byte budget: all that
    /// are free now, or else (waiting a short while) a batch of them, so that
    /// the poll thread wakes once per batch of settled records and not once
    /// per record. None when there are none yet.
    fn free_slots(&self) -> Option<OwnedSemaphorePermit> {
        let free = self.slots.available_permits();
        if free > 0 && self.ready_now() {
            if let Ok(permits) = self.slots.clone().try_acquire_many_owned(free as u32) {
                return Some(permits);
            }
        }
        let batch = (self.kafka.max_in_flight / SLOT_BATCH).max(1);
        self.runtime.block_on(async {
            tokio::time::timeout(POLL, async {
                let permits = self.slots.clone().acquire_many_owned(batch).await.ok()?;
                self.flow.ready(&self.work).await.then_some(permits)
            })
            .await
            .ok()
            .flatten()
        })
    }

    /// The byte budget and the application let one more record in now.
    fn ready_now(&self) -> bool {
        self.flow.ready(&self.work).now_or_never() == Some(true)
    }

    /// Takes what the consumer holds, one record per slot of `slots` (and
    /// within the byte budget), and starts their tasks together; waits at
    /// most [`POLL`] for the first. False when no record came.
    fn take_batch(
        self: &Arc<Self>,
        consumer: &BaseConsumer<KafkaContext>,
        mut slots: OwnedSemaphorePermit,
    ) -> bool {
        let mut batch = Vec::with_capacity(slots.num_permits());
        let mut timeout = POLL;
        let mut came = false;
        while let Some(slot) = slots.split(1) {
            match consumer.poll(timeout) {
                Some(Ok(message)) => {
                    came = true;
                    batch.extend(self.take(&message, Some(slot)));
                }
                Some(Err(e)) => {
                    poll_error(&self.shared, &e);
                    break;
                }
                None => break,
            }
            // Only what librdkafka already holds: no waiting after the first.
            timeout = Duration::ZERO;
            if !self.ready_now() {
                break;
            }
        }
        self.start(batch);
        came
    }

    /// Takes one record: its offset, its bytes and its ordering lane. None
    /// when its partition was revoked since it was fetched.
    fn take(
        &self,
        message: &BorrowedMessage<'_>,
        slot: Option<OwnedSemaphorePermit>,
    ) -> Option<Taken> {
        let tp = TopicPartition::new(message.topic(), message.partition());
        let offset = message.offset();
        let generation = {
            let mut offsets = self.shared.offsets();
            // Revoked since it was fetched: the next owner takes it.
            let generation = offsets.generation(&tp)?;
            offsets.taken(&tp, offset);
            generation
        };
        let record = record(message, tp, generation);
        let permit = self.flow.take(record.envelope.body.len());
        let (wait_for, done) = self.lane(&record);
        self.in_flight.fetch_add(1, AtomicOrdering::SeqCst);
        self.shared.metrics.in_flight.inc();
        Some(Taken {
            record,
            slot,
            permit,
            wait_for,
            done,
        })
    }

    /// Starts the tasks of taken records, in their order, with one hand-over
    /// to the runtime for the whole batch.
    fn start(self: &Arc<Self>, batch: Vec<Taken>) {
        if batch.is_empty() {
            return;
        }
        let d = self.clone();
        self.runtime.spawn(async move {
            for taken in batch {
                tokio::spawn(Box::pin(d.clone().settle(taken)));
            }
        });
    }

    /// A record's task: waits for its lane, decides it, and releases what it
    /// held.
    async fn settle(self: Arc<Self>, taken: Taken) {
        let Taken {
            record,
            slot,
            permit,
            wait_for,
            done,
        } = taken;
        let started = Instant::now();
        if let Some(previous) = wait_for {
            let _ = previous.await;
        }
        if self.decide(&record).await {
            self.shared
                .offsets()
                .settled(&record.tp, record.generation, record.offset);
            self.settled_since_commit
                .fetch_add(1, AtomicOrdering::Relaxed);
        }
        drop((slot, permit));
        if let Some(done) = done {
            let _ = done.send(());
        }
        self.shared.metrics.in_flight.dec();
        self.shared
            .metrics
            .end_to_end_duration
            .observe(started.elapsed().as_secs_f64());
        if self.in_flight.fetch_sub(1, AtomicOrdering::SeqCst) == 1 {
            self.drained.notify_waiters();
        }
    }

    /// The record's place in its ordering lane: what to wait for, and what
    /// to signal when settled.
    fn lane(
        &self,
        record: &Record,
    ) -> (Option<oneshot::Receiver<()>>, Option<oneshot::Sender<()>>) {
        let lane = match self.kafka.ordering {
            Ordering::None => return (None, None),
            Ordering::PerPartition => Lane::Partition(record.tp.clone()),
            Ordering::PerKey => {
                let dedup = &self.config.dedup;
                match key::extract(&dedup.key, dedup.missing_key, &record.envelope) {
                    KeyDecision::Key(key) => Lane::Key(key),
                    // No key: keep such records in partition order.
                    _ => Lane::Partition(record.tp.clone()),
                }
            }
        };
        let (done, next) = oneshot::channel();
        let mut lanes = self.lanes.lock().unwrap_or_else(|e| e.into_inner());
        if lanes.len() > 2 * self.kafka.max_in_flight as usize {
            // Forget lanes whose last record has settled.
            lanes.retain(|_, rx| matches!(rx.try_recv(), Err(oneshot::error::TryRecvError::Empty)));
        }
        (lanes.insert(lane, next), Some(done))
    }

    /// Runs the engine until the record is settled (true), or shutdown
    /// leaves it unsettled (false: its offset is not committed).
    async fn decide(&self, record: &Record) -> bool {
        let metrics = &self.shared.metrics;
        let span = self.engine.trace(
            &record.envelope,
            traces::Origin {
                system: "kafka",
                destination: &record.tp.topic,
            },
        );
        let mut wait = InFlightWait::default();
        loop {
            if self.stop.load(AtomicOrdering::SeqCst) {
                return false;
            }
            let verdict = self
                .engine
                .handle(&record.envelope, &span, &self.work)
                .await;
            match verdict {
                Verdict::Ack => {
                    metrics.message("delivered");
                    let _settled = span.settlement(&verdict);
                    return true;
                }
                Verdict::Duplicate => {
                    metrics.message("duplicate");
                    let _settled = span.settlement(&verdict);
                    return true;
                }
                Verdict::Requeue { delay } => {
                    if self.work.is_cancelled() {
                        return false;
                    }
                    metrics.message("in_flight_requeued");
                    if !wait.sleep(delay, &self.work).await {
                        return false;
                    }
                }
                Verdict::StoreUnavailable => {
                    self.store_waiters.fetch_add(1, AtomicOrdering::SeqCst);
                    let back = self.until_store_answers().await;
                    self.store_waiters.fetch_sub(1, AtomicOrdering::SeqCst);
                    if !back {
                        return false;
                    }
                }
                Verdict::AppUnavailable => {
                    self.app_waiters.fetch_add(1, AtomicOrdering::SeqCst);
                    let back = self.flow.until_available(&self.work).await;
                    self.app_waiters.fetch_sub(1, AtomicOrdering::SeqCst);
                    if !back {
                        return false;
                    }
                }
                Verdict::DeadLetter { reason, attempts } => {
                    let _settling = span.settlement(&verdict);
                    return self.dead_letter(record, reason, attempts).await;
                }
            }
        }
    }

    /// Sleeps `delay`; false when shutdown came first.
    async fn pause_for(&self, delay: Duration) -> bool {
        tokio::select! {
            _ = self.work.cancelled() => false,
            _ = tokio::time::sleep(delay) => true,
        }
    }

    async fn until_store_answers(&self) -> bool {
        loop {
            if self.store.ping().await.is_ok() {
                return true;
            }
            if !self.pause_for(STORE_POLL).await {
                return false;
            }
        }
    }

    /// Publishes the record to its dead-letter topic and waits for the
    /// brokers to have it; retried until they do (or shutdown).
    async fn dead_letter(&self, record: &Record, reason: DeadLetterReason, attempts: u32) -> bool {
        let topic = self
            .kafka
            .dead_letter_topic
            .clone()
            .unwrap_or_else(|| format!("{}.dead", record.tp.topic));
        let mut try_ = 0;
        loop {
            try_ += 1;
            let partition = record.tp.partition.to_string();
            let offset = record.offset.to_string();
            let headers = publish::kafka_dead_letter_headers(
                record
                    .headers
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_deref())),
                reason.as_str(),
                attempts,
                &[
                    ("x-idemq-original-topic", record.tp.topic.as_str()),
                    ("x-idemq-original-partition", partition.as_str()),
                    ("x-idemq-original-offset", offset.as_str()),
                ],
            );
            let sent = self
                .producer
                .send(
                    &topic,
                    record.key.as_deref(),
                    &record.envelope.body,
                    headers,
                )
                .await;
            match sent {
                Ok(_) => {
                    tracing::info!(reason = reason.as_str(), attempts, topic = %topic, "dead-lettered");
                    self.shared.metrics.dead_letter(reason.as_str());
                    return true;
                }
                Err(e) => {
                    // Never settle a record whose dead letter is not written.
                    tracing::warn!(error = %e, topic = %topic, "dead letter not acknowledged: trying again");
                    let delay = crate::engine::backoff(
                        Duration::from_millis(200),
                        Duration::from_secs(10),
                        try_,
                    );
                    if !self.pause_for(delay).await {
                        return false;
                    }
                }
            }
        }
    }
}

/// Copies what the engine and a dead letter need out of a message.
fn record(message: &BorrowedMessage<'_>, tp: TopicPartition, generation: u64) -> Record {
    let mut headers = Vec::new();
    let mut text_headers = Vec::new();
    if let Some(h) = message.headers() {
        for header in h.iter() {
            let value = header.value.map(<[u8]>::to_vec);
            if let Some(text) = header.value.and_then(|v| std::str::from_utf8(v).ok()) {
                text_headers.push((header.key.to_string(), text.to_string()));
            }
            headers.push((header.key.to_string(), value));
        }
    }
    let key = message.key().map(<[u8]>::to_vec);
    let record_key = key.as_ref().map(|k| match std::str::from_utf8(k) {
        Ok(text) => text.to_string(),
        // A binary key keys by its hex form, so distinct keys stay distinct.
        Err(_) => hex::encode(k),
    });
    let content_type = text_headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-type"))
        .map(|(_, v)| v.clone());
    let offset = message.offset();
    Record {
        envelope: Envelope {
            message_id: None,
            headers: text_headers,
            content_type,
            body: Bytes::copy_from_slice(message.payload().unwrap_or_default()),
            redelivered: false,
            record_key,
            coordinates: Some(format!("{}/{}/{offset}", tp.topic, tp.partition)),
        },
        tp,
        generation,
        offset,
        key,
        headers,
    }
}
