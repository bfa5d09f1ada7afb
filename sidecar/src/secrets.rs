//! Secrets reach the sidecar through the environment, never through its config
//! file: the operator fills these variables from Kubernetes Secret references.
//! A variable `<NAME>_FILE` names a file holding the value instead (for Secrets
//! mounted as volumes).
//!
//! The environment is read through [`Env`] so tests pass a map instead of
//! changing the process environment.

use std::collections::HashMap;

use crate::config::{BrokerKind, Config, DeadLetterTarget, SecretEnv, StoreKind};

/// Where variables come from.
pub trait Env {
    fn var(&self, name: &str) -> Option<String>;
}

/// The process environment.
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}

impl Env for HashMap<String, String> {
    fn var(&self, name: &str) -> Option<String> {
        self.get(name).cloned()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("read {var} from {path}: {source}")]
    File {
        var: String,
        path: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Missing(String),
    /// The value is there but unusable; the message never quotes it.
    #[error("{var}: {problem}")]
    Invalid {
        var: &'static str,
        problem: &'static str,
    },
}

/// The secrets the sidecar needs, resolved from the environment and the config.
#[derive(Clone, Default)]
pub struct Secrets {
    pub redis_url: Option<String>,
    pub redis_password: Option<String>,
    pub redis_ca: Option<String>,
    pub broker_url: Option<String>,
    /// Kafka bootstrap servers and SASL credentials (a Kafka broker only).
    pub kafka: Option<crate::source::kafka::KafkaSecrets>,
    /// Credentials of brokers that take them apart from the URL.
    pub broker_auth: BrokerAuth,
    /// A Pub/Sub emulator's `host:port` (not a secret, but from the
    /// environment like the broker addresses).
    pub pubsub_emulator_host: Option<String>,
    /// The ZeroMQ endpoint's CURVE keys (unset with `plain: true`).
    pub zeromq_curve: Option<crate::source::zeromq::CurveKeys>,
}

/// Broker credentials given apart from the URL (JetStream, MQTT).
#[derive(Clone, Default)]
pub struct BrokerAuth {
    pub user: Option<String>,
    pub password: Option<String>,
    /// NATS token.
    pub token: Option<String>,
    /// NATS credentials: a `.creds` file's content.
    pub creds: Option<String>,
}

impl std::fmt::Debug for BrokerAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let set = |v: &Option<String>| v.as_ref().map(|_| "***");
        f.debug_struct("BrokerAuth")
            .field("user", &self.user)
            .field("password", &set(&self.password))
            .field("token", &set(&self.token))
            .field("creds", &set(&self.creds))
            .finish()
    }
}

// Secrets must never reach a log line through a derived Debug.
impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Secrets")
            .field("redis_url", &self.redis_url.as_deref().map(redact))
            .field(
                "redis_password",
                &self.redis_password.as_ref().map(|_| "***"),
            )
            .field("broker_url", &self.broker_url.as_deref().map(redact))
            .field(
                "kafka",
                &self.kafka.as_ref().map(|k| {
                    (
                        k.bootstrap_servers.as_str(),
                        k.username.as_deref(),
                        k.password.as_ref().map(|_| "***"),
                    )
                }),
            )
            .field("broker_auth", &self.broker_auth)
            .field("pubsub_emulator_host", &self.pubsub_emulator_host)
            .field("zeromq_curve", &self.zeromq_curve)
            .finish()
    }
}

/// Reads `name`, or the file named by `name_FILE`.
fn read(env: &dyn Env, name: &str) -> Result<Option<String>, SecretError> {
    if let Some(value) = env.var(name).filter(|v| !v.is_empty()) {
        return Ok(Some(value));
    }
    let file_var = format!("{name}_FILE");
    match env.var(&file_var).filter(|v| !v.is_empty()) {
        Some(path) => std::fs::read_to_string(&path)
            .map(|v| Some(v.trim_end_matches(['\r', '\n']).to_string()))
            .map_err(|source| SecretError::File {
                var: file_var,
                path,
                source,
            }),
        None => Ok(None),
    }
}

