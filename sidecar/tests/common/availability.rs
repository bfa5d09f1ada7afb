//! The application-availability scenarios, written once over
//! [`BrokerUnderTest`]: an application that starts late, stops mid-stream,
//! answers 503 to everything, is slower than the lease, or receives large
//! messages, and a poison message among healthy ones. A failure of the
//! application as a whole must cost no message and no duplicate. Each
//! broker's `availability` test file runs them; each prints its figures
//! (visible with `--nocapture`).

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use idemq_sidecar::config::Config;
use idemq_sidecar::store::redis::{RedisOptions, RedisStore};
use idemq_sidecar::store::{Claim, KeyStore};

use super::app::{self, App};
use super::broker::{BrokerUnderTest, Message};
use super::scenarios::{keyed, metric, readyz, wait_for};
use super::sidecar::Running;

/// The seven scenarios as `#[tokio::test]`s against the broker `$broker`:
/// each broker's `availability` test file is this one line, so a scenario
/// is written once and every source runs it.
#[macro_export]
macro_rules! availability_tests {
    ($broker:ty) => {
        use common::availability;

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn an_application_that_starts_15s_late_costs_no_message() {
            availability::an_application_that_starts_15s_late_costs_no_message::<$broker>().await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn an_application_stopped_15s_mid_stream_costs_no_message() {
            availability::an_application_stopped_15s_mid_stream_costs_no_message::<$broker>().await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn an_application_answering_503_to_everything_for_10s_costs_no_message() {
            availability::an_application_answering_503_to_everything_for_10s_costs_no_message::<
                $broker,
            >()
            .await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn a_poison_message_among_healthy_ones_is_still_dead_lettered_after_max_attempts() {
            availability::a_poison_message_among_healthy_ones_is_still_dead_lettered_after_max_attempts::<
                $broker,
            >()
            .await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn a_delivery_slower_than_the_lease_keeps_its_claim() {
            availability::a_delivery_slower_than_the_lease_keeps_its_claim::<$broker>().await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn a_killed_sidecars_key_is_claimable_again_within_about_one_lease() {
            availability::a_killed_sidecars_key_is_claimable_again_within_about_one_lease::<
                $broker,
            >()
            .await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn large_messages_stay_within_the_memory_limit_the_operator_injects() {
            availability::large_messages_stay_within_the_memory_limit_the_operator_injects::<
                $broker,
            >()
            .await;
        }
    };
}

const WAIT: Duration = Duration::from_secs(120);
/// The in-flight limit of these scenarios (the RabbitMQ default prefetch).
const MAX_IN_FLIGHT: u32 = 100;

fn yaml<B: BrokerUnderTest>(
    t: &B,
    app: &App,
    consumer: &str,
    dedup: &str,
    delivery: &str,
) -> String {
    format!(
        r#"
consumer: {consumer}
store:
  kind: redis
  url: redis://127.0.0.1:6379
dedup:
  maxAttempts: 3
{key}
{dedup}
broker:
{broker}
delivery:
  url: {url}
  initialBackoff: 20ms
  maxBackoff: 200ms
  readiness:
    interval: 200ms
  circuitBreaker:
    openFor: 500ms
{delivery}
shutdownGrace: 10s
"#,
        key = t.dedup_key_yaml(),
        broker = t.broker_yaml(MAX_IN_FLIGHT),
        url = app.url()
    )
}

/// The delivery timeout of the scenarios that do not set their own.
const TIMEOUT: &str = "  timeout: 5s";

fn config<B: BrokerUnderTest>(
    t: &B,
    app: &App,
    consumer: &str,
    dedup: &str,
    delivery: &str,
) -> Config {
    Config::from_yaml(&yaml(t, app, consumer, dedup, delivery)).expect("valid test config")
}

async fn start<B: BrokerUnderTest>(t: &B, config: Config, store: Arc<dyn KeyStore>) -> Running {
    super::sidecar::start_with(config, t.secrets(), store).await
}

fn keyed_n(n: usize) -> Vec<Message> {
    (0..n).map(keyed).collect()
}

async fn redis_store(test: &str) -> Arc<RedisStore> {
    Arc::new(super::redis::store(test).await)
}
pub async fn an_application_that_starts_15s_late_costs_no_message<B: BrokerUnderTest>() {
    let t = B::create("late-app").await;
    let app = app::not_started(app::free_addr(), app::always_ok(), Duration::ZERO);
    let store = redis_store("late-app").await;
    let n = 3_000;
    t.publish(keyed_n(n)).await;
    let sidecar = start(&t, config(&t, &app, "late-app", "", TIMEOUT), store.clone()).await;

    tokio::time::sleep(Duration::from_secs(15)).await;
    let (status, waiting) = readyz(&sidecar).await;
    let available_before = metric(&sidecar, "idemq_app_available").await;
    let taken_before = n as u64 - t.backlog().await;
    let held_before = metric(&sidecar, "idemq_in_flight").await;
    app.restart().await;
    let done = app.wait_until(WAIT, |a| a.distinct() == n).await;
    let available_after = metric(&sidecar, "idemq_app_available").await;
    sidecar.stop().await.expect("clean stop");
    let dead = t.dead_letters().await;
    println!(
        "application 15 s late ({}): {n} messages waiting, {taken_before} taken from the queue before it listened, {} delivered ({} twice), {} dead-lettered; /readyz while waiting: {status} {:?}",
        B::NAME,
        app.distinct(),
        app.processed_twice(),
        dead.len(),
        waiting.trim()
    );
    assert_eq!(status, 503);
    assert!(waiting.contains("app: waiting"), "{waiting}");
    assert_eq!((available_before, available_after), (0, 1));
    assert_eq!(taken_before, 0, "nothing consumed before the app listens");
    assert_eq!(held_before, 0, "nothing held before the app listens");
    assert!(done, "delivered {} of {n}", app.distinct());
    assert_eq!(app.processed(), n as u32);
    assert!(dead.is_empty(), "dead-lettered: {}", dead.len());
    assert_eq!(t.backlog().await, 0);
    super::redis::cleanup(store.prefix()).await;
    t.delete().await;
}

pub async fn an_application_stopped_15s_mid_stream_costs_no_message<B: BrokerUnderTest>() {
    let t = B::create("app-down").await;
    let app = app::start_slow(app::always_ok(), Duration::from_millis(5)).await;
    let store = redis_store("app-down").await;
    let n = 3_000;
    t.publish(keyed_n(n)).await;
    let sidecar = start(&t, config(&t, &app, "app-down", "", TIMEOUT), store.clone()).await;
    assert!(app.wait_until(WAIT, |a| a.distinct() >= 500).await);

    app.stop().await;
    let at_stop = app.distinct();
    tokio::time::sleep(Duration::from_secs(15)).await;
    let (status, down) = readyz(&sidecar).await;
    let available = metric(&sidecar, "idemq_app_available").await;
    let before_restart = app.distinct();
    app.restart().await;
    let done = app.wait_until(WAIT, |a| a.distinct() == n).await;
    sidecar.stop().await.expect("clean stop");
    let dead = t.dead_letters().await;
    println!(
        "application stopped 15 s mid-stream ({}): {n} messages, {at_stop} delivered at the stop, {} delivered in all, {} processed twice, {} dead-lettered, {} lost; /readyz while down: {status} {:?}",
        B::NAME,
        app.distinct(),
        app.processed_twice(),
        dead.len(),
        n - app.distinct(),
        down.trim()
    );
    assert!(at_stop < n, "the stream was over before the stop");
    assert_eq!(before_restart, at_stop, "nothing delivered while stopped");
    assert_eq!(status, 503);
    assert!(down.contains("app: unavailable"), "{down}");
    assert_eq!(available, 0);
    assert!(done, "delivered {} of {n}", app.distinct());
    assert!(dead.is_empty(), "dead-lettered: {}", dead.len());
    // A graceful stop answers what it accepted, so nothing is processed twice
    // here; a crash of the app could repeat what was in flight (the bound).
    assert_eq!(app.processed_twice(), 0);
    assert_eq!(t.backlog().await, 0);
    super::redis::cleanup(store.prefix()).await;
    t.delete().await;
}

pub async fn an_application_answering_503_to_everything_for_10s_costs_no_message<
    B: BrokerUnderTest,
>() {
    let t = B::create("app-503").await;
    let started = Instant::now();
    let app = app::start_slow(
        Arc::new(move |_: &str, _| {
            if started.elapsed() < Duration::from_secs(10) {
                StatusCode::SERVICE_UNAVAILABLE
            } else {
                StatusCode::OK
            }
        }),
        Duration::from_millis(2),
    )
    .await;
    let store = redis_store("app-503").await;
    let n = 2_000;
    t.publish(keyed_n(n)).await;
    // The size is known, so the full prefetch (100) is in flight from the
    // start and the circuit breaker, not a lone message, meets the outage.
    let sidecar = start(
        &t,
        config(
            &t,
            &app,
            "app-503",
            "",
            "  timeout: 5s\n  expectedMessageBytes: 64",
        ),
        store.clone(),
    )
    .await;
    let done = app.wait_until(WAIT, |a| a.distinct() == n).await;
    let retried = metric(&sidecar, "idemq_messages_total{outcome=\"retried\"}").await;
    sidecar.stop().await.expect("clean stop");
    let dead = t.dead_letters().await;
    println!(
        "application answering 503 for 10 s ({}): {n} messages, {} delivered ({} twice), {} answers in all ({} of them 503), {retried} retries, {} dead-lettered",
        B::NAME,
        app.distinct(),
        app.processed_twice(),
        app.attempts(),
        app.attempts() - app.processed(),
        dead.len()
    );
    assert!(done, "delivered {} of {n}", app.distinct());
    assert!(app.attempts() > app.processed(), "the app did answer 503");
    assert!(dead.is_empty(), "dead-lettered: {}", dead.len());
    assert_eq!(app.processed_twice(), 0);
    assert_eq!(t.backlog().await, 0);
    super::redis::cleanup(store.prefix()).await;
    t.delete().await;
}

pub async fn a_poison_message_among_healthy_ones_is_still_dead_lettered_after_max_attempts<
    B: BrokerUnderTest,
>() {
    let t = B::create("poison-503").await;
    // m-7 fails with 503 (what an outage looks like) and m-8 with 500, every
    // time; every other message succeeds.
    let app = app::start_slow(
        Arc::new(|key: &str, _| match key {
            "m-7" => StatusCode::SERVICE_UNAVAILABLE,
            "m-8" => StatusCode::INTERNAL_SERVER_ERROR,
            _ => StatusCode::OK,
        }),
        Duration::from_millis(5),
    )
    .await;
    let store = redis_store("poison-503").await;
    let n = 500;
    t.publish(keyed_n(n)).await;
    let sidecar = start(
        &t,
        config(&t, &app, "poison-503", "", TIMEOUT),
        store.clone(),
    )
    .await;
    // A failure counts only if another message succeeded since the previous
    // one (README): healthy messages keep coming, ten every 10 ms (less than
    // the first back-off, 20 ms), until the poison ones are settled. A backlog
    // alone does not say when they come: a Kafka consumer takes one
    // partition's records after another's, and m-7 and m-8 came after 250
    // others, whose healthy successors were all processed before m-8's third
    // attempt.
    let published = AtomicUsize::new(n);
    let stop_feed = AtomicBool::new(false);
    let feed = async {
        while !stop_feed.load(SeqCst) {
            tokio::time::sleep(Duration::from_millis(10)).await;
            let from = published.load(SeqCst);
            t.publish((from..from + 10).map(keyed).collect()).await;
            published.store(from + 10, SeqCst);
        }
    };
    let dead_lettered = async {
        let settled = wait_for(WAIT, async || {
            metric(
                &sidecar,
                "idemq_dead_letters_total{reason=\"max_attempts\"}",
            )
            .await
                == 2
        })
        .await;
        stop_feed.store(true, SeqCst);
        settled
    };
    let (settled, ()) = tokio::join!(dead_lettered, feed);
    let n = published.load(SeqCst);
    let _ = app.wait_until(WAIT, |a| a.distinct() == n - 2).await;
    sidecar.stop().await.expect("clean stop");
    let dead = t.dead_letters().await;
    println!(
        "poison among healthy ({}): {n} messages, {} delivered, dead letters {:?}, attempts of m-7 (503) {} and m-8 (500) {} (maxAttempts 3)",
        B::NAME,
        app.distinct(),
        dead,
        app.attempts_of("m-7"),
        app.attempts_of("m-8")
    );
    assert!(settled);
    assert_eq!(app.distinct(), n - 2);
    let mut dead_ids: Vec<_> = dead
        .iter()
        .map(|d| (d.reason.as_str(), d.key.as_deref().unwrap_or("")))
        .collect();
    dead_ids.sort();
    assert_eq!(dead_ids, [("max_attempts", "m-7"), ("max_attempts", "m-8")]);
    assert_eq!(app.attempts_of("m-7"), 3);
    assert_eq!(app.attempts_of("m-8"), 3);
    super::redis::cleanup(store.prefix()).await;
    t.delete().await;
}

pub async fn a_delivery_slower_than_the_lease_keeps_its_claim<B: BrokerUnderTest>() {
    let t = B::create("slow-lease").await;
    let lease = Duration::from_secs(1);
    // The application takes three times the lease.
    let app = app::start_slow(app::always_ok(), lease * 3).await;
    let namespace = super::unique("slow-lease");
    let store = || -> Arc<dyn KeyStore> {
        Arc::new(
            RedisStore::new(RedisOptions {
                timeout: Duration::from_millis(300),
                ..RedisOptions::new(super::redis::URL, namespace.clone())
            })
            .expect("options"),
        )
    };
    let n = 40;
    // Every message twice, the copies back to back: the two sidecars take
    // them at the same time.
    t.publish((0..n).flat_map(|i| [keyed(i), keyed(i)]).collect())
        .await;
    let dedup = "  lease: 1s";
    let one = start(&t, config(&t, &app, &namespace, dedup, TIMEOUT), store()).await;
    let two = start(&t, config(&t, &app, &namespace, dedup, TIMEOUT), store()).await;
    let done = app.wait_until(WAIT, |a| a.distinct() == n).await;
    let drained = wait_for(WAIT, async || t.backlog().await == 0).await;
    // Copies still cycling as in-flight requeues settle as duplicates.
    let settled = wait_for(WAIT, async || {
        let mut settled = 0;
        for s in [&one, &two] {
            for outcome in ["delivered", "duplicate"] {
                settled +=
                    metric(s, &format!("idemq_messages_total{{outcome=\"{outcome}\"}}")).await;
            }
        }
        settled == 2 * n as u64
    })
    .await;
    let renewed = metric(&one, "idemq_lease_renewals_total{outcome=\"renewed\"}").await
        + metric(&two, "idemq_lease_renewals_total{outcome=\"renewed\"}").await;
    let lost = metric(&one, "idemq_lease_renewals_total{outcome=\"lost\"}").await
        + metric(&two, "idemq_lease_renewals_total{outcome=\"lost\"}").await;
    one.stop().await.expect("clean stop");
    two.stop().await.expect("clean stop");
    println!(
        "slow delivery ({}): 3 s per message with a 1 s lease, two sidecars, every message twice: {n} keys, {} processed, {} processed twice, {renewed} renewals, {lost} lost",
        B::NAME,
        app.processed(),
        app.processed_twice()
    );
    assert!(
        done && drained && settled,
        "delivered {} of {n}",
        app.distinct()
    );
    assert!(renewed > 0, "the leases were renewed");
    assert_eq!(lost, 0);
    assert_eq!(app.processed_twice(), 0);
    assert_eq!(app.processed(), n as u32);
    super::redis::cleanup(&format!("idemq:{{{namespace}}}:")).await;
    t.delete().await;
}

/// The sidecar binary with a config file, as a child process.
fn spawn_sidecar<B: BrokerUnderTest>(t: &B, config: &str, dir: &std::path::Path) -> Child {
    let path = dir.join("sidecar.yaml");
    std::fs::write(&path, config).expect("write config");
    Command::new(env!("CARGO_BIN_EXE_idemq-sidecar"))
        .arg("--config")
        .arg(&path)
        .envs(t.env())
        .env("IDEMQ_LOG", "warn")
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn the sidecar")
}

fn admin_yaml() -> String {
    format!("admin:\n  listen: {}\n", app::free_addr())
}

pub async fn a_killed_sidecars_key_is_claimable_again_within_about_one_lease<B: BrokerUnderTest>() {
    let t = B::create("kill-lease").await;
    let lease = Duration::from_secs(2);
    // The application holds the message far longer than the lease.
    let app = app::start_slow(app::always_ok(), Duration::from_secs(60)).await;
    let consumer = super::unique("kill-lease");
    let dir = std::env::temp_dir().join(&consumer);
    std::fs::create_dir_all(&dir).expect("tmp dir");
    let yaml = yaml(&t, &app, &consumer, "  lease: 2s", "  timeout: 90s") + &admin_yaml();
    t.publish(vec![keyed(0)]).await;
    let mut sidecar = spawn_sidecar(&t, &yaml, &dir);
    assert!(
        app.wait_until(WAIT, |a| a.started() == 1).await,
        "delivered"
    );
    let store = RedisStore::new(RedisOptions {
        timeout: Duration::from_secs(2),
        ..RedisOptions::new(super::redis::URL, consumer.clone())
    })
    .expect("options");
    // Renewed while the delivery is in flight: still held after three leases.
    tokio::time::sleep(lease * 3).await;
    let held = store
        .claim("m-0", None, lease, Duration::from_secs(60))
        .await
        .expect("claim");
    sidecar.kill().expect("SIGKILL");
    sidecar.wait().expect("reap");
    let killed = Instant::now();
    let mut freed = None;
    while killed.elapsed() < lease * 5 {
        if let Claim::Acquired { token } = store
            .claim("m-0", None, lease, Duration::from_secs(60))
            .await
            .expect("claim")
        {
            freed = Some(killed.elapsed());
            store.release("m-0", &token).await.expect("release");
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "sidecar SIGKILLed during a delivery ({}): lease {lease:?}; held after {:?} of delivery: {}; claimable again {:?} after the kill",
        B::NAME,
        lease * 3,
        matches!(held, Claim::InFlight { .. }),
        freed
    );
    assert!(matches!(held, Claim::InFlight { .. }), "{held:?}");
    let freed = freed.expect("the key came back");
    // The last renewal left at most one lease; the second is slack for the
    // polling and a loaded machine.
    assert!(
        freed <= lease + Duration::from_secs(1),
        "claimable again only after {freed:?}"
    );
    super::redis::cleanup(&format!("idemq:{{{consumer}}}:")).await;
    std::fs::remove_dir_all(dir).ok();
    t.delete().await;
}

/// The peak resident memory of a process, from /proc (VmHWM), in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmHWM")
        * 1024
}

pub async fn large_messages_stay_within_the_memory_limit_the_operator_injects<
    B: BrokerUnderTest,
>() {
    let t = B::create("large").await;
    let app = app::start_slow(app::always_ok(), Duration::from_millis(200)).await;
    let consumer = super::unique("large");
    let dir = std::env::temp_dir().join(&consumer);
    std::fs::create_dir_all(&dir).expect("tmp dir");
    // Default prefetch (100) and byte budget: what the operator renders for
    // a policy that sets neither.
    // A timeout long enough that a loaded machine does not turn a slow
    // delivery into a retry (a timeout is not what this test is about).
    let yaml = yaml(&t, &app, &consumer, "", "  timeout: 60s") + &admin_yaml();
    let config = Config::from_yaml(&yaml).expect("valid");
    let delivery = config.delivery.as_ref().expect("delivery");
    let limit = idemq_sidecar::config::memory_limit_bytes(delivery.max_in_flight_bytes);
    let (n, size) = (200, 2 * 1024 * 1024);
    let publishing = Instant::now();
    t.publish(
        (0..n)
            .map(|i| {
                let mut body = vec![b'x'; size];
                body[..8].copy_from_slice(format!("{i:08}").as_bytes());
                Message::keyed(format!("m-{i}"), body)
            })
            .collect(),
    )
    .await;
    let published = publishing.elapsed();
    let mut sidecar = spawn_sidecar(&t, &yaml, &dir);
    let delivering = Instant::now();
    let done = app.wait_until(WAIT, |a| a.distinct() == n).await;
    let delivered = delivering.elapsed();
    let peak = peak_rss(sidecar.id());
    let _ = Command::new("kill")
        .args(["-TERM", &sidecar.id().to_string()])
        .status();
    let exit = sidecar.wait().expect("reap");
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    println!(
        "large messages ({}): {n} × {} MiB, max in flight 100, budget {:.0} MiB: {} delivered ({} twice); sidecar peak RSS {:.1} MiB, the memory limit the operator injects {:.0} MiB (published in {published:.1?}, delivered in {delivered:.1?})",
        B::NAME,
        size / (1024 * 1024),
        mib(delivery.max_in_flight_bytes),
        app.distinct(),
        app.processed_twice(),
        mib(peak),
        mib(limit)
    );
    assert!(done, "delivered {} of {n}", app.distinct());
    assert_eq!(app.processed_twice(), 0);
    assert!(peak < limit, "peak RSS {peak} over the limit {limit}");
    assert_eq!(exit.code(), Some(0));
    assert!(t.dead_letters().await.is_empty());
    super::redis::cleanup(&format!("idemq:{{{consumer}}}:")).await;
    std::fs::remove_dir_all(dir).ok();
    t.delete().await;
}
