//! Redis key store: the production store, shared by every replica of a consumer.
//!
//! Layout, for a consumer `orders`. Its keys are spread over `partitions`
//! hash tags: `idemq:{orders}:` when there is one (the default), else
//! `idemq:{orders#<p>}:` for p in 0..partitions, so that on Redis Cluster
//! a consumer spans many slots while each script call stays in one. Under
//! each partition's prefix:
//!
//! - `p:<digest>`: a claim in progress; value `fingerprint ‖ token`, TTL =
//!   the lease, so an expired lease frees the key by itself.
//! - `c:<width>:<window>:<shard>`: a hash of completed keys, field = digest
//!   past its first two bytes, value = fingerprint, bucketed by completion
//!   window and by shard. A plain key with a TTL costs ~160 bytes in Redis; a
//!   field of a small (listpack-encoded) hash costs under 32. Each bucket
//!   also holds an empty field, written with its first key, so that the
//!   write that creates it knows to set its expiry (see `settle.lua`).
//! - `m`: the meta hash: the epoch (amnesia detection), the window width
//!   (fixed when the partition is first written, so changing the retention
//!   renames nothing), the longest retention in use, and per window its
//!   shard count and number of completions (see `meta.lua`).
//!
//! `<digest>` is the first 16 bytes of SHA-256 of the idempotency key, so key
//! size is fixed whatever the application sends. Every transition is one Lua
//! script (see the `.lua` files beside this one), run by SHA. Claims and
//! completions are batched together, lease renewals apart (see
//! [`super::batch`]): one script call per partition (and retention, which is
//! the same for every delivery of a sidecar) runs the transitions of every
//! delivery that asked meanwhile, each atomically. Under load one `settle`
//! call completes what earlier deliveries finished and claims what new ones
//! start, so the script's fixed cost (reading the meta hash, the server's
//! time) is paid once for both.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::Script;
use sha2::{Digest, Sha256};

use super::batch::Batcher;
use super::connection::{Connection, Endpoint};
use super::{Claim, KeyStore, StoreError, Token, Transition};

/// The field of a completed key is the digest past its first two bytes.
const FIELD_FROM: usize = 2;
/// A partition's window width, when it is first written: a quarter of the
/// retention then. It stays fixed afterwards (see `meta.lua`).
const WINDOWS_PER_RETENTION: u32 = 4;
const TOKEN_LEN: usize = 32;
/// What `settle.lua` answers for a claim, apart from an in-flight holder's
/// remaining lease (0 or more).
const ACQUIRED: i64 = -1;
const COMPLETED: i64 = -2;
const CONFLICT: i64 = -3;
const REFUSED: i64 = -4;

pub use crate::config::{Durability, ResetPolicy};

/// Where and how to reach Redis.
#[derive(Debug, Clone)]
pub struct RedisOptions {
    /// `redis://` or `rediss://` URL, possibly with credentials; for a
    /// Cluster, seed nodes separated by commas.
    pub url: String,
    /// Whether `url` names Redis Cluster nodes.
    pub cluster: bool,
    /// The primary's name, when `url` names Sentinels.
    pub sentinel: Option<String>,
    /// Password, when it is not in the URL.
    pub password: Option<String>,
    /// PEM certificates of a private CA to verify a `rediss://` server with.
    pub ca: Option<Vec<u8>>,
    /// Scope of the keys: the consumer's name.
    pub namespace: String,
    /// Timeout of every call.
    pub timeout: Duration,
    /// Hash tags the consumer's keys spread over (1: one slot).
    pub partitions: u16,
    /// What a detected store reset does.
    pub on_reset: ResetPolicy,
    /// Whether a completion waits for a replica.
    pub durability: Durability,
    /// Completions per second the consumer expects, if declared: sizes the
    /// shards of a window before its rate has been observed.
    pub expected_rate: Option<f64>,
}

impl RedisOptions {
    /// Options with the defaults for everything but where and whose.
    pub fn new(url: impl Into<String>, namespace: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            cluster: false,
            sentinel: None,
            password: None,
            ca: None,
            namespace: namespace.into(),
            timeout: Duration::from_millis(500),
            partitions: 1,
            on_reset: ResetPolicy::default(),
            durability: Durability::default(),
            expected_rate: None,
        }
    }
}

