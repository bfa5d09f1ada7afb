//! The `broker` section of an `IdempotentConsumer`: one binding per broker
//! kind, exactly one of which is set.

use super::*;

/// Exactly one broker kind: the schema says so (a CEL rule) and the
/// operator checks again ([`Broker::kind`]) for objects stored before the rule.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new("[has(self.rabbitmq), has(self.kafka), has(self.jetstream), has(self.mqtt), has(self.pubsub), has(self.zeromq)].exists_one(set, set)").message("set exactly one broker: rabbitmq, kafka, jetstream, mqtt, pubsub or zeromq"))]
pub struct Broker {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rabbitmq: Option<RabbitMqBinding>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kafka: Option<KafkaBinding>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jetstream: Option<JetStreamBinding>,
    pub mqtt: Option<MqttBinding>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pubsub: Option<PubSubBinding>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zeromq: Option<ZeroMqBinding>,
}

/// The one broker a [`Broker`] names.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum BrokerKind<'a> {
    RabbitMq(&'a RabbitMqBinding),
    Kafka(&'a KafkaBinding),
    JetStream(&'a JetStreamBinding),
    Mqtt(&'a MqttBinding),
    PubSub(&'a PubSubBinding),
    ZeroMq(&'a ZeroMqBinding),
}

impl Broker {
    /// The field names of the broker kinds.
    pub const KINDS: &'static [&'static str] =
        &["rabbitmq", "kafka", "jetstream", "mqtt", "pubsub", "zeromq"];

    /// The configured broker; `None` unless exactly one kind is set.
    pub fn kind(&self) -> Option<BrokerKind<'_>> {
        let set: Vec<BrokerKind<'_>> = [
            self.rabbitmq.as_ref().map(BrokerKind::RabbitMq),
            self.kafka.as_ref().map(BrokerKind::Kafka),
            self.jetstream.as_ref().map(BrokerKind::JetStream),
            self.mqtt.as_ref().map(BrokerKind::Mqtt),
            self.pubsub.as_ref().map(BrokerKind::PubSub),
            self.zeromq.as_ref().map(BrokerKind::ZeroMq),
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

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct RabbitMqBinding {
    /// Secret holding the AMQP URL (with credentials).
    pub connection_secret_ref: SecretKeyRef,
    /// The queue to consume; declared durable if absent.
    #[schemars(length(min = 1, max = 255))]
    pub queue: String,
    /// An exchange to bind the queue to, with `routingKeys`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exchange: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routing_keys: Vec<String>,
    /// Unacknowledged messages per sidecar, and so deliveries in flight (default 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub prefetch: Option<u16>,
    /// Exchange for dead letters (default `idemq.dlx`), declared with a queue
    /// `<queue>.dead` bound to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_letter_exchange: Option<String>,
    /// Delete the queues on deletion of this resource (default false: messages are kept).
    #[serde(default)]
    pub delete_on_cleanup: bool,
}

/// A Kafka consumer group: the operator checks that the topics exist and
/// creates the dead-letter topics; the sidecar joins the group.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new(
    "(has(self.securityProtocol) && self.securityProtocol in ['saslPlaintext', 'saslSsl']) == has(self.saslMechanism)"
).message("saslMechanism is required with securityProtocol saslPlaintext or saslSsl, and only with them"))]
#[x_kube(validation = kube::core::Rule::new(
    "!has(self.connectionSecretRef.caKey) || (has(self.securityProtocol) && self.securityProtocol in ['ssl', 'saslSsl'])"
).message("connectionSecretRef.caKey needs securityProtocol ssl or saslSsl"))]
pub struct KafkaBinding {
    /// Secret holding the connection: key `bootstrapServers`
    /// (`host:port[,host:port…]`), and `username` and `password` with SASL.
    pub connection_secret_ref: KafkaSecretRef,
    /// Topics to consume. They must exist: their producers own them.
    #[schemars(length(min = 1, max = 100), inner(length(min = 1, max = 249), regex(pattern = KAFKA_TOPIC)))]
    pub topics: Vec<String>,
    /// The consumer group (default `<namespace>.<name>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 255))]
    pub group_id: Option<String>,
    /// Where dead letters go (default `<topic>.dead` for each topic);
    /// created when missing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 249), regex(pattern = KAFKA_TOPIC))]
    pub dead_letter_topic: Option<String>,
    /// Partitions of a dead-letter topic the operator creates (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10000))]
    pub dead_letter_partitions: Option<i32>,
    /// Replication factor of a dead-letter topic the operator creates
    /// (default: the brokers' `default.replication.factor`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 32))]
    pub dead_letter_replication_factor: Option<i32>,
    /// Records taken and not yet settled, per sidecar, over all partitions
    /// (default 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub max_in_flight: Option<u32>,
    /// Which records may be delivered at the same time (default none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ordering: Option<KafkaOrdering>,
    /// How long the group waits for a silent member (default 45s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION))]
    pub session_timeout: Option<String>,
    /// Where a group without a committed offset starts (default earliest).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_offset_reset: Option<OffsetReset>,
    /// Settled offsets are committed at least this often (default 1s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION))]
    pub commit_interval: Option<String>,
    /// How the brokers are reached (default plaintext).
    #[serde(default)]
    pub security_protocol: KafkaSecurityProtocol,
    /// With a SASL protocol: plain, scramSha256 or scramSha512.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sasl_mechanism: Option<SaslMechanism>,
}

