//! The ZeroMQ side of the pipeline benchmark (`--broker zeromq`). ZeroMQ has
//! no broker, so the "broker" is the client: a DEALER on a thread of its own
//! that sends every request `[id, header, body]` to the scenario's `router`
//! endpoint, counts the final replies (`ok`, `dead`) and sends a request
//! again after `retry`. Requests sent before the endpoint is bound wait in
//! the client's queue: that is the backlog. No broker process: the client's
//! CPU is this process's ("bench").
//! - `raw`: the same ROUTER endpoint as the sidecar's (its socket thread,
//!   `maxInFlight` = `--prefetch`) → HTTP POST → `ok`; no dedup.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use idemq_sidecar::config::ZeroMqPattern;
use idemq_sidecar::source::zeromq::socket::{self, send_frames, Options};
use idemq_sidecar::source::zeromq::wire::{self, Status};
use tokio_util::sync::CancellationToken;

/// How long after `retry` a request is sent again.
const RETRY_AFTER: Duration = Duration::from_millis(50);

struct Pending {
    due: Instant,
    id: String,
    body: Arc<[u8]>,
}

#[derive(Default)]
struct Counts {
    enqueued: AtomicU64,
    sent: AtomicU64,
    answered: AtomicU64,
}

/// A scenario's endpoint port, its client and its dead-letter receiver.
pub struct Endpoint {
    pub port: u16,
    /// Where dead letters go (a PULL socket bound here).
    pub dead_letters: String,
    queue: Arc<Mutex<VecDeque<Pending>>>,
    counts: Arc<Counts>,
    stop: Arc<AtomicBool>,
    client: Option<JoinHandle<()>>,
    _dead: zmq::Socket,
    _ctx: zmq::Context,
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

impl Endpoint {
    pub async fn create() -> anyhow::Result<Self> {
        let ctx = zmq::Context::new();
        let dead = ctx.socket(zmq::PULL)?;
        let dead_letters = format!("tcp://127.0.0.1:{}", free_port()?);
        dead.bind(&dead_letters)
            .context("bind the dead-letter receiver")?;
        let port = free_port()?;
        let dealer = ctx.socket(zmq::DEALER)?;
        dealer.set_sndhwm(0)?;
        dealer.set_rcvhwm(0)?;
        dealer.set_linger(0)?;
        dealer.connect(&format!("tcp://127.0.0.1:{port}"))?;
        let queue = Arc::new(Mutex::new(VecDeque::new()));
        let counts = Arc::new(Counts::default());
        let stop = Arc::new(AtomicBool::new(false));
        let client = {
            let (queue, counts, stop) = (queue.clone(), counts.clone(), stop.clone());
            std::thread::Builder::new()
                .name("zeromq-client".into())
                .spawn(move || client(dealer, queue, counts, stop))?
        };
        Ok(Self {
            port,
            dead_letters,
            queue,
            counts,
            stop,
            client: Some(client),
            _dead: dead,
            _ctx: ctx,
        })
    }

    pub fn bind(&self) -> String {
        format!("tcp://127.0.0.1:{}", self.port)
    }

