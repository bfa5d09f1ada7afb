//! Flow control shared by every source: a source takes the next message from
//! its broker only while the application takes messages (see [`crate::app`])
//! and the bodies it holds in flight fit the byte budget
//! (`delivery.maxInFlightBytes`).
//!
//! How a source uses it:
//!
//! 1. Before starting (or resuming) consumption, `until_available` waits for
//!    the application; while it waits, the source holds no message.
//! 2. Before taking each message, `ready` waits for room; once the message is
//!    taken, `take(len)` charges its body and returns a [`Permit`] that the
//!    source keeps until the message is settled (acked, requeued,
//!    dead-lettered). `admit(len)` does both for a source that knows a
//!    message's size before taking it.
//! 3. `unavailable` resolves when the circuit opens: the source stops taking
//!    messages; the engine answers `Verdict::AppUnavailable` for what it holds,
//!    which the source gives back without counting an attempt, then it goes
//!    back to step 1.
//!
//! One message is always let through when nothing is held, even if it is
//! larger than the whole budget, so a large message cannot stall the queue; so
//! the bytes held stay under the budget plus one message. In half-open state
//! only one message is held at a time: the trial.

use std::sync::Arc;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::app::{App, AppState};
use crate::metrics::Metrics;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Held {
    bytes: u64,
    messages: usize,
}

struct Inner {
    app: Arc<App>,
    budget: u64,
    held: watch::Sender<Held>,
    metrics: Arc<Metrics>,
}

/// The admission of messages into the sidecar. Cheap to clone; clones share
/// the budget.
#[derive(Clone)]
pub struct Flow {
    inner: Arc<Inner>,
}

/// Bytes (and one message) held in flight; released when dropped, which the
/// source does once the message is settled.
pub struct Permit {
    inner: Arc<Inner>,
    bytes: u64,
}

impl Drop for Permit {
    fn drop(&mut self) {
        let bytes = self.bytes;
        self.inner.held.send_modify(|held| {
            held.bytes -= bytes;
            held.messages -= 1;
        });
        self.inner
            .metrics
            .in_flight_bytes
            .set(i64::try_from(self.inner.held.borrow().bytes).unwrap_or(i64::MAX));
    }
}

impl Permit {
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

impl Flow {
    pub fn new(app: Arc<App>, budget: u64, metrics: Arc<Metrics>) -> Self {
        Self {
            inner: Arc::new(Inner {
                app,
                budget,
                held: watch::Sender::new(Held::default()),
                metrics,
            }),
        }
    }

    /// The byte budget.
    pub fn budget(&self) -> u64 {
        self.inner.budget
    }

    /// Bytes held in flight now.
    pub fn held_bytes(&self) -> u64 {
        self.inner.held.borrow().bytes
    }

    pub fn app_state(&self) -> AppState {
        self.inner.app.state()
    }

    /// Waits until the application takes messages; false when `shutdown`
    /// fired first.
    pub async fn until_available(&self, shutdown: &CancellationToken) -> bool {
        let mut states = self.inner.app.subscribe();
        tokio::select! {
            _ = shutdown.cancelled() => false,
            state = states.wait_for(|s| s.takes_messages()) => state.is_ok(),
        }
    }