/// The Redis store. Cheap to clone; clones share one multiplexed connection
/// and the batching tasks.
#[derive(Clone)]
pub struct RedisStore {
    redis: Redis,
    partitions: Arc<[Partition]>,
    resets: Arc<AtomicU64>,
    settles: Arc<Batcher<SettleItem, Result<i64, StoreError>>>,
    renewals: Arc<Batcher<RenewItem, i64>>,
}

/// One hash tag of the consumer's keys, and the epoch last seen there.
struct Partition {
    prefix: String,
    seen: Mutex<Option<String>>,
}

/// The connection, with the timeout of every call.
#[derive(Clone)]
struct Redis {
    conn: Connection,
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

/// One transition of a settle batch.
enum SettleItem {
    Claim(ClaimItem),
    Complete(CompleteItem),
}

impl SettleItem {
    fn is_completion(&self) -> bool {
        matches!(self, Self::Complete(_))
    }

    fn digest(&self) -> &Digest16 {
        match self {
            Self::Claim(c) => &c.digest,
            Self::Complete(c) => &c.digest,
        }
    }

    fn retention_ms(&self) -> u64 {
        match self {
            Self::Claim(c) => c.retention_ms,
            Self::Complete(c) => c.retention_ms,
        }
    }
}

/// One claim of a batch: its arguments of `settle.lua`.
struct ClaimItem {
    digest: Digest16,
    fingerprint: Vec<u8>,
    token: String,
    lease_ms: u64,
    retention_ms: u64,
}

/// One completion of a batch: its arguments of `settle.lua`.
struct CompleteItem {
    digest: Digest16,
    token: String,
    retention_ms: u64,
}

/// One renewal of a batch: the arguments of `renew.lua` for one key.
struct RenewItem {
    partition: usize,
    in_progress: Vec<u8>,
    token: String,
    lease_ms: u64,
}

/// The scripts: settle (with `meta.lua`, its reading of the partition's
/// meta hash, ahead of it), release and renew.
fn scripts() -> &'static [Script; 3] {
    static SCRIPTS: std::sync::OnceLock<[Script; 3]> = std::sync::OnceLock::new();
    SCRIPTS.get_or_init(|| {
        [
            Script::new(&format!(
                "{}\n{}",
                include_str!("meta.lua"),
                include_str!("settle.lua")
            )),
            Script::new(include_str!("release.lua")),
            Script::new(include_str!("renew.lua")),
        ]
    })
}

/// A batch's shared arguments, computed once per batch.
struct BatchContext {
    redis: Redis,
    partitions: Arc<[Partition]>,
    resets: Arc<AtomicU64>,
    on_reset: ResetPolicy,
    /// Declared completions per second and partition, or 0.
    rate_per_partition: f64,
    /// With `durability: replicated`, the connection completions are written
    /// and `WAIT`ed on. Its own: `WAIT` blocks the connection it is sent on,
    /// and claims must not queue behind it (so they go in calls of their
    /// own then).
    replicated: Option<Redis>,
}

impl RedisStore {
    /// Creates the store, inside a tokio runtime (it spawns its batching
    /// tasks). It connects lazily and reconnects by itself, so it can be built
    /// while Redis is down; `ping` tells when it answers.
    pub fn new(options: RedisOptions) -> Result<Self, StoreError> {
        let conn = Connection::open(&Endpoint {
            url: &options.url,
            password: options.password.as_deref(),
            ca: options.ca.as_deref(),
            cluster: options.cluster,
            sentinel: options.sentinel.as_deref(),
            timeout: options.timeout,
        })?;
        let redis = Redis {
            conn,
            timeout: options.timeout,
        };
        let replicated = match options.durability {
            Durability::Local => None,
            // Calls may take twice the timeout: a WAIT waits up to one.
            Durability::Replicated => Some(Redis {
                conn: Connection::open(&Endpoint {
                    url: &options.url,
                    password: options.password.as_deref(),
                    ca: options.ca.as_deref(),
                    cluster: options.cluster,
                    sentinel: options.sentinel.as_deref(),
                    timeout: options.timeout * 2,
                })?,
                timeout: options.timeout * 2,
            }),
        };
        let partitions: Arc<[Partition]> =
            partition_prefixes(&options.namespace, options.partitions)
                .into_iter()
                .map(|prefix| Partition {
                    prefix,
                    seen: Mutex::new(None),
                })
                .collect();
        let context = Arc::new(BatchContext {
            redis: redis.clone(),
            partitions: partitions.clone(),
            resets: Arc::new(AtomicU64::new(0)),
            on_reset: options.on_reset,
            replicated,
            rate_per_partition: options.expected_rate.unwrap_or(0.0).max(0.0)
                / f64::from(options.partitions.max(1)),
        });
        Ok(Self {
            settles: Arc::new(Batcher::spawn("settle", {
                let context = context.clone();
                move |items| settle_batch(context.clone(), items)
            })),
            renewals: Arc::new(Batcher::spawn("renew", {
                let context = context.clone();
                move |items| renew_batch(context.clone(), items)
            })),
            resets: context.resets.clone(),
            redis,
            partitions,
        })
    }

