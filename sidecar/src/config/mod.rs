//! The sidecar's configuration: one YAML document, read at start-up.
//!
//! The operator renders this type into a ConfigMap, so it is the contract between
//! the control plane and the data plane. Secrets never live here: the Redis and
//! broker URLs (which carry passwords) come from the environment, which the
//! operator fills from Kubernetes Secret references (see [`SecretEnv`]).
//!
//! Every field has a default where one makes sense; [`Config::validate`] returns
//! every problem at once, each named by its field path.

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

mod broker;
mod broker_checks;
mod validate;

pub use broker::*;
pub use validate::{redis_url_problem, ConfigError, Problem};

/// Environment variables the sidecar reads secrets from. A variable named
/// `<NAME>_FILE` is read as a path to a file holding the value instead.
pub struct SecretEnv;

impl SecretEnv {
    /// Redis URL, `redis://` or `rediss://`, possibly with a password.
    pub const REDIS_URL: &'static str = "IDEMQ_REDIS_URL";
    /// Redis password, when it is not in the URL.
    pub const REDIS_PASSWORD: &'static str = "IDEMQ_REDIS_PASSWORD";
    /// PEM certificates of a private CA that signed a `rediss://` server's
    /// certificate (usually given as `IDEMQ_REDIS_CA_FILE`).
    pub const REDIS_CA: &'static str = "IDEMQ_REDIS_CA";
    /// Broker URL, `amqp://` or `amqps://`, with credentials (JetStream's
    /// and MQTT's too; with ZeroMQ, that of the RabbitMQ dead letters go to).
    pub const BROKER_URL: &'static str = "IDEMQ_BROKER_URL";
    /// Kafka bootstrap servers, `host:port[,host:port…]` (the Kafka source's,
    /// or those of the Kafka a ZeroMQ endpoint's dead letters go to).
    pub const KAFKA_BOOTSTRAP_SERVERS: &'static str = "IDEMQ_KAFKA_BOOTSTRAP_SERVERS";
    /// Kafka SASL user name.
    pub const KAFKA_USERNAME: &'static str = "IDEMQ_KAFKA_USERNAME";
    /// Kafka SASL password.
    pub const KAFKA_PASSWORD: &'static str = "IDEMQ_KAFKA_PASSWORD";
    /// Broker user name, when it is not in the URL (JetStream, MQTT).
    pub const BROKER_USER: &'static str = "IDEMQ_BROKER_USER";
    /// Broker password, when it is not in the URL (JetStream, MQTT).
    pub const BROKER_PASSWORD: &'static str = "IDEMQ_BROKER_PASSWORD";
    /// NATS authentication token.
    pub const NATS_TOKEN: &'static str = "IDEMQ_NATS_TOKEN";
    /// NATS credentials (a `.creds` file's content: JWT and NKey seed).
    pub const NATS_CREDS: &'static str = "IDEMQ_NATS_CREDS";
    /// `host:port` of a Pub/Sub emulator; set, the Pub/Sub source talks to it
    /// without credentials (Google's clients read the same variable).
    pub const PUBSUB_EMULATOR_HOST: &'static str = "PUBSUB_EMULATOR_HOST";
    /// The ZeroMQ endpoint's CURVE secret key (Z85, 40 characters).
    pub const ZMQ_SERVER_SECRET_KEY: &'static str = "IDEMQ_ZMQ_SERVER_SECRET_KEY";
    /// The CURVE public keys (Z85) of the clients allowed to connect,
    /// separated by whitespace or commas (a Secret file: one per line).
    pub const ZMQ_CLIENT_KEYS: &'static str = "IDEMQ_ZMQ_CLIENT_KEYS";
}

/// The whole sidecar configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Config {
    /// Name of the consumer; it scopes keys in the store. The operator uses
    /// `<namespace>.<resource name>`, unique in a cluster.
    pub consumer: String,
    /// How the application receives messages.
    #[serde(default)]
    pub mode: Mode,
    #[serde(default)]
    pub store: StoreConfig,
    #[serde(default)]
    pub dedup: DedupConfig,
    /// The broker to consume from (pipeline mode only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub broker: Option<BrokerConfig>,
    /// Where messages are delivered (pipeline mode only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivery: Option<DeliveryConfig>,
    #[serde(default)]
    pub gate: GateConfig,
    #[serde(default)]
    pub admin: AdminConfig,
    /// OpenTelemetry traces of each message (off without an endpoint).
    #[serde(default, skip_serializing_if = "TracesConfig::is_default")]
    pub traces: TracesConfig,
    /// How long in-flight deliveries may take to finish after SIGTERM.
    #[serde(default = "defaults::shutdown_grace", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub shutdown_grace: Duration,
}

