//! Broker bindings: what a consumer needs declared on its broker (queues,
//! bindings, dead-letter routes), behind one [`Binder`] trait.
//!
//! Each broker lives in its own module (`rabbitmq.rs`, `kafka.rs`,
//! `jetstream.rs`, `mqtt.rs`, `pubsub.rs`, `zeromq.rs`) and
//! contributes a variant of [`Plan`], built from the resource's spec by
//! [`Plan::of`], and of [`Connection`], read from the resource's Secret by
//! [`Connection::from_secret`]. [`Brokers`] is the production binder: it
//! sends each plan to its broker's binder. Controller tests substitute a fake.
//!
//! Every broker keeps one [`pool::Pool`] of clients, one per endpoint and
//! credentials, so the connections the operator holds are bounded by
//! configuration, not by the number of resources.
//!
//! Declarations are idempotent. A broker that refuses one (an existing queue
//! declared with other arguments, a user without permissions) is reported to
//! the user, not fought: redeclaring would mean deleting their messages.

pub mod jetstream;
pub mod kafka;
pub mod mqtt;
pub mod pool;
pub mod pubsub;
pub mod rabbitmq;
pub mod zeromq;

use std::collections::BTreeMap;

use k8s_openapi::ByteString;

use crate::crd::{BrokerKind, IdempotentConsumer};

/// What to declare for one consumer, on the broker its spec names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    RabbitMq(rabbitmq::Plan),
    Kafka(kafka::Plan),
    JetStream(jetstream::Plan),
    Mqtt(mqtt::Plan),
    PubSub(pubsub::Plan),
    ZeroMq(zeromq::Plan),
}

impl Plan {
    /// `None` when the spec does not name exactly one broker (validation
    /// refuses such a spec before anything is bound).
    pub fn of(ic: &IdempotentConsumer) -> Option<Self> {
        Some(match ic.spec.broker.kind()? {
            BrokerKind::RabbitMq(rabbit) => Plan::RabbitMq(rabbitmq::Plan::of(rabbit)),
            BrokerKind::Kafka(k) => Plan::Kafka(kafka::Plan::of(k)),
            BrokerKind::JetStream(js) => Plan::JetStream(jetstream::Plan::of(ic, js)?),
            BrokerKind::Mqtt(m) => Plan::Mqtt(mqtt::Plan::of(ic, m)),
            BrokerKind::PubSub(ps) => Plan::PubSub(pubsub::Plan::of(ps)?),
            BrokerKind::ZeroMq(z) => Plan::ZeroMq(zeromq::Plan::of(ic, z)),
        })
    }

    /// A sentence for the status: what is declared once bound.
    pub fn describe(&self) -> String {
        match self {
            Plan::RabbitMq(p) => format!(
                "queue {} and dead-letter queue {} are declared",
                p.queue, p.dead_letter_queue
            ),
            Plan::Kafka(p) => {
                let plural = |n: usize, one: &'static str, many: &'static str| {
                    if n == 1 {
                        one
                    } else {
                        many
                    }
                };
                format!(
                    "{} {} {} and dead-letter {} {} {} present",
                    plural(p.topics.len(), "topic", "topics"),
                    p.topics.join(", "),
                    plural(p.topics.len(), "exists", "exist"),
                    plural(p.dead_letter_topics.len(), "topic", "topics"),
                    p.dead_letter_topics.join(", "),
                    plural(p.dead_letter_topics.len(), "is", "are"),
                )
            }
            Plan::JetStream(p) => p.describe(),
            Plan::Mqtt(p) => p.describe(),
            Plan::PubSub(p) => p.describe(),
            Plan::ZeroMq(p) => p.describe(),
        }
    }
}

/// A broker's endpoint and credentials, read from the resource's Secret.
/// Secret: its `Debug` shows no value, and nothing prints it.
#[derive(Clone, PartialEq, Eq)]
pub enum Connection {
    /// An AMQP URL with its credentials.
    RabbitMq {
        url: String,
    },
    Kafka(kafka::Connection),
    JetStream(jetstream::Connection),
    Mqtt(mqtt::Connection),
    PubSub(pubsub::Connection),
    ZeroMq(zeromq::Connection),
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Connection::RabbitMq { .. } => f.write_str("Connection::RabbitMq(..)"),
            Connection::Kafka(_) => f.write_str("Connection::Kafka(..)"),
            Connection::JetStream(_) => f.write_str("Connection::JetStream(..)"),
            Connection::Mqtt(_) => f.write_str("Connection::Mqtt(..)"),
            Connection::PubSub(_) => f.write_str("Connection::PubSub(..)"),
            Connection::ZeroMq(_) => f.write_str("Connection::ZeroMq(..)"),
        }
    }
}

