//! idemq operator: reconciles `IdempotentConsumer` resources.
//!
//! Module map:
//! - [`crd`]: the resource's types and schema.
//! - [`labels`]: every name, label and annotation the operator writes.
//! - [`render`]: pure functions from a resource to the objects it implies
//!   (the sidecar's config, the pod-template patch, the managed Redis).
//! - [`inject`]: the offline `inject` command, on the same rendering code.
//! - [`webhook`]: the admission webhook of injection: pod, its certificate
//!   and its HTTPS server, on the same rendering code.

pub mod broker;
pub mod controller;
pub mod crd;
#[cfg(test)]
pub mod fixtures;
pub mod inject;
pub mod labels;
pub mod leader;
pub mod metrics;
pub mod render;
pub mod webhook;
