//! The dedup decision for one message, whatever broker it came from:
//! claim its key → deliver it to the application → complete or release the
//! claim, and say what the broker must do with it (a [`Verdict`]).
//!
//! Retries happen here, in-process: after a retryable failure the claim is
//! released (so a crash during the back-off does not block the key for a whole
//! lease), the engine waits, then claims again and re-delivers. Only after
//! `maxAttempts` deliveries is the message dead-lettered. The attempt number is
//! counted by this process; a message redelivered by the broker after a crash
//! starts counting again, so `Idemq-Delivery-Attempt` may restart at 1.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::{Config, UnavailablePolicy};
use crate::deliver::{Deliverer, Outcome};
use crate::key::{self, KeyDecision};
use crate::metrics::Metrics;
use crate::source::{DeadLetterReason, Envelope, Verdict};
use crate::store::{Claim, KeyStore, Token, Transition};

/// An in-flight duplicate is requeued after at most this long, so the broker
/// retries it soon after the first holder settles, without spinning.
const MAX_REQUEUE_DELAY: Duration = Duration::from_millis(250);
/// Attempts to record a completion before giving up on recording it.
const COMPLETE_TRIES: u32 = 3;

pub struct Engine {
    config: Arc<Config>,
    store: Arc<dyn KeyStore>,
    deliverer: Deliverer,
    metrics: Arc<Metrics>,
}

