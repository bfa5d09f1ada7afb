//! The sidecar's configuration for one resource, and its ConfigMap.
//!
//! It is the sidecar library's own `Config` type, so the operator cannot
//! render a configuration the sidecar would not accept. Secrets never go here:
//! they reach the sidecar as environment variables from Secret references.

use std::collections::BTreeMap;
use std::time::Duration;

use idemq_sidecar::config::{
    AdminConfig, BrokerConfig, Config, DedupConfig, DeliveryConfig, KeySource, MissingKeyPolicy,
    Mode, RabbitMqConfig, ReadinessCheck, ReadinessConfig, ResetPolicy, StoreConfig, StoreKind,
    UnavailablePolicy,
};
use k8s_openapi::api::core::v1::ConfigMap;
use sha2::{Digest, Sha256};

use super::{owned_meta, RenderError};
use crate::crd::{DeliveryMode, IdempotentConsumer, KeyFrom, MissingKey, OnReset, Unavailable};
use crate::labels;

fn duration(
    field: &'static str,
    value: &Option<String>,
    default: Duration,
) -> Result<Duration, RenderError> {
    match value {
        None => Ok(default),
        Some(v) => humantime::parse_duration(v).map_err(|_| RenderError::Duration {
            field,
            value: v.clone(),
        }),
    }
}

/// The sidecar configuration `ic` asks for.
pub fn sidecar_config(ic: &IdempotentConsumer) -> Result<Config, RenderError> {
    let spec = &ic.spec;
    let defaults = DedupConfig::default();
    let key = match spec.key.from {
        KeyFrom::MessageId => KeySource::MessageId,
        KeyFrom::BodyHash => KeySource::BodyHash,
        KeyFrom::CloudEvent => KeySource::CloudEvent,
        KeyFrom::Header => KeySource::Header {
            name: spec.key.name.clone().unwrap_or_default(),
        },
        KeyFrom::JsonPointer => KeySource::JsonPointer {
            pointer: spec.key.pointer.clone().unwrap_or_default(),
        },
    };
    let gate = spec.delivery.mode == DeliveryMode::Gate;
    let rabbit = &spec.broker.rabbitmq;
    let delivery_defaults = (
        Duration::from_secs(10),
        Duration::from_millis(200),
        Duration::from_secs(30),
    );
    let config = Config {
        consumer: labels::consumer(ic),
        mode: if gate { Mode::Gate } else { Mode::Pipeline },
        store: StoreConfig {
            kind: StoreKind::Redis,
            url: None,
            unavailable: match spec.store.unavailable {
                Unavailable::FailClosed => UnavailablePolicy::FailClosed,
                Unavailable::PassThrough => UnavailablePolicy::PassThrough,
            },
            on_reset: match spec.store.on_reset {
                OnReset::FailClosed => ResetPolicy::FailClosed,
                OnReset::Continue => ResetPolicy::Continue,
            },
            partitions: spec.store.partitions.unwrap_or(1),
            expected_rate: spec.store.expected_rate.map(f64::from),
            ..StoreConfig::default()
        },
        dedup: DedupConfig {
            key,
            missing_key: match spec.key.missing_key {
                MissingKey::DeadLetter => MissingKeyPolicy::DeadLetter,
                MissingKey::HashBody => MissingKeyPolicy::HashBody,
                MissingKey::PassThrough => MissingKeyPolicy::PassThrough,
            },
            fingerprint: spec.fingerprint.unwrap_or(true),
            lease: duration("lease", &spec.lease, defaults.lease)?,
            retention: duration("retention", &spec.retention, defaults.retention)?,
            max_attempts: spec.max_attempts.unwrap_or(defaults.max_attempts),
        },
        broker: (!gate).then(|| BrokerConfig {
            rabbitmq: Some(RabbitMqConfig {
                url: None,
                queue: rabbit.queue.clone(),
                prefetch: rabbit.prefetch.unwrap_or(100),
                dead_letter_exchange: dead_letter_exchange(ic),
                dead_letter_routing_key: None,
                audit_exchange: None,
            }),
            ..BrokerConfig::default()
        }),
        delivery: if gate {
            None
        } else {
            Some(DeliveryConfig {
                timeout: duration(
                    "delivery.timeout",
                    &spec.delivery.timeout,
                    delivery_defaults.0,
                )?,
                initial_backoff: delivery_defaults.1,
                max_backoff: delivery_defaults.2,
                readiness: ReadinessConfig {
                    check: if spec.delivery.readiness_path.is_some() {
                        ReadinessCheck::Http
                    } else {
                        ReadinessCheck::Tcp
                    },
                    path: spec.delivery.readiness_path.clone(),
                    ..ReadinessConfig::default()
                },
                max_in_flight_bytes: in_flight_budget(ic),
                expected_message_bytes: spec.delivery.expected_message_bytes,
                ..DeliveryConfig::new(format!(
                    "http://127.0.0.1:{}{}",
                    spec.delivery.port.unwrap_or(8080),
                    spec.delivery.path.as_deref().unwrap_or("/")
                ))
            })
        },
        gate: Default::default(),
        admin: AdminConfig {
            listen: std::net::SocketAddr::from(([0, 0, 0, 0], labels::ADMIN_PORT)),
        },
        shutdown_grace: Duration::from_secs(25),
    };
    config.validate().map_err(|problems| {
        RenderError::Config(
            problems
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; "),
        )
    })?;
    Ok(config)
}

