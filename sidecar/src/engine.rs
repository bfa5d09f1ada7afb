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
//!
//! Only failures specific to the message count as attempts. A failure that
//! may be the application's as a whole (a refused connection, a timeout, 429,
//! 502, 503, 504) goes to the circuit breaker ([`crate::app`]); when that
//! opens the circuit, the message is given back with
//! [`Verdict::AppUnavailable`], its claim released and no attempt counted.
//! And a failure counts only when it is the message's first, or when the
//! application processed another message since the message's previous
//! failure: a message failing alone while nothing else succeeds (a few
//! messages in flight during an outage) says nothing about the message, so it
//! is retried, backing off, without coming closer to the dead-letter queue.
//!
//! While a delivery is in flight its claim's lease is renewed every third of
//! the lease, so the lease runs out only when the holder is gone.
//!
//! A completion the store refuses is written again in the background, and
//! no claim is made until the store took it ([`crate::store::refused`]).
//!
//! Each claim, delivery attempt, completion and release is a step of the
//! message's span ([`crate::traces`]), which the source starts and settles.

use std::future::Future;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::app::App;
use crate::config::{Config, UnavailablePolicy};
use crate::deliver::{Deliverer, Outcome};
use crate::key::{self, KeyDecision};
use crate::metrics::Metrics;
use crate::source::{DeadLetterReason, Envelope, Verdict};
use crate::store::{Claim, KeyStore, StoreError, Token, Transition};
use crate::traces::{MessageSpan, Origin, Step, Tracer};

/// An in-flight duplicate is requeued after at most this long, so the broker
/// retries it soon after the first holder settles, without spinning.
const MAX_REQUEUE_DELAY: Duration = Duration::from_millis(250);

pub struct Engine {
    config: Arc<Config>,
    store: Arc<dyn KeyStore>,
    deliverer: Deliverer,
    metrics: Arc<Metrics>,
    app: Arc<App>,
    tracer: Tracer,
}

impl Engine {
    pub fn new(
        config: Arc<Config>,
        store: Arc<dyn KeyStore>,
        deliverer: Deliverer,
        metrics: Arc<Metrics>,
        app: Arc<App>,
        tracer: Tracer,
    ) -> Self {
        Self {
            config,
            store,
            deliverer,
            metrics,
            app,
            tracer,
        }
    }

    /// Starts the span of a message that `origin` consumed; the source keeps
    /// it until the message is settled.
    pub fn trace(&self, message: &Envelope, origin: Origin<'_>) -> MessageSpan {
        self.tracer.message(message, origin)
    }