impl Engine {
    pub fn new(
        config: Arc<Config>,
        store: Arc<dyn KeyStore>,
        deliverer: Deliverer,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            config,
            store,
            deliverer,
            metrics,
        }
    }

    /// Decides the fate of one message. Returns early with a requeue when
    /// `shutdown` fires during a back-off.
    pub async fn handle(&self, message: &Envelope, shutdown: &CancellationToken) -> Verdict {
        let dedup = &self.config.dedup;
        let key = match key::extract(&dedup.key, dedup.missing_key, message) {
            KeyDecision::Key(key) => key,
            KeyDecision::DeadLetter => {
                return Verdict::DeadLetter {
                    reason: DeadLetterReason::MissingKey,
                    attempts: 0,
                }
            }
            KeyDecision::PassThrough => return self.deliver_unchecked(message, shutdown).await,
        };
        let fingerprint = dedup.fingerprint.then(|| key::body_hash(&message.body));
        let mut attempt = 0;
        loop {
            attempt += 1;
            let claimed = self
                .store
                .claim(&key, fingerprint.as_deref(), dedup.lease, dedup.retention)
                .await;
            let token = match claimed {
                Ok(Claim::Acquired { token }) => token,
                Ok(Claim::Completed) => return Verdict::Duplicate,
                Ok(Claim::InFlight { retry_after }) => {
                    return Verdict::Requeue {
                        delay: retry_after.min(MAX_REQUEUE_DELAY),
                    }
                }
                Ok(Claim::Conflict) => {
                    return Verdict::DeadLetter {
                        reason: DeadLetterReason::Conflict,
                        attempts: attempt - 1,
                    }
                }
                Err(e) => {
                    return match self.config.store.unavailable {
                        UnavailablePolicy::FailClosed => {
                            tracing::warn!(error = %e, "key store unavailable: message goes back to the broker");
                            Verdict::StoreUnavailable
                        }
                        UnavailablePolicy::PassThrough => {
                            self.metrics.passthrough.inc();
                            tracing::error!(error = %e, "key store unavailable: delivering WITHOUT deduplication (store.unavailable=passThrough)");
                            self.deliver_unchecked(message, shutdown).await
                        }
                    }
                }
            };
            let (outcome, took) = self.deliverer.deliver(message, Some(&key), attempt).await;
            self.metrics.app_duration.observe(took.as_secs_f64());
            match outcome {
                Outcome::Success => {
                    self.complete(&key, &token).await;
                    return Verdict::Ack;
                }
                Outcome::Poison(status) => {
                    tracing::warn!(
                        status,
                        attempt,
                        "application refused the message: dead-lettering it"
                    );
                    self.release(&key, &token).await;
                    return Verdict::DeadLetter {
                        reason: DeadLetterReason::Poison,
                        attempts: attempt,
                    };
                }
                Outcome::Retry(why) => {
                    self.release(&key, &token).await;
                    if attempt >= dedup.max_attempts {
                        tracing::warn!(
                            attempt,
                            why,
                            "delivery failed on every attempt: dead-lettering it"
                        );
                        return Verdict::DeadLetter {
                            reason: DeadLetterReason::MaxAttempts,
                            attempts: attempt,
                        };
                    }
                    tracing::debug!(attempt, why, "delivery failed: will retry");
                    self.metrics.message("retried");
                    if !self.back_off(attempt, shutdown).await {
                        return Verdict::Requeue {
                            delay: Duration::ZERO,
                        };
                    }
                }
            }
        }
    }

    /// Delivers without a claim (pass-through), with the same retries.
    async fn deliver_unchecked(&self, message: &Envelope, shutdown: &CancellationToken) -> Verdict {
        self.metrics.message("passed_through");
        let mut attempt = 0;
        loop {
            attempt += 1;
            let (outcome, took) = self.deliverer.deliver(message, None, attempt).await;
            self.metrics.app_duration.observe(took.as_secs_f64());
            match outcome {
                Outcome::Success => return Verdict::Ack,
                Outcome::Poison(_) => {
                    return Verdict::DeadLetter {
                        reason: DeadLetterReason::Poison,
                        attempts: attempt,
                    }
                }
                Outcome::Retry(_) if attempt >= self.config.dedup.max_attempts => {
                    return Verdict::DeadLetter {
                        reason: DeadLetterReason::MaxAttempts,
                        attempts: attempt,
                    }
                }
                Outcome::Retry(_) => {
                    self.metrics.message("retried");
                    if !self.back_off(attempt, shutdown).await {
                        return Verdict::Requeue {
                            delay: Duration::ZERO,
                        };
                    }
                }
            }
        }
    }

    /// Records a completion. The application has processed the message, so
    /// it is acked whatever happens here: requeueing it would process it
    /// again for certain, while a completion that could not be recorded only
    /// leaves a later duplicate unstopped.
    async fn complete(&self, key: &str, token: &Token) {
        let retention = self.config.dedup.retention;
        for try_ in 1..=COMPLETE_TRIES {
            match self.store.complete(key, token, retention).await {
                Ok(Transition::Done) => return,
                Ok(Transition::Stale) => {
                    tracing::warn!("the lease expired during delivery and another holder took the key; raise dedup.lease above the application's processing time");
                    return;
                }
                Err(e) if try_ < COMPLETE_TRIES => {
                    tracing::warn!(error = %e, "recording the completion failed: retrying");
                    tokio::time::sleep(Duration::from_millis(100 * u64::from(try_))).await;
                }
                Err(e) => {
                    tracing::error!(error = %e, "could not record the completion; a later duplicate of this message will not be stopped");
                }
            }
        }
    }

    async fn release(&self, key: &str, token: &Token) {
        // A failed release only delays the next attempt until the lease ends.
        if let Err(e) = self.store.release(key, token).await {
            tracing::warn!(error = %e, "releasing the claim failed; it frees itself when the lease ends");
        }
    }

    /// Sleeps the back-off of `attempt`; false when shutdown cut it short.
    async fn back_off(&self, attempt: u32, shutdown: &CancellationToken) -> bool {
        let Some(delivery) = &self.config.delivery else {
            return true;
        };
        let delay = backoff(delivery.initial_backoff, delivery.max_backoff, attempt);
        tokio::select! {
            _ = shutdown.cancelled() => false,
            _ = tokio::time::sleep(delay) => true,
        }
    }
}

/// Exponential back-off: `initial × 2^(attempt-1)`, capped at `max`.
pub fn backoff(initial: Duration, max: Duration, attempt: u32) -> Duration {
    let factor = 2u32.saturating_pow(attempt.saturating_sub(1));
    initial.saturating_mul(factor).min(max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let (initial, max) = (Duration::from_millis(200), Duration::from_secs(1));
        let delays: Vec<_> = (1..=5)
            .map(|a| backoff(initial, max, a).as_millis())
            .collect();
        assert_eq!(delays, [200, 400, 800, 1000, 1000]);
        assert_eq!(backoff(initial, max, 200), max);
    }
}
