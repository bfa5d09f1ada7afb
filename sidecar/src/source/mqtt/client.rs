//! One MQTT connection, whatever the protocol version: rumqttc has a client
//! for 3.1.1 and another for 5, with their own types; this module puts one
//! face on both, holding only what the source uses.
//!
//! rumqttc's event loop must be polled all the time (it reads, writes the
//! requests the client queues, and pings); a pump task polls it and forwards
//! what the source needs on a channel. The pump stops at the first error and
//! does not reconnect: a new session starts with a new [`Connection`], so
//! nothing of an old session's acknowledgement state outlives it.
//!
//! A publish is confirmed when the broker's PUBACK for it arrives. rumqttc
//! numbers a publish only when its event loop sends it, and sends requests in
//! the order they were queued, so the pump pairs each `Outgoing::Publish(id)`
//! with the oldest publish still waiting for its number. On MQTT 5 a PUBACK
//! saying *no matching subscribers* fails the publish: nothing would keep the
//! message.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use rumqttc::v5;
use rumqttc::v5::mqttbytes::v5 as p5;
use rumqttc::v5::mqttbytes::QoS;
use tokio::sync::{mpsc, oneshot};

use crate::config::MqttProtocol;

/// The largest packet either side may send: MQTT's own limit. A smaller
/// limit would make the broker drop larger messages for this session.
const MAX_PACKET: u32 = 268_435_455;
const KEEP_ALIVE: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT_SECS: u64 = 10;

/// Where the broker is: `mqtt://host[:1883]` or `mqtts://host[:8883]`, with
/// an optional user name and password.
#[derive(Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
    pub tls: bool,
    pub user: Option<String>,
    pub password: Option<String>,
}

impl Endpoint {
    /// Parses a broker URL; the error never quotes the URL (it may hold a password).
    pub fn parse(url: &str) -> Result<Self, String> {
        let bad = || {
            format!(
                "the broker URL {} is not mqtt://host[:port] or mqtts://host[:port]",
                crate::secrets::redact(url)
            )
        };
        let u = url::Url::parse(url).map_err(|_| bad())?;
        let (tls, default_port) = match u.scheme() {
            "mqtt" | "tcp" => (false, 1883),
            "mqtts" | "ssl" => (true, 8883),
            _ => return Err(bad()),
        };
        let host = u.host_str().filter(|h| !h.is_empty()).ok_or_else(bad)?;
        let decode = |s: &str| {
            url::form_urlencoded::parse(format!("x={s}").as_bytes())
                .next()
                .map(|(_, v)| v.into_owned())
        };
        Ok(Self {
            host: host.trim_start_matches('[').trim_end_matches(']').into(),
            port: u.port().unwrap_or(default_port),
            tls,
            user: Some(u.username())
                .filter(|s| !s.is_empty())
                .and_then(decode),
            password: u.password().and_then(decode),
        })
    }
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}://{}:{}",
            if self.tls { "mqtts" } else { "mqtt" },
            self.host,
            self.port
        )
    }
}

/// How to open a session.
#[derive(Debug, Clone)]
pub struct Options {
    pub endpoint: Endpoint,
    pub protocol: MqttProtocol,
    pub client_id: String,
    /// Resume the broker's session (clean start off) and keep it this long
    /// after a disconnect; `None`: a clean session, discarded at disconnect.
    pub session_expiry: Option<Duration>,
    /// MQTT 5 Receive Maximum: messages the broker may send unacknowledged.
    pub receive_maximum: u16,
    /// PEM CA certificates for TLS, instead of the system's.
    pub ca: Option<Vec<u8>>,
}

/// Why a connection could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("the broker at {endpoint:?} does not answer: {reason}")]
    Unreachable { endpoint: Endpoint, reason: String },
    #[error("the broker at {endpoint:?} refused the credentials ({code})")]
    Refused { endpoint: Endpoint, code: String },
    #[error("the broker at {endpoint:?} refused the connection ({code})")]
    Rejected { endpoint: Endpoint, code: String },
}

