//! The application-availability scenarios (`common/availability.rs`) against
//! the real RabbitMQ and Redis: an application starting late, stopped, failing
//! everything or slower than the lease, and large messages, cost no message
//! and no duplicate. Run with `--nocapture` to see each scenario's figures.

mod common;

use common::availability;
use common::rabbitmq::RabbitMq;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_application_that_starts_15s_late_costs_no_message() {
    availability::an_application_that_starts_15s_late_costs_no_message::<RabbitMq>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_application_stopped_15s_mid_stream_costs_no_message() {
    availability::an_application_stopped_15s_mid_stream_costs_no_message::<RabbitMq>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_application_answering_503_to_everything_for_10s_costs_no_message() {
    availability::an_application_answering_503_to_everything_for_10s_costs_no_message::<RabbitMq>()
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_message_among_healthy_ones_is_still_dead_lettered_after_max_attempts() {
    availability::a_poison_message_among_healthy_ones_is_still_dead_lettered_after_max_attempts::<
        RabbitMq,
    >()
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_slower_than_the_lease_keeps_its_claim() {
    availability::a_delivery_slower_than_the_lease_keeps_its_claim::<RabbitMq>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_sidecars_key_is_claimable_again_within_about_one_lease() {
    availability::a_killed_sidecars_key_is_claimable_again_within_about_one_lease::<RabbitMq>()
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_messages_stay_within_the_memory_limit_the_operator_injects() {
    availability::large_messages_stay_within_the_memory_limit_the_operator_injects::<RabbitMq>()
        .await;
}