/// A NATS JetStream durable pull consumer on an existing stream: the
/// operator checks that the stream exists, creates the consumer when it is
/// missing (one that exists with other settings is reported, never changed)
/// and the dead-letter stream when asked; the sidecar consumes it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct JetStreamBinding {
    /// Secret holding the server URL (`nats://host:4222`, key `url` unless
    /// `key` says otherwise) and the keys `auth` needs.
    pub connection_secret_ref: SecretKeyRef,
    /// How to authenticate (default none): `userPassword` reads the
    /// Secret's keys `username` and `password`, `token` its key `token`,
    /// `creds` its key `creds` (a `.creds` file's content).
    #[serde(default)]
    pub auth: NatsAuth,
    /// The stream to consume. It must exist: its producers own it.
    #[schemars(length(min = 1, max = 255), regex(pattern = NATS_NAME))]
    pub stream: String,
    /// The durable pull consumer (default `<namespace>_<name>`, dots as
    /// underscores); created when missing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 255), regex(pattern = NATS_NAME))]
    pub consumer: Option<String>,
    /// Subjects of the stream the consumer takes (default all).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(inner(length(min = 1, max = 255), regex(pattern = NATS_SUBJECT)))]
    pub filter_subjects: Vec<String>,
    /// Messages delivered and not yet acknowledged, per consumer, and so
    /// deliveries in flight (default 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub max_ack_pending: Option<u32>,
    /// The consumer's AckWait (default 30s); the sidecar signals progress
    /// every third of it while the application works.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION))]
    pub ack_wait: Option<String>,
    /// The consumer's MaxDeliver (default unlimited); a message on its last
    /// delivery that would be given back is dead-lettered instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_deliver: Option<u32>,
    /// The subject dead letters are published to; a stream must capture it
    /// (`deadLetterStream`, or one of yours).
    #[schemars(length(min = 1, max = 255), regex(pattern = NATS_SUBJECT))]
    pub dead_letter_subject: String,
    /// A stream capturing `deadLetterSubject`, created when missing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 255), regex(pattern = NATS_NAME))]
    pub dead_letter_stream: Option<String>,
}

/// Stream and consumer names: no whitespace, dots, wildcards or path separators.
const NATS_NAME: &str = r"^[^.*>\s/\\]+$";
/// Subjects: dot-separated tokens without whitespace.
const NATS_SUBJECT: &str = r"^[^\s]+$";

