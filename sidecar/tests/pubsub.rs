//! The pipeline scenarios (`common/scenarios.rs`) against Google's Pub/Sub
//! emulator and the real Redis, each message keyed by its `event-id`
//! attribute, dead letters published by the sidecar to a topic of the
//! test's own; plus what only Pub/Sub has: ack deadlines a slow application
//! outlasts, a subscription's dead-letter policy, ordering keys and
//! exactly-once delivery. Run with `--nocapture` to see each test's figures.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use common::broker::BrokerUnderTest;
use common::pubsub::{PubSub, Settings, KEY};
use common::{app, scenarios};
use gcloud_googleapis::pubsub::v1::PubsubMessage;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producer_duplicates_by_attribute_are_delivered_exactly_once() {
    scenarios::producer_duplicates_are_delivered_exactly_once::<PubSub>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_failures_are_retried_and_processed_once() {
    scenarios::transient_failures_are_retried_and_processed_once::<PubSub>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_messages_are_dead_lettered_with_a_reason() {
    scenarios::poison_messages_are_dead_lettered_with_a_reason::<PubSub>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_keys_are_dead_lettered_by_default() {
    scenarios::missing_keys_are_dead_lettered_by_default::<PubSub>().await;
}

/// SIGTERM to the sidecar binary while every message is at the application:
/// each finishes within the grace, is acked, and is processed once; the
/// process exits cleanly. A process rather than the shared scenario's
/// in-process sidecar: the client ends a streaming pull only by closing its
/// connection, which the process's exit does.
///
/// No restart on the same subscription follows, unlike the other brokers'
/// scenario: the emulator goes on pushing to a streaming pull after it
/// closed, even after its connection closed. Measured with Google's Python
/// client: 300 messages published after a stream closed, a new stream got
/// 100 to 201 of them in 20 s (300 of 300 with no stream closed before);
/// the rest come back only once their deadlines lapse, and may be pushed to
/// the dead stream again. The crash test covers a restart, by deadlines.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_under_load_loses_nothing_and_processes_nothing_twice() {
    let t = PubSub::create("drain").await;
    let app = app::start_slow(app::always_ok(), Duration::from_secs(1)).await;
    let consumer = common::unique("drain");
    let yaml = format!(
        "consumer: {consumer}\nstore:\n  kind: redis\n  url: redis://127.0.0.1:6379\ndedup:\n  lease: 5s\n{}\nbroker:\n{}\ndelivery:\n  url: {}\nadmin:\n  listen: 127.0.0.1:{}\nshutdownGrace: 10s\n",
        t.dedup_key_yaml(),
        t.broker_yaml(scenarios::MAX_IN_FLIGHT),
        app.url(),
        scenarios::free_port()
    );
    let dir = std::env::temp_dir().join(&consumer);
    std::fs::create_dir_all(&dir).expect("tmp dir");
    let path = dir.join("sidecar.yaml");
    std::fs::write(&path, yaml).expect("write config");
    let n = scenarios::MAX_IN_FLIGHT as usize;
    t.publish((0..n).map(scenarios::keyed).collect()).await;
    let mut sidecar = scenarios::spawn_sidecar(&t, &path);
    let all_in_flight = app
        .wait_until(scenarios::WAIT, |a| a.started() as usize == n)
        .await;
    let at_stop = app.processed();
    let exit = terminate(&mut sidecar);
    println!(
        "graceful shutdown (pubsub, SIGTERM to the binary): {n} messages at the application (1 s each), {at_stop} done at the SIGTERM, {} processed in all, {} twice, exit {:?}",
        app.processed(),
        app.processed_twice(),
        exit.code()
    );
    assert!(
        all_in_flight,
        "{} of {n} reached the application",
        app.started()
    );
    assert_eq!(exit.code(), Some(0), "drained and exited cleanly");
    assert_eq!(app.processed(), n as u32, "every delivery finished");
    assert_eq!(app.processed_twice(), 0);
    // Acked, not merely processed: nothing comes back once the deadlines
    // (10 s) have passed.
    tokio::time::sleep(Duration::from_secs(12)).await;
    assert_eq!(t.backlog().await, 0, "every message was acked");
    common::redis::cleanup(&format!("idemq:{{{consumer}}}:")).await;
    std::fs::remove_dir_all(dir).ok();
    t.delete().await;
}

/// SIGTERM to a sidecar process; its exit status once it drained.
fn terminate(sidecar: &mut std::process::Child) -> std::process::ExitStatus {
    let term = std::process::Command::new("kill")
        .args(["-TERM", &sidecar.id().to_string()])
        .status()
        .expect("kill");
    assert!(term.success());
    sidecar.wait().expect("reap")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_outage_pauses_delivery_and_loses_nothing() {
    scenarios::store_outage_pauses_delivery_and_loses_nothing::<PubSub>(async |_, _| {}).await;
}

/// After the SIGKILL everything the emulator had pushed to the killed stream
/// (all of it: it ignores the flow control) comes back by deadline expiry
/// alone, to the restarted sidecar.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_loses_nothing_and_reprocesses_at_most_max_outstanding() {
    scenarios::crash_loses_nothing_and_reprocesses_at_most_max_in_flight::<PubSub>().await;
}

/// An application that takes three times the subscription's ack deadline
/// (10 s, Pub/Sub's least) per message: the sidecar extends the deadlines of
/// what it holds, so Pub/Sub redelivers nothing, to the sidecar or the app.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_application_outlasting_the_ack_deadline_is_not_redelivered() {
    let t = PubSub::create("slowapp").await;
    let app = app::start_slow(app::always_ok(), Duration::from_secs(30)).await;
    let store = scenarios::Store::new("slowapp").await;
    let n = 4;
    t.publish((0..n).map(scenarios::keyed).collect()).await;
    // A claim lease shorter than the deadline: the deadline stays 10 s.
    let mut config = scenarios::config(&t, &app, "slowapp", n as u32, "  lease: 5s");
    if let Some(delivery) = config.delivery.as_mut() {
        delivery.timeout = Duration::from_secs(40);
    }
    let sidecar = scenarios::start(&t, config, store.dyn_store()).await;
    let settled = scenarios::wait_for(scenarios::WAIT, async || {
        scenarios::messages(&sidecar, "delivered").await == n as u64
    })
    .await;
    let requeued = scenarios::messages(&sidecar, "in_flight_requeued").await;
    let duplicates = scenarios::messages(&sidecar, "duplicate").await;
    let extended = scenarios::metric(
        &sidecar,
        "idemq_broker_lease_extensions_total{outcome=\"extended\"}",
    )
    .await;
    sidecar.stop().await.expect("clean stop");
    println!(
        "slow app (pubsub): {n} messages taking 30 s each with an ack deadline of 10 s: app saw {} deliveries, deadlines extended {extended} times, redeliveries waited for as in flight {requeued}, duplicates {duplicates}",
        app.attempts()
    );
    assert!(settled, "processed {} of {n}", app.distinct());
    assert_eq!(
        app.attempts(),
        n as u32,
        "no second delivery reached the app"
    );
    assert_eq!(requeued, 0, "Pub/Sub redelivered a message held");
    assert_eq!(duplicates, 0, "Pub/Sub redelivered a message held");
    assert!(extended >= n as u64, "the deadlines were extended");
    assert_eq!(t.backlog().await, 0);
    store.cleanup().await;
    t.delete().await;
}

/// A subscription with a dead-letter policy (5 attempts): the sidecar gives a
/// poison message back until Pub/Sub moves it, with its delivery count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_policy_moves_poison_after_its_attempts() {
    let max_attempts = 5;
    let t = PubSub::create_with(
        "dlpolicy",
        Settings {
            dead_letter_policy: Some(max_attempts),
            ..Settings::default()
        },
    )
    .await;
    let app = app::start(Arc::new(|key: &str, _| {
        let n: usize = key.trim_start_matches("m-").parse().unwrap_or(1);
        if n % 10 == 3 {
            StatusCode::BAD_REQUEST
        } else {
            StatusCode::OK
        }
    }))
    .await;
    let store = scenarios::Store::new("dlpolicy").await;
    let n = 100;
    t.publish((0..n).map(scenarios::keyed).collect()).await;
    let sidecar = scenarios::start(
        &t,
        scenarios::config(&t, &app, "dlpolicy", scenarios::MAX_IN_FLIGHT, ""),
        store.dyn_store(),
    )
    .await;
    let moved = scenarios::wait_for(scenarios::WAIT, async || {
        scenarios::metric(&sidecar, "idemq_dead_letters_total{reason=\"poison\"}").await == 10
    })
    .await;
    let _ = app.wait_until(scenarios::WAIT, |a| a.distinct() == n).await;
    // Pub/Sub forwards a moment after the last nack.
    let mut dead = Vec::new();
    scenarios::wait_for(Duration::from_secs(20), async || {
        dead.extend(t.take(&t.dead_letter_subscription).await);
        dead.len() >= 10
    })
    .await;
    sidecar.stop().await.expect("clean stop");
    let counts: Vec<_> = dead
        .iter()
        .map(|a| a.get("CloudPubSubDeadLetterSourceDeliveryCount").cloned())
        .collect();
    println!(
        "dead-letter policy (pubsub): {n} messages, 10 poison: app processed {}, poison deliveries {}, moved by Pub/Sub {} (delivery counts {counts:?})",
        app.processed(),
        app.attempts() - app.processed(),
        dead.len()
    );
    assert!(moved, "the sidecar counted 10 poison messages moved");
    assert_eq!(app.processed(), (n - 10) as u32);
    assert_eq!(dead.len(), 10);
    assert!(dead
        .iter()
        .all(|a| a.get(KEY).is_some_and(|k| k.ends_with('3'))));
    assert_eq!(
        app.attempts() - app.processed(),
        10 * max_attempts as u32,
        "each poison message was delivered until its last attempt"
    );
    assert_eq!(t.backlog().await, 0);
    store.cleanup().await;
    t.delete().await;
}