/// The sidecar's in-flight byte budget: the policy's `maxInFlightBytes`
/// (default 32 MiB), lowered to `prefetch × expectedMessageBytes` when that is
/// smaller, so the memory sized from it is not more than the policy needs.
pub fn in_flight_budget(ic: &IdempotentConsumer) -> u64 {
    let delivery = &ic.spec.delivery;
    let budget = delivery
        .max_in_flight_bytes
        .unwrap_or_else(|| DeliveryConfig::new("").max_in_flight_bytes);
    let prefetch = u64::from(ic.spec.broker.rabbitmq.prefetch.unwrap_or(100));
    match delivery.expected_message_bytes {
        Some(size) => budget
            .min(prefetch.saturating_mul(size))
            .max(MIN_IN_FLIGHT_BYTES),
        None => budget,
    }
}

/// The smallest budget the sidecar accepts.
const MIN_IN_FLIGHT_BYTES: u64 = 64 * 1024;

pub fn dead_letter_exchange(ic: &IdempotentConsumer) -> String {
    ic.spec
        .broker
        .rabbitmq
        .dead_letter_exchange
        .clone()
        .unwrap_or_else(|| "idemq.dlx".to_string())
}

/// A digest of what decides where a message's key lives in the store: the
/// key definition and the partitions. A change of any other field (the
/// retention, the lease) keeps what was completed; a change of this digest
/// does not.
pub fn key_definition(config: &Config) -> String {
    let placement = serde_json::json!({
        "key": config.dedup.key,
        "partitions": config.store.partitions,
    });
    hash(&placement.to_string())
}

/// A short, stable digest of the rendered configuration.
pub fn hash(yaml: &str) -> String {
    hex::encode(&Sha256::digest(yaml.as_bytes())[..8])
}

/// The ConfigMap holding the sidecar's configuration, and its hash.
pub fn config_map(ic: &IdempotentConsumer) -> Result<(ConfigMap, String), RenderError> {
    let yaml = sidecar_config(ic)?.to_yaml();
    let digest = hash(&yaml);
    let cm = ConfigMap {
        metadata: owned_meta(ic, labels::config_map(ic), "config")?,
        data: Some(BTreeMap::from([(labels::CONFIG_KEY.to_string(), yaml)])),
        ..ConfigMap::default()
    };
    Ok((cm, digest))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::render::sample;

    #[test]
    fn spec_renders_into_a_valid_sidecar_config() {
        let config = sidecar_config(&sample::policy()).expect("renders");
        assert_eq!(config.consumer, "shop.orders");
        assert_eq!(config.mode, Mode::Pipeline);
        assert_eq!(config.store.kind, StoreKind::Redis);
        assert_eq!(config.store.url, None, "secrets stay out of the config");
        assert_eq!(
            config.dedup.key,
            KeySource::JsonPointer {
                pointer: "/order/id".into()
            }
        );
        assert_eq!(config.dedup.lease, Duration::from_secs(30));
        assert_eq!(config.dedup.retention, Duration::from_secs(86400));
        let rabbit = config
            .broker
            .and_then(|b| b.rabbitmq)
            .expect("a rabbitmq broker");
        assert_eq!(
            (rabbit.queue.as_str(), rabbit.prefetch, rabbit.url),
            ("orders", 50, None)
        );
        assert_eq!(
            config.delivery.expect("delivery").url,
            "http://127.0.0.1:8080/messages"
        );
    }

    #[test]
    fn readiness_path_and_byte_budget_reach_the_sidecar() {
        let mut ic = sample::policy();
        let delivery = sidecar_config(&ic)
            .expect("renders")
            .delivery
            .expect("delivery");
        assert_eq!(delivery.readiness.check, ReadinessCheck::Tcp);
        assert_eq!(delivery.max_in_flight_bytes, 32 * 1024 * 1024);
        ic.spec.delivery.readiness_path = Some("/ready".into());
        ic.spec.delivery.expected_message_bytes = Some(10_000);
        let delivery = sidecar_config(&ic)
            .expect("renders")
            .delivery
            .expect("delivery");
        assert_eq!(delivery.readiness.check, ReadinessCheck::Http);
        assert_eq!(delivery.readiness.path.as_deref(), Some("/ready"));
        assert_eq!(
            delivery.max_in_flight_bytes, 500_000,
            "prefetch 50 × 10,000 bytes is less than the default budget"
        );
        assert_eq!(delivery.expected_message_bytes, Some(10_000));
    }

    #[test]
    fn gate_mode_has_no_broker_or_delivery() {
        let mut ic = sample::policy();
        ic.spec.delivery.mode = DeliveryMode::Gate;
        let config = sidecar_config(&ic).expect("renders");
        assert_eq!(config.mode, Mode::Gate);
        assert!(config.broker.is_none() && config.delivery.is_none());
    }

    #[test]
    fn a_bad_duration_names_its_field() {
        let mut ic = sample::policy();
        ic.spec.lease = Some("soon".into());
        assert_eq!(
            sidecar_config(&ic),
            Err(RenderError::Duration {
                field: "lease",
                value: "soon".into()
            })
        );
    }

    #[test]
    fn hash_changes_with_the_policy_and_only_with_it() {
        let (cm, first) = config_map(&sample::policy()).expect("renders");
        let (_, again) = config_map(&sample::policy()).expect("renders");
        assert_eq!(first, again, "rendering is deterministic");
        let mut changed = sample::policy();
        changed.spec.max_attempts = Some(9);
        let (_, other) = config_map(&changed).expect("renders");
        assert_ne!(first, other);
        assert_eq!(cm.metadata.name.as_deref(), Some("orders-idemq"));
        let owner = &cm.metadata.owner_references.expect("owned")[0];
        assert_eq!(
            (owner.kind.as_str(), owner.controller),
            ("IdempotentConsumer", Some(true))
        );
    }
}
