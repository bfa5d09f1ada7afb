//! RabbitMQ bindings: the queue, its exchange bindings and the dead-letter
//! exchange and queue, declared over AMQP with the credentials from the
//! connection Secret.
//!
//! An existing queue declared with other arguments makes the broker refuse
//! (PRECONDITION_FAILED): that is [`BindError::ArgumentsMismatch`], and
//! [`BindError::ExchangeMismatch`] for the dead-letter exchange.

use std::sync::Arc;
use std::time::Duration;

use lapin::protocol::{AMQPErrorKind, AMQPSoftError};

use lapin::options::{
    ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties, ExchangeKind};

use super::pool::{Connector, Pool, PoolConfig};
use super::BindError;
use crate::crd::RabbitMqBinding;

const TIMEOUT: Duration = Duration::from_secs(5);

/// What to declare for one RabbitMQ consumer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub queue: String,
    pub exchange: Option<String>,
    pub routing_keys: Vec<String>,
    pub dead_letter_exchange: String,
    pub dead_letter_queue: String,
}

impl Plan {
    pub fn of(rabbit: &RabbitMqBinding) -> Self {
        Self {
            queue: rabbit.queue.clone(),
            exchange: rabbit.exchange.clone(),
            routing_keys: rabbit.routing_keys.clone(),
            dead_letter_exchange: crate::render::config::dead_letter_exchange(rabbit),
            dead_letter_queue: format!("{}.dead", rabbit.queue),
        }
    }
}

/// Opens AMQP connections for the [`Pool`].
///
/// lapin 4 gives each connection an I/O thread of its own (`lapin-io-loop`,
/// started by `Connection::connect`, whatever the runtime feature); with the
/// `tokio` feature its executor, socket reactor and timers are the tokio
/// runtime's. So threads and buffers grow with connections, never with
/// resources: the pool keeps connections few.
pub struct AmqpConnector;

#[async_trait::async_trait]
impl Connector for AmqpConnector {
    type Endpoint = str;
    type Client = Connection;

    fn identity(url: &str) -> Vec<u8> {
        url.as_bytes().to_vec()
    }

    async fn connect(&self, url: &str) -> Result<Connection, BindError> {
        connect(url).await
    }

    fn usable(&self, conn: &Connection) -> bool {
        conn.status().connected()
    }

    async fn close(&self, conn: &Connection) {
        let _ = conn.close(200, "idemq-operator: idle".into()).await;
    }
}

/// The RabbitMQ binder, over AMQP: one pooled connection per broker URL, a
/// channel per operation.
pub struct Amqp {
    pool: Arc<Pool<AmqpConnector>>,
}

impl Default for Amqp {
    fn default() -> Self {
        Self::new(PoolConfig::default())
    }
}

async fn connect(url: &str) -> Result<Connection, BindError> {
    match tokio::time::timeout(
        TIMEOUT,
        Connection::connect(url, ConnectionProperties::default()),
    )
    .await
    {
        Ok(Ok(conn)) => Ok(conn),
        // The error text of a failed connect carries no credentials.
        Ok(Err(e)) => Err(BindError::Unreachable(e.to_string())),
        Err(_) => Err(BindError::Unreachable(format!(
            "no answer within {TIMEOUT:?}"
        ))),
    }
}

fn refused(e: lapin::Error) -> BindError {
    if soft_error(&e) == Some(AMQPSoftError::PRECONDITIONFAILED) {
        BindError::ArgumentsMismatch(e.to_string())
    } else {
        BindError::Refused(e.to_string())
    }
}

/// The broker's channel-level error code, when that is what `e` is.
fn soft_error(e: &lapin::Error) -> Option<AMQPSoftError> {
    match e.kind() {
        lapin::ErrorKind::ProtocolError(amqp) => match amqp.kind() {
            AMQPErrorKind::Soft(soft) => Some(soft.clone()),
            AMQPErrorKind::Hard(_) => None,
        },
        _ => None,
    }
}

impl Amqp {
    pub fn new(pool: PoolConfig) -> Self {
        Self {
            pool: Pool::new(AmqpConnector, pool),
        }
    }

    /// Connections open now.
    pub fn connections(&self) -> usize {
        self.pool.open()
    }

    pub async fn bind(&self, url: &str, plan: &Plan) -> Result<(), BindError> {
        let conn = self.pool.get(url).await?;
        let ch = conn.create_channel().await.map_err(refused)?;
        let result = async {
            let durable = QueueDeclareOptions {
                durable: true,
                ..Default::default()
            };
            // Dead letters are routed by the original queue's name, so consumers
            // can share one dead-letter exchange without seeing each other's.
            ch.exchange_declare(
                plan.dead_letter_exchange.as_str().into(),
                ExchangeKind::Direct,
                ExchangeDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|e| match refused(e) {
                BindError::ArgumentsMismatch(detail) => {
                    BindError::ExchangeMismatch(plan.dead_letter_exchange.clone(), detail)
                }
                other => other,
            })?;
            ch.queue_declare(
                plan.dead_letter_queue.as_str().into(),
                durable,
                FieldTable::default(),
            )
            .await
            .map_err(refused)?;
            ch.queue_bind(
                plan.dead_letter_queue.as_str().into(),
                plan.dead_letter_exchange.as_str().into(),
                plan.queue.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(refused)?;
            ch.queue_declare(plan.queue.as_str().into(), durable, FieldTable::default())
                .await
                .map_err(refused)?;
            if let Some(exchange) = &plan.exchange {
                for key in &plan.routing_keys {
                    ch.queue_bind(
                        plan.queue.as_str().into(),
                        exchange.as_str().into(),
                        key.as_str().into(),
                        QueueBindOptions::default(),
                        FieldTable::default(),
                    )
                    .await
                    .map_err(|e| {
                        if soft_error(&e) == Some(AMQPSoftError::NOTFOUND) {
                            BindError::ExchangeNotFound(exchange.clone())
                        } else {
                            refused(e)
                        }
                    })?;
                }
            }
            Ok(())
        }
        .await;
        // A refused declaration has closed the channel already.
        if ch.status().connected() {
            let _ = ch.close(200, "idemq-operator: bound".into()).await;
        }
        result
    }

    pub async fn delete_queues(&self, url: &str, plan: &Plan) -> Result<(), BindError> {
        let conn = self.pool.get(url).await?;
        let ch = conn.create_channel().await.map_err(refused)?;
        let result = async {
            for queue in [&plan.queue, &plan.dead_letter_queue] {
                ch.queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                    .await
                    .map_err(refused)?;
            }
            Ok(())
        }
        .await;
        if ch.status().connected() {
            let _ = ch.close(200, "idemq-operator: cleaned up".into()).await;
        }
        result
    }
}
