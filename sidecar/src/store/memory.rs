//! In-memory key store: the embedded default when no Redis is configured.
//!
//! It keeps the same state machine as the Redis store, with exact expiries, in a
//! map behind a mutex that is never held across an await. It serves one process
//! only and forgets everything on restart, so it suits local runs and tests, not
//! a consumer with several replicas.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{Claim, KeyStore, StoreError, Token, Transition};

#[derive(Debug, Clone)]
enum State {
    InProgress {
        token: Token,
        fingerprint: Option<String>,
    },
    Completed {
        fingerprint: Option<String>,
    },
}

#[derive(Debug, Clone)]
struct Entry {
    state: State,
    expires: Instant,
}

/// The in-memory store. Cheap to clone; clones share state.
#[derive(Debug, Clone, Default)]
pub struct MemoryStore {
    entries: Arc<Mutex<HashMap<String, Entry>>>,
}

/// Entries are swept every this many mutations, so expired keys do not pile up.
const SWEEP_EVERY: usize = 4096;

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of live keys (in progress or completed).
    pub fn len(&self) -> usize {
        let now = Instant::now();
        self.lock().values().filter(|e| e.expires > now).count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        // A panic while holding the lock cannot leave an entry half-written:
        // every mutation is a single insert or remove.
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn sweep_if_due(map: &mut HashMap<String, Entry>, now: Instant) {
        if map.len() % SWEEP_EVERY == 0 {
            map.retain(|_, e| e.expires > now);
        }
    }
}

fn conflicts(stored: &Option<String>, given: Option<&str>) -> bool {
    matches!((stored.as_deref(), given), (Some(a), Some(b)) if a != b)
}

#[async_trait::async_trait]
impl KeyStore for MemoryStore {
    async fn claim(
        &self,
        key: &str,
        fingerprint: Option<&str>,
        lease: Duration,
        _retention: Duration,
    ) -> Result<Claim, StoreError> {
        let now = Instant::now();
        let mut map = self.lock();
        if let Some(entry) = map.get(key).filter(|e| e.expires > now) {
            return Ok(match &entry.state {
                State::InProgress { fingerprint: f, .. } if conflicts(f, fingerprint) => {
                    Claim::Conflict
                }
                State::InProgress { .. } => Claim::InFlight {
                    retry_after: entry.expires - now,
                },
                State::Completed { fingerprint: f } if conflicts(f, fingerprint) => Claim::Conflict,
                State::Completed { .. } => Claim::Completed,
            });
        }
        let token = Token::random();
        map.insert(
            key.to_string(),
            Entry {
                state: State::InProgress {
                    token: token.clone(),
                    fingerprint: fingerprint.map(str::to_string),
                },
                expires: now + lease,
            },
        );
        Self::sweep_if_due(&mut map, now);
        Ok(Claim::Acquired { token })
    }

    async fn complete(
        &self,
        key: &str,
        token: &Token,
        retention: Duration,
    ) -> Result<Transition, StoreError> {
        let now = Instant::now();
        let mut map = self.lock();
        let fingerprint = match map.get(key).filter(|e| e.expires > now) {
            Some(Entry {
                state:
                    State::InProgress {
                        token: held,
                        fingerprint,
                    },
                ..
            }) if held == token => fingerprint.clone(),
            // Held by someone else, or already completed by another holder.
            Some(_) => return Ok(Transition::Stale),
            // Our lease expired and nobody took the key over: the work was done,
            // so remembering it stops a duplicate.
            None => None,
        };
        map.insert(
            key.to_string(),
            Entry {
                state: State::Completed { fingerprint },
                expires: now + retention,
            },
        );
        Ok(Transition::Done)
    }

    async fn release(&self, key: &str, token: &Token) -> Result<Transition, StoreError> {
        let now = Instant::now();
        let mut map = self.lock();
        match map.get(key).filter(|e| e.expires > now) {
            Some(Entry {
                state: State::InProgress { token: held, .. },
                ..
            }) if held == token => {
                map.remove(key);
                Ok(Transition::Done)
            }
            _ => Ok(Transition::Stale),
        }
    }

    async fn renew(
        &self,
        key: &str,
        token: &Token,
        lease: Duration,
    ) -> Result<Transition, StoreError> {
        let now = Instant::now();
        let mut map = self.lock();
        match map.get_mut(key).filter(|e| e.expires > now) {
            Some(entry) if matches!(&entry.state, State::InProgress { token: held, .. } if held == token) =>
            {
                entry.expires = now + lease;
                Ok(Transition::Done)
            }
            _ => Ok(Transition::Stale),
        }
    }

    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }
}
