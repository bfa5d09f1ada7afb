//! Runs the sidecar: opens the key store, serves the admin listener, runs the
//! configured mode, and drains when the shutdown token fires.
//!
//! Tests bind their own listeners on `127.0.0.1:0` and pass their own token,
//! so the whole sidecar runs in-process.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, Mode, StoreKind};
use crate::health::{Component, Health};
use crate::metrics::Metrics;
use crate::secrets::{redact, ProcessEnv, Secrets};
use crate::store::instrumented::Instrumented;
use crate::store::memory::MemoryStore;
use crate::store::redis::{RedisOptions, RedisStore};
use crate::store::{KeyStore, StoreError};
use crate::traces::Tracer;
use crate::{admin, api};

/// How often the store is pinged for readiness.
const PING_EVERY: Duration = Duration::from_secs(1);

/// The sockets the sidecar serves on.
pub struct Listeners {
    pub admin: TcpListener,
    /// The claim API's socket; gate mode only.
    pub gate: Option<TcpListener>,
}

impl Listeners {
    /// Binds the addresses the config names.
    pub async fn bind(config: &Config) -> anyhow::Result<Self> {
        use anyhow::Context;
        let admin = TcpListener::bind(config.admin.listen)
            .await
            .with_context(|| format!("bind admin listener {}", config.admin.listen))?;
        let gate = match config.mode {
            Mode::Gate => Some(
                TcpListener::bind(config.gate.listen)
                    .await
                    .with_context(|| format!("bind claim API {}", config.gate.listen))?,
            ),
            Mode::Pipeline => None,
        };
        Ok(Self { admin, gate })
    }
}

/// Opens the configured key store. Redis connects lazily, so this succeeds
/// while Redis is down; readiness tells when it answers.
pub fn open_store(config: &Config, secrets: &Secrets) -> Result<Arc<dyn KeyStore>, StoreError> {
    Ok(match config.store.kind {
        StoreKind::Memory => Arc::new(MemoryStore::new()),
        StoreKind::Redis => {
            let url = secrets.redis_url.clone().unwrap_or_default();
            let shown: Vec<String> = url.split(',').map(|u| redact(u.trim())).collect();
            tracing::info!(redis = %shown.join(","), cluster = config.store.cluster, sentinel = ?config.store.sentinel, "using the redis key store");
            Arc::new(RedisStore::new(RedisOptions {
                url,
                cluster: config.store.cluster,
                sentinel: config.store.sentinel.clone(),
                password: secrets.redis_password.clone(),
                ca: secrets.redis_ca.clone().map(String::into_bytes),
                namespace: config.consumer.clone(),
                timeout: config.store.timeout,
                partitions: config.store.partitions,
                on_reset: config.store.on_reset,
                durability: config.store.durability,
                expected_rate: config.store.expected_rate,
            })?)
        }
    })
}

/// Runs the sidecar until `shutdown` fires and in-flight work has drained.
pub async fn run(
    config: Config,
    secrets: Secrets,
    store: Arc<dyn KeyStore>,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::new());
    let health = Health::new();
    // Only pipeline mode handles messages to trace.
    let tracer = match config.mode {
        Mode::Pipeline => Tracer::start(&config.traces, &config.consumer, &ProcessEnv)?,
        Mode::Gate => Tracer::off(),
    };
    let store: Arc<dyn KeyStore> = Arc::new(Instrumented::new(store, metrics.clone()));

    // The admin listener outlives the mode, so probes and metrics answer while
    // in-flight work drains.
    let admin_stop = CancellationToken::new();
    let admin_router = admin::router(admin::AdminState {
        health: health.clone(),
        metrics: metrics.clone(),
    });
    let admin_listener = listeners.admin;
    let admin_stopped = admin_stop.clone().cancelled_owned();
    let admin = tokio::spawn(async move {
        axum::serve(admin_listener, admin_router)
            .with_graceful_shutdown(admin_stopped)
            .await
    });
    let watcher = tokio::spawn(watch_store(
        store.clone(),
        health.register("store"),
        metrics.clone(),
        shutdown.clone(),
    ));

    let result = match config.mode {
        Mode::Gate => {
            let listener = listeners
                .gate
                .ok_or_else(|| anyhow::anyhow!("gate mode needs the claim API listener"))?;
            tracing::info!(addr = %listener.local_addr()?, "claim API listening");
            let state = Arc::new(api::ApiState {
                store,
                lease: config.dedup.lease,
                retention: config.dedup.retention,
            });
            axum::serve(listener, api::router(state))
                .with_graceful_shutdown(shutdown.clone().cancelled_owned())
                .await
                .map_err(anyhow::Error::from)
        }
        Mode::Pipeline => {
            let broker = health.register("broker");
            let app = health.register("app");
            crate::pipeline::run(
                crate::pipeline::Context {
                    config: Arc::new(config),
                    broker_url: secrets.broker_url,
                    kafka: secrets.kafka,
                    broker_auth: secrets.broker_auth,
                    pubsub_emulator_host: secrets.pubsub_emulator_host,
                    zeromq_curve: secrets.zeromq_curve,
                    store,
                    metrics: metrics.clone(),
                    broker_health: broker,
                    app_health: app,
                    tracer: tracer.clone(),
                },
                shutdown.clone(),
            )
            .await
        }
    };
    shutdown.cancel();
    tracer.shutdown().await;
    admin_stop.cancel();
    let _ = watcher.await;
    let _ = admin.await;
    result
}

/// Pings the store every second; its answer drives readiness and the
/// `idemq_store_connected` gauge.
async fn watch_store(
    store: Arc<dyn KeyStore>,
    up: Component,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let mut ticker = tokio::time::interval(PING_EVERY);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let answered = store.ping().await;
        if answered.is_ok() != up.is_up() {
            match &answered {
                Ok(()) => tracing::info!("key store answers"),
                Err(e) => tracing::warn!(error = %e, "key store does not answer"),
            }
        }
        up.set(answered.is_ok());
        metrics.store_connected.set(i64::from(answered.is_ok()));
    }
}
