//! Helpers shared by the end-to-end tests: a client built from an explicit
//! kubeconfig (never the ambient one), temporary namespaces, and the binaries
//! under test.

use std::path::PathBuf;
use std::time::Duration;

/// The variable that names the kubeconfig of a cluster the e2e suite may use.
pub const KUBECONFIG_VAR: &str = "IDEMQ_E2E_KUBECONFIG";

/// The kubeconfig of the e2e cluster, or None (and a line saying the suite is
/// skipped) when the variable is unset. The ambient `KUBECONFIG` is never used:
/// nobody's production cluster should be touched by `cargo test`.
pub fn e2e_kubeconfig(test: &str) -> Option<PathBuf> {
    match std::env::var_os(KUBECONFIG_VAR) {
        Some(path) if !path.is_empty() => Some(PathBuf::from(path)),
        _ => {
            println!("skipped: {test}: {KUBECONFIG_VAR} is not set (point it at a kubeconfig of a disposable cluster to run it)");
            None
        }
    }
}

/// A client for exactly the cluster `kubeconfig` names.
pub async fn client(kubeconfig: &PathBuf) -> anyhow::Result<kube::Client> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let kc = kube::config::Kubeconfig::read_from(kubeconfig)?;
    let config =
        kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
            .await?;
    Ok(kube::Client::try_from(config)?)
}

/// A name no other run uses.
pub fn unique(base: &str) -> String {
    format!("{base}-{}", &uuid::Uuid::new_v4().simple().to_string()[..8])
}

/// A binary of the workspace, next to the test executable's directory.
pub fn workspace_binary(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .ok_or_else(|| anyhow::anyhow!("unexpected test executable path {}", exe.display()))?;
    let path = dir.join(name);
    anyhow::ensure!(
        path.exists(),
        "{} not found: build it with `cargo build -p idemq-operator`",
        path.display()
    );
    Ok(path)
}

/// Polls `check` every 250ms until it returns Some, up to `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = check().await? {
            return Ok(value);
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
