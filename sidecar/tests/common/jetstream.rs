//! The real NATS JetStream on 127.0.0.1:4222 as a [`BrokerUnderTest`]: a
//! stream and a dead-letter stream unique to one test, publishing with
//! `Nats-Msg-Id` (the key the sidecar reads by default), counting what the
//! durable consumer has not settled, and deleting only those two streams
//! (the consumer goes with its stream). [`OwnJetStream`] is the same on a
//! NATS server of the test's own (see there).
//!
//! The test stream's duplicate window is 100 ms (the least JetStream takes): JetStream's own publish
//! dedup (two minutes by default) would otherwise drop the copies before the
//! sidecar sees them. The copies stand for those that come later than the
//! window, or are redelivered to the consumer, which JetStream does not
//! deduplicate. Each publish waits out the window after its last message,
//! so that copies published by a later call reach the stream however fast
//! the machine publishes, and a copy the stream dropped anyway fails the
//! test by name instead of leaving a count short.

use std::time::Duration;

use async_nats::jetstream::{self, stream};
use async_nats::HeaderMap;
use idemq_sidecar::secrets::Secrets;
use idemq_sidecar::source::jetstream::MSG_ID;

use super::broker::{BrokerUnderTest, DeadLetter, Message};
use super::nats::OwnNats;

pub const URL: &str = "nats://127.0.0.1:4222";

/// The test streams' publish dedup window.
const DUPLICATE_WINDOW: Duration = Duration::from_millis(100);

/// A stream with one subject, its durable consumer's name, and a stream that
/// collects dead letters.
pub struct JetStream {
    pub stream: String,
    pub subject: String,
    pub consumer: String,
    pub dead_letters: String,
    pub dead_letter_subject: String,
    /// AckWait of the consumer the sidecar creates.
    pub ack_wait: Duration,
    pub js: jetstream::Context,
    /// The server's URL.
    pub url: String,
    /// The header each message's key travels in.
    key_header: &'static str,
}

pub async fn connect() -> jetstream::Context {
    let client = async_nats::connect(URL).await.unwrap_or_else(|e| {
        panic!("NATS does not answer on {URL} ({e}); start it with: nats-server -js &")
    });
    jetstream::new(client)
}

impl JetStream {
    /// The streams of `test` on the server `js` is connected to, at `url`;
    /// keys travel in `key_header`.
    async fn on(js: jetstream::Context, url: &str, test: &str, key_header: &'static str) -> Self {
        let stream = super::unique(test);
        let subject = format!("{stream}.in");
        let dead_letters = format!("{stream}-dlq");
        let dead_letter_subject = format!("{stream}.dlq");
        js.create_stream(stream::Config {
            name: stream.clone(),
            subjects: vec![subject.clone()],
            duplicate_window: DUPLICATE_WINDOW,
            ..Default::default()
        })
        .await
        .expect("create the stream");
        js.create_stream(stream::Config {
            name: dead_letters.clone(),
            subjects: vec![dead_letter_subject.clone()],
            ..Default::default()
        })
        .await
        .expect("create the dead-letter stream");
        Self {
            consumer: format!("{stream}-consumer"),
            stream,
            subject,
            dead_letters,
            dead_letter_subject,
            ack_wait: Duration::from_secs(5),
            js,
            url: url.to_string(),
            key_header,
        }
    }

    async fn consumer_info(&self) -> Option<jetstream::consumer::Info> {
        let stream = self.js.get_stream(&self.stream).await.ok()?;
        stream.consumer_info(&self.consumer).await.ok()
    }
}

impl BrokerUnderTest for JetStream {
    const NAME: &'static str = "jetstream";

    async fn create(test: &str) -> Self {
        Self::on(connect().await, URL, test, MSG_ID).await
    }

    fn broker_yaml(&self, max_in_flight: u32) -> String {
        format!(
            "  jetstream:\n    stream: {}\n    consumer: {}\n    filterSubjects: [{}]\n    maxAckPending: {max_in_flight}\n    ackWait: {}ms\n    deadLetterSubject: {}\n",
            self.stream,
            self.consumer,
            self.subject,
            self.ack_wait.as_millis(),
            self.dead_letter_subject
        )
    }

    fn dedup_key_yaml(&self) -> String {
        if self.key_header == MSG_ID {
            String::new()
        } else {
            format!("  key:\n    from: header\n    name: {}", self.key_header)
        }
    }

    fn secrets(&self) -> Secrets {
        Secrets {
            broker_url: Some(self.url.clone()),
            ..Secrets::default()
        }
    }

    fn env(&self) -> Vec<(String, String)> {
        vec![("IDEMQ_BROKER_URL".to_string(), self.url.clone())]
    }

