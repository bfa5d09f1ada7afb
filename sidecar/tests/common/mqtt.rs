//! MQTT as a [`BrokerUnderTest`]: a Mosquitto of the test's own on a free
//! port, a topic, a shared group and a dead-letter topic unique to the test.
//!
//! Why not the shared Mosquitto on 1883: Mosquitto keeps at most
//! `max_queued_messages` (1000 by default) QoS 1 messages per session beyond
//! those in flight and drops the rest, and the scenarios queue 20,000 for a
//! session that is away (a crash) or not reading (a store outage). The own
//! broker lifts that limit, as a deployment must; it also makes the backlog
//! exact: every message in its store is one a session has not acknowledged.
//!
//! MQTT keeps nothing for a subscription that does not exist yet, so `create`
//! opens the sidecar's persistent session (its client id, the shared
//! subscription) and the dead-letter reader's before anything is published.
//! `delete` stops the broker, whose sessions live in its memory only.

use std::time::Duration;

use bytes::Bytes;
use idemq_sidecar::secrets::Secrets;
pub use idemq_testkit::mosquitto::OwnMosquitto;
use rumqttc::v5::mqttbytes::v5::{Filter, PublishProperties};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{Event, Incoming};

use super::broker::{BrokerUnderTest, DeadLetter, Message};

/// Messages in the broker's store that are not retained: those some
/// session has not acknowledged. Mosquitto publishes these counts (as
/// retained messages) once per `sys_interval` when they change, and on a
/// loaded machine a tick can come late: the value a subscriber gets at
/// once may predate the last acknowledgements. So the counts are read as
/// they stand after listening for three intervals.
pub async fn unacknowledged(broker: &OwnMosquitto) -> u64 {
    let (client, mut eventloop) = broker.client(&super::unique("sys"), false);
    client
        .subscribe_many([
            Filter::new("$SYS/broker/store/messages/count", QoS::AtMostOnce),
            Filter::new("$SYS/broker/retained messages/count", QoS::AtMostOnce),
        ])
        .await
        .expect("subscribe $SYS");
    let (mut stored, mut retained) = (None, None);
    let listening = tokio::time::Instant::now() + Duration::from_secs(3);
    while let Ok(event) = tokio::time::timeout_at(listening, eventloop.poll()).await {
        if let Ok(Event::Incoming(Incoming::Publish(p))) = event {
            let value: u64 = String::from_utf8_lossy(&p.payload).parse().unwrap_or(0);
            if p.topic.ends_with(b"store/messages/count") {
                stored = Some(value);
            } else {
                retained = Some(value);
            }
        }
    }
    assert!(
        stored.is_some() && retained.is_some(),
        "mosquitto publishes its $SYS counts"
    );
    let _ = client.disconnect().await;
    stored.unwrap_or(0).saturating_sub(retained.unwrap_or(0))
}

/// One test's topic, shared group, sidecar session and dead-letter topic.
pub struct Mqtt {
    pub broker: OwnMosquitto,
    pub topic: String,
    pub group: String,
    /// The sidecar's client id (its persistent session).
    pub client_id: String,
    pub dead_letter_topic: String,
    /// The session that collects dead letters.
    dead_letter_reader: String,
    /// `v5` or `v3.1.1`.
    pub protocol: &'static str,
}

impl Mqtt {
    /// The topology of [`BrokerUnderTest::create`], for `protocol`.
    pub async fn with_protocol(test: &str, protocol: &'static str) -> Self {
        let broker = OwnMosquitto::start("").await.expect("own mosquitto");
        let name = super::unique(test);
        let t = Self {
            topic: format!("{name}/in"),
            group: format!("{name}-group"),
            client_id: format!("{name}-sidecar"),
            dead_letter_topic: format!("{name}/dead"),
            dead_letter_reader: format!("{name}-dead-reader"),
            protocol,
            broker,
        };
        t.broker
            .open_session(&t.client_id, &format!("$share/{}/{}", t.group, t.topic))
            .await
            .expect("open the sidecar's session");
        t.broker
            .open_session(&t.dead_letter_reader, &t.dead_letter_topic)
            .await
            .expect("open the dead-letter reader's session");
        t
    }
}

impl BrokerUnderTest for Mqtt {
    const NAME: &'static str = "mqtt";

