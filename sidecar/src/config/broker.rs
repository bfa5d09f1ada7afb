//! The `broker` section: which broker to consume and how, one type per kind.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::defaults;

/// The broker to consume: exactly one of its fields is set (see
/// [`BrokerConfig::kind`]); [`Config::validate`](super::Config::validate) says so when it is not.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BrokerConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rabbitmq: Option<RabbitMqConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kafka: Option<KafkaConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jetstream: Option<JetStreamConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mqtt: Option<MqttConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pubsub: Option<PubSubConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zeromq: Option<ZeroMqConfig>,
}

/// The one broker a [`BrokerConfig`] names.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum BrokerKind<'a> {
    RabbitMq(&'a RabbitMqConfig),
    Kafka(&'a KafkaConfig),
    JetStream(&'a JetStreamConfig),
    Mqtt(&'a MqttConfig),
    PubSub(&'a PubSubConfig),
    ZeroMq(&'a ZeroMqConfig),
}

impl BrokerConfig {
    /// The field names of the broker kinds, as the config spells them.
    pub const KINDS: &'static [&'static str] =
        &["rabbitmq", "kafka", "jetstream", "mqtt", "pubsub", "zeromq"];

    /// The configured broker; `None` unless exactly one kind is set.
    pub fn kind(&self) -> Option<BrokerKind<'_>> {
        match self.kinds_set().as_slice() {
            [one] => Some(*one),
            _ => None,
        }
    }

    /// Every kind that is set; validation wants exactly one.
    pub(super) fn kinds_set(&self) -> Vec<BrokerKind<'_>> {
        [
            self.rabbitmq.as_ref().map(BrokerKind::RabbitMq),
            self.kafka.as_ref().map(BrokerKind::Kafka),
            self.jetstream.as_ref().map(BrokerKind::JetStream),
            self.mqtt.as_ref().map(BrokerKind::Mqtt),
            self.pubsub.as_ref().map(BrokerKind::PubSub),
            self.zeromq.as_ref().map(BrokerKind::ZeroMq),
        ]
        .into_iter()
        .flatten()
        .collect()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RabbitMqConfig {
    /// Broker URL without secrets; overridden by `IDEMQ_BROKER_URL`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    pub queue: String,
    /// Unacknowledged messages the broker may push; also the delivery concurrency.
    #[serde(default = "defaults::prefetch")]
    pub prefetch: u16,
    /// Exchange that receives dead-lettered messages.
    #[serde(default = "defaults::dead_letter_exchange")]
    pub dead_letter_exchange: String,
    /// Routing key for dead letters; the original queue name when empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_letter_routing_key: Option<String>,
    /// Exchange that receives a copy of each dropped duplicate, if set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audit_exchange: Option<String>,
}

/// A Kafka consumer group member. Bootstrap servers and SASL credentials come
/// from the environment ([`SecretEnv`](super::SecretEnv)) when they carry secrets.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KafkaConfig {
    /// `host:port[,host:port…]`; overridden by `IDEMQ_KAFKA_BOOTSTRAP_SERVERS`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bootstrap_servers: Option<String>,
    /// Topics to consume.
    pub topics: Vec<String>,
    /// The consumer group; every replica of one consumer uses the same.
    pub group_id: String,
    /// Records taken and not yet settled, over all partitions.
    #[serde(default = "defaults::max_in_flight")]
    pub max_in_flight: u32,
    /// Which records may be delivered at the same time.
    #[serde(default)]
    pub ordering: Ordering,
    /// The group session timeout: how long the group waits for a silent member.
    #[serde(default = "defaults::session_timeout", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub session_timeout: Duration,
    /// Where a group without a committed offset starts.
    #[serde(default)]
    pub auto_offset_reset: OffsetReset,
    /// Where dead letters go; `<topic>.dead` of the record's topic when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_letter_topic: Option<String>,
    /// Settled offsets are committed at least this often.
    #[serde(default = "defaults::commit_interval", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub commit_interval: Duration,
    /// librdkafka's `partition.assignment.strategy`.
    #[serde(default = "defaults::assignment_strategy")]
    pub assignment_strategy: String,
    /// `plaintext`, `ssl`, `saslPlaintext` or `saslSsl`.
    #[serde(default)]
    pub security_protocol: SecurityProtocol,
    /// `plain`, `scramSha256` or `scramSha512` (with a SASL protocol).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sasl_mechanism: Option<SaslMechanism>,
    /// A CA bundle (PEM file) to verify the brokers with, instead of the system's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<String>,
}

/// `none`: up to `maxInFlight` records at once, in any order. `perKey`: one
/// record per idempotency key at a time. `perPartition`: one record per
/// partition at a time, in offset order.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub enum Ordering {
    #[default]
    None,
    PerKey,
    PerPartition,
}

#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub enum OffsetReset {
    #[default]
    Earliest,
    Latest,
}

#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub enum SecurityProtocol {
    #[default]
    Plaintext,
    Ssl,
    SaslPlaintext,
    SaslSsl,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum SaslMechanism {
    Plain,
    ScramSha256,
    ScramSha512,
}

/// A NATS JetStream durable pull consumer with explicit acks. The sidecar
/// creates the consumer when it does not exist yet (the operator does too).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JetStreamConfig {
    /// Server URL without secrets (`nats://host:4222`); overridden by
    /// `IDEMQ_BROKER_URL`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// The stream to consume; it must exist.
    pub stream: String,
    /// The durable consumer's name; replicas of one consumer share it.
    pub consumer: String,
    /// Subjects of the stream the consumer takes; all when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub filter_subjects: Vec<String>,
    /// Messages delivered and not yet acknowledged, at most (the consumer's
    /// MaxAckPending); also the delivery concurrency.
    #[serde(default = "defaults::max_ack_pending")]
    pub max_ack_pending: u32,
    /// The consumer's AckWait: a message unacknowledged this long is
    /// redelivered. The sidecar signals progress every third of it while
    /// the application works on a message.
    #[serde(default = "defaults::ack_wait", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub ack_wait: Duration,
    /// The consumer's MaxDeliver (unlimited when unset). A message on its
    /// last delivery is dead-lettered rather than given back, since JetStream
    /// would not deliver it again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_deliver: Option<u32>,
    /// Subject dead letters are published to; a stream must capture it.
    pub dead_letter_subject: String,
}