impl Connection {
    /// The name of the Secret `ic`'s broker connection comes from; none
    /// for a ZeroMQ endpoint without CURVE.
    pub fn secret_name(ic: &IdempotentConsumer) -> Option<&str> {
        Some(match ic.spec.broker.kind()? {
            BrokerKind::RabbitMq(rabbit) => &rabbit.connection_secret_ref.name,
            BrokerKind::Kafka(kafka) => &kafka.connection_secret_ref.name,
            BrokerKind::JetStream(js) => &js.connection_secret_ref.name,
            BrokerKind::Mqtt(m) => &m.connection_secret_ref.name,
            BrokerKind::PubSub(ps) => &ps.credentials_secret_ref.name,
            BrokerKind::ZeroMq(z) => &z.curve.as_ref()?.secret_name,
        })
    }

    /// The connection of a broker that needs no Secret: a ZeroMQ endpoint
    /// with `plain: true`.
    pub fn without_secret(ic: &IdempotentConsumer) -> Option<Self> {
        match ic.spec.broker.kind()? {
            BrokerKind::ZeroMq(z) if z.curve.is_none() => {
                Some(Connection::ZeroMq(zeromq::Connection::Plain))
            }
            _ => None,
        }
    }

    /// The connection from the Secret's `data`, or what is wrong with it: a
    /// key the spec needs and the Secret lacks, or one whose value cannot serve.
    pub fn from_secret(
        ic: &IdempotentConsumer,
        data: &BTreeMap<String, ByteString>,
    ) -> Result<Self, SecretProblem> {
        if let Some(BrokerKind::ZeroMq(z)) = ic.spec.broker.kind() {
            let value = |key: &str| secret_value(data, key).ok();
            return zeromq::Connection::from_secret(z, value).map(Connection::ZeroMq);
        }
        Self::from_values(ic, data).map_err(SecretProblem::Missing)
    }

    /// The connection of a broker whose Secret only needs its keys present;
    /// `Err(key)` names one it lacks.
    fn from_values(
        ic: &IdempotentConsumer,
        data: &BTreeMap<String, ByteString>,
    ) -> Result<Self, String> {
        let value = |key: &str| secret_value(data, key);
        match ic.spec.broker.kind() {
            Some(BrokerKind::RabbitMq(rabbit)) => Ok(Connection::RabbitMq {
                url: value(&rabbit.connection_secret_ref.key)?,
            }),
            Some(BrokerKind::Kafka(k)) => {
                Ok(Connection::Kafka(kafka::Connection::from_secret(k, value)?))
            }
            Some(BrokerKind::JetStream(js)) => Ok(Connection::JetStream(
                jetstream::Connection::from_secret(js, value)?,
            )),
            Some(BrokerKind::Mqtt(m)) => {
                let (username, password) = match m.auth {
                    crate::crd::MqttAuth::None => (None, None),
                    crate::crd::MqttAuth::UserPassword => (
                        Some(value(crate::labels::MQTT_USERNAME_KEY)?),
                        Some(value(crate::labels::MQTT_PASSWORD_KEY)?),
                    ),
                };
                Ok(Connection::Mqtt(mqtt::Connection {
                    url: value(&m.connection_secret_ref.key)?,
                    username,
                    password,
                    ca_pem: m.ca_key.as_deref().map(value).transpose()?,
                }))
            }
            Some(BrokerKind::PubSub(ps)) => Ok(Connection::PubSub(
                pubsub::Connection::from_secret(ps, value)?,
            )),
            Some(BrokerKind::ZeroMq(_)) | None => Err("(no broker in the spec)".to_string()),
        }
    }