    /// Sends every id (the send time in the header), at `rate` messages per
    /// second when given, and returns once the client has sent them all.
    pub async fn publish_all(
        &self,
        ids: &[String],
        body: &[u8],
        rate: Option<u64>,
    ) -> anyhow::Result<()> {
        let pace = crate::pipeline::Pace::new(rate);
        let body: Arc<[u8]> = Arc::from(body);
        {
            let mut queue = self.queue.lock().expect("lock");
            for (i, id) in ids.iter().enumerate() {
                queue.push_back(Pending {
                    due: pace.due(i),
                    id: id.clone(),
                    body: body.clone(),
                });
            }
        }
        let target = self
            .counts
            .enqueued
            .fetch_add(ids.len() as u64, Ordering::SeqCst)
            + ids.len() as u64;
        let deadline = Instant::now() + Duration::from_secs(600);
        while self.counts.sent.load(Ordering::SeqCst) < target {
            if Instant::now() > deadline {
                bail!("the ZeroMQ client did not send every request in time");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(())
    }

    /// Waits until every request has its final answer.
    pub async fn wait_settled(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let (answered, enqueued) = (
                self.counts.answered.load(Ordering::SeqCst),
                self.counts.enqueued.load(Ordering::SeqCst),
            );
            if answered >= enqueued {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("{} requests without a final answer", enqueued - answered);
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    pub async fn delete(self) {
        drop(self);
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(client) = self.client.take() {
            let _ = client.join();
        }
    }
}

/// The client thread: sends what is due, counts final answers, sends again
/// after `retry`.
fn client(
    dealer: zmq::Socket,
    queue: Arc<Mutex<VecDeque<Pending>>>,
    counts: Arc<Counts>,
    stop: Arc<AtomicBool>,
) {
    // Requests sent and not answered: per id, how many, and what to resend.
    let mut outstanding: HashMap<String, (u32, Vec<Vec<u8>>)> = HashMap::new();
    let mut again: VecDeque<(Instant, Vec<Vec<u8>>)> = VecDeque::new();
    while !stop.load(Ordering::SeqCst) {
        if dealer.poll(zmq::POLLIN, 1).unwrap_or(0) > 0 {
            while let Ok(reply) = dealer.recv_multipart(zmq::DONTWAIT) {
                let id = String::from_utf8_lossy(&reply[0]).into_owned();
                match reply.get(1).map(Vec::as_slice) {
                    Some(b"retry") => {
                        if let Some((_, frames)) = outstanding.get(&id) {
                            again.push_back((Instant::now() + RETRY_AFTER, frames.clone()));
                        }
                    }
                    _ => {
                        if let Some(entry) = outstanding.get_mut(&id) {
                            entry.0 -= 1;
                            if entry.0 == 0 {
                                outstanding.remove(&id);
                            }
                            counts.answered.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                }
            }
        }
        let now = Instant::now();
        while again.front().is_some_and(|(due, _)| *due <= now) {
            let (_, frames) = again.pop_front().expect("front");
            let _ = send_frames(&dealer, &frames, zmq::DONTWAIT);
        }
        let due: Vec<Pending> = {
            let mut queue = queue.lock().expect("lock");
            let ready = queue.iter().take_while(|p| p.due <= now).count();
            queue.drain(..ready).collect()
        };
        for pending in due {
            let header = format!(
                "{{\"{}\":\"{}\"}}",
                crate::pipeline::SENT_HEADER,
                crate::pipeline::now_us()
            );
            let frames = vec![
                pending.id.clone().into_bytes(),
                header.into_bytes(),
                pending.body.to_vec(),
            ];
            if send_frames(&dealer, &frames, zmq::DONTWAIT).is_ok() {
                let entry = outstanding.entry(pending.id).or_insert((0, frames));
                entry.0 += 1;
                counts.sent.fetch_add(1, Ordering::SeqCst);
            }
        }
    }
}

/// The raw baseline: the sidecar's socket thread on the same endpoint,
/// each request POSTed to the app and answered `ok`; no dedup.
pub async fn raw(
    bind: String,
    max_in_flight: u16,
    url: String,
    sent_header: &'static str,
    stop: CancellationToken,
) {
    let ctx = zmq::Context::new();
    let opened = socket::open(
        &ctx,
        Options {
            pattern: ZeroMqPattern::Router,
            endpoint: bind,
            subscribe: Vec::new(),
            max_in_flight: usize::from(max_in_flight),
            curve: None,
        },
    );
    let (handle, mut incoming) = match opened {
        Ok(opened) => opened,
        Err(e) => {
            eprintln!("raw zeromq consumer failed: {e}");
            return;
        }
    };
    let handle = Arc::new(handle);
    let post = match crate::post::Post::new(&url) {
        Ok(post) => post,
        Err(e) => {
            eprintln!("raw zeromq consumer failed: {e}");
            return;
        }
    };
    loop {
        let received = tokio::select! {
            _ = stop.cancelled() => break,
            received = incoming.recv() => match received {
                Some(received) => received,
                None => break,
            },
        };
        let (body, sent) = match wire::envelope(ZeroMqPattern::Router, &received.frames) {
            Ok(envelope) => {
                let sent = envelope
                    .0
                    .header(sent_header)
                    .map(|sent| (sent_header, sent.to_string()));
                (envelope.0.body, sent)
            }
            Err(_) => (bytes::Bytes::new(), None),
        };
        let (post, handle) = (post.clone(), handle.clone());
        tokio::spawn(async move {
            post.send(body, None, sent).await;
            let id = wire::message_id(ZeroMqPattern::Router, &received.frames);
            handle.reply(wire::reply(&received.route, id, Status::Ok));
        });
    }
    let _ = tokio::task::spawn_blocking(move || handle.stop()).await;
}
