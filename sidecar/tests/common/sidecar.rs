//! Runs the whole sidecar in-process on ephemeral loopback ports.

use std::net::SocketAddr;
use std::sync::Arc;

use idemq_sidecar::config::Config;
use idemq_sidecar::run::{self, Listeners};
use idemq_sidecar::store::KeyStore;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub struct Running {
    pub admin: SocketAddr,
    pub gate: Option<SocketAddr>,
    pub shutdown: CancellationToken,
    pub task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Running {
    pub fn gate_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.gate.expect("gate mode"))
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }

    /// Stops the sidecar and returns how its run ended.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        self.task.await.expect("sidecar task")
    }
}

/// Starts the sidecar with `config` (its listen addresses are ignored) and `store`.
pub async fn start(config: Config, store: Arc<dyn KeyStore>) -> Running {
    start_with(config, Default::default(), store).await
}

/// Starts the sidecar with explicit secrets (the broker URL in pipeline mode).
pub async fn start_with(
    config: Config,
    secrets: idemq_sidecar::secrets::Secrets,
    store: Arc<dyn KeyStore>,
) -> Running {
    let admin = TcpListener::bind("127.0.0.1:0").await.expect("bind admin");
    let gate = TcpListener::bind("127.0.0.1:0").await.expect("bind gate");
    let (admin_addr, gate_addr) = (
        admin.local_addr().expect("addr"),
        gate.local_addr().expect("addr"),
    );
    let gate_mode = config.mode == idemq_sidecar::config::Mode::Gate;
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(run::run(
        config,
        secrets,
        store,
        Listeners {
            admin,
            gate: gate_mode.then_some(gate),
        },
        shutdown.clone(),
    ));
    Running {
        admin: admin_addr,
        gate: gate_mode.then_some(gate_addr),
        shutdown,
        task,
    }
}
