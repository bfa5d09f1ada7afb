//! The pipeline scenarios, written once over [`BrokerUnderTest`]: producer
//! duplicates, transient failures, poison, missing keys, body-hash keys,
//! graceful shutdown, a consumer joining and leaving, store outage, broker
//! connection loss and a crash (SIGKILL of the sidecar binary). Each broker's
//! test file runs them against the real broker and the real Redis; each
//! scenario prints its figures (visible with `--nocapture`).

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use idemq_sidecar::config::Config;
use idemq_sidecar::store::redis::{RedisOptions, RedisStore};
use idemq_sidecar::store::KeyStore;

use super::app::{self, App};
use super::broker::{BrokerUnderTest, LosesBroker, Message};
use super::sidecar::Running;

pub const WAIT: Duration = Duration::from_secs(90);

/// The sidecar config of the scenarios: Redis store, quick retries, `extra`
/// lines under `dedup:`.
pub fn config<B: BrokerUnderTest>(
    broker: &B,
    app: &App,
    consumer: &str,
    max_in_flight: u32,
    extra: &str,
) -> Config {
    let yaml = format!(
        r#"
consumer: {consumer}
store:
  kind: redis
  url: redis://127.0.0.1:6379
dedup:
  maxAttempts: 3
{key}
{extra}
broker:
{broker}
delivery:
  url: {url}
  timeout: 2s
  initialBackoff: 20ms
  maxBackoff: 200ms
shutdownGrace: 10s
"#,
        key = broker.dedup_key_yaml(),
        broker = broker.broker_yaml(max_in_flight),
        url = app.url()
    );
    Config::from_yaml(&yaml).expect("valid test config")
}

/// The in-flight limit of the scenarios that do not set their own.
pub const MAX_IN_FLIGHT: u32 = 50;

pub async fn start<B: BrokerUnderTest>(
    broker: &B,
    config: Config,
    store: Arc<dyn KeyStore>,
) -> Running {
    super::sidecar::start_with(config, broker.secrets(), store).await
}

/// Reads one sample from the sidecar's /metrics (0 when absent).
pub async fn metric(sidecar: &Running, sample: &str) -> u64 {
    let text = reqwest::get(sidecar.admin_url("/metrics"))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    text.lines()
        .find_map(|l| l.strip_prefix(sample)?.trim().parse::<f64>().ok())
        .unwrap_or(0.0) as u64
}

pub async fn messages(sidecar: &Running, outcome: &str) -> u64 {
    metric(
        sidecar,
        &format!("idemq_messages_total{{outcome=\"{outcome}\"}}"),
    )
    .await
}

