//! Where a ZeroMQ endpoint's dead letters go: a second ZeroMQ endpoint
//! (PUSH), a RabbitMQ exchange or queue, or a Kafka topic.
//!
//! [`DeadLetters::send`] returns `Ok` only once the target has the letter:
//! libzmq took it for a connected receiver (`ZMQ_IMMEDIATE`), RabbitMQ
//! confirmed it and routed it to a queue (`mandatory`), or the Kafka brokers
//! acknowledged it (`acks=all`). The publishing itself is the RabbitMQ and
//! Kafka sources' ([`crate::source::publish`]).
//!
//! The RabbitMQ connection is opened at start and again whenever it is
//! found lost, at most once per back-off step (from 200 ms up to 5 s):
//! meanwhile a send fails at once, so a `router` peer is told `retry`
//! without waiting. librdkafka reconnects to the Kafka brokers by itself; a
//! Kafka send fails when the brokers have not acknowledged the letter within
//! [`KAFKA_DELIVERY_TIMEOUT`].

use std::sync::Mutex;
use std::time::{Duration, Instant};

use lapin::options::QueueDeclareOptions;
use lapin::types::{FieldTable, LongString};
use lapin::uri::AMQPUri;
use lapin::{BasicProperties, Connection, ConnectionProperties};

use super::socket;
use super::wire::{self, Frames};
use super::SourceError;
use crate::config::{DeadLetterTarget, KafkaDeadLetter, RabbitMqDeadLetter, ZeroMqPattern};
use crate::source::kafka::{client_config, KafkaSecrets};
use crate::source::publish::{self, Confirming, KafkaDeadLetters};

/// How long closing the dead-letter socket waits for letters still queued.
const ENDPOINT_LINGER_MS: i32 = 10_000;
/// While the dead-letter endpoint is away, libzmq tries again every 100 ms by
/// default; this lets the interval double up to 5 s, as for RabbitMQ.
const ENDPOINT_RECONNECT_MAX_MS: i32 = 5_000;
/// Opening the RabbitMQ connection, and waiting for one confirm.
const RABBIT_TIMEOUT: Duration = Duration::from_secs(5);
/// A Kafka dead letter not acknowledged by then is not sent (and tried again).
pub const KAFKA_DELIVERY_TIMEOUT: Duration = Duration::from_secs(5);

/// One dead letter: the request's frames and why it died.
pub struct Letter<'a> {
    pub pattern: ZeroMqPattern,
    /// The endpoint the request came in on.
    pub endpoint: &'a str,
    pub frames: &'a Frames,
    pub reason: &'static str,
    pub attempts: u32,
    /// How a malformed request breaks the wire protocol.
    pub problem: Option<&'a str>,
}

/// The secrets of a broker dead-letter target, from the environment.
#[derive(Default)]
pub struct Secrets {
    /// The RabbitMQ URL, with its credentials.
    pub rabbitmq_url: Option<String>,
    /// The Kafka bootstrap servers and credentials.
    pub kafka: Option<KafkaSecrets>,
}

/// The configured target, connected.
pub enum DeadLetters {
    Endpoint(Endpoint),
    // Boxed: a parsed AMQP URL is large beside the others.
    RabbitMq(Box<Rabbit>),
    Kafka(Kafka),
}

impl DeadLetters {
    /// Connects to the target: the socket connects in the background, the
    /// RabbitMQ connection is tried once now (and again at each letter
    /// while it is down), the Kafka producer connects by itself.
    pub async fn open(
        ctx: &zmq::Context,
        target: DeadLetterTarget<'_>,
        secrets: Secrets,
        consumer: &str,
    ) -> Result<Self, SourceError> {
        Ok(match target {
            DeadLetterTarget::Endpoint(endpoint) => {
                Self::Endpoint(Endpoint::connect(ctx, endpoint)?)
            }
            DeadLetterTarget::RabbitMq(config) => {
                let url = secrets.rabbitmq_url.ok_or(SourceError::DeadLetterSecrets(
                    "broker.zeromq.deadLetter.rabbitmq needs a broker URL (IDEMQ_BROKER_URL)",
                ))?;
                let uri = crate::source::rabbitmq::parse_url(&url)
                    .map_err(SourceError::DeadLetterBroker)?;
                let rabbit = Rabbit::new(uri, config.clone(), consumer);
                if let Err(e) = rabbit.publisher().await {
                    tracing::warn!(error = %e, "the dead-letter RabbitMQ is not available yet: dead letters wait for it");
                }
                Self::RabbitMq(Box::new(rabbit))
            }
            DeadLetterTarget::Kafka(config) => {
                let secrets = secrets.kafka.ok_or(SourceError::DeadLetterSecrets(
                    "broker.zeromq.deadLetter.kafka needs bootstrap servers (IDEMQ_KAFKA_BOOTSTRAP_SERVERS)",
                ))?;
                Self::Kafka(Kafka::new(config, &secrets, consumer)?)
            }
        })
    }

