//! The pipeline scenarios (`common/scenarios.rs`) against the real RabbitMQ
//! and Redis. Each test has its own queues and key namespace. Run with
//! `--nocapture` to see each test's figures.

mod common;

use common::rabbitmq::RabbitMq;
use common::scenarios;

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