/// Message ordering: 5 ordering keys, 40 messages each, with 50 messages
/// outstanding: each key's messages reach the app one at a time, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_message_per_ordering_key_is_in_flight_in_order() {
    let t = PubSub::create_with(
        "ordering",
        Settings {
            ordering: true,
            ..Settings::default()
        },
    )
    .await;
    let app = app::start_slow(app::always_ok(), Duration::from_millis(5)).await;
    let store = scenarios::Store::new("ordering").await;
    let (keys, per_key) = (5, 40);
    let messages = (0..per_key)
        .flat_map(|seq| {
            (0..keys).map(move |k| PubsubMessage {
                data: scenarios::body(seq),
                attributes: [(KEY.to_string(), format!("k{k}-{seq:03}"))].into(),
                ordering_key: format!("k{k}"),
                ..PubsubMessage::default()
            })
        })
        .collect();
    t.publish_raw(messages).await;
    let sidecar = scenarios::start(
        &t,
        scenarios::config(&t, &app, "ordering", scenarios::MAX_IN_FLIGHT, ""),
        store.dyn_store(),
    )
    .await;
    let done = app
        .wait_until(scenarios::WAIT, |a| a.distinct() == keys * per_key)
        .await;
    sidecar.stop().await.expect("clean stop");
    let mut by_key: HashMap<String, Vec<String>> = HashMap::new();
    for key in app.order() {
        let (ordering_key, _) = key.split_once('-').expect("k<key>-<seq>");
        by_key
            .entry(ordering_key.to_string())
            .or_default()
            .push(key.clone());
    }
    let in_order = by_key
        .values()
        .all(|seen| seen.windows(2).all(|w| w[0] < w[1]));
    println!(
        "ordering (pubsub): {keys} ordering keys x {per_key} messages, 50 outstanding: processed {}, most at once {} (one per key: at most {keys}), each key in order: {in_order}",
        app.processed(),
        app.max_concurrent()
    );
    assert!(done, "processed {} of {}", app.distinct(), keys * per_key);
    assert!(app.max_concurrent() <= keys, "at most one per ordering key");
    assert!(in_order, "{by_key:?}");
    assert_eq!(app.processed_twice(), 0);
    store.cleanup().await;
    t.delete().await;
}

