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

mod group;
mod poll;
mod task;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::error::KafkaError;
use tokio::runtime::Handle;
use tokio::sync::{oneshot, Notify, Semaphore};
use tokio_util::sync::CancellationToken;

use self::group::{commit, KafkaContext, Shared};
use self::poll::{poll_loop, Lane};
use super::offsets::Offsets;
use super::publish::KafkaDeadLetters;
use super::Common;
use crate::config::{KafkaConfig, KafkaSecurity, OffsetReset, SaslMechanism, SecurityProtocol};

/// How soon librdkafka fetches again after finding its pre-fetch queue full.
const FETCH_QUEUE_BACKOFF_MS: u32 = 50;
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
    pub common: Common,
    /// The `broker.kafka` section of `config`.
    pub kafka: KafkaConfig,
    pub secrets: KafkaSecrets,
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
        if !self.common.flow.until_available(&shutdown).await {
            return Ok(());
        }
        let kafka = &self.kafka;
        let client_id = format!("idemq-sidecar {}", self.common.config.consumer);
        let shared = Arc::new(Shared {
            offsets: Mutex::new(Offsets::default()),
            paused: AtomicBool::new(false),
            finishing: AtomicBool::new(false),
            drain_timeout: self.common.config.shutdown_grace,
            metrics: self.common.metrics.clone(),
            health: self.common.health.clone(),
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
        for (key, value) in prefetch_settings(self.common.flow.budget()) {
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
            common: self.common.clone(),
            producer,
            shared: shared.clone(),
            kafka: kafka.clone(),
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
        let grace = self.common.config.shutdown_grace;
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
        self.common.health.set(false);
        self.common.metrics.broker_connected.set(0);
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

/// Hands records to tasks; shared by the poll thread and the tasks.
struct Dispatch {
    runtime: Handle,
    common: Common,
    producer: KafkaDeadLetters,
    /// What the rebalance callbacks share with the poll thread.
    shared: Arc<Shared>,
    kafka: KafkaConfig,
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
