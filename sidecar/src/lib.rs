//! idemq sidecar: makes a message consumer idempotent.
//!
//! The sidecar sits beside the application in its pod. In pipeline mode it
//! consumes the broker, claims each message's idempotency key in the [`store`],
//! delivers the message to the application over HTTP on loopback and acks only
//! once the outcome is settled. In gate mode the application consumes the broker
//! itself and asks the claim API ([`api`]).
//!
//! Module map:
//! - [`config`]: the YAML configuration (rendered by the operator); [`secrets`]:
//!   the URLs and passwords that come from the environment instead.
//! - [`store`]: the key store trait and its Redis and in-memory implementations.
//! - [`key`]: idempotency-key extraction; [`engine`]: the claim → deliver →
//!   complete decision; [`deliver`]: HTTP delivery to the app; [`source`]: the
//!   brokers (RabbitMQ); [`pipeline`]: wires them.
//! - [`app`]: whether the application takes messages (readiness check, circuit
//!   breaker); [`flow`]: the admission every source asks before taking a
//!   message (application available, in-flight byte budget).
//! - [`api`]: the claim API; [`admin`]: probes and metrics; [`metrics`], [`health`];
//!   [`traces`]: OpenTelemetry spans of each message.
//! - [`run`]: wires it all and drains on shutdown.

pub mod admin;
pub mod api;
pub mod app;
pub mod config;
pub mod deliver;
pub mod engine;
pub mod flow;
pub mod health;
pub mod key;
pub mod metrics;
pub mod pipeline;
pub mod run;
pub mod secrets;
pub mod source;
pub mod store;
pub mod traces;

pub use config::Config;
