//! The pipeline scenarios (`common/scenarios.rs`) against the real NATS
//! JetStream and Redis, plus what only JetStream has: AckWait, which a slow
//! application outlasts without being redelivered. Each test has its own
//! streams and key namespace. Run with `--nocapture` to see each test's
//! figures.

mod common;

use std::time::Duration;

use common::broker::BrokerUnderTest;
use common::jetstream::JetStream;
use common::{app, scenarios};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producer_duplicates_are_delivered_exactly_once() {
    scenarios::producer_duplicates_are_delivered_exactly_once::<JetStream>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_failures_are_retried_and_processed_once() {
    scenarios::transient_failures_are_retried_and_processed_once::<JetStream>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_messages_are_dead_lettered_with_a_reason() {
    scenarios::poison_messages_are_dead_lettered_with_a_reason::<JetStream>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_keys_are_dead_lettered_by_default() {
    scenarios::missing_keys_are_dead_lettered_by_default::<JetStream>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hash_body_policy_dedups_identical_bodies() {
    scenarios::hash_body_policy_dedups_identical_bodies::<JetStream>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_under_load_loses_nothing_and_processes_nothing_twice() {
    scenarios::graceful_shutdown_under_load_loses_nothing_and_processes_nothing_twice::<JetStream>(
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_joining_and_leaving_loses_nothing_and_repeats_nothing() {
    scenarios::a_consumer_joining_and_leaving_loses_nothing_and_repeats_nothing::<JetStream>()
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_outage_pauses_delivery_and_loses_nothing() {
    scenarios::store_outage_pauses_delivery_and_loses_nothing::<JetStream>(async |_, _| {}).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_loses_nothing_and_reprocesses_at_most_max_ack_pending() {
    scenarios::crash_loses_nothing_and_reprocesses_at_most_max_in_flight::<JetStream>().await;
}

/// An application that takes three and a half AckWaits per message: the
/// sidecar's `in progress` keeps JetStream from redelivering, so no second
/// delivery reaches the sidecar (it would be requeued as in flight) or the app.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_application_outlasting_ack_wait_is_not_redelivered() {
    let mut t = JetStream::create("slowapp").await;
    t.ack_wait = Duration::from_secs(1);
    let app = app::start_slow(app::always_ok(), Duration::from_millis(3500)).await;
    let store = scenarios::Store::new("slowapp").await;
    let n = 4;
    t.publish((0..n).map(scenarios::keyed).collect()).await;
    let mut config = scenarios::config(&t, &app, "slowapp", n as u32, "");
    if let Some(delivery) = config.delivery.as_mut() {
        delivery.timeout = Duration::from_secs(10);
    }
    let sidecar = scenarios::start(&t, config, store.dyn_store()).await;
    let done = app.wait_until(scenarios::WAIT, |a| a.distinct() == n).await;
    let settled = scenarios::wait_for(scenarios::WAIT, async || {
        scenarios::messages(&sidecar, "delivered").await == n as u64
    })
    .await;
    let requeued = scenarios::messages(&sidecar, "in_flight_requeued").await;
    let duplicates = scenarios::messages(&sidecar, "duplicate").await;
    sidecar.stop().await.expect("clean stop");
    println!(
        "slow app (jetstream): {n} messages taking 3.5 s each with AckWait 1 s: app saw {} deliveries, redeliveries requeued as in flight {requeued}, duplicates {duplicates}",
        app.attempts()
    );
    assert!(done && settled, "processed {} of {n}", app.distinct());
    assert_eq!(
        app.attempts(),
        n as u32,
        "no second delivery reached the app"
    );
    assert_eq!(requeued, 0, "JetStream redelivered a message in progress");
    assert_eq!(duplicates, 0, "JetStream redelivered a message in progress");
    assert_eq!(t.backlog().await, 0);
    store.cleanup().await;
    t.delete().await;
}
