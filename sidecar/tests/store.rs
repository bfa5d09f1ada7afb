//! The key store's behaviour, as one suite run against every store: the real
//! Redis on loopback, the local Redis Cluster (keys spread over many slots)
//! and the in-memory twin.

mod common;

use std::time::Duration;

use idemq_sidecar::store::{Claim, KeyStore, Token, Transition};

const LEASE: Duration = Duration::from_secs(30);
const RETENTION: Duration = Duration::from_secs(3600);

/// Runs each behaviour below once per store, as tests named `<store>::<behaviour>`.
macro_rules! for_every_store {
    ($($name:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(&idemq_sidecar::store::memory::MemoryStore::new()).await;
                }
            )*
        }
        mod redis {
            $(
                #[tokio::test]
                async fn $name() {
                    let store = crate::common::redis::store(stringify!($name)).await;
                    super::$name(&store).await;
                    crate::common::redis::cleanup(store.prefix()).await;
                }
            )*
        }
        mod redis_cluster {
            $(
                #[tokio::test]
                async fn $name() {
                    let store = crate::common::redis::cluster::store(stringify!($name)).await;
                    super::$name(&store).await;
                    crate::common::redis::cluster::cleanup(store.prefix()).await;
                }
            )*
        }
    };
}

for_every_store!(
    absent_key_is_acquired,
    held_key_is_in_flight_until_its_lease_ends,
    completed_key_is_reported_completed,
    released_key_can_be_claimed_again,
    wrong_token_cannot_complete_or_release,
    expired_lease_lets_another_holder_in_and_fences_the_first,
    expired_lease_without_takeover_still_completes,
    completed_key_is_forgotten_after_retention,
    other_fingerprint_is_a_conflict_while_in_flight,
    other_fingerprint_is_a_conflict_after_completion,
    missing_fingerprint_never_conflicts,
    concurrent_claims_of_one_key_have_exactly_one_winner,
    keys_are_independent,
    store_answers_ping,
    renewal_keeps_a_claim_past_its_first_lease,
    renewal_by_a_holder_that_lost_the_key_is_refused,
    renewal_of_a_completed_or_released_key_is_refused,
    concurrent_renewals_each_get_their_own_answer,
    retention_change_keeps_completed_keys,
);

async fn acquire<S: KeyStore>(
    store: &S,
    key: &str,
    fingerprint: Option<&str>,
    lease: Duration,
) -> Token {
    match store
        .claim(key, fingerprint, lease, RETENTION)
        .await
        .expect("claim")
    {
        Claim::Acquired { token } => token,
        other => panic!("expected to acquire {key}, got {other:?}"),
    }
}

async fn claim<S: KeyStore>(store: &S, key: &str, fingerprint: Option<&str>) -> Claim {
    store
        .claim(key, fingerprint, LEASE, RETENTION)
        .await
        .expect("claim")
}

async fn absent_key_is_acquired<S: KeyStore>(store: &S) {
    let token = acquire(store, "order-1", Some("fp"), LEASE).await;
    assert!(!token.0.is_empty());
}

async fn held_key_is_in_flight_until_its_lease_ends<S: KeyStore>(store: &S) {
    acquire(store, "order-1", None, LEASE).await;
    match claim(store, "order-1", None).await {
        Claim::InFlight { retry_after } => {
            assert!(
                retry_after <= LEASE,
                "retry_after {retry_after:?} beyond the lease"
            );
            assert!(
                retry_after > LEASE - Duration::from_secs(5),
                "retry_after {retry_after:?}"
            );
        }
        other => panic!("expected in flight, got {other:?}"),
    }
}

async fn completed_key_is_reported_completed<S: KeyStore>(store: &S) {
    let token = acquire(store, "order-1", Some("fp"), LEASE).await;
    assert_eq!(
        store
            .complete("order-1", &token, RETENTION)
            .await
            .expect("complete"),
        Transition::Done
    );
    assert_eq!(claim(store, "order-1", Some("fp")).await, Claim::Completed);
    // Completing twice is refused: the claim is no longer held.
    assert_eq!(
        store
            .complete("order-1", &token, RETENTION)
            .await
            .expect("complete"),
        Transition::Stale
    );
    assert_eq!(claim(store, "order-1", Some("fp")).await, Claim::Completed);
}

async fn released_key_can_be_claimed_again<S: KeyStore>(store: &S) {
    let first = acquire(store, "order-1", None, LEASE).await;
    assert_eq!(
        store.release("order-1", &first).await.expect("release"),
        Transition::Done
    );
    let second = acquire(store, "order-1", None, LEASE).await;
    assert_ne!(first, second, "each claim gets its own token");
    // The first token no longer holds anything.
    assert_eq!(
        store.release("order-1", &first).await.expect("release"),
        Transition::Stale
    );
}

async fn wrong_token_cannot_complete_or_release<S: KeyStore>(store: &S) {
    let token = acquire(store, "order-1", None, LEASE).await;
    let forged = Token("0123456789abcdef0123456789abcdef".into());
    let short = Token("nope".into());
    for wrong in [&forged, &short] {
        assert_eq!(
            store
                .complete("order-1", wrong, RETENTION)
                .await
                .expect("complete"),
            Transition::Stale
        );
        assert_eq!(
            store.release("order-1", wrong).await.expect("release"),
            Transition::Stale
        );
    }
    assert!(matches!(
        claim(store, "order-1", None).await,
        Claim::InFlight { .. }
    ));
    assert_eq!(
        store
            .complete("order-1", &token, RETENTION)
            .await
            .expect("complete"),
        Transition::Done
    );
}