pub async fn wait_for(timeout: Duration, mut check: impl AsyncFnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    while tokio::time::Instant::now() < deadline {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

pub fn body(i: usize) -> Vec<u8> {
    format!(r#"{{"order":{{"id":"o-{i}","amount":{i}}}}}"#).into_bytes()
}

/// Message `i`, keyed `m-<i>`.
pub fn keyed(i: usize) -> Message {
    Message::keyed(format!("m-{i}"), body(i))
}

/// Publishes `n` distinct messages, message i `copies(i)` times, in rounds so
/// that copies arrive both while the first is in flight and after it completed.
pub async fn publish_with_copies<B: BrokerUnderTest>(
    broker: &B,
    n: usize,
    copies: impl Fn(usize) -> usize,
) -> usize {
    let mut total = 0;
    for round in 0..3 {
        let batch: Vec<_> = (0..n).filter(|i| copies(*i) > round).map(keyed).collect();
        total += batch.len();
        broker.publish(batch).await;
    }
    total
}

/// A Redis store under a namespace of the test's own.
pub struct Store {
    store: Arc<RedisStore>,
}

impl Store {
    pub async fn new(test: &str) -> Self {
        Self {
            store: Arc::new(super::redis::store(test).await),
        }
    }
    pub fn dyn_store(&self) -> Arc<dyn KeyStore> {
        self.store.clone()
    }
    pub async fn cleanup(self) {
        super::redis::cleanup(self.store.prefix()).await;
    }
}

pub async fn producer_duplicates_are_delivered_exactly_once<B: BrokerUnderTest>() {
    let t = B::create("dups").await;
    let app = app::start(app::always_ok()).await;
    let store = Store::new("dups").await;
    let sidecar = start(
        &t,
        config(&t, &app, "dups", MAX_IN_FLIGHT, ""),
        store.dyn_store(),
    )
    .await;

    // 20,000 messages: the even ones three times, the odd ones once.
    let distinct = 10_000;
    let published = publish_with_copies(&t, distinct, |i| if i % 2 == 0 { 3 } else { 1 }).await;
    let all_settled = wait_for(WAIT, async || {
        messages(&sidecar, "delivered").await + messages(&sidecar, "duplicate").await
            >= published as u64
    })
    .await;
    let (delivered, duplicates) = (
        messages(&sidecar, "delivered").await,
        messages(&sidecar, "duplicate").await,
    );
    let requeued = messages(&sidecar, "in_flight_requeued").await;
    // Each message taken is counted in flight until it is settled, then
    // timed end to end: the gauge comes back to 0 and the histogram counts
    // every settled message.
    let (mut held, mut timed) = (0, 0);
    let gauges_settled = wait_for(Duration::from_secs(10), async || {
        held = metric(&sidecar, "idemq_in_flight").await;
        timed = metric(&sidecar, "idemq_end_to_end_duration_seconds_count").await;
        held == 0 && timed == delivered + duplicates
    })
    .await;
    sidecar.stop().await.expect("clean stop");
    println!(
        "duplicates ({}): published {published} ({distinct} distinct), app processed {} ({} distinct, {} twice), duplicates dropped {duplicates}, in-flight requeues {requeued}, in flight after {held}, timed end to end {timed}",
        B::NAME,
        app.processed(),
        app.distinct(),
        app.processed_twice()
    );
    assert!(
        all_settled,
        "settled {delivered} + {duplicates} of {published}"
    );
    assert_eq!(app.distinct(), distinct);
    assert_eq!(
        app.processed(),
        distinct as u32,
        "each distinct message exactly once"
    );
    assert_eq!(delivered as usize, distinct);
    assert_eq!(duplicates as usize, published - distinct);
    assert!(
        gauges_settled,
        "idemq_in_flight {held} (expected 0), end-to-end timings {timed} (expected {})",
        delivered + duplicates
    );
    assert_eq!(t.backlog().await, 0, "the queue ends empty");
    assert!(t.dead_letters().await.is_empty());
    store.cleanup().await;
    t.delete().await;
}

pub async fn transient_failures_are_retried_and_processed_once<B: BrokerUnderTest>() {
    let t = B::create("transient").await;
    // The first attempt of every tenth message fails with 500.
    let app = app::start(Arc::new(|key: &str, seen: u32| {
        let n: usize = key.trim_start_matches("m-").parse().unwrap_or(1);
        if n % 10 == 0 && seen == 0 {
            StatusCode::INTERNAL_SERVER_ERROR
        } else {
            StatusCode::OK
        }
    }))
    .await;
    let store = Store::new("transient").await;
    let sidecar = start(
        &t,
        config(&t, &app, "transient", MAX_IN_FLIGHT, ""),
        store.dyn_store(),
    )
    .await;
    let n = 2_000;
    t.publish((0..n).map(keyed).collect()).await;
    let done = app.wait_until(WAIT, |a| a.distinct() == n).await;
    let retried = messages(&sidecar, "retried").await;
    sidecar.stop().await.expect("clean stop");
    let dead = t.dead_letters().await;
    println!(
        "transient ({}): {n} messages, app answered {} times, processed {} ({} twice), retried {retried}, dead-lettered {}, highest attempt header {}",
        B::NAME,
        app.attempts(),
        app.processed(),
        app.processed_twice(),
        dead.len(),
        app.max_attempt_header()
    );
    assert!(done, "processed {} of {n}", app.distinct());
    assert_eq!(app.processed(), n as u32);
    assert_eq!(retried, n as u64 / 10);
    assert_eq!(app.attempts(), (n + n / 10) as u32);
    assert_eq!(app.max_attempt_header(), 2);
    assert!(dead.is_empty(), "none dead-lettered: {dead:?}");
    assert_eq!(t.backlog().await, 0);
    store.cleanup().await;
    t.delete().await;
}

pub async fn poison_messages_are_dead_lettered_with_a_reason<B: BrokerUnderTest>() {
    let t = B::create("poison").await;
    let app = app::start(Arc::new(|key: &str, _| {
        let n: usize = key.trim_start_matches("m-").parse().unwrap_or(1);
        if n % 10 == 3 {
            StatusCode::BAD_REQUEST
        } else {
            StatusCode::OK
        }
    }))
    .await;
    let store = Store::new("poison").await;
    let sidecar = start(
        &t,
        config(&t, &app, "poison", MAX_IN_FLIGHT, ""),
        store.dyn_store(),
    )
    .await;
    let n = 500;
    t.publish((0..n).map(keyed).collect()).await;
    let settled = wait_for(WAIT, async || {
        metric(&sidecar, "idemq_dead_letters_total{reason=\"poison\"}").await == 50
    })
    .await;
    let _ = app.wait_until(WAIT, |a| a.distinct() == n - 50).await;
    sidecar.stop().await.expect("clean stop");
    let dead = t.dead_letters().await;
    println!(
        "poison ({}): {n} messages, processed {} ({} twice), dead-lettered {} (reasons: {:?})",
        B::NAME,
        app.processed(),
        app.processed_twice(),
        dead.len(),
        dead.iter()
            .map(|d| d.reason.as_str())
            .collect::<std::collections::BTreeSet<_>>()
    );
    assert!(settled);
    assert_eq!(app.processed(), (n - 50) as u32);
    assert_eq!(dead.len(), 50);
    assert!(dead
        .iter()
        .all(|d| d.reason == "poison" && d.key.as_deref().is_some_and(|id| id.ends_with('3'))));
    assert_eq!(app.attempts(), n as u32, "poison is not retried");
    assert_eq!(t.backlog().await, 0);
    store.cleanup().await;
    t.delete().await;
}

pub async fn missing_keys_are_dead_lettered_by_default<B: BrokerUnderTest>() {
    let t = B::create("nokey").await;
    let app = app::start(app::always_ok()).await;
    let store = Store::new("nokey").await;
    let sidecar = start(
        &t,
        config(&t, &app, "nokey", MAX_IN_FLIGHT, ""),
        store.dyn_store(),
    )
    .await;
    t.publish((0..20).map(|i| Message::unkeyed(body(i))).collect())
        .await;
    let settled = wait_for(WAIT, async || {
        metric(&sidecar, "idemq_dead_letters_total{reason=\"missing_key\"}").await == 20
    })
    .await;
    sidecar.stop().await.expect("clean stop");
    let dead = t.dead_letters().await;
    println!(
        "missing key ({}): 20 published without a key, delivered {}, dead-lettered {}",
        B::NAME,
        app.attempts(),
        dead.len()
    );
    assert!(settled);
    assert_eq!(app.attempts(), 0, "nothing without a key reaches the app");
    assert_eq!(dead.len(), 20);
    assert!(dead.iter().all(|d| d.reason == "missing_key"));
    assert_eq!(t.backlog().await, 0);
    store.cleanup().await;
    t.delete().await;
}

pub async fn hash_body_policy_dedups_identical_bodies<B: BrokerUnderTest>() {
    let t = B::create("hashbody").await;
    let app = app::start(app::always_ok()).await;
    let store = Store::new("hashbody").await;
    let sidecar = start(
        &t,
        config(
            &t,
            &app,
            "hashbody",
            MAX_IN_FLIGHT,
            "  missingKey: hashBody",
        ),
        store.dyn_store(),
    )
    .await;
    // 10 distinct bodies, each published 3 times, none with a key.
    t.publish((0..30).map(|i| Message::unkeyed(body(i % 10))).collect())
        .await;
    let settled = wait_for(WAIT, async || {
        messages(&sidecar, "delivered").await + messages(&sidecar, "duplicate").await == 30
    })
    .await;
    let duplicates = messages(&sidecar, "duplicate").await;
    sidecar.stop().await.expect("clean stop");
    println!(
        "hashBody ({}): 30 published (10 distinct bodies), processed {}, duplicates dropped {duplicates}",
        B::NAME,
        app.processed()
    );
    assert!(settled);
    assert_eq!(app.processed(), 10);
    assert_eq!(app.distinct(), 10);
    assert_eq!(duplicates, 20);
    assert!(t.dead_letters().await.is_empty());
    store.cleanup().await;
    t.delete().await;
}

pub async fn graceful_shutdown_under_load_loses_nothing_and_processes_nothing_twice<
    B: BrokerUnderTest,
>() {
    let t = B::create("drain").await;
    let app = app::start_slow(app::always_ok(), Duration::from_millis(20)).await;
    let store = Store::new("drain").await;
    let n = 600;
    t.publish((0..n).map(keyed).collect()).await;
    let cfg = config(&t, &app, "drain", MAX_IN_FLIGHT, "");
    let first = start(&t, cfg.clone(), store.dyn_store()).await;
    assert!(app.wait_until(WAIT, |a| a.distinct() >= 100).await);
    first.stop().await.expect("clean stop under load");
    let at_stop = app.processed();
    let second = start(&t, cfg, store.dyn_store()).await;
    let done = app.wait_until(WAIT, |a| a.distinct() == n).await;
    second.stop().await.expect("clean stop");
    println!(
        "graceful shutdown ({}): {n} messages, {at_stop} processed before the stop, {} in all, {} twice",
        B::NAME,
        app.processed(),
        app.processed_twice()
    );
    assert!(done, "processed {} of {n}", app.distinct());
    assert_eq!(app.processed_twice(), 0);
    assert_eq!(app.processed(), n as u32);
    assert_eq!(t.backlog().await, 0);
    store.cleanup().await;
    t.delete().await;
}

/// A second sidecar of the same consumer starts mid-stream and later stops
/// gracefully; the work is shared and handed back without loss or repeats.
pub async fn a_consumer_joining_and_leaving_loses_nothing_and_repeats_nothing<
    B: BrokerUnderTest,
>() {
    let t = B::create("join").await;
    let app = app::start_slow(app::always_ok(), Duration::from_millis(10)).await;
    let store = Store::new("join").await;
    // About 10 s for one sidecar alone (10 in flight, 10 ms each): the second
    // joins and leaves mid-stream even when the broker takes seconds to
    // rebalance.
    let n = 10_000;
    t.publish((0..n).map(keyed).collect()).await;
    let cfg = config(&t, &app, "join", 10, "");
    let first = start(&t, cfg.clone(), store.dyn_store()).await;
    assert!(app.wait_until(WAIT, |a| a.distinct() >= 200).await);
    let at_join = app.processed();
    let second = start(&t, cfg, store.dyn_store()).await;
    // The second one takes part of the work before it leaves.
    let took_part = wait_for(WAIT, async || messages(&second, "delivered").await >= 100).await;
    let by_second = messages(&second, "delivered").await;
    second.stop().await.expect("clean stop of the second");
    let at_leave = app.processed();
    let done = app.wait_until(WAIT, |a| a.distinct() == n).await;
    first.stop().await.expect("clean stop");
    println!(
        "join and leave ({}): {n} messages, {at_join} processed when the second sidecar joined, {by_second} by it before it left at {at_leave}, {} in all, {} twice",
        B::NAME,
        app.processed(),
        app.processed_twice()
    );
    assert!(took_part, "the second sidecar took no work");
    assert!(
        at_leave < n as u32,
        "the second left after the stream ended"
    );
    assert!(done, "processed {} of {n}", app.distinct());
    assert_eq!(app.processed_twice(), 0);
    assert_eq!(app.processed(), n as u32);
    assert_eq!(t.backlog().await, 0);
    store.cleanup().await;
    t.delete().await;
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// A Redis of the test's own that writes everything to disk before it
/// answers, and a store on it: a crash of it is an outage and not also a
/// loss of state (that would be a store reset, which pauses consumption
/// until acknowledged).
async fn durable_redis_store(test: &str) -> (super::redis::OwnRedis, Arc<dyn KeyStore>) {
    let redis = super::redis::OwnRedis::start(&[
        "--save",
        "",
        "--appendonly",
        "yes",
        "--appendfsync",
        "always",
    ])
    .await;
    let store = Arc::new(
        RedisStore::new(RedisOptions {
            timeout: Duration::from_millis(300),
            ..RedisOptions::new(redis.url(), super::unique(test))
        })
        .expect("options"),
    );
    (redis, store)
}

/// Stops Redis mid-stream: nothing is delivered unchecked while it is down,
/// readiness says so, and everything is processed once after it returns.
/// `during_outage` runs while the store is down (a broker's own checks).
pub async fn store_outage_pauses_delivery_and_loses_nothing<B: BrokerUnderTest>(
    during_outage: impl AsyncFnOnce(&B, &Running),
) {
    let (mut redis, store) = durable_redis_store("outage").await;
    let t = B::create("outage").await;
    let app = app::start_slow(app::always_ok(), Duration::from_millis(10)).await;
    let n = 400;
    t.publish((0..n).map(keyed).collect()).await;
    let sidecar = start(&t, config(&t, &app, "outage", MAX_IN_FLIGHT, ""), store).await;
    assert!(app.wait_until(WAIT, |a| a.distinct() >= 100).await);

    redis.crash();
    // What was already past its claim may still finish; then nothing moves.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let during = app.attempts();
    let not_ready = reqwest::get(sidecar.admin_url("/readyz"))
        .await
        .expect("readyz")
        .status();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after_wait = app.attempts();
    during_outage(&t, &sidecar).await;

    redis.restart().await;
    let done = app.wait_until(WAIT, |a| a.distinct() == n).await;
    sidecar.stop().await.expect("clean stop");
    drop(redis);
    println!(
        "store outage ({}): {n} messages, {during} deliveries when the store went down, {} delivered while it was down, {} processed in all ({} twice)",
        B::NAME,
        after_wait - during,
        app.processed(),
        app.processed_twice()
    );
    assert_eq!(
        not_ready,
        reqwest::StatusCode::SERVICE_UNAVAILABLE,
        "not ready while the store is down"
    );
    assert_eq!(
        after_wait, during,
        "nothing is delivered while the store is down"
    );
    assert!(done, "processed {} of {n}", app.distinct());
    assert_eq!(app.processed_twice(), 0);
    assert_eq!(t.backlog().await, 0);
    assert!(t.dead_letters().await.is_empty());
    t.delete().await;
}

/// The store goes down while the application is processing: the messages
/// are acked (they were processed), their completions are kept and written
/// once the store is back, before anything is claimed, so duplicates
/// published afterwards are dropped rather than processed again.
pub async fn completions_refused_in_an_outage_are_recorded_when_the_store_returns<
    B: BrokerUnderTest,
>() {
    let (mut redis, store) = durable_redis_store("refused").await;
    let t = B::create("refused").await;
    let app = app::start_slow(app::always_ok(), Duration::from_millis(1500)).await;
    let n = 20;
    t.publish((0..n).map(keyed).collect()).await;
    let sidecar = start(&t, config(&t, &app, "refused", MAX_IN_FLIGHT, ""), store).await;
    // Every message claimed and at the application, then the store goes.
    assert!(app.wait_until(WAIT, |a| a.started() == n as u32).await);
    redis.crash();
    assert!(app.wait_until(WAIT, |a| a.processed() == n as u32).await);
    wait_for(Duration::from_secs(20), async || {
        metric(&sidecar, "idemq_completions_unrecorded").await > 0
    })
    .await;
    let acked = wait_for(Duration::from_secs(20), async || t.backlog().await == 0).await;
    // Some may have completed before the crash.
    let kept = metric(&sidecar, "idemq_completions_unrecorded").await;

    redis.restart().await;
    let written = wait_for(WAIT, async || {
        metric(&sidecar, "idemq_completions_unrecorded").await == 0
    })
    .await;
    t.publish((0..n).map(keyed).collect()).await;
    let dropped = wait_for(WAIT, async || {
        messages(&sidecar, "duplicate").await == n as u64
    })
    .await;
    println!(
        "store outage during processing ({}): {n} processed, {} completions kept while the store was down, {} duplicates dropped after it returned, {} processed twice",
        B::NAME,
        kept,
        messages(&sidecar, "duplicate").await,
        app.processed_twice()
    );
    sidecar.stop().await.expect("clean stop");
    drop(redis);
    assert!(
        kept > 0,
        "the refused completions are kept (idemq_completions_unrecorded)"
    );
    assert!(acked, "processed messages are acked meanwhile");
    assert!(written, "written once the store is back");
    assert!(dropped, "the duplicates are dropped");
    assert_eq!(app.processed_twice(), 0);
    t.delete().await;
}

/// Kills (SIGKILL) the primary serving the consumer's first slot mid-stream,
/// on a Redis Cluster of the test's own; its replica takes over. Nothing is
/// lost, only what was in flight at the kill (at most `max_in_flight`) may be
/// processed twice, and the failover is not mistaken for a store reset (which
/// would pause consumption under the default `failClosed`).
pub async fn store_failover_loses_nothing_and_reprocesses_at_most_max_in_flight<
    B: BrokerUnderTest,
>() {
    let mut cluster = super::redis::OwnCluster::start(7100).await;
    let consumer = super::unique("failover");
    let store = RedisStore::new(RedisOptions {
        cluster: true,
        partitions: 4,
        timeout: Duration::from_millis(500),
        ..RedisOptions::new(cluster.seeds(), &consumer)
    })
    .expect("options");
    let watched = store.partition_prefixes()[0].clone();
    let victim = cluster.primary_of(&watched).await;
    let t = B::create("failover").await;
    let app = app::start_slow(app::always_ok(), Duration::from_millis(5)).await;
    let (n, max_in_flight) = (3000, 20);
    t.publish((0..n).map(keyed).collect()).await;
    let sidecar = start(
        &t,
        config(&t, &app, &consumer, max_in_flight, ""),
        Arc::new(store),
    )
    .await;
    assert!(app.wait_until(WAIT, |a| a.distinct() >= 500).await);

    cluster.kill(victim);
    let at_kill = app.processed();
    let takeover = cluster
        .wait_for_takeover(&watched, victim, Duration::from_secs(30))
        .await;
    let done = app.wait_until(WAIT, |a| a.distinct() == n).await;
    let resets = metric(&sidecar, "idemq_store_resets_total").await;
    sidecar.stop().await.expect("clean stop");
    println!(
        "store failover ({}): {n} messages, primary :{victim} killed after {at_kill} processed, {}; {} processed in all, {} lost, {} processed twice (bound: max in flight {max_in_flight}), store resets {resets}",
        B::NAME,
        match takeover {
            Some((port, after)) => format!("replica :{port} took over after {after:.1?}"),
            None => "no replica took over".into(),
        },
        app.processed(),
        n - app.distinct(),
        app.processed_twice()
    );
    assert!(
        takeover.is_some(),
        "a replica takes over the killed primary's slots"
    );
    assert!(done, "processed {} of {n}", app.distinct());
    assert!(
        app.processed_twice() <= max_in_flight as usize,
        "{} processed twice",
        app.processed_twice()
    );
    assert_eq!(
        resets, 0,
        "a failover to an up-to-date replica is no store reset"
    );
    assert_eq!(t.backlog().await, 0);
    assert!(t.dead_letters().await.is_empty());
    t.delete().await;
}

/// `/readyz`: its status and body.
pub async fn readyz(sidecar: &Running) -> (u16, String) {
    let response = reqwest::get(sidecar.admin_url("/readyz"))
        .await
        .expect("readyz");
    let status = response.status().as_u16();
    (status, response.text().await.expect("text"))
}

/// The broker is lost mid-stream and comes back: the sidecar reconnects by
/// itself, says meanwhile (readiness, `idemq_broker_connected`) that it has
/// no broker, loses nothing and processes nothing twice. Records published
/// after the broker came back show that consumption resumed.
pub async fn broker_loss_reconnects_and_processes_once<B: LosesBroker>() {
    let t = B::create("connloss").await;
    let app = app::start_slow(app::always_ok(), Duration::from_millis(100)).await;
    let store = Store::new("connloss").await;
    let consumer = super::unique("connloss");
    let (n, later) = (B::MESSAGES, 500);
    t.publish((0..n).map(keyed).collect()).await;
    let sidecar = start(
        &t,
        config(&t, &app, &consumer, MAX_IN_FLIGHT, ""),
        store.dyn_store(),
    )
    .await;
    assert!(app.wait_until(WAIT, |a| a.distinct() >= 150).await);
    t.cut(&consumer).await;
    let at_cut = app.processed();
    let mut while_away = None;
    if !B::AWAY.is_zero() {
        let cut = tokio::time::Instant::now();
        let said = wait_for(B::AWAY, async || {
            readyz(&sidecar).await.0 == 503 && metric(&sidecar, "idemq_broker_connected").await == 0
        })
        .await;
        let (status, text) = readyz(&sidecar).await;
        let said_after = cut.elapsed();
        tokio::time::sleep_until(cut + B::AWAY).await;
        while_away = Some((said.then_some(said_after), status, text));
    }
    t.restore().await;
    let restored = tokio::time::Instant::now();
    let connected = wait_for(WAIT, async || {
        metric(&sidecar, "idemq_broker_connected").await == 1 && readyz(&sidecar).await.0 == 200
    })
    .await;
    let connected_after = restored.elapsed();
    t.publish((n..n + later).map(keyed).collect()).await;
    let total = n + later;
    let done = app.wait_until(WAIT, |a| a.distinct() == total).await;
    let all_after = restored.elapsed();
    let drained = wait_for(WAIT, async || t.backlog().await == 0).await;
    sidecar.stop().await.expect("clean stop");
    println!(
        "broker loss ({}, {}, away {:?}): {n} messages, {at_cut} processed at the loss; while away: {}; connected again {connected_after:.1?} after it came back; {later} published after, {} processed in all ({all_after:.1?} after it came back), {} twice, {} lost",
        B::NAME,
        B::LOSS,
        B::AWAY,
        match &while_away {
            Some((said, status, text)) => format!(
                "not ready and idemq_broker_connected 0 after {said:.1?} (/readyz {status} {:?})",
                text.trim()
            ),
            None => "(the broker took the sidecar back at once)".to_string(),
        },
        app.processed(),
        app.processed_twice(),
        total - app.distinct()
    );
    assert!(
        at_cut < n as u32,
        "the broker was lost only after the stream ended"
    );
    if let Some((said, _, text)) = &while_away {
        assert!(said.is_some(), "readiness still said up: {text}");
        assert!(text.contains("broker: down"), "{text}");
    }
    assert!(connected, "the sidecar said it was connected again");
    assert!(done, "processed {} of {total}", app.distinct());
    assert!(drained, "everything settled on the broker");
    assert_eq!(app.processed_twice(), 0);
    assert_eq!(app.processed(), total as u32);
    store.cleanup().await;
    t.delete().await;
}

/// The sidecar binary with a config file, as a child process.
pub fn spawn_sidecar<B: BrokerUnderTest>(broker: &B, config_path: &std::path::Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_idemq-sidecar"))
        .arg("--config")
        .arg(config_path)
        .envs(broker.env())
        .env("IDEMQ_LOG", "warn")
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn the sidecar")
}

/// SIGKILL of the sidecar binary mid-stream, then a restart: nothing is lost,
/// and only what was in flight at the kill (at most `max_in_flight`) may be
/// processed twice.
pub async fn crash_loses_nothing_and_reprocesses_at_most_max_in_flight<B: BrokerUnderTest>() {
    let t = B::create("crash").await;
    let app = app::start_slow(app::always_ok(), Duration::from_millis(5)).await;
    let consumer = super::unique("crash");
    let max_in_flight = 20;
    let yaml = format!(
        "consumer: {consumer}\nstore:\n  kind: redis\n  url: redis://127.0.0.1:6379\ndedup:\n  lease: 2s\n{}\nbroker:\n{}\ndelivery:\n  url: {}\nadmin:\n  listen: 127.0.0.1:{}\n",
        t.dedup_key_yaml(),
        t.broker_yaml(max_in_flight),
        app.url(),
        free_port()
    );
    let dir = std::env::temp_dir().join(&consumer);
    std::fs::create_dir_all(&dir).expect("tmp dir");
    let path = dir.join("sidecar.yaml");
    std::fs::write(&path, yaml).expect("write config");

    let n = 600;
    t.publish((0..n).map(keyed).collect()).await;
    let mut first = spawn_sidecar(&t, &path);
    assert!(
        app.wait_until(WAIT, |a| a.distinct() >= 150).await,
        "the first sidecar processed {}",
        app.distinct()
    );
    first.kill().expect("SIGKILL");
    first.wait().expect("reap");
    let at_kill = app.processed();
    let mut second = spawn_sidecar(&t, &path);
    let done = app
        .wait_until(B::REDELIVERY_WAIT, |a| a.distinct() == n)
        .await;
    // Claims orphaned by the kill keep their redeliveries cycling (requeued as
    // in flight) until their lease ends; wait until the backlog stays empty
    // for longer than the lease before counting.
    let drained = wait_for(WAIT, async || {
        if t.backlog().await != 0 {
            return false;
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
        t.backlog().await == 0
    })
    .await;
    assert!(drained, "the backlog drains after the restart");
    let killed = Command::new("kill")
        .args(["-TERM", &second.id().to_string()])
        .status()
        .expect("kill");
    assert!(killed.success());
    let exit = second.wait().expect("reap");
    println!(
        "crash ({}): {n} messages, {at_kill} processed before SIGKILL, {} in all, {} processed twice (bound: max in flight {max_in_flight})",
        B::NAME,
        app.processed(),
        app.processed_twice()
    );
    assert!(done, "processed {} of {n}", app.distinct());
    assert!(
        app.processed_twice() <= max_in_flight as usize,
        "{} processed twice",
        app.processed_twice()
    );
    assert_eq!(exit.code(), Some(0));
    assert_eq!(t.backlog().await, 0, "nothing left behind");
    assert!(t.dead_letters().await.is_empty());
    super::redis::cleanup(&format!("idemq:{{{consumer}}}:")).await;
    std::fs::remove_dir_all(dir).ok();
    t.delete().await;
}