/// `pipeline`: the sidecar consumes the broker and POSTs each message to the app.
/// `gate`: the app consumes the broker itself and asks the sidecar's claim API.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub enum Mode {
    #[default]
    Pipeline,
    Gate,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StoreConfig {
    /// `redis` (production) or `memory` (embedded, one process only, lost on restart).
    #[serde(default)]
    pub kind: StoreKind,
    /// Redis URL without secrets; overridden by `IDEMQ_REDIS_URL`. With
    /// `cluster`, seed nodes of the Cluster separated by commas.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// The URL names nodes of a Redis Cluster: calls are routed by slot, and
    /// the consumer's keys spread over `partitions` slots.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cluster: bool,
    /// The name under which Redis Sentinels monitor the primary: the URL
    /// then names the Sentinels, separated by commas, and the store follows
    /// the primary they name through failovers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sentinel: Option<String>,
    /// Timeout of every store call.
    #[serde(default = "defaults::store_timeout", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub timeout: Duration,
    /// What to do while the store does not answer.
    #[serde(default)]
    pub unavailable: UnavailablePolicy,
    /// What to do when the store is found to have lost its state.
    #[serde(default)]
    pub on_reset: ResetPolicy,
    /// `replicated`: a completion is confirmed by a replica (`WAIT 1`) before
    /// the message is acknowledged to the broker.
    #[serde(default)]
    pub durability: Durability,
    /// Hash tags (Redis Cluster slots) the consumer's keys spread over.
    /// Changing it moves every key: what was completed is forgotten.
    #[serde(default = "defaults::partitions")]
    pub partitions: u16,
    /// Messages per second the consumer expects at its peak, if known: sizes
    /// the store's hashes before the rate has been observed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected_rate: Option<f64>,
}

/// `failClosed` stops consumption after a store reset until a person
/// acknowledges it; `continue` counts and reports it and goes on.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub enum ResetPolicy {
    Continue,
    #[default]
    FailClosed,
}

/// `local`: a completion is acknowledged once the primary holds it.
/// `replicated`: once a replica holds it too (`WAIT 1 <store.timeout>`), so a
/// failover loses no completion whose message was acknowledged; if no
/// replica confirms in time the message is acknowledged anyway and
/// `idemq_store_errors_total{kind="unreplicated"}` counts it.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub enum Durability {
    #[default]
    Local,
    Replicated,
}

#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub enum StoreKind {
    Redis,
    #[default]
    Memory,
}

/// `failClosed` stops consumption until the store is back (nothing is processed
/// unchecked); `passThrough` delivers without deduplication and counts it loudly.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub enum UnavailablePolicy {
    #[default]
    FailClosed,
    PassThrough,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DedupConfig {
    #[serde(default)]
    pub key: KeySource,
    /// What happens to a message that carries no key.
    #[serde(default)]
    pub missing_key: MissingKeyPolicy,
    /// Whether a payload fingerprint is kept to detect a key reused for another body.
    #[serde(default = "defaults::yes")]
    pub fingerprint: bool,
    /// How long a claim is held before another holder may take it over.
    #[serde(default = "defaults::lease", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub lease: Duration,
    /// How long a completed key is remembered.
    #[serde(default = "defaults::retention", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub retention: Duration,
    /// Delivery attempts before a message is dead-lettered.
    #[serde(default = "defaults::max_attempts")]
    pub max_attempts: u32,
}