/// A ZeroMQ endpoint: ZeroMQ has no broker, so the binding is the endpoint
/// clients connect to. Each sidecar binds `tcp://<pod IP>:<port>`, and the
/// operator creates a Service named after the resource that selects the
/// injected pods and exposes the port (and, when asked, a NetworkPolicy
/// that admits only labelled clients to it).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new(
    "has(self.curve) != (has(self.plain) && self.plain)"
).message("set curve (a Secret with the server's secret key and the clients' public keys), or plain: true to accept unauthenticated clients; not both, not neither"))]
#[x_kube(validation = kube::core::Rule::new(
    "(has(self.pattern) && self.pattern == 'sub') == (has(self.subscribe) && size(self.subscribe) > 0)"
).message("subscribe is required with pattern sub (\"\" takes every message), and only with it"))]
pub struct ZeroMqBinding {
    /// `router` (default: each request is answered once its outcome is
    /// settled), `pull` or `sub` (no replies: what waits in memory is lost
    /// when the sidecar dies).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pattern: Option<ZeroMqPattern>,
    /// The port the sidecar binds on the pod's address and the Service
    /// exposes (default 5555).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1024, max = 65535))]
    pub port: Option<u16>,
    /// With pattern sub, the topic prefixes to subscribe to (`""`: every message).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 100))]
    pub subscribe: Vec<String>,
    /// Messages taken and not yet settled per sidecar, and so deliveries in
    /// flight (default 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub max_in_flight: Option<u32>,
    /// CURVE encryption and authentication: the Secret holding the server's
    /// secret key and the public keys of the clients allowed to connect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub curve: Option<ZeroMqCurve>,
    /// Accept clients without authentication or encryption; only when set
    /// explicitly (instead of `curve`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plain: Option<bool>,
    /// Where dead letters go: a PULL socket the sidecar connects to, a
    /// RabbitMQ exchange or queue, or a Kafka topic.
    pub dead_letter: ZeroMqDeadLetter,
    /// A NetworkPolicy admitting only the selected client pods to the port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_policy: Option<ZeroMqNetworkPolicy>,
}

impl ZeroMqBinding {
    pub const DEFAULT_PORT: u16 = 5555;

    pub fn port(&self) -> u16 {
        self.port.unwrap_or(Self::DEFAULT_PORT)
    }
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum ZeroMqPattern {
    Router,
    Pull,
    Sub,
}

/// The CURVE keys' Secret: Z85 text (40 characters per key).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ZeroMqCurve {
    #[schemars(length(min = 1, max = 253))]
    pub secret_name: String,
    /// The key holding the server's secret key (default `serverSecretKey`).
    #[serde(default = "default_server_secret_key")]
    #[schemars(length(min = 1, max = 253))]
    pub server_secret_key: String,
    /// The key holding the allowed clients' public keys, one per line
    /// (default `clientPublicKeys`).
    #[serde(default = "default_client_public_keys")]
    #[schemars(length(min = 1, max = 253))]
    pub client_public_keys: String,
}

fn default_server_secret_key() -> String {
    "serverSecretKey".to_string()
}

fn default_client_public_keys() -> String {
    "clientPublicKeys".to_string()
}

/// Exactly one dead-letter target: the schema says so (a CEL rule), and
/// the operator checks again ([`ZeroMqDeadLetter::target`]). The sidecar's
/// config validation says it in the same words (its `ONE_TARGET`), since
/// its config can be written by hand.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new(
    "[has(self.endpoint), has(self.rabbitmq), has(self.kafka)].exists_one(set, set)"
).message(idemq_sidecar::config::ZeroMqDeadLetter::ONE_TARGET))]
pub struct ZeroMqDeadLetter {
    /// `tcp://host:port` or `ipc://path` of the PULL socket that receives
    /// dead letters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^(tcp://[^:/\s]+:[0-9]{1,5}|ipc://.+)$"))]
    pub endpoint: Option<String>,
    /// A RabbitMQ exchange (with a routing key) or queue; it must exist.
    /// Each dead letter is published mandatory and confirmed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rabbitmq: Option<ZeroMqRabbitMqDeadLetter>,
    /// A Kafka topic; it must exist. Each dead letter is acknowledged by
    /// the brokers (`acks=all`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kafka: Option<ZeroMqKafkaDeadLetter>,
}

