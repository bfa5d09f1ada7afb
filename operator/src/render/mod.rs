//! Pure functions from an `IdempotentConsumer` (and plain inputs) to the
//! objects it implies. No client here: rendering is unit-tested without any API
//! server, and the controller and `inject` share it.

pub mod config;
pub mod redis;
pub mod sidecar;
pub mod zeromq;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::{Resource, ResourceExt};

use crate::crd::IdempotentConsumer;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RenderError {
    #[error("spec.{field}: {value:?} is not a duration (use e.g. 500ms, 30s, 24h)")]
    Duration { field: &'static str, value: String },
    #[error("the sidecar configuration is invalid: {0}")]
    Config(String),
    /// Both broker kinds, or none (an object stored before the schema's rule).
    #[error("spec.broker must set exactly one broker, one of: {}", crate::crd::Broker::KINDS.join(", "))]
    Broker,
    /// injection: workload without a workload (an object stored before the schema's rule).
    #[error("spec.target must name the workload (kind and name) with injection: workload")]
    Target,
    #[error("the resource has no {0}; it must come from the API server")]
    Metadata(&'static str),
}

/// Metadata of an object owned by `ic`: its namespace, labels and a
/// controller owner reference, so deleting `ic` garbage-collects it.
pub fn owned_meta(
    ic: &IdempotentConsumer,
    name: String,
    component: &str,
) -> Result<ObjectMeta, RenderError> {
    Ok(ObjectMeta {
        name: Some(name),
        namespace: ic.namespace(),
        labels: Some(crate::labels::owned(ic, component)),
        owner_references: Some(vec![owner(ic)?]),
        ..ObjectMeta::default()
    })
}

fn owner(ic: &IdempotentConsumer) -> Result<OwnerReference, RenderError> {
    ic.controller_owner_ref(&())
        .ok_or(RenderError::Metadata("uid"))
}

/// Test helper: the Secret name and key an environment variable takes its
/// value from. Render tests check that secrets reach the pods only this way;
/// a variable with anything else fails the test, named.
#[cfg(test)]
pub(crate) fn secret_key_ref(var: &k8s_openapi::api::core::v1::EnvVar) -> (String, String) {
    let r = var
        .value_from
        .as_ref()
        .and_then(|v| v.secret_key_ref.as_ref())
        .unwrap_or_else(|| panic!("{} is not a Secret reference", var.name));
    (r.name.clone(), r.key.clone())
}

/// Test resources: the sample policy as the API server would return it.
#[cfg(test)]
pub(crate) mod sample {
    use crate::crd::IdempotentConsumer;

    pub fn policy() -> IdempotentConsumer {
        from_yaml(include_str!("../../tests/data/policy.yaml"))
    }

    /// A Kafka consumer of two topics.
    pub fn kafka_policy() -> IdempotentConsumer {
        from_yaml(include_str!("../../tests/data/kafka-policy.yaml"))
    }

    /// A JetStream consumer with user and password, a dead-letter stream.
    pub fn jetstream_policy() -> IdempotentConsumer {
        from_yaml(include_str!("../../tests/data/jetstream-policy.yaml"))
    }

    /// An MQTT 5 consumer of one topic filter.
    pub fn mqtt_policy() -> IdempotentConsumer {
        from_yaml(include_str!("../../tests/data/mqtt-policy.yaml"))
    }

    /// A Pub/Sub consumer keyed by an attribute, with a dead-letter policy.
    pub fn pubsub_policy() -> IdempotentConsumer {
        from_yaml(include_str!("../../tests/data/pubsub-policy.yaml"))
    }

    /// A ZeroMQ ROUTER endpoint with CURVE keys and a NetworkPolicy.
    pub fn zeromq_policy() -> IdempotentConsumer {
        from_yaml(include_str!("../../tests/data/zeromq-policy.yaml"))
    }

    fn from_yaml(yaml: &str) -> IdempotentConsumer {
        let mut ic: IdempotentConsumer = serde_yaml::from_str(yaml).expect("sample policy");
        ic.metadata.uid = Some("3f7c8a2e-0000-4000-8000-000000000001".to_string());
        ic.metadata.generation = Some(1);
        ic
    }
}