/// A message as received, in the terms of both versions.
#[derive(Debug)]
pub struct Received {
    pub pkid: u16,
    pub topic: String,
    pub payload: Bytes,
    /// The broker sent it before (a resumed session's unacknowledged message).
    pub dup: bool,
    /// MQTT 5 only.
    pub user_properties: Vec<(String, String)>,
    pub correlation_data: Option<Bytes>,
    pub content_type: Option<String>,
}

/// A message to publish (dead letters).
#[derive(Debug, Clone, Default)]
pub struct Outgoing {
    pub topic: String,
    pub payload: Bytes,
    /// MQTT 5 only.
    pub user_properties: Vec<(String, String)>,
    pub correlation_data: Option<Bytes>,
    pub content_type: Option<String>,
}

/// What the pump reports.
#[derive(Debug)]
pub enum Event {
    Message(Received),
    /// The broker answered the subscription: the filters it refused, if any.
    Subscribed {
        refused: usize,
    },
    /// The connection ended (an error, or the disconnect the source asked for).
    Ended(Option<String>),
}

#[derive(Clone)]
enum Client {
    V5(v5::AsyncClient),
    V4(rumqttc::AsyncClient),
}

type Confirm = oneshot::Sender<Result<(), String>>;

/// Publishes waiting for their packet id, then for their PUBACK.
#[derive(Default)]
struct Confirms {
    unnumbered: VecDeque<Confirm>,
    numbered: HashMap<u16, Confirm>,
}

/// What the pump reports, in order.
pub type Events = mpsc::UnboundedReceiver<Event>;

/// An open session.
pub struct Connection {
    client: Client,
    /// The broker resumed an existing session (its queued messages follow).
    pub session_present: bool,
    confirms: Arc<Mutex<Confirms>>,
    /// One publish is queued at a time, so packet ids pair with publishes.
    publishing: tokio::sync::Mutex<()>,
    pump: tokio::task::JoinHandle<()>,
}

impl Connection {
    /// Connects and waits for the broker's CONNACK.
    pub async fn open(options: &Options) -> Result<(Self, Events), ConnectError> {
        // rustls needs a process-wide provider; the binary installs ring too.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let (tx, events) = mpsc::unbounded_channel();
        let confirms = Arc::new(Mutex::new(Confirms::default()));
        let (connected_tx, connected) = oneshot::channel();
        let (client, pump) = match options.protocol {
            MqttProtocol::V5 => {
                let (client, eventloop) = v5::AsyncClient::new(v5_options(options), 64);
                let pump = tokio::spawn(pump_v5(eventloop, tx, confirms.clone(), connected_tx));
                (Client::V5(client), pump)
            }
            MqttProtocol::V311 => {
                let (client, eventloop) = rumqttc::AsyncClient::new(v4_options(options), 64);
                let pump = tokio::spawn(pump_v4(eventloop, tx, confirms.clone(), connected_tx));
                (Client::V4(client), pump)
            }
        };
        let endpoint = options.endpoint.clone();
        let answer = connected.await.unwrap_or_else(|_| {
            Err(Refusal::Unreachable(
                "the connection task ended".to_string(),
            ))
        });
        match answer {
            Ok(session_present) => Ok((
                Self {
                    client,
                    session_present,
                    confirms,
                    publishing: tokio::sync::Mutex::new(()),
                    pump,
                },
                events,
            )),
            Err(refusal) => {
                pump.abort();
                Err(match refusal {
                    Refusal::Unreachable(reason) => ConnectError::Unreachable { endpoint, reason },
                    Refusal::Credentials(code) => ConnectError::Refused { endpoint, code },
                    Refusal::Other(code) => ConnectError::Rejected { endpoint, code },
                })
            }
        }
    }

    /// Subscribes to `filters` with QoS 1; the answer comes as
    /// [`Event::Subscribed`].
    pub async fn subscribe(&self, filters: &[String]) -> Result<(), String> {
        match &self.client {
            Client::V5(c) => c
                .subscribe_many(
                    filters
                        .iter()
                        .map(|f| p5::Filter::new(f.clone(), QoS::AtLeastOnce)),
                )
                .await
                .map_err(|e| e.to_string()),
            Client::V4(c) => c
                .subscribe_many(
                    filters.iter().map(|f| {
                        rumqttc::SubscribeFilter::new(f.clone(), rumqttc::QoS::AtLeastOnce)
                    }),
                )
                .await
                .map_err(|e| e.to_string()),
        }
    }

