//! Kafka bindings, over rdkafka's admin client: the topics to consume must
//! exist, and the dead-letter topics are created when missing.
//!
//! The consumed topics belong to their producers, so they are never created
//! here: a typo in `topics` shows as `TopicNotFound` instead of becoming a
//! new, empty topic that nobody writes to. For the same reason the metadata
//! request asks for every topic (a request naming a missing topic could make
//! a broker with `auto.create.topics.enable` create it) and the client never
//! allows automatic creation. The dead-letter topics are the consumer's own:
//! created with the partitions and replication factor of the spec.
//!
//! One admin client per bootstrap servers and credentials, pooled like every
//! broker's clients ([`Pool`]). librdkafka reports a refused login or an
//! unreachable broker as log events on a queue that rdkafka's admin client
//! never serves, so they would pile up in a pooled client: its log level is
//! set so that none is made. When a request fails, a short-lived producer of
//! the same settings ([`diagnose`]) serves its own events for a moment and
//! says what librdkafka saw (a refused connection, a failed SASL
//! authentication, a TLS handshake), so that the condition names it.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use idemq_sidecar::config::{KafkaSecurity, SaslMechanism, SecurityProtocol};
use idemq_sidecar::source::kafka::{client_config, KafkaSecrets};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::config::{FromClientConfig, FromClientConfigAndContext, RDKafkaLogLevel};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseProducer, DeliveryResult, Producer, ProducerContext};

use super::pool::{Connector, Pool, PoolConfig};
use super::BindError;
use crate::crd::{KafkaBinding, KafkaSecretRef, KafkaSecurityProtocol};
use crate::labels;
use crate::render::config::{dead_letter_topics, kafka_sasl_mechanism, kafka_security_protocol};

/// How long one metadata request or topic creation may take.
const TIMEOUT: Duration = Duration::from_secs(5);
/// How long [`diagnose`] listens to librdkafka after a failure.
const DIAGNOSIS: Duration = Duration::from_secs(3);

/// What to check and create for one Kafka consumer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Topics that must exist.
    pub topics: Vec<String>,
    /// Topics created when missing.
    pub dead_letter_topics: Vec<String>,
    pub dead_letter_partitions: i32,
    /// `None`: the brokers' `default.replication.factor`.
    pub dead_letter_replication_factor: Option<i32>,
}

impl Plan {
    pub fn of(kafka: &KafkaBinding) -> Self {
        Self {
            topics: kafka.topics.clone(),
            dead_letter_topics: dead_letter_topics(kafka),
            dead_letter_partitions: kafka.dead_letter_partitions.unwrap_or(1),
            dead_letter_replication_factor: kafka.dead_letter_replication_factor,
        }
    }
}

/// The brokers and credentials from the connection Secret. Secret: no
/// `Debug`, and [`Connection::redact`] takes the password out of any text
/// a broker or librdkafka wrote.
#[derive(Clone, PartialEq, Eq)]
pub struct Connection {
    pub bootstrap_servers: String,
    pub security_protocol: SecurityProtocol,
    pub sasl_mechanism: Option<SaslMechanism>,
    pub username: Option<String>,
    pub password: Option<String>,
    /// A PEM bundle of the CAs that verify the brokers.
    pub ca_pem: Option<String>,
}

impl Connection {
    /// Reads what `kafka` needs through `value` (a Secret key's value, or
    /// `Err(key)` when the Secret lacks it).
    pub fn from_secret(
        kafka: &KafkaBinding,
        value: impl Fn(&str) -> Result<String, String>,
    ) -> Result<Self, String> {
        Self::from_secret_parts(
            &kafka.connection_secret_ref,
            kafka.security_protocol,
            kafka.sasl_mechanism,
            value,
        )
    }