    /// Decides the fate of one message, recording its steps under `span`.
    /// Returns early with a requeue when `shutdown` fires during a back-off.
    pub async fn handle(
        &self,
        message: &Envelope,
        span: &MessageSpan,
        shutdown: &CancellationToken,
    ) -> Verdict {
        let dedup = &self.config.dedup;
        let key = match key::extract(&dedup.key, dedup.missing_key, message) {
            KeyDecision::Key(key) => key,
            KeyDecision::DeadLetter => {
                return Verdict::DeadLetter {
                    reason: DeadLetterReason::MissingKey,
                    attempts: 0,
                }
            }
            KeyDecision::PassThrough => {
                return self.deliver_unchecked(message, span, shutdown).await
            }
        };
        span.key(&key);
        let fingerprint = dedup.fingerprint.then(|| key::body_hash(&message.body));
        let identity = identity(key.as_bytes());
        let mut counted = Counted::default();
        let mut attempt = 0;
        loop {
            attempt += 1;
            if !self.app.state().takes_messages() {
                return Verdict::AppUnavailable;
            }
            let mut step = span.step("claim");
            let claimed = self
                .store
                .claim(&key, fingerprint.as_deref(), dedup.lease, dedup.retention)
                .await;
            step.set("idemq.claim.result", claim_result(&claimed));
            if let Err(e) = &claimed {
                step.fail(e);
            }
            drop(step);
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
                // An unacknowledged reset is not an outage: delivering
                // unchecked is exactly what failClosed on a reset forbids.
                Err(e @ StoreError::ResetUnacknowledged { .. }) => {
                    tracing::warn!(error = %e, "message goes back to the broker");
                    return Verdict::StoreUnavailable;
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
                            self.deliver_unchecked(message, span, shutdown).await
                        }
                    }
                }
            };
            let mut step = span.delivery(attempt);
            let headers = step.trace_headers();
            let delivery = self
                .deliverer
                .deliver(message, Some(&key), attempt, headers.as_ref());
            let (outcome, took) = self.renewing(&key, &token, delivery).await;
            self.metrics.app_duration.observe(took.as_secs_f64());
            delivered(&mut step, &outcome);
            drop(step);
            match outcome {
                Outcome::Success => {
                    self.app.succeeded();
                    self.complete(&key, &token, span).await;
                    return Verdict::Ack;
                }
                Outcome::Poison(status) => {
                    tracing::warn!(
                        status,
                        attempt,
                        "application refused the message: dead-lettering it"
                    );
                    self.release(&key, &token, span).await;
                    return Verdict::DeadLetter {
                        reason: DeadLetterReason::Poison,
                        attempts: attempt,
                    };
                }
                Outcome::AppFailure { refused, why } => {
                    self.release(&key, &token, span).await;
                    if self.app.failed(identity, refused, &why) {
                        return Verdict::AppUnavailable;
                    }
                    if let Some(verdict) = self
                        .after_failure(attempt, &mut counted, &why, shutdown)
                        .await
                    {
                        return verdict;
                    }
                }
                Outcome::Retry(why) => {
                    self.release(&key, &token, span).await;
                    if let Some(verdict) = self
                        .after_failure(attempt, &mut counted, &why, shutdown)
                        .await
                    {
                        return verdict;
                    }
                }
            }
        }
    }

    /// After a failed delivery: dead-letters when `maxAttempts` failures
    /// counted, otherwise backs off. None: try again.
    async fn after_failure(
        &self,
        attempt: u32,
        counted: &mut Counted,
        why: &str,
        shutdown: &CancellationToken,
    ) -> Option<Verdict> {
        if counted.failure(self.app.successes()) >= self.config.dedup.max_attempts {
            tracing::warn!(
                attempt,
                why,
                "delivery failed on every attempt: dead-lettering it"
            );
            return Some(Verdict::DeadLetter {
                reason: DeadLetterReason::MaxAttempts,
                attempts: attempt,
            });
        }
        tracing::debug!(attempt, why, "delivery failed: will retry");
        self.metrics.message("retried");
        self.back_off(attempt, shutdown).await
    }

    /// Runs a delivery while renewing its claim's lease every third of it.
    /// A renewal refused as stale means another holder may have the key now:
    /// that is logged and counted, and the delivery goes on (its completion
    /// is then refused as stale too).
    async fn renewing<T>(&self, key: &str, token: &Token, delivery: impl Future<Output = T>) -> T {
        let lease = self.config.dedup.lease;
        let renewals = async {
            loop {
                tokio::time::sleep(lease / 3).await;
                match self.store.renew(key, token, lease).await {
                    Ok(Transition::Done) => self.metrics.renewal("renewed"),
                    Ok(Transition::Stale) => {
                        self.metrics.renewal("lost");
                        tracing::warn!("this delivery lost its claim: the lease ran out before a renewal reached the store; another delivery of the same key may run beside it");
                        return;
                    }
                    Err(e) => {
                        self.metrics.renewal("error");
                        tracing::warn!(error = %e, "renewing the claim's lease failed; trying again at the next third of the lease");
                    }
                }
            }
        };
        tokio::pin!(delivery);
        tokio::select! {
            biased;
            out = &mut delivery => out,
            () = renewals => delivery.await,
        }
    }

    /// Delivers without a claim (pass-through), with the same retries.
    async fn deliver_unchecked(
        &self,
        message: &Envelope,
        span: &MessageSpan,
        shutdown: &CancellationToken,
    ) -> Verdict {
        let identity = identity(&message.body);
        let mut counted = Counted::default();
        let mut attempt = 0;
        loop {
            attempt += 1;
            if !self.app.state().takes_messages() {
                return Verdict::AppUnavailable;
            }
            if attempt == 1 {
                self.metrics.message("passed_through");
            }
            let mut step = span.delivery(attempt);
            step.set("idemq.passed_through", true);
            let headers = step.trace_headers();
            let (outcome, took) = self
                .deliverer
                .deliver(message, None, attempt, headers.as_ref())
                .await;
            self.metrics.app_duration.observe(took.as_secs_f64());
            delivered(&mut step, &outcome);
            drop(step);
            let why = match outcome {
                Outcome::Success => {
                    self.app.succeeded();
                    return Verdict::Ack;
                }
                Outcome::Poison(_) => {
                    return Verdict::DeadLetter {
                        reason: DeadLetterReason::Poison,
                        attempts: attempt,
                    }
                }
                Outcome::AppFailure { refused, why } => {
                    if self.app.failed(identity, refused, &why) {
                        return Verdict::AppUnavailable;
                    }
                    why
                }
                Outcome::Retry(why) => why,
            };
            if let Some(verdict) = self
                .after_failure(attempt, &mut counted, &why, shutdown)
                .await
            {
                return verdict;
            }
        }
    }

    /// Records a completion. The application has processed the message, so
    /// it is acked whatever happens here (requeueing it would process it
    /// again for certain); a completion the store refuses is kept and written
    /// again until it takes it, and claims wait meanwhile (the store wrapper
    /// [`crate::store::refused`] does both).
    async fn complete(&self, key: &str, token: &Token, span: &MessageSpan) {
        let mut step = span.step("complete");
        match self
            .store
            .complete(key, token, self.config.dedup.retention)
            .await
        {
            Ok(Transition::Done) => {}
            Ok(Transition::Stale) => {
                step.fail("stale: another holder took the key");
                tracing::warn!("the lease expired during delivery and another holder took the key; raise dedup.lease above the application's processing time");
            }
            Err(e @ StoreError::Unreplicated { .. }) => {
                // The primary holds it; trying again would find it done.
                step.fail(&e);
                tracing::warn!(error = %e, "the completion is recorded on the primary only");
            }
            Err(e) => {
                step.fail(&e);
                tracing::warn!(error = %e, "the store refused the completion: acking the message; the completion is written again until the store takes it, and nothing is claimed meanwhile");
            }
        }
    }

    async fn release(&self, key: &str, token: &Token, span: &MessageSpan) {
        let mut step = span.step("release");
        // A failed release only delays the next attempt until the lease ends.
        if let Err(e) = self.store.release(key, token).await {
            step.fail(&e);
            tracing::warn!(error = %e, "releasing the claim failed; it frees itself when the lease ends");
        }
    }

    /// Sleeps the back-off of `attempt`. Cut short by shutdown (the message
    /// is requeued) or by the circuit opening (given back uncounted).
    async fn back_off(&self, attempt: u32, shutdown: &CancellationToken) -> Option<Verdict> {
        let delivery = self.config.delivery.as_ref()?;
        let delay = backoff(delivery.initial_backoff, delivery.max_backoff, attempt);
        let mut states = self.app.subscribe();
        tokio::select! {
            _ = shutdown.cancelled() => Some(Verdict::Requeue {
                delay: Duration::ZERO,
            }),
            Ok(_) = states.wait_for(|s| !s.takes_messages()) => Some(Verdict::AppUnavailable),
            _ = tokio::time::sleep(delay) => None,
        }
    }
}