    /// Queues the PUBACK of message `pkid`. PUBACKs leave in the order they
    /// are queued.
    pub async fn ack(&self, pkid: u16) -> Result<(), String> {
        match &self.client {
            Client::V5(c) => {
                let mut publish = p5::Publish::new("", QoS::AtLeastOnce, Bytes::new(), None);
                publish.pkid = pkid;
                c.ack(&publish).await.map_err(|e| e.to_string())
            }
            Client::V4(c) => {
                let mut publish = rumqttc::Publish::new("", rumqttc::QoS::AtLeastOnce, Vec::new());
                publish.pkid = pkid;
                c.ack(&publish).await.map_err(|e| e.to_string())
            }
        }
    }

    /// Publishes with QoS 1 and waits for the broker's PUBACK.
    pub async fn publish(&self, message: Outgoing, timeout: Duration) -> Result<(), String> {
        let (confirm, confirmed) = oneshot::channel();
        {
            let _one_at_a_time = self.publishing.lock().await;
            lock(&self.confirms).unnumbered.push_back(confirm);
            let queued = match &self.client {
                Client::V5(c) => {
                    let properties = p5::PublishProperties {
                        user_properties: message.user_properties,
                        correlation_data: message.correlation_data,
                        content_type: message.content_type,
                        ..Default::default()
                    };
                    c.publish_with_properties(
                        message.topic,
                        QoS::AtLeastOnce,
                        false,
                        message.payload,
                        properties,
                    )
                    .await
                    .map_err(|e| e.to_string())
                }
                Client::V4(c) => c
                    .publish(
                        message.topic,
                        rumqttc::QoS::AtLeastOnce,
                        false,
                        message.payload.to_vec(),
                    )
                    .await
                    .map_err(|e| e.to_string()),
            };
            if let Err(e) = queued {
                lock(&self.confirms).unnumbered.pop_back();
                return Err(e);
            }
        }
        match tokio::time::timeout(timeout, confirmed).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err("the connection ended before the broker confirmed".into()),
            Err(_) => Err(format!("the broker did not confirm within {timeout:?}")),
        }
    }

    /// Sends DISCONNECT after every queued request (the PUBACKs first) and
    /// waits for the pump to end. With a session expiry the broker keeps
    /// the session, and what was not acknowledged in it.
    pub async fn close(&self, events: &mut Events) {
        let sent = match &self.client {
            Client::V5(c) => c.disconnect().await.is_ok(),
            Client::V4(c) => c.disconnect().await.is_ok(),
        };
        if sent {
            let ended = async {
                while let Some(event) = events.recv().await {
                    if matches!(event, Event::Ended(_)) {
                        break;
                    }
                }
            };
            let _ = tokio::time::timeout(Duration::from_secs(5), ended).await;
        }
        self.pump.abort();
    }
}

fn lock(confirms: &Mutex<Confirms>) -> std::sync::MutexGuard<'_, Confirms> {
    confirms.lock().unwrap_or_else(|e| e.into_inner())
}

impl Confirms {
    fn numbered(&mut self, pkid: u16) {
        if let Some(confirm) = self.unnumbered.pop_front() {
            self.numbered.insert(pkid, confirm);
        }
    }

    fn acked(&mut self, pkid: u16, result: Result<(), String>) {
        if let Some(confirm) = self.numbered.remove(&pkid) {
            let _ = confirm.send(result);
        }
    }
}

enum Refusal {
    Unreachable(String),
    Credentials(String),
    Other(String),
}