    /// The same, from the parts of a spec that name the Secret and how it is
    /// used (a ZeroMQ endpoint's Kafka dead letters have them too).
    pub fn from_secret_parts(
        secret: &KafkaSecretRef,
        security_protocol: KafkaSecurityProtocol,
        sasl_mechanism: Option<crate::crd::SaslMechanism>,
        value: impl Fn(&str) -> Result<String, String>,
    ) -> Result<Self, String> {
        let sasl = matches!(
            security_protocol,
            KafkaSecurityProtocol::SaslPlaintext | KafkaSecurityProtocol::SaslSsl
        );
        let (username, password) = if sasl {
            (
                Some(value(labels::KAFKA_USERNAME_KEY)?),
                Some(value(labels::KAFKA_PASSWORD_KEY)?),
            )
        } else {
            (None, None)
        };
        Ok(Self {
            bootstrap_servers: value(labels::KAFKA_BOOTSTRAP_SERVERS_KEY)?,
            security_protocol: kafka_security_protocol(security_protocol),
            sasl_mechanism: sasl_mechanism.map(kafka_sasl_mechanism),
            username,
            password,
            ca_pem: match &secret.ca_key {
                Some(key) => Some(value(key)?),
                None => None,
            },
        })
    }

    /// Every field, so that a changed password or CA gets its own client.
    pub fn identity(&self) -> Vec<u8> {
        let fields = [
            Some(self.bootstrap_servers.as_str()),
            Some(&*format!("{:?}", self.security_protocol)),
            self.sasl_mechanism.map(|m| format!("{m:?}")).as_deref(),
            self.username.as_deref(),
            self.password.as_deref(),
            self.ca_pem.as_deref(),
        ]
        .map(|f| f.unwrap_or("\u{0}none").to_string());
        fields.join("\u{0}").into_bytes()
    }

    /// `text` without the password (librdkafka does not print it, but a
    /// broker's message is not ours to trust).
    pub fn redact(&self, text: &str) -> String {
        match self.password.as_deref().filter(|p| !p.is_empty()) {
            Some(password) => text.replace(password, "***"),
            None => text.to_string(),
        }
    }

    /// The admin client's librdkafka settings: the sidecar's own mapping of
    /// protocol, mechanism and credentials, with the CA given as PEM.
    fn client_config(&self) -> rdkafka::ClientConfig {
        let settings = KafkaSecurity {
            security_protocol: self.security_protocol,
            sasl_mechanism: self.sasl_mechanism,
            ca_file: None,
        };
        let secrets = KafkaSecrets {
            bootstrap_servers: self.bootstrap_servers.clone(),
            username: self.username.clone(),
            password: self.password.clone(),
        };
        let mut c = client_config(settings, &secrets, "idemq-operator");
        c.set("allow.auto.create.topics", "false")
            .set("socket.timeout.ms", TIMEOUT.as_millis().to_string())
            .set(
                "socket.connection.setup.timeout.ms",
                TIMEOUT.as_millis().to_string(),
            );
        if let Some(pem) = &self.ca_pem {
            c.set("ssl.ca.pem", pem);
        }
        c
    }
}

/// What librdkafka reported while [`diagnose`] listened: its error lines.
#[derive(Default)]
struct Reports {
    errors: Mutex<Vec<String>>,
}

impl ClientContext for Reports {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        tracing::debug!(target: "librdkafka", ?level, facility = fac, "{message}");
        if matches!(
            level,
            RDKafkaLogLevel::Emerg
                | RDKafkaLogLevel::Alert
                | RDKafkaLogLevel::Critical
                | RDKafkaLogLevel::Error
        ) {
            let mut errors = self.errors.lock().unwrap_or_else(|e| e.into_inner());
            errors.push(message.to_string());
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.log(
            RDKafkaLogLevel::Error,
            "ERROR",
            &format!("{error}: {reason}"),
        );
    }
}

impl ProducerContext for Reports {
    type DeliveryOpaque = ();
    fn delivery(&self, _: &DeliveryResult<'_>, _: ()) {}
}

/// What librdkafka says when it connects with `connection`'s settings: the
/// first error it reports within [`DIAGNOSIS`], if any. Blocking.
fn diagnose(connection: &Connection) -> Option<String> {
    let mut config = connection.client_config();
    config.set_log_level(RDKafkaLogLevel::Error);
    let probe =
        BaseProducer::<Reports>::from_config_and_context(&config, Reports::default()).ok()?;
    let started = std::time::Instant::now();
    while started.elapsed() < DIAGNOSIS {
        probe.poll(Duration::from_millis(100));
        let errors = probe
            .context()
            .errors
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(first) = errors.first() {
            return Some(first.clone());
        }
    }
    None
}

/// A pooled admin client. Dropping an rdkafka client joins its threads and
/// closes its connections, which blocks: that happens off the runtime.
pub struct Admin {
    client: Option<Arc<AdminClient<DefaultClientContext>>>,
}

impl Admin {
    fn client(&self) -> &Arc<AdminClient<DefaultClientContext>> {
        self.client.as_ref().expect("set until dropped")
    }
}

impl Drop for Admin {
    fn drop(&mut self) {
        let Some(client) = self.client.take() else {
            return;
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn_blocking(move || drop(client));
            }
            Err(_) => drop(client),
        }
    }
}