    /// Resolves when the application stops taking messages (the circuit opens).
    pub async fn unavailable(&self) {
        let mut states = self.inner.app.subscribe();
        if states.wait_for(|s| !s.takes_messages()).await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// Waits until one more message may be taken: the application takes
    /// messages and the bytes held are under the budget (in half-open state,
    /// nothing is held). False when `shutdown` fired first. Cancel-safe.
    pub async fn ready(&self, shutdown: &CancellationToken) -> bool {
        self.wait(0, shutdown).await
    }

    /// Runs `next` (taking a message from the broker) only once [`Self::ready`]
    /// lets one more in; pending for good once `shutdown` fired, so that the
    /// caller's shutdown branch ends its loop. Cancel-safe when `next` is.
    pub async fn when_ready<T>(
        &self,
        shutdown: &CancellationToken,
        next: impl std::future::Future<Output = T>,
    ) -> T {
        if !self.ready(shutdown).await {
            std::future::pending::<()>().await;
        }
        next.await
    }

    /// Charges a taken message of `bytes` to the budget, without waiting.
    pub fn take(&self, bytes: usize) -> Permit {
        let bytes = bytes as u64;
        self.inner.held.send_modify(|held| {
            held.bytes += bytes;
            held.messages += 1;
        });
        self.inner
            .metrics
            .in_flight_bytes
            .set(i64::try_from(self.held_bytes()).unwrap_or(i64::MAX));
        Permit {
            inner: self.inner.clone(),
            bytes,
        }
    }

    /// Waits until a message of `bytes` fits (see [`Flow::ready`]; a message
    /// larger than the budget fits when nothing is held), then charges it.
    /// None when `shutdown` fired first.
    pub async fn admit(&self, bytes: usize, shutdown: &CancellationToken) -> Option<Permit> {
        self.wait(bytes as u64, shutdown)
            .await
            .then(|| self.take(bytes))
    }

    async fn wait(&self, bytes: u64, shutdown: &CancellationToken) -> bool {
        let mut states = self.inner.app.subscribe();
        let mut held = self.inner.held.subscribe();
        loop {
            let state = *states.borrow_and_update();
            let now = *held.borrow_and_update();
            let fits = now.messages == 0
                || (state == AppState::Available
                    && now.bytes.saturating_add(bytes.max(1)) <= self.inner.budget);
            if state.takes_messages() && fits {
                return true;
            }
            tokio::select! {
                _ = shutdown.cancelled() => return false,
                changed = states.changed() => if changed.is_err() { return false },
                changed = held.changed() => if changed.is_err() { return false },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::config::CircuitBreakerConfig;
    use crate::health::Health;

    fn flow(budget: u64) -> (Flow, Arc<App>) {
        let metrics = Arc::new(Metrics::new());
        let app = Arc::new(App::new(
            &CircuitBreakerConfig::default(),
            metrics.clone(),
            Health::new().register("app"),
        ));
        (Flow::new(app.clone(), budget, metrics), app)
    }

    async fn admitted_soon(flow: &Flow, bytes: usize) -> Option<Permit> {
        let never = CancellationToken::new();
        tokio::time::timeout(Duration::from_millis(50), flow.admit(bytes, &never))
            .await
            .ok()
            .flatten()
    }

    #[tokio::test]
    async fn nothing_is_admitted_before_the_application_is_ready() {
        let (flow, app) = flow(1000);
        assert!(admitted_soon(&flow, 10).await.is_none());
        app.succeeded(); // a success does not make a waiting app ready
        assert!(admitted_soon(&flow, 10).await.is_none());
        let shutdown = CancellationToken::new();
        shutdown.cancel();
        assert!(!flow.until_available(&shutdown).await);
    }

    #[tokio::test]
    async fn the_budget_holds_until_permits_are_released() {
        let (flow, app) = flow(1000);
        crate::app::tests_support::set(&app, AppState::Available);
        let a = admitted_soon(&flow, 600).await.expect("fits");
        let b = admitted_soon(&flow, 400).await.expect("fits exactly");
        assert_eq!(flow.held_bytes(), 1000);
        assert!(admitted_soon(&flow, 1).await.is_none(), "budget exhausted");
        drop(a);
        assert!(
            admitted_soon(&flow, 700).await.is_none(),
            "600 free, 700 asked"
        );
        let c = admitted_soon(&flow, 600).await.expect("fits again");
        drop((b, c));
        assert_eq!(flow.held_bytes(), 0);
        let big = admitted_soon(&flow, 5000)
            .await
            .expect("alone, a message larger than the budget");
        assert!(admitted_soon(&flow, 1).await.is_none());
        drop(big);
    }

    #[tokio::test]
    async fn half_open_lets_one_trial_message_through() {
        let (flow, app) = flow(1000);
        crate::app::tests_support::set(&app, AppState::HalfOpen);
        let trial = admitted_soon(&flow, 10).await.expect("the trial");
        assert!(admitted_soon(&flow, 10).await.is_none(), "one at a time");
        drop(trial);
        crate::app::tests_support::set(&app, AppState::Open);
        assert!(admitted_soon(&flow, 10).await.is_none(), "open: none");
        tokio::time::timeout(Duration::from_millis(50), flow.unavailable())
            .await
            .expect("unavailable resolves while open");
    }
}