fn v5_options(o: &Options) -> v5::MqttOptions {
    let mut m = v5::MqttOptions::new(&o.client_id, &o.endpoint.host, o.endpoint.port);
    m.set_keep_alive(KEEP_ALIVE)
        .set_connection_timeout(CONNECT_TIMEOUT_SECS)
        .set_manual_acks(true)
        .set_clean_start(o.session_expiry.is_none())
        .set_receive_maximum(Some(o.receive_maximum))
        .set_max_packet_size(Some(MAX_PACKET));
    if let Some(expiry) = o.session_expiry {
        m.set_session_expiry_interval(Some(u32::try_from(expiry.as_secs()).unwrap_or(u32::MAX)));
    }
    if let (Some(user), password) = (&o.endpoint.user, &o.endpoint.password) {
        m.set_credentials(user, password.clone().unwrap_or_default());
    }
    if o.endpoint.tls {
        m.set_transport(transport(o));
    }
    m
}

fn v4_options(o: &Options) -> rumqttc::MqttOptions {
    let mut m = rumqttc::MqttOptions::new(&o.client_id, &o.endpoint.host, o.endpoint.port);
    m.set_keep_alive(KEEP_ALIVE)
        .set_manual_acks(true)
        .set_clean_session(o.session_expiry.is_none())
        .set_max_packet_size(MAX_PACKET as usize, MAX_PACKET as usize);
    if let (Some(user), password) = (&o.endpoint.user, &o.endpoint.password) {
        m.set_credentials(user, password.clone().unwrap_or_default());
    }
    if o.endpoint.tls {
        m.set_transport(transport(o));
    }
    m
}

fn transport(o: &Options) -> rumqttc::Transport {
    match &o.ca {
        Some(ca) => rumqttc::Transport::tls(ca.clone(), None, None),
        None => rumqttc::Transport::tls_with_default_config(),
    }
}

async fn pump_v5(
    mut eventloop: v5::EventLoop,
    tx: mpsc::UnboundedSender<Event>,
    confirms: Arc<Mutex<Confirms>>,
    connected: oneshot::Sender<Result<bool, Refusal>>,
) {
    use v5::{ConnectionError, Event as E, Incoming};
    let mut connected = Some(connected);
    loop {
        let event = match eventloop.poll().await {
            Ok(event) => event,
            Err(e) => {
                let refusal = match &e {
                    ConnectionError::ConnectionRefused(
                        code @ (p5::ConnectReturnCode::BadUserNamePassword
                        | p5::ConnectReturnCode::NotAuthorized),
                    ) => Refusal::Credentials(format!("{code:?}")),
                    ConnectionError::ConnectionRefused(code) => Refusal::Other(format!("{code:?}")),
                    other => Refusal::Unreachable(other.to_string()),
                };
                match connected.take() {
                    Some(c) => {
                        let _ = c.send(Err(refusal));
                    }
                    None => {
                        let _ = tx.send(Event::Ended(Some(e.to_string())));
                    }
                }
                return;
            }
        };
        match event {
            E::Incoming(Incoming::ConnAck(ack)) => {
                if let Some(c) = connected.take() {
                    let _ = c.send(Ok(ack.session_present));
                }
            }
            E::Incoming(Incoming::Publish(p)) => {
                let props = p.properties.unwrap_or_default();
                let message = Received {
                    pkid: p.pkid,
                    topic: String::from_utf8_lossy(&p.topic).into_owned(),
                    payload: p.payload,
                    dup: p.dup,
                    user_properties: props.user_properties,
                    correlation_data: props.correlation_data,
                    content_type: props.content_type,
                };
                let _ = tx.send(Event::Message(message));
            }
            E::Incoming(Incoming::SubAck(ack)) => {
                let refused = ack
                    .return_codes
                    .iter()
                    .filter(|c| !matches!(c, p5::SubscribeReasonCode::Success(_)))
                    .count();
                let _ = tx.send(Event::Subscribed { refused });
            }
            E::Incoming(Incoming::PubAck(ack)) => {
                let result = match ack.reason {
                    p5::PubAckReason::Success => Ok(()),
                    reason => Err(format!("the broker answered {reason:?}")),
                };
                lock(&confirms).acked(ack.pkid, result);
            }
            E::Incoming(Incoming::Disconnect(d)) => {
                let _ = tx.send(Event::Ended(Some(format!(
                    "the broker disconnected: {:?}",
                    d.reason_code
                ))));
                return;
            }
            E::Outgoing(rumqttc::Outgoing::Publish(pkid)) => lock(&confirms).numbered(pkid),
            E::Outgoing(rumqttc::Outgoing::Disconnect) => {
                let _ = tx.send(Event::Ended(None));
                return;
            }
            _ => {}
        }
    }
}