/// Where the idempotency key of a message comes from.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", tag = "from", deny_unknown_fields)]
pub enum KeySource {
    /// The broker's own message id: the AMQP `message_id` property, the
    /// JetStream `Nats-Msg-Id` header (the producer's publish dedup id), the
    /// MQTT 5 correlation data (as text, or hex when it is not UTF-8), the
    /// Pub/Sub message id (catches redeliveries, not publisher retries).
    #[default]
    MessageId,
    /// A message header.
    Header { name: String },
    /// A Pub/Sub message attribute (catches publisher retries when producers
    /// set one per event).
    Attribute { name: String },
    /// A JSON pointer (RFC 6901) into a JSON body, e.g. `/order/id`.
    JsonPointer { pointer: String },
    /// A SHA-256 digest of the body.
    BodyHash,
    /// A CloudEvent's `source` and `id`, in binary mode (headers or
    /// attributes `ce-`, `ce_`, `cloudEvents_`) or structured mode (an
    /// `application/cloudevents+json` body).
    CloudEvent,
    /// The Kafka record key (often an entity id rather than one per event).
    RecordKey,
    /// The Kafka record's `topic/partition/offset`: catches exactly the
    /// redeliveries after rebalances and crashes, not producer retries.
    Coordinates,
}

#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub enum MissingKeyPolicy {
    /// Dead-letter the message with reason `missing_key`.
    #[default]
    DeadLetter,
    /// Use a digest of the body as the key.
    HashBody,
    /// Deliver without deduplication.
    PassThrough,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DeliveryConfig {
    /// The application's endpoint, on the loopback interface.
    pub url: String,
    #[serde(default = "defaults::delivery_timeout", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub timeout: Duration,
    /// First retry delay; doubled after each failure up to `maxBackoff`.
    #[serde(default = "defaults::initial_backoff", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub initial_backoff: Duration,
    #[serde(default = "defaults::max_backoff", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub max_backoff: Duration,
    /// How the sidecar tells that the application takes requests: checked
    /// before consuming at start, and after the circuit opened.
    #[serde(default)]
    pub readiness: ReadinessConfig,
    /// When failures of the application as a whole pause consumption.
    #[serde(default)]
    pub circuit_breaker: CircuitBreakerConfig,
    /// Bytes of message bodies held in flight at most (taken from the broker
    /// and not yet settled), whatever the broker. The operator sizes the
    /// sidecar's memory limit from it.
    #[serde(default = "defaults::max_in_flight_bytes")]
    pub max_in_flight_bytes: u64,
    /// The size of a typical message, when known: sources that must fix a
    /// prefetch before they see a message (RabbitMQ) start from it. Unset, they
    /// start with one message and size the prefetch from what they see.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected_message_bytes: Option<u64>,
}

/// `tcp`: a TCP connect to the delivery URL's port; `http`: a GET on `path`
/// of the delivery URL's host and port, which must answer 2xx.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ReadinessConfig {
    #[serde(default)]
    pub check: ReadinessCheck,
    /// Path of the HTTP check, e.g. `/ready`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Time between two checks while the application is not available.
    #[serde(default = "defaults::readiness_interval", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub interval: Duration,
}

#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub enum ReadinessCheck {
    #[default]
    Tcp,
    Http,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CircuitBreakerConfig {
    /// Distinct messages that fail in a row (no success between) with a
    /// timeout, 429, 502, 503 or 504 before the circuit opens. A refused
    /// connection opens it at once.
    #[serde(default = "defaults::circuit_failures")]
    pub failures: u32,
    /// How long the circuit stays open before the readiness check and one
    /// trial message probe the application.
    #[serde(default = "defaults::circuit_open_for", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub open_for: Duration,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GateConfig {
    /// Address of the claim API; loopback only, since it has no authentication.
    #[serde(default = "defaults::gate_listen")]
    #[schemars(with = "String")]
    pub listen: SocketAddr,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AdminConfig {
    /// Address of `/healthz`, `/readyz` and `/metrics`; reachable by the kubelet.
    #[serde(default = "defaults::admin_listen")]
    #[schemars(with = "String")]
    pub listen: SocketAddr,
}

/// Traces of each message through the sidecar, exported over OTLP/HTTP
/// (protobuf). Off unless an endpoint is set here or in the standard
/// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` / `OTEL_EXPORTER_OTLP_ENDPOINT`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TracesConfig {
    /// Base URL of an OTLP/HTTP receiver, e.g. `http://otel-collector:4318`;
    /// spans go to `<endpoint>/v1/traces`, as with `OTEL_EXPORTER_OTLP_ENDPOINT`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// A message that carries no `traceparent` starts a new trace. With
    /// false, such messages are not traced (only traces that producers
    /// started are continued).
    #[serde(default = "defaults::yes")]
    pub new_traces: bool,
    /// Record the idempotency key's value as the span attribute `idemq.key`.
    /// Keys are often business identifiers; off unless asked.
    #[serde(default)]
    pub record_key: bool,
}

