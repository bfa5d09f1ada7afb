//! The application of the pipeline benchmark: an HTTP endpoint that answers
//! 200 and records what it received, each key's deliveries and each
//! message's end-to-end latency (from the header its publisher stamped).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hdrhistogram::Histogram;

use crate::pipeline::{now_us, SENT_HEADER};

/// The application: answers 200 and records end-to-end latency and counts.
#[derive(Clone)]
pub struct App {
    addr: std::net::SocketAddr,
    state: Arc<AppState>,
}

struct AppState {
    count: AtomicU64,
    /// When the first delivery of the current phase arrived (µs since the epoch).
    first_us: AtomicU64,
    per_key: Mutex<HashMap<String, u32>>,
    latencies: Mutex<Histogram<u64>>,
}

impl App {
    pub async fn start() -> anyhow::Result<Self> {
        use axum::http::HeaderMap;
        let state = Arc::new(AppState {
            count: AtomicU64::new(0),
            first_us: AtomicU64::new(0),
            per_key: Mutex::new(HashMap::new()),
            latencies: Mutex::new(Histogram::new(3)?),
        });
        let s = state.clone();
        let router = axum::Router::new().route(
            "/messages",
            axum::routing::post(move |headers: HeaderMap| {
                let s = s.clone();
                async move {
                    let now = now_us();
                    if let Some(sent) = headers
                        .get(SENT_HEADER)
                        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
                    {
                        let _ = s
                            .latencies
                            .lock()
                            .expect("lock")
                            .record(now.saturating_sub(sent).max(1));
                    }
                    if let Some(key) = headers.get("idempotency-key").and_then(|v| v.to_str().ok())
                    {
                        *s.per_key
                            .lock()
                            .expect("lock")
                            .entry(key.to_string())
                            .or_default() += 1;
                    }
                    let _ =
                        s.first_us
                            .compare_exchange(0, now, Ordering::Relaxed, Ordering::Relaxed);
                    s.count.fetch_add(1, Ordering::Relaxed);
                    axum::http::StatusCode::OK
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        tokio::spawn(async move { axum::serve(listener, router).await });
        Ok(Self { addr, state })
    }

    pub fn url(&self) -> String {
        format!("http://{}/messages", self.addr)
    }

    pub fn reset(&self) {
        self.state.count.store(0, Ordering::Relaxed);
        self.state.first_us.store(0, Ordering::Relaxed);
        self.state.per_key.lock().expect("lock").clear();
        self.state.latencies.lock().expect("lock").reset();
    }

    /// Time since the first delivery of this phase.
    pub fn since_first(&self) -> Duration {
        Duration::from_micros(now_us().saturating_sub(self.state.first_us.load(Ordering::Relaxed)))
    }

    pub fn count(&self) -> usize {
        self.state.count.load(Ordering::Relaxed) as usize
    }

    pub fn max_per_key(&self) -> u32 {
        self.state
            .per_key
            .lock()
            .expect("lock")
            .values()
            .copied()
            .max()
            .unwrap_or(0)
    }

    pub fn latencies(&self) -> Histogram<u64> {
        self.state.latencies.lock().expect("lock").clone()
    }
}
