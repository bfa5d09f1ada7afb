//! Settling a message with Pub/Sub: acks, nacks, deadlines held as a lease,
//! and dead letters.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gcloud_gax::grpc::{Code, Status};
use gcloud_googleapis::pubsub::v1::{ModifyAckDeadlineRequest, PubsubMessage};
use gcloud_pubsub::publisher::Publisher;
use gcloud_pubsub::subscriber::ReceivedMessage;
use gcloud_pubsub::subscription::Subscription;
use tokio_util::sync::CancellationToken;

use super::client::deadline_seconds;
use super::{ATTEMPTS, MESSAGE_ID, REASON, RPC_TIMEOUT, SUBSCRIPTION};
use crate::engine::{backoff, Engine};
use crate::metrics::{Metrics, OutcomeLabel};
use crate::source::{DeadLetterReason, Envelope, InFlightWait, Verdict};
use crate::traces::MessageSpan;

/// Ack ids in one `modifyAckDeadline`.
const MAX_ACK_IDS: usize = 1000;

/// Where dead letters go.
pub(super) enum DeadLetters {
    /// The subscription's dead-letter policy: Pub/Sub moves a message after
    /// this many delivery attempts.
    Policy { max_attempts: i32 },
    /// `deadLetterTopic`: the sidecar publishes them.
    Topic(Publisher),
}

impl std::fmt::Display for DeadLetters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Policy { max_attempts } => write!(
                f,
                "the subscription's dead-letter policy (after {max_attempts} attempts)"
            ),
            Self::Topic(_) => write!(f, "published by the sidecar to deadLetterTopic"),
        }
    }
}

/// The ack ids held from receipt to settlement, whose deadlines are extended.
#[derive(Default)]
pub(super) struct Leases {
    held: Mutex<HashSet<String>>,
}

impl Leases {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }
    pub(super) fn hold(&self, ack_id: &str) {
        self.lock().insert(ack_id.to_string());
    }
    fn release(&self, ack_id: &str) {
        self.lock().remove(ack_id);
    }
    fn all(&self) -> Vec<String> {
        self.lock().iter().cloned().collect()
    }
    fn take_all(&self) -> Vec<String> {
        self.lock().drain().collect()
    }
}

/// Applies verdicts with Pub/Sub's acks, nacks and deadlines.
pub(super) struct Settler {
    pub(super) subscription: Subscription,
    pub(super) subscription_id: String,
    pub(super) leases: Leases,
    pub(super) dead_letters: DeadLetters,
    pub(super) initial_backoff: Duration,
    pub(super) max_backoff: Duration,
    pub(super) store_down: CancellationToken,
    pub(super) metrics: Arc<Metrics>,
}

impl Settler {
    /// The engine's verdict. A key in flight elsewhere is waited for here,
    /// the message still held (its deadline extended), instead of given back.
    pub(super) async fn decide(
        &self,
        engine: &Engine,
        envelope: &Envelope,
        span: &MessageSpan,
        shutdown: &CancellationToken,
    ) -> Verdict {
        let mut wait = InFlightWait::default();
        loop {
            match engine.handle(envelope, span, shutdown).await {
                Verdict::Requeue { delay } if !delay.is_zero() => {
                    self.metrics.message("in_flight_requeued");
                    if !wait.sleep(delay, shutdown).await {
                        return Verdict::Requeue {
                            delay: Duration::ZERO,
                        };
                    }
                }
                verdict => return verdict,
            }
        }
    }

    pub(super) async fn apply(
        &self,
        message: &ReceivedMessage,
        envelope: &Envelope,
        verdict: Verdict,
    ) {
        match verdict {
            Verdict::Ack => {
                self.metrics.message("delivered");
                self.ack(message).await;
            }
            Verdict::Duplicate => {
                self.metrics.message("duplicate");
                self.ack(message).await;
            }
            Verdict::Requeue { .. } | Verdict::AppUnavailable => {
                self.nack(message, Duration::ZERO).await;
            }
            Verdict::StoreUnavailable => {
                self.nack(message, Duration::ZERO).await;
                self.store_down.cancel();
            }
            Verdict::DeadLetter { reason, attempts } => {
                self.dead_letter(message, envelope, reason, attempts).await;
            }
        }
    }

    async fn dead_letter(
        &self,
        message: &ReceivedMessage,
        envelope: &Envelope,
        reason: DeadLetterReason,
        attempts: u32,
    ) {
        let attempt = message.delivery_attempt.unwrap_or(1);
        let publisher = match &self.dead_letters {
            DeadLetters::Policy { max_attempts } => {
                let last = i64::try_from(attempt).unwrap_or(i64::MAX) >= i64::from(*max_attempts);
                tracing::warn!(
                    reason = reason.as_str(),
                    attempt,
                    max_attempts,
                    "dead letter: the subscription's dead-letter policy moves it after its last attempt"
                );
                if last {
                    self.metrics.dead_letter(reason.as_str());
                }
                let delay = backoff(
                    self.initial_backoff,
                    self.max_backoff,
                    u32::try_from(attempt).unwrap_or(u32::MAX),
                );
                self.nack(message, if last { Duration::ZERO } else { delay })
                    .await;
                return;
            }
            DeadLetters::Topic(publisher) => publisher,
        };
        let mut attributes = message.message.attributes.clone();
        attributes.insert(REASON.into(), reason.as_str().into());
        attributes.insert(ATTEMPTS.into(), attempts.to_string());
        attributes.insert(SUBSCRIPTION.into(), self.subscription_id.clone());
        attributes.insert(MESSAGE_ID.into(), message.message.message_id.clone());
        let dead = PubsubMessage {
            data: envelope.body.to_vec(),
            attributes,
            ..PubsubMessage::default()
        };
        let stored = tokio::time::timeout(RPC_TIMEOUT, async {
            publisher.publish(dead).await.get().await
        })
        .await;
        match stored {
            Ok(Ok(_)) => {
                tracing::info!(reason = reason.as_str(), attempts, "dead-lettered");
                self.metrics.dead_letter(reason.as_str());
                self.ack(message).await;
            }
            failed => {
                // Never ack a message whose dead letter is not stored.
                let error = match failed {
                    Ok(Err(status)) => status.to_string(),
                    _ => format!("no answer within {RPC_TIMEOUT:?}"),
                };
                tracing::warn!(error, "dead letter not published (does deadLetterTopic exist?): the message goes back");
                let delay = backoff(self.initial_backoff, self.max_backoff, attempts.max(1));
                self.nack(message, delay).await;
            }
        }
    }