/// An MQTT subscriber with a persistent session and manual acknowledgements.
/// Nothing is declared on the broker: the subscription is the binding.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MqttConfig {
    /// Broker URL without secrets, `mqtt://host:1883` or `mqtts://host:8883`
    /// (TLS); overridden by `IDEMQ_BROKER_URL`. A user name and password come
    /// from the URL or from `IDEMQ_BROKER_USER` and `IDEMQ_BROKER_PASSWORD`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// `v5` (user properties, correlation data, reason codes) or `v3.1.1`.
    #[serde(default)]
    pub protocol: MqttProtocol,
    /// The session's client id; it must stay the same across restarts of one
    /// replica and differ between replicas. `<consumer>-<HOSTNAME>` (the pod
    /// name) when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    /// Topic filters to subscribe to (QoS 1); wildcards allowed.
    pub topics: Vec<String>,
    /// Subscribe as `$share/<group>/<filter>` so that replicas split the
    /// messages between them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shared_group: Option<String>,
    /// How long the broker keeps the session (its subscriptions and the
    /// messages waiting for it) after the sidecar disconnects (MQTT 5; with
    /// 3.1.1 the broker's own expiry applies).
    #[serde(default = "defaults::session_expiry", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub session_expiry: Duration,
    /// Messages the broker may send before they are acknowledged (MQTT 5
    /// Receive Maximum); also the delivery concurrency. With 3.1.1 the
    /// broker's own limit applies (Mosquitto: `max_inflight_messages`).
    #[serde(default = "defaults::receive_maximum")]
    pub receive_maximum: u16,
    /// Topic dead letters are published to (QoS 1).
    pub dead_letter_topic: String,
    /// A CA bundle (PEM file) to verify an `mqtts://` broker with, instead of
    /// the system's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<String>,
}

#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
pub enum MqttProtocol {
    #[default]
    #[serde(rename = "v5")]
    V5,
    #[serde(rename = "v3.1.1")]
    V311,
}

