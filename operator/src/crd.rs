//! The `IdempotentConsumer` custom resource: one dedup policy for one workload.
//!
//! The schema carries the validation the API server can do by itself (required
//! fields, enums, patterns, minimums, and CEL rules where a rule spans fields),
//! so that most bad input is refused at `kubectl apply` time.

use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

/// Durations as Go and Kubernetes write them (`500ms`, `30s`, `24h`, `1h30m`),
/// so CEL's `duration()` can compare them.
const DURATION: &str = r"^([0-9]+(ms|s|m|h))+$";

// Each printcolumn repeats `type_`, which clippy mistakes for a duplicate.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "idemq.dev",
    version = "v1alpha1",
    kind = "IdempotentConsumer",
    namespaced,
    shortname = "ic",
    status = "IdempotentConsumerStatus",
    printcolumn(name = "Target", type_ = "string", json_path = ".spec.target.name"),
    printcolumn(name = "Injection", type_ = "string", json_path = ".spec.injection"),
    printcolumn(
        name = "Queue",
        type_ = "string",
        json_path = ".spec.broker.rabbitmq.queue"
    ),
    printcolumn(
        name = "Topics",
        type_ = "string",
        json_path = ".spec.broker.kafka.topics"
    ),
    printcolumn(
        name = "Stream",
        type_ = "string",
        json_path = ".spec.broker.jetstream.stream"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(validation = kube::core::Rule::new(
    "!has(self.retention) || !has(self.lease) || duration(self.retention) >= duration(self.lease)"
).message("retention must be at least as long as lease"))]
#[x_kube(validation = kube::core::Rule::new(
    "!has(self.broker.kafka) || !has(self.key) || !has(self.key.from) || self.key.from != 'messageId'"
).message("Kafka records have no message id: set key.from to recordKey, header, jsonPointer, bodyHash, cloudEvent or coordinates"))]
#[x_kube(validation = kube::core::Rule::new(
    "!has(self.broker.rabbitmq) || !has(self.key) || !has(self.key.from) || !(self.key.from in ['recordKey', 'coordinates'])"
).message("recordKey and coordinates are Kafka keys; with RabbitMQ use messageId, header, jsonPointer, bodyHash or cloudEvent"))]
#[x_kube(validation = kube::core::Rule::new(
    "!has(self.broker.mqtt) || !has(self.key) || !has(self.key.from) || !(self.key.from in ['recordKey', 'coordinates'])"
).message("recordKey and coordinates are Kafka keys; with MQTT use messageId (correlation data), header (a user property), jsonPointer, bodyHash or cloudEvent"))]
#[x_kube(validation = kube::core::Rule::new(
    "!has(self.broker.mqtt) || !has(self.broker.mqtt.protocol) || self.broker.mqtt.protocol != 'v3.1.1' || (has(self.key) && has(self.key.from) && self.key.from in ['jsonPointer', 'bodyHash', 'cloudEvent'])"
).message("MQTT 3.1.1 messages have no properties: set key.from to jsonPointer, bodyHash or cloudEvent"))]
#[x_kube(validation = kube::core::Rule::new(
    "self.injection == 'pod' ? (has(self.target.selector) && !has(self.target.kind) && !has(self.target.name)) : (has(self.target.kind) && has(self.target.name) && !has(self.target.selector))"
).message("injection: workload names the workload (target.kind and target.name); injection: pod selects the pods (target.selector, alone)"))]
#[x_kube(validation = kube::core::Rule::new(
    "!has(self.rollout) || self.rollout == 'manual' || self.injection == 'pod'"
).message("rollout: evict is for injection: pod; with injection: workload a changed configuration rolls the pods by itself"))]
#[x_kube(validation = kube::core::Rule::new(
    "self.injection == oldSelf.injection"
).message("spec.injection cannot change: delete the resource (which withdraws its sidecar) and create it again"))]
#[x_kube(validation = kube::core::Rule::new(
    "!has(self.broker.jetstream) || !has(self.key) || !has(self.key.from) || !(self.key.from in ['recordKey', 'coordinates'])"
).message("recordKey and coordinates are Kafka keys; with JetStream use messageId (Nats-Msg-Id), header, jsonPointer, bodyHash or cloudEvent"))]
#[x_kube(validation = kube::core::Rule::new(
    "!has(self.broker.pubsub) || !has(self.key) || !has(self.key.from) || !(self.key.from in ['recordKey', 'coordinates', 'header'])"
).message("with Pub/Sub use messageId, attribute, jsonPointer, bodyHash or cloudEvent (Pub/Sub messages carry attributes, not headers)"))]
#[x_kube(validation = kube::core::Rule::new(
    "!has(self.broker.zeromq) || !has(self.key) || !has(self.key.from) || !(self.key.from in ['recordKey', 'coordinates'])"
).message("recordKey and coordinates are Kafka keys; with ZeroMQ use messageId (the message-id frame), header (the header frame), jsonPointer, bodyHash or cloudEvent"))]
#[x_kube(validation = kube::core::Rule::new(
    "!has(self.broker.zeromq) || !has(self.delivery.mode) || self.delivery.mode != 'gate'"
).message("with ZeroMQ the sidecar is the endpoint clients send to: delivery.mode must be http"))]
#[x_kube(validation = kube::core::Rule::new(
    "has(self.broker.pubsub) || !has(self.key) || !has(self.key.from) || self.key.from != 'attribute'"
).message("attribute is a Pub/Sub key; other brokers carry headers: use header"))]
#[serde(rename_all = "camelCase")]
pub struct IdempotentConsumerSpec {
    /// How the sidecar reaches the pods (default workload).
    #[serde(default)]
    pub injection: Injection,
    /// The workload (injection: workload) or the pods (injection: pod) that
    /// get the sidecar.
    pub target: Target,
    /// Where messages come from.
    pub broker: Broker,
    /// Where each message's idempotency key comes from.
    #[serde(default)]
    pub key: KeySpec,
    /// Keep a payload fingerprint to detect a key reused for another body (default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<bool>,
    /// How long a completed key is remembered (default 24h).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION))]
    pub retention: Option<String>,
    /// How long a claim is held before another delivery may take it (default 30s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION))]
    pub lease: Option<String>,
    /// Deliveries before a message is dead-lettered (default 5).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100))]
    pub max_attempts: Option<u32>,
    /// How the application receives messages.
    pub delivery: Delivery,
    /// The key store.
    #[serde(default)]
    pub store: StoreSpec,
    /// Overrides for the injected sidecar.
    #[serde(default)]
    pub sidecar: SidecarSpec,
    /// OpenTelemetry traces of each message, exported over OTLP/HTTP to
    /// `endpoint` (e.g. `http://otel-collector.observability:4318`); off
    /// without one. See the README's "Traces".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traces: Option<idemq_sidecar::config::TracesConfig>,
    /// With injection: pod, how running pods take a changed configuration:
    /// manual (the default: when they are re-created) or evict (the operator
    /// evicts the stale pods one at a time, honouring PodDisruptionBudgets).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<Rollout>,
}

