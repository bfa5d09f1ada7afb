//! Helpers shared by the sidecar's integration tests: real servers on loopback,
//! names unique to each test, and cleanup of only what a test created.
#![allow(dead_code)]

pub mod app;
pub mod availability;
pub mod broker;
pub mod jetstream;
pub mod kafka;
pub mod mqtt;
pub mod nats;
pub mod otlp;
pub mod proxy;
pub mod pubsub;
pub mod rabbitmq;
pub mod redis;
pub mod scenarios;
pub mod sidecar;
pub mod tansu;
pub mod zeromq;

/// A name no other test (or earlier run) uses: `<base>-<random>`.
pub fn unique(base: &str) -> String {
    format!(
        "{base}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    )
}
