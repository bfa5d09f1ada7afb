//! Pipeline mode: consume the broker, deduplicate, deliver to the application,
//! settle with the broker. This module only wires the parts together and
//! starts the source of the configured broker kind.

use std::sync::Arc;

use anyhow::Context as _;
use tokio_util::sync::CancellationToken;

use crate::app::{self, App};
use crate::config::{BrokerKind, Config};
use crate::deliver::Deliverer;
use crate::engine::Engine;
use crate::flow::Flow;
use crate::health::Component;
use crate::metrics::Metrics;
use crate::source::Common;
use crate::store::refused::Refused;
use crate::store::KeyStore;
use crate::traces::Tracer;

/// Everything the pipeline shares.
pub struct Context {
    pub config: Arc<Config>,
    /// The RabbitMQ URL, with its credentials (from the environment): the
    /// source's, or that of a ZeroMQ endpoint's dead letters.
    pub broker_url: Option<String>,
    /// The Kafka bootstrap servers and credentials (from the environment):
    /// the source's, or those of a ZeroMQ endpoint's dead letters.
    pub kafka: Option<crate::source::kafka::KafkaSecrets>,
    /// Broker credentials given apart from the URL (JetStream, MQTT).
    pub broker_auth: crate::secrets::BrokerAuth,
    /// A Pub/Sub emulator's `host:port` (`PUBSUB_EMULATOR_HOST`).
    pub pubsub_emulator_host: Option<String>,
    /// The ZeroMQ endpoint's CURVE keys (from the environment).
    pub zeromq_curve: Option<crate::source::zeromq::CurveKeys>,
    pub store: Arc<dyn KeyStore>,
    pub metrics: Arc<Metrics>,
    pub broker_health: Component,
    /// Readiness of the application (`app: waiting` until it answers).
    pub app_health: Component,
    pub tracer: Tracer,
}

/// Runs until `shutdown` fires and in-flight messages are settled.
pub async fn run(ctx: Context, shutdown: CancellationToken) -> anyhow::Result<()> {
    let delivery = ctx
        .config
        .delivery
        .as_ref()
        .context("pipeline mode needs delivery (validated)")?;
    let deliverer = Deliverer::new(delivery)?;
    let app = Arc::new(App::new(
        &delivery.circuit_breaker,
        ctx.metrics.clone(),
        ctx.app_health,
    ));
    let check = app::Check::new(delivery)?;
    let watcher = tokio::spawn(app::watch(
        app.clone(),
        check,
        delivery.clone(),
        shutdown.clone(),
    ));
    let flow = Flow::new(
        app.clone(),
        delivery.max_in_flight_bytes,
        ctx.metrics.clone(),
    );
    let largest_message = delivery.expected_message_bytes.unwrap_or(0).into();
    let refused = Arc::new(Refused::new(ctx.store, ctx.metrics.clone()));
    let store: Arc<dyn KeyStore> = refused.clone();
    let engine = Arc::new(Engine::new(
        ctx.config.clone(),
        store.clone(),
        deliverer,
        ctx.metrics.clone(),
        app,
        ctx.tracer,
    ));
    let common = Common {
        config: ctx.config.clone(),
        engine,
        store,
        metrics: ctx.metrics,
        health: ctx.broker_health,
        flow,
    };
    let broker = ctx
        .config
        .broker
        .as_ref()
        .and_then(|b| b.kind())
        .context("pipeline mode needs exactly one broker (validated)")?;
    let result = match broker {
        BrokerKind::RabbitMq(rabbit) => {
            let url = ctx
                .broker_url
                .as_deref()
                .context("the RabbitMQ source needs a broker URL")?;
            let uri = crate::source::rabbitmq::parse_url(url).map_err(anyhow::Error::msg)?;
            let source = crate::source::rabbitmq::Source {
                common,
                rabbit: rabbit.clone(),
                uri,
                largest_message,
            };
            source.run(shutdown.clone()).await;
            Ok(())
        }
        BrokerKind::Kafka(kafka) => {
            let secrets = ctx
                .kafka
                .clone()
                .context("the Kafka source needs its bootstrap servers")?;
            let source = crate::source::kafka::Source {
                common,
                kafka: kafka.clone(),
                secrets,
            };
            source
                .run(shutdown.clone())
                .await
                .map_err(anyhow::Error::from)
        }
        BrokerKind::JetStream(js) => {
            let url = ctx
                .broker_url
                .context("the JetStream source needs a server URL")?;
            let source = crate::source::jetstream::Source {
                common,
                jetstream: js.clone(),
                url,
                auth: ctx.broker_auth,
            };
            source.run(shutdown.clone()).await;
            Ok(())
        }
        BrokerKind::Mqtt(mqtt) => {
            let url = ctx
                .broker_url
                .context("the MQTT source needs a broker URL")?;
            let hostname = std::env::var("HOSTNAME").ok().or_else(|| {
                std::fs::read_to_string("/etc/hostname")
                    .ok()
                    .map(|h| h.trim().to_string())
                    .filter(|h| !h.is_empty())
            });
            let options =
                crate::source::mqtt::options(&ctx.config, mqtt, &url, &ctx.broker_auth, hostname)
                    .map_err(anyhow::Error::msg)?;
            let source = crate::source::mqtt::Source {
                common,
                mqtt: mqtt.clone(),
                options,
                largest_message,
            };
            source.run(shutdown.clone()).await;
            Ok(())
        }
        BrokerKind::PubSub(pubsub) => {
            let source = crate::source::pubsub::Source {
                common,
                pubsub: pubsub.clone(),
                emulator_host: ctx.pubsub_emulator_host,
            };
            source.run(shutdown.clone()).await;
            Ok(())
        }
        BrokerKind::ZeroMq(zeromq) => {
            let source = crate::source::zeromq::Source {
                common,
                zeromq: zeromq.clone(),
                curve: ctx.zeromq_curve,
                dead_letter_secrets: crate::source::zeromq::dead::Secrets {
                    rabbitmq_url: ctx.broker_url,
                    kafka: ctx.kafka,
                },
            };
            source
                .run(shutdown.clone())
                .await
                .map_err(anyhow::Error::from)
        }
    };
    shutdown.cancel();
    let _ = watcher.await;
    refused.write_at_exit(ctx.config.store.timeout * 2).await;
    result
}
