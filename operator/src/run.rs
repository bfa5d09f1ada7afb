//! `idemq-operator run`: the controller process. An admin listener
//! (`/healthz`, `/readyz`, `/metrics`) separate from the work, leader election,
//! JSON logs, and a graceful shutdown on SIGTERM.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use futures::StreamExt;
use idemq_operator::broker::pool::PoolConfig;
use idemq_operator::broker::Brokers;
use idemq_operator::controller::{self, Context, Guarded};
use idemq_operator::crd::TargetKind;
use idemq_operator::labels;
use idemq_operator::leader::Elector;
use idemq_operator::metrics::Metrics;
use idemq_operator::webhook;
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::core::PartialObjectMeta;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::{reflector, watcher, Controller, WatchStreamExt};
use kube::{Api, Client, ResourceExt};
use tokio_util::sync::CancellationToken;

#[derive(clap::Args)]
pub struct Args {
    /// Watch only these namespaces (repeat the flag or separate with commas;
    /// default: all namespaces).
    #[arg(
        long = "watch-namespace",
        env = "IDEMQ_WATCH_NAMESPACES",
        value_delimiter = ','
    )]
    watch_namespaces: Vec<String>,
    /// Sidecar image for policies that name none.
    #[arg(long, env = "IDEMQ_SIDECAR_IMAGE", default_value = labels::DEFAULT_SIDECAR_IMAGE)]
    sidecar_image: String,
    /// Address of /healthz, /readyz and /metrics.
    #[arg(long, env = "IDEMQ_ADMIN_ADDR", default_value = "0.0.0.0:8080")]
    admin_addr: SocketAddr,
    /// Namespace of the leader Lease (default: the pod's namespace).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    lease_namespace: String,
    #[arg(long, env = "IDEMQ_LEASE_NAME", default_value = "idemq-operator")]
    lease_name: String,
    /// Run without leader election (a single replica).
    #[arg(long)]
    no_leader_election: bool,
    /// Reconciles running at once (per watched namespace).
    #[arg(long, env = "IDEMQ_MAX_CONCURRENT_RECONCILES", default_value_t = 16)]
    max_concurrent_reconciles: u16,
    /// Broker operations (declarations, deletions) in flight at once.
    #[arg(long, env = "IDEMQ_MAX_BROKER_OPERATIONS", default_value_t = controller::DEFAULT_BROKER_OPERATIONS)]
    max_broker_operations: usize,
    /// Broker connections open at once, per broker (one per endpoint and credentials).
    #[arg(long, env = "IDEMQ_MAX_BROKER_CONNECTIONS", default_value_t = PoolConfig::default().max_connections)]
    max_broker_connections: usize,
    /// How long an unused broker connection stays open.
    #[arg(long, env = "IDEMQ_BROKER_IDLE_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration)]
    broker_idle_timeout: Duration,
    /// Serve the admission webhook of injection: pod on this address (HTTPS);
    /// every replica serves it, leader or not.
    #[arg(long, env = "IDEMQ_WEBHOOK_ADDR")]
    webhook_addr: Option<SocketAddr>,
    /// Names in the webhook's serving certificate: the DNS names of its
    /// Service (or an IP address the API server calls).
    #[arg(long, env = "IDEMQ_WEBHOOK_NAMES", value_delimiter = ',')]
    webhook_names: Vec<String>,
    /// Namespace of the webhook certificate Secret (the operator's own).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    webhook_namespace: String,
    /// The Secret holding the webhook's CA and serving certificate.
    #[arg(
        long,
        env = "IDEMQ_WEBHOOK_SECRET",
        default_value = "idemq-webhook-tls"
    )]
    webhook_secret: String,
    /// The webhook's certificate Secret is kept by another issuer
    /// (cert-manager, which also writes the caBundle): serve its tls.crt and
    /// tls.key, re-read every 30 s; no CA of the operator's own, no caBundle
    /// writes, and no --webhook-names, --webhook-configuration or
    /// --webhook-cert-lifetime.
    #[arg(long, env = "IDEMQ_WEBHOOK_EXTERNAL_CERT")]
    webhook_external_cert: bool,
    /// The MutatingWebhookConfiguration whose caBundle the operator keeps.
    #[arg(long, env = "IDEMQ_WEBHOOK_CONFIGURATION", default_value = "idemq")]
    webhook_configuration: String,
    /// Lifetime of the serving certificate (renewed at two thirds of it; the
    /// CA lives ten times as long).
    #[arg(long, env = "IDEMQ_WEBHOOK_CERT_LIFETIME", default_value = "90d", value_parser = humantime::parse_duration)]
    webhook_cert_lifetime: Duration,
}

