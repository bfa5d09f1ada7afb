//! A key store wrapper for the pipeline that keeps the completions the store
//! refused (it was down, or failing over) and writes them again, backing off,
//! until it takes them.
//!
//! The application processed those messages, so they are acked all the same:
//! giving one back would process it again for certain. Until their
//! completions are recorded, claims and pings answer
//! [`StoreError::CompletionsUnrecorded`]: a claim now could miss that a
//! duplicate's message was processed, so the sources treat it as the store
//! outage it is (consumption paused, readiness down) and resume once it is
//! written. Only a crash of the sidecar meanwhile loses them; at exit
//! [`Refused::write_at_exit`] makes one last try and logs what is left.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::{Claim, KeyStore, StoreError, Token, Transition};
use crate::engine::backoff;
use crate::metrics::Metrics;

const FIRST_RETRY: Duration = Duration::from_millis(100);
const MAX_RETRY: Duration = Duration::from_secs(1);

pub struct Refused {
    shared: Arc<Shared>,
}

/// What the background writer shares with the wrapper.
struct Shared {
    inner: Arc<dyn KeyStore>,
    metrics: Arc<Metrics>,
    /// Key, token and retention of each refused completion.
    entries: Mutex<Vec<(String, Token, Duration)>>,
    /// True while a task writes the entries.
    writing: AtomicBool,
}

impl Refused {
    pub fn new(inner: Arc<dyn KeyStore>, metrics: Arc<Metrics>) -> Self {
        Self {
            shared: Arc::new(Shared {
                inner,
                metrics,
                entries: Mutex::new(Vec::new()),
                writing: AtomicBool::new(false),
            }),
        }
    }

    fn waiting(&self) -> Result<(), StoreError> {
        match self.shared.count() {
            0 => Ok(()),
            count => Err(StoreError::CompletionsUnrecorded { count }),
        }
    }

    /// One last try at the refused completions, within `timeout`.
    pub async fn write_at_exit(&self, timeout: Duration) {
        let count = self.shared.count();
        if count == 0 {
            return;
        }
        let left = tokio::time::timeout(timeout, self.shared.write())
            .await
            .unwrap_or(count);
        if left > 0 {
            tracing::error!(left, "exiting with completions the store refused: a later duplicate of those messages will not be stopped");
        }
    }
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(String, Token, Duration)>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn count(&self) -> usize {
        self.lock().len()
    }

    /// Keeps a refused completion; a task writes it until the store takes it.
    fn keep(self: &Arc<Self>, key: &str, token: &Token, retention: Duration) {
        let count = {
            let mut entries = self.lock();
            entries.push((key.to_string(), token.clone(), retention));
            entries.len()
        };
        self.metrics.completions_unrecorded.set(count as i64);
        if !self.writing.swap(true, Ordering::AcqRel) {
            tokio::spawn(self.clone().write_until_taken());
        }
    }

    async fn write_until_taken(self: Arc<Self>) {
        let mut round = 0;
        loop {
            round += 1;
            if self.write().await == 0 {
                self.writing.store(false, Ordering::Release);
                // One kept after that write, before the flag fell, has no
                // task to write it: take over.
                if self.count() == 0 || self.writing.swap(true, Ordering::AcqRel) {
                    return;
                }
            }
            tokio::time::sleep(backoff(FIRST_RETRY, MAX_RETRY, round)).await;
        }
    }

    /// Writes every kept completion once, all at a time (so the store client
    /// batches them); returns how many are left.
    async fn write(&self) -> usize {
        let batch = std::mem::take(&mut *self.lock());
        if batch.is_empty() {
            return 0;
        }
        let results = futures::future::join_all(
            batch
                .iter()
                .map(|(key, token, retention)| self.inner.complete(key, token, *retention)),
        )
        .await;
        let mut error = None;
        let left: Vec<_> = batch
            .into_iter()
            .zip(results)
            .filter_map(|(entry, result)| match result {
                // Stale: completed since, or another holder has the key.
                Ok(Transition::Done | Transition::Stale) => None,
                // On the primary: writing again would find it done.
                Err(StoreError::Unreplicated { .. }) => None,
                Err(e) => {
                    error.get_or_insert(e);
                    Some(entry)
                }
            })
            .collect();
        let count = {
            let mut entries = self.lock();
            entries.extend(left);
            entries.len()
        };
        self.metrics.completions_unrecorded.set(count as i64);
        match error {
            Some(e) => {
                tracing::debug!(error = %e, left = count, "the store still refuses completions")
            }
            None if count == 0 => {
                tracing::info!("the store took the completions it had refused: claims go on")
            }
            None => {}
        }
        count
    }
}

#[async_trait::async_trait]
impl KeyStore for Refused {
    async fn claim(
        &self,
        key: &str,
        fingerprint: Option<&str>,
        lease: Duration,
        retention: Duration,
    ) -> Result<Claim, StoreError> {
        self.waiting()?;
        self.shared
            .inner
            .claim(key, fingerprint, lease, retention)
            .await
    }

    async fn complete(
        &self,
        key: &str,
        token: &Token,
        retention: Duration,
    ) -> Result<Transition, StoreError> {
        let result = self.shared.inner.complete(key, token, retention).await;
        match &result {
            Ok(_) | Err(StoreError::Unreplicated { .. }) => {}
            Err(_) => self.shared.keep(key, token, retention),
        }
        result
    }

    async fn release(&self, key: &str, token: &Token) -> Result<Transition, StoreError> {
        self.shared.inner.release(key, token).await
    }

    async fn renew(
        &self,
        key: &str,
        token: &Token,
        lease: Duration,
    ) -> Result<Transition, StoreError> {
        self.shared.inner.renew(key, token, lease).await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.shared.inner.ping().await?;
        self.waiting()
    }

    fn resets(&self) -> u64 {
        self.shared.inner.resets()
    }
}
