//! MQTT source: subscribes with QoS 1 in a persistent session and sends each
//! message's PUBACK only once its outcome is settled.
//!
//! A *session* is one connection ([`client::Connection`], MQTT 5 or 3.1.1)
//! with clean start off and a session expiry, so the broker keeps the
//! subscription, and every message not yet acknowledged, while the sidecar
//! is away; on the next connection it sends them again (with the DUP flag)
//! and the dedup rules decide again. With `sharedGroup` the subscription is
//! `$share/<group>/<filter>` and the broker splits messages between replicas.
//!
//! PUBACKs go out in the order the messages arrived, as the protocol asks
//! (MQTT 3.1.1 and 5, section 4.6): a message settled early waits until every
//! message before it is settled, then one run of PUBACKs covers them, as a
//! RabbitMQ `multiple` ack would. rumqttc itself sends whatever PUBACK it is
//! given, in any order; the ordering is this module's.
//!
//! MQTT has no negative acknowledgement: a message can only be given back by
//! not acknowledging it and ending the session. So a message whose key is in
//! flight elsewhere waits here and is claimed again ([`InFlightWait`]: the
//! wait holds up the PUBACKs of every later message, which go in order);
//! when the key store stops answering (fail closed), the circuit opens, or a
//! dead letter is not confirmed, the session ends: what is settled is
//! acknowledged, the rest stays with the broker, and reading
//! pauses until the store (or the application) is back. Nothing is lost as
//! long as the broker keeps the session's messages (Mosquitto drops QoS 1
//! messages past `max_queued_messages` per session, 1000 by default; see the
//! README).
//!
//! Dead letters are published with QoS 1 to `deadLetterTopic`, the reason,
//! attempts and original topic as user properties (MQTT 5) or in a JSON
//! envelope around the body (3.1.1, which has no properties), and the
//! original is acknowledged only after the broker's PUBACK for the dead
//! letter. On MQTT 5 a PUBACK saying *no matching subscribers* counts as a
//! failure: no session would keep the dead letter.
//!
//! Flow control ([`crate::flow`]): no session starts before the application
//! takes messages; at most `receiveMaximum` messages are worked on at once
//! (lowered so that many of the largest message seen fit `maxInFlightBytes`),
//! and each is charged to the byte budget until settled. The sidecar holds
//! that limit itself: MQTT 3.1.1 has no Receive Maximum, and in the crash
//! test Mosquitto 2.0.11 sent an MQTT 5 session more than its Receive Maximum
//! (162 messages were processed twice after a SIGKILL with a limit of 20,
//! 9 once the sidecar kept to it). Messages past the limit wait, unclaimed.

pub mod client;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

pub use client::{probe, ConnectError, Endpoint, Options};
use client::{Connection, Event, Outgoing, Received};

use super::sessions::{SessionEnd, Sessions};
use super::{Common, DeadLetterReason, Envelope, InFlightWait, Verdict};
use crate::config::{Config, MqttConfig, MqttProtocol};
use crate::engine::Engine;
use crate::flow::Permit;
use crate::metrics::Metrics;
use crate::secrets::BrokerAuth;
use crate::traces::Origin;

/// How long the broker has to confirm a dead letter.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(10);

/// Everything an MQTT source needs.
pub struct Source {
    pub common: Common,
    /// The `broker.mqtt` section of `config`.
    pub mqtt: MqttConfig,
    /// How to connect; see [`options`].
    pub options: Options,
    /// The largest message body seen (or expected), in bytes; 0 before any.
    pub largest_message: AtomicU64,
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("subscribe to {filters:?}: {reason}")]
    Subscribe {
        filters: Vec<String>,
        reason: String,
    },
    #[error("the connection ended: {0}")]
    Lost(String),
}

