//! Broker bindings: what a consumer needs declared on its broker (queues,
//! bindings, dead-letter routes), behind one [`Binder`] trait.
//!
//! Each broker lives in its own module (`rabbitmq.rs`, and one file per
//! broker added later) and contributes a variant of [`Plan`], built from the
//! resource's spec by [`Plan::of`]. [`Brokers`] is the production binder: it
//! sends each plan to its broker's binder. Controller tests substitute a fake.
//!
//! Every broker keeps one [`pool::Pool`] of clients, one per endpoint and
//! credentials, so the connections the operator holds are bounded by
//! configuration, not by the number of resources.
//!
//! Declarations are idempotent. A broker that refuses one (an existing queue
//! declared with other arguments, a user without permissions) is reported to
//! the user, not fought: redeclaring would mean deleting their messages.

pub mod pool;
pub mod rabbitmq;

use crate::crd::{IdempotentConsumer, SecretKeyRef};

/// What to declare for one consumer, on the broker its spec names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    RabbitMq(rabbitmq::Plan),
}

impl Plan {
    pub fn of(ic: &IdempotentConsumer) -> Self {
        Plan::RabbitMq(rabbitmq::Plan::of(ic))
    }

    /// A sentence for the status: what is declared once bound.
    pub fn describe(&self) -> String {
        match self {
            Plan::RabbitMq(p) => format!(
                "queue {} and dead-letter queue {} are declared",
                p.queue, p.dead_letter_queue
            ),
        }
    }
}

/// The Secret key holding the broker's connection URL (with credentials).
pub fn connection_secret(ic: &IdempotentConsumer) -> &SecretKeyRef {
    &ic.spec.broker.rabbitmq.connection_secret_ref
}

/// Whether the queues go with the resource when it is deleted.
pub fn delete_on_cleanup(ic: &IdempotentConsumer) -> bool {
    ic.spec.broker.rabbitmq.delete_on_cleanup
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BindError {
    #[error("the broker is unreachable: {0}")]
    Unreachable(String),
    /// The queue (or topic, stream) exists with other arguments.
    #[error("the queue exists with other arguments: {0}")]
    ArgumentsMismatch(String),
    /// Any other refusal (a user without permissions, …).
    #[error("the broker refused a declaration: {0}")]
    Refused(String),
    /// The exchange to bind to does not exist. It belongs to its producers:
    /// idemq binds to it but does not guess its type to declare it.
    #[error("exchange {0:?} does not exist; declare it (its producers own it) or remove `exchange` from the spec")]
    ExchangeNotFound(String),
}

/// Declares and removes bindings; a trait so controller tests can substitute it.
///
/// `url` is the connection URL read from the resource's Secret; it carries
/// credentials and must never appear in an error, a log line or a status.
#[async_trait::async_trait]
pub trait Binder: Send + Sync {
    async fn bind(&self, url: &str, plan: &Plan) -> Result<(), BindError>;
    async fn delete_queues(&self, url: &str, plan: &Plan) -> Result<(), BindError>;
}

/// The production binder: each plan goes to its broker.
#[derive(Default)]
pub struct Brokers {
    pub rabbitmq: rabbitmq::Amqp,
}

impl Brokers {
    /// Each broker's pool gets `pool`.
    pub fn new(pool: pool::PoolConfig) -> Self {
        Self {
            rabbitmq: rabbitmq::Amqp::new(pool),
        }
    }
}

#[async_trait::async_trait]
impl Binder for Brokers {
    async fn bind(&self, url: &str, plan: &Plan) -> Result<(), BindError> {
        match plan {
            Plan::RabbitMq(p) => self.rabbitmq.bind(url, p).await,
        }
    }

    async fn delete_queues(&self, url: &str, plan: &Plan) -> Result<(), BindError> {
        match plan {
            Plan::RabbitMq(p) => self.rabbitmq.delete_queues(url, p).await,
        }
    }
}
