//! The `IdempotentConsumer` custom resource: one dedup policy for one workload.
//!
//! The schema carries the validation the API server can do by itself (required
//! fields, enums, patterns, minimums, and CEL rules where a rule spans fields),
//! so that most bad input is refused at `kubectl apply` time.

use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

mod broker;
mod store;

pub use broker::*;
pub use store::*;

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
