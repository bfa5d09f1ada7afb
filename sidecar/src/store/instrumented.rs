//! A key store wrapper that records every call's latency, outcome and error in
//! the metrics, so neither the claim API nor the pipeline repeats that.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{Claim, KeyStore, StoreError, Token, Transition};
use crate::metrics::{Metrics, OpLabel, OutcomeLabel, StoreErrorLabels};

pub struct Instrumented {
    inner: Arc<dyn KeyStore>,
    metrics: Arc<Metrics>,
    /// Resets of the inner store already counted in the metrics.
    resets_counted: AtomicU64,
}

impl Instrumented {
    pub fn new(inner: Arc<dyn KeyStore>, metrics: Arc<Metrics>) -> Self {
        Self {
            inner,
            metrics,
            resets_counted: AtomicU64::new(0),
        }
    }

    fn record<T>(&self, op: &'static str, started: Instant, result: &Result<T, StoreError>) {
        self.metrics
            .store_duration
            .get_or_create(&OpLabel { op })
            .observe(started.elapsed().as_secs_f64());
        if let Err(e) = result {
            let kind = match e {
                StoreError::Timeout { .. } => "timeout",
                StoreError::ResetUnacknowledged { .. } => "reset",
                StoreError::Unreplicated { .. } => "unreplicated",
                StoreError::CompletionsUnrecorded { .. } => "unrecorded",
                StoreError::Redis { .. } | StoreError::Protocol { .. } => "error",
            };
            self.metrics
                .store_errors
                .get_or_create(&StoreErrorLabels { op, kind })
                .inc();
        }
    }
}

impl Instrumented {
    /// Carries the inner store's resets into the counter; a claim is where
    /// a store notices one.
    fn count_resets(&self) {
        let total = self.inner.resets();
        let counted = self.resets_counted.fetch_max(total, Ordering::Relaxed);
        if total > counted {
            self.metrics.store_resets.inc_by(total - counted);
        }
    }
}

#[async_trait::async_trait]
impl KeyStore for Instrumented {
    async fn claim(
        &self,
        key: &str,
        fingerprint: Option<&str>,
        lease: Duration,
        retention: Duration,
    ) -> Result<Claim, StoreError> {
        let started = Instant::now();
        let result = self.inner.claim(key, fingerprint, lease, retention).await;
        self.record("claim", started, &result);
        self.count_resets();
        if let Ok(claim) = &result {
            let outcome = match claim {
                Claim::Acquired { .. } => "acquired",
                Claim::Completed => "completed",
                Claim::InFlight { .. } => "in_flight",
                Claim::Conflict => "conflict",
            };
            self.metrics
                .claims
                .get_or_create(&OutcomeLabel { outcome })
                .inc();
        }
        result
    }

    async fn complete(
        &self,
        key: &str,
        token: &Token,
        retention: Duration,
    ) -> Result<Transition, StoreError> {
        let started = Instant::now();
        let result = self.inner.complete(key, token, retention).await;
        self.record("complete", started, &result);
        result
    }

    async fn release(&self, key: &str, token: &Token) -> Result<Transition, StoreError> {
        let started = Instant::now();
        let result = self.inner.release(key, token).await;
        self.record("release", started, &result);
        result
    }

    async fn renew(
        &self,
        key: &str,
        token: &Token,
        lease: Duration,
    ) -> Result<Transition, StoreError> {
        let started = Instant::now();
        let result = self.inner.renew(key, token, lease).await;
        self.record("renew", started, &result);
        result
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let started = Instant::now();
        let result = self.inner.ping().await;
        self.record("ping", started, &result);
        result
    }

    fn resets(&self) -> u64 {
        self.inner.resets()
    }
}
