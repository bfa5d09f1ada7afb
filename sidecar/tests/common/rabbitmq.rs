//! The real RabbitMQ on 127.0.0.1:5672 as a [`BrokerUnderTest`]: queues and
//! exchanges unique to one test, publishing, counting, and deleting only what
//! the test declared. Keys travel as the AMQP `message_id`.

use std::process::Command;

use idemq_sidecar::secrets::Secrets;

use lapin::options::{
    BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
    ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};

use super::broker::{BrokerUnderTest, DeadLetter, LosesBroker, Message};

pub const URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// A work queue, its dead-letter exchange and the queue that collects dead letters.
pub struct RabbitMq {
    pub queue: String,
    pub dlx: String,
    pub dlq: String,
    channel: Channel,
    _conn: Connection,
}

async fn topology(test: &str) -> RabbitMq {
    let conn = Connection::connect(URL, ConnectionProperties::default())
        .await
        .unwrap_or_else(|e| {
            panic!(
                "RabbitMQ does not answer on {URL} ({e}); start it with: rabbitmq-server -detached"
            )
        });
    let channel = conn.create_channel().await.expect("channel");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm mode");
    let queue = super::unique(test);
    let dlx = format!("{queue}.dlx");
    let dlq = format!("{queue}.dlq");
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    for q in [&queue, &dlq] {
        channel
            .queue_declare(q.as_str().into(), durable, FieldTable::default())
            .await
            .expect("declare queue");
    }
    let t = RabbitMq {
        queue,
        dlx,
        dlq,
        channel,
        _conn: conn,
    };
    t.declare_exchange(&t.dlx).await;
    t
}

impl RabbitMq {
    /// Declares the durable fanout exchange `name`, bound to the dead-letter queue.
    pub async fn declare_exchange(&self, name: &str) {
        self.channel
            .exchange_declare(
                name.into(),
                ExchangeKind::Fanout,
                ExchangeDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("declare exchange");
        self.channel
            .queue_bind(
                self.dlq.as_str().into(),
                name.into(),
                "".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("bind dlq");
    }

    pub async fn delete_exchange(&self, name: &str) {
        let _ = self
            .channel
            .exchange_delete(name.into(), ExchangeDeleteOptions::default())
            .await;
    }

    /// Messages ready in `queue` (not counting unacked ones).
    async fn ready(&self, queue: &str) -> u32 {
        let passive = QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        self.channel
            .queue_declare(queue.into(), passive, FieldTable::default())
            .await
            .expect("passive declare")
            .message_count()
    }
}

impl BrokerUnderTest for RabbitMq {
    const NAME: &'static str = "rabbitmq";

    async fn create(test: &str) -> Self {
        topology(test).await
    }

    fn broker_yaml(&self, max_in_flight: u32) -> String {
        format!(
            "  rabbitmq:\n    queue: {}\n    prefetch: {max_in_flight}\n    deadLetterExchange: {}\n",
            self.queue, self.dlx
        )
    }

    fn dedup_key_yaml(&self) -> String {
        String::new()
    }

    fn secrets(&self) -> Secrets {
        Secrets {
            broker_url: Some(URL.to_string()),
            ..Secrets::default()
        }
    }

    fn env(&self) -> Vec<(String, String)> {
        vec![("IDEMQ_BROKER_URL".to_string(), URL.to_string())]
    }

    /// Publishes every message, then waits for every confirm.
    async fn publish(&self, messages: Vec<Message>) {
        let mut confirms = Vec::new();
        for Message { key, body } in messages {
            let mut properties =
                BasicProperties::default().with_content_type("application/json".into());
            if let Some(id) = key {
                properties = properties.with_message_id(id.into());
            }
            confirms.push(
                self.channel
                    .basic_publish(
                        "".into(),
                        self.queue.as_str().into(),
                        BasicPublishOptions::default(),
                        &body,
                        properties,
                    )
                    .await
                    .expect("publish"),
            );
        }
        for confirm in confirms {
            assert!(
                confirm.await.expect("confirm").is_ack(),
                "broker refused a publish"
            );
        }
    }

    async fn backlog(&self) -> u64 {
        u64::from(self.ready(&self.queue).await)
    }

    /// Takes every dead letter, with its `x-idemq-reason` and message id.
    async fn dead_letters(&self) -> Vec<DeadLetter> {
        let mut out = Vec::new();
        while let Some(message) = self
            .channel
            .basic_get(self.dlq.as_str().into(), BasicGetOptions { no_ack: true })
            .await
            .expect("basic_get")
        {
            let p = &message.delivery.properties;
            let reason = p
                .headers()
                .as_ref()
                .and_then(|h| h.inner().get("x-idemq-reason").cloned())
                .and_then(|v| match v {
                    AMQPValue::LongString(s) => {
                        Some(String::from_utf8_lossy(s.as_bytes()).into_owned())
                    }
                    _ => None,
                })
                .unwrap_or_default();
            out.push(DeadLetter {
                reason,
                key: p.message_id().as_ref().map(|s| s.as_str().to_string()),
            });
        }
        out
    }

    /// Deletes the queues and exchange this topology declared.
    async fn delete(self) {
        for q in [&self.queue, &self.dlq] {
            let _ = self
                .channel
                .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
        let _ = self
            .channel
            .exchange_delete(self.dlx.as_str().into(), ExchangeDeleteOptions::default())
            .await;
    }
}

impl RabbitMq {
    /// The broker-side process id of the connection named after `consumer`.
    fn connection(&self, consumer: &str) -> Option<String> {
        let out = Command::new("rabbitmqctl")
            .args([
                "list_connections",
                "-q",
                "--no-table-headers",
                "pid",
                "client_properties",
            ])
            .output()
            .expect("run rabbitmqctl");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find(|l| l.contains(&format!("idemq-sidecar {consumer}")))
            .and_then(|l| l.split_whitespace().next())
            .map(str::to_string)
    }
}

/// The shared RabbitMQ stays up: the broker closes the sidecar's connection.
impl LosesBroker for RabbitMq {
    const LOSS: &'static str = "its connection closed by the broker";
    const AWAY: std::time::Duration = std::time::Duration::ZERO;
    /// About 8 s at 50 in flight and 100 ms per message: rabbitmqctl may be
    /// slow to start and close the connection.
    const MESSAGES: usize = 4000;

    async fn cut(&self, consumer: &str) {
        let id = self
            .connection(consumer)
            .expect("the sidecar's connection is listed");
        let closed = Command::new("rabbitmqctl")
            .args(["close_connection", &id, "test closes the connection"])
            .output()
            .expect("run rabbitmqctl");
        assert!(
            closed.status.success(),
            "{}",
            String::from_utf8_lossy(&closed.stderr)
        );
    }

    async fn restore(&self) {}
}
