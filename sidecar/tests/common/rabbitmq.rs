//! The real RabbitMQ on 127.0.0.1:5672: queues and exchanges unique to one
//! test, publishing, counting, and deleting only what the test declared.

use lapin::options::{
    BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
    ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};

pub const URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// A work queue, its dead-letter exchange and the queue that collects dead letters.
pub struct Topology {
    pub queue: String,
    pub dlx: String,
    pub dlq: String,
    channel: Channel,
    _conn: Connection,
}

pub async fn topology(test: &str) -> Topology {
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
    channel
        .exchange_declare(
            dlx.as_str().into(),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("declare dlx");
    channel
        .queue_bind(
            dlq.as_str().into(),
            dlx.as_str().into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind dlq");
    Topology {
        queue,
        dlx,
        dlq,
        channel,
        _conn: conn,
    }
}

impl Topology {
    /// Publishes `body` to the work queue with `message_id` and `headers`, confirmed.
    pub async fn publish(&self, message_id: Option<&str>, headers: &[(&str, &str)], body: &[u8]) {
        let mut table = FieldTable::default();
        for (k, v) in headers {
            table.insert((*k).into(), AMQPValue::LongString(LongString::from(*v)));
        }
        let mut properties = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_headers(table);
        if let Some(id) = message_id {
            properties = properties.with_message_id(id.into());
        }
        let confirm = self
            .channel
            .basic_publish(
                "".into(),
                self.queue.as_str().into(),
                BasicPublishOptions::default(),
                body,
                properties,
            )
            .await
            .expect("publish")
            .await
            .expect("confirm");
        assert!(confirm.is_ack(), "broker refused a publish");
    }

    /// Publishes many messages, then waits for every confirm.
    pub async fn publish_batch(
        &self,
        messages: impl IntoIterator<Item = (Option<String>, Vec<u8>)>,
    ) {
        let mut confirms = Vec::new();
        for (id, body) in messages {
            let mut properties =
                BasicProperties::default().with_content_type("application/json".into());
            if let Some(id) = id {
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

    /// Messages ready in `queue` (not counting unacked ones).
    pub async fn ready(&self, queue: &str) -> u32 {
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

    /// Takes every dead letter, returning each one's `x-idemq-reason` and message id.
    pub async fn dead_letters(&self) -> Vec<(String, Option<String>)> {
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
            out.push((
                reason,
                p.message_id().as_ref().map(|s| s.as_str().to_string()),
            ));
        }
        out
    }

    /// Deletes the queues and exchange this topology declared.
    pub async fn delete(self) {
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