    /// The prefix of every key this store writes (with several partitions,
    /// the part their prefixes share).
    pub fn prefix(&self) -> &str {
        let first = &self.partitions[0].prefix;
        if self.partitions.len() == 1 {
            first
        } else {
            // `idemq:{orders#0}:` → `idemq:{orders#`
            &first[..first.rfind('#').map_or(first.len(), |i| i + 1)]
        }
    }

    /// The prefix of each partition.
    pub fn partition_prefixes(&self) -> Vec<String> {
        self.partitions.iter().map(|p| p.prefix.clone()).collect()
    }
}

/// `idemq:{<namespace>}:` for one partition, `idemq:{<namespace>#<p>}:` for many.
pub fn partition_prefixes(namespace: &str, partitions: u16) -> Vec<String> {
    match partitions {
        0 | 1 => vec![format!("idemq:{{{namespace}}}:")],
        n => (0..n)
            .map(|p| format!("idemq:{{{namespace}#{p}}}:"))
            .collect(),
    }
}

/// What the items of one script call share: the partition, the retention
/// (ms) when the script takes it once per call (else 0), and whether they
/// must go apart from the other items (completions that wait for a
/// replica).
type CallGroup = (usize, u64, bool);

/// Runs `items` as one script call per [`CallGroup`], concurrently, and
/// answers in the order of `items`.
async fn per_call<I, O, F, Fut>(
    items: Vec<I>,
    group_of: impl Fn(&I) -> CallGroup,
    run: F,
) -> Result<Vec<O>, StoreError>
where
    F: Fn(CallGroup, Vec<I>) -> Fut,
    Fut: std::future::Future<Output = Result<Vec<O>, StoreError>>,
{
    let mut groups: Vec<(CallGroup, Vec<usize>, Vec<I>)> = Vec::new();
    for (index, item) in items.into_iter().enumerate() {
        let p = group_of(&item);
        match groups.iter_mut().find(|(q, ..)| *q == p) {
            Some((_, indexes, group)) => {
                indexes.push(index);
                group.push(item);
            }
            None => groups.push((p, vec![index], vec![item])),
        }
    }
    let total: usize = groups.iter().map(|(_, i, _)| i.len()).sum();
    let (placement, calls): (Vec<Vec<usize>>, Vec<_>) = groups
        .into_iter()
        .map(|(p, indexes, group)| (indexes, run(p, group)))
        .unzip();
    let answers = futures::future::try_join_all(calls).await?;
    let mut out: Vec<Option<O>> = (0..total).map(|_| None).collect();
    for (indexes, answer) in placement.into_iter().zip(answers) {
        for (index, value) in indexes.into_iter().zip(answer) {
            out[index] = Some(value);
        }
    }
    out.into_iter()
        .map(|o| {
            o.ok_or_else(|| StoreError::Protocol {
                op: "batch",
                detail: "a partition answered fewer items than it was given".into(),
            })
        })
        .collect()
}