async fn expired_lease_lets_another_holder_in_and_fences_the_first<S: KeyStore>(store: &S) {
    let short = Duration::from_millis(300);
    let a = acquire(store, "order-1", None, short).await;
    tokio::time::sleep(short + Duration::from_millis(200)).await;
    let b = acquire(store, "order-1", None, LEASE).await;
    assert_eq!(
        store
            .complete("order-1", &a, RETENTION)
            .await
            .expect("complete"),
        Transition::Stale
    );
    assert_eq!(
        store.release("order-1", &a).await.expect("release"),
        Transition::Stale
    );
    assert!(
        matches!(claim(store, "order-1", None).await, Claim::InFlight { .. }),
        "B still holds the key"
    );
    assert_eq!(
        store
            .complete("order-1", &b, RETENTION)
            .await
            .expect("complete"),
        Transition::Done
    );
    assert_eq!(claim(store, "order-1", None).await, Claim::Completed);
    // A late completion by the fenced holder changes nothing.
    assert_eq!(
        store
            .complete("order-1", &a, RETENTION)
            .await
            .expect("complete"),
        Transition::Stale
    );
}

async fn expired_lease_without_takeover_still_completes<S: KeyStore>(store: &S) {
    let short = Duration::from_millis(200);
    let a = acquire(store, "order-1", Some("fp"), short).await;
    tokio::time::sleep(short + Duration::from_millis(200)).await;
    assert_eq!(
        store
            .complete("order-1", &a, RETENTION)
            .await
            .expect("complete"),
        Transition::Done
    );
    assert_eq!(claim(store, "order-1", None).await, Claim::Completed);
}

async fn completed_key_is_forgotten_after_retention<S: KeyStore>(store: &S) {
    let retention = Duration::from_secs(1);
    let token = match store
        .claim("order-1", None, LEASE, retention)
        .await
        .expect("claim")
    {
        Claim::Acquired { token } => token,
        other => panic!("expected to acquire, got {other:?}"),
    };
    assert_eq!(
        store
            .complete("order-1", &token, retention)
            .await
            .expect("complete"),
        Transition::Done
    );
    // Well inside the retention, even if the sleep overshoots on a busy machine.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let early = store
        .claim("order-1", None, LEASE, retention)
        .await
        .expect("claim");
    assert_eq!(
        early,
        Claim::Completed,
        "remembered for the whole retention"
    );
    // Stores may keep a key up to one window (a quarter of the retention the
    // store was first used with, at least 1s) past its retention.
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let late = store
        .claim("order-1", None, LEASE, retention)
        .await
        .expect("claim");
    assert!(
        matches!(late, Claim::Acquired { .. }),
        "forgotten after retention, got {late:?}"
    );
}

async fn other_fingerprint_is_a_conflict_while_in_flight<S: KeyStore>(store: &S) {
    acquire(store, "order-1", Some("body-a"), LEASE).await;
    assert_eq!(
        claim(store, "order-1", Some("body-b")).await,
        Claim::Conflict
    );
    assert!(matches!(
        claim(store, "order-1", Some("body-a")).await,
        Claim::InFlight { .. }
    ));
}

async fn other_fingerprint_is_a_conflict_after_completion<S: KeyStore>(store: &S) {
    let token = acquire(store, "order-1", Some("body-a"), LEASE).await;
    store
        .complete("order-1", &token, RETENTION)
        .await
        .expect("complete");
    assert_eq!(
        claim(store, "order-1", Some("body-b")).await,
        Claim::Conflict
    );
    assert_eq!(
        claim(store, "order-1", Some("body-a")).await,
        Claim::Completed
    );
}

async fn missing_fingerprint_never_conflicts<S: KeyStore>(store: &S) {
    let token = acquire(store, "order-1", None, LEASE).await;
    assert!(matches!(
        claim(store, "order-1", Some("body-b")).await,
        Claim::InFlight { .. }
    ));
    store
        .complete("order-1", &token, RETENTION)
        .await
        .expect("complete");
    assert_eq!(
        claim(store, "order-1", Some("body-b")).await,
        Claim::Completed
    );
    let token = acquire(store, "order-2", Some("body-a"), LEASE).await;
    store
        .complete("order-2", &token, RETENTION)
        .await
        .expect("complete");
    assert_eq!(claim(store, "order-2", None).await, Claim::Completed);
}

