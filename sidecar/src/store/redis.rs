//! Redis key store: the production store, shared by every replica of a consumer.
//!
//! Layout, for a consumer `orders` (the `{…}` hash tag keeps all of one
//! consumer's keys in one Redis Cluster slot, so multi-key scripts stay legal):
//!
//! - `idemq:{orders}:p:<digest>`: a claim in progress; value `fingerprint ‖ token`,
//!   TTL = the lease, so an expired lease frees the key by itself.
//! - `idemq:{orders}:c:<width>:<window>:<shard>`: a hash of completed keys,
//!   field = digest, value = fingerprint, bucketed by completion window and by
//!   shard. A plain key with a TTL costs ~160 bytes in Redis; a hash field costs
//!   a few dozen, which is what keeps a retained key under 100 bytes. The field
//!   is the digest past its first two bytes; the shard is its first 12 bits.
//!
//! `<digest>` is the first 16 bytes of SHA-256 of the idempotency key, so key
//! size is fixed whatever the application sends. Every transition is one Lua
//! script (see the `.lua` files beside this one), run by SHA. Claims and
//! completions, and lease renewals, are batched (see [`super::batch`]): one script call runs the
//! transitions of every delivery that asked meanwhile, each atomically.

use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{IntoConnectionInfo, Script};
use sha2::{Digest, Sha256};

use super::batch::Batcher;
use super::{Claim, KeyStore, StoreError, Token, Transition};

/// Completed keys are spread over 4096 hashes per window (the first 12 bits of
/// the digest), so that each stays small enough for Redis's compact listpack
/// encoding at millions of keys, while a moderate volume still shares hashes.
const SHARD_BITS: u32 = 12;
const SHARD_BYTES: usize = 2;
/// Windows alive at once, roughly: a window is `retention / WINDOWS_PER_RETENTION`.
const WINDOWS_PER_RETENTION: u32 = 4;
const TOKEN_LEN: usize = 32;

/// Where and how to reach Redis.
#[derive(Debug, Clone)]
pub struct RedisOptions {
    /// `redis://` or `rediss://` URL, possibly with credentials.
    pub url: String,
    /// Password, when it is not in the URL.
    pub password: Option<String>,
    /// Scope of the keys: the consumer's name.
    pub namespace: String,
    /// Timeout of every call.
    pub timeout: Duration,
}

/// The Redis store. Cheap to clone; clones share one multiplexed connection
/// and the batching tasks of claims and completions.
#[derive(Clone)]
pub struct RedisStore {
    redis: Redis,
    prefix: String,
    claims: Arc<Batcher<ClaimItem, (String, i64)>>,
    completions: Arc<Batcher<CompleteItem, i64>>,
    renewals: Arc<Batcher<RenewItem, i64>>,
}

/// The connection, with the timeout of every call.
#[derive(Clone)]
struct Redis {
    conn: ConnectionManager,
    timeout: Duration,
}

impl Redis {
    async fn invoke<T: redis::FromRedisValue>(
        &self,
        op: &'static str,
        invocation: &redis::ScriptInvocation<'_>,
    ) -> Result<T, StoreError> {
        let mut conn = self.conn.clone();
        self.bounded(op, invocation.invoke_async(&mut conn)).await
    }

    async fn query<T: redis::FromRedisValue>(
        &self,
        op: &'static str,
        cmd: &redis::Cmd,
    ) -> Result<T, StoreError> {
        let mut conn = self.conn.clone();
        self.bounded(op, cmd.query_async(&mut conn)).await
    }

    /// Runs a call within the timeout, its errors named by `op`.
    async fn bounded<T>(
        &self,
        op: &'static str,
        call: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(self.timeout, call).await {
            Ok(result) => result.map_err(|source| StoreError::Redis { op, source }),
            Err(_) => Err(StoreError::Timeout {
                op,
                timeout: self.timeout,
            }),
        }
    }
}

/// One claim of a batch: the arguments of `claim.lua` for one key.
struct ClaimItem {
    digest: Digest16,
    fingerprint: Vec<u8>,
    token: String,
    lease_ms: u64,
    retention_ms: u64,
    width_ms: u64,
}

/// One completion of a batch: the arguments of `complete.lua` for one key.
struct CompleteItem {
    digest: Digest16,
    token: String,
    retention_ms: u64,
    width_ms: u64,
}