/// The connection options from the config, the broker URL and credentials
/// (from the environment) and the host name (the pod's name, which names the
/// session when `clientId` is unset).
pub fn options(
    config: &Config,
    mqtt: &MqttConfig,
    url: &str,
    auth: &BrokerAuth,
    hostname: Option<String>,
) -> Result<Options, String> {
    let mut endpoint = Endpoint::parse(url)?;
    if auth.user.is_some() {
        endpoint.user = auth.user.clone();
    }
    if auth.password.is_some() {
        endpoint.password = auth.password.clone();
    }
    let client_id = match (&mqtt.client_id, hostname) {
        (Some(id), _) => id.clone(),
        (None, Some(host)) => format!("{}-{host}", config.consumer),
        (None, None) => {
            return Err(
                "broker.mqtt.clientId is unset and the host name is unknown (HOSTNAME)".into(),
            )
        }
    };
    let ca = match &mqtt.ca_file {
        Some(path) => {
            Some(std::fs::read(path).map_err(|e| format!("read broker.mqtt.caFile {path}: {e}"))?)
        }
        None => None,
    };
    Ok(Options {
        endpoint,
        protocol: mqtt.protocol,
        client_id,
        session_expiry: Some(mqtt.session_expiry),
        receive_maximum: mqtt.receive_maximum,
        ca,
    })
}

/// The subscription's filters: `$share/<group>/<filter>` with a shared group.
pub fn filters(mqtt: &MqttConfig) -> Vec<String> {
    mqtt.topics
        .iter()
        .map(|t| match &mqtt.shared_group {
            Some(group) => format!("$share/{group}/{t}"),
            None => t.clone(),
        })
        .collect()
}

impl Source {
    /// Consumes until `shutdown` fires, reconnecting as needed.
    pub async fn run(&self, shutdown: CancellationToken) {
        let mut sessions = Sessions::new("MQTT", &self.common);
        while sessions.ready(&shutdown).await {
            let ended = self.session(&shutdown).await;
            if !sessions.ended(ended, &shutdown).await {
                break;
            }
        }
    }

    /// The Receive Maximum of the next session: as configured, lowered so
    /// that that many of the largest message seen fit the byte budget.
    fn receive_maximum(&self) -> u16 {
        match self.largest_message.load(Ordering::Relaxed) {
            0 => self.mqtt.receive_maximum,
            largest => super::rabbitmq::prefetch_for(
                self.mqtt.receive_maximum,
                self.common.flow.budget(),
                largest,
            ),
        }
    }

    async fn session(&self, shutdown: &CancellationToken) -> Result<SessionEnd, SourceError> {
        let mut options = self.options.clone();
        options.receive_maximum = self.receive_maximum();
        let (conn, mut events) = Connection::open(&options).await?;
        let filters = filters(&self.mqtt);
        conn.subscribe(&filters)
            .await
            .map_err(|reason| SourceError::Subscribe {
                filters: filters.clone(),
                reason,
            })?;
        tracing::info!(
            client_id = %options.client_id,
            session_present = conn.session_present,
            receive_maximum = options.receive_maximum,
            ?filters,
            "consuming"
        );
        let settle = Arc::new(Settler {
            conn,
            order: Mutex::new(InOrder::default()),
            settled: Notify::new(),
            store_down: CancellationToken::new(),
            give_back: CancellationToken::new(),
            mqtt: self.mqtt.clone(),
            metrics: self.common.metrics.clone(),
        });
        let mut tasks = JoinSet::new();
        let mut next_seq = 0u64;
        let outcome = loop {
            tokio::select! {
                _ = shutdown.cancelled() => break Ok(SessionEnd::Shutdown),
                _ = settle.store_down.cancelled() => break Ok(SessionEnd::StoreDown),
                _ = settle.give_back.cancelled() => break Ok(SessionEnd::BackOff),
                _ = self.common.flow.unavailable() => break Ok(SessionEnd::AppDown),
                _ = settle.settled.notified() => {
                    if let Err(e) = settle.flush().await {
                        break Err(SourceError::Lost(e));
                    }
                }
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
                // Takes the next message only when the flow has room for it,
                // and no more at once than Receive Maximum, whether or not
                // the broker honours it (3.1.1 has none).
                event = self.common.flow.when_ready(shutdown, events.recv()), if tasks.len() < usize::from(options.receive_maximum) => match event {
                    Some(Event::Message(message)) => {
                        let seq = next_seq;
                        next_seq += 1;
                        settle.received(seq, message.pkid);
                        let size = message.payload.len();
                        self.largest_message.fetch_max(size as u64, Ordering::Relaxed);
                        let permit = self.common.flow.take(size);
                        tasks.spawn(Box::pin(handle(seq, message, permit, self.common.engine.clone(), settle.clone(), shutdown.clone())));
                    }
                    Some(Event::Subscribed { refused: 0 }) => {
                        self.common.health.set(true);
                        self.common.metrics.broker_connected.set(1);
                    }
                    Some(Event::Subscribed { refused }) => break Err(SourceError::Subscribe {
                        filters: filters.clone(),
                        reason: format!("the broker refused {refused} of the filters (are they allowed by its ACL?)"),
                    }),
                    Some(Event::Ended(reason)) => break Err(SourceError::Lost(reason.unwrap_or_default())),
                    None => break Err(SourceError::Lost("the connection task ended".into())),
                },
            }
        };
        self.common.health.set(false);
        self.common.metrics.broker_connected.set(0);

        // Let what is in flight settle and acknowledge what can be; what is
        // left unacknowledged stays in the broker's session.
        let grace = self.common.config.shutdown_grace;
        let drained = tokio::time::timeout(grace, async {
            while tasks.join_next().await.is_some() {
                let _ = settle.flush().await;
            }
        })
        .await;
        if drained.is_err() {
            tracing::warn!(grace = ?grace, left = tasks.len(), "in-flight deliveries did not finish in time; the broker sends them again");
            tasks.abort_all();
        }
        let _ = settle.flush().await;
        settle.conn.close(&mut events).await;
        outcome
    }
}

