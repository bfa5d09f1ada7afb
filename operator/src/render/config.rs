//! The sidecar's configuration for one resource, and its ConfigMap.
//!
//! It is the sidecar library's own `Config` type, so the operator cannot
//! render a configuration the sidecar would not accept. Secrets never go here:
//! they reach the sidecar as environment variables from Secret references.

use std::collections::BTreeMap;
use std::time::Duration;

use idemq_sidecar::config::{
    self as sidecar, AdminConfig, BrokerConfig, Config, DedupConfig, DeliveryConfig, Durability,
    JetStreamConfig, KafkaConfig, KeySource, MissingKeyPolicy, Mode, MqttConfig, PubSubConfig,
    RabbitMqConfig, ReadinessCheck, ReadinessConfig, ResetPolicy, StoreConfig, StoreKind,
    UnavailablePolicy, ZeroMqConfig,
};
use k8s_openapi::api::core::v1::ConfigMap;
use sha2::{Digest, Sha256};

use super::{owned_meta, RenderError};
use crate::crd::{
    BrokerKind, DeadLetterTarget, DeliveryMode, IdempotentConsumer, JetStreamBinding, KafkaBinding,
    KafkaOrdering, KafkaSecurityProtocol, KeyFrom, MissingKey, MqttBinding, MqttProtocol,
    OffsetReset, OnReset, PubSubBinding, RabbitMqBinding, SaslMechanism, StoreDurability,
    Unavailable, ZeroMqBinding, ZeroMqDeadLetter, ZeroMqPattern,
};
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
        KeyFrom::RecordKey => KeySource::RecordKey,
        KeyFrom::Coordinates => KeySource::Coordinates,
        KeyFrom::Header => KeySource::Header {
            name: spec.key.name.clone().unwrap_or_default(),
        },
        KeyFrom::Attribute => KeySource::Attribute {
            name: spec.key.name.clone().unwrap_or_default(),
        },
        KeyFrom::JsonPointer => KeySource::JsonPointer {
            pointer: spec.key.pointer.clone().unwrap_or_default(),
        },
    };
    let gate = spec.delivery.mode == DeliveryMode::Gate;
    let broker = spec.broker.kind().ok_or(RenderError::Broker)?;
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
            cluster: spec.store.cluster(),
            sentinel: spec.store.sentinel().map(str::to_string),
            durability: match spec.store.durability {
                Some(StoreDurability::Replicated) => Durability::Replicated,
                Some(StoreDurability::Local) | None => Durability::Local,
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
        broker: if gate {
            None
        } else {
            Some(match broker {
                BrokerKind::RabbitMq(rabbit) => BrokerConfig {
                    rabbitmq: Some(rabbitmq_config(rabbit)),
                    ..BrokerConfig::default()
                },
                BrokerKind::Kafka(kafka) => BrokerConfig {
                    kafka: Some(kafka_config(ic, kafka)?),
                    ..BrokerConfig::default()
                },
                BrokerKind::JetStream(js) => BrokerConfig {
                    jetstream: Some(jetstream_config(ic, js)?),
                    ..BrokerConfig::default()
                },
                BrokerKind::Mqtt(mqtt) => BrokerConfig {
                    mqtt: Some(mqtt_config(ic, mqtt)?),
                    ..BrokerConfig::default()
                },
                BrokerKind::PubSub(ps) => BrokerConfig {
                    pubsub: Some(pubsub_config(ps)),
                    ..BrokerConfig::default()
                },
                BrokerKind::ZeroMq(zmq) => BrokerConfig {
                    zeromq: Some(zeromq_config(zmq)?),
                    ..BrokerConfig::default()
                },
            })
        },
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
        traces: spec.traces.clone().unwrap_or_default(),
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

fn rabbitmq_config(rabbit: &RabbitMqBinding) -> RabbitMqConfig {
    RabbitMqConfig {
        url: None,
        queue: rabbit.queue.clone(),
        prefetch: rabbit.prefetch.unwrap_or(100),
        dead_letter_exchange: dead_letter_exchange(rabbit),
        dead_letter_routing_key: None,
        audit_exchange: None,
    }
}

/// The `broker.kafka` section: bootstrap servers and credentials stay out of
/// it (they reach the sidecar from the Secret through the environment).
fn kafka_config(ic: &IdempotentConsumer, kafka: &KafkaBinding) -> Result<KafkaConfig, RenderError> {
    // The sidecar's own defaults, for what the spec leaves unset.
    let defaults = KafkaConfig::new(kafka.topics.clone(), group_id(ic, kafka));
    Ok(KafkaConfig {
        max_in_flight: kafka.max_in_flight.unwrap_or(defaults.max_in_flight),
        ordering: match kafka.ordering {
            None => defaults.ordering,
            Some(KafkaOrdering::None) => sidecar::Ordering::None,
            Some(KafkaOrdering::PerKey) => sidecar::Ordering::PerKey,
            Some(KafkaOrdering::PerPartition) => sidecar::Ordering::PerPartition,
        },
        session_timeout: duration(
            "broker.kafka.sessionTimeout",
            &kafka.session_timeout,
            defaults.session_timeout,
        )?,
        auto_offset_reset: match kafka.auto_offset_reset {
            None => defaults.auto_offset_reset,
            Some(OffsetReset::Earliest) => sidecar::OffsetReset::Earliest,
            Some(OffsetReset::Latest) => sidecar::OffsetReset::Latest,
        },
        dead_letter_topic: kafka.dead_letter_topic.clone(),
        commit_interval: duration(
            "broker.kafka.commitInterval",
            &kafka.commit_interval,
            defaults.commit_interval,
        )?,
        security_protocol: kafka_security_protocol(kafka.security_protocol),
        sasl_mechanism: kafka.sasl_mechanism.map(kafka_sasl_mechanism),
        ca_file: kafka
            .connection_secret_ref
            .ca_key
            .as_ref()
            .map(|_| labels::kafka_ca_file()),
        ..defaults
    })
}

/// The `broker.jetstream` section: the URL and credentials stay out of it
/// (they reach the sidecar from the Secret through the environment). The
/// operator creates the consumer with the same settings
/// ([`crate::broker::jetstream::Plan`]).
pub fn jetstream_config(
    ic: &IdempotentConsumer,
    js: &JetStreamBinding,
) -> Result<JetStreamConfig, RenderError> {
    Ok(JetStreamConfig {
        url: None,
        stream: js.stream.clone(),
        consumer: jetstream_consumer(ic, js),
        filter_subjects: js.filter_subjects.clone(),
        max_ack_pending: js.max_ack_pending.unwrap_or(100),
        ack_wait: duration(
            "broker.jetstream.ackWait",
            &js.ack_wait,
            Duration::from_secs(30),
        )?,
        max_deliver: js.max_deliver,
        dead_letter_subject: js.dead_letter_subject.clone(),
    })
}

/// The durable consumer: the spec's, or [`labels::jetstream_consumer`].
pub fn jetstream_consumer(ic: &IdempotentConsumer, js: &JetStreamBinding) -> String {
    js.consumer
        .clone()
        .unwrap_or_else(|| labels::jetstream_consumer(ic))
}

/// The sidecar's `broker.mqtt`: the URL and credentials stay in the Secret
/// (environment), the client id is the sidecar's default (`<consumer>-<pod
/// name>`, one session per replica), and replicas share the subscription.
fn mqtt_config(ic: &IdempotentConsumer, mqtt: &MqttBinding) -> Result<MqttConfig, RenderError> {
    Ok(MqttConfig {
        url: None,
        protocol: match mqtt.protocol {
            None | Some(MqttProtocol::V5) => sidecar::MqttProtocol::V5,
            Some(MqttProtocol::V311) => sidecar::MqttProtocol::V311,
        },
        client_id: None,
        topics: mqtt.topics.clone(),
        shared_group: Some(shared_group(ic, mqtt)),
        session_expiry: duration(
            "broker.mqtt.sessionExpiry",
            &mqtt.session_expiry,
            Duration::from_secs(3600),
        )?,
        receive_maximum: mqtt.receive_maximum.unwrap_or(100),
        dead_letter_topic: mqtt.dead_letter_topic.clone(),
        ca_file: mqtt.ca_key.as_ref().map(|_| labels::mqtt_ca_file()),
    })
}

/// The sidecar's `broker.pubsub`: the service-account key is a file mounted
/// from the credentials Secret, named here by its path only. The operator
/// creates the subscription ([`crate::broker::pubsub::Plan`]); the sidecar
/// reads its settings from Pub/Sub.
fn pubsub_config(ps: &PubSubBinding) -> PubSubConfig {
    let defaults = PubSubConfig::new(ps.project.clone(), ps.subscription.clone());
    PubSubConfig {
        max_outstanding_messages: ps
            .max_outstanding_messages
            .unwrap_or(defaults.max_outstanding_messages),
        dead_letter_topic: ps.dead_letter_topic.clone(),
        credentials_file: Some(labels::pubsub_key_file()),
        ..defaults
    }
}

/// The sidecar's `broker.zeromq`: it binds the pod's address (its
/// `POD_IP` variable, from the downward API) on the spec's port, which the
/// operator's Service exposes. The CURVE keys stay in their Secret
/// (environment).
fn zeromq_config(zmq: &ZeroMqBinding) -> Result<ZeroMqConfig, RenderError> {
    // Said again for objects stored before the schema's rule: without keys,
    // only an explicit `plain: true` opens an unauthenticated endpoint.
    if zmq.curve.is_some() == (zmq.plain == Some(true)) {
        return Err(RenderError::Config(
            "broker.zeromq: set curve (the keys' Secret) or plain: true, one of them".to_string(),
        ));
    }
    Ok(ZeroMqConfig {
        bind: format!(
            "tcp://{}:{}",
            idemq_sidecar::source::zeromq::POD_IP,
            zmq.port()
        ),
        pattern: match zmq.pattern {
            None | Some(ZeroMqPattern::Router) => sidecar::ZeroMqPattern::Router,
            Some(ZeroMqPattern::Pull) => sidecar::ZeroMqPattern::Pull,
            Some(ZeroMqPattern::Sub) => sidecar::ZeroMqPattern::Sub,
        },
        subscribe: zmq.subscribe.clone(),
        max_in_flight: zmq.max_in_flight.unwrap_or(100),
        plain: zmq.curve.is_none(),
        dead_letter: zeromq_dead_letter(&zmq.dead_letter)?,
    })
}

/// The sidecar's `broker.zeromq.deadLetter`: the target without its
/// connection, which the sidecar reads from the environment (the URL of a
/// RabbitMQ, the bootstrap servers and credentials of a Kafka).
fn zeromq_dead_letter(dead: &ZeroMqDeadLetter) -> Result<sidecar::ZeroMqDeadLetter, RenderError> {
    // Said again for objects stored before the schema's rule.
    let target = dead.target().ok_or_else(|| {
        RenderError::Config(format!(
            "broker.zeromq.deadLetter: {}",
            sidecar::ZeroMqDeadLetter::ONE_TARGET
        ))
    })?;
    Ok(match target {
        DeadLetterTarget::Endpoint(endpoint) => sidecar::ZeroMqDeadLetter {
            endpoint: Some(endpoint.to_string()),
            ..Default::default()
        },
        DeadLetterTarget::RabbitMq(rabbit) => sidecar::ZeroMqDeadLetter {
            rabbitmq: Some(sidecar::RabbitMqDeadLetter {
                url: None,
                exchange: rabbit.exchange.clone(),
                routing_key: rabbit.routing_key.clone(),
                queue: rabbit.queue.clone(),
            }),
            ..Default::default()
        },
        DeadLetterTarget::Kafka(kafka) => sidecar::ZeroMqDeadLetter {
            kafka: Some(sidecar::KafkaDeadLetter {
                bootstrap_servers: None,
                topic: kafka.topic.clone(),
                security_protocol: kafka_security_protocol(kafka.security_protocol),
                sasl_mechanism: kafka.sasl_mechanism.map(kafka_sasl_mechanism),
                ca_file: kafka
                    .connection_secret_ref
                    .ca_key
                    .as_ref()
                    .map(|_| labels::kafka_ca_file()),
            }),
            ..Default::default()
        },
    })
}

/// The shared subscription's group: the spec's, or `<namespace>.<name>`.
pub fn shared_group(ic: &IdempotentConsumer, mqtt: &MqttBinding) -> String {
    mqtt.shared_group
        .clone()
        .unwrap_or_else(|| labels::consumer(ic))
}

pub fn kafka_security_protocol(p: KafkaSecurityProtocol) -> sidecar::SecurityProtocol {
    match p {
        KafkaSecurityProtocol::Plaintext => sidecar::SecurityProtocol::Plaintext,
        KafkaSecurityProtocol::Ssl => sidecar::SecurityProtocol::Ssl,
        KafkaSecurityProtocol::SaslPlaintext => sidecar::SecurityProtocol::SaslPlaintext,
        KafkaSecurityProtocol::SaslSsl => sidecar::SecurityProtocol::SaslSsl,
    }
}

pub fn kafka_sasl_mechanism(m: SaslMechanism) -> sidecar::SaslMechanism {
    match m {
        SaslMechanism::Plain => sidecar::SaslMechanism::Plain,
        SaslMechanism::ScramSha256 => sidecar::SaslMechanism::ScramSha256,
        SaslMechanism::ScramSha512 => sidecar::SaslMechanism::ScramSha512,
    }
}

/// The consumer group: the spec's, or `<namespace>.<name>` (the consumer's
/// name, unique in the cluster).
pub fn group_id(ic: &IdempotentConsumer, kafka: &KafkaBinding) -> String {
    kafka
        .group_id
        .clone()
        .unwrap_or_else(|| labels::consumer(ic))
}

/// The dead-letter topic of each topic, as the sidecar chooses it: the
/// spec's one topic, or `<topic>.dead` for each.
pub fn dead_letter_topics(kafka: &KafkaBinding) -> Vec<String> {
    match &kafka.dead_letter_topic {
        Some(topic) => vec![topic.clone()],
        None => kafka.topics.iter().map(|t| format!("{t}.dead")).collect(),
    }
}

/// The sidecar's in-flight byte budget: the policy's `maxInFlightBytes`
/// (default 32 MiB), lowered to `prefetch × expectedMessageBytes` (Kafka:
/// `maxInFlight ×`) when that is smaller, so the memory sized from it is not
/// more than the policy needs.
pub fn in_flight_budget(ic: &IdempotentConsumer) -> u64 {
    let delivery = &ic.spec.delivery;
    let budget = delivery
        .max_in_flight_bytes
        .unwrap_or_else(|| DeliveryConfig::new("").max_in_flight_bytes);
    let prefetch = match ic.spec.broker.kind() {
        Some(BrokerKind::RabbitMq(rabbit)) => u64::from(rabbit.prefetch.unwrap_or(100)),
        Some(BrokerKind::Kafka(kafka)) => u64::from(kafka.max_in_flight.unwrap_or(100)),
        Some(BrokerKind::JetStream(js)) => u64::from(js.max_ack_pending.unwrap_or(100)),
        Some(BrokerKind::Mqtt(mqtt)) => u64::from(mqtt.receive_maximum.unwrap_or(100)),
        Some(BrokerKind::PubSub(ps)) => u64::from(
            ps.max_outstanding_messages
                .unwrap_or_else(|| PubSubConfig::new("", "").max_outstanding_messages),
        ),
        Some(BrokerKind::ZeroMq(zmq)) => u64::from(zmq.max_in_flight.unwrap_or(100)),
        None => 100,
    };
    match delivery.expected_message_bytes {
        Some(size) => budget
            .min(prefetch.saturating_mul(size))
            .max(MIN_IN_FLIGHT_BYTES),
        None => budget,
    }
}

/// The smallest budget the sidecar accepts.
const MIN_IN_FLIGHT_BYTES: u64 = 64 * 1024;

pub fn dead_letter_exchange(rabbit: &RabbitMqBinding) -> String {
    rabbit
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
    fn an_external_store_behind_sentinels_reaches_the_sidecar() {
        use crate::crd::{ExternalStore, SecretKeyRef, StoreMode};
        let mut ic = sample::policy();
        ic.spec.store.external = Some(ExternalStore {
            secret_ref: SecretKeyRef {
                name: "orders-redis".into(),
                key: "url".into(),
            },
            cluster: false,
            sentinel: Some("orders".into()),
            ca_key: None,
        });
        let managed = sidecar_config(&ic).expect("renders");
        assert_eq!(
            managed.store.sentinel, None,
            "only an external store has Sentinels"
        );
        ic.spec.store.mode = StoreMode::External;
        let config = sidecar_config(&ic).expect("renders");
        assert_eq!(config.store.sentinel.as_deref(), Some("orders"));
        assert!(!config.store.cluster);
        assert_eq!(config.validate(), Ok(()));
    }

    #[test]
    fn a_managed_store_with_replicas_is_reached_through_its_sentinels() {
        let mut ic = sample::policy();
        ic.spec.store.managed = Some(crate::crd::ManagedStore {
            replicas: Some(2),
            ..Default::default()
        });
        ic.spec.store.durability = Some(StoreDurability::Replicated);
        let config = sidecar_config(&ic).expect("renders");
        assert_eq!(config.store.sentinel.as_deref(), Some("idemq"));
        assert_eq!(config.store.durability, Durability::Replicated);
        assert_eq!(
            config.store.url, None,
            "the Sentinels' URLs come from the environment, as the one Redis's URL does"
        );
        assert_eq!(config.validate(), Ok(()));
        let yaml = serde_yaml::to_string(&config).expect("serializes");
        assert!(
            !yaml.to_lowercase().contains("password"),
            "no password in the configuration: {yaml}"
        );
    }

    #[test]
    fn an_external_redis_cluster_reaches_the_sidecar_and_one_partition_is_warned_of() {
        use crate::crd::{ExternalStore, SecretKeyRef, StoreMode};
        let mut ic = sample::policy();
        assert!(!sidecar_config(&ic).expect("renders").store.cluster);
        ic.spec.store.mode = StoreMode::External;
        ic.spec.store.external = Some(ExternalStore {
            secret_ref: SecretKeyRef {
                name: "orders-redis".into(),
                key: "url".into(),
            },
            cluster: true,
            sentinel: None,
            ca_key: None,
        });
        let config = sidecar_config(&ic).expect("renders");
        assert!(config.store.cluster);
        assert_eq!(config.store.url, None, "the seed nodes stay in the Secret");
        assert!(config
            .warnings()
            .iter()
            .any(|w| w.field == "store.partitions"));
        ic.spec.store.partitions = Some(12);
        ic.spec.store.durability = Some(crate::crd::StoreDurability::Replicated);
        let config = sidecar_config(&ic).expect("renders");
        assert_eq!(config.store.partitions, 12);
        assert_eq!(
            config.store.durability,
            idemq_sidecar::config::Durability::Replicated
        );
        assert!(config
            .warnings()
            .iter()
            .all(|w| w.field != "store.partitions"));
    }

    #[test]
    fn traces_reach_the_sidecar_and_are_off_without_an_endpoint() {
        let mut ic = sample::policy();
        assert_eq!(sidecar_config(&ic).expect("renders").traces.endpoint, None);
        ic.spec.traces = serde_json::from_value(serde_json::json!(
            { "endpoint": "http://otel-collector.observability:4318", "newTraces": false }
        ))
        .expect("traces spec");
        let config = sidecar_config(&ic).expect("renders");
        assert_eq!(
            config.traces.endpoint.as_deref(),
            Some("http://otel-collector.observability:4318")
        );
        assert!(!config.traces.new_traces);
        assert!(!config.traces.record_key, "the key's value only when asked");
        // What the sidecar reads back from the ConfigMap says the same.
        let (cm, _) = config_map(&ic).expect("renders");
        let yaml = &cm.data.expect("data")["sidecar.yaml"];
        let parsed = idemq_sidecar::Config::from_yaml(yaml).expect("the sidecar parses it");
        assert_eq!(parsed.traces, config.traces);
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
    fn a_kafka_spec_renders_the_section_the_sidecar_parses() {
        let config = sidecar_config(&sample::kafka_policy()).expect("renders");
        assert_eq!(config.dedup.key, KeySource::RecordKey);
        let yaml = config.to_yaml();
        // What the sidecar reads at start: parsed and validated by its own code.
        let parsed = Config::from_yaml(&yaml).expect("the sidecar accepts it");
        let kafka = parsed.broker.and_then(|b| b.kafka).expect("a kafka broker");
        assert_eq!(kafka.topics, ["orders", "refunds"]);
        assert_eq!(
            kafka.group_id, "shop.orders",
            "derived from namespace and name"
        );
        assert_eq!(kafka.max_in_flight, 200);
        assert_eq!(kafka.ordering, sidecar::Ordering::PerKey);
        assert_eq!(kafka.session_timeout, Duration::from_secs(10));
        assert_eq!(kafka.dead_letter_topic, None, "the sidecar's <topic>.dead");
        assert_eq!(kafka.bootstrap_servers, None, "from the Secret, by env");
        assert_eq!(kafka.ca_file, None);
        assert!(
            !yaml.contains("kafka-orders"),
            "no Secret name or value: {yaml}"
        );
        // The byte budget follows maxInFlight as it follows prefetch.
        let mut ic = sample::kafka_policy();
        ic.spec.delivery.expected_message_bytes = Some(10_000);
        assert_eq!(in_flight_budget(&ic), 2_000_000);
    }

    #[test]
    fn a_zeromq_spec_sends_dead_letters_to_rabbitmq_or_kafka_without_their_secrets() {
        let mut ic = sample::zeromq_policy();
        let zmq = ic.spec.broker.zeromq.as_mut().expect("zeromq");
        zmq.dead_letter = serde_yaml::from_str(
            "rabbitmq: { connectionSecretRef: { name: rabbitmq-dead }, queue: orders.dead }",
        )
        .expect("a deadLetter");
        let yaml = sidecar_config(&ic).expect("renders").to_yaml();
        let parsed = Config::from_yaml(&yaml).expect("the sidecar accepts it");
        let dead = parsed
            .broker
            .and_then(|b| b.zeromq)
            .expect("a zeromq broker")
            .dead_letter;
        let rabbit = dead.rabbitmq.expect("rabbitmq dead letters");
        assert_eq!(rabbit.queue.as_deref(), Some("orders.dead"));
        assert_eq!((rabbit.url, dead.endpoint, dead.kafka), (None, None, None));
        assert!(!yaml.contains("rabbitmq-dead"), "no Secret name: {yaml}");

        let zmq = ic.spec.broker.zeromq.as_mut().expect("zeromq");
        zmq.dead_letter = serde_yaml::from_str(
            "kafka: { connectionSecretRef: { name: kafka-dead, caKey: ca.crt }, topic: orders.dead, securityProtocol: ssl }",
        )
        .expect("a deadLetter");
        let yaml = sidecar_config(&ic).expect("renders").to_yaml();
        let parsed = Config::from_yaml(&yaml).expect("the sidecar accepts it");
        let kafka = parsed
            .broker
            .and_then(|b| b.zeromq)
            .and_then(|z| z.dead_letter.kafka)
            .expect("kafka dead letters");
        assert_eq!(kafka.topic, "orders.dead");
        assert_eq!(kafka.security_protocol, sidecar::SecurityProtocol::Ssl);
        assert_eq!(kafka.bootstrap_servers, None, "from the Secret, by env");
        assert_eq!(kafka.ca_file, Some(labels::kafka_ca_file()));
        assert!(!yaml.contains("kafka-dead"), "no Secret name: {yaml}");

        // Two targets (an object stored before the schema's rule): refused.
        let zmq = ic.spec.broker.zeromq.as_mut().expect("zeromq");
        zmq.dead_letter.endpoint = Some("tcp://orders-dead.shop.svc:5556".into());
        let err = sidecar_config(&ic).expect_err("two targets").to_string();
        assert!(
            err.contains("exactly one dead-letter target: endpoint, rabbitmq or kafka"),
            "{err}"
        );
    }

    #[test]
    fn a_zeromq_spec_binds_the_pods_address_and_is_plain_only_when_said() {
        let mut ic = sample::zeromq_policy();
        let yaml = sidecar_config(&ic).expect("renders").to_yaml();
        let parsed = Config::from_yaml(&yaml).expect("the sidecar accepts it");
        let zmq = parsed
            .broker
            .and_then(|b| b.zeromq)
            .expect("a zeromq broker");
        assert_eq!(zmq.bind, "tcp://$(POD_IP):5555");
        assert_eq!(zmq.pattern, sidecar::ZeroMqPattern::Router);
        assert!(!zmq.plain, "CURVE: the keys come from the Secret");
        assert_eq!(
            zmq.dead_letter.endpoint.as_deref(),
            Some("tcp://orders-dead.shop.svc:5556")
        );
        assert!(!yaml.contains("zeromq-orders"), "no Secret name: {yaml}");

        let binding = ic.spec.broker.zeromq.as_mut().expect("zeromq");
        binding.pattern = Some(crate::crd::ZeroMqPattern::Sub);
        binding.subscribe = vec!["orders.".into()];
        binding.port = Some(6000);
        binding.max_in_flight = Some(20);
        binding.curve = None;
        binding.plain = Some(true);
        let zmq = sidecar_config(&ic)
            .expect("renders")
            .broker
            .and_then(|b| b.zeromq)
            .expect("zeromq");
        assert_eq!(
            (
                zmq.bind.as_str(),
                zmq.pattern,
                zmq.subscribe,
                zmq.max_in_flight,
                zmq.plain
            ),
            (
                "tcp://$(POD_IP):6000",
                sidecar::ZeroMqPattern::Sub,
                vec!["orders.".to_string()],
                20,
                true
            )
        );
        assert_eq!(in_flight_budget(&ic), 32 * 1024 * 1024);
        ic.spec.delivery.expected_message_bytes = Some(1024 * 1024);
        assert_eq!(
            in_flight_budget(&ic),
            20 * 1024 * 1024,
            "maxInFlight × size"
        );

        // Neither keys nor plain (stored before the schema's rule): refused.
        ic.spec.broker.zeromq.as_mut().expect("zeromq").plain = None;
        assert!(
            matches!(sidecar_config(&ic), Err(RenderError::Config(m)) if m.contains("plain: true"))
        );
    }

    #[test]
    fn an_mqtt_spec_renders_the_section_the_sidecar_parses() {
        let yaml = sidecar_config(&sample::mqtt_policy())
            .expect("renders")
            .to_yaml();
        let parsed = Config::from_yaml(&yaml).expect("the sidecar accepts it");
        let mqtt = parsed.broker.and_then(|b| b.mqtt).expect("an mqtt broker");
        assert_eq!(mqtt.topics, ["devices/+/readings"]);
        assert_eq!(
            mqtt.shared_group.as_deref(),
            Some("shop.orders"),
            "derived from namespace and name"
        );
        assert_eq!(mqtt.receive_maximum, 50);
        assert_eq!(mqtt.session_expiry, Duration::from_secs(3600));
        assert_eq!(mqtt.protocol, sidecar::MqttProtocol::V5);
        assert_eq!(
            (mqtt.url, mqtt.client_id),
            (None, None),
            "the URL from the Secret by env, the client id from the pod name"
        );
        assert!(!yaml.contains("mqtt-telemetry"), "no Secret name: {yaml}");
    }

    #[test]
    fn kafka_settings_reach_the_sidecar() {
        let mut ic = sample::kafka_policy();
        let kafka = ic.spec.broker.kafka.as_mut().expect("kafka");
        kafka.group_id = Some("billing".into());
        kafka.dead_letter_topic = Some("orders-dlq".into());
        kafka.auto_offset_reset = Some(OffsetReset::Latest);
        kafka.commit_interval = Some("250ms".into());
        kafka.security_protocol = KafkaSecurityProtocol::SaslSsl;
        kafka.sasl_mechanism = Some(SaslMechanism::ScramSha512);
        kafka.connection_secret_ref.ca_key = Some("ca.pem".into());
        let config = sidecar_config(&ic).expect("renders");
        let kafka = config.broker.and_then(|b| b.kafka).expect("kafka");
        assert_eq!(kafka.group_id, "billing");
        assert_eq!(kafka.dead_letter_topic.as_deref(), Some("orders-dlq"));
        assert_eq!(kafka.auto_offset_reset, sidecar::OffsetReset::Latest);
        assert_eq!(kafka.commit_interval, Duration::from_millis(250));
        assert_eq!(kafka.security_protocol, sidecar::SecurityProtocol::SaslSsl);
        assert_eq!(
            kafka.sasl_mechanism,
            Some(sidecar::SaslMechanism::ScramSha512)
        );
        assert_eq!(kafka.ca_file.as_deref(), Some("/etc/idemq-kafka/ca.crt"));
        assert_eq!(
            dead_letter_topics(ic.spec.broker.kafka.as_ref().expect("kafka")),
            ["orders-dlq"]
        );
        assert_eq!(
            dead_letter_topics(
                sample::kafka_policy()
                    .spec
                    .broker
                    .kafka
                    .as_ref()
                    .expect("kafka")
            ),
            ["orders.dead", "refunds.dead"]
        );
    }

    #[test]
    fn a_jetstream_spec_renders_the_section_the_sidecar_parses_and_no_other_broker() {
        let config = sidecar_config(&sample::jetstream_policy()).expect("renders");
        let yaml = config.to_yaml();
        // What the sidecar reads at start: parsed and validated by its own code.
        let parsed = Config::from_yaml(&yaml).expect("the sidecar accepts it");
        let js = parsed
            .broker
            .and_then(|b| b.jetstream)
            .expect("a jetstream broker");
        assert_eq!(
            (js.stream.as_str(), js.consumer.as_str()),
            ("ORDERS", "shop_orders")
        );
        assert_eq!(js.filter_subjects, ["orders.created"]);
        assert_eq!(
            (js.max_ack_pending, js.ack_wait, js.max_deliver),
            (50, Duration::from_secs(20), Some(10))
        );
        assert_eq!(js.dead_letter_subject, "orders.dead");
        assert_eq!(js.url, None, "from the Secret, by env");
        assert_eq!(config.dedup.key, KeySource::MessageId, "Nats-Msg-Id");
        assert!(
            !yaml.contains("nats-orders") && !yaml.contains("rabbitmq") && !yaml.contains("kafka"),
            "no Secret name, no other broker: {yaml}"
        );
        // Unset brokers are left out for the other kinds too.
        let rabbit = sidecar_config(&sample::policy())
            .expect("renders")
            .to_yaml();
        assert!(
            !rabbit.contains("jetstream") && !rabbit.contains("null"),
            "{rabbit}"
        );
        // The byte budget follows maxAckPending as it follows prefetch.
        let mut ic = sample::jetstream_policy();
        ic.spec.delivery.expected_message_bytes = Some(10_000);
        assert_eq!(in_flight_budget(&ic), 500_000);
    }

    #[test]
    fn two_brokers_or_none_are_an_invalid_spec() {
        let mut both = sample::kafka_policy();
        both.spec.broker.rabbitmq = sample::policy().spec.broker.rabbitmq;
        let error = sidecar_config(&both).expect_err("two brokers");
        assert_eq!(error, RenderError::Broker);
        assert!(error
            .to_string()
            .contains("exactly one broker, one of: rabbitmq, kafka"));
        let mut none = sample::policy();
        none.spec.broker.rabbitmq = None;
        assert_eq!(sidecar_config(&none), Err(RenderError::Broker));
    }

    #[test]
    fn a_key_of_the_other_broker_is_refused_by_field() {
        let mut ic = sample::kafka_policy();
        ic.spec.key.from = KeyFrom::MessageId;
        let Err(RenderError::Config(problems)) = sidecar_config(&ic) else {
            panic!("Kafka records have no message id");
        };
        assert!(problems.contains("dedup.key.from"), "{problems}");
        let mut ic = sample::policy();
        ic.spec.key.from = KeyFrom::Coordinates;
        assert!(
            matches!(sidecar_config(&ic), Err(RenderError::Config(p)) if p.contains("dedup.key.from"))
        );
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
