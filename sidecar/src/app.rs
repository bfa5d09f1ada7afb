//! Whether the application takes messages at all: its readiness at start, and
//! a circuit breaker over failures that belong to the application as a whole
//! rather than to one message.
//!
//! ```text
//! Waiting ──check passes──▶ Available ──refused connection, or `failures` distinct
//!                              ▲  ▲       messages failing in a row (timeout, 429,
//!                              │  │       502, 503, 504)──▶ Open
//!        trial message succeeds  │                           │ after `openFor`, the
//!                              │  └── (any success resets     │ readiness check passes
//!                          HalfOpen ◀─── the streak)  ────────┘
//!                              └── trial message fails ──▶ Open
//! ```
//!
//! While the application is `Waiting` or `Open`, sources take no message and
//! give back what they hold without counting an attempt (see [`crate::flow`]);
//! in `HalfOpen` they let one message through, whose outcome decides. A failure
//! counts as an attempt of its message only while the circuit stays closed: a
//! 5xx while other messages succeed, a timeout of this message alone.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::{CircuitBreakerConfig, DeliveryConfig, ReadinessCheck};
use crate::deliver::{exchange, http_client, HttpClient};
use crate::health::Component;
use crate::metrics::Metrics;

/// Time a readiness check may take.
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppState {
    /// Has not passed its readiness check since the sidecar started.
    Waiting,
    /// Takes messages: the circuit is closed.
    Available,
    /// Fails as a whole: the circuit is open and nothing is delivered.
    Open,
    /// The readiness check passed after the circuit opened: one trial
    /// message at a time, whose outcome closes or reopens the circuit.
    HalfOpen,
}

impl AppState {
    pub fn takes_messages(self) -> bool {
        matches!(self, Self::Available | Self::HalfOpen)
    }

    /// The word `/readyz` shows after `app:`.
    fn word(self) -> &'static str {
        match self {
            Self::Waiting => "waiting",
            Self::Available => "up",
            Self::Open => "unavailable",
            Self::HalfOpen => "probing",
        }
    }
}

/// The application's availability, shared by the engine (which reports
/// outcomes), the sources (which wait on it) and the readiness checker.
pub struct App {
    state: watch::Sender<AppState>,
    /// Distinct messages (by a hash of their key) that failed since the last
    /// success with a failure of the application as a whole.
    streak: Mutex<HashSet<u64>>,
    failures: usize,
    /// Messages the application processed since the sidecar started.
    successes: AtomicU64,
    metrics: Arc<Metrics>,
    health: Component,
}

impl App {
    /// Starts `Waiting`: nothing is consumed before the first check passes.
    pub fn new(config: &CircuitBreakerConfig, metrics: Arc<Metrics>, health: Component) -> Self {
        health.set_state(false, AppState::Waiting.word());
        metrics.app_available.set(0);
        Self {
            state: watch::Sender::new(AppState::Waiting),
            streak: Mutex::new(HashSet::new()),
            failures: config.failures.max(1) as usize,
            successes: AtomicU64::new(0),
            metrics,
            health,
        }
    }

    pub fn state(&self) -> AppState {
        *self.state.borrow()
    }

    pub fn subscribe(&self) -> watch::Receiver<AppState> {
        self.state.subscribe()
    }

    /// Messages the application processed since the sidecar started.
    pub fn successes(&self) -> u64 {
        self.successes.load(Ordering::Relaxed)
    }

    /// The application processed a message.
    pub fn succeeded(&self) {
        self.successes.fetch_add(1, Ordering::Relaxed);
        self.lock().clear();
        if self.state() == AppState::HalfOpen {
            self.set(AppState::Available, "the trial message was delivered");
        }
    }

    /// A delivery of `message` failed in a way that may be the application's
    /// as a whole (`refused`: nothing listens). Returns true when the circuit
    /// is open: the message is then given back without counting an attempt.
    pub fn failed(&self, message: u64, refused: bool, why: &str) -> bool {
        match self.state() {
            AppState::Waiting | AppState::Open => true,
            AppState::HalfOpen => {
                self.open(&format!("the trial message failed: {why}"));
                true
            }
            AppState::Available => {
                let distinct = {
                    let mut streak = self.lock();
                    streak.insert(message);
                    streak.len()
                };
                if refused {
                    self.open(&format!("the application refused a connection: {why}"));
                    true
                } else if distinct >= self.failures {
                    self.open(&format!(
                        "{distinct} distinct messages failed in a row, the last with: {why}"
                    ));
                    true
                } else {
                    false
                }
            }
        }
    }

