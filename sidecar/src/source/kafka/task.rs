//! A record's task: waits for its ordering lane, runs the engine until the
//! record is settled (delivered, a duplicate, or dead-lettered), and releases
//! its slot.

use std::sync::atomic::Ordering as AtomicOrdering;
use std::sync::Arc;
use std::time::Duration;

use super::poll::{Record, Taken};
use super::Dispatch;
use crate::source::publish;
use crate::source::sessions::wait_for_store;
use crate::source::{DeadLetterReason, InFlightWait, Verdict};
use crate::traces;

impl Dispatch {
    /// A record's task: waits for its lane, decides it, and releases what it
    /// held.
    pub(super) async fn settle(self: Arc<Self>, taken: Taken) {
        let Taken {
            record,
            slot,
            permit,
            wait_for,
            done,
            in_flight,
        } = taken;
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
        drop(in_flight);
        if self.in_flight.fetch_sub(1, AtomicOrdering::SeqCst) == 1 {
            self.drained.notify_waiters();
        }
    }

    /// Runs the engine until the record is settled (true), or shutdown
    /// leaves it unsettled (false: its offset is not committed).
    async fn decide(&self, record: &Record) -> bool {
        let metrics = &self.common.metrics;
        let span = self.common.engine.trace(
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
                .common
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
                    let back = wait_for_store(self.common.store.as_ref(), &self.work).await;
                    self.store_waiters.fetch_sub(1, AtomicOrdering::SeqCst);
                    if !back {
                        return false;
                    }
                }
                Verdict::AppUnavailable => {
                    self.app_waiters.fetch_add(1, AtomicOrdering::SeqCst);
                    let back = self.common.flow.until_available(&self.work).await;
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
                    self.common.metrics.dead_letter(reason.as_str());
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
