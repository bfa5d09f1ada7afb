//! Traces through the pipeline, against the real RabbitMQ and Redis and a
//! local OTLP/HTTP receiver ([`common::otlp`]): a message that carries a W3C
//! `traceparent` reaches the application in the same trace, as a child of the
//! sidecar's delivery span; its duplicate is traced with the dedup outcome;
//! a message without a trace starts one. The receiver gets every span, linked
//! parent to child, and no span carries the key.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::broker::BrokerUnderTest;
use common::otlp::{self, Span};
use common::rabbitmq::{RabbitMq, URL};
use common::scenarios::{self, Store, WAIT};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PRODUCER_SPAN: &str = "00f067aa0ba902b7";
const OTHER_TRACE: &str = "0af7651916cd43dd8448eb211c80319c";

async fn publish(channel: &Channel, queue: &str, id: &str, trace: Option<&str>) {
    let mut properties = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_message_id(id.into());
    if let Some(trace) = trace {
        let mut headers = FieldTable::default();
        let traceparent = format!("00-{trace}-{PRODUCER_SPAN}-01");
        for (name, value) in [
            ("traceparent", traceparent.as_str()),
            ("tracestate", "shop=7"),
        ] {
            headers.insert(name.into(), AMQPValue::LongString(LongString::from(value)));
        }
        properties = properties.with_headers(headers);
    }
    let body = format!(r#"{{"order":"{id}"}}"#);
    let confirm = channel
        .basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions::default(),
            body.as_bytes(),
            properties,
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
    assert!(confirm.is_ack(), "the broker refused a publish");
}

/// `traceparent` → (trace id, parent id, flags).
fn parse(traceparent: &str) -> (String, String, String) {
    let parts: Vec<&str> = traceparent.split('-').collect();
    assert_eq!(parts.len(), 4, "traceparent {traceparent}");
    assert_eq!(parts[0], "00", "version");
    (parts[1].into(), parts[2].into(), parts[3].into())
}

fn named<'a>(spans: &'a [Span], trace: &str, name: &str) -> Vec<&'a Span> {
    spans
        .iter()
        .filter(|s| s.trace_id == trace && s.name == name)
        .collect()
}