/// With injection: pod, how running pods take a changed configuration (the
/// webhook only sees pods being created). `manual`: when they are re-created
/// (`kubectl rollout restart`). `evict`: the operator evicts the stale pods
/// one at a time through the Eviction API, which honours
/// PodDisruptionBudgets, and only while every other pod of the resource is
/// ready; their owners re-create them with the current sidecar. Only pods
/// that a ReplicaSet, StatefulSet or DaemonSet re-creates are evicted; the
/// workload objects are never written.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum Rollout {
    Manual,
    Evict,
}

/// `workload`: the operator adds the sidecar to the target workload's pod
/// template (server-side apply of idemq's fields only), and a policy change
/// rolls the pods. `pod`: the operator's admission webhook adds it to each
/// selected pod when the pod is created, and the workload object is never
/// written (GitOps tools see no drift; Jobs, CronJobs, DaemonSets and pods
/// of any other owner can be served). Pods take a changed policy when they
/// are re-created.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, schemars::JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub enum Injection {
    #[default]
    Workload,
    Pod,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, schemars::JsonSchema)]
pub enum TargetKind {
    Deployment,
    StatefulSet,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new(
    "!has(self.selector) || (has(self.selector.matchLabels) && size(self.selector.matchLabels) > 0) || (has(self.selector.matchExpressions) && size(self.selector.matchExpressions) > 0)"
).message("target.selector must name at least one label: an empty selector would take every labelled pod of the namespace"))]
pub struct Target {
    /// With injection: workload, the kind of the workload.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<TargetKind>,
    /// With injection: workload, the name of the workload, in the resource's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub name: Option<String>,
    /// With injection: pod, the pods of the resource's namespace that get
    /// the sidecar when they are created (they must also carry the label
    /// `idemq.dev/inject: enabled`, which lets them reach the webhook).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<LabelSelector>,
}

impl Target {
    /// The workload to patch: its kind and name, with injection: workload.
    pub fn workload(&self) -> Option<(&TargetKind, &str)> {
        Some((self.kind.as_ref()?, self.name.as_deref()?))
    }
}

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

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key in the Secret's data (default `url`).
    #[serde(default = "default_url_key")]
    pub key: String,
}