async fn pump_v4(
    mut eventloop: rumqttc::EventLoop,
    tx: mpsc::UnboundedSender<Event>,
    confirms: Arc<Mutex<Confirms>>,
    connected: oneshot::Sender<Result<bool, Refusal>>,
) {
    use rumqttc::{ConnectReturnCode, ConnectionError, Event as E, Packet};
    let mut connected = Some(connected);
    loop {
        let event = match eventloop.poll().await {
            Ok(event) => event,
            Err(e) => {
                let refusal = match &e {
                    ConnectionError::ConnectionRefused(
                        code @ (ConnectReturnCode::BadUserNamePassword
                        | ConnectReturnCode::NotAuthorized),
                    ) => Refusal::Credentials(format!("{code:?}")),
                    ConnectionError::ConnectionRefused(code) => Refusal::Other(format!("{code:?}")),
                    other => Refusal::Unreachable(other.to_string()),
                };
                match connected.take() {
                    Some(c) => {
                        let _ = c.send(Err(refusal));
                    }
                    None => {
                        let _ = tx.send(Event::Ended(Some(e.to_string())));
                    }
                }
                return;
            }
        };
        match event {
            E::Incoming(Packet::ConnAck(ack)) => {
                if let Some(c) = connected.take() {
                    let _ = c.send(Ok(ack.session_present));
                }
            }
            E::Incoming(Packet::Publish(p)) => {
                let message = Received {
                    pkid: p.pkid,
                    topic: p.topic,
                    payload: p.payload,
                    dup: p.dup,
                    user_properties: Vec::new(),
                    correlation_data: None,
                    content_type: None,
                };
                let _ = tx.send(Event::Message(message));
            }
            E::Incoming(Packet::SubAck(ack)) => {
                let refused = ack
                    .return_codes
                    .iter()
                    .filter(|c| !matches!(c, rumqttc::SubscribeReasonCode::Success(_)))
                    .count();
                let _ = tx.send(Event::Subscribed { refused });
            }
            E::Incoming(Packet::PubAck(ack)) => lock(&confirms).acked(ack.pkid, Ok(())),
            E::Outgoing(rumqttc::Outgoing::Publish(pkid)) => lock(&confirms).numbered(pkid),
            E::Outgoing(rumqttc::Outgoing::Disconnect) => {
                let _ = tx.send(Event::Ended(None));
                return;
            }
            _ => {}
        }
    }
}

/// Connects with a clean session and disconnects: the broker answers and
/// takes the credentials. What the operator checks before it binds.
pub async fn probe(
    endpoint: Endpoint,
    protocol: MqttProtocol,
    ca: Option<Vec<u8>>,
) -> Result<(), ConnectError> {
    let options = Options {
        endpoint,
        protocol,
        client_id: format!("idemq-probe-{}", uuid::Uuid::new_v4().simple()),
        session_expiry: None,
        receive_maximum: 1,
        ca,
    };
    let (connection, mut events) = Connection::open(&options).await?;
    connection.close(&mut events).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_name_host_port_tls_and_credentials() {
        let e = Endpoint::parse("mqtts://orders:p%40ss@broker.example").expect("valid");
        assert_eq!(
            (e.host.as_str(), e.port, e.tls),
            ("broker.example", 8883, true)
        );
        assert_eq!(e.user.as_deref(), Some("orders"));
        assert_eq!(e.password.as_deref(), Some("p@ss"));
        let e = Endpoint::parse("mqtt://127.0.0.1").expect("valid");
        assert_eq!((e.port, e.tls, e.user), (1883, false, None));
        let err = Endpoint::parse("amqp://u:s3cret@rabbit:5672").unwrap_err();
        assert!(!err.contains("s3cret"), "{err}");
        assert!(
            !format!("{:?}", Endpoint::parse("mqtt://u:s3cret@h").expect("valid"))
                .contains("s3cret")
        );
    }
}
