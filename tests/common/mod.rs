//! Helpers shared by the end-to-end tests: a client built from an explicit
//! kubeconfig (never the ambient one), temporary namespaces, and the binaries
//! under test. `helm.rs` renders the chart (the chart tests use it too).

use std::path::PathBuf;
use std::time::Duration;

pub mod helm;

/// The variable that names the kubeconfig of a cluster the e2e suite may use.
pub const KUBECONFIG_VAR: &str = "IDEMQ_E2E_KUBECONFIG";

/// The kubeconfig of the e2e cluster. The e2e tests are `#[ignore]`d unless
/// asked for (`--ignored`), so that a test that did not run never counts as
/// passed; asked for without the variable, they fail and say why.
/// The ambient `KUBECONFIG` is never used: nobody's production cluster should
/// be touched by `cargo test`.
pub fn e2e_kubeconfig() -> anyhow::Result<PathBuf> {
    match std::env::var_os(KUBECONFIG_VAR) {
        Some(path) if !path.is_empty() => Ok(PathBuf::from(path)),
        _ => anyhow::bail!(
            "{KUBECONFIG_VAR} is not set: point it at the kubeconfig of a disposable cluster"
        ),
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

/// Installs the chart's ServiceAccount and RBAC for an operator that watches
/// `namespace` (its leader Lease there too), exactly as `helm template`
/// renders them, and returns a kubeconfig that authenticates as that
/// ServiceAccount: the operator then runs with no more rights than the chart
/// gives it.
pub async fn chart_identity(
    client: &kube::Client,
    kubeconfig: &std::path::Path,
    namespace: &str,
) -> anyhow::Result<tempfile::NamedTempFile> {
    use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
    use k8s_openapi::api::core::v1::ServiceAccount;
    use kube::api::{DynamicObject, Patch, PatchParams, PostParams};
    use kube::core::GroupVersionKind;
    use serde::Deserialize;

    let rendered = helm::template(
        namespace,
        &[
            "--set",
            "crds.install=false",
            "--set",
            &format!("watchNamespaces={{{namespace}}}"),
            "-s",
            "templates/serviceaccount.yaml",
            "-s",
            "templates/rbac.yaml",
        ],
    )?;
    let mut service_account = None;
    for document in serde_yaml::Deserializer::from_str(&rendered) {
        let Some(object) = Option::<DynamicObject>::deserialize(document)? else {
            continue;
        };
        let types = object
            .types
            .clone()
            .ok_or_else(|| anyhow::anyhow!("a rendered object without apiVersion/kind"))?;
        let gvk = GroupVersionKind::try_from(&types)?;
        let (resource, _) = kube::discovery::pinned_kind(client, &gvk).await?;
        let name = object.metadata.name.clone().unwrap_or_default();
        let api: kube::Api<DynamicObject> = match &object.metadata.namespace {
            Some(ns) => kube::Api::namespaced_with(client.clone(), ns, &resource),
            None => kube::Api::all_with(client.clone(), &resource),
        };
        api.patch(
            &name,
            &PatchParams::apply("idemq-e2e").force(),
            &Patch::Apply(&object),
        )
        .await?;
        if gvk.kind == "ServiceAccount" {
            service_account = Some(name);
        }
    }
    let service_account =
        service_account.ok_or_else(|| anyhow::anyhow!("the chart rendered no ServiceAccount"))?;
    let token = kube::Api::<ServiceAccount>::namespaced(client.clone(), namespace)
        .create_token_request(
            &service_account,
            &PostParams::default(),
            &TokenRequest {
                spec: TokenRequestSpec {
                    expiration_seconds: Some(3600),
                    ..TokenRequestSpec::default()
                },
                ..TokenRequest::default()
            },
        )
        .await?
        .status
        .ok_or_else(|| anyhow::anyhow!("a TokenRequest without status"))?
        .token;

    // The e2e cluster, with the ServiceAccount's token as its only user.
    let mut config = kube::config::Kubeconfig::read_from(kubeconfig)?;
    for user in &mut config.auth_infos {
        user.auth_info = Some(kube::config::AuthInfo {
            token: Some(token.clone().into()),
            ..kube::config::AuthInfo::default()
        });
    }
    let file = tempfile::NamedTempFile::new()?;
    std::fs::write(file.path(), serde_yaml::to_string(&config)?)?;
    Ok(file)
}

/// Deletes the resources `names` one after the other, each time waiting
/// until it is gone, so that the running operator's finalizer has withdrawn
/// its sidecar before the next goes (deleting several at once, or the
/// namespace, races the operator's cleanup). The operator must still run.
pub async fn delete_in_order(
    api: &kube::Api<idemq_operator::crd::IdempotentConsumer>,
    names: &[&str],
    timeout: Duration,
) -> anyhow::Result<()> {
    for name in names {
        if api
            .delete(name, &kube::api::DeleteParams::default())
            .await
            .is_err_and(|e| !matches!(&e, kube::Error::Api(s) if s.is_not_found()))
        {
            anyhow::bail!("could not delete IdempotentConsumer {name}");
        }
        eventually(
            timeout,
            &format!("{name} to be gone (finalizer done)"),
            || async { Ok(api.get_opt(name).await?.is_none().then_some(())) },
        )
        .await?;
    }
    Ok(())
}

/// Installs (or updates) the IdempotentConsumer CRD and waits until it is established.
pub async fn install_crd(client: &kube::Client) -> anyhow::Result<()> {
    use idemq_operator::crd::IdempotentConsumer;
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    use kube::api::{Api, Patch, PatchParams};
    use kube::CustomResourceExt;

    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let crd = IdempotentConsumer::crd();
    let name = crd.metadata.name.clone().unwrap_or_default();
    crds.patch(
        &name,
        &PatchParams::apply("idemq-e2e").force(),
        &Patch::Apply(&crd),
    )
    .await?;
    eventually(
        Duration::from_secs(60),
        "the CRD to be established",
        || async {
            let crd = crds.get(&name).await?;
            let established = crd
                .status
                .and_then(|s| s.conditions)
                .unwrap_or_default()
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True");
            Ok(established.then_some(()))
        },
    )
    .await
}