/// The one dead-letter target a [`ZeroMqDeadLetter`] names.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum DeadLetterTarget<'a> {
    Endpoint(&'a str),
    RabbitMq(&'a ZeroMqRabbitMqDeadLetter),
    Kafka(&'a ZeroMqKafkaDeadLetter),
}

impl ZeroMqDeadLetter {
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

    /// The Secret the dead-letter broker's connection comes from, if any.
    pub fn secret_name(&self) -> Option<&str> {
        match self.target()? {
            DeadLetterTarget::Endpoint(_) => None,
            DeadLetterTarget::RabbitMq(r) => Some(&r.connection_secret_ref.name),
            DeadLetterTarget::Kafka(k) => Some(&k.connection_secret_ref.name),
        }
    }
}

/// Dead letters to RabbitMQ: to `exchange` with `routingKey`, or to `queue`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new("has(self.exchange) != has(self.queue)")
    .message("set exactly one of exchange (with routingKey) or queue"))]
#[x_kube(validation = kube::core::Rule::new("!has(self.routingKey) || has(self.exchange)")
    .message("routingKey goes with exchange (a queue is its own routing key)"))]
pub struct ZeroMqRabbitMqDeadLetter {
    /// Secret holding the AMQP URL (with credentials; key `url` unless
    /// `key` says otherwise), as `spec.broker.rabbitmq`'s.
    pub connection_secret_ref: SecretKeyRef,
    /// The exchange dead letters are published to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 255))]
    pub exchange: Option<String>,
    /// The routing key with `exchange` (default empty).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 255))]
    pub routing_key: Option<String>,
    /// A queue dead letters are published to (through the default exchange).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 255))]
    pub queue: Option<String>,
}

/// Dead letters to a Kafka topic.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new(
    "(has(self.securityProtocol) && self.securityProtocol in ['saslPlaintext', 'saslSsl']) == has(self.saslMechanism)"
).message("saslMechanism is required with securityProtocol saslPlaintext or saslSsl, and only with them"))]
#[x_kube(validation = kube::core::Rule::new(
    "!has(self.connectionSecretRef.caKey) || (has(self.securityProtocol) && self.securityProtocol in ['ssl', 'saslSsl'])"
).message("connectionSecretRef.caKey needs securityProtocol ssl or saslSsl"))]
pub struct ZeroMqKafkaDeadLetter {
    /// Secret holding the connection, as `spec.broker.kafka`'s: key
    /// `bootstrapServers`, and `username` and `password` with SASL.
    pub connection_secret_ref: KafkaSecretRef,
    /// The topic dead letters are produced to.
    #[schemars(length(min = 1, max = 249), regex(pattern = KAFKA_TOPIC))]
    pub topic: String,
    /// How the brokers are reached (default plaintext).
    #[serde(default)]
    pub security_protocol: KafkaSecurityProtocol,
    /// With a SASL protocol: plain, scramSha256 or scramSha512.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sasl_mechanism: Option<SaslMechanism>,
}

/// Admits only `clientSelector`'s pods (of the resource's namespace) to the
/// ZeroMQ port. A NetworkPolicy that selects pods makes them deny every
/// ingress it does not allow; see `otherPorts` for the pods' other ports.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ZeroMqNetworkPolicy {
    pub client_selector: LabelSelector,
    /// `open` (default): the policy also admits every source to the pods'
    /// other ports, so they stay as reachable as without it (in a namespace
    /// whose policies deny by default, that opens them). `isolate`: the
    /// policy says nothing of them, and other NetworkPolicies decide (with
    /// none, they are closed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub other_ports: Option<OtherPorts>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum OtherPorts {
    Open,
    Isolate,
}