    /// The bytes that tell two connections apart, credentials included: only
    /// ever digested.
    pub fn identity(&self) -> Vec<u8> {
        match self {
            Connection::RabbitMq { url } => url.as_bytes().to_vec(),
            Connection::Kafka(k) => kafka::Connection::identity(k),
            Connection::JetStream(c) => c.identity(),
            Connection::Mqtt(m) => m.identity(),
            Connection::PubSub(p) => p.identity(),
            Connection::ZeroMq(z) => z.identity(),
        }
    }
}

/// The value of `key` in a Secret's `data`, as text; `Err(key)` names a key
/// the Secret lacks. One lookup for every connection read from a Secret (the
/// consumed broker's and a ZeroMQ endpoint's dead-letter broker's), so that
/// they decode values and name missing keys alike.
pub fn secret_value(data: &BTreeMap<String, ByteString>, key: &str) -> Result<String, String> {
    data.get(key)
        .map(|v| String::from_utf8_lossy(&v.0).into_owned())
        .ok_or_else(|| key.to_string())
}

/// Whether the queues go with the resource when it is deleted. Kafka topics,
/// JetStream streams and Pub/Sub topics never do: the consumed ones are the
/// producers', and dead letters are kept (so are the durable JetStream
/// consumer and the Pub/Sub subscription).
pub fn delete_on_cleanup(ic: &IdempotentConsumer) -> bool {
    matches!(ic.spec.broker.kind(), Some(BrokerKind::RabbitMq(r)) if r.delete_on_cleanup)
}

/// What is wrong with a connection Secret's content; never quotes a value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretProblem {
    /// The Secret lacks this key.
    Missing(String),
    /// This key's value cannot serve; the sentence says why.
    Invalid { key: String, problem: &'static str },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BindError {
    #[error("the broker is unreachable: {0}")]
    Unreachable(String),
    /// The broker refused the credentials.
    #[error("the broker refused the credentials: {0}")]
    AuthenticationFailed(String),
    /// The queue (or topic, stream) exists with other arguments.
    #[error("the queue exists with other arguments: {0}")]
    ArgumentsMismatch(String),
    /// An exchange idemq declares (the dead-letter exchange) exists with
    /// another type or other arguments.
    #[error("exchange {0:?} exists with another type or other arguments; delete it or name another `deadLetterExchange`: {1}")]
    ExchangeMismatch(String, String),
    /// Any other refusal (a user without permissions, …).
    #[error("the broker refused a declaration: {0}")]
    Refused(String),
    /// The exchange to bind to does not exist. It belongs to its producers:
    /// idemq binds to it but does not guess its type to declare it.
    #[error("exchange {0:?} does not exist; declare it (its producers own it) or remove `exchange` from the spec")]
    ExchangeNotFound(String),
    /// A topic to consume does not exist. It belongs to its producers: idemq
    /// does not create it (a typo would otherwise become a new, empty topic).
    #[error("{}", topic_not_found(.0))]
    TopicNotFound(Vec<String>),
    /// The JetStream stream to consume does not exist. It belongs to its
    /// producers: idemq does not create it.
    #[error("stream {0:?} does not exist; create it (its producers own it) or correct `stream`")]
    StreamNotFound(String),
    /// The durable JetStream consumer exists with other settings: a
    /// sentence naming each.
    #[error("{0}")]
    ConsumerMismatch(String),
    /// The Pub/Sub topic to consume (its full name) does not exist. It
    /// belongs to its producers: idemq does not create it.
    #[error("topic {0:?} does not exist; create it (its producers own it) or correct `topic`")]
    PubSubTopicNotFound(String),
    /// The Pub/Sub subscription exists with other settings: a sentence
    /// naming each.
    #[error("{0}")]
    SubscriptionMismatch(String),
    /// The credentials are valid and may not do what the binding needs.
    #[error("the broker denied the credentials an operation: {0}")]
    PermissionDenied(String),
}

