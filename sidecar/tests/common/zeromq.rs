//! ZeroMQ for the sidecar's tests: ZeroMQ has no broker, so the "broker" of
//! the scenarios is a Lazy Pirate client ([`Pirate`]): it sends each
//! message as a `router` request and sends it again until it gets `ok` or
//! `dead`, on a DEALER socket of its own thread, with a window of requests
//! outstanding. Its backlog is what has no final answer yet; dead letters
//! are read from where the endpoint sends them ([`DeadLetterSink`]): a PULL
//! socket the test binds, a RabbitMQ queue or a Kafka topic of the test's own.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use idemq_sidecar::secrets::Secrets;
use idemq_sidecar::source::zeromq::socket::send_frames;
use idemq_sidecar::source::zeromq::CurveKeys;

use super::broker::{BrokerUnderTest, DeadLetter, Message};
use super::kafka::Kafka;
use super::rabbitmq::{self, RabbitMq};
use super::scenarios::free_port;

/// A CURVE key pair, Z85-encoded as the environment carries it.
#[derive(Clone)]
pub struct KeyPair {
    pub public: String,
    pub secret: String,
}

impl KeyPair {
    pub fn new() -> Self {
        let pair = zmq::CurveKeyPair::new().expect("libzmq with CURVE");
        Self {
            public: zmq::z85_encode(&pair.public_key).expect("z85"),
            secret: zmq::z85_encode(&pair.secret_key).expect("z85"),
        }
    }
    fn raw(text: &str) -> Vec<u8> {
        zmq::z85_decode(text).expect("z85")
    }
}

/// The CURVE setup of an endpoint: its own pair and the allowed clients'.
#[derive(Clone)]
pub struct Curve {
    pub server: KeyPair,
    pub clients: Vec<KeyPair>,
}

impl Curve {
    pub fn new(clients: usize) -> Self {
        Self {
            server: KeyPair::new(),
            clients: (0..clients).map(|_| KeyPair::new()).collect(),
        }
    }

    pub fn keys(&self) -> CurveKeys {
        CurveKeys {
            secret_key: KeyPair::raw(&self.server.secret),
            client_keys: self
                .clients
                .iter()
                .map(|c| KeyPair::raw(&c.public))
                .collect(),
        }
    }

    pub fn env(&self) -> Vec<(String, String)> {
        let clients: Vec<&str> = self.clients.iter().map(|c| c.public.as_str()).collect();
        vec![
            (
                "IDEMQ_ZMQ_SERVER_SECRET_KEY".into(),
                self.server.secret.clone(),
            ),
            ("IDEMQ_ZMQ_CLIENT_KEYS".into(), clients.join("\n")),
        ]
    }
}

/// How a [`Pirate`] behaves.
#[derive(Clone)]
pub struct PirateOptions {
    pub endpoint: String,
    /// The server's public key and the client's pair, for CURVE.
    pub curve: Option<(String, KeyPair)>,
    /// Without an answer this long, a request is sent again.
    pub timeout: Duration,
    /// Requests outstanding at once, at most.
    pub window: usize,
    /// The share of replies thrown away on receipt, as if lost.
    pub lose: f64,
    /// How long after `retry` a request is sent again.
    pub retry_after: Duration,
}

impl PirateOptions {
    pub fn new(endpoint: String) -> Self {
        Self {
            endpoint,
            curve: None,
            timeout: Duration::from_secs(5),
            window: 100,
            lose: 0.0,
            retry_after: Duration::from_millis(50),
        }
    }
}

/// What a [`Pirate`] saw.
#[derive(Debug, Default, Clone)]
pub struct Tally {
    pub sent: u64,
    pub ok: u64,
    pub dead: u64,
    pub retry: u64,
    /// `retry` replies by the reason they gave.
    pub retry_reasons: std::collections::BTreeMap<String, u64>,
    /// Replies thrown away (`lose`).
    pub lost_replies: u64,
    /// Requests sent again after `timeout` without an answer.
    pub timeouts: u64,
    /// Replies to requests that were answered already.
    pub late: u64,
}

struct Request {
    frames: Vec<Vec<u8>>,
    not_before: Instant,
    sent_at: Instant,
}

#[derive(Default)]
struct State {
    waiting: VecDeque<Request>,
    outstanding: Vec<Request>,
    tally: Tally,
}