/// Opens admin clients for the [`Pool`]. Creating one opens no connection
/// (librdkafka connects on the first request and reconnects by itself), so
/// a client stays usable; credentials that change make another endpoint.
pub struct KafkaConnector;

#[async_trait::async_trait]
impl Connector for KafkaConnector {
    type Endpoint = Connection;
    type Client = Admin;

    fn identity(connection: &Connection) -> Vec<u8> {
        connection.identity()
    }

    async fn connect(&self, connection: &Connection) -> Result<Admin, BindError> {
        let mut config = connection.client_config();
        // No log event is made (see the module's doc): nothing piles up.
        config.set_log_level(RDKafkaLogLevel::Emerg);
        // Creating a client starts its threads and resolves nothing: quick,
        // but not async.
        let client = tokio::task::spawn_blocking(move || AdminClient::from_config(&config))
            .await
            .map_err(|e| BindError::Unreachable(format!("the Kafka client did not start: {e}")))?
            // A bad setting (an unreadable CA) names itself, not a secret.
            .map_err(|e| BindError::Refused(format!("the Kafka client settings: {e}")))?;
        Ok(Admin {
            client: Some(Arc::new(client)),
        })
    }

    fn usable(&self, _admin: &Admin) -> bool {
        true
    }

    async fn close(&self, _admin: &Admin) {
        // Closed when the last reference goes (see `Admin`'s drop).
    }
}

/// The Kafka binder: one pooled admin client per bootstrap servers and
/// credentials.
pub struct Kafka {
    pool: Arc<Pool<KafkaConnector>>,
}

impl Default for Kafka {
    fn default() -> Self {
        Self::new(PoolConfig::default())
    }
}

impl Kafka {
    pub fn new(pool: PoolConfig) -> Self {
        Self {
            pool: Pool::new(KafkaConnector, pool),
        }
    }

    /// Admin clients open now.
    pub fn clients(&self) -> usize {
        self.pool.open()
    }

    /// Checks that every topic exists and creates the missing dead-letter topics.
    pub async fn bind(&self, connection: &Connection, plan: &Plan) -> Result<(), BindError> {
        let admin = self.pool.get(connection).await?;
        let client = admin.client().clone();
        let existing = tokio::task::spawn_blocking(move || {
            client.inner().fetch_metadata(None, TIMEOUT).map(|m| {
                m.topics()
                    .iter()
                    .filter(|t| {
                        t.error().map(RDKafkaErrorCode::from)
                            != Some(RDKafkaErrorCode::UnknownTopicOrPartition)
                    })
                    .map(|t| t.name().to_string())
                    .collect::<Vec<_>>()
            })
        })
        .await
        .map_err(|e| BindError::Unreachable(format!("the metadata request did not finish: {e}")))?
        .map_err(|e| e.rdkafka_error_code());
        let existing = match existing {
            Ok(existing) => existing,
            Err(code) => return Err(failure(connection, code, "list the topics").await),
        };
        let absent: Vec<String> = plan
            .topics
            .iter()
            .filter(|t| !existing.contains(t))
            .cloned()
            .collect();
        if !absent.is_empty() {
            return Err(BindError::TopicNotFound(absent));
        }
        let missing: Vec<&String> = plan
            .dead_letter_topics
            .iter()
            .filter(|t| !existing.contains(t))
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        // -1: the brokers' default (KIP-464).
        let replication = plan.dead_letter_replication_factor.unwrap_or(-1);
        let new: Vec<NewTopic<'_>> = missing
            .iter()
            .map(|t| {
                NewTopic::new(
                    t,
                    plan.dead_letter_partitions,
                    TopicReplication::Fixed(replication),
                )
            })
            .collect();
        let options = AdminOptions::new()
            .operation_timeout(Some(TIMEOUT))
            .request_timeout(Some(TIMEOUT));
        let results = match admin.client().create_topics(&new, &options).await {
            Ok(results) => results,
            Err(e) => {
                let code = e.rdkafka_error_code();
                return Err(failure(connection, code, "create the dead-letter topics").await);
            }
        };
        for result in results {
            match result {
                Ok(_) => {}
                // Created meanwhile (by another replica of the operator): as wanted.
                Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((topic, code)) => {
                    return Err(refusal(
                        code,
                        &format!("create the dead-letter topic {topic:?}"),
                    ))
                }
            }
        }
        Ok(())
    }
}

