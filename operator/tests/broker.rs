//! Broker bindings against the real RabbitMQ on 127.0.0.1:5672. Each test
//! declares queues with unique names and deletes only those.

use idemq_operator::broker::rabbitmq::{Amqp, Plan};
use idemq_operator::broker::BindError;
use lapin::options::{
    BasicPublishOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties, ExchangeKind};

const URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

fn unique(base: &str) -> String {
    format!(
        "{base}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..10]
    )
}

fn plan(queue: &str, exchange: Option<&str>) -> Plan {
    Plan {
        queue: queue.to_string(),
        exchange: exchange.map(str::to_string),
        routing_keys: vec!["order.created".into(), "order.paid".into()],
        dead_letter_exchange: format!("{queue}.dlx"),
        dead_letter_queue: format!("{queue}.dead"),
    }
}

async fn channel() -> (Connection, lapin::Channel) {
    let conn = Connection::connect(URL, ConnectionProperties::default())
        .await
        .unwrap_or_else(|e| {
            panic!(
                "RabbitMQ does not answer on {URL} ({e}); start it with: rabbitmq-server -detached"
            )
        });
    let ch = conn.create_channel().await.expect("channel");
    (conn, ch)
}

async fn ready(ch: &lapin::Channel, queue: &str) -> u32 {
    ch.queue_declare(
        queue.into(),
        QueueDeclareOptions {
            passive: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("the queue exists")
    .message_count()
}

async fn cleanup(ch: &lapin::Channel, p: &Plan, exchange: Option<&str>) {
    for q in [&p.queue, &p.dead_letter_queue] {
        let _ = ch
            .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    for x in [Some(p.dead_letter_exchange.as_str()), exchange]
        .into_iter()
        .flatten()
    {
        let _ = ch
            .exchange_delete(x.into(), ExchangeDeleteOptions::default())
            .await;
    }
}

#[tokio::test]
async fn bindings_are_declared_idempotently_and_route() {
    let queue = unique("op-bind");
    let exchange = format!("{queue}.events");
    let (_conn, ch) = channel().await;
    ch.exchange_declare(
        exchange.as_str().into(),
        ExchangeKind::Topic,
        ExchangeDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("declare the app's exchange");
    let p = plan(&queue, Some(&exchange));
    Amqp::default().bind(URL, &p).await.expect("first bind");
    Amqp::default()
        .bind(URL, &p)
        .await
        .expect("binding again changes nothing");

    let publish = |x: String, key: &'static str| {
        let ch = ch.clone();
        async move {
            ch.basic_publish(
                x.as_str().into(),
                key.into(),
                BasicPublishOptions::default(),
                b"{}",
                BasicProperties::default(),
            )
            .await
            .expect("publish");
        }
    };
    publish(exchange.clone(), "order.paid").await;
    publish(exchange.clone(), "order.shipped").await;
    // Dead letters are routed by the queue's name to its own dead-letter queue.
    publish(p.dead_letter_exchange.clone(), "someone-else").await;
    publish(p.dead_letter_exchange.clone(), "").await;
    let queue_for_dlx = queue.clone();
    ch.basic_publish(
        p.dead_letter_exchange.as_str().into(),
        queue_for_dlx.as_str().into(),
        BasicPublishOptions::default(),
        b"{}",
        BasicProperties::default(),
    )
    .await
    .expect("publish");
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(
        ready(&ch, &queue).await,
        1,
        "only the bound routing key reaches the queue"
    );
    assert_eq!(
        ready(&ch, &p.dead_letter_queue).await,
        1,
        "only this queue's dead letters"
    );
    cleanup(&ch, &p, Some(&exchange)).await;
}

#[tokio::test]
async fn an_existing_queue_with_other_arguments_is_reported_not_fought() {
    let queue = unique("op-mismatch");
    let (_conn, ch) = channel().await;
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), AMQPValue::LongInt(10));
    ch.queue_declare(
        queue.as_str().into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        args,
    )
    .await
    .expect("declare the user's queue");
    let p = plan(&queue, None);
    match Amqp::default().bind(URL, &p).await {
        Err(BindError::ArgumentsMismatch(message)) => assert!(
            message.contains("PRECONDITION_FAILED") || message.contains("inequivalent"),
            "{message}"
        ),
        other => panic!("expected an arguments mismatch, got {other:?}"),
    }
    // The user's queue is untouched.
    let (_conn2, ch2) = channel().await;
    ready(&ch2, &queue).await;
    cleanup(&ch2, &p, None).await;
}

#[tokio::test]
async fn a_dead_letter_exchange_of_another_type_is_reported_as_an_exchange_mismatch() {
    let queue = unique("op-dlx-type");
    let p = plan(&queue, None);
    let (_conn, ch) = channel().await;
    // Someone declared the dead-letter exchange as fanout; idemq's is direct.
    ch.exchange_declare(
        p.dead_letter_exchange.as_str().into(),
        ExchangeKind::Fanout,
        ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("declare the other exchange");
    match Amqp::default().bind(URL, &p).await {
        Err(e @ BindError::ExchangeMismatch(..)) => {
            let BindError::ExchangeMismatch(name, detail) = &e else {
                unreachable!()
            };
            assert_eq!(name, &p.dead_letter_exchange);
            assert!(detail.contains("inequivalent arg 'type'"), "{detail}");
            assert!(!e.to_string().contains("queue exists"), "{e}");
        }
        other => panic!("expected an exchange mismatch, got {other:?}"),
    }
    // The other exchange is untouched: still there, still fanout.
    let (_conn2, ch2) = channel().await;
    ch2.exchange_declare(
        p.dead_letter_exchange.as_str().into(),
        ExchangeKind::Fanout,
        ExchangeDeclareOptions {
            passive: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("the fanout exchange is still there");
    cleanup(&ch2, &p, None).await;
}

#[tokio::test]
async fn a_missing_exchange_is_named_not_declared() {
    let queue = unique("op-noexchange");
    let exchange = unique("op-absent");
    let mut p = plan(&queue, Some(&exchange));
    p.routing_keys = vec!["order.created".into()];
    assert_eq!(
        Amqp::default().bind(URL, &p).await,
        Err(BindError::ExchangeNotFound(exchange.clone()))
    );
    // Not declared behind the user's back.
    let (_conn, ch) = channel().await;
    let passive = ch
        .exchange_declare(
            exchange.as_str().into(),
            lapin::ExchangeKind::Topic,
            lapin::options::ExchangeDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await;
    assert!(passive.is_err(), "the exchange was declared");
    let (_conn2, ch2) = channel().await;
    cleanup(&ch2, &p, None).await;
}

#[tokio::test]
async fn an_unreachable_broker_is_reported() {
    let p = plan(&unique("op-down"), None);
    match Amqp::default()
        .bind("amqp://guest:guest@127.0.0.1:1/%2f", &p)
        .await
    {
        Err(BindError::Unreachable(message)) => assert!(
            !message.contains("guest:guest"),
            "no credentials in {message}"
        ),
        other => panic!("expected unreachable, got {other:?}"),
    }
}

#[tokio::test]
async fn a_malformed_url_is_reported_without_its_password() {
    let p = plan(&unique("op-badurl"), None);
    match Amqp::default()
        .bind("amqp://guest:s3cret@rabbit:notaport/%2f", &p)
        .await
    {
        Err(BindError::Unreachable(message)) => assert!(!message.contains("s3cret"), "{message}"),
        other => panic!("expected unreachable, got {other:?}"),
    }
}

#[tokio::test]
async fn delete_on_cleanup_removes_both_queues() {
    let queue = unique("op-delete");
    let p = plan(&queue, None);
    Amqp::default().bind(URL, &p).await.expect("bind");
    Amqp::default()
        .delete_queues(URL, &p)
        .await
        .expect("delete");
    let (_conn, ch) = channel().await;
    let passive = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    assert!(
        ch.queue_declare(queue.as_str().into(), passive, FieldTable::default())
            .await
            .is_err(),
        "queue deleted"
    );
    let (_conn, ch) = channel().await;
    let _ = ch
        .exchange_delete(
            p.dead_letter_exchange.as_str().into(),
            ExchangeDeleteOptions::default(),
        )
        .await;
}

#[tokio::test]
async fn concurrent_bindings_to_one_broker_share_one_connection() {
    let amqp = Amqp::default();
    let plans: Vec<_> = (0..20).map(|_| plan(&unique("op-shared"), None)).collect();
    let bound = futures::future::join_all(plans.iter().map(|p| amqp.bind(URL, p))).await;
    assert!(bound.iter().all(Result::is_ok), "{bound:?}");
    assert_eq!(amqp.connections(), 1, "one connection for one URL");
    for p in &plans {
        amqp.delete_queues(URL, p).await.expect("delete");
    }
    let (_conn, ch) = channel().await;
    for p in &plans {
        cleanup(&ch, p, None).await;
    }
}