/// Handles one message: the engine decides (waiting here while its key is
/// in flight elsewhere, since MQTT cannot give a message back), the settler
/// applies the verdict.
async fn handle(
    seq: u64,
    message: Received,
    permit: Permit,
    engine: Arc<Engine>,
    settle: Arc<Settler>,
    shutdown: CancellationToken,
) {
    let _in_flight = settle.metrics.received();
    let envelope = envelope(&message);
    let span = engine.trace(
        &envelope,
        Origin {
            system: "mqtt",
            destination: &message.topic,
        },
    );
    let mut wait = InFlightWait::default();
    let verdict = loop {
        match engine.handle(&envelope, &span, &shutdown).await {
            Verdict::Requeue { delay } if !delay.is_zero() => {
                settle.metrics.message("in_flight_requeued");
                if !wait.sleep(delay, &shutdown).await {
                    break Verdict::Requeue {
                        delay: Duration::ZERO,
                    };
                }
            }
            verdict => break verdict,
        }
    };
    let step = span.settlement(&verdict);
    settle.apply(seq, &message, verdict).await;
    drop((step, span, permit));
}

/// Which received messages are settled, in arrival order: PUBACKs go out for
/// the settled prefix only.
#[derive(Debug, Default)]
pub struct InOrder {
    /// Sequence number of the front entry.
    first: u64,
    /// Packet id and whether it is settled, from `first` on.
    pending: VecDeque<(u16, bool)>,
}

impl InOrder {
    pub fn received(&mut self, seq: u64, pkid: u16) {
        if self.pending.is_empty() {
            self.first = seq;
        }
        self.pending.push_back((pkid, false));
    }

    pub fn settle(&mut self, seq: u64) {
        let index = seq
            .checked_sub(self.first)
            .and_then(|i| usize::try_from(i).ok());
        if let Some(entry) = index.and_then(|i| self.pending.get_mut(i)) {
            entry.1 = true;
        }
    }

    /// The packet ids to acknowledge now, in order.
    pub fn take(&mut self) -> Vec<u16> {
        let mut pkids = Vec::new();
        while let Some(&(pkid, true)) = self.pending.front() {
            pkids.push(pkid);
            self.pending.pop_front();
            self.first += 1;
        }
        pkids
    }
}

/// Applies verdicts on one session.
struct Settler {
    conn: Connection,
    order: Mutex<InOrder>,
    settled: Notify,
    store_down: CancellationToken,
    give_back: CancellationToken,
    mqtt: MqttConfig,
    metrics: Arc<Metrics>,
}