    /// Acks a settled message. A failed ack loses nothing: Pub/Sub delivers
    /// the message again, and the store, which holds its outcome, makes that
    /// delivery a duplicate.
    async fn ack(&self, message: &ReceivedMessage) {
        self.leases.release(&message.ack_id);
        let failure = match tokio::time::timeout(RPC_TIMEOUT, message.ack()).await {
            Ok(Ok(())) => return,
            Ok(Err(status)) => ack_failure(&status),
            Err(_) => "failed",
        };
        self.metrics
            .broker_ack_failures
            .get_or_create(&OutcomeLabel { outcome: failure })
            .inc();
        tracing::warn!(
            outcome = failure,
            message_id = %message.message.message_id,
            "Pub/Sub did not take the ack: it delivers the message again, and the store makes that delivery a duplicate"
        );
    }

    /// Gives a message back: Pub/Sub delivers it again after `delay`
    /// (whole seconds; at once when zero).
    async fn nack(&self, message: &ReceivedMessage, delay: Duration) {
        self.leases.release(&message.ack_id);
        let seconds = deadline_seconds(delay);
        let error =
            match tokio::time::timeout(RPC_TIMEOUT, message.modify_ack_deadline(seconds)).await {
                Ok(Ok(())) => return,
                Ok(Err(status)) => status.to_string(),
                Err(_) => format!("no answer within {RPC_TIMEOUT:?}"),
            };
        tracing::debug!(
            error,
            "nack failed: the message comes back when its deadline passes"
        );
    }

    /// Gives back every message still held.
    pub(super) async fn nack_all(&self) {
        let held = self.leases.take_all();
        if held.is_empty() {
            return;
        }
        tracing::info!(messages = held.len(), "giving back the messages still held");
        if let Err(e) = self.modify(held, 0).await {
            tracing::warn!(error = %e, "nack failed: the messages come back when their deadlines pass");
        }
    }

    /// Every third of the deadline, extends the deadlines of the messages held.
    pub(super) async fn extend_leases(self: Arc<Self>, deadline: i32) {
        let every = Duration::from_secs(u64::try_from(deadline).unwrap_or(10)) / 3;
        loop {
            tokio::time::sleep(every).await;
            let held = self.leases.all();
            if held.is_empty() {
                continue;
            }
            let count = held.len() as u64;
            let outcome = match self.modify(held, deadline).await {
                Ok(()) => "extended",
                Err(e) => {
                    tracing::warn!(error = %e, "extending ack deadlines failed: messages whose deadline passes are delivered again, and the store decides again");
                    "failed"
                }
            };
            self.metrics
                .broker_lease_extensions
                .get_or_create(&OutcomeLabel { outcome })
                .inc_by(count);
        }
    }

    /// One `modifyAckDeadline` per `MAX_ACK_IDS` ack ids.
    async fn modify(&self, ack_ids: Vec<String>, seconds: i32) -> Result<(), String> {
        let client = self.subscription.get_client();
        let mut failed = None;
        for chunk in ack_ids.chunks(MAX_ACK_IDS) {
            let request = ModifyAckDeadlineRequest {
                subscription: self.subscription.fully_qualified_name().to_string(),
                ack_ids: chunk.to_vec(),
                ack_deadline_seconds: seconds,
            };
            match tokio::time::timeout(RPC_TIMEOUT, client.modify_ack_deadline(request, None)).await
            {
                Ok(Ok(_)) => {}
                Ok(Err(status)) => failed = Some(status.to_string()),
                Err(_) => failed = Some(format!("no answer within {RPC_TIMEOUT:?}")),
            }
        }
        failed.map_or(Ok(()), Err)
    }
}

/// Why an ack failed: `expired` when Pub/Sub refused the ack id (an
/// exactly-once subscription says so when the deadline had passed or the
/// message was delivered again), `failed` otherwise.
fn ack_failure(status: &Status) -> &'static str {
    match status.code() {
        Code::InvalidArgument | Code::FailedPrecondition => "expired",
        _ => "failed",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_ack_id_is_told_from_a_failure_to_answer() {
        assert_eq!(
            ack_failure(&Status::new(Code::InvalidArgument, "")),
            "expired"
        );
        assert_eq!(
            ack_failure(&Status::new(Code::FailedPrecondition, "")),
            "expired"
        );
        assert_eq!(ack_failure(&Status::new(Code::Unavailable, "")), "failed");
    }
}
