//! idemq sidecar: makes a message consumer idempotent.
//!
//! The sidecar sits beside the application in its pod. In pipeline mode it
//! consumes the broker, claims each message's idempotency key in the [`store`],
//! delivers the message to the application over HTTP on loopback and acks only
//! once the outcome is settled. In gate mode the application consumes the broker
//! itself and asks the claim API.
//!
//! Module map:
//! - [`config`]: the YAML configuration (rendered by the operator).
//! - [`store`]: the key store trait and its Redis and in-memory implementations.

pub mod config;
pub mod store;

pub use config::Config;