/// Settles a batch: one `settle.lua` call per partition and retention
/// (and, with `durability: replicated`, per kind: claims stay off the
/// connection that waits for replicas). Each item gets its own answer: a
/// claim refused by an unacknowledged reset, or a completion no replica
/// confirmed, fails alone.
async fn settle_batch(
    context: Arc<BatchContext>,
    items: Vec<SettleItem>,
) -> Result<Vec<Result<i64, StoreError>>, StoreError> {
    let apart = context.replicated.is_some();
    let mut written: Vec<usize> = items
        .iter()
        .filter(|i| i.is_completion())
        .map(|i| i.digest().partition)
        .collect();
    written.sort_unstable();
    written.dedup();
    let mut answers = per_call(
        items,
        |i| {
            let kind = apart && i.is_completion();
            (i.digest().partition, i.retention_ms(), kind)
        },
        |(p, retention_ms, _), items| settle_call(context.clone(), p, retention_ms, items),
    )
    .await?;
    if let Some(redis) = &context.replicated {
        if !written.is_empty() {
            if let Err(e) = wait_for_replica(redis, &context, written).await {
                // Only the completions wait for a replica.
                for (answer, completed) in answers.iter_mut() {
                    if *completed {
                        *answer = Err(e.clone());
                    }
                }
            }
        }
    }
    Ok(answers.into_iter().map(|(answer, _)| answer).collect())
}

/// One `settle.lua` call: the completions, then the claims, of one
/// partition and retention. Answers each item in the order given, with
/// whether it was a completion.
async fn settle_call(
    context: Arc<BatchContext>,
    p: usize,
    retention_ms: u64,
    items: Vec<SettleItem>,
) -> Result<Vec<(Result<i64, StoreError>, bool)>, StoreError> {
    let partition = &context.partitions[p];
    let seen = partition
        .seen
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let completions = items.iter().filter(|i| i.is_completion()).count();
    let mut invocation = scripts()[0].prepare_invoke();
    invocation
        .arg(&partition.prefix)
        .arg(seen.as_deref().unwrap_or(""))
        .arg(new_epoch())
        .arg(window_width(retention_ms))
        .arg(if context.on_reset == ResetPolicy::FailClosed {
            "1"
        } else {
            "0"
        })
        .arg(retention_ms)
        .arg(context.rate_per_partition)
        .arg(completions);
    for item in &items {
        if let SettleItem::Complete(c) = item {
            invocation
                .key(&c.digest.in_progress)
                .arg(&c.digest.field)
                .arg(&c.token);
        }
    }
    for item in &items {
        if let SettleItem::Claim(c) = item {
            invocation
                .key(&c.digest.in_progress)
                .arg(&c.digest.field)
                .arg(&c.fingerprint)
                .arg(&c.token)
                .arg(c.lease_ms);
        }
    }
    let redis = match &context.replicated {
        Some(replicated) if completions > 0 => replicated,
        _ => &context.redis,
    };
    let (epoch, reset, claimed, completed): (String, String, Vec<i64>, Vec<i64>) =
        redis.invoke("settle", &invocation).await?;
    context.observe_epoch(partition, seen, epoch);
    if claimed.len() + completed.len() != items.len() {
        return Err(StoreError::Protocol {
            op: "settle",
            detail: format!(
                "{} answers to {} requests",
                claimed.len() + completed.len(),
                items.len()
            ),
        });
    }
    let (mut claimed, mut completed) = (claimed.into_iter(), completed.into_iter());
    Ok(items
        .iter()
        .map(|item| match item {
            SettleItem::Complete(_) => (Ok(completed.next().unwrap_or(0)), true),
            SettleItem::Claim(_) => match claimed.next().unwrap_or(REFUSED) {
                REFUSED => (
                    Err(StoreError::ResetUnacknowledged {
                        partition: partition.prefix.clone(),
                        record: reset.clone(),
                    }),
                    false,
                ),
                status => (Ok(status), false),
            },
        })
        .collect())
}

/// `durability: replicated`: waits until a replica has every write of this
/// connection so far. `WAIT` covers every write sent on the connection to
/// that node, so one call per partition written confirms a whole batch;
/// only where it wrote (on a Cluster, a shard without a replica holds up
/// only its own partitions).
async fn wait_for_replica(
    redis: &Redis,
    context: &BatchContext,
    mut written: Vec<usize>,
) -> Result<(), StoreError> {
    let wait_ms = (redis.timeout / 2).as_millis() as u64;
    if !redis.conn.is_cluster() {
        written.truncate(1);
    }
    let waits = written.iter().map(|&p| {
        let mut conn = redis.conn.clone();
        let key = &context.partitions[p].prefix;
        redis.bounded("wait replica", async move {
            conn.wait_replicas(key, 1, wait_ms).await
        })
    });
    let replicas = futures::future::try_join_all(waits).await?;
    if replicas.iter().any(|&r| r < 1) {
        return Err(StoreError::Unreplicated {
            timeout: redis.timeout / 2,
        });
    }
    Ok(())
}