fn one<'a>(spans: &'a [Span], trace: &str, name: &str) -> &'a Span {
    let found = named(spans, trace, name);
    assert_eq!(
        found.len(),
        1,
        "one {name} span in trace {trace}: {spans:#?}"
    );
    found[0]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_trace_reaches_the_app_through_the_sidecars_spans() {
    let t = RabbitMq::create("traces").await;
    let app = common::app::start(common::app::always_ok()).await;
    let store = Store::new("traces").await;
    let receiver = otlp::start().await;
    let mut config = scenarios::config(&t, &app, "traces", 10, "");
    config.traces.endpoint = Some(receiver.endpoint());
    let sidecar = scenarios::start(&t, config, store.dyn_store()).await;

    let conn = Connection::connect(URL, ConnectionProperties::default())
        .await
        .expect("connect");
    let channel = conn.create_channel().await.expect("channel");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm mode");
    let key = common::unique("order");
    let untraced_key = common::unique("order");

    // 1. A message in the producer's trace.
    publish(&channel, &t.queue, &key, Some(TRACE)).await;
    // Settled, so its completion is recorded before the duplicate comes.
    let settled = scenarios::wait_for(WAIT, async || {
        scenarios::messages(&sidecar, "delivered").await == 1
    })
    .await;
    assert!(settled, "the first message was not settled");
    let sent = app
        .last_header("traceparent")
        .expect("the app got a traceparent");
    let tracestate = app.last_header("tracestate");
    // 2. Its duplicate, in another trace: dropped, never delivered.
    publish(&channel, &t.queue, &key, Some(OTHER_TRACE)).await;
    let dropped = scenarios::wait_for(WAIT, async || {
        scenarios::messages(&sidecar, "duplicate").await == 1
    })
    .await;
    // 3. A message without a trace: the sidecar starts one.
    publish(&channel, &t.queue, &untraced_key, None).await;
    assert!(app.wait_until(WAIT, |a| a.processed() == 2).await);
    let started = app.last_header("traceparent").expect("a started trace");
    // Stopping the sidecar exports what its batch still holds.
    sidecar.stop().await.expect("clean stop");
    let exported = scenarios::wait_for(Duration::from_secs(10), async || {
        receiver
            .spans()
            .iter()
            .filter(|s| s.name.starts_with("process "))
            .count()
            >= 3
    })
    .await;
    let spans = receiver.spans();

    let (trace, parent, flags) = parse(&sent);
    let (new_trace, new_parent, _) = parse(&started);
    println!(
        "traces: producer sent 00-{TRACE}-{PRODUCER_SPAN}-01, the app got {sent} (tracestate {tracestate:?}); without a trace the app got {started}; the receiver got {} spans ({} export requests rejected): {:?}",
        spans.len(),
        receiver.rejected(),
        spans.iter().map(|s| s.name.as_str()).collect::<Vec<_>>()
    );
    assert!(dropped, "the duplicate was not dropped");
    assert!(
        exported,
        "the receiver did not get 3 message spans: {spans:#?}"
    );
    assert_eq!(receiver.rejected(), 0);

    // The application continues the producer's trace, as a child of the
    // sidecar's delivery span.
    assert_eq!(trace, TRACE, "same trace id");
    assert_ne!(parent, PRODUCER_SPAN, "a child span id, not the producer's");
    assert_eq!(flags, "01", "still sampled");
    assert_eq!(tracestate.as_deref(), Some("shop=7"), "tracestate goes on");
    let process = one(&spans, TRACE, &format!("process {}", t.queue));
    let claim = one(&spans, TRACE, "claim");
    let deliver = one(&spans, TRACE, "deliver");
    let complete = one(&spans, TRACE, "complete");
    let settle = one(&spans, TRACE, "settle");
    assert_eq!(
        process.parent_span_id, PRODUCER_SPAN,
        "the producer's span is the parent"
    );
    for child in [claim, deliver, complete, settle] {
        assert_eq!(
            child.parent_span_id, process.span_id,
            "{} under the message span",
            child.name
        );
    }
    assert_eq!(
        deliver.span_id, parent,
        "the app's parent is the delivery span"
    );
    assert_eq!(process.attr("idemq.outcome"), Some("delivered"));
    assert_eq!(process.attr("messaging.system"), Some("rabbitmq"));
    assert_eq!(
        process.attr("messaging.destination.name"),
        Some(t.queue.as_str())
    );
    assert_eq!(claim.attr("idemq.claim.result"), Some("acquired"));
    assert_eq!(deliver.attr("idemq.delivery.result"), Some("success"));
    assert_eq!(deliver.attr("idemq.attempt"), Some("1"));
    assert_eq!(settle.attr("idemq.settlement"), Some("ack"));
    assert_eq!(
        process.resource.get("service.name").map(String::as_str),
        Some("idemq-sidecar")
    );
    assert_eq!(
        process.resource.get("idemq.consumer").map(String::as_str),
        Some("traces")
    );

    // The duplicate: its own trace, the dedup outcome, no delivery.
    let duplicate = one(&spans, OTHER_TRACE, &format!("process {}", t.queue));
    assert_eq!(duplicate.attr("idemq.outcome"), Some("duplicate"));
    assert_eq!(
        one(&spans, OTHER_TRACE, "claim").attr("idemq.claim.result"),
        Some("completed")
    );
    assert!(
        named(&spans, OTHER_TRACE, "deliver").is_empty(),
        "a duplicate is not delivered"
    );

    // No trace arrived: the message span is the root of a new trace.
    assert_ne!(new_trace, TRACE);
    let root = one(&spans, &new_trace, &format!("process {}", t.queue));
    assert_eq!(root.parent_span_id, "", "a new trace's root");
    assert_eq!(one(&spans, &new_trace, "deliver").span_id, new_parent);

    // The key's value appears nowhere unless asked (traces.recordKey).
    let keys: HashSet<&str> = [key.as_str(), untraced_key.as_str()].into();
    for span in &spans {
        assert!(span.attr("idemq.key").is_none(), "{span:#?}");
        assert!(
            span.attributes.values().all(|v| !keys.contains(v.as_str())),
            "a key's value in {span:#?}"
        );
    }
    store.cleanup().await;
    t.delete().await;
}