/// An exactly-once subscription: acks are answered, and duplicates by
/// attribute are processed once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exactly_once_subscription_processes_each_key_once() {
    let t = PubSub::create_with(
        "exactlyonce",
        Settings {
            exactly_once: true,
            ..Settings::default()
        },
    )
    .await;
    let app = app::start(app::always_ok()).await;
    let store = scenarios::Store::new("exactlyonce").await;
    let sidecar = scenarios::start(
        &t,
        scenarios::config(&t, &app, "exactlyonce", scenarios::MAX_IN_FLIGHT, ""),
        store.dyn_store(),
    )
    .await;
    let distinct = 1000;
    let published = scenarios::publish_with_copies(&t, distinct, |i| 1 + i % 2).await;
    let settled = scenarios::wait_for(scenarios::WAIT, async || {
        scenarios::messages(&sidecar, "delivered").await
            + scenarios::messages(&sidecar, "duplicate").await
            >= published as u64
    })
    .await;
    let expired = scenarios::metric(
        &sidecar,
        "idemq_broker_ack_failures_total{outcome=\"expired\"}",
    )
    .await;
    sidecar.stop().await.expect("clean stop");
    println!(
        "exactly-once (pubsub): published {published} ({distinct} distinct): app processed {} ({} twice), acks refused as expired {expired}",
        app.processed(),
        app.processed_twice()
    );
    assert!(settled);
    assert_eq!(app.processed(), distinct as u32);
    assert_eq!(t.backlog().await, 0);
    store.cleanup().await;
    t.delete().await;
}