async fn concurrent_claims_of_one_key_have_exactly_one_winner<S: KeyStore + Clone>(store: &S) {
    let tasks: Vec<_> = (0..64)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move { store.claim("order-1", Some("fp"), LEASE, RETENTION).await })
        })
        .collect();
    let mut acquired = 0;
    let mut in_flight = 0;
    for task in tasks {
        match task.await.expect("task").expect("claim") {
            Claim::Acquired { .. } => acquired += 1,
            Claim::InFlight { .. } => in_flight += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!((acquired, in_flight), (1, 63));
}

async fn keys_are_independent<S: KeyStore>(store: &S) {
    let a = acquire(store, "order-1", None, LEASE).await;
    acquire(store, "order-2", None, LEASE).await;
    store
        .complete("order-1", &a, RETENTION)
        .await
        .expect("complete");
    assert_eq!(claim(store, "order-1", None).await, Claim::Completed);
    assert!(matches!(
        claim(store, "order-2", None).await,
        Claim::InFlight { .. }
    ));
    acquire(store, "order-3", None, LEASE).await;
}

async fn store_answers_ping<S: KeyStore>(store: &S) {
    store.ping().await.expect("ping");
}

#[tokio::test]
async fn redis_keeps_one_hash_field_per_completed_key_and_no_claim_behind() {
    let store = common::redis::store("layout").await;
    for i in 0..50 {
        let key = format!("order-{i}");
        let token = acquire(&store, &key, Some("fp"), LEASE).await;
        store
            .complete(&key, &token, RETENTION)
            .await
            .expect("complete");
    }
    let in_progress = common::redis::count(&format!("{}p:", store.prefix())).await;
    let buckets = common::redis::count(&format!("{}c:", store.prefix())).await;
    assert_eq!(in_progress, 0, "completing removes the in-progress key");
    assert!((1..=50).contains(&buckets), "{buckets} buckets");
    common::redis::cleanup(store.prefix()).await;
    assert_eq!(common::redis::count(store.prefix()).await, 0);
}

/// A bucket's expiry is set when its first key creates it, and only looked
/// at again by a completion that must outlive the window's earliest bucket:
/// a longer retention (a rollout lengthening it) lengthens the life of every
/// bucket it writes to, a shorter one never shortens it.
#[tokio::test]
async fn redis_bucket_lives_as_long_as_its_longest_retained_key() {
    use sha2::{Digest, Sha256};
    let store = common::redis::store("expiry").await;
    let mut conn = common::redis::connection(common::redis::URL).await;
    let long = RETENTION * 2;
    let complete = async |key: &str, retention: Duration| {
        let token = acquire(&store, key, None, LEASE).await;
        let done = store
            .complete(key, &token, retention)
            .await
            .expect("complete");
        assert_eq!(done, Transition::Done);
    };
    // Window width: a quarter of the first retention; 12 shard bits.
    let width = RETENTION.as_millis() as u64 / 4;
    let bucket_of = |key: &str, window: u64| {
        let digest = &Sha256::digest(key.as_bytes())[..16];
        let shard = u32::from_be_bytes([0, digest[0], digest[1], digest[2]]) >> 12;
        format!("{}c:{width}:{window}:{shard}", store.prefix())
    };
    for i in 0..300 {
        complete(&format!("short-{i}"), RETENTION).await;
    }
    let (seconds, micros): (u64, u64) = ::redis::cmd("TIME").query_async(&mut conn).await.unwrap();
    let window = (seconds * 1000 + micros / 1000) / width;
    let ttl = async |conn: &mut ::redis::aio::MultiplexedConnection, bucket: &str| -> u64 {
        ::redis::cmd("PTTL")
            .arg(bucket)
            .query_async(conn)
            .await
            .unwrap()
    };
    // Keys of the long retention that land in buckets the short one created.
    let mut shared = Vec::new();
    for i in 0.. {
        let key = format!("long-{i}");
        let bucket = bucket_of(&key, window);
        let exists: bool = ::redis::cmd("EXISTS")
            .arg(&bucket)
            .query_async(&mut conn)
            .await
            .unwrap();
        if exists {
            assert!(ttl(&mut conn, &bucket).await <= (RETENTION * 5 / 4).as_millis() as u64);
            complete(&key, long).await;
            shared.push(bucket);
            if shared.len() == 5 {
                break;
            }
        }
    }
    // Every shared bucket lives at least the long retention (less `slack` ms).
    let outlive = async |conn: &mut ::redis::aio::MultiplexedConnection, slack: u64| {
        for bucket in &shared {
            let left = ttl(conn, bucket).await;
            assert!(
                left > long.as_millis() as u64 - slack,
                "{bucket} lives {left} ms more"
            );
        }
    };
    outlive(&mut conn, 1000).await;
    // The short retention again, into the same buckets: never shortened.
    for i in 0.. {
        let key = format!("short-again-{i}");
        if shared.contains(&bucket_of(&key, window)) {
            complete(&key, RETENTION).await;
            break;
        }
    }
    outlive(&mut conn, 2000).await;
    common::redis::cleanup(store.prefix()).await;
}

/// A store first written by a version without the meta hash kept completed
/// keys in buckets of 12 shard bits and a quarter of the retention wide: the
/// meta hash created later still finds them, and marks only the windows that
/// hold buckets (each marked window costs every claim a lookup).
#[tokio::test]
async fn redis_buckets_written_before_the_meta_hash_stay_completed() {
    use sha2::{Digest, Sha256};
    let store = common::redis::store("legacy").await;
    let mut conn = common::redis::connection(common::redis::URL).await;
    let (seconds, micros): (u64, u64) = ::redis::cmd("TIME").query_async(&mut conn).await.unwrap();
    let width = RETENTION.as_millis() as u64 / 4;
    let window = (seconds * 1000 + micros / 1000) / width - 2;
    let digest = &Sha256::digest(b"order-old")[..16];
    let shard = u32::from_be_bytes([0, digest[0], digest[1], digest[2]]) >> 12;
    let bucket = format!("{}c:{width}:{window}:{shard}", store.prefix());
    let _: i64 = ::redis::cmd("HSET")
        .arg(&bucket)
        .arg(&digest[2..])
        .arg("")
        .query_async(&mut conn)
        .await
        .unwrap();

    assert_eq!(claim(&store, "order-old", None).await, Claim::Completed);
    acquire(&store, "order-new", None, LEASE).await;
    let marked: Vec<String> = ::redis::cmd("HKEYS")
        .arg(format!("{}m", store.prefix()))
        .query_async(&mut conn)
        .await
        .unwrap();
    let marked: Vec<&String> = marked.iter().filter(|f| f.starts_with("b:")).collect();
    assert_eq!(marked, [&format!("b:{window}")], "windows marked readable");
    common::redis::cleanup(store.prefix()).await;
}

/// Keys spread over the consumer's hash tags, so over the primaries serving
/// their slots; a batch of mixed keys still runs (a script call naming keys
/// of two slots would fail with CROSSSLOT).
#[tokio::test]
async fn redis_cluster_spreads_a_consumers_keys_over_the_primaries_of_its_slots() {
    use common::redis::cluster;
    let store = cluster::store("spread").await;
    let keys: Vec<String> = (0..300).map(|i| format!("order-{i}")).collect();
    futures::future::join_all(keys.iter().map(|key| {
        let store = store.clone();
        async move {
            let token = acquire(&store, key, Some("fp"), LEASE).await;
            let done = store.complete(key, &token, RETENTION).await;
            assert_eq!(done.expect("complete"), Transition::Done);
        }
    }))
    .await;
    let mut expected = std::collections::BTreeSet::new();
    for prefix in store.partition_prefixes() {
        expected.insert(cluster::primary_of(&prefix).await);
    }
    let counts = cluster::count_per_primary(store.prefix()).await;
    let holding: std::collections::BTreeSet<u16> = counts
        .iter()
        .filter(|(_, n)| *n > 0)
        .map(|(port, _)| *port)
        .collect();
    println!(
        "{} keys over {} partitions: keys per primary {counts:?}",
        keys.len(),
        cluster::PARTITIONS
    );
    assert_eq!(holding, expected, "keys sit where their slots are served");
    assert!(holding.len() > 1, "one consumer spans several primaries");
    for key in &keys {
        assert_eq!(claim(&store, key, Some("fp")).await, Claim::Completed);
    }
    cluster::cleanup(store.prefix()).await;
    let left: usize = cluster::count_per_primary(store.prefix())
        .await
        .iter()
        .map(|(_, n)| n)
        .sum();
    assert_eq!(left, 0);
}

#[tokio::test]
async fn redis_down_is_an_error_not_a_verdict() {
    use idemq_sidecar::store::redis::{RedisOptions, RedisStore};
    // Nothing listens on port 1.
    let store = RedisStore::new(RedisOptions {
        timeout: Duration::from_millis(300),
        ..RedisOptions::new("redis://127.0.0.1:1", common::unique("down"))
    })
    .expect("options");
    assert!(store.ping().await.is_err());
    assert!(store
        .claim("order-1", None, LEASE, RETENTION)
        .await
        .is_err());
}

async fn renewal_keeps_a_claim_past_its_first_lease<S: KeyStore>(store: &S) {
    let short = Duration::from_millis(400);
    let a = acquire(store, "order-1", Some("fp"), short).await;
    // Renewed at a third of the lease, three times: held for 1.2 s in all,
    // three times the first lease.
    for _ in 0..3 {
        tokio::time::sleep(short / 3).await;
        assert_eq!(
            store.renew("order-1", &a, short).await.expect("renew"),
            Transition::Done
        );
    }
    tokio::time::sleep(short / 2).await;
    assert!(
        matches!(
            claim(store, "order-1", Some("fp")).await,
            Claim::InFlight { .. }
        ),
        "the renewed claim still holds the key"
    );
    assert_eq!(
        store
            .complete("order-1", &a, RETENTION)
            .await
            .expect("complete"),
        Transition::Done
    );
    assert_eq!(claim(store, "order-1", Some("fp")).await, Claim::Completed);
}

async fn renewal_by_a_holder_that_lost_the_key_is_refused<S: KeyStore>(store: &S) {
    let short = Duration::from_millis(200);
    let a = acquire(store, "order-1", None, short).await;
    tokio::time::sleep(short + Duration::from_millis(200)).await;
    // Expired and free: the holder learns it lost the key, and does not get it back.
    assert_eq!(
        store.renew("order-1", &a, LEASE).await.expect("renew"),
        Transition::Stale
    );
    let b = acquire(store, "order-1", None, LEASE).await;
    assert_eq!(
        store.renew("order-1", &a, LEASE).await.expect("renew"),
        Transition::Stale,
        "B holds the key now"
    );
    assert_eq!(
        store.renew("order-1", &b, LEASE).await.expect("renew"),
        Transition::Done
    );
    assert_eq!(
        store
            .renew("order-1", &Token("x".repeat(32)), LEASE)
            .await
            .expect("renew"),
        Transition::Stale,
        "a token that never held the key"
    );
}

async fn renewal_of_a_completed_or_released_key_is_refused<S: KeyStore>(store: &S) {
    let a = acquire(store, "order-1", None, LEASE).await;
    store
        .complete("order-1", &a, RETENTION)
        .await
        .expect("complete");
    assert_eq!(
        store.renew("order-1", &a, LEASE).await.expect("renew"),
        Transition::Stale
    );
    assert_eq!(claim(store, "order-1", None).await, Claim::Completed);
    let b = acquire(store, "order-2", None, LEASE).await;
    store.release("order-2", &b).await.expect("release");
    assert_eq!(
        store.renew("order-2", &b, LEASE).await.expect("renew"),
        Transition::Stale
    );
    assert!(matches!(
        claim(store, "order-2", None).await,
        Claim::Acquired { .. }
    ));
}

async fn concurrent_renewals_each_get_their_own_answer<S: KeyStore + Clone>(store: &S) {
    // Half of the keys are released before the renewals: those must answer
    // Stale and the others Done, however the renewals are batched.
    let mut tokens = Vec::new();
    for i in 0..200 {
        let key = format!("order-{i}");
        let token = acquire(store, &key, None, LEASE).await;
        if i % 2 == 1 {
            store.release(&key, &token).await.expect("release");
        }
        tokens.push((key, token));
    }
    let answers = futures::future::join_all(tokens.iter().map(|(key, token)| {
        let store = store.clone();
        async move { store.renew(key, token, LEASE).await.expect("renew") }
    }))
    .await;
    for (i, answer) in answers.iter().enumerate() {
        let expected = if i % 2 == 0 {
            Transition::Done
        } else {
            Transition::Stale
        };
        assert_eq!(*answer, expected, "order-{i}");
    }
}

/// The retention changes both ways between a completion and its duplicate:
/// what was completed stays visible as long as the old or the new retention
/// says, whichever is longer.
async fn retention_change_keeps_completed_keys<S: KeyStore>(store: &S) {
    let short = Duration::from_secs(2);
    let long = Duration::from_secs(8);
    let acquire_for = |key: &'static str, retention| async move {
        match store
            .claim(key, None, LEASE, retention)
            .await
            .expect("claim")
        {
            Claim::Acquired { token } => token,
            other => panic!("expected to acquire {key}, got {other:?}"),
        }
    };

    // Lengthened: completed under the short retention, claimed under the long.
    let token = acquire_for("lengthened", short).await;
    store
        .complete("lengthened", &token, short)
        .await
        .expect("complete");
    let token = acquire_for("shortened", long).await;
    store
        .complete("shortened", &token, long)
        .await
        .expect("complete");
    assert_eq!(
        store
            .claim("lengthened", None, LEASE, long)
            .await
            .expect("claim"),
        Claim::Completed,
        "a longer retention still sees what was completed under the shorter one"
    );

    // Shortened: past the new (short) retention, inside the old (long) one.
    tokio::time::sleep(short + Duration::from_millis(1500)).await;
    assert_eq!(
        store
            .claim("shortened", None, LEASE, short)
            .await
            .expect("claim"),
        Claim::Completed,
        "a shorter retention still sees what the longer one keeps"
    );
}