pub fn main(args: Args) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .json()
        .flatten_event(true)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    tokio::runtime::Runtime::new()?.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    // Several crates link rustls with different crypto backends; pick one.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = Client::try_default()
        .await
        .context("build the Kubernetes client")?;
    let metrics = Arc::new(Metrics::new());
    let ready = Arc::new(AtomicBool::new(false));
    let shutdown = CancellationToken::new();
    tokio::spawn(admin(args.admin_addr, metrics.clone(), ready.clone()));
    tokio::spawn({
        let shutdown = shutdown.clone();
        async move {
            terminated().await;
            tracing::info!("shutting down");
            shutdown.cancel();
        }
    });

    let scopes: Vec<Option<String>> = if args.watch_namespaces.is_empty() {
        vec![None]
    } else {
        args.watch_namespaces.iter().cloned().map(Some).collect()
    };
    // Every replica serves the webhook, and is ready once it serves and can
    // list the resources: a standby is ready to take over.
    if let Some(addr) = args.webhook_addr {
        let settings = webhook::Settings {
            addr,
            namespace: args.webhook_namespace.clone(),
            secret: args.webhook_secret.clone(),
            issuer: if args.webhook_external_cert {
                webhook::Issuer::External
            } else {
                webhook::Issuer::Operator(webhook::Own {
                    configuration: args.webhook_configuration.clone(),
                    wanted: webhook::certs::Wanted {
                        names: args.webhook_names.clone(),
                        lifetime: args.webhook_cert_lifetime,
                    },
                })
            },
        };
        loop {
            let started = webhook::start(
                client.clone(),
                settings.clone(),
                args.sidecar_image.clone(),
                shutdown.clone(),
            );
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                started = started => match started {
                    Ok(()) => break,
                    Err(e) => tracing::warn!(error = %e, "cannot serve the webhook yet"),
                }
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        tracing::info!(%addr, "serving the admission webhook");
    }
    tokio::spawn(become_ready(client.clone(), scopes.clone(), ready));

    if !args.no_leader_election {
        let identity = std::env::var("POD_NAME")
            .or_else(|_| std::env::var("HOSTNAME"))
            .unwrap_or_else(|_| format!("idemq-operator-{}", std::process::id()));
        let elector = Arc::new(Elector {
            api: Api::<Lease>::namespaced(client.clone(), &args.lease_namespace),
            name: args.lease_name.clone(),
            identity,
            duration: Duration::from_secs(15),
        });
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                acquired = elector.try_acquire() => match acquired {
                    Ok(true) => break,
                    Ok(false) => {}
                    Err(e) => tracing::warn!(error = %e, "leader election failed"),
                }
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        tracing::info!(lease = %args.lease_name, "leading");
        metrics.leader.set(1);
        tokio::spawn(keep_leading(elector, shutdown.clone(), metrics.clone()));
    }

    // One controller per watched namespace (or one for the whole cluster):
    // each needs only the permissions of its own namespace.
    let reporter = Reporter {
        controller: labels::MANAGER.to_string(),
        instance: std::env::var("POD_NAME").ok(),
    };
    let ctx = Arc::new(
        Context::new(
            client.clone(),
            Recorder::new(client.clone(), reporter),
            Arc::new(Brokers::new(PoolConfig {
                max_connections: args.max_broker_connections,
                idle: args.broker_idle_timeout,
            })),
            args.sidecar_image.clone(),
            metrics.clone(),
        )
        .with_broker_operations(args.max_broker_operations),
    );
    let config = controller::Config::default().concurrency(args.max_concurrent_reconciles);
    futures::future::join_all(scopes.into_iter().map(|scope| {
        control(
            client.clone(),
            scope,
            ctx.clone(),
            config.clone(),
            shutdown.clone(),
        )
    }))
    .await;
    Ok(())
}