impl Secrets {
    /// Resolves the secrets: environment first, then the config's URLs.
    pub fn resolve(config: &Config, env: &dyn Env) -> Result<Self, SecretError> {
        let broker = config.broker.as_ref().and_then(|b| b.kind());
        let dead_letter = match broker {
            Some(BrokerKind::ZeroMq(zmq)) => zmq.dead_letter.target(),
            _ => None,
        };
        let config_url = match (broker, dead_letter) {
            (Some(BrokerKind::RabbitMq(rabbit)), _) => rabbit.url.clone(),
            (Some(BrokerKind::JetStream(js)), _) => js.url.clone(),
            (Some(BrokerKind::Mqtt(mqtt)), _) => mqtt.url.clone(),
            (_, Some(DeadLetterTarget::RabbitMq(rabbit))) => rabbit.url.clone(),
            _ => None,
        };
        let kafka = match (broker, dead_letter) {
            (Some(BrokerKind::Kafka(kafka)), _) => Some(kafka_secrets(
                "broker.kafka",
                kafka.bootstrap_servers.as_ref(),
                kafka.sasl_mechanism.is_some(),
                env,
            )?),
            (_, Some(DeadLetterTarget::Kafka(kafka))) => Some(kafka_secrets(
                "broker.zeromq.deadLetter.kafka",
                kafka.bootstrap_servers.as_ref(),
                kafka.sasl_mechanism.is_some(),
                env,
            )?),
            _ => None,
        };
        let zeromq_curve = match broker {
            Some(BrokerKind::ZeroMq(zmq)) => zeromq_curve(zmq, env)?,
            _ => None,
        };
        let secrets = Self {
            redis_url: read(env, SecretEnv::REDIS_URL)?.or_else(|| config.store.url.clone()),
            redis_password: read(env, SecretEnv::REDIS_PASSWORD)?,
            redis_ca: read(env, SecretEnv::REDIS_CA)?,
            broker_url: read(env, SecretEnv::BROKER_URL)?.or(config_url),
            kafka,
            broker_auth: BrokerAuth {
                user: read(env, SecretEnv::BROKER_USER)?,
                password: read(env, SecretEnv::BROKER_PASSWORD)?,
                token: read(env, SecretEnv::NATS_TOKEN)?,
                creds: read(env, SecretEnv::NATS_CREDS)?,
            },
            pubsub_emulator_host: env
                .var(SecretEnv::PUBSUB_EMULATOR_HOST)
                .filter(|h| !h.is_empty()),
            zeromq_curve,
        };
        if config.store.kind == StoreKind::Redis && secrets.redis_url.is_none() {
            return Err(SecretError::Missing(format!(
                "store.kind is redis but neither store.url nor {} is set",
                SecretEnv::REDIS_URL
            )));
        }
        if let Some(problem) = secrets
            .redis_url
            .as_deref()
            .and_then(|url| crate::config::redis_url_problem(url, config.store.cluster))
        {
            return Err(SecretError::Invalid {
                var: SecretEnv::REDIS_URL,
                problem,
            });
        }
        let section = match (broker, dead_letter) {
            (Some(BrokerKind::RabbitMq(_)), _) => Some("broker.rabbitmq"),
            (Some(BrokerKind::JetStream(_)), _) => Some("broker.jetstream"),
            (Some(BrokerKind::Mqtt(_)), _) => Some("broker.mqtt"),
            (_, Some(DeadLetterTarget::RabbitMq(_))) => Some("broker.zeromq.deadLetter.rabbitmq"),
            _ => None,
        };
        if let Some(section) = section.filter(|_| secrets.broker_url.is_none()) {
            return Err(SecretError::Missing(format!(
                "{section} is configured but neither {section}.url nor {} is set",
                SecretEnv::BROKER_URL
            )));
        }
        Ok(secrets)
    }
}

/// A Kafka connection's secrets (the Kafka source's, or the Kafka a ZeroMQ
/// endpoint dead-letters to, configured at `section`): bootstrap servers
/// from the environment or the config, and SASL credentials (required with
/// a SASL mechanism).
fn kafka_secrets(
    section: &str,
    config_servers: Option<&String>,
    sasl: bool,
    env: &dyn Env,
) -> Result<crate::source::kafka::KafkaSecrets, SecretError> {
    let bootstrap_servers = read(env, SecretEnv::KAFKA_BOOTSTRAP_SERVERS)?
        .or_else(|| config_servers.cloned())
        .ok_or_else(|| {
            SecretError::Missing(format!(
                "{section} is configured but neither {section}.bootstrapServers nor {} is set",
                SecretEnv::KAFKA_BOOTSTRAP_SERVERS
            ))
        })?;
    let username = read(env, SecretEnv::KAFKA_USERNAME)?;
    let password = read(env, SecretEnv::KAFKA_PASSWORD)?;
    if sasl && (username.is_none() || password.is_none()) {
        return Err(SecretError::Missing(format!(
            "{section}.saslMechanism is set but {} and {} are not both set",
            SecretEnv::KAFKA_USERNAME,
            SecretEnv::KAFKA_PASSWORD
        )));
    }
    Ok(crate::source::kafka::KafkaSecrets {
        bootstrap_servers,
        username,
        password,
    })
}

