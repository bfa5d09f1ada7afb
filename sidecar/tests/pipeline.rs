//! The pipeline under duplicates, failures, crashes and outages, against the
//! real RabbitMQ and Redis. Each test has its own queues and key namespace.
//! Run with `--nocapture` to see each test's figures.

mod common;

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use common::app::{self, App};
use common::rabbitmq::{self, Topology};
use common::sidecar::Running;
use idemq_sidecar::config::Config;
use idemq_sidecar::secrets::Secrets;
use idemq_sidecar::store::redis::{RedisOptions, RedisStore};
use idemq_sidecar::store::KeyStore;

const WAIT: Duration = Duration::from_secs(90);

fn config(t: &Topology, app: &App, consumer: &str, extra: &str) -> Config {
    let yaml = format!(
        r#"
consumer: {consumer}
store:
  kind: redis
  url: redis://127.0.0.1:6379
dedup:
  maxAttempts: 3
{extra}
broker:
  rabbitmq:
    queue: {queue}
    prefetch: 50
    deadLetterExchange: {dlx}
delivery:
  url: {url}
  timeout: 2s
  initialBackoff: 20ms
  maxBackoff: 200ms
shutdownGrace: 10s
"#,
        queue = t.queue,
        dlx = t.dlx,
        url = app.url()
    );
    Config::from_yaml(&yaml).expect("valid test config")
}

fn secrets() -> Secrets {
    Secrets {
        broker_url: Some(rabbitmq::URL.to_string()),
        ..Secrets::default()
    }
}

async fn start(config: Config, store: Arc<dyn KeyStore>) -> Running {
    common::sidecar::start_with(config, secrets(), store).await
}