/// Ready once the API server answers a list of the resource in every watched
/// scope: the client works, the CRD is installed and RBAC lets us watch it.
async fn become_ready(client: Client, scopes: Vec<Option<String>>, ready: Arc<AtomicBool>) {
    for scope in &scopes {
        let ics: Api<Guarded> = namespaced_or_all(&client, scope);
        loop {
            match ics.list(&kube::api::ListParams::default().limit(1)).await {
                Ok(_) => break,
                Err(e) => {
                    tracing::warn!(error = %e, namespace = ?scope, "cannot list IdempotentConsumers yet")
                }
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    }
    ready.store(true, Ordering::Relaxed);
}

/// Runs the controller for one namespace (`None`: all) until shutdown.
async fn control(
    client: Client,
    scope: Option<String>,
    ctx: Arc<Context>,
    config: controller::Config,
    shutdown: CancellationToken,
) {
    let owned = watcher::Config::default()
        .labels(&format!("app.kubernetes.io/managed-by={}", labels::MANAGER));
    // The resources, cached without their managedFields (half of each
    // object, and never read), reconciled when what people change changed:
    // not on the status writes of the operator's own reconciles.
    let (resources, resources_writer) = reflector::store::<Guarded>();
    let changed = watcher(
        namespaced_or_all::<Guarded>(&client, &scope),
        watcher::Config::default(),
    )
    .default_backoff()
    .modify(|resource| resource.managed_fields_mut().clear())
    .reflect(resources_writer)
    .applied_objects()
    .predicate_filter(controller::changed_by_people, Default::default());
    let controller = Controller::for_stream(changed, resources).with_config(config);
    let (deployments_store, statefulsets_store) = (controller.store(), controller.store());
    // A Secret that resources name, created, changed or deleted: reconcile
    // them now (Ready within seconds of creating a missing Secret; a rotated
    // one rolls the sidecars). Metadata only: no Secret's data is listed.
    let secrets_store = controller.store();
    let secret_changes = watcher(
        namespaced_or_all::<PartialObjectMeta<Secret>>(&client, &scope),
        watcher::Config::default(),
    )
    .default_backoff()
    .touched_objects();
    ctx.add_cache(controller.store());
    // The injected pods, trimmed and cached for SidecarsReady; a change of
    // what that condition reads reconciles the resource the pod's label names.
    let (pods, pods_writer) = reflector::store::<Pod>();
    ctx.add_pod_cache(pods);
    let pod_changes = controller::pods::changes(
        watcher(
            namespaced_or_all::<Pod>(&client, &scope),
            watcher::Config::default().labels(labels::CONSUMER_LABEL),
        )
        .default_backoff()
        .modify(controller::pods::trim)
        .reflect(pods_writer),
    );
    controller
        .owns(
            namespaced_or_all::<ConfigMap>(&client, &scope),
            owned.clone(),
        )
        .owns(namespaced_or_all::<Service>(&client, &scope), owned.clone())
        .owns(namespaced_or_all::<Secret>(&client, &scope), owned.clone())
        .owns(
            namespaced_or_all::<Deployment>(&client, &scope),
            owned.clone(),
        )
        // A ZeroMQ endpoint's NetworkPolicy, edited or deleted: restored at once.
        .owns(namespaced_or_all::<NetworkPolicy>(&client, &scope), owned)
        // A target created or changed after its policy: reconcile the policy.
        .watches(
            namespaced_or_all::<Deployment>(&client, &scope),
            watcher::Config::default(),
            move |d| {
                targeting(
                    &deployments_store,
                    TargetKind::Deployment,
                    &d.namespace().unwrap_or_default(),
                    &d.name_any(),
                )
            },
        )
        .watches(
            namespaced_or_all::<StatefulSet>(&client, &scope),
            watcher::Config::default(),
            move |s| {
                targeting(
                    &statefulsets_store,
                    TargetKind::StatefulSet,
                    &s.namespace().unwrap_or_default(),
                    &s.name_any(),
                )
            },
        )
        .watches_stream(pod_changes, |pod| controller::pods::owner(&pod))
        .watches_stream(secret_changes, move |secret| {
            controller::secrets::naming(
                &secrets_store,
                &secret.namespace().unwrap_or_default(),
                &secret.name_any(),
            )
        })
        .graceful_shutdown_on(shutdown.cancelled_owned())
        .run(
            controller::reconcile_guarded,
            controller::error_policy_guarded,
            ctx,
        )
        .for_each(|result| async move {
            match result {
                Ok((object, _)) => tracing::debug!(name = %object.name, "reconciled"),
                Err(e) => tracing::debug!(error = %e, "reconcile error"),
            }
        })
        .await;
}

fn namespaced_or_all<K>(client: &Client, namespace: &Option<String>) -> Api<K>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
    <K as kube::Resource>::DynamicType: Default,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// The policies that target the workload `kind` `namespace`/`name`.
fn targeting(
    store: &Store<Guarded>,
    kind: TargetKind,
    namespace: &str,
    name: &str,
) -> Vec<ObjectRef<Guarded>> {
    store
        .state()
        .iter()
        .filter(|guard| {
            guard.0.as_ref().is_ok_and(|ic| {
                ic.namespace().as_deref() == Some(namespace)
                    && ic.spec.target.workload() == Some((&kind, name))
            })
        })
        .map(|guard| ObjectRef::from(guard.as_ref()))
        .collect()
}

/// Renews the lease; on losing it, stops the process so that it restarts as a candidate.
async fn keep_leading(elector: Arc<Elector>, shutdown: CancellationToken, metrics: Arc<Metrics>) {
    let mut failures = 0;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
        }
        match elector.try_acquire().await {
            Ok(true) => failures = 0,
            Ok(false) => {
                tracing::error!("lost the leader lease: stopping");
                break;
            }
            Err(e) => {
                failures += 1;
                tracing::warn!(error = %e, failures, "renewing the leader lease failed");
                if failures >= 2 {
                    tracing::error!("could not renew the leader lease in time: stopping");
                    break;
                }
            }
        }
    }
    metrics.leader.set(0);
    shutdown.cancel();
}

async fn admin(addr: SocketAddr, metrics: Arc<Metrics>, ready: Arc<AtomicBool>) {
    use axum::http::StatusCode;
    use axum::routing::get;
    let router = axum::Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || {
                let ready = ready.load(Ordering::Relaxed);
                async move {
                    if ready {
                        (StatusCode::OK, "ready\n")
                    } else {
                        (
                            StatusCode::SERVICE_UNAVAILABLE,
                            "cannot list IdempotentConsumers yet\n",
                        )
                    }
                }
            }),
        )
        .route(
            "/metrics",
            get(move || {
                let text = metrics.encode();
                async move { text }
            }),
        );
    match tokio::net::TcpListener::bind(addr).await {
        Ok(listener) => {
            if let Err(e) = axum::serve(listener, router).await {
                tracing::error!(error = %e, "admin listener failed");
            }
        }
        Err(e) => tracing::error!(error = %e, %addr, "cannot bind the admin listener"),
    }
}

async fn terminated() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("install the SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
