//! A test application: an HTTP server on loopback that counts what it is sent
//! and answers as the test scripts it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::Router;

/// Decides the answer to a delivery from its key (or body when it has no key)
/// and how many times this key was seen before (0 the first time).
pub type Script = Arc<dyn Fn(&str, u32) -> StatusCode + Send + Sync>;

#[derive(Default)]
struct Seen {
    /// Requests received, counted before the app's delay.
    started: u32,
    /// Per key: deliveries that the app answered with 2xx (processed).
    processed: HashMap<String, u32>,
    /// Per key: every delivery, whatever the answer.
    attempts: HashMap<String, u32>,
    /// `Idemq-Delivery-Attempt` values received.
    attempt_headers: Vec<u32>,
    /// Headers of the last delivery.
    last_headers: HeaderMap,
    /// Keys in the order their deliveries arrived.
    order: Vec<String>,
    /// Deliveries being answered now, and the most at once.
    concurrent: usize,
    max_concurrent: usize,
}

#[derive(Clone)]
pub struct App {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Seen>>,
    state: Arc<AppState>,
    /// Stops the running server (see [`App::stop`]).
    running: Arc<Mutex<Option<Server>>>,
}

struct Server {
    stop: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

/// How long the app takes to answer a delivery of a key.
pub type Delays = Arc<dyn Fn(&str) -> Duration + Send + Sync>;

struct AppState {
    seen: Arc<Mutex<Seen>>,
    script: Script,
    delay: Delays,
}

pub async fn start(script: Script) -> App {
    start_slow(script, Duration::ZERO).await
}

/// An app that takes `delay` to answer each delivery.
pub async fn start_slow(script: Script, delay: Duration) -> App {
    start_with_delays(script, Arc::new(move |_| delay)).await
}

/// An app that takes `delay(key)` to answer a delivery of `key`.
pub async fn start_with_delays(script: Script, delay: Delays) -> App {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind app");
    let app = not_started_with(listener.local_addr().expect("addr"), script, delay);
    app.serve(listener);
    app
}

/// An app that will listen on `addr` but does not yet: [`App::restart`]
/// starts it. Until then the sidecar's connections are refused.
pub fn not_started(addr: SocketAddr, script: Script, delay: Duration) -> App {
    not_started_with(addr, script, Arc::new(move |_| delay))
}

fn not_started_with(addr: SocketAddr, script: Script, delay: Delays) -> App {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let state = Arc::new(AppState {
        seen: seen.clone(),
        script,
        delay,
    });
    App {
        addr,
        seen,
        state,
        running: Arc::new(Mutex::new(None)),
    }
}

/// A loopback address nothing listens on (yet).
pub fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
}

pub fn always_ok() -> Script {
    Arc::new(|_, _| StatusCode::OK)
}

async fn receive(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .unwrap_or_else(|| format!("body:{}", String::from_utf8_lossy(&body)));
    {
        let mut seen = state.seen.lock().expect("lock");
        seen.started += 1;
        seen.order.push(key.clone());
        seen.concurrent += 1;
        seen.max_concurrent = seen.max_concurrent.max(seen.concurrent);
    }
    let delay = (state.delay)(&key);
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let mut seen = state.seen.lock().expect("lock");
    seen.concurrent -= 1;
    let before = seen.attempts.get(&key).copied().unwrap_or(0);
    *seen.attempts.entry(key.clone()).or_default() += 1;
    if let Some(a) = headers
        .get("idemq-delivery-attempt")
        .and_then(|v| v.to_str().ok()?.parse().ok())
    {
        seen.attempt_headers.push(a);
    }
    seen.last_headers = headers;
    let status = (state.script)(&key, before);
    if status.is_success() {
        *seen.processed.entry(key).or_default() += 1;
    }
    status
}

impl App {
    fn serve(&self, listener: tokio::net::TcpListener) {
        let router = Router::new()
            .route("/messages", post(receive))
            .with_state(self.state.clone());
        let stop = tokio_util::sync::CancellationToken::new();
        let stopped = stop.clone().cancelled_owned();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, router)
                .with_graceful_shutdown(stopped)
                .await;
        });
        *self.running.lock().expect("lock") = Some(Server { stop, task });
    }

    /// Stops listening; requests in progress are answered first, and every
    /// connection is closed, so the sidecar's next connection is refused.
    pub async fn stop(&self) {
        let server = self.running.lock().expect("lock").take();
        if let Some(server) = server {
            server.stop.cancel();
            let _ = server.task.await;
        }
    }

    /// Listens again on the same address (or for the first time).
    pub async fn restart(&self) {
        let listener = tokio::net::TcpListener::bind(self.addr)
            .await
            .expect("bind the app's address again");
        self.serve(listener);
    }

    /// Requests received, including those the app is still working on.
    pub fn started(&self) -> u32 {
        self.seen.lock().expect("lock").started
    }

    /// Deliveries received by key, whatever the answer.
    pub fn attempts_of(&self, key: &str) -> u32 {
        self.seen
            .lock()
            .expect("lock")
            .attempts
            .get(key)
            .copied()
            .unwrap_or(0)
    }

    pub fn url(&self) -> String {
        format!("http://{}/messages", self.addr)
    }

    /// Keys processed (answered 2xx) at least once.
    pub fn distinct(&self) -> usize {
        self.seen.lock().expect("lock").processed.len()
    }

    /// Total 2xx answers.
    pub fn processed(&self) -> u32 {
        self.seen.lock().expect("lock").processed.values().sum()
    }

    /// Keys processed more than once.
    pub fn processed_twice(&self) -> usize {
        self.seen
            .lock()
            .expect("lock")
            .processed
            .values()
            .filter(|n| **n > 1)
            .count()
    }

    /// Keys in the order their deliveries arrived.
    pub fn order(&self) -> Vec<String> {
        self.seen.lock().expect("lock").order.clone()
    }

    /// The most deliveries the app was answering at once.
    pub fn max_concurrent(&self) -> usize {
        self.seen.lock().expect("lock").max_concurrent
    }

    pub fn attempts(&self) -> u32 {
        self.seen.lock().expect("lock").attempts.values().sum()
    }

    pub fn max_attempt_header(&self) -> u32 {
        self.seen
            .lock()
            .expect("lock")
            .attempt_headers
            .iter()
            .copied()
            .max()
            .unwrap_or(0)
    }

    pub fn last_header(&self, name: &str) -> Option<String> {
        self.seen
            .lock()
            .expect("lock")
            .last_headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    }

    /// Waits until `done` holds, up to `timeout`; false if it never did.
    pub async fn wait_until(&self, timeout: Duration, done: impl Fn(&App) -> bool) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        while tokio::time::Instant::now() < deadline {
            if done(self) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        done(self)
    }
}