/// Which keys of the connection Secret authenticate to NATS.
/// An MQTT subscription. Nothing is declared on the broker: the subscription
/// is the binding. The operator checks that the broker answers and accepts
/// the credentials; the sidecar subscribes with QoS 1 in a persistent session.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct MqttBinding {
    /// Secret holding the broker URL (`mqtt://host:1883`, or `mqtts://` for
    /// TLS; key `url` unless `key` says otherwise) and, with `auth:
    /// userPassword`, the keys `username` and `password`.
    pub connection_secret_ref: SecretKeyRef,
    /// How to authenticate (default none).
    #[serde(default)]
    pub auth: MqttAuth,
    /// A key of the connection Secret holding the PEM CA bundle that
    /// verifies the broker (with `mqtts://`; default: the system's CAs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_key: Option<String>,
    /// `v5` (default) or `v3.1.1` (no properties: the key must come from the body).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<MqttProtocol>,
    /// Topic filters to subscribe to (QoS 1); wildcards allowed.
    #[schemars(length(min = 1, max = 100), inner(length(min = 1, max = 65535)))]
    pub topics: Vec<String>,
    /// The shared subscription's group, `$share/<group>/<filter>`, so the
    /// workload's replicas split the messages (default `<namespace>.<name>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 255), regex(pattern = r"^[^/+#]+$"))]
    pub shared_group: Option<String>,
    /// Topic dead letters are published to.
    #[schemars(length(min = 1, max = 65535), regex(pattern = r"^[^+#]+$"))]
    pub dead_letter_topic: String,
    /// How long the broker keeps a sidecar's session, and the messages waiting
    /// for it, after a disconnect (default 1h).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION))]
    pub session_expiry: Option<String>,
    /// Messages sent and not yet acknowledged per sidecar, and so deliveries
    /// in flight (default 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub receive_maximum: Option<u16>,
}

/// A Google Cloud Pub/Sub subscription on an existing topic: the operator
/// checks that the topic exists, creates the subscription with the spec's
/// settings when it is missing (one that exists with other settings is
/// reported, never changed) and the dead-letter topic when missing; the
/// sidecar consumes the subscription with a streaming pull.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new(
    "has(self.deadLetterPolicy) || has(self.deadLetterTopic)"
).message("dead letters need somewhere to go: set deadLetterPolicy (Pub/Sub moves a message after maxDeliveryAttempts) or deadLetterTopic (the sidecar publishes it)"))]
pub struct PubSubBinding {
    /// Secret holding a service-account key (JSON; key `key.json` unless
    /// `key` says otherwise). The sidecar reads it as a mounted file.
    pub credentials_secret_ref: CredentialsSecretRef,
    /// The Google Cloud project of the topic and the subscription.
    #[schemars(regex(pattern = r"^[a-z][a-z0-9-]{4,28}[a-z0-9]$"))]
    pub project: String,
    /// The topic to consume. It must exist: its producers own it.
    #[schemars(regex(pattern = PUBSUB_NAME))]
    pub topic: String,
    /// The subscription (its id, not its path); created when missing.
    #[schemars(regex(pattern = PUBSUB_NAME))]
    pub subscription: String,
    /// The subscription's ack deadline (default 60); the sidecar extends the
    /// deadline of each message while the application works on it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 10, max = 600))]
    pub ack_deadline_seconds: Option<i32>,
    /// How soon Pub/Sub redelivers a message given back (default: at once).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_policy: Option<PubSubRetryPolicy>,
    /// The subscription's dead-letter policy: Pub/Sub moves a message to
    /// `topic` after `maxDeliveryAttempts` (its service agent needs publish
    /// on the topic and subscribe on the subscription).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_letter_policy: Option<PubSubDeadLetterPolicy>,
    /// Without a dead-letter policy: the topic the sidecar publishes dead
    /// letters to, with their reason in attributes; created when missing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = PUBSUB_NAME))]
    pub dead_letter_topic: Option<String>,
    /// Exactly-once delivery: Pub/Sub answers each acknowledgement.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub enable_exactly_once_delivery: bool,
    /// Messages of one ordering key are delivered in order, one at a time.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub enable_message_ordering: bool,
    /// A filter on message attributes (Pub/Sub's filter syntax).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    pub filter: Option<String>,
    /// Messages Pub/Sub sends each sidecar without an acknowledgement, and
    /// so deliveries in flight (default 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub max_outstanding_messages: Option<u32>,
}