/// A store of a test-owned redis-server, with the given reset policy.
fn own_store(
    redis: &common::redis::OwnRedis,
    on_reset: idemq_sidecar::config::ResetPolicy,
) -> idemq_sidecar::store::redis::RedisStore {
    use idemq_sidecar::store::redis::{RedisOptions, RedisStore};
    RedisStore::new(RedisOptions {
        on_reset,
        ..RedisOptions::new(redis.url(), common::unique("reset"))
    })
    .expect("options")
}

async fn flushall(redis: &common::redis::OwnRedis) {
    let mut conn = redis.connection().await.expect("own redis");
    let _: () = ::redis::cmd("FLUSHALL")
        .query_async(&mut conn)
        .await
        .expect("FLUSHALL");
}

/// Completes `key` and claims it again, so the store has seen its epoch.
async fn complete_and_see<S: KeyStore>(store: &S, key: &str) {
    let token = acquire(store, key, None, LEASE).await;
    store
        .complete(key, &token, RETENTION)
        .await
        .expect("complete");
    assert_eq!(claim(store, key, None).await, Claim::Completed);
}

#[tokio::test]
async fn redis_flush_is_detected_within_one_claim_and_fails_closed_until_acknowledged() {
    use idemq_sidecar::config::ResetPolicy;
    use idemq_sidecar::store::StoreError;
    // Never the shared server: this test flushes everything.
    let redis = common::redis::OwnRedis::start(&["--save", "", "--appendonly", "no"]).await;
    let store = own_store(&redis, ResetPolicy::FailClosed);
    complete_and_see(&store, "order-7").await;
    assert_eq!(store.resets(), 0);

    flushall(&redis).await;
    let refused = store.claim("order-7", None, LEASE, RETENTION).await;
    assert!(
        matches!(refused, Err(StoreError::ResetUnacknowledged { .. })),
        "the first claim after the flush is refused, got {refused:?}"
    );
    assert_eq!(store.resets(), 1, "detected by that one claim");
    // A second sidecar that never saw the old epoch is held back too.
    let other = idemq_sidecar::store::redis::RedisStore::new(
        idemq_sidecar::store::redis::RedisOptions::new(redis.url(), store_namespace(&store)),
    )
    .expect("options");
    assert!(matches!(
        other.claim("order-8", None, LEASE, RETENTION).await,
        Err(StoreError::ResetUnacknowledged { .. })
    ));
    assert_eq!(
        other.resets(),
        0,
        "it saw no epoch before, so it counts none"
    );

    // A person acknowledges: the reset record goes.
    let mut conn = redis.connection().await.expect("own redis");
    let _: i64 = ::redis::cmd("HDEL")
        .arg(format!("{}m", store.prefix()))
        .arg("reset")
        .query_async(&mut conn)
        .await
        .expect("HDEL");
    assert!(
        matches!(claim(&store, "order-7", None).await, Claim::Acquired { .. }),
        "the store forgot order-7, as the reset said"
    );
    assert_eq!(store.resets(), 1, "the reset is counted once");
}