/// A Lazy Pirate client on a thread of its own.
pub struct Pirate {
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Pirate {
    pub fn start(options: PirateOptions) -> Self {
        let state = Arc::new(Mutex::new(State::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (state, stop) = (state.clone(), stop.clone());
            std::thread::spawn(move || pirate(options, state, stop))
        };
        Self {
            state,
            stop,
            thread: Some(thread),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `messages` as requests `[key, header, body]` (an empty key
    /// frame for a message without one).
    pub fn send(&self, messages: Vec<Message>) {
        let now = Instant::now();
        let mut state = self.lock();
        for Message { key, body } in messages {
            state.waiting.push_back(Request {
                frames: vec![
                    key.unwrap_or_default().into_bytes(),
                    br#"{"content-type":"application/json"}"#.to_vec(),
                    body,
                ],
                not_before: now,
                sent_at: now,
            });
        }
    }

    /// Requests without a final answer (`ok` or `dead`) yet.
    pub fn unanswered(&self) -> u64 {
        let state = self.lock();
        (state.waiting.len() + state.outstanding.len()) as u64
    }

    pub fn tally(&self) -> Tally {
        self.lock().tally.clone()
    }

    /// Waits until every request has its final answer.
    pub async fn wait_answered(&self, timeout: Duration) -> bool {
        super::scenarios::wait_for(timeout, async || self.unanswered() == 0).await
    }
}

impl Drop for Pirate {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A client socket of `kind` connected to `endpoint`, with CURVE keys.
pub fn connect(
    ctx: &zmq::Context,
    kind: zmq::SocketType,
    endpoint: &str,
    curve: Option<&(String, KeyPair)>,
) -> zmq::Socket {
    let socket = ctx.socket(kind).expect("socket");
    socket.set_linger(0).expect("linger");
    if let Some((server, client)) = curve {
        socket
            .set_curve_serverkey(&KeyPair::raw(server))
            .expect("server key");
        socket
            .set_curve_publickey(&KeyPair::raw(&client.public))
            .expect("public key");
        socket
            .set_curve_secretkey(&KeyPair::raw(&client.secret))
            .expect("secret key");
    }
    socket.connect(endpoint).expect("connect");
    socket
}

fn pirate(options: PirateOptions, state: Arc<Mutex<State>>, stop: Arc<AtomicBool>) {
    let ctx = zmq::Context::new();
    let dealer = connect(&ctx, zmq::DEALER, &options.endpoint, options.curve.as_ref());
    dealer.set_sndhwm(0).expect("hwm");
    while !stop.load(Ordering::SeqCst) {
        let readable = dealer.poll(zmq::POLLIN, 5).expect("poll") > 0;
        let mut state = state.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        while let Some(reply) = readable
            .then(|| dealer.recv_multipart(zmq::DONTWAIT).ok())
            .flatten()
        {
            if rand::random::<f64>() < options.lose {
                state.tally.lost_replies += 1;
                continue;
            }
            let Some(at) = state
                .outstanding
                .iter()
                .position(|r| r.frames[0] == reply[0])
            else {
                state.tally.late += 1;
                continue;
            };
            let mut request = state.outstanding.remove(at);
            match reply.get(1).map(Vec::as_slice) {
                Some(b"ok") => state.tally.ok += 1,
                Some(b"dead") => state.tally.dead += 1,
                _ => {
                    state.tally.retry += 1;
                    let why = reply
                        .get(2)
                        .map(|w| String::from_utf8_lossy(w).into_owned())
                        .unwrap_or_default();
                    *state.tally.retry_reasons.entry(why).or_default() += 1;
                    request.not_before = now + options.retry_after;
                    state.waiting.push_back(request);
                }
            }
        }
        // Lazy Pirate: no answer in time, send it again.
        let (expired, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut state.outstanding)
            .into_iter()
            .partition(|r| now.duration_since(r.sent_at) >= options.timeout);
        state.outstanding = kept;
        state.tally.timeouts += expired.len() as u64;
        for request in expired.into_iter().rev() {
            state.waiting.push_front(Request {
                not_before: now,
                ..request
            });
        }
        let mut skipped = VecDeque::new();
        while state.outstanding.len() < options.window {
            let Some(mut request) = state.waiting.pop_front() else {
                break;
            };
            if request.not_before > now {
                skipped.push_back(request);
                continue;
            }
            if send_frames(&dealer, &request.frames, zmq::DONTWAIT).is_err() {
                state.waiting.push_front(request);
                break;
            }
            state.tally.sent += 1;
            request.sent_at = now;
            state.outstanding.push(request);
        }
        skipped.extend(std::mem::take(&mut state.waiting));
        state.waiting = skipped;
    }
}

/// A PULL socket bound where the sidecar sends dead letters.
pub struct DeadLetterReader {
    pub endpoint: String,
    socket: Mutex<zmq::Socket>,
    _ctx: zmq::Context,
}

impl DeadLetterReader {
    pub fn bind() -> Self {
        let ctx = zmq::Context::new();
        let socket = ctx.socket(zmq::PULL).expect("socket");
        socket.set_linger(0).expect("linger");
        let endpoint = format!("tcp://127.0.0.1:{}", free_port());
        socket.bind(&endpoint).expect("bind the dead-letter reader");
        Self {
            endpoint,
            socket: Mutex::new(socket),
            _ctx: ctx,
        }
    }

    /// Every dead letter received so far (waiting up to 1 s for the first):
    /// the JSON frame's reason and the message-id frame that follows it.
    pub fn take(&self) -> Vec<(serde_json::Value, Vec<Vec<u8>>)> {
        let socket = self.socket.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = Vec::new();
        while socket.poll(zmq::POLLIN, 1000).expect("poll") > 0 {
            while let Ok(mut frames) = socket.recv_multipart(zmq::DONTWAIT) {
                let about = serde_json::from_slice(&frames.remove(0)).expect("JSON first frame");
                out.push((about, frames));
            }
        }
        out
    }
}

/// Where a test endpoint's dead letters go, and how the test reads them back.
#[allow(async_fn_in_trait)]
pub trait DeadLetterSink: Sized {
    /// The endpoint's name in printed figures.
    const NAME: &'static str;

    /// Creates the target of `test`, with names no other test uses.
    async fn create(test: &str) -> Self;

    /// The lines under `deadLetter:` (indented by six spaces).
    fn yaml(&self) -> String;

    /// Secrets of an in-process sidecar.
    fn secrets(&self) -> Secrets;

    /// Environment of a sidecar run as a child process.
    fn env(&self) -> Vec<(String, String)>;

    /// Takes every dead letter sent so far.
    async fn take(&self) -> Vec<DeadLetter>;

    /// Deletes what `create` made, and nothing else.
    async fn delete(self);
}

impl DeadLetterSink for DeadLetterReader {
    const NAME: &'static str = "zeromq";

    async fn create(_test: &str) -> Self {
        Self::bind()
    }

    fn yaml(&self) -> String {
        format!("      endpoint: {}\n", self.endpoint)
    }

    fn secrets(&self) -> Secrets {
        Secrets::default()
    }

    fn env(&self) -> Vec<(String, String)> {
        Vec::new()
    }

    async fn take(&self) -> Vec<DeadLetter> {
        DeadLetterReader::take(self)
            .into_iter()
            .map(|(about, frames)| DeadLetter {
                reason: about["reason"].as_str().unwrap_or_default().to_string(),
                key: frames
                    .first()
                    .filter(|id| !id.is_empty())
                    .map(|id| String::from_utf8_lossy(id).into_owned()),
            })
            .collect()
    }

    async fn delete(self) {}
}

/// Dead letters to the test's RabbitMQ exchange (a fanout bound to its
/// dead-letter queue), read from that queue: the key is the message id.
impl DeadLetterSink for RabbitMq {
    const NAME: &'static str = "zeromq, dead letters to rabbitmq";

    async fn create(test: &str) -> Self {
        <RabbitMq as BrokerUnderTest>::create(test).await
    }

    fn yaml(&self) -> String {
        format!(
            "      rabbitmq:\n        exchange: {}\n        routingKey: dead\n",
            self.dlx
        )
    }

    fn secrets(&self) -> Secrets {
        BrokerUnderTest::secrets(self)
    }

    fn env(&self) -> Vec<(String, String)> {
        BrokerUnderTest::env(self)
    }

    async fn take(&self) -> Vec<DeadLetter> {
        BrokerUnderTest::dead_letters(self).await
    }

    async fn delete(self) {
        BrokerUnderTest::delete(self).await
    }
}

/// Dead letters to the test's Kafka topic `<topic>.dead`: the key is the
/// record key.
impl DeadLetterSink for Kafka {
    const NAME: &'static str = "zeromq, dead letters to kafka";

    async fn create(test: &str) -> Self {
        Kafka::with_partitions(test, 1).await
    }

    fn yaml(&self) -> String {
        format!("      kafka:\n        topic: {}\n", self.dead)
    }

    fn secrets(&self) -> Secrets {
        BrokerUnderTest::secrets(self)
    }

    fn env(&self) -> Vec<(String, String)> {
        BrokerUnderTest::env(self)
    }

    async fn take(&self) -> Vec<DeadLetter> {
        BrokerUnderTest::dead_letters(self).await
    }

    async fn delete(self) {
        BrokerUnderTest::delete(self).await
    }
}

/// A `router` endpoint of one test, without CURVE, its Lazy Pirate client,
/// and where its dead letters go.
pub struct ZeroMqWith<D> {
    pub port: u16,
    pub dead: D,
    pub pirate: Pirate,
}

/// Dead letters to a second ZeroMQ endpoint.
pub type ZeroMq = ZeroMqWith<DeadLetterReader>;
/// Dead letters to a RabbitMQ exchange.
pub type ZeroMqToRabbitMq = ZeroMqWith<RabbitMq>;
/// Dead letters to a Kafka topic.
pub type ZeroMqToKafka = ZeroMqWith<Kafka>;

impl<D> ZeroMqWith<D> {
    pub fn endpoint(&self) -> String {
        format!("tcp://127.0.0.1:{}", self.port)
    }
}

/// The `broker:` lines of a `zeromq` endpoint (indented under `broker:`)
/// whose dead letters go to the ZeroMQ endpoint `dead_letters`.
pub fn broker_yaml(
    port: u16,
    pattern: &str,
    extra: &str,
    max_in_flight: u32,
    dead_letters: &str,
) -> String {
    broker_yaml_to(
        port,
        pattern,
        extra,
        max_in_flight,
        &format!("      endpoint: {dead_letters}\n"),
    )
}

/// The `broker:` lines of a `zeromq` endpoint with `dead_letter` (the lines
/// under `deadLetter:`).
pub fn broker_yaml_to(
    port: u16,
    pattern: &str,
    extra: &str,
    max_in_flight: u32,
    dead_letter: &str,
) -> String {
    format!(
        "  zeromq:\n    bind: tcp://127.0.0.1:{port}\n    pattern: {pattern}\n    maxInFlight: {max_in_flight}\n{extra}    deadLetter:\n{dead_letter}"
    )
}

impl<D: DeadLetterSink> BrokerUnderTest for ZeroMqWith<D> {
    const NAME: &'static str = D::NAME;

    async fn create(test: &str) -> Self {
        let port = free_port();
        Self {
            port,
            dead: D::create(test).await,
            pirate: Pirate::start(PirateOptions::new(format!("tcp://127.0.0.1:{port}"))),
        }
    }

    fn broker_yaml(&self, max_in_flight: u32) -> String {
        broker_yaml_to(
            self.port,
            "router",
            "    plain: true\n",
            max_in_flight,
            &self.dead.yaml(),
        )
    }

    /// The key is the message-id frame: the default `messageId`.
    fn dedup_key_yaml(&self) -> String {
        String::new()
    }

    fn secrets(&self) -> Secrets {
        self.dead.secrets()
    }

    fn env(&self) -> Vec<(String, String)> {
        self.dead.env()
    }

    /// Hands the messages to the client, which sends each until it is
    /// answered: the "broker has them" once the client does.
    async fn publish(&self, messages: Vec<Message>) {
        self.pirate.send(messages);
    }

    async fn backlog(&self) -> u64 {
        self.pirate.unanswered()
    }

    async fn dead_letters(&self) -> Vec<DeadLetter> {
        self.dead.take().await
    }

    async fn delete(self) {
        drop(self.pirate);
        self.dead.delete().await;
    }
}

/// The RabbitMQ URL through `proxy`.
pub fn rabbitmq_url_through(proxy: &super::proxy::Proxy) -> String {
    rabbitmq::URL.replace("127.0.0.1:5672", &format!("127.0.0.1:{}", proxy.port))
}