impl Default for TracesConfig {
    fn default() -> Self {
        Self {
            endpoint: None,
            new_traces: true,
            record_key: false,
        }
    }
}

impl TracesConfig {
    fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

mod defaults {
    use std::net::SocketAddr;
    use std::time::Duration;

    pub fn yes() -> bool {
        true
    }
    pub fn shutdown_grace() -> Duration {
        Duration::from_secs(25)
    }
    pub fn partitions() -> u16 {
        1
    }
    pub fn store_timeout() -> Duration {
        Duration::from_millis(500)
    }
    pub fn lease() -> Duration {
        Duration::from_secs(30)
    }
    pub fn retention() -> Duration {
        Duration::from_secs(24 * 3600)
    }
    pub fn max_attempts() -> u32 {
        5
    }
    pub fn prefetch() -> u16 {
        100
    }
    pub fn max_in_flight() -> u32 {
        100
    }
    pub fn session_timeout() -> Duration {
        Duration::from_secs(45)
    }
    pub fn commit_interval() -> Duration {
        Duration::from_secs(1)
    }
    pub fn assignment_strategy() -> String {
        "cooperative-sticky".to_string()
    }
    pub fn max_ack_pending() -> u32 {
        100
    }
    pub fn max_outstanding_messages() -> u32 {
        100
    }
    pub fn max_outstanding_bytes() -> u64 {
        32 * 1024 * 1024
    }
    pub fn ack_wait() -> Duration {
        Duration::from_secs(30)
    }
    pub fn session_expiry() -> Duration {
        Duration::from_secs(3600)
    }
    pub fn receive_maximum() -> u16 {
        100
    }
    pub fn dead_letter_exchange() -> String {
        "idemq.dlx".to_string()
    }
    pub fn delivery_timeout() -> Duration {
        Duration::from_secs(10)
    }
    pub fn initial_backoff() -> Duration {
        Duration::from_millis(200)
    }
    pub fn max_backoff() -> Duration {
        Duration::from_secs(30)
    }
    pub fn readiness_interval() -> Duration {
        Duration::from_secs(1)
    }
    pub fn circuit_failures() -> u32 {
        5
    }
    pub fn circuit_open_for() -> Duration {
        Duration::from_secs(2)
    }
    pub fn max_in_flight_bytes() -> u64 {
        32 * 1024 * 1024
    }
    pub fn gate_listen() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 7071))
    }
    pub fn admin_listen() -> SocketAddr {
        SocketAddr::from(([0, 0, 0, 0], 9090))
    }
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            kind: StoreKind::default(),
            url: None,
            cluster: false,
            sentinel: None,
            timeout: defaults::store_timeout(),
            unavailable: UnavailablePolicy::default(),
            on_reset: ResetPolicy::default(),
            durability: Durability::default(),
            partitions: defaults::partitions(),
            expected_rate: None,
        }
    }
}

impl Default for DedupConfig {
    fn default() -> Self {
        Self {
            key: KeySource::default(),
            missing_key: MissingKeyPolicy::default(),
            fingerprint: true,
            lease: defaults::lease(),
            retention: defaults::retention(),
            max_attempts: defaults::max_attempts(),
        }
    }
}

impl Default for ReadinessConfig {
    fn default() -> Self {
        Self {
            check: ReadinessCheck::default(),
            path: None,
            interval: defaults::readiness_interval(),
        }
    }
}

impl Default for CircuitBreakerConfig {
    fn default() -> Self {
        Self {
            failures: defaults::circuit_failures(),
            open_for: defaults::circuit_open_for(),
        }
    }
}

impl DeliveryConfig {
    /// A delivery to `url` with every other setting at its default.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            timeout: defaults::delivery_timeout(),
            initial_backoff: defaults::initial_backoff(),
            max_backoff: defaults::max_backoff(),
            readiness: ReadinessConfig::default(),
            circuit_breaker: CircuitBreakerConfig::default(),
            max_in_flight_bytes: defaults::max_in_flight_bytes(),
            expected_message_bytes: None,
        }
    }
}

impl Default for GateConfig {
    fn default() -> Self {
        Self {
            listen: defaults::gate_listen(),
        }
    }
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: defaults::admin_listen(),
        }
    }
}