/// What a failed request means: the broker's answer when there is one, else
/// what librdkafka reports when it connects again ([`diagnose`]).
async fn failure(connection: &Connection, code: Option<RDKafkaErrorCode>, what: &str) -> BindError {
    match code {
        Some(
            c @ (RDKafkaErrorCode::TopicAuthorizationFailed
            | RDKafkaErrorCode::ClusterAuthorizationFailed),
        ) => return refusal(c, what),
        Some(RDKafkaErrorCode::Authentication | RDKafkaErrorCode::SaslAuthenticationFailed) => {
            return BindError::AuthenticationFailed(format!(
                "could not {what}; check username, password and saslMechanism"
            ))
        }
        _ => {}
    }
    let probe = connection.clone();
    let seen = tokio::task::spawn_blocking(move || diagnose(&probe))
        .await
        .ok()
        .flatten()
        .map(|line| connection.redact(&line));
    let code = code.map_or_else(|| "no answer".to_string(), |c| c.to_string());
    match seen {
        Some(line) if line.to_ascii_lowercase().contains("authentication") => {
            BindError::AuthenticationFailed(format!(
                "could not {what}: {line}; check username, password and saslMechanism"
            ))
        }
        Some(line) if line.contains("SSL") || line.contains("certificate") => {
            BindError::Unreachable(format!(
                "could not {what}: {line}; check securityProtocol and the CA (caKey)"
            ))
        }
        Some(line) => BindError::Unreachable(format!("could not {what} ({code}): {line}")),
        None => BindError::Unreachable(format!(
            "could not {what} within {TIMEOUT:?} ({code}); check bootstrapServers and the network"
        )),
    }
}

/// A broker's refusal, in words a person can act on.
fn refusal(code: RDKafkaErrorCode, what: &str) -> BindError {
    match code {
        RDKafkaErrorCode::TopicAuthorizationFailed
        | RDKafkaErrorCode::ClusterAuthorizationFailed => BindError::Refused(format!(
            "the user may not {what} ({code}); grant it the ACL or create the topic"
        )),
        _ => BindError::Refused(format!("could not {what}: {code}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connection(password: &str) -> Connection {
        Connection {
            bootstrap_servers: "kafka:9092".into(),
            security_protocol: SecurityProtocol::SaslSsl,
            sasl_mechanism: Some(SaslMechanism::ScramSha512),
            username: Some("orders".into()),
            password: Some(password.into()),
            ca_pem: None,
        }
    }

    #[test]
    fn a_changed_password_is_another_endpoint() {
        assert_eq!(
            connection("s3cret").identity(),
            connection("s3cret").identity()
        );
        assert_ne!(
            connection("s3cret").identity(),
            connection("other").identity()
        );
    }

    #[test]
    fn the_password_never_survives_in_a_message() {
        let c = connection("s3cret-pw");
        assert_eq!(
            c.redact("SASL authentication error: user orders with s3cret-pw refused"),
            "SASL authentication error: user orders with *** refused"
        );
    }

    #[test]
    fn client_settings_map_protocol_mechanism_and_ca() {
        let mut c = connection("pw");
        c.ca_pem = Some("-----BEGIN CERTIFICATE-----".into());
        let config = c.client_config();
        assert_eq!(config.get("security.protocol"), Some("sasl_ssl"));
        assert_eq!(config.get("sasl.mechanism"), Some("SCRAM-SHA-512"));
        assert_eq!(config.get("sasl.username"), Some("orders"));
        assert_eq!(
            config.get("ssl.ca.pem"),
            Some("-----BEGIN CERTIFICATE-----")
        );
        assert_eq!(config.get("allow.auto.create.topics"), Some("false"));
    }
}
