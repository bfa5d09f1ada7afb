//! The reconnect loop that the session-based sources share.
//!
//! A source consumes in sessions: one connection (or stream) to the broker,
//! ended by shutdown, by the key store or the application going away, or by an
//! error. Between sessions it waits for what went away and backs off after
//! errors, so that a broker that is down is not hammered and a store outage
//! takes nothing from the broker.

use std::fmt::Display;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::Common;
use crate::config::UnavailablePolicy;
use crate::store::KeyStore;

const FIRST_RECONNECT_DELAY: Duration = Duration::from_millis(100);
const MAX_RECONNECT_DELAY: Duration = Duration::from_secs(10);
const STORE_POLL: Duration = Duration::from_millis(500);

/// How a session ended without an error.
pub enum SessionEnd {
    Shutdown,
    /// The key store stopped answering.
    StoreDown,
    /// The application became unavailable.
    AppDown,
    /// The session must start again with other settings (a prefetch sized to
    /// the largest message seen): at once.
    Restart,
    /// Something was given back to the broker that it must offer again: start
    /// again after the back-off delay, as after an error.
    BackOff,
}

/// The state between one source's sessions: the back-off delay.
///
/// ```ignore
/// let mut sessions = Sessions::new("RabbitMQ", &self.common);
/// while sessions.ready(&shutdown).await {
///     let ended = self.session(&shutdown).await;
///     if !sessions.ended(ended, &shutdown).await {
///         break;
///     }
/// }
/// ```
pub struct Sessions<'a> {
    /// The broker's name in log lines.
    broker: &'static str,
    common: &'a Common,
    delay: Duration,
}

impl<'a> Sessions<'a> {
    pub fn new(broker: &'static str, common: &'a Common) -> Self {
        Self {
            broker,
            common,
            delay: FIRST_RECONNECT_DELAY,
        }
    }

    /// Waits for the application and, when the store policy is fail-closed,
    /// for the store; false when shutdown came first.
    pub async fn ready(&self, shutdown: &CancellationToken) -> bool {
        let common = self.common;
        if common.config.store.unavailable == UnavailablePolicy::FailClosed
            && !wait_for_store(&*common.store, shutdown).await
        {
            return false;
        }
        common.flow.until_available(shutdown).await
    }

    /// Says how a session ended and backs off when it must; false when no
    /// session must follow (shutdown).
    pub async fn ended<E: Display>(
        &mut self,
        ended: Result<SessionEnd, E>,
        shutdown: &CancellationToken,
    ) -> bool {
        let back_off = match ended {
            Ok(SessionEnd::Shutdown) => return false,
            Ok(SessionEnd::StoreDown) => {
                tracing::warn!("key store unavailable: consumption paused until it answers");
                false
            }
            Ok(SessionEnd::AppDown) => {
                tracing::info!("consumption paused until the application is available");
                false
            }
            Ok(SessionEnd::Restart) => false,
            Ok(SessionEnd::BackOff) => true,
            Err(e) => {
                let retry_in = self.delay;
                tracing::warn!(error = %e, ?retry_in, "{} session ended", self.broker);
                true
            }
        };
        if !back_off {
            self.delay = FIRST_RECONNECT_DELAY;
            return true;
        }
        tokio::select! {
            _ = shutdown.cancelled() => return false,
            _ = tokio::time::sleep(self.delay) => {}
        }
        self.delay = (self.delay * 2).min(MAX_RECONNECT_DELAY);
        true
    }
}

/// Waits until the store answers; false when shutdown came first.
pub async fn wait_for_store(store: &dyn KeyStore, shutdown: &CancellationToken) -> bool {
    loop {
        if store.ping().await.is_ok() {
            return true;
        }
        tokio::select! {
            _ = shutdown.cancelled() => return false,
            _ = tokio::time::sleep(STORE_POLL) => {}
        }
    }
}
