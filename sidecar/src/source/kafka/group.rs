//! Group membership: the consumer's callbacks (rebalances, commits,
//! statistics, errors, logs) and the state they share with the poll thread
//! and the record tasks.

use std::sync::atomic::{AtomicBool, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::statistics::Statistics;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

use crate::health::Component;
use crate::metrics::{Metrics, PartitionLabels};
use crate::source::offsets::{Offsets, TopicPartition};

/// State shared by the poll thread, the rebalance callbacks and the record tasks.
pub(super) struct Shared {
    pub(super) offsets: Mutex<Offsets>,
    /// The assigned partitions are paused (new assignments get paused too).
    pub(super) paused: AtomicBool,
    /// Leaving: a revoke commits without waiting.
    pub(super) finishing: AtomicBool,
    pub(super) drain_timeout: Duration,
    pub(super) metrics: Arc<Metrics>,
    pub(super) health: Component,
}

impl Shared {
    pub(super) fn offsets(&self) -> MutexGuard<'_, Offsets> {
        self.offsets.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn connected(&self, up: bool) {
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
pub(super) fn commit(
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
pub(super) struct KafkaContext {
    pub(super) shared: Arc<Shared>,
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
