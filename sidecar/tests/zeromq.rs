//! The ZeroMQ ingress against real sockets and the real Redis: the pipeline
//! scenarios (`common/scenarios.rs`) with a Lazy Pirate client as the
//! "broker" of the `router` pattern, then what only ZeroMQ has: replies lost
//! on the way back, CURVE keys, and the `pull` and `sub` patterns. Run with
//! `--nocapture` to see each test's figures.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::broker::BrokerUnderTest;
use common::broker::Message;
use common::kafka::Kafka;
use common::proxy::Proxy;
use common::rabbitmq::RabbitMq;
use common::scenarios::{self, free_port, keyed, messages, metric, wait_for, Store, WAIT};
use common::tansu::OwnTansu;
use common::zeromq::{
    self as zmq_test, Curve, DeadLetterReader, KeyPair, Pirate, PirateOptions, ZeroMq,
    ZeroMqToKafka, ZeroMqToRabbitMq,
};
use common::{app, sidecar};
use idemq_sidecar::config::Config;
use idemq_sidecar::secrets::Secrets;
use idemq_sidecar::source::zeromq::socket::send_frames;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producer_duplicates_are_delivered_exactly_once() {
    scenarios::producer_duplicates_are_delivered_exactly_once::<ZeroMq>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_failures_are_retried_and_processed_once() {
    scenarios::transient_failures_are_retried_and_processed_once::<ZeroMq>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_messages_are_dead_lettered_with_a_reason() {
    scenarios::poison_messages_are_dead_lettered_with_a_reason::<ZeroMq>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_keys_are_dead_lettered_by_default() {
    scenarios::missing_keys_are_dead_lettered_by_default::<ZeroMq>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_messages_are_dead_lettered_to_a_rabbitmq_exchange_with_a_reason() {
    scenarios::poison_messages_are_dead_lettered_with_a_reason::<ZeroMqToRabbitMq>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_keys_are_dead_lettered_to_a_rabbitmq_exchange() {
    scenarios::missing_keys_are_dead_lettered_by_default::<ZeroMqToRabbitMq>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_messages_are_dead_lettered_to_a_kafka_topic_with_a_reason() {
    scenarios::poison_messages_are_dead_lettered_with_a_reason::<ZeroMqToKafka>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_keys_are_dead_lettered_to_a_kafka_topic() {
    scenarios::missing_keys_are_dead_lettered_by_default::<ZeroMqToKafka>().await;
}

/// The dead-letter RabbitMQ goes away (a proxy of the test's own cuts the
/// sidecar off it): poison and keyless requests are answered `retry`
/// (dead_letter_unavailable), none `dead`; once it is back, the sidecar
/// reconnects, every one is answered `dead` and is in the dead-letter queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_rabbitmq_outage_answers_retry_then_dead_and_loses_nothing() {
    let rabbit = <RabbitMq as BrokerUnderTest>::create("zmq-dl-outage").await;
    let proxy = Proxy::start("127.0.0.1:5672").await;
    let port = free_port();
    let app = app::start(Arc::new(|_: &str, _| axum::http::StatusCode::BAD_REQUEST)).await;
    let store = Store::new("zmq-dl-outage").await;
    let broker = zmq_test::broker_yaml_to(
        port,
        "router",
        "    plain: true\n",
        20,
        &format!("      rabbitmq:\n        queue: {}\n", rabbit.dlq),
    );
    let yaml = format!(
        "consumer: zmq-dl-outage\nstore:\n  kind: redis\n  url: redis://127.0.0.1:6379\ndedup:\n  maxAttempts: 3\nbroker:\n{broker}delivery:\n  url: {}\n  initialBackoff: 20ms\n  maxBackoff: 200ms\nshutdownGrace: 10s\n",
        app.url()
    );
    let config = Config::from_yaml(&yaml).expect("valid test config");
    let secrets = Secrets {
        broker_url: Some(zmq_test::rabbitmq_url_through(&proxy)),
        ..Secrets::default()
    };
    let sidecar = sidecar::start_with(config, secrets, store.dyn_store()).await;
    proxy.cut();
    let pirate = Pirate::start(PirateOptions {
        retry_after: Duration::from_millis(200),
        ..PirateOptions::new(format!("tcp://127.0.0.1:{port}"))
    });
    let (poison, keyless) = (10, 5);
    let told_retry = send_while_dead_letters_are_away(&pirate, "dl", poison, keyless).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let during = pirate.tally();
    let queued_during = BrokerUnderTest::dead_letters(&rabbit).await.len();
    proxy.restore();
    let answered = pirate.wait_answered(Duration::from_secs(60)).await;
    let after = pirate.tally();
    let dead = BrokerUnderTest::dead_letters(&rabbit).await;
    sidecar.stop().await.expect("clean stop");
    let keys: std::collections::BTreeSet<_> = dead.iter().filter_map(|d| d.key.clone()).collect();
    println!(
        "dead-letter rabbitmq outage (zeromq): {poison} poison and {keyless} keyless requests; while it was away: {} dead, retry {:?}, {queued_during} in the dead-letter queue; once back: {} dead, {} in the queue ({} distinct keys, reasons {:?}); app attempts {}",
        during.dead,
        during.retry_reasons,
        after.dead,
        dead.len(),
        keys.len(),
        dead.iter().map(|d| d.reason.as_str()).collect::<std::collections::BTreeSet<_>>(),
        app.attempts()
    );
    assert!(
        told_retry,
        "peers were not told retry (dead_letter_unavailable): {:?}",
        during.retry_reasons
    );
    assert_eq!(
        during.dead, 0,
        "nothing is answered dead while the dead-letter broker is away"
    );
    assert_eq!(queued_during, 0);
    assert!(answered, "{} requests unanswered", pirate.unanswered());
    assert_eq!(
        after.dead,
        (poison + keyless) as u64,
        "every request ends dead"
    );
    assert_eq!(after.ok, 0);
    assert_eq!(
        dead.len(),
        poison + keyless,
        "each dead letter once in the queue"
    );
    assert_eq!(keys.len(), poison, "every poison key is there");
    assert_eq!(dead.iter().filter(|d| d.reason == "poison").count(), poison);
    assert_eq!(
        dead.iter().filter(|d| d.reason == "missing_key").count(),
        keyless
    );
    drop(pirate);
    store.cleanup().await;
    BrokerUnderTest::delete(rabbit).await;
}

/// The dead-letter Kafka goes away (a tansu of the test's own, killed):
/// poison and keyless requests are answered `retry` (dead_letter_unavailable)
/// when their delivery report fails (at the latest after the 5 s delivery
/// timeout), none `dead`; once it is started again, librdkafka reconnects,
/// every one is answered `dead` and is in the topic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_kafka_outage_answers_retry_then_dead_and_loses_nothing() {
    let mut own = OwnTansu::start().await;
    let kafka = Kafka::on(&own.bootstrap(), "zmq-dl-kafka", 1).await;
    let port = free_port();
    let app = app::start(Arc::new(|_: &str, _| axum::http::StatusCode::BAD_REQUEST)).await;
    let store = Store::new("zmq-dl-kafka").await;
    let broker = zmq_test::broker_yaml_to(
        port,
        "router",
        "    plain: true\n",
        20,
        &format!("      kafka:\n        topic: {}\n", kafka.dead),
    );
    let yaml = format!(
        "consumer: zmq-dl-kafka\nstore:\n  kind: redis\n  url: redis://127.0.0.1:6379\ndedup:\n  maxAttempts: 3\nbroker:\n{broker}delivery:\n  url: {}\n  initialBackoff: 20ms\n  maxBackoff: 200ms\nshutdownGrace: 10s\n",
        app.url()
    );
    let config = Config::from_yaml(&yaml).expect("valid test config");
    let sidecar =
        sidecar::start_with(config, BrokerUnderTest::secrets(&kafka), store.dyn_store()).await;
    own.stop();
    let pirate = Pirate::start(PirateOptions {
        // Longer than the sidecar's 5 s delivery timeout: the answer comes first.
        timeout: Duration::from_secs(20),
        retry_after: Duration::from_millis(200),
        ..PirateOptions::new(format!("tcp://127.0.0.1:{port}"))
    });
    let (poison, keyless) = (5, 3);
    let told_retry = send_while_dead_letters_are_away(&pirate, "dk", poison, keyless).await;
    let during = pirate.tally();
    own.restart().await;
    let answered = pirate.wait_answered(Duration::from_secs(90)).await;
    let after = pirate.tally();
    let dead = BrokerUnderTest::dead_letters(&kafka).await;
    sidecar.stop().await.expect("clean stop");
    let keys: std::collections::BTreeSet<_> = dead.iter().filter_map(|d| d.key.clone()).collect();
    println!(
        "dead-letter kafka outage (zeromq): {poison} poison and {keyless} keyless requests; while it was away: {} dead, retry {:?}; once back: {} dead, {} in the topic ({} distinct keys, reasons {:?})",
        during.dead,
        during.retry_reasons,
        after.dead,
        dead.len(),
        keys.len(),
        dead.iter().map(|d| d.reason.as_str()).collect::<std::collections::BTreeSet<_>>(),
    );
    assert!(
        told_retry,
        "peers were not told retry: {:?}\n{}",
        during.retry_reasons,
        own.log()
    );
    assert_eq!(
        during.dead, 0,
        "nothing is answered dead while Kafka is away"
    );
    assert!(
        answered,
        "{} requests unanswered\n{}",
        pirate.unanswered(),
        own.log()
    );
    assert_eq!(
        after.dead,
        (poison + keyless) as u64,
        "every request ends dead"
    );
    assert_eq!(keys.len(), poison, "every poison key is in the topic");
    assert!(dead.iter().filter(|d| d.reason == "missing_key").count() >= keyless);
    assert!(dead
        .iter()
        .all(|d| d.reason == "poison" || d.reason == "missing_key"));
    drop(pirate);
    store.cleanup().await;
    // The broker and its storage go with `own`: nothing to delete on the shared one.
    drop(kafka);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_under_load_loses_nothing_and_processes_nothing_twice() {
    scenarios::graceful_shutdown_under_load_loses_nothing_and_processes_nothing_twice::<ZeroMq>()
        .await;
}

/// The store goes down mid-stream: requests are answered `retry`
/// (store_unavailable) and nothing reaches the application unchecked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_outage_answers_retry_and_processes_nothing_blind() {
    let retried = Arc::new(std::sync::Mutex::new(0));
    let seen = retried.clone();
    scenarios::store_outage_pauses_delivery_and_loses_nothing::<ZeroMq>(async move |t, _| {
        let before = t.pirate.tally();
        tokio::time::sleep(Duration::from_secs(2)).await;
        let after = t.pirate.tally();
        let store_retries = |tally: &zmq_test::Tally| {
            tally
                .retry_reasons
                .get("store_unavailable")
                .copied()
                .unwrap_or(0)
        };
        *seen.lock().expect("lock") = store_retries(&after) - store_retries(&before);
        println!(
            "store outage (zeromq): replies while the store was down: {:?}",
            after.retry_reasons
        );
    })
    .await;
    let retried = *retried.lock().expect("lock");
    assert!(retried > 0, "no retry (store_unavailable) in 2 s of outage");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_sigkill_mid_stream_loses_nothing() {
    scenarios::crash_loses_nothing_and_reprocesses_at_most_max_in_flight::<ZeroMq>().await;
}

/// A running sidecar on a `broker.zeromq` endpoint, with a test app.
async fn endpoint(
    consumer: &str,
    broker: &str,
    curve: Option<&Curve>,
    app: &app::App,
    store: &Store,
) -> sidecar::Running {
    let yaml = format!(
        "consumer: {consumer}\nstore:\n  kind: redis\n  url: redis://127.0.0.1:6379\ndedup:\n  maxAttempts: 3\nbroker:\n{broker}delivery:\n  url: {}\n  initialBackoff: 20ms\n  maxBackoff: 200ms\nshutdownGrace: 10s\n",
        app.url()
    );
    let config = Config::from_yaml(&yaml).expect("valid test config");
    let secrets = Secrets {
        zeromq_curve: curve.map(Curve::keys),
        ..Secrets::default()
    };
    sidecar::start_with(config, secrets, store.dyn_store()).await
}

/// 10,000 distinct messages from a client that throws away 20% of the
/// replies and sends again whatever is not answered in time, over CURVE:
/// each is processed exactly once, and every request ends with `ok`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_losing_20_percent_of_replies_gets_each_processed_once() {
    let curve = Curve::new(1);
    let port = free_port();
    let dead = DeadLetterReader::bind();
    let app = app::start(app::always_ok()).await;
    let store = Store::new("zmq-loss").await;
    let broker = zmq_test::broker_yaml(port, "router", "", 100, &dead.endpoint);
    let sidecar = endpoint("zmq-loss", &broker, Some(&curve), &app, &store).await;
    let pirate = Pirate::start(PirateOptions {
        curve: Some((curve.server.public.clone(), curve.clients[0].clone())),
        timeout: Duration::from_millis(500),
        window: 200,
        lose: 0.2,
        ..PirateOptions::new(format!("tcp://127.0.0.1:{port}"))
    });
    let n = 10_000;
    pirate.send((0..n).map(keyed).collect());
    let answered = pirate.wait_answered(Duration::from_secs(240)).await;
    let tally = pirate.tally();
    let duplicates = messages(&sidecar, "duplicate").await;
    sidecar.stop().await.expect("clean stop");
    println!(
        "lost replies (zeromq, CURVE): {n} distinct messages, {} requests sent, {} replies thrown away, {} resent after a timeout, {} retry ({:?}), {} ok, {} dead; app processed {} ({} distinct, {} twice); duplicates answered ok {duplicates}",
        tally.sent,
        tally.lost_replies,
        tally.timeouts,
        tally.retry,
        tally.retry_reasons,
        tally.ok,
        tally.dead,
        app.processed(),
        app.distinct(),
        app.processed_twice()
    );
    assert!(answered, "{} requests unanswered", pirate.unanswered());
    assert!(
        tally.lost_replies > 1000,
        "the client lost {} replies",
        tally.lost_replies
    );
    assert_eq!(tally.ok, n as u64, "every request ends with ok");
    assert_eq!(tally.dead, 0);
    assert_eq!(app.distinct(), n);
    assert_eq!(
        app.processed(),
        n as u32,
        "each message processed exactly once"
    );
    assert!(duplicates > 0, "resends were answered as duplicates");
    drop(pirate);
    store.cleanup().await;
}

/// CURVE: a client whose key is not allowed, and one that expects another
/// server key, get no reply and reach nothing; an allowed client does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_with_a_wrong_curve_key_is_refused() {
    let curve = Curve::new(1);
    let port = free_port();
    let dead = DeadLetterReader::bind();
    let app = app::start(app::always_ok()).await;
    let store = Store::new("zmq-curve").await;
    let broker = zmq_test::broker_yaml(port, "router", "", 10, &dead.endpoint);
    let sidecar = endpoint("zmq-curve", &broker, Some(&curve), &app, &store).await;
    let endpoint = format!("tcp://127.0.0.1:{port}");
    let client = |server: &str, pair: &KeyPair| {
        Pirate::start(PirateOptions {
            curve: Some((server.to_string(), pair.clone())),
            timeout: Duration::from_secs(60),
            ..PirateOptions::new(endpoint.clone())
        })
    };
    let stranger = client(&curve.server.public, &KeyPair::new());
    stranger.send(vec![Message::keyed("stranger-1", b"{}".to_vec())]);
    let impostor = client(&KeyPair::new().public, &curve.clients[0]);
    impostor.send(vec![Message::keyed("impostor-1", b"{}".to_vec())]);
    let plain = Pirate::start(PirateOptions::new(endpoint.clone()));
    plain.send(vec![Message::keyed("plain-1", b"{}".to_vec())]);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let allowed = client(&curve.server.public, &curve.clients[0]);
    allowed.send(vec![Message::keyed("allowed-1", b"{}".to_vec())]);
    let answered = allowed.wait_answered(Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let refused: Vec<_> = [&stranger, &impostor, &plain]
        .iter()
        .map(|p| {
            (
                p.tally().sent,
                p.tally().ok + p.tally().dead + p.tally().retry,
            )
        })
        .collect();
    sidecar.stop().await.expect("clean stop");
    println!(
        "CURVE (zeromq): an allowed client got {:?}; a client with an unknown key, one expecting another server key and a plain one sent {refused:?} (sent, answered) in 4 s; the app processed {:?}",
        allowed.tally().ok,
        app.order()
    );
    assert!(answered, "the allowed client got its answer");
    assert!(
        refused.iter().all(|(_, answered)| *answered == 0),
        "{refused:?}"
    );
    assert_eq!(
        app.order(),
        vec!["allowed-1".to_string()],
        "only the allowed client reached the app"
    );
    store.cleanup().await;
}

/// `pull`: messages pushed three times each (and some without a key, one
/// breaking the protocol) reach the app once each; the others are
/// dead-lettered with their reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_delivers_each_message_once_and_dead_letters_the_rest() {
    let port = free_port();
    let dead = DeadLetterReader::bind();
    let app = app::start(app::always_ok()).await;
    let store = Store::new("zmq-pull").await;
    let broker = zmq_test::broker_yaml(port, "pull", "    plain: true\n", 50, &dead.endpoint);
    let sidecar = endpoint("zmq-pull", &broker, None, &app, &store).await;
    let ctx = zmq::Context::new();
    let push = zmq_test::connect(&ctx, zmq::PUSH, &format!("tcp://127.0.0.1:{port}"), None);
    let n = 2_000;
    for _ in 0..3 {
        for i in 0..n {
            let m = keyed(i);
            let key = m.key.expect("keyed").into_bytes();
            send_frames(&push, &[key, Vec::new(), m.body], 0).expect("push");
        }
    }
    for i in 0..5 {
        send_frames(&push, &[Vec::new(), Vec::new(), scenarios::body(i)], 0).expect("push");
    }
    send_frames(
        &push,
        &[b"m-x".to_vec(), b"not json".to_vec(), b"{}".to_vec()],
        0,
    )
    .expect("push");
    let settled = wait_for(WAIT, async || {
        messages(&sidecar, "delivered").await + messages(&sidecar, "duplicate").await
            == 3 * n as u64
            && metric(&sidecar, "idemq_dead_letters_total{reason=\"missing_key\"}").await == 5
            && metric(&sidecar, "idemq_dead_letters_total{reason=\"malformed\"}").await == 1
    })
    .await;
    let duplicates = messages(&sidecar, "duplicate").await;
    sidecar.stop().await.expect("clean stop");
    let letters = dead.take();
    let reasons: Vec<&str> = letters
        .iter()
        .map(|(about, _)| about["reason"].as_str().unwrap_or_default())
        .collect();
    println!(
        "pull (zeromq): {} pushed ({n} distinct, each 3 times), 5 without a key, 1 malformed; app processed {} ({} twice), duplicates dropped {duplicates}, dead letters {reasons:?}",
        3 * n + 6,
        app.processed(),
        app.processed_twice()
    );
    assert!(settled, "not everything settled");
    assert_eq!(app.processed(), n as u32);
    assert_eq!(app.distinct(), n);
    assert_eq!(duplicates, 2 * n as u64);
    assert_eq!(reasons.iter().filter(|r| **r == "missing_key").count(), 5);
    let malformed: Vec<_> = letters
        .iter()
        .filter(|(about, _)| about["reason"] == "malformed")
        .collect();
    assert_eq!(malformed.len(), 1);
    assert_eq!(
        malformed[0].1[0], b"m-x",
        "the dead letter keeps the frames as sent"
    );
    assert!(malformed[0].0["problem"]
        .as_str()
        .is_some_and(|p| p.contains("JSON")));
    drop(push);
    store.cleanup().await;
}

/// `sub`: a publisher sends every message twice on a subscribed topic and
/// others on a topic not subscribed: the app gets each subscribed one once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sub_delivers_subscribed_topics_once_each() {
    let port = free_port();
    let dead = DeadLetterReader::bind();
    let app = app::start(app::always_ok()).await;
    let store = Store::new("zmq-sub").await;
    let broker = zmq_test::broker_yaml(
        port,
        "sub",
        "    plain: true\n    subscribe: [orders]\n",
        50,
        &dead.endpoint,
    );
    let sidecar = endpoint("zmq-sub", &broker, None, &app, &store).await;
    let ctx = zmq::Context::new();
    let publisher = zmq_test::connect(&ctx, zmq::PUB, &format!("tcp://127.0.0.1:{port}"), None);
    publisher.set_sndhwm(0).expect("hwm");
    // A publisher drops what it sends before the subscription reaches it.
    let mut probes = 0;
    let joined = wait_for(Duration::from_secs(30), async || {
        send_frames(
            &publisher,
            &[
                b"orders".to_vec(),
                format!("probe-{probes}").into_bytes(),
                Vec::new(),
                b"{}".to_vec(),
            ],
            0,
        )
        .expect("publish");
        probes += 1;
        app.distinct() > 0
    })
    .await;
    assert!(joined, "the subscription never reached the publisher");
    let probed = app.distinct();
    let n = 2_000;
    for _ in 0..2 {
        for i in 0..n {
            let m = keyed(i);
            let key = m.key.expect("keyed").into_bytes();
            send_frames(
                &publisher,
                &[
                    b"orders.eu".to_vec(),
                    key.clone(),
                    Vec::new(),
                    m.body.clone(),
                ],
                0,
            )
            .expect("publish");
            send_frames(
                &publisher,
                &[
                    b"invoices".to_vec(),
                    format!("i-{i}").into_bytes(),
                    Vec::new(),
                    m.body,
                ],
                0,
            )
            .expect("publish");
        }
    }
    let done = app.wait_until(WAIT, |a| a.distinct() >= probed + n).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let duplicates = messages(&sidecar, "duplicate").await;
    sidecar.stop().await.expect("clean stop");
    let order = app.order();
    let invoices = order.iter().filter(|k| k.starts_with("i-")).count();
    let orders = order.iter().filter(|k| k.starts_with("m-")).count();
    println!(
        "sub (zeromq): {n} messages published twice on orders.eu and {n} twice on invoices (not subscribed); app processed {orders} orders ({} twice), {invoices} invoices; duplicates dropped {duplicates}",
        app.processed_twice()
    );
    assert!(done, "processed {} of {n}", app.distinct() - probed);
    assert_eq!(orders, n, "each order once");
    assert_eq!(app.processed_twice(), 0);
    assert_eq!(invoices, 0, "an unsubscribed topic reaches nothing");
    assert_eq!(duplicates, n as u64);
    drop(publisher);
    store.cleanup().await;
}

/// What the sidecar refuses: no dead-letter destination, CURVE without
/// keys, plain with keys, a wildcard bind.
#[tokio::test]
async fn unsafe_or_lossy_configs_are_refused_with_the_reason() {
    let base = "consumer: a\nbroker:\n  zeromq:\n    bind: tcp://127.0.0.1:5555\n";
    let delivery = "delivery:\n  url: http://127.0.0.1:1/\n";
    let no_dead = Config::from_yaml(&format!("{base}    plain: true\n{delivery}"))
        .unwrap_err()
        .to_string();
    assert!(no_dead.contains("deadLetter"), "{no_dead}");
    let wildcard = Config::from_yaml(&format!(
        "consumer: a\nbroker:\n  zeromq:\n    bind: tcp://0.0.0.0:5555\n    plain: true\n    deadLetter:\n      endpoint: tcp://127.0.0.1:5556\n{delivery}"
    ))
    .unwrap_err()
    .to_string();
    assert!(wildcard.contains("broker.zeromq.bind"), "{wildcard}");
    let curve = Config::from_yaml(&format!(
        "{base}    deadLetter:\n      endpoint: tcp://127.0.0.1:5556\n{delivery}"
    ))
    .expect("valid");
    let err = Secrets::resolve(&curve, &std::collections::HashMap::new())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("IDEMQ_ZMQ_SERVER_SECRET_KEY") && err.contains("plain: true"),
        "{err}"
    );
    let keys = Curve::new(2);
    let env: std::collections::HashMap<String, String> = keys.env().into_iter().collect();
    let resolved = Secrets::resolve(&curve, &env).expect("resolves");
    assert_eq!(
        resolved.zeromq_curve.as_ref().map(|k| k.client_keys.len()),
        Some(2)
    );
    assert!(
        !format!("{resolved:?}").contains(&keys.server.secret),
        "the secret key stays out of Debug"
    );
    let mut bad = env.clone();
    bad.insert("IDEMQ_ZMQ_CLIENT_KEYS".into(), "short".into());
    let err = Secrets::resolve(&curve, &bad).unwrap_err().to_string();
    assert!(
        err.contains("IDEMQ_ZMQ_CLIENT_KEYS") && !err.contains("short"),
        "{err}"
    );
    let plain = Config::from_yaml(&format!(
        "{base}    plain: true\n    deadLetter:\n      endpoint: tcp://127.0.0.1:5556\n{delivery}"
    ))
    .expect("valid");
    let err = Secrets::resolve(&plain, &env).unwrap_err().to_string();
    assert!(err.contains("plain is true"), "{err}");
}

/// `deadLetter` names exactly one target; a RabbitMQ one exactly one of
/// exchange or queue; each takes its connection from the environment, and
/// says which variable is missing.
#[tokio::test]
async fn dead_letters_go_to_exactly_one_target_with_its_secrets_from_the_environment() {
    let config = |dead_letter: &str| {
        Config::from_yaml(&format!(
            "consumer: a\nbroker:\n  zeromq:\n    bind: tcp://127.0.0.1:5555\n    plain: true\n    deadLetter:\n{dead_letter}delivery:\n  url: http://127.0.0.1:1/\n"
        ))
    };
    for (bad, says) in [
        ("      {}\n", "broker.zeromq.deadLetter: must set exactly one dead-letter target: endpoint, rabbitmq or kafka"),
        (
            "      endpoint: tcp://127.0.0.1:5556\n      kafka:\n        topic: dead\n",
            "exactly one dead-letter target: endpoint, rabbitmq or kafka",
        ),
        (
            "      rabbitmq:\n        exchange: dlx\n        queue: dead\n",
            "broker.zeromq.deadLetter.rabbitmq: must set exactly one of exchange (with routingKey) or queue",
        ),
        (
            "      rabbitmq:\n        queue: dead\n        routingKey: x\n",
            "broker.zeromq.deadLetter.rabbitmq.routingKey",
        ),
        (
            "      kafka:\n        topic: dead/letters\n",
            "broker.zeromq.deadLetter.kafka.topic",
        ),
        (
            "      kafka:\n        topic: dead\n        securityProtocol: saslSsl\n",
            "broker.zeromq.deadLetter.kafka.saslMechanism",
        ),
    ] {
        let err = config(bad).expect_err(bad).to_string();
        assert!(err.contains(says), "{bad}: {err}");
    }
    let rabbit = config("      rabbitmq:\n        exchange: dlx\n        routingKey: orders\n")
        .expect("valid");
    let err = Secrets::resolve(&rabbit, &std::collections::HashMap::new())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("broker.zeromq.deadLetter.rabbitmq") && err.contains("IDEMQ_BROKER_URL"),
        "{err}"
    );
    let env: std::collections::HashMap<String, String> = [(
        "IDEMQ_BROKER_URL".to_string(),
        "amqp://user:s3cret@rabbit:5672/%2f".to_string(),
    )]
    .into();
    let resolved = Secrets::resolve(&rabbit, &env).expect("resolves");
    assert!(resolved.broker_url.is_some());
    assert!(!format!("{resolved:?}").contains("s3cret"));
    let kafka = config(
        "      kafka:\n        topic: dead\n        securityProtocol: saslSsl\n        saslMechanism: scramSha512\n",
    )
    .expect("valid");
    let err = Secrets::resolve(&kafka, &std::collections::HashMap::new())
        .unwrap_err()
        .to_string();
    assert!(err.contains("IDEMQ_KAFKA_BOOTSTRAP_SERVERS"), "{err}");
    let env: std::collections::HashMap<String, String> = [
        ("IDEMQ_KAFKA_BOOTSTRAP_SERVERS", "kafka-0:9093"),
        ("IDEMQ_KAFKA_USERNAME", "orders"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let err = Secrets::resolve(&kafka, &env).unwrap_err().to_string();
    assert!(
        err.contains("broker.zeromq.deadLetter.kafka.saslMechanism")
            && err.contains("IDEMQ_KAFKA_PASSWORD"),
        "{err}"
    );
}

/// The Python example client (`examples/zeromq_client.py`, pyzmq from
/// `.tools/venv`) over CURVE: 50 messages sent twice each are answered `ok`
/// and processed once; one without a key is answered `dead missing_key`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_example_client_gets_each_message_processed_once() {
    use tokio::io::AsyncWriteExt;
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let python = root.join(".tools/venv/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run `make tools` (bash .ci/tools.sh), which installs pyzmq there",
        python.display()
    );
    let curve = Curve::new(1);
    let port = free_port();
    let dead = DeadLetterReader::bind();
    let app = app::start(app::always_ok()).await;
    let store = Store::new("zmq-python").await;
    let broker = zmq_test::broker_yaml(port, "router", "", 10, &dead.endpoint);
    let sidecar = endpoint("zmq-python", &broker, Some(&curve), &app, &store).await;
    let mut input = String::new();
    for _ in 0..2 {
        for i in 0..50 {
            input.push_str(&format!("{{\"id\":\"py-{i}\",\"body\":{{\"n\":{i}}}}}\n"));
        }
    }
    input.push_str("{\"id\":\"\",\"body\":{\"n\":-1}}\n");
    let mut child = tokio::process::Command::new(&python)
        .arg(root.join("examples/zeromq_client.py"))
        .args(["--endpoint", &format!("tcp://127.0.0.1:{port}")])
        // Joined with "=": a Z85 key may begin with "-", which argparse
        // would take for an option.
        .arg(format!("--server-key={}", curve.server.public))
        .env("ZMQ_CLIENT_PUBLIC_KEY", &curve.clients[0].public)
        .env("ZMQ_CLIENT_SECRET_KEY", &curve.clients[0].secret)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("run the example client");
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(input.as_bytes()).await.expect("write");
    drop(stdin);
    let output = tokio::time::timeout(Duration::from_secs(120), child.wait_with_output())
        .await
        .expect("the client finished within 120 s")
        .expect("client output");
    sidecar.stop().await.expect("clean stop");
    let out = String::from_utf8_lossy(&output.stdout);
    let lines: Vec<&str> = out.lines().collect();
    let ok = lines.iter().filter(|l| l.ends_with(" ok ")).count();
    println!(
        "python example (zeromq, CURVE): 101 requests, {ok} ok, last line {:?}; app processed {} ({} distinct, {} twice)",
        lines.last(),
        app.processed(),
        app.distinct(),
        app.processed_twice()
    );
    assert!(output.status.success(), "the client failed: {out}");
    assert_eq!(ok, 100, "{out}");
    assert_eq!(lines.last().map(|l| l.trim()), Some("dead missing_key"));
    assert_eq!(app.processed(), 50);
    assert_eq!(app.distinct(), 50);
    assert_eq!(dead.take().len(), 1);
    store.cleanup().await;
}

/// Sends `poison` keyed messages (`<prefix>-<i>`) and `keyless` unkeyed ones
/// while the dead-letter broker is away; whether each was answered `retry
/// dead_letter_unavailable` at least once within 30 s.
async fn send_while_dead_letters_are_away(
    pirate: &Pirate,
    prefix: &str,
    poison: usize,
    keyless: usize,
) -> bool {
    let mut sent: Vec<Message> = (0..poison)
        .map(|i| Message::keyed(format!("{prefix}-{i}"), scenarios::body(i)))
        .collect();
    sent.extend((0..keyless).map(|i| Message::unkeyed(scenarios::body(100 + i))));
    pirate.send(sent);
    wait_for(Duration::from_secs(30), async || {
        pirate
            .tally()
            .retry_reasons
            .get("dead_letter_unavailable")
            .is_some_and(|n| *n >= (poison + keyless) as u64)
    })
    .await
}
