//! The pipeline scenarios (`common/scenarios.rs`) against the real RabbitMQ
//! and Redis. Each test has its own queues and key namespace. Run with
//! `--nocapture` to see each test's figures.

mod common;

use std::time::Duration;

use common::app;
use common::broker::BrokerUnderTest;
use common::rabbitmq::RabbitMq;
use common::scenarios::{self, keyed, readyz, wait_for, Store, MAX_IN_FLIGHT, WAIT};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producer_duplicates_are_delivered_exactly_once() {
    scenarios::producer_duplicates_are_delivered_exactly_once::<RabbitMq>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_failures_are_retried_and_processed_once() {
    scenarios::transient_failures_are_retried_and_processed_once::<RabbitMq>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_messages_are_dead_lettered_with_a_reason() {
    scenarios::poison_messages_are_dead_lettered_with_a_reason::<RabbitMq>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_keys_are_dead_lettered_by_default() {
    scenarios::missing_keys_are_dead_lettered_by_default::<RabbitMq>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hash_body_policy_dedups_identical_bodies() {
    scenarios::hash_body_policy_dedups_identical_bodies::<RabbitMq>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_under_load_loses_nothing_and_processes_nothing_twice() {
    scenarios::graceful_shutdown_under_load_loses_nothing_and_processes_nothing_twice::<RabbitMq>()
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_joining_and_leaving_loses_nothing_and_repeats_nothing() {
    scenarios::a_consumer_joining_and_leaving_loses_nothing_and_repeats_nothing::<RabbitMq>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_refused_in_an_outage_are_recorded_when_the_store_returns() {
    scenarios::completions_refused_in_an_outage_are_recorded_when_the_store_returns::<RabbitMq>()
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_outage_pauses_delivery_and_loses_nothing() {
    scenarios::store_outage_pauses_delivery_and_loses_nothing::<RabbitMq>(async |_, _| {}).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_connection_loss_reconnects_and_processes_once() {
    scenarios::broker_loss_reconnects_and_processes_once::<RabbitMq>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_loses_nothing_and_reprocesses_at_most_prefetch() {
    scenarios::crash_loses_nothing_and_reprocesses_at_most_max_in_flight::<RabbitMq>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_failover_loses_nothing_and_reprocesses_at_most_prefetch() {
    scenarios::store_failover_loses_nothing_and_reprocesses_at_most_max_in_flight::<RabbitMq>()
        .await;
}

/// A dead-letter exchange that does not exist (a typo, or not declared yet):
/// the sidecar takes nothing from the queue, since the first dead letter would
/// close its channel, says so in /readyz, and consumes everything once the
/// exchange is declared.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_dead_letter_exchange_takes_nothing_until_it_is_declared() {
    let t = RabbitMq::create("no-dlx").await;
    let missing = format!("{}.missing", t.queue);
    let app = app::start(app::always_ok()).await;
    let store = Store::new("no-dlx").await;
    let mut config = scenarios::config(&t, &app, "no-dlx", MAX_IN_FLIGHT, "");
    config
        .broker
        .as_mut()
        .and_then(|b| b.rabbitmq.as_mut())
        .expect("a rabbitmq section")
        .dead_letter_exchange = missing.clone();
    let n = 200;
    t.publish((0..n).map(keyed).collect()).await;
    let sidecar = scenarios::start(&t, config, store.dyn_store()).await;

    tokio::time::sleep(Duration::from_secs(3)).await;
    let (status, waiting) = readyz(&sidecar).await;
    let left = t.backlog().await;
    t.declare_exchange(&missing).await;
    let done = app.wait_until(WAIT, |a| a.distinct() == n).await;
    let drained = wait_for(WAIT, async || t.backlog().await == 0).await;
    sidecar.stop().await.expect("clean stop");
    println!(
        "missing dead-letter exchange: {left} of {n} left in the queue while it was missing, /readyz {status} {:?}; once declared {} processed ({} twice)",
        waiting.trim(),
        app.distinct(),
        app.processed_twice()
    );
    assert_eq!(
        left, n as u64,
        "nothing taken while the exchange is missing"
    );
    assert_eq!(status, 503, "{waiting}");
    assert!(done, "processed {} of {n} once declared", app.distinct());
    assert_eq!(app.processed_twice(), 0);
    assert!(drained, "the queue ends empty");
    t.delete_exchange(&missing).await;
    store.cleanup().await;
    t.delete().await;
}

/// A slow delivery holds the first unacked tag, so the messages settled after
/// it cannot be acked by one `multiple` ack: they are acked one by one once it
/// has been pending a while, even when nothing settles after them. Otherwise
/// they would hold every prefetch slot and the queue would stop until the slow
/// one finished. The slow message is the first the sidecar takes, at prefetch
/// 1 (its size unknown): raising the prefetch must not wait for it either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_settled_behind_a_slow_one_are_acked_and_the_queue_keeps_flowing() {
    const SLOW: Duration = Duration::from_secs(8);
    // Two slots: the slow message and one more, which settles at once and
    // then waits for the timer that acks it alone (nothing else settles).
    const PREFETCH: u32 = 2;
    let t = RabbitMq::create("behind-slow").await;
    let app = app::start_with_delays(
        app::always_ok(),
        std::sync::Arc::new(|key: &str| if key == "m-0" { SLOW } else { Duration::ZERO }),
    )
    .await;
    let store = Store::new("behind-slow").await;
    let mut config = scenarios::config(&t, &app, "behind-slow", PREFETCH, "");
    config
        .delivery
        .as_mut()
        .expect("a delivery section")
        .timeout = 4 * SLOW;
    let n = 40;
    t.publish((0..n).map(keyed).collect()).await;
    let sidecar = scenarios::start(&t, config, store.dyn_store()).await;

    assert!(
        app.wait_until(WAIT, |a| a.started() >= 1).await,
        "nothing delivered"
    );
    let started = std::time::Instant::now();
    // Every other message, while the slow one (delivered first) is still at the app.
    let others = app
        .wait_until(SLOW - Duration::from_secs(2), |a| a.distinct() >= n - 1)
        .await;
    let others_in = started.elapsed();
    let others_done = app.distinct();
    let all = app.wait_until(WAIT, |a| a.distinct() == n).await;
    let drained = wait_for(WAIT, async || t.backlog().await == 0).await;
    sidecar.stop().await.expect("clean stop");
    println!(
        "behind a {SLOW:?} delivery, with prefetch {PREFETCH}: {others_done} of the other {} processed in {others_in:.1?}; all {} in the end, {} twice",
        n - 1,
        app.distinct(),
        app.processed_twice()
    );
    assert!(
        others,
        "only {others_done} of the other {} processed while the slow one was at the app",
        n - 1
    );
    assert!(all, "processed {} of {n}", app.distinct());
    assert_eq!(app.processed_twice(), 0);
    assert!(drained, "the queue ends empty");
    store.cleanup().await;
    t.delete().await;
}
