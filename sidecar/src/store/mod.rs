//! The key store: where the dedup state of every idempotency key lives.
//!
//! Each key moves through one state machine, and every transition is atomic:
//!
//! ```text
//! absent ──claim──▶ in_progress{token, lease, fingerprint} ──complete──▶ completed{fingerprint}
//!    ▲                      │  (lease expires, or release)                   │ (retention elapses)
//!    └──────────────────────┴────────────────────────────────────────────────┘
//! ```
//!
//! A holder proves itself with the token it got from `claim` (fencing): once its
//! lease has expired and another holder has claimed the key, its `complete` and
//! `release` are refused as [`Transition::Stale`].
//!
//! A holder whose delivery takes long renews its lease (`renew`) while it
//! delivers, so the lease only runs out when the holder is gone; a renewal
//! refused as `Stale` tells the holder it lost the key.
//!
//! Two implementations: [`redis::RedisStore`] for production (shared by every
//! replica of a consumer) and [`memory::MemoryStore`], the embedded default for
//! local runs. Both pass the same behavioural test suite.

pub mod admin;
pub mod batch;
pub mod connection;
pub mod instrumented;
pub mod memory;
pub mod redis;
pub mod refused;

use std::time::Duration;

/// Proof of holding a claim.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Token(pub String);

impl Token {
    /// A fresh token: 128 random bits as 32 hex characters, from the thread's
    /// generator (no system call per claim).
    pub fn random() -> Self {
        let mut text = [0u8; 32];
        hex::encode_to_slice(rand::random::<u128>().to_be_bytes(), &mut text)
            .expect("32 bytes hold 16 in hex");
        Self(String::from_utf8(text.to_vec()).expect("hex is ASCII"))
    }
}

/// What a claim found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// The caller now holds the key until the lease expires.
    Acquired { token: Token },
    /// The key was already processed within the retention window.
    Completed,
    /// Another holder has the key; try again after `retry_after`.
    InFlight { retry_after: Duration },
    /// The key is known with a different payload fingerprint.
    Conflict,
}

/// Result of `complete` or `release`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    Done,
    /// The token no longer holds the key (lease expired and someone else claimed it).
    Stale,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("store call {op} timed out after {timeout:?}")]
    Timeout { op: &'static str, timeout: Duration },
    #[error("store call {op} failed: {source}")]
    Redis {
        op: &'static str,
        #[source]
        source: ::redis::RedisError,
    },
    #[error("the key store was reset ({record}) in {partition} and claims wait until a person acknowledges it (store.onReset=failClosed)")]
    ResetUnacknowledged { partition: String, record: String },
    /// Completions the store refused are written again first: a claim now
    /// could miss that a duplicate's message was processed.
    #[error("{count} completions the store refused are not recorded yet; claims wait for them")]
    CompletionsUnrecorded { count: usize },
    #[error("store answered {op} unexpectedly: {detail}")]
    Protocol { op: &'static str, detail: String },
    /// `durability: replicated`: the completion is on the primary, but no
    /// replica confirmed it within the timeout.
    #[error(
        "no replica confirmed the completion within {timeout:?} (store.durability=replicated)"
    )]
    Unreplicated { timeout: Duration },
}

/// The dedup state of idempotency keys.
///
/// `key` is the idempotency key as extracted from the message; stores digest it
/// to a fixed size. `fingerprint` is an optional digest of the payload.
/// `retention` is how long completed keys are remembered: a claim looks back
/// that far, and `complete` keeps the key that long.
#[async_trait::async_trait]
pub trait KeyStore: Send + Sync + 'static {
    async fn claim(
        &self,
        key: &str,
        fingerprint: Option<&str>,
        lease: Duration,
        retention: Duration,
    ) -> Result<Claim, StoreError>;

    async fn complete(
        &self,
        key: &str,
        token: &Token,
        retention: Duration,
    ) -> Result<Transition, StoreError>;

    async fn release(&self, key: &str, token: &Token) -> Result<Transition, StoreError>;

    /// Extends the lease of a claim the token still holds to `lease` from now.
    /// `Stale` when it no longer holds it (expired, taken over, or completed):
    /// the key is not given back, since another holder may have finished it.
    async fn renew(
        &self,
        key: &str,
        token: &Token,
        lease: Duration,
    ) -> Result<Transition, StoreError>;

    /// Whether the store answers; drives readiness.
    async fn ping(&self) -> Result<(), StoreError>;

    /// Store resets noticed so far: the store lost state this process had
    /// seen in it (see [`redis`] on the epoch marker). Stores that cannot
    /// notice say 0.
    fn resets(&self) -> u64 {
        0
    }
}
