//! The MQTT side of the pipeline benchmark (`--broker mqtt`): a Mosquitto of
//! the benchmark's own per scenario (the backlog is far more than the 1000
//! messages Mosquitto keeps by default for a session: its config lifts
//! `max_queued_messages`), a topic and a persistent session opened before the
//! backlog is published, and the raw baseline:
//! - `raw`: the sidecar's own MQTT client (the same options: MQTT 5, a
//!   persistent session, Receive Maximum = `--prefetch`, manual acks) →
//!   HTTP POST → PUBACK in arrival order, the sidecar's `InOrder` tracker;
//!   no dedup;
//! - `naive`: the same client with Receive Maximum 1 (one message at a
//!   time), the naive step (`naive.rs`) on the correlation data, PUBACK.

use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use idemq_sidecar::config::MqttProtocol;
use idemq_sidecar::source::mqtt::client::{Connection, Endpoint, Event, Options};
use idemq_sidecar::source::mqtt::InOrder;
use rumqttc::v5::mqttbytes::v5::{Filter, PublishProperties};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event as E, EventLoop, Incoming, MqttOptions};
use tokio_util::sync::CancellationToken;

/// A scenario's own Mosquitto, topic and consumer session.
pub struct Topic {
    pub name: String,
    pub port: u16,
    child: Child,
    conf: std::path::PathBuf,
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

impl Topic {
    pub async fn create(name: &str) -> anyhow::Result<Self> {
        let port = free_port()?;
        let conf = std::env::temp_dir().join(format!("{name}-mosquitto.conf"));
        std::fs::write(
            &conf,
            format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nmax_queued_messages 0\nsys_interval 1\n"),
        )?;
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context(
                "start mosquitto (install it with: source .ci/services.sh && ensure_mosquitto)",
            )?;
        let topic = Self {
            name: name.to_string(),
            port,
            child,
            conf,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            if Instant::now() > deadline {
                bail!("mosquitto did not answer on 127.0.0.1:{port}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // The consumer's session exists before the backlog is published.
        let (client, mut eventloop) = topic.client(&topic.client_id(), true);
        client
            .subscribe_many([Filter::new(topic.filter(), QoS::AtLeastOnce)])
            .await?;
        loop {
            if let E::Incoming(Incoming::SubAck(_)) = eventloop.poll().await? {
                break;
            }
        }
        client.disconnect().await?;
        while eventloop.poll().await.is_ok() {}
        Ok(topic)
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    pub fn filter(&self) -> String {
        format!("{}/in", self.name)
    }

    /// The client id of the scenario's consumer (raw or the sidecar).
    pub fn client_id(&self) -> String {
        format!("{}-consumer", self.name)
    }

    fn client(&self, id: &str, session: bool) -> (AsyncClient, EventLoop) {
        let mut options = MqttOptions::new(id, "127.0.0.1", self.port);
        options
            .set_keep_alive(Duration::from_secs(30))
            .set_clean_start(!session)
            .set_max_packet_size(Some(1 << 20));
        if session {
            options.set_session_expiry_interval(Some(3600));
        }
        AsyncClient::new(options, 1000)
    }

    /// Publishes every id with QoS 1 (the id as correlation data, the send
    /// time as a user property) and waits for every PUBACK; at `rate`
    /// messages per second when given.
    pub async fn publish_all(
        &self,
        ids: &[String],
        body: &[u8],
        rate: Option<u64>,
        sent_header: &'static str,
    ) -> anyhow::Result<()> {
        let n = ids.len();
        let (client, mut eventloop) = self.client(&format!("{}-publisher", self.name), false);
        let acked = tokio::spawn(async move {
            let mut acked = 0;
            while acked < n {
                if let E::Incoming(Incoming::PubAck(_)) = eventloop.poll().await? {
                    acked += 1;
                }
            }
            anyhow::Ok(())
        });
        let pace = crate::pipeline::Pace::new(rate);
        let body = Bytes::copy_from_slice(body);
        for (i, id) in ids.iter().enumerate() {
            pace.wait(i).await;
            let properties = PublishProperties {
                correlation_data: Some(Bytes::from(id.clone())),
                user_properties: vec![(
                    sent_header.to_string(),
                    crate::pipeline::now_us().to_string(),
                )],
                ..Default::default()
            };
            client
                .publish_with_properties(
                    self.filter(),
                    QoS::AtLeastOnce,
                    false,
                    body.clone(),
                    properties,
                )
                .await?;
        }
        tokio::time::timeout(Duration::from_secs(300), acked)
            .await
            .context("mosquitto did not acknowledge every publish within 300 s")???;
        let _ = client.disconnect().await;
        Ok(())
    }

    /// Waits until no message is left unacknowledged: Mosquitto's store
    /// holds only retained messages (its `$SYS` counts, once a second).
    pub async fn wait_settled(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(120);
        let (client, mut eventloop) = self.client(&format!("{}-sys", self.name), false);
        client
            .subscribe_many([
                Filter::new("$SYS/broker/store/messages/count", QoS::AtMostOnce),
                Filter::new("$SYS/broker/retained messages/count", QoS::AtMostOnce),
            ])
            .await?;
        let (mut stored, mut retained) = (None::<u64>, None::<u64>);
        loop {
            if let (Some(s), Some(r)) = (stored, retained) {
                if s <= r {
                    let _ = client.disconnect().await;
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "mosquitto still holds {:?} unacknowledged messages",
                    stored.zip(retained).map(|(s, r)| s - r)
                );
            }
            let event = tokio::time::timeout(Duration::from_secs(2), eventloop.poll()).await;
            if let Ok(Ok(E::Incoming(Incoming::Publish(p)))) = event {
                let value = String::from_utf8_lossy(&p.payload).parse().ok();
                if p.topic.ends_with(b"store/messages/count") {
                    stored = value;
                } else {
                    retained = value;
                }
            }
        }
    }

    pub async fn delete(self) {
        drop(self);
    }
}

impl Drop for Topic {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.conf);
    }
}

/// The options of a scenario's consumer session: the sidecar's.
fn options(port: u16, client_id: String, receive_maximum: u16) -> anyhow::Result<Options> {
    Ok(Options {
        endpoint: Endpoint::parse(&format!("mqtt://127.0.0.1:{port}"))
            .map_err(anyhow::Error::msg)?,
        protocol: MqttProtocol::V5,
        client_id,
        session_expiry: Some(Duration::from_secs(3600)),
        receive_maximum,
        ca: None,
    })
}

/// The raw baseline: the sidecar's MQTT client and PUBACK order, no dedup.
pub async fn raw(
    port: u16,
    client_id: String,
    filter: String,
    receive_maximum: u16,
    url: String,
    sent_header: &'static str,
    stop: CancellationToken,
) {
    let result: anyhow::Result<()> = async {
        let (conn, mut events) = Connection::open(&options(port, client_id, receive_maximum)?).await?;
        conn.subscribe(&[filter]).await.map_err(anyhow::Error::msg)?;
        let post = crate::post::Post::new(&url)?;
        let order = Arc::new(Mutex::new(InOrder::default()));
        let settled = Arc::new(tokio::sync::Notify::new());
        let mut seq = 0u64;
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = settled.notified() => {
                    let pkids = order.lock().expect("lock").take();
                    for pkid in pkids {
                        conn.ack(pkid).await.map_err(anyhow::Error::msg)?;
                    }
                }
                event = events.recv() => match event {
                    Some(Event::Message(m)) => {
                        order.lock().expect("lock").received(seq, m.pkid);
                        let sent = m.user_properties.iter().find(|(k, _)| k == sent_header).map(|(_, sent)| (sent_header, sent.clone()));
                        let (post, order, settled, this) = (post.clone(), order.clone(), settled.clone(), seq);
                        seq += 1;
                        tokio::spawn(async move {
                            post.send(m.payload, None, sent).await;
                            order.lock().expect("lock").settle(this);
                            settled.notify_one();
                        });
                    }
                    Some(Event::Ended(reason)) => bail!("the connection ended: {reason:?}"),
                    Some(Event::Subscribed { .. }) => {}
                    None => break,
                },
            }
        }
        conn.close(&mut events).await;
        Ok(())
    }
    .await;
    if let Err(e) = result {
        eprintln!("raw mqtt consumer failed: {e:#}");
    }
}

/// The tutorial consumer: one message at a time, the naive step on the
/// correlation data (the message's id), PUBACK.
pub async fn naive(
    port: u16,
    client_id: String,
    filter: String,
    url: String,
    run_id: String,
    stop: CancellationToken,
) {
    let result: anyhow::Result<()> = async {
        let (conn, mut events) = Connection::open(&options(port, client_id, 1)?).await?;
        conn.subscribe(&[filter])
            .await
            .map_err(anyhow::Error::msg)?;
        let mut naive = crate::naive::Naive::connect(url, &run_id).await?;
        loop {
            let event = tokio::select! {
                _ = stop.cancelled() => break,
                event = events.recv() => event,
            };
            match event {
                Some(Event::Message(m)) => {
                    let id = m
                        .correlation_data
                        .as_ref()
                        .map(|id| String::from_utf8_lossy(id).into_owned())
                        .unwrap_or_default();
                    let sent = m
                        .user_properties
                        .iter()
                        .find(|(k, _)| k == crate::pipeline::SENT_HEADER)
                        .map(|(_, v)| v.clone());
                    naive.step(&id, m.payload, sent).await?;
                    conn.ack(m.pkid).await.map_err(anyhow::Error::msg)?;
                }
                Some(Event::Ended(reason)) => bail!("the connection ended: {reason:?}"),
                Some(Event::Subscribed { .. }) => {}
                None => break,
            }
        }
        conn.close(&mut events).await;
        Ok(())
    }
    .await;
    if let Err(e) = result {
        eprintln!("naive mqtt consumer failed: {e:#}");
    }
}