/// One renewal of a batch: the arguments of `renew.lua` for one key.
struct RenewItem {
    in_progress: Vec<u8>,
    token: String,
    lease_ms: u64,
}

fn scripts() -> &'static [Script; 4] {
    static SCRIPTS: std::sync::OnceLock<[Script; 4]> = std::sync::OnceLock::new();
    SCRIPTS.get_or_init(|| {
        [
            Script::new(include_str!("claim.lua")),
            Script::new(include_str!("complete.lua")),
            Script::new(include_str!("release.lua")),
            Script::new(include_str!("renew.lua")),
        ]
    })
}

impl RedisStore {
    /// Creates the store, inside a tokio runtime (it spawns its batching
    /// tasks). It connects lazily and reconnects by itself, so it can be built
    /// while Redis is down; `ping` tells when it answers.
    pub fn new(options: RedisOptions) -> Result<Self, StoreError> {
        let redis_err = |source| StoreError::Redis {
            op: "connect",
            source,
        };
        let mut info = options
            .url
            .as_str()
            .into_connection_info()
            .map_err(redis_err)?;
        if let Some(password) = &options.password {
            let settings = info.redis_settings().clone().set_password(password);
            info = info.set_redis_settings(settings);
        }
        if matches!(info.addr(), redis::ConnectionAddr::TcpTls { .. }) {
            // rustls needs one process-wide crypto provider (the binary installs
            // it too); a second install only reports that one is there.
            let _ = rustls::crypto::ring::default_provider().install_default();
        }
        let client = redis::Client::open(info).map_err(redis_err)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(options.timeout))
            .set_response_timeout(Some(options.timeout))
            .set_max_delay(Duration::from_secs(2));
        let conn = ConnectionManager::new_lazy_with_config(client, config).map_err(redis_err)?;
        let redis = Redis {
            conn,
            timeout: options.timeout,
        };
        let prefix = format!("idemq:{{{}}}:", options.namespace);
        Ok(Self {
            claims: Arc::new(Batcher::spawn("claim", {
                let (redis, prefix) = (redis.clone(), prefix.clone());
                move |items| claim_batch(redis.clone(), prefix.clone(), items)
            })),
            completions: Arc::new(Batcher::spawn("complete", {
                let (redis, prefix) = (redis.clone(), prefix.clone());
                move |items| complete_batch(redis.clone(), prefix.clone(), items)
            })),
            renewals: Arc::new(Batcher::spawn("renew", {
                let redis = redis.clone();
                move |items| renew_batch(redis.clone(), items)
            })),
            redis,
            prefix,
        })
    }

    /// The prefix of every key this store writes.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }
}

async fn claim_batch(
    redis: Redis,
    prefix: String,
    items: Vec<ClaimItem>,
) -> Result<Vec<(String, i64)>, StoreError> {
    let mut invocation = scripts()[0].prepare_invoke();
    invocation.arg(&prefix);
    for item in &items {
        invocation
            .key(&item.digest.in_progress)
            .arg(&item.digest.field)
            .arg(&item.digest.shard)
            .arg(&item.fingerprint)
            .arg(&item.token)
            .arg(item.lease_ms)
            .arg(item.retention_ms)
            .arg(item.width_ms);
    }
    redis.invoke("claim", &invocation).await
}

async fn complete_batch(
    redis: Redis,
    prefix: String,
    items: Vec<CompleteItem>,
) -> Result<Vec<i64>, StoreError> {
    let mut invocation = scripts()[1].prepare_invoke();
    invocation.arg(&prefix);
    for item in &items {
        invocation
            .key(&item.digest.in_progress)
            .arg(&item.digest.field)
            .arg(&item.digest.shard)
            .arg(&item.token)
            .arg(item.retention_ms)
            .arg(item.width_ms);
    }
    redis.invoke("complete", &invocation).await
}

async fn renew_batch(redis: Redis, items: Vec<RenewItem>) -> Result<Vec<i64>, StoreError> {
    let mut invocation = scripts()[3].prepare_invoke();
    for item in &items {
        invocation
            .key(&item.in_progress)
            .arg(&item.token)
            .arg(item.lease_ms);
    }
    redis.invoke("renew", &invocation).await
}

