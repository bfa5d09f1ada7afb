//! The poll thread: takes records while in-flight slots are free, serves the
//! group's events, commits in batches, pauses and resumes the partitions.

use std::sync::atomic::Ordering as AtomicOrdering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::FutureExt;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Headers};
use rdkafka::Message;
use tokio::sync::{oneshot, OwnedSemaphorePermit};

use super::group::{commit, KafkaContext, Shared};
use super::Dispatch;
use crate::config::Ordering;
use crate::key::{self, KeyDecision};
use crate::source::offsets::TopicPartition;
use crate::source::Envelope;

/// How long the poll thread waits in one call for a record or an event.
const POLL: Duration = Duration::from_millis(100);
/// When every in-flight slot is busy, the poll thread waits for
/// `maxInFlight / SLOT_BATCH` of them to be free before it takes records again.
const SLOT_BATCH: u32 = 8;
/// Every in-flight slot busy this long: pause the partitions and keep polling.
const STARVED_AFTER: Duration = Duration::from_secs(1);

/// Which records must not be delivered at the same time.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) enum Lane {
    Partition(TopicPartition),
    Key(String),
}

/// One record, as taken from the consumer.
pub(super) struct Record {
    pub(super) tp: TopicPartition,
    pub(super) generation: u64,
    pub(super) offset: i64,
    pub(super) key: Option<Vec<u8>>,
    pub(super) headers: Vec<(String, Option<Vec<u8>>)>,
    pub(super) envelope: Envelope,
}

/// A record taken from the consumer, with what it holds until it is settled.
pub(super) struct Taken {
    pub(super) record: Record,
    pub(super) slot: Option<OwnedSemaphorePermit>,
    pub(super) permit: crate::flow::Permit,
    pub(super) wait_for: Option<oneshot::Receiver<()>>,
    pub(super) done: Option<oneshot::Sender<()>>,
    pub(super) in_flight: crate::metrics::InFlight,
}

/// The poll thread: takes records while slots are free, serves group events,
/// commits in batches, pauses and resumes.
pub(super) fn poll_loop(consumer: &BaseConsumer<KafkaContext>, d: &Arc<Dispatch>) {
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
                self.common.flow.ready(&self.work).await.then_some(permits)
            })
            .await
            .ok()
            .flatten()
        })
    }

    /// The byte budget and the application let one more record in now.
    fn ready_now(&self) -> bool {
        self.common.flow.ready(&self.work).now_or_never() == Some(true)
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
        let permit = self.common.flow.take(record.envelope.body.len());
        let (wait_for, done) = self.lane(&record);
        self.in_flight.fetch_add(1, AtomicOrdering::SeqCst);
        Some(Taken {
            record,
            slot,
            permit,
            wait_for,
            done,
            in_flight: self.common.metrics.received(),
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
                let dedup = &self.common.config.dedup;
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