/// Reads one sample from the sidecar's /metrics (0 when absent).
async fn metric(sidecar: &Running, sample: &str) -> u64 {
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

async fn messages(sidecar: &Running, outcome: &str) -> u64 {
    metric(
        sidecar,
        &format!("idemq_messages_total{{outcome=\"{outcome}\"}}"),
    )
    .await
}

async fn wait_for(timeout: Duration, mut check: impl AsyncFnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    while tokio::time::Instant::now() < deadline {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

fn body(i: usize) -> Vec<u8> {
    format!(r#"{{"order":{{"id":"o-{i}","amount":{i}}}}}"#).into_bytes()
}

/// Publishes `n` distinct messages, message i `copies(i)` times, in rounds so
/// that copies arrive both while the first is in flight and after it completed.
async fn publish_with_copies(t: &Topology, n: usize, copies: impl Fn(usize) -> usize) -> usize {
    let mut total = 0;
    for round in 0..3 {
        let batch: Vec<_> = (0..n).filter(|i| copies(*i) > round).collect();
        total += batch.len();
        t.publish_batch(batch.iter().map(|i| (Some(format!("m-{i}")), body(*i))))
            .await;
    }
    total
}

struct Store {
    store: Arc<RedisStore>,
}

impl Store {
    async fn new(test: &str) -> Self {
        Self {
            store: Arc::new(common::redis::store(test).await),
        }
    }
    fn dyn_store(&self) -> Arc<dyn KeyStore> {
        self.store.clone()
    }
    async fn cleanup(self) {
        common::redis::cleanup(self.store.prefix()).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producer_duplicates_are_delivered_exactly_once() {
    let t = rabbitmq::topology("dups").await;
    let app = app::start(app::always_ok()).await;
    let store = Store::new("dups").await;
    let sidecar = start(config(&t, &app, "dups", ""), store.dyn_store()).await;

    let distinct = 10_000;
    let published = publish_with_copies(&t, distinct, |i| 1 + i % 3).await;
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
    sidecar.stop().await.expect("clean stop");
    println!(
        "duplicates: published {published} ({distinct} distinct), app processed {} ({} distinct, {} twice), duplicates dropped {duplicates}, in-flight requeues {requeued}",
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
    assert_eq!(t.ready(&t.queue).await, 0, "the queue ends empty");
    assert!(t.dead_letters().await.is_empty());
    store.cleanup().await;
    t.delete().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_failures_are_retried_and_processed_once() {
    let t = rabbitmq::topology("transient").await;
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
    let sidecar = start(config(&t, &app, "transient", ""), store.dyn_store()).await;
    let n = 2_000;
    t.publish_batch((0..n).map(|i| (Some(format!("m-{i}")), body(i))))
        .await;
    let done = app.wait_until(WAIT, |a| a.distinct() == n).await;
    let retried = messages(&sidecar, "retried").await;
    sidecar.stop().await.expect("clean stop");
    let dead = t.dead_letters().await;
    println!(
        "transient: {n} messages, app answered {} times, processed {} ({} twice), retried {retried}, dead-lettered {}, highest attempt header {}",
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
    assert_eq!(t.ready(&t.queue).await, 0);
    store.cleanup().await;
    t.delete().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_messages_are_dead_lettered_with_a_reason() {
    let t = rabbitmq::topology("poison").await;
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
    let sidecar = start(config(&t, &app, "poison", ""), store.dyn_store()).await;
    let n = 500;
    t.publish_batch((0..n).map(|i| (Some(format!("m-{i}")), body(i))))
        .await;
    let settled = wait_for(WAIT, async || {
        metric(&sidecar, "idemq_dead_letters_total{reason=\"poison\"}").await == 50
    })
    .await;
    let _ = app.wait_until(WAIT, |a| a.distinct() == n - 50).await;
    sidecar.stop().await.expect("clean stop");
    let dead = t.dead_letters().await;
    println!(
        "poison: {n} messages, processed {} ({} twice), dead-lettered {} (reasons: {:?})",
        app.processed(),
        app.processed_twice(),
        dead.len(),
        dead.iter()
            .map(|d| d.0.as_str())
            .collect::<std::collections::BTreeSet<_>>()
    );
    assert!(settled);
    assert_eq!(app.processed(), (n - 50) as u32);
    assert_eq!(dead.len(), 50);
    assert!(dead.iter().all(
        |(reason, id)| reason == "poison" && id.as_deref().is_some_and(|id| id.ends_with('3'))
    ));
    assert_eq!(app.attempts(), n as u32, "poison is not retried");
    assert_eq!(t.ready(&t.queue).await, 0);
    store.cleanup().await;
    t.delete().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_keys_are_dead_lettered_by_default() {
    let t = rabbitmq::topology("nokey").await;
    let app = app::start(app::always_ok()).await;
    let store = Store::new("nokey").await;
    let sidecar = start(config(&t, &app, "nokey", ""), store.dyn_store()).await;
    t.publish_batch((0..20).map(|i| (None, body(i)))).await;
    let settled = wait_for(WAIT, async || {
        metric(&sidecar, "idemq_dead_letters_total{reason=\"missing_key\"}").await == 20
    })
    .await;
    sidecar.stop().await.expect("clean stop");
    let dead = t.dead_letters().await;
    println!(
        "missing key: 20 published without a key, delivered {}, dead-lettered {}",
        app.attempts(),
        dead.len()
    );
    assert!(settled);
    assert_eq!(app.attempts(), 0, "nothing without a key reaches the app");
    assert_eq!(dead.len(), 20);
    assert!(dead.iter().all(|(reason, _)| reason == "missing_key"));
    store.cleanup().await;
    t.delete().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hash_body_policy_dedups_identical_bodies() {
    let t = rabbitmq::topology("hashbody").await;
    let app = app::start(app::always_ok()).await;
    let store = Store::new("hashbody").await;
    let sidecar = start(
        config(&t, &app, "hashbody", "  missingKey: hashBody"),
        store.dyn_store(),
    )
    .await;
    // 10 distinct bodies, each published 3 times, none with a message id.
    t.publish_batch((0..30).map(|i| (None, body(i % 10)))).await;
    let settled = wait_for(WAIT, async || {
        messages(&sidecar, "delivered").await + messages(&sidecar, "duplicate").await == 30
    })
    .await;
    let duplicates = messages(&sidecar, "duplicate").await;
    sidecar.stop().await.expect("clean stop");
    println!("hashBody: 30 published (10 distinct bodies), processed {}, duplicates dropped {duplicates}", app.processed());
    assert!(settled);
    assert_eq!(app.processed(), 10);
    assert_eq!(app.distinct(), 10);
    assert_eq!(duplicates, 20);
    assert!(t.dead_letters().await.is_empty());
    store.cleanup().await;
    t.delete().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_under_load_loses_nothing_and_processes_nothing_twice() {
    let t = rabbitmq::topology("drain").await;
    let app = app::start_slow(app::always_ok(), Duration::from_millis(20)).await;
    let store = Store::new("drain").await;
    let n = 600;
    t.publish_batch((0..n).map(|i| (Some(format!("m-{i}")), body(i))))
        .await;
    let first = start(config(&t, &app, "drain", ""), store.dyn_store()).await;
    assert!(app.wait_until(WAIT, |a| a.distinct() >= 100).await);
    first.stop().await.expect("clean stop under load");
    let at_stop = app.processed();
    let second = start(config(&t, &app, "drain", ""), store.dyn_store()).await;
    let done = app.wait_until(WAIT, |a| a.distinct() == n).await;
    second.stop().await.expect("clean stop");
    println!(
        "graceful shutdown: {n} messages, {at_stop} processed before the stop, {} in all, {} twice",
        app.processed(),
        app.processed_twice()
    );
    assert!(done, "processed {} of {n}", app.distinct());
    assert_eq!(app.processed_twice(), 0);
    assert_eq!(app.processed(), n as u32);
    assert_eq!(t.ready(&t.queue).await, 0);
    store.cleanup().await;
    t.delete().await;
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// A redis-server of the test's own, on its own port, so it can be stopped.
fn own_redis(port: u16) -> Child {
    Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .stdout(Stdio::null())
        .spawn()
        .expect("start redis-server (apt-get install redis-server)")
}

async fn wait_port(port: u16) {
    let open = wait_for(Duration::from_secs(10), async || {
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
    })
    .await;
    assert!(open, "nothing listens on {port}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_outage_pauses_delivery_and_loses_nothing() {
    let port = free_port();
    let mut redis = own_redis(port);
    wait_port(port).await;
    let store: Arc<dyn KeyStore> = Arc::new(
        RedisStore::new(RedisOptions {
            url: format!("redis://127.0.0.1:{port}"),
            password: None,
            namespace: common::unique("outage"),
            timeout: Duration::from_millis(300),
        })
        .expect("options"),
    );
    let t = rabbitmq::topology("outage").await;
    let app = app::start_slow(app::always_ok(), Duration::from_millis(10)).await;
    let n = 400;
    t.publish_batch((0..n).map(|i| (Some(format!("m-{i}")), body(i))))
        .await;
    let sidecar = start(config(&t, &app, "outage", ""), store).await;
    assert!(app.wait_until(WAIT, |a| a.distinct() >= 100).await);

    redis.kill().expect("stop redis");
    redis.wait().expect("reap redis");
    // What was already past its claim may still finish; then nothing moves.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let during = app.attempts();
    let not_ready = reqwest::get(sidecar.admin_url("/readyz"))
        .await
        .expect("readyz")
        .status();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after_wait = app.attempts();

    let mut redis = own_redis(port);
    let done = app.wait_until(WAIT, |a| a.distinct() == n).await;
    sidecar.stop().await.expect("clean stop");
    redis.kill().ok();
    redis.wait().ok();
    println!(
        "store outage: {n} messages, {during} deliveries when the store went down, {} delivered while it was down, {} processed in all ({} twice)",
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
    assert_eq!(t.ready(&t.queue).await, 0);
    assert!(t.dead_letters().await.is_empty());
    t.delete().await;
}

/// The broker-side process id of the connection named after `consumer`.
fn connection_pid(consumer: &str) -> Option<String> {
    let out = Command::new("rabbitmqctl")
        .args([
            "list_connections",
            "-q",
            "--no-table-headers",
            "pid",
            "client_properties",
        ])
        .output()
        .expect("run rabbitmqctl");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|l| l.contains(&format!("idemq-sidecar {consumer}")))
        .and_then(|l| l.split_whitespace().next())
        .map(str::to_string)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_connection_loss_reconnects_and_processes_once() {
    let t = rabbitmq::topology("connloss").await;
    let app = app::start_slow(app::always_ok(), Duration::from_millis(100)).await;
    let store = Store::new("connloss").await;
    let consumer = common::unique("connloss");
    // Long enough (about 8 s at prefetch 50 and 100 ms per message) that the
    // close lands mid-stream even when rabbitmqctl is slow to start.
    let n = 4000;
    t.publish_batch((0..n).map(|i| (Some(format!("m-{i}")), body(i))))
        .await;
    let sidecar = start(config(&t, &app, &consumer, ""), store.dyn_store()).await;
    assert!(app.wait_until(WAIT, |a| a.distinct() >= 150).await);
    let before = connection_pid(&consumer).expect("the sidecar's connection is listed");
    let closed = Command::new("rabbitmqctl")
        .args(["close_connection", &before, "test closes the connection"])
        .output()
        .expect("run rabbitmqctl");
    assert!(
        closed.status.success(),
        "{}",
        String::from_utf8_lossy(&closed.stderr)
    );
    let at_close = app.processed();
    let done = app.wait_until(WAIT, |a| a.distinct() == n).await;
    let after = connection_pid(&consumer);
    sidecar.stop().await.expect("clean stop");
    println!(
        "broker connection loss: {n} messages, {at_close} processed when the connection was closed, {} in all, {} twice, reconnected: {}",
        app.processed(),
        app.processed_twice(),
        after.as_ref().is_some_and(|a| *a != before)
    );
    assert!(
        at_close < n as u32,
        "the connection was closed only after the stream ended"
    );
    assert!(done, "processed {} of {n}", app.distinct());
    assert!(
        after.is_some_and(|a| a != before),
        "a new connection replaced the closed one"
    );
    assert_eq!(app.processed_twice(), 0);
    assert_eq!(app.processed(), n as u32);
    assert_eq!(t.ready(&t.queue).await, 0);
    store.cleanup().await;
    t.delete().await;
}

/// The sidecar binary with a config file, as a child process.
fn spawn_sidecar(config_path: &std::path::Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_idemq-sidecar"))
        .arg("--config")
        .arg(config_path)
        .env("IDEMQ_BROKER_URL", rabbitmq::URL)
        .env("IDEMQ_LOG", "warn")
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn the sidecar")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_loses_nothing_and_reprocesses_at_most_prefetch() {
    let t = rabbitmq::topology("crash").await;
    let app = app::start_slow(app::always_ok(), Duration::from_millis(5)).await;
    let consumer = common::unique("crash");
    let prefetch = 20;
    let yaml = format!(
        "consumer: {consumer}\nstore:\n  kind: redis\n  url: redis://127.0.0.1:6379\ndedup:\n  lease: 2s\nbroker:\n  rabbitmq:\n    queue: {}\n    prefetch: {prefetch}\n    deadLetterExchange: {}\ndelivery:\n  url: {}\nadmin:\n  listen: 127.0.0.1:{}\n",
        t.queue,
        t.dlx,
        app.url(),
        free_port()
    );
    let dir = std::env::temp_dir().join(&consumer);
    std::fs::create_dir_all(&dir).expect("tmp dir");
    let path = dir.join("sidecar.yaml");
    std::fs::write(&path, yaml).expect("write config");

    let n = 600;
    t.publish_batch((0..n).map(|i| (Some(format!("m-{i}")), body(i))))
        .await;
    let mut first = spawn_sidecar(&path);
    assert!(
        app.wait_until(WAIT, |a| a.distinct() >= 150).await,
        "the first sidecar processed {}",
        app.distinct()
    );
    first.kill().expect("SIGKILL");
    first.wait().expect("reap");
    let at_kill = app.processed();
    let mut second = spawn_sidecar(&path);
    let done = app.wait_until(WAIT, |a| a.distinct() == n).await;
    // Claims orphaned by the kill keep their redeliveries cycling (requeued as
    // in flight) until their lease ends; wait until the queue stays empty for
    // longer than the lease before counting.
    let drained = wait_for(WAIT, async || {
        if t.ready(&t.queue).await != 0 {
            return false;
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
        t.ready(&t.queue).await == 0
    })
    .await;
    assert!(drained, "the queue drains after the restart");
    let killed = Command::new("kill")
        .args(["-TERM", &second.id().to_string()])
        .status()
        .expect("kill");
    assert!(killed.success());
    let exit = second.wait().expect("reap");
    println!(
        "crash: {n} messages, {at_kill} processed before SIGKILL, {} in all, {} processed twice (bound: prefetch {prefetch})",
        app.processed(),
        app.processed_twice()
    );
    assert!(done, "processed {} of {n}", app.distinct());
    assert!(
        app.processed_twice() <= prefetch,
        "{} processed twice",
        app.processed_twice()
    );
    assert_eq!(exit.code(), Some(0));
    assert_eq!(t.ready(&t.queue).await, 0, "nothing left behind");
    assert!(t.dead_letters().await.is_empty());
    common::redis::cleanup(&format!("idemq:{{{consumer}}}:")).await;
    std::fs::remove_dir_all(dir).ok();
    t.delete().await;
}
