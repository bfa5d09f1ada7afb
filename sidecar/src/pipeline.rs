//! Pipeline mode (placeholder until the RabbitMQ pipeline lands).
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::health::Component;
use crate::metrics::Metrics;
use crate::store::KeyStore;

/// Everything the pipeline shares.
pub struct Context {
    pub config: Arc<Config>,
    pub store: Arc<dyn KeyStore>,
    pub metrics: Arc<Metrics>,
    pub broker_health: Component,
}

pub async fn run(_ctx: Context, _shutdown: CancellationToken) -> anyhow::Result<()> {
    anyhow::bail!("pipeline mode is not available in this build")
}