    async fn create(test: &str) -> Self {
        Self::with_protocol(test, "v5").await
    }

    fn broker_yaml(&self, max_in_flight: u32) -> String {
        format!(
            "  mqtt:\n    protocol: {}\n    clientId: {}\n    topics: [{}]\n    sharedGroup: {}\n    receiveMaximum: {max_in_flight}\n    deadLetterTopic: {}\n",
            self.protocol, self.client_id, self.topic, self.group, self.dead_letter_topic
        )
    }

    /// The key travels as MQTT 5 correlation data: the default `messageId`.
    fn dedup_key_yaml(&self) -> String {
        String::new()
    }

    fn secrets(&self) -> Secrets {
        Secrets {
            broker_url: Some(self.broker.url()),
            ..Secrets::default()
        }
    }

    fn env(&self) -> Vec<(String, String)> {
        vec![("IDEMQ_BROKER_URL".to_string(), self.broker.url())]
    }

    /// Publishes with QoS 1, the key as correlation data, and waits for
    /// every PUBACK.
    async fn publish(&self, messages: Vec<Message>) {
        let n = messages.len();
        let (client, mut eventloop) = self.broker.client(&super::unique("publisher"), false);
        let acked = tokio::spawn(async move {
            let mut acked = 0;
            while acked < n {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Incoming::PubAck(_))) => acked += 1,
                    Ok(_) => {}
                    Err(e) => panic!("publish to mosquitto: {e}"),
                }
            }
            let _ = eventloop.poll().await;
        });
        for Message { key, body } in messages {
            let properties = PublishProperties {
                correlation_data: key.map(Bytes::from),
                content_type: Some("application/json".into()),
                ..Default::default()
            };
            client
                .publish_with_properties(&self.topic, QoS::AtLeastOnce, false, body, properties)
                .await
                .expect("queue a publish");
        }
        tokio::time::timeout(Duration::from_secs(120), acked)
            .await
            .expect("mosquitto acknowledged every publish within 120 s")
            .expect("publisher");
        let _ = client.disconnect().await;
    }

    async fn backlog(&self) -> u64 {
        unacknowledged(&self.broker).await
    }

    /// Reads (and acknowledges) every dead letter waiting in the reader's
    /// session, until none comes for a second.
    async fn dead_letters(&self) -> Vec<DeadLetter> {
        let (client, mut eventloop) = self.broker.client(&self.dead_letter_reader, true);
        let mut out = Vec::new();
        loop {
            match tokio::time::timeout(Duration::from_secs(1), eventloop.poll()).await {
                Ok(Ok(Event::Incoming(Incoming::Publish(p)))) => {
                    out.push(dead_letter(self.protocol, &p));
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => panic!("read dead letters: {e}"),
                Err(_) => break,
            }
        }
        let _ = client.disconnect().await;
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while eventloop.poll().await.is_ok() {}
        })
        .await;
        out
    }

    async fn delete(self) {
        drop(self.broker);
    }
}

/// The reason and key of a dead letter: user properties and correlation data
/// on MQTT 5, the JSON envelope on 3.1.1 (whose body holds the key at
/// `/order/id`, as the scenarios' bodies do).
fn dead_letter(protocol: &str, p: &rumqttc::v5::mqttbytes::v5::Publish) -> DeadLetter {
    if protocol == "v3.1.1" {
        let wrapped: serde_json::Value =
            serde_json::from_slice(&p.payload).expect("a JSON dead-letter envelope");
        let body: Option<serde_json::Value> = wrapped["body"]
            .as_str()
            .and_then(|b| serde_json::from_str(b).ok());
        return DeadLetter {
            reason: wrapped["idemqReason"].as_str().unwrap_or_default().into(),
            key: body.and_then(|b| {
                b.pointer("/order/id")
                    .and_then(|v| v.as_str())
                    .map(String::from)
            }),
        };
    }
    let props = p.properties.clone().unwrap_or_default();
    DeadLetter {
        reason: props
            .user_properties
            .iter()
            .find(|(k, _)| k == "idemq-reason")
            .map(|(_, v)| v.clone())
            .unwrap_or_default(),
        key: props
            .correlation_data
            .map(|d| String::from_utf8_lossy(&d).into_owned()),
    }
}
