//! The pipeline scenarios (`common/scenarios.rs`) against a real
//! Kafka-compatible broker on 127.0.0.1:9092 and the real Redis, plus what is
//! Kafka's own: committed offsets never pass an unsettled record, a store
//! outage pauses partitions without giving them up, and per-partition
//! ordering. Each test has its own topics, group and key namespace. Run with
//! `--nocapture` to see each test's figures.

mod common;

use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use common::app;
use common::broker::{BrokerUnderTest, Message};
use common::kafka::{Kafka, PARTITIONS};
use common::scenarios::{self, keyed, metric, Store, WAIT};
use common::tansu::OwnKafka;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producer_duplicates_are_delivered_exactly_once() {
    scenarios::producer_duplicates_are_delivered_exactly_once::<Kafka>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_failures_are_retried_and_processed_once() {
    scenarios::transient_failures_are_retried_and_processed_once::<Kafka>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_messages_are_dead_lettered_with_a_reason() {
    scenarios::poison_messages_are_dead_lettered_with_a_reason::<Kafka>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_keys_are_dead_lettered_by_default() {
    scenarios::missing_keys_are_dead_lettered_by_default::<Kafka>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hash_body_policy_dedups_identical_bodies() {
    scenarios::hash_body_policy_dedups_identical_bodies::<Kafka>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_under_load_loses_nothing_and_processes_nothing_twice() {
    scenarios::graceful_shutdown_under_load_loses_nothing_and_processes_nothing_twice::<Kafka>()
        .await;
}

/// A rebalance: a second sidecar joins the group mid-stream, later leaves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_joining_and_leaving_loses_nothing_and_repeats_nothing() {
    scenarios::a_consumer_joining_and_leaving_loses_nothing_and_repeats_nothing::<Kafka>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_refused_in_an_outage_are_recorded_when_the_store_returns() {
    scenarios::completions_refused_in_an_outage_are_recorded_when_the_store_returns::<Kafka>()
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_outage_pauses_delivery_and_loses_nothing() {
    scenarios::store_outage_pauses_delivery_and_loses_nothing::<Kafka>(async |_, sidecar| {
        let assigned = metric(sidecar, "idemq_assigned_partitions").await;
        let revoked = metric(sidecar, "idemq_revoked_partitions_total").await;
        println!(
            "store outage (kafka): during the outage {assigned} partitions assigned, {revoked} revoked"
        );
        assert_eq!(
            assigned, PARTITIONS as u64,
            "the member keeps its partitions"
        );
        assert_eq!(revoked, 0, "paused, not revoked");
    })
    .await;
}

/// The broker is killed mid-stream and started again (a broker of the
/// test's own, on storage that outlives it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_loss_reconnects_and_processes_once() {
    scenarios::broker_loss_reconnects_and_processes_once::<OwnKafka>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_loses_nothing_and_reprocesses_at_most_max_in_flight() {
    scenarios::crash_loses_nothing_and_reprocesses_at_most_max_in_flight::<Kafka>().await;
}

/// One partition, one slow record: while it is held by the app, records after
/// it settle, but the committed offset stays at it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn committed_offsets_never_pass_an_unsettled_record() {
    let t = Kafka::with_partitions("commits", 1).await;
    // Below the delivery timeout (2s): the held record is then processed once.
    let hold = Duration::from_millis(1500);
    let app = app::start_with_delays(
        app::always_ok(),
        Arc::new(move |key: &str| if key == "m-5" { hold } else { Duration::ZERO }),
    )
    .await;
    let store = Store::new("commits").await;
    let n = 200;
    t.publish((0..n).map(keyed).collect()).await;
    let sidecar = scenarios::start(
        &t,
        scenarios::config(&t, &app, "commits", 50, ""),
        store.dyn_store(),
    )
    .await;
    // Everything but the held record (and what waits on the in-flight limit).
    assert!(app.wait_until(WAIT, |a| a.distinct() >= 40).await);
    let mut samples = Vec::new();
    while app.distinct() < n {
        samples.push((app.distinct(), t.committed()[0]));
        if samples.len() > 12 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let done = app.wait_until(WAIT, |a| a.distinct() == n).await;
    let all_committed = scenarios::wait_for(WAIT, async || t.backlog().await == 0).await;
    let after = t.committed()[0];
    sidecar.stop().await.expect("clean stop");
    let highest_while_held = samples.iter().filter_map(|(_, c)| *c).max().unwrap_or(0);
    println!(
        "commits (kafka): {n} records on one partition, record 5 held {hold:?}; while held the app had processed up to {} records and the committed offset was at most {highest_while_held}; after: {after:?}",
        samples.iter().map(|(d, _)| *d).max().unwrap_or(0)
    );
    assert!(
        samples.iter().any(|(d, _)| *d > 6),
        "records after the held one were processed while it was held"
    );
    assert!(
        highest_while_held <= 5,
        "a commit passed the unsettled record 5: {samples:?}"
    );
    assert!(done, "processed {} of {n}", app.distinct());
    assert!(all_committed, "everything is committed in the end");
    assert_eq!(after, Some(n as i64));
    assert_eq!(app.processed_twice(), 0);
    store.cleanup().await;
    t.delete().await;
}

/// `ordering: perPartition`: never two deliveries of one partition at once,
/// and each partition's records arrive in offset order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_partition_ordering_delivers_one_record_per_partition_at_a_time() {
    let t = Kafka::with_partitions("ordering", 1).await;
    let app = app::start_slow(app::always_ok(), Duration::from_millis(2)).await;
    let store = Store::new("ordering").await;
    let n = 300;
    t.publish((0..n).map(keyed).collect()).await;
    let mut config = scenarios::config(&t, &app, "ordering", 50, "");
    if let Some(kafka) = config.broker.as_mut().and_then(|b| b.kafka.as_mut()) {
        kafka.ordering = idemq_sidecar::config::Ordering::PerPartition;
    }
    let sidecar = scenarios::start(&t, config, store.dyn_store()).await;
    let done = app.wait_until(WAIT, |a| a.distinct() == n).await;
    sidecar.stop().await.expect("clean stop");
    let order = app.order();
    let in_order = order
        .iter()
        .map(|k| {
            k.trim_start_matches("m-")
                .parse::<usize>()
                .unwrap_or(usize::MAX)
        })
        .collect::<Vec<_>>()
        .windows(2)
        .all(|w| w[0] < w[1]);
    println!(
        "ordering (kafka): {n} records on one partition, most deliveries at once {}, in offset order: {in_order}",
        app.max_concurrent()
    );
    assert!(done, "processed {} of {n}", app.distinct());
    assert_eq!(app.max_concurrent(), 1);
    assert!(in_order, "{order:?}");
    store.cleanup().await;
    t.delete().await;
}

/// A poison record larger than a Kafka client sends by default (1 MB) still
/// reaches the dead-letter topic, and its offset is committed after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_record_larger_than_1mb_is_dead_lettered() {
    let t = Kafka::with_partitions("large-dead", 1).await;
    let app = app::start_slow(
        Arc::new(|key: &str, _| match key {
            "m-1" => StatusCode::UNPROCESSABLE_ENTITY,
            _ => StatusCode::OK,
        }),
        Duration::ZERO,
    )
    .await;
    let store = Store::new("large-dead").await;
    let large = vec![b'x'; 2 * 1024 * 1024];
    t.publish(vec![keyed(0), Message::keyed("m-1", large), keyed(2)])
        .await;
    let sidecar = scenarios::start(
        &t,
        scenarios::config(&t, &app, "large-dead", 50, ""),
        store.dyn_store(),
    )
    .await;
    let dead_lettered = scenarios::wait_for(Duration::from_secs(30), async || {
        metric(&sidecar, "idemq_dead_letters_total{reason=\"poison\"}").await == 1
    })
    .await;
    let committed = scenarios::wait_for(WAIT, async || t.backlog().await == 0).await;
    sidecar.stop().await.expect("clean stop");
    let dead = t.dead_letters().await;
    println!(
        "large poison (kafka): a 2 MiB record answered 422: dead letters {dead:?}, all committed: {committed}, the other two processed: {}",
        app.distinct() == 2
    );
    assert!(dead_lettered, "the 2 MiB record was not dead-lettered");
    assert_eq!(dead.len(), 1);
    assert_eq!(
        (dead[0].reason.as_str(), dead[0].key.as_deref()),
        ("poison", Some("m-1"))
    );
    assert!(committed);
    assert_eq!(app.distinct(), 2);
    store.cleanup().await;
    t.delete().await;
}