/// A Google Cloud Pub/Sub subscription, consumed by streaming pull. The
/// subscription must exist; its own settings (ack
/// deadline, ordering, exactly-once, dead-letter policy) are read at start.
/// With `PUBSUB_EMULATOR_HOST` set the sidecar talks to that emulator without
/// credentials; otherwise it authenticates with `credentialsFile`, or with
/// Application Default Credentials (Workload Identity on GKE).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PubSubConfig {
    /// The Google Cloud project id of the subscription and of the
    /// dead-letter topic.
    pub project: String,
    /// The subscription's id within `project` (not its full path).
    pub subscription: String,
    /// Messages Pub/Sub sends without an acknowledgement, at most (streaming
    /// pull flow control); also the delivery concurrency.
    #[serde(default = "defaults::max_outstanding_messages")]
    pub max_outstanding_messages: u32,
    /// Bytes of messages Pub/Sub sends without an acknowledgement, at most.
    #[serde(default = "defaults::max_outstanding_bytes")]
    pub max_outstanding_bytes: u64,
    /// Topic id (in `project`) dead letters are published to, with their
    /// reason and attempts in attributes, when the subscription has no
    /// dead-letter policy. With a policy, Pub/Sub moves them itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_letter_topic: Option<String>,
    /// A service-account key file (JSON), mounted from a Secret. Unset:
    /// Application Default Credentials (Workload Identity, or the file
    /// `GOOGLE_APPLICATION_CREDENTIALS` names).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_file: Option<String>,
}

impl PubSubConfig {
    /// `subscription` of `project`, with every other setting at its default.
    pub fn new(project: impl Into<String>, subscription: impl Into<String>) -> Self {
        Self {
            project: project.into(),
            subscription: subscription.into(),
            max_outstanding_messages: defaults::max_outstanding_messages(),
            max_outstanding_bytes: defaults::max_outstanding_bytes(),
            dead_letter_topic: None,
            credentials_file: None,
        }
    }
}

/// A ZeroMQ endpoint the sidecar binds and clients connect to: ZeroMQ has no
/// broker, so the endpoint is the binding. See `source::zeromq` for the wire
/// protocol of each pattern.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ZeroMqConfig {
    /// `tcp://<address>:<port>`: the loopback address, or the pod's, written
    /// `tcp://$(POD_IP):<port>` and taken from the `POD_IP` variable at start.
    pub bind: String,
    /// `router` (replies once each outcome is settled), `pull` or `sub`
    /// (no replies: what is queued in memory is lost if the sidecar dies).
    #[serde(default)]
    pub pattern: ZeroMqPattern,
    /// Topic prefixes a `sub` socket subscribes to (`""`: every message).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subscribe: Vec<String>,
    /// Messages taken from the socket and not yet settled, at most; also
    /// the delivery concurrency.
    #[serde(default = "defaults::max_in_flight")]
    pub max_in_flight: u32,
    /// Accept clients without CURVE authentication and encryption. Off by
    /// default: the endpoint then needs `IDEMQ_ZMQ_SERVER_SECRET_KEY` and
    /// `IDEMQ_ZMQ_CLIENT_KEYS`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub plain: bool,
    /// Where dead letters go; required, so that none is dropped.
    pub dead_letter: ZeroMqDeadLetter,
}

#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub enum ZeroMqPattern {
    #[default]
    Router,
    Pull,
    Sub,
}

impl ZeroMqPattern {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Router => "router",
            Self::Pull => "pull",
            Self::Sub => "sub",
        }
    }
}

/// Where a ZeroMQ endpoint's dead letters go: exactly one of a second
/// ZeroMQ endpoint, a RabbitMQ exchange or queue, or a Kafka topic
/// ([`ZeroMqDeadLetter::target`]); [`Config::validate`](super::Config::validate) says so when it is not.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ZeroMqDeadLetter {
    /// `tcp://host:port` (or `ipc://path`) of a PULL socket the sidecar
    /// connects to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// A RabbitMQ exchange (with a routing key) or queue.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rabbitmq: Option<RabbitMqDeadLetter>,
    /// A Kafka topic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kafka: Option<KafkaDeadLetter>,
}