#[tokio::test]
async fn redis_flush_with_continue_is_counted_and_claims_go_on() {
    use idemq_sidecar::config::ResetPolicy;
    let redis = common::redis::OwnRedis::start(&["--save", "", "--appendonly", "no"]).await;
    let store = own_store(&redis, ResetPolicy::Continue);
    complete_and_see(&store, "order-7").await;
    flushall(&redis).await;
    assert!(matches!(
        claim(&store, "order-7", None).await,
        Claim::Acquired { .. }
    ));
    assert_eq!(store.resets(), 1);
    // The record stays for the operator to report.
    let mut conn = redis.connection().await.expect("own redis");
    let record: Option<String> = ::redis::cmd("HGET")
        .arg(format!("{}m", store.prefix()))
        .arg("reset")
        .query_async(&mut conn)
        .await
        .expect("HGET");
    assert!(
        record.is_some_and(|r| r.contains('>')),
        "reset record written"
    );
}

#[tokio::test]
async fn redis_restart_with_append_only_file_keeps_completed_keys_and_is_no_reset() {
    use idemq_sidecar::config::ResetPolicy;
    // The managed store's persistence settings.
    let mut redis = common::redis::OwnRedis::start(&[
        "--save",
        "",
        "--appendonly",
        "yes",
        "--appendfsync",
        "everysec",
    ])
    .await;
    let store = own_store(&redis, ResetPolicy::FailClosed);
    complete_and_see(&store, "order-7").await;
    redis.restart().await;
    let mut answer = None;
    // The store reconnects by itself; a call may fail while it does.
    for _ in 0..50 {
        match store.claim("order-7", None, LEASE, RETENTION).await {
            Ok(claim) => {
                answer = Some(claim);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    assert_eq!(answer, Some(Claim::Completed), "kept across the restart");
    assert_eq!(store.resets(), 0);
}

/// The namespace of a store with one partition: `idemq:{<ns>}:`.
fn store_namespace(store: &idemq_sidecar::store::redis::RedisStore) -> String {
    store
        .prefix()
        .trim_start_matches("idemq:{")
        .trim_end_matches("}:")
        .to_string()
}

/// Waits until `replica` has synced with its primary.
async fn wait_until_synced(replica: &common::redis::OwnRedis) {
    let mut on_replica = replica.connection().await.expect("replica answers");
    let linked = common::scenarios::wait_for(Duration::from_secs(20), async || {
        let info: String = ::redis::cmd("INFO")
            .arg("replication")
            .query_async(&mut on_replica)
            .await
            .unwrap_or_default();
        info.contains("master_link_status:up")
    })
    .await;
    assert!(linked, "the replica synced with its primary");
}

fn replicated_store(redis: &common::redis::OwnRedis) -> idemq_sidecar::store::redis::RedisStore {
    use idemq_sidecar::store::redis::{Durability, RedisOptions, RedisStore};
    RedisStore::new(RedisOptions {
        durability: Durability::Replicated,
        timeout: Duration::from_millis(400),
        ..RedisOptions::new(redis.url(), common::unique("replicated"))
    })
    .expect("options")
}

/// `durability: replicated`: when `complete` answers, the replica already
/// holds the completed key.
#[tokio::test]
async fn replicated_completion_is_on_the_replica_when_it_answers() {
    let primary = common::redis::OwnRedis::start(&["--save", "", "--appendonly", "no"]).await;
    let replica_of = format!("127.0.0.1 {}", primary.port);
    let replica = common::redis::OwnRedis::start(&[
        "--save",
        "",
        "--appendonly",
        "no",
        "--repl-diskless-sync-delay",
        "0",
        "--replicaof",
        &replica_of,
    ])
    .await;
    wait_until_synced(&replica).await;
    let mut on_replica = replica.connection().await.expect("replica answers");
    let store = replicated_store(&primary);
    for i in 0..20 {
        let key = format!("order-{i}");
        let token = acquire(&store, &key, Some("fp"), LEASE).await;
        let done = store.complete(&key, &token, RETENTION).await;
        assert_eq!(done.expect("a replica confirms"), Transition::Done);
        // Read on the replica at once: the completion bucket is there.
        let (_, buckets): (u64, Vec<String>) = ::redis::cmd("SCAN")
            .arg(0)
            .arg("MATCH")
            .arg(format!("{}c:*", store.prefix()))
            .arg("COUNT")
            .arg(10_000)
            .query_async(&mut on_replica)
            .await
            .expect("SCAN on the replica");
        let mut fields = 0u64;
        for bucket in &buckets {
            let names: Vec<Vec<u8>> = ::redis::cmd("HKEYS")
                .arg(bucket)
                .query_async(&mut on_replica)
                .await
                .expect("HKEYS");
            // The empty field is the bucket's marker, not a key.
            fields += names.iter().filter(|n| !n.is_empty()).count() as u64;
        }
        assert_eq!(fields, i + 1, "the replica holds every completion so far");
    }
}

/// Redis Sentinel: the primary is killed mid-stream. The Sentinels promote
/// its replica, the store follows them to it, and every completion that the
/// replica confirmed (`durability: replicated`) is still there: no completed
/// key is lost and no reset is reported.
#[tokio::test]
async fn sentinel_failover_keeps_replicated_completions_and_follows_the_new_primary() {
    use common::redis::{OwnRedis, OwnSentinel};
    use idemq_sidecar::store::redis::{Durability, RedisOptions, RedisStore};

    let no_disk = ["--save", "", "--appendonly", "no"];
    let mut primary = OwnRedis::start(&no_disk).await;
    let replica_of = format!("127.0.0.1 {}", primary.port);
    let mut replica_args = no_disk.to_vec();
    replica_args.extend([
        "--repl-diskless-sync-delay",
        "0",
        "--replicaof",
        &replica_of,
    ]);
    // Two replicas: after the failover, the Sentinels point the one not
    // promoted at the new primary, so completions are replicated again.
    let replicas = [
        OwnRedis::start(&replica_args).await,
        OwnRedis::start(&replica_args).await,
    ];
    for replica in &replicas {
        wait_until_synced(replica).await;
    }
    let name = common::unique("idemq");
    let mut sentinels = Vec::new();
    for _ in 0..3 {
        sentinels.push(OwnSentinel::start(&name, primary.port, 2).await);
    }
    let watching = common::scenarios::wait_for(Duration::from_secs(30), async || {
        for sentinel in &sentinels {
            if sentinel.knows(&name).await != (2, 2) {
                return false;
            }
        }
        true
    })
    .await;
    assert!(
        watching,
        "each Sentinel knows the replica and the two other Sentinels"
    );

    let urls: Vec<String> = sentinels.iter().map(OwnSentinel::url).collect();
    let store = RedisStore::new(RedisOptions {
        sentinel: Some(name.clone()),
        durability: Durability::Replicated,
        timeout: Duration::from_millis(400),
        ..RedisOptions::new(urls.join(","), common::unique("sentinel"))
    })
    .expect("options");
    const BEFORE: usize = 200;
    for i in 0..BEFORE {
        let key = format!("order-{i}");
        let token = acquire(&store, &key, Some("fp"), LEASE).await;
        let done = store.complete(&key, &token, RETENTION).await;
        assert_eq!(done.expect("the replica confirms"), Transition::Done);
    }

    primary.crash();
    let killed = std::time::Instant::now();
    let (mut failed_calls, mut in_doubt, mut done) = (0u32, 0u32, 0u32);
    let mut next = 0usize;
    while done < 50 {
        assert!(
            killed.elapsed() < Duration::from_secs(60),
            "the store did not answer within 60 s of the primary's loss ({failed_calls} calls failed)"
        );
        let key = format!("after-{next}");
        match store.claim(&key, Some("fp"), LEASE, RETENTION).await {
            Ok(Claim::Acquired { token }) => {
                next += 1;
                match store.complete(&key, &token, RETENTION).await {
                    Ok(Transition::Done) => done += 1,
                    // Not confirmed by a replica yet: the remaining replica is
                    // still syncing with the new primary.
                    _ => failed_calls += 1,
                }
            }
            // A claim that timed out may still have been applied: its key is
            // held until the lease ends, as it would be for a sidecar.
            Ok(Claim::InFlight { .. }) => {
                in_doubt += 1;
                next += 1;
            }
            Ok(other) => panic!("a new key claimed: {other:?}"),
            Err(_) => {
                failed_calls += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    let recovered = killed.elapsed();
    let promoted = sentinels[0].primary(&name).await;
    assert!(
        replicas.iter().any(|r| Some(r.port) == promoted),
        "the Sentinels promoted a replica (they name {promoted:?})"
    );
    let mut kept = 0;
    for i in 0..BEFORE {
        if claim(&store, &format!("order-{i}"), Some("fp")).await == Claim::Completed {
            kept += 1;
        }
    }
    println!(
        "sentinel failover: the store answered again {:.1} s after the primary was killed \
         ({failed_calls} calls failed meanwhile, {in_doubt} claims in doubt); completions kept {kept}/{BEFORE}; resets {}",
        recovered.as_secs_f64(),
        store.resets()
    );
    assert_eq!(
        kept, BEFORE,
        "every replicated completion survives the failover"
    );
    assert_eq!(
        store.resets(),
        0,
        "a failover to an in-sync replica is not a reset"
    );
}

/// `durability: replicated` on a Cluster waits for a replica of the shard
/// each completion was written to, not of every shard: with another shard's
/// replica gone, completions go on being confirmed; with its own gone, they
/// are reported unreplicated.
#[tokio::test]
async fn replicated_completions_on_a_cluster_wait_only_for_the_shard_written() {
    use idemq_sidecar::store::redis::{Durability, RedisOptions, RedisStore};
    let mut cluster = common::redis::OwnCluster::start(7120).await;
    let namespace = common::unique("replicated-cluster");
    let store = RedisStore::new(RedisOptions {
        cluster: true,
        durability: Durability::Replicated,
        timeout: Duration::from_secs(1),
        partitions: 1,
        ..RedisOptions::new(cluster.seeds(), namespace.clone())
    })
    .expect("options");
    let prefix = format!("idemq:{{{namespace}}}:");
    let own = cluster.primary_of(&prefix).await;
    let own_replica = cluster.replica_of(own).await.expect("own replica");
    // The first call on a new Cluster may time out while the client learns
    // its slots and loads the scripts.
    for _ in 0..20 {
        if store.claim("warm-up", None, LEASE, RETENTION).await.is_ok() {
            break;
        }
    }
    // Another primary: a node serving some slot of another shard.
    let mut other = None;
    for slot_key in ["a", "b", "c", "d", "e", "f", "g", "h"] {
        let port = cluster.primary_of(slot_key).await;
        if port != own {
            other = Some(port);
            break;
        }
    }
    let other = other.expect("another primary");
    let other_replica = cluster.replica_of(other).await.expect("its replica");
    cluster.kill(other_replica);

    let mut confirmed = 0;
    for i in 0..20 {
        let key = format!("order-{i}");
        let token = acquire(&store, &key, None, LEASE).await;
        if store.complete(&key, &token, RETENTION).await.is_ok() {
            confirmed += 1;
        }
    }
    cluster.kill(own_replica);
    let token = acquire(&store, "order-last", None, LEASE).await;
    let alone = store.complete("order-last", &token, RETENTION).await;
    println!(
        "replicated on a Cluster: another shard's replica killed, {confirmed} of 20 completions confirmed; own shard's replica killed: {}",
        match &alone {
            Ok(t) => format!("{t:?}"),
            Err(e) => e.to_string(),
        }
    );
    assert_eq!(confirmed, 20, "another shard's replica does not matter");
    assert!(
        matches!(
            alone,
            Err(idemq_sidecar::store::StoreError::Unreplicated { .. })
        ),
        "its own shard's replica does"
    );
}

/// Without a replica, `complete` still records the key on the primary but
/// says it was not confirmed.
#[tokio::test]
async fn replicated_completion_without_a_replica_is_reported_unreplicated() {
    let primary = common::redis::OwnRedis::start(&["--save", "", "--appendonly", "no"]).await;
    let store = replicated_store(&primary);
    let token = acquire(&store, "order-1", None, LEASE).await;
    let started = std::time::Instant::now();
    let err = store
        .complete("order-1", &token, RETENTION)
        .await
        .expect_err("no replica can confirm");
    assert!(
        matches!(err, idemq_sidecar::store::StoreError::Unreplicated { .. }),
        "{err}"
    );
    assert!(started.elapsed() >= Duration::from_millis(400), "it waited");
    assert_eq!(claim(&store, "order-1", None).await, Claim::Completed);
}

/// An external Redis with ACL users: the user and password come from the
/// URL (the Secret's value), and the store needs nothing outside its keys.
#[tokio::test]
async fn redis_acl_user_from_the_url_runs_the_store_within_its_own_keys() {
    use idemq_sidecar::store::redis::{RedisOptions, RedisStore};
    // The default user may only PING (the helper's readiness check). `idemq`
    // may touch `idemq:*` keys and run scripts, nothing administrative;
    // `other` may do anything, but on `other:*` keys only.
    let acl = "--user default on nopass -@all +ping \
               --user idemq on >s3cret ~idemq:* +@read +@write +@scripting +ping +time +wait -@dangerous \
               --user other on >s3cret ~other:* +@all";
    let mut args = vec!["--save", "", "--appendonly", "no"];
    args.extend(acl.split_whitespace());
    let redis = common::redis::OwnRedis::start(&args).await;
    let url =
        |user: &str, password: &str| format!("redis://{user}:{password}@127.0.0.1:{}", redis.port);
    let store_as = |url: String| {
        RedisStore::new(RedisOptions {
            timeout: Duration::from_secs(1),
            ..RedisOptions::new(url, common::unique("acl"))
        })
        .expect("options")
    };

    let store = store_as(url("idemq", "s3cret"));
    store.ping().await.expect("the ACL user logs in");
    let token = acquire(&store, "order-1", Some("fp"), LEASE).await;
    let done = store.complete("order-1", &token, RETENTION).await;
    assert_eq!(done.expect("complete"), Transition::Done);
    assert_eq!(claim(&store, "order-1", Some("fp")).await, Claim::Completed);

    let wrong = store_as(url("idemq", "wrong"));
    assert!(wrong.ping().await.is_err(), "a wrong password is refused");
    let outside = store_as(url("other", "s3cret"));
    let err = outside
        .claim("order-1", None, LEASE, RETENTION)
        .await
        .expect_err("a user without idemq:* keys is refused");
    assert!(
        err.to_string().contains("NOPERM") || err.to_string().contains("permission"),
        "{err}"
    );
}

/// A `rediss://` store verified against a private CA (`IDEMQ_REDIS_CA`):
/// with the CA it works; without it the server's certificate is refused.
#[tokio::test]
async fn rediss_with_a_private_ca_connects_and_without_it_is_refused() {
    use idemq_sidecar::store::redis::{RedisOptions, RedisStore};
    let certs = tempfile::tempdir().expect("temp dir");
    let path = |name: &str| certs.path().join(name).to_string_lossy().into_owned();
    let openssl = |args: &[&str]| {
        let status = std::process::Command::new("openssl")
            .args(args)
            .stderr(std::process::Stdio::null())
            .status()
            .expect("run openssl");
        assert!(status.success(), "openssl {args:?}");
    };
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "1",
        "-subj",
        "/CN=idemq test CA",
        "-keyout",
        &path("ca.key"),
        "-out",
        &path("ca.pem"),
    ]);
    std::fs::write(path("san.ext"), "subjectAltName=IP:127.0.0.1\n").expect("write");
    openssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        &path("server.key"),
        "-out",
        &path("server.csr"),
    ]);
    openssl(&[
        "x509",
        "-req",
        "-in",
        &path("server.csr"),
        "-CA",
        &path("ca.pem"),
        "-CAkey",
        &path("ca.key"),
        "-CAcreateserial",
        "-days",
        "1",
        "-extfile",
        &path("san.ext"),
        "-out",
        &path("server.pem"),
    ]);
    let tls_port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
        .to_string();
    let (cert, key, ca) = (path("server.pem"), path("server.key"), path("ca.pem"));
    let redis = common::redis::OwnRedis::start(&[
        "--save",
        "",
        "--appendonly",
        "no",
        "--tls-port",
        &tls_port,
        "--tls-cert-file",
        &cert,
        "--tls-key-file",
        &key,
        "--tls-ca-cert-file",
        &ca,
        "--tls-auth-clients",
        "no",
    ])
    .await;
    let url = format!("rediss://127.0.0.1:{tls_port}");
    let store_with = |ca: Option<Vec<u8>>| {
        RedisStore::new(RedisOptions {
            ca,
            timeout: Duration::from_secs(2),
            ..RedisOptions::new(url.clone(), common::unique("tls"))
        })
        .expect("options")
    };

    let store = store_with(Some(std::fs::read(path("ca.pem")).expect("read CA")));
    store.ping().await.expect("TLS with the private CA");
    let token = acquire(&store, "order-1", None, LEASE).await;
    let done = store.complete("order-1", &token, RETENTION).await;
    assert_eq!(done.expect("complete over TLS"), Transition::Done);
    assert_eq!(claim(&store, "order-1", None).await, Claim::Completed);

    let untrusted = store_with(None);
    assert!(
        untrusted.ping().await.is_err(),
        "the system's roots do not trust the private CA"
    );
    drop(redis);
}