    /// Where letters go, for logs (no credentials).
    pub fn describe(&self) -> String {
        match self {
            Self::Endpoint(e) => e.endpoint.clone(),
            Self::RabbitMq(r) => match (&r.config.exchange, &r.config.queue) {
                (Some(exchange), _) => format!("rabbitmq exchange {exchange}"),
                (None, queue) => format!("rabbitmq queue {}", queue.as_deref().unwrap_or("")),
            },
            Self::Kafka(k) => format!("kafka topic {}", k.topic),
        }
    }

    /// Sends one letter; `Ok` once the target has it, else why not.
    pub async fn send(&self, letter: &Letter<'_>) -> Result<(), String> {
        match self {
            Self::Endpoint(endpoint) => endpoint.send(&wire::dead_letter(
                letter.pattern,
                letter.frames,
                letter.reason,
                letter.attempts,
                letter.problem,
            )),
            Self::RabbitMq(rabbit) => rabbit.send(letter).await,
            Self::Kafka(kafka) => kafka.send(letter).await,
        }
    }

    /// Closes the RabbitMQ connection (the others close on drop).
    pub async fn close(&self) {
        if let Self::RabbitMq(rabbit) = self {
            rabbit.close().await;
        }
    }
}

/// The PUSH socket dead letters leave by. Sends never wait: with
/// `ZMQ_IMMEDIATE` a letter is refused at once when no receiver is connected.
pub struct Endpoint {
    endpoint: String,
    socket: Mutex<zmq::Socket>,
}

impl Endpoint {
    fn connect(ctx: &zmq::Context, endpoint: &str) -> Result<Self, SourceError> {
        let error = |source| SourceError::DeadLetter {
            endpoint: endpoint.to_string(),
            source,
        };
        let socket = ctx.socket(zmq::PUSH).map_err(error)?;
        socket.set_immediate(true).map_err(error)?;
        socket.set_linger(ENDPOINT_LINGER_MS).map_err(error)?;
        socket
            .set_reconnect_ivl_max(ENDPOINT_RECONNECT_MAX_MS)
            .map_err(error)?;
        socket.connect(endpoint).map_err(error)?;
        Ok(Self {
            endpoint: endpoint.to_string(),
            socket: Mutex::new(socket),
        })
    }

    fn send(&self, letter: &Frames) -> Result<(), String> {
        let socket = self.socket.lock().unwrap_or_else(|e| e.into_inner());
        socket::send_frames(&socket, letter, zmq::DONTWAIT)
            .map_err(|_| "no dead-letter receiver is connected".to_string())
    }
}

/// A RabbitMQ exchange or queue, over a connection opened when needed.
pub struct Rabbit {
    /// Parsed once: the parser's error messages quote the URL, password included.
    uri: AMQPUri,
    config: RabbitMqDeadLetter,
    name: String,
    session: tokio::sync::Mutex<Session>,
}

#[derive(Default)]
struct Session {
    open: Option<(Connection, Confirming)>,
    failures: u32,
    next_try: Option<Instant>,
}

impl Rabbit {
    fn new(uri: AMQPUri, config: RabbitMqDeadLetter, consumer: &str) -> Self {
        Self {
            uri,
            config,
            name: format!("idemq-sidecar {consumer} dead letters"),
            session: tokio::sync::Mutex::new(Session::default()),
        }
    }

    /// The confirming channel: the open one, or a new connection's.
    async fn publisher(&self) -> Result<Confirming, String> {
        let mut session = self.session.lock().await;
        if let Some((conn, channel)) = &session.open {
            if conn.status().connected() && channel.channel().status().connected() {
                return Ok(channel.clone());
            }
            tracing::warn!("the dead-letter RabbitMQ connection was lost: opening a new one");
            session.open = None;
        }
        if session.next_try.is_some_and(|at| Instant::now() < at) {
            return Err(
                "the dead-letter RabbitMQ is not connected (next try after a back-off)".into(),
            );
        }
        let opened = tokio::time::timeout(RABBIT_TIMEOUT, self.connect())
            .await
            .unwrap_or_else(|_| Err(format!("no connection within {RABBIT_TIMEOUT:?}")));
        match opened {
            Ok((conn, channel)) => {
                tracing::info!(target = %self.target(), "connected to the dead-letter RabbitMQ");
                session.failures = 0;
                session.next_try = None;
                session.open = Some((conn, channel.clone()));
                Ok(channel)
            }
            Err(e) => {
                session.failures += 1;
                session.next_try = Some(
                    Instant::now()
                        + crate::engine::backoff(
                            Duration::from_millis(200),
                            Duration::from_secs(5),
                            session.failures,
                        ),
                );
                Err(format!("the dead-letter RabbitMQ: {e}"))
            }
        }
    }

    fn target(&self) -> String {
        match (&self.config.exchange, &self.config.queue) {
            (Some(exchange), _) => format!("exchange {exchange}"),
            (None, queue) => format!("queue {}", queue.as_deref().unwrap_or("")),
        }
    }