/// The sentence of a [`BindError::TopicNotFound`], for one topic or several.
fn topic_not_found(topics: &[String]) -> String {
    let names = topics
        .iter()
        .map(|t| format!("{t:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    if topics.len() == 1 {
        format!("topic {names} does not exist (or the user may not describe it); create it (its producers own it) or correct `topics`")
    } else {
        format!("topics {names} do not exist (or the user may not describe them); create them (their producers own them) or correct `topics`")
    }
}

/// Declares and removes bindings; a trait so controller tests can substitute it.
///
/// `connection` comes from the resource's Secret; it carries credentials,
/// which must never appear in an error, a log line or a status.
#[async_trait::async_trait]
pub trait Binder: Send + Sync {
    async fn bind(&self, connection: &Connection, plan: &Plan) -> Result<(), BindError>;
    async fn delete_queues(&self, connection: &Connection, plan: &Plan) -> Result<(), BindError>;
}

/// The production binder: each plan goes to its broker.
#[derive(Default)]
pub struct Brokers {
    pub rabbitmq: rabbitmq::Amqp,
    pub kafka: kafka::Kafka,
    pub jetstream: jetstream::JetStream,
    pub pubsub: pubsub::PubSub,
}

impl Brokers {
    /// Each broker's pool gets `pool`.
    pub fn new(pool: pool::PoolConfig) -> Self {
        Self {
            rabbitmq: rabbitmq::Amqp::new(pool),
            kafka: kafka::Kafka::new(pool),
            jetstream: jetstream::JetStream::new(pool),
            pubsub: pubsub::PubSub::new(pool, pubsub::emulator_host_from_env()),
        }
    }
}

/// A plan and a connection of two brokers: both come from one spec, so
/// this is a bug, said rather than panicked on.
fn mismatch() -> BindError {
    BindError::Refused("the connection Secret was read for another broker kind".into())
}

#[async_trait::async_trait]
impl Binder for Brokers {
    async fn bind(&self, connection: &Connection, plan: &Plan) -> Result<(), BindError> {
        match (plan, connection) {
            (Plan::RabbitMq(p), Connection::RabbitMq { url }) => self.rabbitmq.bind(url, p).await,
            (Plan::Kafka(p), Connection::Kafka(c)) => self.kafka.bind(c, p).await,
            (Plan::JetStream(p), Connection::JetStream(c)) => self.jetstream.bind(c, p).await,
            (Plan::Mqtt(p), Connection::Mqtt(c)) => mqtt::bind(c, p).await,
            (Plan::PubSub(p), Connection::PubSub(c)) => self.pubsub.bind(c, p).await,
            // No broker: the endpoint's Service is the binding (the controller
            // applies it), and the keys were checked when read.
            (Plan::ZeroMq(_), Connection::ZeroMq(_)) => Ok(()),
            _ => Err(mismatch()),
        }
    }

    async fn delete_queues(&self, connection: &Connection, plan: &Plan) -> Result<(), BindError> {
        match (plan, connection) {
            (Plan::RabbitMq(p), Connection::RabbitMq { url }) => {
                self.rabbitmq.delete_queues(url, p).await
            }
            // Nothing to delete (see `delete_on_cleanup`).
            (Plan::Kafka(_), Connection::Kafka(_))
            | (Plan::JetStream(_), Connection::JetStream(_))
            | (Plan::Mqtt(_), Connection::Mqtt(_))
            | (Plan::PubSub(_), Connection::PubSub(_))
            | (Plan::ZeroMq(_), Connection::ZeroMq(_)) => Ok(()),
            _ => Err(mismatch()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{KafkaSecurityProtocol, SaslMechanism};
    use crate::render::sample;

    fn data(pairs: &[(&str, &str)]) -> BTreeMap<String, ByteString> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())))
            .collect()
    }

    #[test]
    fn a_kafka_connection_takes_the_keys_its_spec_needs_and_names_a_missing_one() {
        let mut ic = sample::kafka_policy();
        let plain = Connection::from_secret(&ic, &data(&[("bootstrapServers", "k:9092")]));
        let Ok(Connection::Kafka(c)) = plain else {
            panic!("a Kafka connection: {plain:?}");
        };
        assert_eq!(
            (c.bootstrap_servers.as_str(), c.username, c.password),
            ("k:9092", None, None)
        );
        let kafka = ic.spec.broker.kafka.as_mut().expect("kafka");
        kafka.security_protocol = KafkaSecurityProtocol::SaslSsl;
        kafka.sasl_mechanism = Some(SaslMechanism::Plain);
        kafka.connection_secret_ref.ca_key = Some("ca.pem".into());
        let without_password = data(&[("bootstrapServers", "k:9092"), ("username", "u")]);
        assert_eq!(
            Connection::from_secret(&ic, &without_password),
            Err(SecretProblem::Missing("password".into()))
        );
        let without_ca = data(&[
            ("bootstrapServers", "k:9092"),
            ("username", "u"),
            ("password", "p4ss"),
        ]);
        assert_eq!(
            Connection::from_secret(&ic, &without_ca),
            Err(SecretProblem::Missing("ca.pem".into()))
        );
        let mut full = without_ca;
        full.insert("ca.pem".into(), ByteString(b"PEM".to_vec()));
        let connection = Connection::from_secret(&ic, &full).expect("complete");
        assert!(
            !format!("{connection:?}").contains("p4ss"),
            "Debug shows no secret"
        );
        assert_eq!(Connection::secret_name(&ic), Some("kafka-orders"));
    }

    #[test]
    fn an_mqtt_resource_subscribes_shared_and_reads_credentials_only_with_user_password() {
        let mut ic = sample::mqtt_policy();
        let Some(Plan::Mqtt(plan)) = Plan::of(&ic) else {
            panic!("an MQTT plan");
        };
        assert_eq!(plan.filters, ["$share/shop.orders/devices/+/readings"]);
        let url_only = data(&[("url", "mqtt://broker:1883")]);
        let Ok(Connection::Mqtt(c)) = Connection::from_secret(&ic, &url_only) else {
            panic!("an MQTT connection");
        };
        assert_eq!((c.username, c.password), (None, None));
        ic.spec.broker.mqtt.as_mut().expect("mqtt").auth = crate::crd::MqttAuth::UserPassword;
        let without_password = data(&[("url", "mqtt://broker:1883"), ("username", "u")]);
        assert_eq!(
            Connection::from_secret(&ic, &without_password),
            Err(SecretProblem::Missing("password".into()))
        );
        let full = data(&[
            ("url", "mqtt://broker:1883"),
            ("username", "u"),
            ("password", "p4ss"),
        ]);
        let connection = Connection::from_secret(&ic, &full).expect("complete");
        assert!(!format!("{connection:?}").contains("p4ss"));
        assert!(!delete_on_cleanup(&ic));

        // A CA bundle named by caKey: the connection check uses it, and a
        // Secret without it names the key.
        ic.spec.broker.mqtt.as_mut().expect("mqtt").ca_key = Some("ca.pem".into());
        assert_eq!(
            Connection::from_secret(&ic, &full),
            Err(SecretProblem::Missing("ca.pem".into()))
        );
        let mut with_ca = full;
        with_ca.insert("ca.pem".into(), ByteString(b"PEM".to_vec()));
        let Ok(Connection::Mqtt(c)) = Connection::from_secret(&ic, &with_ca) else {
            panic!("an MQTT connection");
        };
        assert_eq!(c.ca_pem.as_deref(), Some("PEM"));
        let without = mqtt::Connection {
            ca_pem: None,
            ..c.clone()
        };
        assert_ne!(
            c.identity(),
            without.identity(),
            "a changed CA is another connection"
        );
    }

    #[test]
    fn the_plan_of_a_kafka_resource_checks_its_topics_and_creates_their_dead_letter_topics() {
        let Some(Plan::Kafka(plan)) = Plan::of(&sample::kafka_policy()) else {
            panic!("a Kafka plan");
        };
        assert_eq!(plan.topics, ["orders", "refunds"]);
        assert_eq!(plan.dead_letter_topics, ["orders.dead", "refunds.dead"]);
        assert_eq!(
            (
                plan.dead_letter_partitions,
                plan.dead_letter_replication_factor
            ),
            (1, None)
        );
        assert_eq!(
            Plan::Kafka(plan).describe(),
            "topics orders, refunds exist and dead-letter topics orders.dead, refunds.dead are present"
        );
        let mut both = sample::kafka_policy();
        both.spec.broker.rabbitmq = sample::policy().spec.broker.rabbitmq;
        assert_eq!(Plan::of(&both), None, "two brokers: nothing to bind");
        assert!(!delete_on_cleanup(&sample::kafka_policy()));
    }
}