/// The one dead-letter target a [`ZeroMqDeadLetter`] names.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum DeadLetterTarget<'a> {
    Endpoint(&'a str),
    RabbitMq(&'a RabbitMqDeadLetter),
    Kafka(&'a KafkaDeadLetter),
}

impl ZeroMqDeadLetter {
    /// The rule [`Self::target`] enforces, in the words both checks use:
    /// the CRD's schema rule (the operator's `ZeroMqDeadLetter`) and this
    /// config's validation, which a config written by hand goes through.
    pub const ONE_TARGET: &'static str =
        "set exactly one dead-letter target: endpoint, rabbitmq or kafka";

    /// The configured target; `None` unless exactly one is set.
    pub fn target(&self) -> Option<DeadLetterTarget<'_>> {
        let set: Vec<DeadLetterTarget<'_>> = [
            self.endpoint.as_deref().map(DeadLetterTarget::Endpoint),
            self.rabbitmq.as_ref().map(DeadLetterTarget::RabbitMq),
            self.kafka.as_ref().map(DeadLetterTarget::Kafka),
        ]
        .into_iter()
        .flatten()
        .collect();
        match set.as_slice() {
            [one] => Some(*one),
            _ => None,
        }
    }
}

/// Dead letters published to RabbitMQ with publisher confirms: to
/// `exchange` with `routingKey`, or straight to `queue` (the default
/// exchange). They are published `mandatory`: one that no queue takes is
/// returned by the broker and counts as not sent. The URL, with its
/// credentials, comes from `IDEMQ_BROKER_URL`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RabbitMqDeadLetter {
    /// Broker URL without secrets; overridden by `IDEMQ_BROKER_URL`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// The exchange to publish to (with `routingKey`); it must exist.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exchange: Option<String>,
    /// The routing key with `exchange` (default empty).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routing_key: Option<String>,
    /// A queue to publish to through the default exchange; it must exist.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<String>,
}

impl RabbitMqDeadLetter {
    /// The exchange and routing key a dead letter is published with.
    pub fn route(&self) -> (&str, &str) {
        match (&self.exchange, &self.queue) {
            (Some(exchange), _) => (
                exchange.as_str(),
                self.routing_key.as_deref().unwrap_or_default(),
            ),
            (None, Some(queue)) => ("", queue.as_str()),
            (None, None) => ("", ""),
        }
    }
}

/// Dead letters produced to a Kafka topic (`acks=all`), each sent once the
/// brokers acknowledged it. Bootstrap servers and SASL credentials come from
/// `IDEMQ_KAFKA_BOOTSTRAP_SERVERS`, `IDEMQ_KAFKA_USERNAME` and
/// `IDEMQ_KAFKA_PASSWORD`, as for the Kafka source.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KafkaDeadLetter {
    /// `host:port[,host:port…]`; overridden by `IDEMQ_KAFKA_BOOTSTRAP_SERVERS`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bootstrap_servers: Option<String>,
    /// The topic; it must exist.
    pub topic: String,
    /// `plaintext`, `ssl`, `saslPlaintext` or `saslSsl`.
    #[serde(default)]
    pub security_protocol: SecurityProtocol,
    /// `plain`, `scramSha256` or `scramSha512` (with a SASL protocol).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sasl_mechanism: Option<SaslMechanism>,
    /// A CA bundle (PEM file) to verify the brokers with, instead of the system's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<String>,
}

/// How a Kafka client reaches the brokers, apart from the secrets: the
/// Kafka source's and a Kafka dead-letter target's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KafkaSecurity<'a> {
    pub security_protocol: SecurityProtocol,
    pub sasl_mechanism: Option<SaslMechanism>,
    pub ca_file: Option<&'a str>,
}

impl KafkaConfig {
    pub fn security(&self) -> KafkaSecurity<'_> {
        KafkaSecurity {
            security_protocol: self.security_protocol,
            sasl_mechanism: self.sasl_mechanism,
            ca_file: self.ca_file.as_deref(),
        }
    }

    /// A member of `group_id` consuming `topics`, with every other setting at
    /// its default.
    pub fn new(topics: Vec<String>, group_id: impl Into<String>) -> Self {
        Self {
            bootstrap_servers: None,
            topics,
            group_id: group_id.into(),
            max_in_flight: defaults::max_in_flight(),
            ordering: Ordering::default(),
            session_timeout: defaults::session_timeout(),
            auto_offset_reset: OffsetReset::default(),
            dead_letter_topic: None,
            commit_interval: defaults::commit_interval(),
            assignment_strategy: defaults::assignment_strategy(),
            security_protocol: SecurityProtocol::default(),
            sasl_mechanism: None,
            ca_file: None,
        }
    }
}

impl KafkaDeadLetter {
    pub fn security(&self) -> KafkaSecurity<'_> {
        KafkaSecurity {
            security_protocol: self.security_protocol,
            sasl_mechanism: self.sasl_mechanism,
            ca_file: self.ca_file.as_deref(),
        }
    }
}