/// The ZeroMQ endpoint's CURVE keys: both are required unless `plain: true`,
/// and refused with it (a config that says plain while keys are mounted is
/// a mistake either way). Errors name the variable, never a key.
fn zeromq_curve(
    zmq: &crate::config::ZeroMqConfig,
    env: &dyn Env,
) -> Result<Option<crate::source::zeromq::CurveKeys>, SecretError> {
    use crate::source::zeromq::decode_key;
    let secret = read(env, SecretEnv::ZMQ_SERVER_SECRET_KEY)?;
    let clients = read(env, SecretEnv::ZMQ_CLIENT_KEYS)?;
    if zmq.plain {
        if secret.is_some() || clients.is_some() {
            return Err(SecretError::Missing(format!(
                "broker.zeromq.plain is true but {} or {} is set: remove plain to use CURVE, or the keys to run without it",
                SecretEnv::ZMQ_SERVER_SECRET_KEY,
                SecretEnv::ZMQ_CLIENT_KEYS
            )));
        }
        return Ok(None);
    }
    let (Some(secret), Some(clients)) = (secret, clients) else {
        return Err(SecretError::Missing(format!(
            "broker.zeromq needs CURVE keys: {} (the server's secret key) and {} (the allowed clients' public keys), or plain: true to accept clients without authentication",
            SecretEnv::ZMQ_SERVER_SECRET_KEY,
            SecretEnv::ZMQ_CLIENT_KEYS
        )));
    };
    let secret_key = decode_key(&secret).ok_or(SecretError::Invalid {
        var: SecretEnv::ZMQ_SERVER_SECRET_KEY,
        problem: "is not a Z85-encoded CURVE key (40 characters)",
    })?;
    let client_keys = clients
        .split(|c: char| c.is_whitespace() || c == ',')
        .filter(|k| !k.is_empty())
        .map(decode_key)
        .collect::<Option<Vec<_>>>()
        .filter(|keys| !keys.is_empty())
        .ok_or(SecretError::Invalid {
            var: SecretEnv::ZMQ_CLIENT_KEYS,
            problem: "must hold Z85-encoded CURVE public keys (40 characters each), separated by whitespace or commas",
        })?;
    Ok(Some(crate::source::zeromq::CurveKeys {
        secret_key,
        client_keys,
    }))
}

/// A URL fit for logs: scheme, host and port, without credentials or path.
pub fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(u) => format!(
            "{}://{}{}",
            u.scheme(),
            u.host_str().unwrap_or("?"),
            u.port().map(|p| format!(":{p}")).unwrap_or_default()
        ),
        Err(_) => "<unparsable url>".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(yaml: &str) -> Config {
        Config::from_yaml(yaml).expect("valid")
    }

    #[test]
    fn environment_overrides_config_and_files_are_read() {
        let dir = std::env::temp_dir().join(format!("idemq-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("tmp dir");
        let file = dir.join("password");
        std::fs::write(&file, "s3cret\n").expect("write");
        let env: HashMap<String, String> = [
            ("IDEMQ_REDIS_URL", "redis://redis.example:6380"),
            ("IDEMQ_REDIS_PASSWORD_FILE", file.to_str().expect("utf-8")),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let c = config(
            "consumer: a\nmode: gate\nstore:\n  kind: redis\n  url: redis://127.0.0.1:6379\n",
        );
        let secrets = Secrets::resolve(&c, &env).expect("resolves");
        assert_eq!(
            secrets.redis_url.as_deref(),
            Some("redis://redis.example:6380")
        );
        assert_eq!(secrets.redis_password.as_deref(), Some("s3cret"));
        assert!(!format!("{secrets:?}").contains("s3cret"));
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn redis_store_without_url_is_an_error_naming_both_sources() {
        let c = config("consumer: a\nmode: gate\nstore:\n  kind: redis\n");
        let err = Secrets::resolve(&c, &HashMap::new())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("store.url") && err.contains("IDEMQ_REDIS_URL"),
            "{err}"
        );
    }

    #[test]
    fn kafka_secrets_come_from_the_environment_and_stay_out_of_debug() {
        let c = config(
            "consumer: a\ndedup:\n  key:\n    from: recordKey\nbroker:\n  kafka:\n    topics: [t]\n    groupId: g\n    securityProtocol: saslSsl\n    saslMechanism: scramSha512\ndelivery:\n  url: http://127.0.0.1:1/\n",
        );
        let err = Secrets::resolve(&c, &HashMap::new())
            .unwrap_err()
            .to_string();
        assert!(err.contains("IDEMQ_KAFKA_BOOTSTRAP_SERVERS"), "{err}");
        let env: HashMap<String, String> = [
            ("IDEMQ_KAFKA_BOOTSTRAP_SERVERS", "kafka-0:9093,kafka-1:9093"),
            ("IDEMQ_KAFKA_USERNAME", "orders"),
            ("IDEMQ_KAFKA_PASSWORD", "s3cret"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let secrets = Secrets::resolve(&c, &env).expect("resolves");
        let kafka = secrets.kafka.as_ref().expect("kafka secrets");
        assert_eq!(kafka.bootstrap_servers, "kafka-0:9093,kafka-1:9093");
        assert_eq!(kafka.password.as_deref(), Some("s3cret"));
        assert!(!format!("{secrets:?}").contains("s3cret"));
        let mut without_password = env.clone();
        without_password.remove("IDEMQ_KAFKA_PASSWORD");
        let err = Secrets::resolve(&c, &without_password)
            .unwrap_err()
            .to_string();
        assert!(err.contains("IDEMQ_KAFKA_PASSWORD"), "{err}");
    }

    #[test]
    fn redacted_urls_keep_no_credentials() {
        assert_eq!(
            redact("amqp://user:pw@rabbit:5672/vhost"),
            "amqp://rabbit:5672"
        );
        assert_eq!(redact("rediss://:pw@redis"), "rediss://redis");
    }
}