const MIB: u64 = 1024 * 1024;

/// The memory limit a sidecar with this byte budget needs: its own working
/// set (about 30 MiB under load) with margin, plus twice the budget, since a
/// body is held once in the broker client's buffer or the request and one more
/// message may be arriving beyond the budget, with the allocator's slack. The
/// operator sets the container's limit from it; 128 MiB for the default budget.
pub fn memory_limit_bytes(max_in_flight_bytes: u64) -> u64 {
    64 * MIB + 2 * max_in_flight_bytes
}

/// The memory request that goes with [`memory_limit_bytes`]: what the sidecar
/// uses with the budget full; 64 MiB for the default budget.
pub fn memory_request_bytes(max_in_flight_bytes: u64) -> u64 {
    32 * MIB + max_in_flight_bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    const PIPELINE: &str = r#"
consumer: orders
store:
  kind: redis
  url: redis://127.0.0.1:6379
dedup:
  key:
    from: jsonPointer
    pointer: /order/id
  retention: 24h
  lease: 30s
broker:
  rabbitmq:
    queue: orders
    prefetch: 200
delivery:
  url: http://127.0.0.1:8080/messages
"#;

    #[test]
    fn pipeline_config_parses_with_defaults() {
        let config = Config::from_yaml(PIPELINE).expect("valid");
        assert_eq!(config.mode, Mode::Pipeline);
        assert_eq!(config.store.kind, StoreKind::Redis);
        assert_eq!(
            config.dedup.key,
            KeySource::JsonPointer {
                pointer: "/order/id".into()
            }
        );
        assert_eq!(config.dedup.retention, Duration::from_secs(86400));
        assert_eq!(config.dedup.missing_key, MissingKeyPolicy::DeadLetter);
        assert_eq!(
            config
                .broker
                .as_ref()
                .and_then(|b| b.rabbitmq.as_ref())
                .map(|r| r.prefetch),
            Some(200)
        );
        assert_eq!(config.shutdown_grace, Duration::from_secs(25));
    }

    #[test]
    fn a_cluster_store_takes_seed_nodes_and_warns_of_one_partition() {
        let cluster = PIPELINE.replace(
            "  url: redis://127.0.0.1:6379",
            "  url: redis://10.0.0.1:6379, rediss://10.0.0.2:6379\n  cluster: true",
        );
        let config = Config::from_yaml(&cluster).expect("a list of seed nodes is valid");
        assert!(config.store.cluster);
        assert!(config
            .warnings()
            .iter()
            .any(|w| w.field == "store.partitions"));
        let spread = cluster.replace("  cluster: true", "  cluster: true\n  partitions: 12");
        let config = Config::from_yaml(&spread).expect("valid");
        assert!(config
            .warnings()
            .iter()
            .all(|w| w.field != "store.partitions"));

        let list_without_cluster = cluster.replace("  cluster: true\n", "");
        let err = Config::from_yaml(&list_without_cluster).expect_err("a list needs cluster");
        assert!(err.to_string().contains("store.url"), "{err}");
        let bad_seed = cluster.replace("rediss://10.0.0.2", "http://10.0.0.2");
        let err = Config::from_yaml(&bad_seed).expect_err("every seed is a redis URL");
        assert!(err.to_string().contains("store.url"), "{err}");
    }

    #[test]
    fn yaml_round_trips() {
        let config = Config::from_yaml(PIPELINE).expect("valid");
        assert_eq!(Config::from_yaml(&config.to_yaml()).expect("valid"), config);
    }

    #[test]
    fn every_problem_is_reported_with_its_field() {
        let text = r#"
consumer: Orders
mode: pipeline
dedup:
  maxAttempts: 0
  key:
    from: header
    name: ""
gate:
  listen: 0.0.0.0:7071
"#;
        let Err(ConfigError::Invalid(problems)) = Config::from_yaml(text) else {
            panic!("expected invalid config");
        };
        let fields: Vec<_> = problems.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "consumer",
                "dedup.maxAttempts",
                "dedup.key.name",
                "broker",
                "delivery",
                "gate.listen"
            ]
        );
    }

    #[test]
    fn unknown_field_is_rejected_by_name() {
        let err = Config::from_yaml("consumer: a\nmode: gate\nretension: 1h\n").unwrap_err();
        assert!(err.to_string().contains("retension"), "{err}");
    }

    #[test]
    fn a_broker_names_exactly_one_kind() {
        let text = "consumer: a\nbroker: {}\ndelivery:\n  url: http://127.0.0.1:8080/\n";
        let Err(ConfigError::Invalid(problems)) = Config::from_yaml(text) else {
            panic!("expected invalid config");
        };
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].field, "broker");
        assert!(
            problems[0].message.contains("exactly one") && problems[0].message.contains("rabbitmq"),
            "{}",
            problems[0]
        );
        let config = Config::from_yaml(PIPELINE).expect("valid");
        assert!(matches!(
            config.broker.as_ref().and_then(|b| b.kind()),
            Some(BrokerKind::RabbitMq(r)) if r.queue == "orders"
        ));
    }

    #[test]
    fn an_mqtt_broker_names_its_problems() {
        let text = "consumer: a\ndedup:\n  key:\n    from: messageId\nbroker:\n  mqtt:\n    protocol: v3.1.1\n    topics: [$share/g/orders]\n    sharedGroup: a/b\n    deadLetterTopic: dead/#\n    url: amqp://broker\ndelivery:\n  url: http://127.0.0.1:8080/\n";
        let Err(ConfigError::Invalid(problems)) = Config::from_yaml(text) else {
            panic!("expected invalid config");
        };
        let fields: Vec<&str> = problems.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "broker.mqtt.topics",
                "broker.mqtt.deadLetterTopic",
                "broker.mqtt.sharedGroup",
                "broker.mqtt.url",
                "dedup.key.from"
            ],
            "{problems:?}"
        );
        assert!(problems[4].message.contains("3.1.1"), "{}", problems[4]);
        let valid = "consumer: a\nbroker:\n  mqtt:\n    topics: [orders/+]\n    deadLetterTopic: orders/dead\ndelivery:\n  url: http://127.0.0.1:8080/\n";
        let config = Config::from_yaml(valid).expect("valid");
        assert!(matches!(
            config.broker.as_ref().and_then(|b| b.kind()),
            Some(BrokerKind::Mqtt(m)) if m.protocol == MqttProtocol::V5 && m.receive_maximum == 100
        ));
    }

    const KAFKA: &str = r#"