impl Settler {
    fn lock(&self) -> std::sync::MutexGuard<'_, InOrder> {
        self.order.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn received(&self, seq: u64, pkid: u16) {
        self.lock().received(seq, pkid);
    }

    fn settled(&self, seq: u64) {
        self.lock().settle(seq);
        self.settled.notify_one();
    }

    /// Sends the PUBACKs of the settled prefix. Only the session loop calls
    /// this, so PUBACKs leave in arrival order.
    async fn flush(&self) -> Result<(), String> {
        let pkids = self.lock().take();
        for pkid in pkids {
            self.conn.ack(pkid).await?;
        }
        Ok(())
    }

    async fn apply(&self, seq: u64, message: &Received, verdict: Verdict) {
        match verdict {
            Verdict::Ack => {
                self.metrics.message("delivered");
                self.settled(seq);
            }
            Verdict::Duplicate => {
                self.metrics.message("duplicate");
                self.settled(seq);
            }
            // Only on shutdown: left unacknowledged, it stays with the broker.
            Verdict::Requeue { .. } => {}
            Verdict::StoreUnavailable => self.store_down.cancel(),
            // The session ends on its own: it watches the application's state.
            Verdict::AppUnavailable => {}
            Verdict::DeadLetter { reason, attempts } => {
                let letter = dead_letter(&self.mqtt, message, reason, attempts);
                match self.conn.publish(letter, CONFIRM_TIMEOUT).await {
                    Ok(()) => {
                        tracing::info!(reason = reason.as_str(), attempts, "dead-lettered");
                        self.metrics.dead_letter(reason.as_str());
                        self.settled(seq);
                    }
                    Err(e) => {
                        // Never acknowledge a message whose dead letter is not confirmed.
                        tracing::warn!(error = %e, topic = %self.mqtt.dead_letter_topic, "dead letter not confirmed (does a session subscribe to the dead-letter topic?): the message goes back to the broker");
                        self.give_back.cancel();
                    }
                }
            }
        }
    }
}

/// The dead letter of `message`: on MQTT 5 the body as it was, with the
/// reason in user properties; on 3.1.1 a JSON envelope holding the reason
/// and the body (as text, or hex when it is not UTF-8).
fn dead_letter(
    mqtt: &MqttConfig,
    message: &Received,
    reason: DeadLetterReason,
    attempts: u32,
) -> Outgoing {
    let topic = mqtt.dead_letter_topic.clone();
    match mqtt.protocol {
        MqttProtocol::V5 => {
            let mut user_properties = message.user_properties.clone();
            user_properties.extend([
                ("idemq-reason".to_string(), reason.as_str().to_string()),
                ("idemq-attempts".to_string(), attempts.to_string()),
                ("idemq-original-topic".to_string(), message.topic.clone()),
            ]);
            Outgoing {
                topic,
                payload: message.payload.clone(),
                user_properties,
                correlation_data: message.correlation_data.clone(),
                content_type: message.content_type.clone(),
            }
        }
        MqttProtocol::V311 => {
            let mut wrapped = serde_json::json!({
                "idemqReason": reason.as_str(),
                "idemqAttempts": attempts,
                "originalTopic": message.topic,
            });
            match std::str::from_utf8(&message.payload) {
                Ok(text) => wrapped["body"] = text.into(),
                Err(_) => wrapped["bodyHex"] = hex::encode(&message.payload).into(),
            }
            Outgoing {
                topic,
                payload: Bytes::from(wrapped.to_string()),
                ..Outgoing::default()
            }
        }
    }
}