    /// Publishes in chunks, each waiting for JetStream's acks, then (keys
    /// in `Nats-Msg-Id`) waits out the duplicate window.
    async fn publish(&self, messages: Vec<Message>) {
        for chunk in messages.chunks(1000) {
            let mut acks = Vec::with_capacity(chunk.len());
            for Message { key, body } in chunk {
                let mut headers = HeaderMap::new();
                headers.insert("Content-Type", "application/json");
                if let Some(id) = key {
                    headers.insert(self.key_header, id.as_str());
                }
                acks.push(
                    self.js
                        .publish_with_headers(self.subject.clone(), headers, body.clone().into())
                        .await
                        .expect("publish"),
                );
            }
            for ack in acks {
                let ack = ack.await.expect("JetStream stored the message");
                assert!(
                    !ack.duplicate,
                    "JetStream dropped a copy within its {DUPLICATE_WINDOW:?} duplicate window (sequence {})",
                    ack.sequence
                );
            }
        }
        if self.key_header == MSG_ID {
            tokio::time::sleep(2 * DUPLICATE_WINDOW).await;
        }
    }

    /// Messages the consumer has not delivered yet, or delivered and not
    /// acknowledged; the whole stream before the consumer exists.
    async fn backlog(&self) -> u64 {
        match self.consumer_info().await {
            Some(info) => info.num_pending + info.num_ack_pending as u64,
            None => {
                let mut stream = self.js.get_stream(&self.stream).await.expect("stream");
                stream.info().await.expect("stream info").state.messages
            }
        }
    }

    /// Reads every dead letter, with its `Idemq-Reason` and key,
    /// then purges the dead-letter stream.
    async fn dead_letters(&self) -> Vec<DeadLetter> {
        let mut stream = self
            .js
            .get_stream(&self.dead_letters)
            .await
            .expect("dead-letter stream");
        let state = stream.info().await.expect("stream info").state.clone();
        let mut out = Vec::new();
        if state.messages > 0 {
            for seq in state.first_sequence..=state.last_sequence {
                let Ok(message) = stream.get_raw_message(seq).await else {
                    continue;
                };
                // By text: `HeaderMap::get` tells a standard name parsed off
                // the wire from the same name given as text.
                let header = |name: &str| {
                    message
                        .headers
                        .iter()
                        .find(|(k, _)| k.to_string().eq_ignore_ascii_case(name))
                        .and_then(|(_, v)| v.first())
                        .map(|v| v.as_str().to_string())
                };
                out.push(DeadLetter {
                    reason: header("Idemq-Reason").unwrap_or_default(),
                    key: header(self.key_header),
                });
            }
            stream.purge().await.expect("purge dead letters");
        }
        out
    }

    async fn delete(self) {
        for name in [&self.stream, &self.dead_letters] {
            let _ = self.js.delete_stream(name).await;
        }
    }
}

/// The header [`OwnJetStream`] carries keys in.
const KEY_HEADER: &str = "Idemq-Key";

/// A [`JetStream`] topology on a NATS server of the test's own
/// ([`OwnNats`]: its own port and store, messages up to 8 MiB where the
/// shared server takes 1 MiB), for the availability scenarios. Keys travel
/// in the header `Idemq-Key`, not `Nats-Msg-Id`: a scenario that publishes
/// copies back to back (two sidecars racing for one key) would otherwise
/// have them dropped by JetStream's publish dedup, whose window is 100 ms at
/// the least. The pipeline tests cover `Nats-Msg-Id` keys.
pub struct OwnJetStream {
    jetstream: JetStream,
    _server: OwnNats,
}

impl BrokerUnderTest for OwnJetStream {
    const NAME: &'static str = "jetstream";

    async fn create(test: &str) -> Self {
        let server = OwnNats::start().await;
        let client = async_nats::connect(server.url())
            .await
            .expect("connect to the test's own NATS");
        let jetstream =
            JetStream::on(jetstream::new(client), &server.url(), test, KEY_HEADER).await;
        Self {
            jetstream,
            _server: server,
        }
    }

    fn broker_yaml(&self, max_in_flight: u32) -> String {
        self.jetstream.broker_yaml(max_in_flight)
    }

    fn dedup_key_yaml(&self) -> String {
        self.jetstream.dedup_key_yaml()
    }

    fn secrets(&self) -> Secrets {
        self.jetstream.secrets()
    }

    fn env(&self) -> Vec<(String, String)> {
        self.jetstream.env()
    }

    async fn publish(&self, messages: Vec<Message>) {
        self.jetstream.publish(messages).await
    }

    async fn backlog(&self) -> u64 {
        self.jetstream.backlog().await
    }

    async fn dead_letters(&self) -> Vec<DeadLetter> {
        self.jetstream.dead_letters().await
    }

    /// The whole server goes, with its store.
    async fn delete(self) {}
}