fn default_url_key() -> String {
    "url".to_string()
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum KeyFrom {
    #[default]
    MessageId,
    Header,
    JsonPointer,
    BodyHash,
    CloudEvent,
    /// The Kafka record key (often an entity id rather than one per event).
    RecordKey,
    /// The Kafka record's topic/partition/offset: catches the redeliveries
    /// after rebalances and crashes, not producer retries.
    Coordinates,
    /// A Pub/Sub message attribute, named by `name`.
    Attribute,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum MissingKey {
    #[default]
    DeadLetter,
    HashBody,
    PassThrough,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new("self.from != 'header' || has(self.name)").message("key.name is required when key.from is header"))]
#[x_kube(validation = kube::core::Rule::new("self.from != 'attribute' || has(self.name)").message("key.name is required when key.from is attribute"))]
#[x_kube(validation = kube::core::Rule::new("self.from != 'jsonPointer' || has(self.pointer)").message("key.pointer is required when key.from is jsonPointer"))]
pub struct KeySpec {
    #[serde(default)]
    pub from: KeyFrom,
    /// Header name, with `from: header`; attribute name, with `from: attribute`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// JSON pointer into the body, with `from: jsonPointer` (e.g. `/order/id`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^/"))]
    pub pointer: Option<String>,
    /// What happens to a message without a key.
    #[serde(default)]
    pub missing_key: MissingKey,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum DeliveryMode {
    /// The sidecar consumes the broker and POSTs each message to the app.
    #[default]
    Http,
    /// The app consumes the broker itself and asks the sidecar's claim API.
    Gate,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new("self.mode != 'http' || has(self.port)").message("delivery.port is required in http mode"))]
pub struct Delivery {
    #[serde(default)]
    pub mode: DeliveryMode,
    /// The app's HTTP port (on 127.0.0.1 in the pod).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<u16>,
    /// The app's path (default `/`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^/"))]
    pub path: Option<String>,
    /// Timeout per delivery (default 10s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION))]
    pub timeout: Option<String>,
    /// Path of an HTTP readiness check of the app (a GET that answers 2xx);
    /// without it, the sidecar waits for a TCP connect to `port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^/"))]
    pub readiness_path: Option<String>,
    /// Bytes of message bodies held in flight at most (default 32 MiB, or
    /// `prefetch × expectedMessageBytes` when smaller). The sidecar's memory
    /// request and limit follow from it unless `sidecar.resources` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 65536))]
    pub max_in_flight_bytes: Option<u64>,
    /// The size of a typical message in bytes, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub expected_message_bytes: Option<u64>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum StoreMode {
    /// The operator runs a Redis for this consumer.
    #[default]
    Managed,
    /// A Redis of yours, its URL in a Secret.
    External,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum Unavailable {
    #[default]
    FailClosed,
    PassThrough,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new("self.mode != 'external' || has(self.external)").message("store.external is required when store.mode is external"))]
#[x_kube(validation = kube::core::Rule::new("!has(self.durability) || self.durability != 'replicated' || self.mode == 'external' || (has(self.managed) && has(self.managed.replicas) && self.managed.replicas >= 2)").message("store.durability replicated needs replicas: set store.managed.replicas (2 or more), or use an external store with replicas"))]
pub struct StoreSpec {
    #[serde(default)]
    pub mode: StoreMode,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external: Option<ExternalStore>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub managed: Option<ManagedStore>,
    /// What the sidecar does while the store does not answer.
    #[serde(default)]
    pub unavailable: Unavailable,
    /// `replicated`: a completion waits until a replica holds it (`WAIT 1`)
    /// before the message is acknowledged; needs replicas: a managed store
    /// with `managed.replicas`, or an external Redis Cluster or primary with
    /// replicas.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub durability: Option<StoreDurability>,
    /// What the sidecar does when the store lost its state (default
    /// failClosed: consumption pauses until the reset is acknowledged with
    /// the annotation `idemq.dev/acknowledge-store-reset`).
    #[serde(default)]
    pub on_reset: OnReset,
    /// Hash tags (Redis Cluster slots) the consumer's keys spread over
    /// (default 1). Changing it forgets what was completed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1024))]
    pub partitions: Option<u16>,
    /// Peak messages per second, if known: sizes the store's hashes ahead of
    /// the observed rate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub expected_rate: Option<u32>,
}

impl StoreSpec {
    /// The external store, when the mode is external.
    pub fn external(&self) -> Option<&ExternalStore> {
        self.external
            .as_ref()
            .filter(|_| self.mode == StoreMode::External)
    }

    /// Whether the store is an external Redis Cluster.
    pub fn cluster(&self) -> bool {
        self.external().is_some_and(|e| e.cluster)
    }

    /// The primary's name, when the store is reached through Sentinels: an
    /// external store that names one, or a managed store with replicas.
    pub fn sentinel(&self) -> Option<&str> {
        if self.managed_replicas() > 0 {
            return Some(MANAGED_PRIMARY);
        }
        self.external()?.sentinel.as_deref()
    }

    /// Redis replicas beside the managed primary (0: one Redis, or an
    /// external store).
    pub fn managed_replicas(&self) -> u8 {
        match (&self.mode, &self.managed) {
            // The schema refuses replicas with ephemeral; an object stored
            // otherwise keeps its one ephemeral Redis.
            (StoreMode::Managed, Some(managed)) if !managed.ephemeral.unwrap_or(false) => {
                managed.replicas.unwrap_or(0)
            }
            _ => 0,
        }
    }
}

/// The name under which the Sentinels of a managed store monitor its
/// primary: each store has Sentinels of its own, so one name serves all.
pub const MANAGED_PRIMARY: &str = "idemq";

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum StoreDurability {
    /// A completion is acknowledged once the primary holds it.
    #[default]
    Local,
    /// Once a replica holds it too.
    Replicated,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum OnReset {
    #[default]
    FailClosed,
    Continue,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum AppendFsync {
    /// At most a second of completions lost on a crash of the node.
    #[default]
    Everysec,
    /// Nothing acknowledged is lost; every write waits for the disk.
    Always,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new(
    "!(has(self.cluster) && self.cluster && has(self.sentinel))"
).message("cluster and sentinel exclude each other: a Redis Cluster fails over by itself"))]
pub struct ExternalStore {
    /// Secret holding the Redis URL (`redis://` or `rediss://`, with its
    /// password); with `cluster`, seed nodes separated by commas; with
    /// `sentinel`, the Sentinels, likewise.
    pub secret_ref: SecretKeyRef,
    /// The Secret's URL names nodes of a Redis Cluster: the sidecar routes
    /// each call by slot and spreads the consumer's keys over
    /// `store.partitions` slots (set it to a few times the primaries).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cluster: bool,
    /// The name under which Redis Sentinels monitor the primary: the
    /// Secret's URL then names the Sentinels, and the sidecar follows the
    /// primary they name through failovers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub sentinel: Option<String>,
    /// Key in the same Secret holding the PEM certificate of a private CA
    /// that signed the `rediss://` server's certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub ca_key: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new("!has(self.replicas) || self.replicas == 0 || self.replicas >= 2").message("managed.replicas must be 0 (one Redis) or at least 2: each pod runs a Sentinel, and three Sentinels still hold their quorum of 2 when one pod is lost"))]
#[x_kube(validation = kube::core::Rule::new("!has(self.replicas) || self.replicas == 0 || !has(self.ephemeral) || !self.ephemeral").message("managed.replicas needs the durable store: remove ephemeral (each replica keeps its data on a claim of its own)"))]
pub struct ManagedStore {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Default: derived from `expectedKeys` (see the README).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Keep nothing on disk (a Deployment with an emptyDir, as before): a
    /// restart of the Redis pod forgets every completed key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ephemeral: Option<bool>,
    /// Size of the PersistentVolumeClaim (default 1Gi).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|k|M|G|T)?$"))]
    pub storage_size: Option<String>,
    /// StorageClass of the claim (default: the cluster's default class).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class_name: Option<String>,
    /// When the append-only file is flushed to disk (default everysec).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub append_fsync: Option<AppendFsync>,
    /// Completed keys retained at the peak (rate × retention; default
    /// 1,000,000): sizes the memory request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub expected_keys: Option<u64>,
    /// Redis replicas beside the primary (default 0: one Redis). 2 or more
    /// run a Sentinel in every pod, which promotes a replica when the primary
    /// is lost; the sidecars follow the primary they name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 6))]
    pub replicas: Option<u8>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct SidecarSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Log filter of the sidecar (default `info`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^(error|warn|info|debug|trace)$"))]
    pub log_level: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IdempotentConsumerStatus {
    /// The generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// StoreReady, BrokerBound, SidecarInjected and Ready.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// Hash of the sidecar configuration now injected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_hash: Option<String>,
    /// Digest of the broker bindings last declared (the plan and the
    /// connection Secret's content): they are declared again only when it
    /// changes, and on a periodic check.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub binding_hash: Option<String>,
    /// Hash of what decides where a message's key lives in the store (the
    /// key definition and the partitions): a change forgets what was completed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_definition: Option<String>,
    /// With injection: pod, the running pods that carry the sidecar.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub injected_pods: Option<i32>,
    /// With injection: pod, those of them whose sidecar runs the current
    /// configuration (`configHash`); the others take it when re-created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_pods: Option<i32>,
}

/// Condition types and reasons, as they appear in status and Events.
pub mod conditions {
    pub const STORE_READY: &str = "StoreReady";
    pub const BROKER_BOUND: &str = "BrokerBound";
    pub const SIDECAR_INJECTED: &str = "SidecarInjected";
    pub const READY: &str = "Ready";
    /// Whether the injected sidecars are ready, that is consuming: read from
    /// the pods, apart from Ready (which says idemq did its part).
    pub const SIDECARS_READY: &str = "SidecarsReady";

    pub const TARGET_NOT_FOUND: &str = "TargetNotFound";
    /// Another resource already serves the same workload.
    pub const TARGET_CONFLICT: &str = "TargetConflict";
    pub const SECRET_NOT_FOUND: &str = "SecretNotFound";
    pub const SECRET_KEY_MISSING: &str = "SecretKeyMissing";
    pub const INVALID_SPEC: &str = "InvalidSpec";
    /// The object does not deserialize into the resource's types.
    pub const MALFORMED: &str = "Malformed";
    pub const INJECTED: &str = "Injected";
    /// injection: pod: the webhook adds the sidecar to each new selected pod.
    pub const INJECTED_AT_CREATION: &str = "InjectedAtPodCreation";
    /// A legal setting the sidecar's `check-config` warns about (an Event).
    pub const CONFIG_WARNING: &str = "ConfigWarning";
    pub const BOUND: &str = "Bound";
    pub const BROKER_UNREACHABLE: &str = "BrokerUnreachable";
    pub const QUEUE_MISMATCH: &str = "QueueArgumentsMismatch";
    /// The dead-letter exchange exists with another type or other arguments.
    pub const EXCHANGE_MISMATCH: &str = "ExchangeMismatch";
    pub const EXCHANGE_NOT_FOUND: &str = "ExchangeNotFound";
    /// A Kafka topic to consume does not exist (its producers create it).
    pub const TOPIC_NOT_FOUND: &str = "TopicNotFound";
    /// The JetStream stream to consume does not exist (its producers create it).
    pub const STREAM_NOT_FOUND: &str = "StreamNotFound";
    /// The durable JetStream consumer exists with other settings.
    pub const CONSUMER_MISMATCH: &str = "ConsumerMismatch";
    /// The Pub/Sub subscription exists with other settings.
    pub const SUBSCRIPTION_MISMATCH: &str = "SubscriptionMismatch";
    /// The broker refused an operation to these credentials.
    pub const PERMISSION_DENIED: &str = "PermissionDenied";
    /// A CURVE key in the ZeroMQ Secret is not a Z85-encoded key.
    pub const CURVE_KEY_INVALID: &str = "CurveKeyInvalid";
    /// An object the operator would create (the ZeroMQ Service or
    /// NetworkPolicy) exists and belongs to someone else.
    pub const NAME_TAKEN: &str = "NameTaken";
    /// The broker refused the credentials.
    pub const BROKER_AUTH_FAILED: &str = "BrokerAuthenticationFailed";
    pub const BROKER_REFUSED: &str = "BrokerRefused";
    pub const REDIS_READY: &str = "RedisReady";
    pub const REDIS_NOT_READY: &str = "RedisNotReady";
    pub const EXTERNAL_SECRET_FOUND: &str = "ExternalSecretFound";
    pub const ALL_READY: &str = "AllReady";
    /// The store lost its state (its epoch marker changed).
    pub const STORE_RESET: &str = "StoreReset";
    pub const RESET_DETECTED: &str = "ResetDetected";
    pub const NO_RESET: &str = "NoReset";
    pub const RESET_ACKNOWLEDGED: &str = "ResetAcknowledged";
    /// Whether a policy change keeps what was completed.
    pub const STATE_PRESERVED: &str = "StatePreserved";
    pub const KEY_DEFINITION_CHANGED: &str = "KeyDefinitionChanged";
    pub const POLICY_COMPATIBLE: &str = "PolicyCompatible";
    pub const NOT_READY: &str = "NotReady";
    pub const PODS_READY: &str = "PodsReady";
    pub const PODS_NOT_READY: &str = "PodsNotReady";
    pub const NO_PODS: &str = "NoPods";
}