    fn open(&self, why: &str) {
        self.lock().clear();
        self.set(AppState::Open, why);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashSet<u64>> {
        self.streak.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set(&self, new: AppState, why: &str) {
        let changed = self.state.send_if_modified(|state| {
            let changed = *state != new;
            *state = new;
            changed
        });
        if !changed {
            return;
        }
        match new {
            AppState::Open => tracing::warn!(
                state = new.word(),
                why,
                "application unavailable: consumption paused, held messages go back without counting an attempt"
            ),
            _ => tracing::info!(state = new.word(), why, "application state changed"),
        }
        self.metrics
            .app_available
            .set(i64::from(new.takes_messages()));
        self.health.set_state(new.takes_messages(), new.word());
    }
}

/// The readiness check of the application.
pub struct Check {
    kind: ReadinessCheck,
    /// Host and port of the delivery URL.
    addr: (String, u16),
    /// The URL of the HTTP check.
    uri: http::Uri,
    client: HttpClient,
}

#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error("delivery.url is not a valid URL: {0}")]
    Url(#[from] url::ParseError),
    #[error("delivery.url names no host and port")]
    NoAddress,
    #[error("the readiness check's URL is not valid: {0}")]
    Uri(#[from] http::uri::InvalidUri),
}

impl Check {
    pub fn new(config: &DeliveryConfig) -> Result<Self, CheckError> {
        let delivery = url::Url::parse(&config.url)?;
        let host = delivery.host_str().ok_or(CheckError::NoAddress)?;
        let port = delivery
            .port_or_known_default()
            .ok_or(CheckError::NoAddress)?;
        let url = delivery.join(config.readiness.path.as_deref().unwrap_or("/"))?;
        Ok(Self {
            kind: config.readiness.check,
            addr: (host.trim_matches(['[', ']']).to_string(), port),
            uri: url.as_str().parse()?,
            client: http_client(CHECK_TIMEOUT),
        })
    }

    /// Whether the application answers the check now.
    pub async fn passes(&self) -> bool {
        match self.kind {
            ReadinessCheck::Tcp => {
                let connect = tokio::net::TcpStream::connect((self.addr.0.as_str(), self.addr.1));
                matches!(
                    tokio::time::timeout(CHECK_TIMEOUT, connect).await,
                    Ok(Ok(_))
                )
            }
            ReadinessCheck::Http => {
                let mut request = http::Request::new(Default::default());
                *request.uri_mut() = self.uri.clone();
                let answer =
                    tokio::time::timeout(CHECK_TIMEOUT, exchange(&self.client, request)).await;
                matches!(answer, Ok(Ok(200..=299)))
            }
        }
    }
}

/// Checks the application while it is `Waiting` (every `interval`) or `Open`
/// (after `openFor`, then every `interval`), and lets messages flow again when
/// the check passes: all of them at start, one trial message after an outage.
pub async fn watch(
    app: Arc<App>,
    check: Check,
    config: DeliveryConfig,
    shutdown: CancellationToken,
) {
    let mut states = app.subscribe();
    loop {
        let state = tokio::select! {
            _ = shutdown.cancelled() => return,
            state = states.wait_for(|s| !s.takes_messages()) => match state {
                Ok(state) => *state,
                Err(_) => return,
            },
        };
        if state == AppState::Open {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(config.circuit_breaker.open_for) => {}
            }
        }
        loop {
            if check.passes().await {
                break;
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(config.readiness.interval) => {}
            }
        }
        match state {
            AppState::Waiting => app.set(AppState::Available, "the readiness check passed"),
            _ => app.set(
                AppState::HalfOpen,
                "the readiness check passed: one trial message decides",
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::Health;

    fn app(failures: u32) -> (App, Health) {
        let health = Health::new();
        let config = CircuitBreakerConfig {
            failures,
            open_for: Duration::from_millis(10),
        };
        let app = App::new(&config, Arc::new(Metrics::new()), health.register("app"));
        (app, health)
    }

    #[test]
    fn the_circuit_opens_after_distinct_messages_fail_in_a_row() {
        let (app, health) = app(3);
        assert_eq!(health.report(), vec![("app", false, "waiting")]);
        app.set(AppState::Available, "test");
        // One message failing again and again is that message's problem.
        for _ in 0..10 {
            assert!(!app.failed(1, false, "status 503"));
        }
        assert!(!app.failed(2, false, "status 503"));
        // A success in between resets the streak.
        app.succeeded();
        assert!(!app.failed(3, false, "status 503"));
        assert!(!app.failed(4, false, "timeout"));
        assert!(
            app.failed(5, false, "status 502"),
            "three distinct in a row"
        );
        assert_eq!(app.state(), AppState::Open);
        assert_eq!(health.report(), vec![("app", false, "unavailable")]);
        assert!(app.failed(6, false, "status 503"), "stays open");
    }

    #[test]
    fn a_refused_connection_opens_the_circuit_at_once() {
        let (app, _) = app(5);
        app.set(AppState::Available, "test");
        assert!(app.failed(1, true, "connection refused"));
        assert_eq!(app.state(), AppState::Open);
    }

    #[test]
    fn the_trial_message_decides_in_half_open() {
        let (app, health) = app(5);
        app.set(AppState::HalfOpen, "test");
        assert!(app.failed(1, false, "status 503"), "a failed trial reopens");
        assert_eq!(app.state(), AppState::Open);
        app.set(AppState::HalfOpen, "test");
        app.succeeded();
        assert_eq!(app.state(), AppState::Available);
        assert_eq!(health.report(), vec![("app", true, "up")]);
    }

    #[tokio::test]
    async fn the_tcp_check_passes_only_while_something_listens() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let check = Check::new(&DeliveryConfig::new(format!(
            "http://127.0.0.1:{port}/messages"
        )))
        .expect("check");
        assert!(check.passes().await);
        drop(listener);
        assert!(!check.passes().await);
    }
}

/// Lets other modules' tests put the application in a state.
#[cfg(test)]
pub(crate) mod tests_support {
    pub fn set(app: &super::App, state: super::AppState) {
        app.set(state, "test");
    }
}