/// Pub/Sub topic and subscription ids: 3 to 255 characters, a letter first.
const PUBSUB_NAME: &str = r"^[a-zA-Z][a-zA-Z0-9._~+%-]{2,254}$";

/// Between `minimumBackoff` and `maximumBackoff`, growing with the attempts.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new(
    "duration(has(self.minimumBackoff) ? self.minimumBackoff : '10s') <= duration(has(self.maximumBackoff) ? self.maximumBackoff : '600s') && duration(has(self.maximumBackoff) ? self.maximumBackoff : '600s') <= duration('600s')"
).message("retryPolicy: minimumBackoff (default 10s) must not exceed maximumBackoff (default 600s), at most 600s"))]
pub struct PubSubRetryPolicy {
    /// Default 10s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION))]
    pub minimum_backoff: Option<String>,
    /// Default 600s, at most 600s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION))]
    pub maximum_backoff: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct PubSubDeadLetterPolicy {
    /// The dead-letter topic (its id, in `project`); created when missing.
    #[schemars(regex(pattern = PUBSUB_NAME))]
    pub topic: String,
    /// Deliveries before Pub/Sub moves a message (default 5).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 5, max = 100))]
    pub max_delivery_attempts: Option<i32>,
}

/// A Secret key holding a file's content.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct CredentialsSecretRef {
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key in the Secret's data (default `key.json`).
    #[serde(default = "default_credentials_key")]
    pub key: String,
}

fn default_credentials_key() -> String {
    "key.json".to_string()
}

#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, schemars::JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub enum NatsAuth {
    /// The URL alone (it may hold `user:password@`).
    #[default]
    None,
    /// Keys `username` and `password`.
    UserPassword,
    /// Key `token`.
    Token,
    /// Key `creds`: a `.creds` file (JWT and NKey seed).
    Creds,
}

#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, schemars::JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub enum MqttAuth {
    #[default]
    None,
    /// The Secret's keys `username` and `password`.
    UserPassword,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, schemars::JsonSchema)]
pub enum MqttProtocol {
    #[serde(rename = "v5")]
    V5,
    #[serde(rename = "v3.1.1")]
    V311,
}

/// Kafka's legal topic names.
const KAFKA_TOPIC: &str = r"^[a-zA-Z0-9._-]+$";

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct KafkaSecretRef {
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// A key of this Secret holding the PEM CA bundle that verifies the
    /// brokers (with ssl or saslSsl; default: the system's CAs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_key: Option<String>,
}

/// `none`: up to `maxInFlight` records at once, in any order. `perKey`: one
/// record per idempotency key at a time. `perPartition`: one record per
/// partition at a time, in offset order.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum KafkaOrdering {
    None,
    PerKey,
    PerPartition,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum OffsetReset {
    Earliest,
    Latest,
}

#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, schemars::JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub enum KafkaSecurityProtocol {
    #[default]
    Plaintext,
    Ssl,
    SaslPlaintext,
    SaslSsl,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum SaslMechanism {
    Plain,
    ScramSha256,
    ScramSha512,
}
