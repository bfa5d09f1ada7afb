//! The pipeline scenarios (`common/scenarios.rs`) against a real Mosquitto
//! (one per test, see `common/mqtt.rs`) and Redis over MQTT 5, plus MQTT
//! 3.1.1, which has no properties: the key comes from the body and dead
//! letters are wrapped in a JSON envelope. Run with `--nocapture` to see
//! each test's figures.

mod common;

use common::broker::{BrokerUnderTest, Message};
use common::mqtt::Mqtt;
use common::{app, scenarios};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producer_duplicates_are_delivered_exactly_once() {
    scenarios::producer_duplicates_are_delivered_exactly_once::<Mqtt>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_failures_are_retried_and_processed_once() {
    scenarios::transient_failures_are_retried_and_processed_once::<Mqtt>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_messages_are_dead_lettered_with_a_reason() {
    scenarios::poison_messages_are_dead_lettered_with_a_reason::<Mqtt>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_keys_are_dead_lettered_by_default() {
    scenarios::missing_keys_are_dead_lettered_by_default::<Mqtt>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hash_body_policy_dedups_identical_bodies() {
    scenarios::hash_body_policy_dedups_identical_bodies::<Mqtt>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_under_load_loses_nothing_and_processes_nothing_twice() {
    scenarios::graceful_shutdown_under_load_loses_nothing_and_processes_nothing_twice::<Mqtt>()
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_outage_pauses_delivery_and_loses_nothing() {
    scenarios::store_outage_pauses_delivery_and_loses_nothing::<Mqtt>(async |_, _| {}).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_loses_nothing_and_reprocesses_at_most_receive_maximum() {
    scenarios::crash_loses_nothing_and_reprocesses_at_most_max_in_flight::<Mqtt>().await;
}

/// MQTT 3.1.1: 300 distinct orders published twice are processed once each,
/// keyed by a JSON pointer into the body; 10 bodies without the key are
/// dead-lettered in a JSON envelope that holds the reason and the body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_3_1_1_dedups_by_body_and_wraps_dead_letters() {
    let t = Mqtt::with_protocol("v311", "v3.1.1").await;
    let app = app::start(app::always_ok()).await;
    let store = scenarios::Store::new("v311").await;
    let key = "  key:\n    from: jsonPointer\n    pointer: /order/id\n";
    let config = scenarios::config(&t, &app, "v311", scenarios::MAX_IN_FLIGHT, key);
    let sidecar = scenarios::start(&t, config, store.dyn_store()).await;
    let distinct = 300;
    for _ in 0..2 {
        t.publish((0..distinct).map(scenarios::keyed).collect())
            .await;
    }
    let unkeyed = 10;
    t.publish(
        (0..unkeyed)
            .map(|i| Message::unkeyed(format!(r#"{{"note":{i}}}"#).into_bytes()))
            .collect(),
    )
    .await;
    let settled = scenarios::wait_for(scenarios::WAIT, async || {
        scenarios::messages(&sidecar, "delivered").await
            + scenarios::messages(&sidecar, "duplicate").await
            + scenarios::metric(&sidecar, "idemq_dead_letters_total{reason=\"missing_key\"}").await
            >= (2 * distinct + unkeyed) as u64
    })
    .await;
    sidecar.stop().await.expect("clean stop");
    let dead = t.dead_letters().await;
    println!(
        "mqtt 3.1.1: published {} ({distinct} distinct, {unkeyed} without a key), app processed {} ({} twice), dead-lettered {}",
        2 * distinct + unkeyed,
        app.processed(),
        app.processed_twice(),
        dead.len()
    );
    assert!(settled);
    assert_eq!(app.processed(), distinct as u32, "each order exactly once");
    assert_eq!(dead.len(), unkeyed);
    assert!(dead.iter().all(|d| d.reason == "missing_key"));
    assert_eq!(t.backlog().await, 0);
    store.cleanup().await;
    t.delete().await;
}