impl BatchContext {
    /// Compares the epoch a claim found with the one seen before: a change
    /// means the partition's state was lost since.
    fn observe_epoch(&self, partition: &Partition, seen: Option<String>, epoch: String) {
        if seen.as_deref() == Some(epoch.as_str()) {
            return;
        }
        let mut current = partition.seen.lock().unwrap_or_else(|e| e.into_inner());
        // Batches run concurrently: act only on a batch sent with the epoch
        // that is still current, not on one that another batch overtook.
        if current.as_deref() == Some(epoch.as_str()) || *current != seen {
            return;
        }
        if let Some(old) = current.replace(epoch.clone()) {
            self.resets.fetch_add(1, Ordering::Relaxed);
            tracing::error!(
                partition = %partition.prefix,
                old_epoch = %old,
                new_epoch = %epoch,
                policy = ?self.on_reset,
                "key store reset: the store lost the completed keys it held (restart without persistence, failover to a lagging replica, or a flush); duplicates of messages completed before it will be processed again"
            );
        }
    }
}

async fn renew_batch(
    context: Arc<BatchContext>,
    items: Vec<RenewItem>,
) -> Result<Vec<i64>, StoreError> {
    per_call(
        items,
        |i| (i.partition, 0, false),
        |_, items| {
            let context = context.clone();
            async move {
                let mut invocation = scripts()[2].prepare_invoke();
                for item in &items {
                    invocation
                        .key(&item.in_progress)
                        .arg(&item.token)
                        .arg(item.lease_ms);
                }
                context.redis.invoke("renew", &invocation).await
            }
        },
    )
    .await
}

/// The parts of a key's digest the scripts need. The scripts take a
/// window's shard from the digest's leading bits, which they read in
/// `in_progress`.
struct Digest16 {
    partition: usize,
    in_progress: Vec<u8>,
    field: Vec<u8>,
}

impl RedisStore {
    fn digest(&self, key: &str) -> Digest16 {
        let hash = Sha256::digest(key.as_bytes());
        let digest = &hash[..16];
        // The partition comes from bytes the shard does not use.
        let partition =
            usize::from(u16::from_be_bytes([digest[14], digest[15]])) % self.partitions.len();
        let prefix = &self.partitions[partition].prefix;
        let mut in_progress = Vec::with_capacity(prefix.len() + 2 + digest.len());
        in_progress.extend_from_slice(prefix.as_bytes());
        in_progress.extend_from_slice(b"p:");
        in_progress.extend_from_slice(digest);
        Digest16 {
            partition,
            in_progress,
            field: digest[FIELD_FROM..].to_vec(),
        }
    }
}

/// Width in ms of the windows of a partition first written with this
/// retention: a quarter of it, at least 1s.
fn window_width(retention_ms: u64) -> u64 {
    (retention_ms / u64::from(WINDOWS_PER_RETENTION)).max(1000)
}

fn new_epoch() -> String {
    format!("{:016x}", rand::random::<u64>())
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
        let token = Token::random();
        let status = self
            .settles
            .call(SettleItem::Claim(ClaimItem {
                digest: self.digest(key),
                fingerprint: short_fingerprint(fingerprint),
                token: token.0.clone(),
                lease_ms: millis(lease),
                retention_ms: millis(retention),
            }))
            .await??;
        match status {
            ACQUIRED => Ok(Claim::Acquired { token }),
            COMPLETED => Ok(Claim::Completed),
            CONFLICT => Ok(Claim::Conflict),
            pttl if pttl >= 0 => Ok(Claim::InFlight {
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
            .settles
            .call(SettleItem::Complete(CompleteItem {
                digest: self.digest(key),
                token: token.0.clone(),
                retention_ms: millis(retention),
            }))
            .await??;
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
        let mut invocation = scripts()[1].prepare_invoke();
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
        let digest = self.digest(key);
        let renewed = self
            .renewals
            .call(RenewItem {
                partition: digest.partition,
                in_progress: digest.in_progress,
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

    fn resets(&self) -> u64 {
        self.resets.load(Ordering::Relaxed)
    }
}
