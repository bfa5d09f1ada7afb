//! CloudEvents keys through the whole pipeline, against the real RabbitMQ and
//! Redis: events in binary mode (AMQP application properties `cloudEvents_*`)
//! and in structured mode (`application/cloudevents+json` bodies), each
//! published twice, reach the application once; the same `id` from another
//! `source` is another event.

mod common;

use common::broker::BrokerUnderTest;
use common::rabbitmq::{RabbitMq, URL};
use common::scenarios::{self, Store, WAIT};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Connection, ConnectionProperties};

fn binary(source: &str, id: &str) -> (BasicProperties, Vec<u8>) {
    let mut headers = FieldTable::default();
    for (name, value) in [
        ("cloudEvents_specversion", "1.0"),
        ("cloudEvents_type", "order.created"),
        ("cloudEvents_source", source),
        ("cloudEvents_id", id),
    ] {
        headers.insert(name.into(), AMQPValue::LongString(LongString::from(value)));
    }
    let properties = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_headers(headers);
    (properties, format!(r#"{{"order":"{id}"}}"#).into_bytes())
}

fn structured(source: &str, id: &str) -> (BasicProperties, Vec<u8>) {
    let properties =
        BasicProperties::default().with_content_type("application/cloudevents+json".into());
    let body = serde_json::json!({
        "specversion": "1.0", "type": "order.created", "source": source, "id": id,
        "datacontenttype": "application/json", "data": { "order": id },
    });
    (properties, body.to_string().into_bytes())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloud_events_in_binary_and_structured_mode_are_processed_once() {
    let t = RabbitMq::create("cloudevents").await;
    let app = common::app::start(common::app::always_ok()).await;
    let store = Store::new("cloudevents").await;
    let config = scenarios::config(&t, &app, "cloudevents", 20, "  key:\n    from: cloudEvent");
    let sidecar = scenarios::start(&t, config, store.dyn_store()).await;

    // 100 events: 25 ids × 2 sources in each mode; every one published twice.
    let mut events = Vec::new();
    for i in 0..25 {
        for source in ["/shop/orders", "/shop/refunds"] {
            events.push(binary(source, &format!("b-{i}")));
            events.push(structured(source, &format!("s-{i}")));
        }
    }
    let conn = Connection::connect(URL, ConnectionProperties::default())
        .await
        .expect("connect");
    let channel = conn.create_channel().await.expect("channel");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm mode");
    for (properties, body) in events.iter().chain(events.iter()) {
        channel
            .basic_publish(
                "".into(),
                t.queue.as_str().into(),
                BasicPublishOptions::default(),
                body,
                properties.clone(),
            )
            .await
            .expect("publish")
            .await
            .expect("confirm");
    }
    let published = 2 * events.len() as u64;
    let settled = scenarios::wait_for(WAIT, async || {
        scenarios::messages(&sidecar, "delivered").await
            + scenarios::messages(&sidecar, "duplicate").await
            >= published
    })
    .await;
    let duplicates = scenarios::messages(&sidecar, "duplicate").await;
    sidecar.stop().await.expect("clean stop");
    println!(
        "cloudevents: published {published} (100 events, binary and structured, each twice), app processed {} ({} distinct, {} twice), duplicates dropped {duplicates}",
        app.processed(),
        app.distinct(),
        app.processed_twice()
    );
    assert!(settled, "not every message was settled");
    assert_eq!(app.distinct(), events.len(), "one key per (source, id)");
    assert_eq!(app.processed(), events.len() as u32, "each event once");
    assert_eq!(duplicates, events.len() as u64);
    assert!(
        t.dead_letters().await.is_empty(),
        "every message had a CloudEvents key"
    );
    store.cleanup().await;
    t.delete().await;
}