/// `idemq.claim.result`: the store's answer to a claim, the dedup decision.
fn claim_result(claimed: &Result<Claim, StoreError>) -> &'static str {
    match claimed {
        Ok(Claim::Acquired { .. }) => "acquired",
        Ok(Claim::Completed) => "completed",
        Ok(Claim::InFlight { .. }) => "in_flight",
        Ok(Claim::Conflict) => "conflict",
        Err(_) => "error",
    }
}

/// Records a delivery's result on its step.
fn delivered(step: &mut Step, outcome: &Outcome) {
    step.set("idemq.delivery.result", outcome.as_str());
    match outcome {
        Outcome::Success => {}
        Outcome::Poison(status) => step.fail(format!("status {status}")),
        Outcome::Retry(why) | Outcome::AppFailure { why, .. } => step.fail(why),
    }
}

/// The failures of one message that count as attempts.
#[derive(Debug, Default)]
struct Counted {
    failures: u32,
    /// The application's successes at the message's previous failure.
    successes_then: Option<u64>,
}

impl Counted {
    /// Records a failure when the application has had `successes` in all;
    /// returns the failures that count. The first failure counts; a later one
    /// only if another message succeeded since the previous failure.
    fn failure(&mut self, successes: u64) -> u32 {
        if self.successes_then.is_none_or(|then| successes > then) {
            self.failures += 1;
        }
        self.successes_then = Some(successes);
        self.failures
    }
}

/// A message's identity for the circuit breaker's count of distinct messages.
fn identity(bytes: &[u8]) -> u64 {
    let mut hasher = DefaultHasher::new();
    bytes.hash(&mut hasher);
    hasher.finish()
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
    fn a_failure_counts_only_if_another_message_succeeded_since_the_previous_one() {
        let mut counted = Counted::default();
        assert_eq!(counted.failure(10), 1, "the first failure counts");
        assert_eq!(counted.failure(10), 1, "nothing else succeeded meanwhile");
        assert_eq!(counted.failure(10), 1);
        assert_eq!(counted.failure(11), 2, "another message succeeded");
        assert_eq!(counted.failure(11), 2);
        assert_eq!(counted.failure(15), 3);
    }

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