/// The broker-neutral view of a message: user properties are its headers,
/// correlation data its message id.
fn envelope(message: &Received) -> Envelope {
    Envelope {
        message_id: message
            .correlation_data
            .as_ref()
            .map(|data| match std::str::from_utf8(data) {
                Ok(text) => text.to_string(),
                Err(_) => hex::encode(data),
            }),
        headers: message.user_properties.clone(),
        content_type: message.content_type.clone(),
        body: message.payload.clone(),
        redelivered: message.dup,
        ..Envelope::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn received(payload: &[u8]) -> Received {
        Received {
            pkid: 7,
            topic: "orders/eu".into(),
            payload: Bytes::copy_from_slice(payload),
            dup: true,
            user_properties: vec![("tenant".into(), "acme".into())],
            correlation_data: Some(Bytes::from_static(b"order-7")),
            content_type: Some("application/json".into()),
        }
    }

    fn mqtt(protocol: &str) -> MqttConfig {
        serde_yaml::from_str(&format!(
            "topics: [orders/#]\nsharedGroup: billing\ndeadLetterTopic: orders/dead\nprotocol: {protocol}\n"
        ))
        .expect("valid")
    }

    #[test]
    fn pubacks_go_out_in_arrival_order() {
        let mut order = InOrder::default();
        for (seq, pkid) in [(0, 10), (1, 11), (2, 12), (3, 13)] {
            order.received(seq, pkid);
        }
        order.settle(1);
        order.settle(3);
        assert!(order.take().is_empty(), "the first is not settled");
        order.settle(0);
        assert_eq!(order.take(), vec![10, 11]);
        order.settle(2);
        assert_eq!(order.take(), vec![12, 13]);
        order.received(4, 1);
        order.settle(4);
        assert_eq!(order.take(), vec![1]);
        assert!(order.pending.is_empty());
    }

    #[test]
    fn correlation_data_is_the_message_id_and_user_properties_the_headers() {
        let e = envelope(&received(b"{}"));
        assert_eq!(e.message_id.as_deref(), Some("order-7"));
        assert_eq!(e.header("Tenant"), Some("acme"));
        assert!(e.redelivered);
        let mut binary = received(b"{}");
        binary.correlation_data = Some(Bytes::from_static(&[0xff, 0x01]));
        assert_eq!(envelope(&binary).message_id.as_deref(), Some("ff01"));
    }

    #[test]
    fn dead_letters_carry_the_reason_as_properties_or_in_an_envelope() {
        let v5 = dead_letter(&mqtt("v5"), &received(b"{}"), DeadLetterReason::Poison, 3);
        assert_eq!(v5.topic, "orders/dead");
        assert_eq!(&v5.payload[..], b"{}");
        assert!(v5
            .user_properties
            .contains(&("idemq-reason".into(), "poison".into())));
        assert!(v5
            .user_properties
            .contains(&("idemq-original-topic".into(), "orders/eu".into())));
        let v3 = dead_letter(
            &mqtt("v3.1.1"),
            &received(b"{\"id\":1}"),
            DeadLetterReason::MissingKey,
            1,
        );
        let wrapped: serde_json::Value = serde_json::from_slice(&v3.payload).expect("json");
        assert_eq!(wrapped["idemqReason"], "missing_key");
        assert_eq!(wrapped["body"], "{\"id\":1}");
        assert!(v3.user_properties.is_empty());
    }

    #[test]
    fn a_shared_group_prefixes_every_filter() {
        assert_eq!(filters(&mqtt("v5")), vec!["$share/billing/orders/#"]);
    }

    #[test]
    fn the_client_id_is_the_consumer_and_host_unless_set() {
        let config = Config::from_yaml(
            "consumer: shop.billing\nbroker:\n  mqtt:\n    topics: [orders/#]\n    deadLetterTopic: orders/dead\ndelivery:\n  url: http://127.0.0.1:8080/\n",
        )
        .expect("valid");
        let m = mqtt("v5");
        let auth = BrokerAuth {
            user: Some("billing".into()),
            password: Some("s3cret".into()),
            ..BrokerAuth::default()
        };
        let o = options(
            &config,
            &m,
            "mqtt://broker:1883",
            &auth,
            Some("billing-0".into()),
        )
        .expect("options");
        assert_eq!(o.client_id, "shop.billing-billing-0");
        assert_eq!(o.endpoint.user.as_deref(), Some("billing"));
        assert_eq!(o.session_expiry, Some(Duration::from_secs(3600)));
        assert!(options(&config, &m, "mqtt://broker:1883", &auth, None).is_err());
    }
}