    /// A connection and its confirming channel, the target checked to exist.
    async fn connect(&self) -> Result<(Connection, Confirming), String> {
        let properties = ConnectionProperties::default()
            .with_connection_name(LongString::from(self.name.as_str()));
        let conn = Connection::connect_uri(self.uri.clone(), properties)
            .await
            .map_err(|e| e.to_string())?;
        let channel = Confirming::open(&conn).await.map_err(|e| e.to_string())?;
        let passive = match (&self.config.exchange, &self.config.queue) {
            (Some(exchange), _) => channel.exchange_exists(exchange).await,
            (None, queue) => channel
                .channel()
                .queue_declare(
                    queue.as_deref().unwrap_or_default().into(),
                    QueueDeclareOptions {
                        passive: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await
                .map(|_| ()),
        };
        if let Err(e) = passive {
            let _ = conn.close(200, "idemq: no dead-letter target".into()).await;
            return Err(format!("the {} does not exist ({e})", self.target()));
        }
        Ok((conn, channel))
    }

    async fn send(&self, letter: &Letter<'_>) -> Result<(), String> {
        let channel = self.publisher().await?;
        let broker = wire::broker_letter(
            letter.pattern,
            letter.endpoint,
            letter.frames,
            letter.problem,
        );
        let mut original = FieldTable::default();
        for (name, value) in &broker.headers {
            original.insert(name.as_str().into(), publish::amqp_text(value));
        }
        let headers = publish::amqp_dead_letter_headers(
            original,
            letter.reason,
            letter.attempts,
            &pairs(&broker.origin),
        );
        let mut properties = BasicProperties::default()
            .with_headers(headers)
            .with_delivery_mode(2);
        if let Some(id) = &broker.message_id {
            properties = properties.with_message_id(id.as_str().into());
        }
        if let Some(content_type) = &broker.content_type {
            properties = properties.with_content_type(content_type.as_str().into());
        }
        let (exchange, routing_key) = self.config.route();
        let published = tokio::time::timeout(
            RABBIT_TIMEOUT,
            channel.publish(exchange, routing_key, &broker.body, properties, true),
        )
        .await;
        let lost = match &published {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(e)) => e.is_channel_lost(),
            Err(_) => true,
        };
        if lost {
            self.reset().await;
        }
        Err(match published {
            Ok(Err(e)) => format!("the dead-letter RabbitMQ: {e}"),
            _ => format!("the dead-letter RabbitMQ did not confirm within {RABBIT_TIMEOUT:?}"),
        })
    }

    /// Forgets the connection: the next letter opens a new one.
    async fn reset(&self) {
        let open = self.session.lock().await.open.take();
        if let Some((conn, _)) = open {
            let _ = tokio::time::timeout(
                RABBIT_TIMEOUT,
                conn.close(200, "idemq: dead-letter channel lost".into()),
            )
            .await;
        }
    }

    async fn close(&self) {
        let open = self.session.lock().await.open.take();
        if let Some((conn, channel)) = open {
            let _ = tokio::time::timeout(RABBIT_TIMEOUT, async {
                channel.close().await;
                let _ = conn.close(200, "idemq: shutting down".into()).await;
            })
            .await;
        }
    }
}

/// A Kafka topic, through the Kafka source's dead-letter producer.
pub struct Kafka {
    topic: String,
    producer: KafkaDeadLetters,
}

impl Kafka {
    fn new(
        config: &KafkaDeadLetter,
        secrets: &KafkaSecrets,
        consumer: &str,
    ) -> Result<Self, SourceError> {
        let client = client_config(
            config.security(),
            secrets,
            &format!("idemq-sidecar {consumer} dead letters"),
        );
        let producer =
            KafkaDeadLetters::create(client, Some(KAFKA_DELIVERY_TIMEOUT)).map_err(|e| {
                SourceError::DeadLetterBroker(format!("the Kafka dead-letter producer: {e}"))
            })?;
        Ok(Self {
            topic: config.topic.clone(),
            producer,
        })
    }

    async fn send(&self, letter: &Letter<'_>) -> Result<(), String> {
        let broker = wire::broker_letter(
            letter.pattern,
            letter.endpoint,
            letter.frames,
            letter.problem,
        );
        let headers = publish::kafka_dead_letter_headers(
            broker
                .headers
                .iter()
                .map(|(k, v)| (k.as_str(), Some(v.as_bytes()))),
            letter.reason,
            letter.attempts,
            &pairs(&broker.origin),
        );
        self.producer
            .send(
                &self.topic,
                broker.message_id.as_deref().map(str::as_bytes),
                &broker.body,
                headers,
            )
            .await
            .map_err(|e| format!("the dead-letter Kafka topic {}: {e}", self.topic))
    }
}

fn pairs(headers: &[(String, String)]) -> Vec<(&str, &str)> {
    headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect()
}