/// The parts of a key's digest the scripts need.
struct Digest16 {
    in_progress: Vec<u8>,
    shard: String,
    field: Vec<u8>,
}

impl RedisStore {
    fn digest(&self, key: &str) -> Digest16 {
        let hash = Sha256::digest(key.as_bytes());
        let digest = &hash[..16];
        let mut in_progress = Vec::with_capacity(self.prefix.len() + 2 + digest.len());
        in_progress.extend_from_slice(self.prefix.as_bytes());
        in_progress.extend_from_slice(b"p:");
        in_progress.extend_from_slice(digest);
        let shard = (u16::from_be_bytes([digest[0], digest[1]]) >> (16 - SHARD_BITS)).to_string();
        Digest16 {
            in_progress,
            shard,
            field: digest[SHARD_BYTES..].to_vec(),
        }
    }
}

/// Width of a completion window in ms: a quarter of the retention, at least 1s.
fn window_width(retention: Duration) -> u64 {
    (retention.as_millis() as u64 / u64::from(WINDOWS_PER_RETENTION)).max(1000)
}

/// Fingerprints are kept as 8 bytes of their SHA-256: enough to tell two
/// payloads apart, small enough to keep a retained key cheap.
fn short_fingerprint(fingerprint: Option<&str>) -> Vec<u8> {
    fingerprint
        .map(|f| Sha256::digest(f.as_bytes())[..8].to_vec())
        .unwrap_or_default()
}

fn millis(d: Duration) -> u64 {
    (d.as_millis() as u64).max(1)
}

#[async_trait::async_trait]
impl KeyStore for RedisStore {
    async fn claim(
        &self,
        key: &str,
        fingerprint: Option<&str>,
        lease: Duration,
        retention: Duration,
    ) -> Result<Claim, StoreError> {
        let token = Token(uuid::Uuid::new_v4().simple().to_string());
        let (status, pttl) = self
            .claims
            .call(ClaimItem {
                digest: self.digest(key),
                fingerprint: short_fingerprint(fingerprint),
                token: token.0.clone(),
                lease_ms: millis(lease),
                retention_ms: millis(retention),
                width_ms: window_width(retention),
            })
            .await?;
        match status.as_str() {
            "A" => Ok(Claim::Acquired { token }),
            "C" => Ok(Claim::Completed),
            "X" => Ok(Claim::Conflict),
            "I" => Ok(Claim::InFlight {
                retry_after: Duration::from_millis(pttl.max(1) as u64),
            }),
            other => Err(StoreError::Protocol {
                op: "claim",
                detail: format!("unknown claim status {other:?}"),
            }),
        }
    }

    async fn complete(
        &self,
        key: &str,
        token: &Token,
        retention: Duration,
    ) -> Result<Transition, StoreError> {
        if token.0.len() != TOKEN_LEN {
            return Ok(Transition::Stale);
        }
        let done = self
            .completions
            .call(CompleteItem {
                digest: self.digest(key),
                token: token.0.clone(),
                retention_ms: millis(retention),
                width_ms: window_width(retention),
            })
            .await?;
        Ok(if done == 1 {
            Transition::Done
        } else {
            Transition::Stale
        })
    }

    async fn release(&self, key: &str, token: &Token) -> Result<Transition, StoreError> {
        if token.0.len() != TOKEN_LEN {
            return Ok(Transition::Stale);
        }
        let mut invocation = scripts()[2].prepare_invoke();
        invocation.key(self.digest(key).in_progress).arg(&token.0);
        let done: i64 = self.redis.invoke("release", &invocation).await?;
        Ok(if done == 1 {
            Transition::Done
        } else {
            Transition::Stale
        })
    }

    async fn renew(
        &self,
        key: &str,
        token: &Token,
        lease: Duration,
    ) -> Result<Transition, StoreError> {
        if token.0.len() != TOKEN_LEN {
            return Ok(Transition::Stale);
        }
        let renewed = self
            .renewals
            .call(RenewItem {
                in_progress: self.digest(key).in_progress,
                token: token.0.clone(),
                lease_ms: millis(lease),
            })
            .await?;
        Ok(if renewed == 1 {
            Transition::Done
        } else {
            Transition::Stale
        })
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.redis
            .query::<String>("ping", &redis::cmd("PING"))
            .await
            .map(drop)
    }
}