consumer: orders
dedup:
  key:
    from: recordKey
broker:
  kafka:
    topics: [orders]
    groupId: shop.orders
    ordering: perKey
    sessionTimeout: 6s
delivery:
  url: http://127.0.0.1:8080/messages
"#;

    #[test]
    fn kafka_config_parses_with_defaults() {
        let config = Config::from_yaml(KAFKA).expect("valid");
        let Some(BrokerKind::Kafka(kafka)) = config.broker.as_ref().and_then(|b| b.kind()) else {
            panic!("a kafka broker");
        };
        assert_eq!(kafka.topics, ["orders"]);
        assert_eq!(kafka.max_in_flight, 100);
        assert_eq!(kafka.ordering, Ordering::PerKey);
        assert_eq!(kafka.session_timeout, Duration::from_secs(6));
        assert_eq!(kafka.auto_offset_reset, OffsetReset::Earliest);
        assert_eq!(kafka.assignment_strategy, "cooperative-sticky");
        assert_eq!(Config::from_yaml(&config.to_yaml()).expect("valid"), config);
    }

    #[test]
    fn kafka_config_new_has_the_parsed_defaults() {
        let parsed: KafkaConfig =
            serde_yaml::from_str("topics: [orders]\ngroupId: g\n").expect("parses");
        assert_eq!(KafkaConfig::new(vec!["orders".into()], "g"), parsed);
    }

    #[test]
    fn kafka_problems_are_named_by_field() {
        let text = r#"
consumer: orders
broker:
  kafka:
    topics: ["bad topic"]
    groupId: ""
    maxInFlight: 0
    securityProtocol: saslSsl
delivery:
  url: http://127.0.0.1:8080/messages
"#;
        let Err(ConfigError::Invalid(problems)) = Config::from_yaml(text) else {
            panic!("expected invalid config");
        };
        let fields: Vec<_> = problems.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "broker.kafka.topics",
                "broker.kafka.groupId",
                "broker.kafka.maxInFlight",
                "broker.kafka.saslMechanism",
                "dedup.key.from"
            ]
        );
        let both = KAFKA.replace("broker:\n", "broker:\n  rabbitmq:\n    queue: q\n");
        let Err(ConfigError::Invalid(problems)) = Config::from_yaml(&both) else {
            panic!("two brokers must be refused");
        };
        assert!(
            problems
                .iter()
                .any(|p| p.field == "broker" && p.message.contains("rabbitmq, kafka")),
            "{problems:?}"
        );
    }

    #[test]
    fn a_jetstream_broker_is_validated_and_alone() {
        let text = "consumer: a\nbroker:\n  jetstream:\n    url: http://nats:4222\n    stream: ORDERS\n    consumer: \"\"\n    ackWait: 10ms\n    deadLetterSubject: orders.dead\ndelivery:\n  url: http://127.0.0.1:8080/\n";
        let Err(ConfigError::Invalid(problems)) = Config::from_yaml(text) else {
            panic!("expected invalid config");
        };
        let fields: Vec<_> = problems.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "broker.jetstream.consumer",
                "broker.jetstream.ackWait",
                "broker.jetstream.url"
            ]
        );
        let both = format!(
            "{PIPELINE}  jetstream:\n    stream: S\n    consumer: c\n    deadLetterSubject: d\n"
        )
        .replace("delivery:\n  url: http://127.0.0.1:8080/messages\n", "")
            + "delivery:\n  url: http://127.0.0.1:8080/messages\n";
        let Err(ConfigError::Invalid(problems)) = Config::from_yaml(&both) else {
            panic!("two broker kinds must be refused");
        };
        assert_eq!(problems[0].field, "broker");
        let ok = "consumer: a\nbroker:\n  jetstream:\n    stream: ORDERS\n    consumer: billing\n    deadLetterSubject: orders.dead\ndelivery:\n  url: http://127.0.0.1:8080/\n";
        let config = Config::from_yaml(ok).expect("valid");
        let Some(BrokerKind::JetStream(js)) = config.broker.as_ref().and_then(|b| b.kind()) else {
            panic!("a jetstream broker");
        };
        assert_eq!(
            (js.max_ack_pending, js.ack_wait, js.max_deliver),
            (100, Duration::from_secs(30), None)
        );
    }

    #[test]
    fn a_pubsub_broker_is_validated_with_its_own_keys() {
        let bad = "consumer: a\ndedup:\n  key:\n    from: header\n    name: x\nbroker:\n  pubsub:\n    project: My_Project\n    subscription: projects/p/subscriptions/s\n    maxOutstandingMessages: 0\n    deadLetterTopic: goog-dead\n    credentialsFile: key.json\ndelivery:\n  url: http://127.0.0.1:8080/\n";
        let Err(ConfigError::Invalid(problems)) = Config::from_yaml(bad) else {
            panic!("expected invalid config");
        };
        let fields: Vec<_> = problems.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "broker.pubsub.project",
                "broker.pubsub.subscription",
                "broker.pubsub.deadLetterTopic",
                "broker.pubsub.maxOutstandingMessages",
                "broker.pubsub.credentialsFile",
                "dedup.key.from",
            ]
        );
        let ok = "consumer: a\ndedup:\n  key:\n    from: attribute\n    name: event-id\nbroker:\n  pubsub:\n    project: shop-prod\n    subscription: orders-billing\ndelivery:\n  url: http://127.0.0.1:8080/\n";
        let config = Config::from_yaml(ok).expect("valid");
        let Some(BrokerKind::PubSub(pubsub)) = config.broker.as_ref().and_then(|b| b.kind()) else {
            panic!("a pubsub broker");
        };
        assert_eq!(*pubsub, PubSubConfig::new("shop-prod", "orders-billing"));
        let attribute_elsewhere = "consumer: a\ndedup:\n  key:\n    from: attribute\n    name: id\nbroker:\n  rabbitmq:\n    queue: q\ndelivery:\n  url: http://127.0.0.1:8080/\n";
        let Err(ConfigError::Invalid(problems)) = Config::from_yaml(attribute_elsewhere) else {
            panic!("attribute is a Pub/Sub key");
        };
        assert_eq!(problems[0].field, "dedup.key.from");
    }

    #[test]
    fn gate_mode_needs_no_broker() {
        let config = Config::from_yaml("consumer: a\nmode: gate\n").expect("valid");
        assert_eq!(config.store.kind, StoreKind::Memory);
    }
}
