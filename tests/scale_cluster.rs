//! The operator's cost at scale, against a real API server: N resources
//! (RabbitMQ bindings, external store, each with its own Deployment) exist
//! before the operator starts, as after a node drain; the test prints the
//! time until all are Ready, the operator's peak RSS and threads (from
//! `/proc`), and its peak number of AMQP connections (its sockets to port
//! 5672, from `/proc/<pid>/fd` and `/proc/<pid>/net/tcp`); then it restarts
//! the operator and prints the same over the restart.
//!
//! `#[ignore]`d and in its own test binary (so `make e2e` does not run it):
//! ```sh
//! cargo build --release -p idemq-operator
//! IDEMQ_E2E_KUBECONFIG=... IDEMQ_OPERATOR_BIN=target/release/idemq-operator \
//!   IDEMQ_SCALE_RESOURCES=1000 cargo test -p idemq-tests --test scale_cluster -- --ignored --nocapture
//! ```
//! The operator runs as the chart's ServiceAccount with the chart's RBAC and
//! default bounds. Queues have unique names and are deleted at the end (the
//! resources say `deleteOnCleanup`), then the namespace.

use std::collections::HashSet;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use idemq_operator::crd::IdempotentConsumer;
use idemq_tests::{chart_identity, client, e2e_kubeconfig, install_crd, unique, workspace_binary};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::Client;
use serde_json::json;

const AMQP: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
/// The chart's default `concurrency.brokerConnections`.
const POOL: usize = 8;

struct Operator(Child);

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let _ = self.0.wait();
    }
}

fn operator_binary() -> anyhow::Result<PathBuf> {
    match std::env::var_os("IDEMQ_OPERATOR_BIN") {
        Some(path) => Ok(PathBuf::from(path)),
        None => workspace_binary("idemq-operator"),
    }
}

/// Starts the operator; returns it and the address of its `/metrics`.
fn start(kubeconfig: &std::path::Path, ns: &str) -> anyhow::Result<(Operator, String)> {
    let admin = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let child = Command::new(operator_binary()?)
        .args(["run", "--watch-namespace", ns, "--lease-namespace", ns])
        .args(["--admin-addr", &admin.to_string()])
        .env("KUBECONFIG", kubeconfig)
        .env("RUST_LOG", "warn")
        .stderr(Stdio::inherit())
        .spawn()?;
    Ok((Operator(child), admin.to_string()))
}

/// What the operator's `/metrics` says of its reconciles so far: how many
/// succeeded, how many failed, and their mean duration.
#[derive(Debug, Default, Clone, Copy)]
struct Reconciles {
    ok: u64,
    failed: u64,
    mean_seconds: f64,
}

async fn reconciles(admin: &str) -> anyhow::Result<Reconciles> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(admin).await?;
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: operator\r\n\r\n")
        .await?;
    let mut text = String::new();
    stream.read_to_string(&mut text).await?;
    let mut r = Reconciles::default();
    let (mut sum, mut count) = (0.0, 0.0);
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let value: f64 = value.parse().unwrap_or(0.0);
        if series.starts_with("idemq_operator_reconciles_total") {
            if series.contains("result=\"ok\"") {
                r.ok += value as u64;
            } else {
                r.failed += value as u64;
            }
        } else if series == "idemq_operator_reconcile_duration_seconds_sum" {
            sum = value;
        } else if series == "idemq_operator_reconcile_duration_seconds_count" {
            count = value;
        }
    }
    r.mean_seconds = if count > 0.0 { sum / count } else { 0.0 };
    Ok(r)
}

/// What `/proc` says about a process now.
#[derive(Default, Debug, Clone, Copy)]
struct Sample {
    rss_kib: u64,
    threads: u64,
    amqp_connections: usize,
}

fn sample(pid: u32) -> Sample {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Sample {
        rss_kib: field("VmRSS:"),
        threads: field("Threads:"),
        amqp_connections: amqp_connections(pid),
    }
}

/// The process's established TCP connections to port 5672.
fn amqp_connections(pid: u32) -> usize {
    let inodes: HashSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|fd| std::fs::read_link(fd.path()).ok())
        .filter_map(|link| {
            link.to_str()?
                .strip_prefix("socket:[")?
                .strip_suffix(']')
                .map(str::to_string)
        })
        .collect();
    ["tcp", "tcp6"]
        .iter()
        .filter_map(|f| std::fs::read_to_string(format!("/proc/{pid}/net/{f}")).ok())
        .flat_map(|t| t.lines().skip(1).map(str::to_string).collect::<Vec<_>>())
        .filter(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            // remote address is column 2 (hex ip:port), state column 3 (01 = ESTABLISHED), inode column 9
            cols.len() > 9
                && cols[2].ends_with(":1628")
                && cols[3] == "01"
                && inodes.contains(cols[9])
        })
        .count()
}

/// Samples `pid` every 200 ms until `done` says all are Ready; returns the
/// time taken and the peaks.
async fn watch_until_ready(
    pid: u32,
    ics: &Api<IdempotentConsumer>,
    n: usize,
    timeout: Duration,
) -> anyhow::Result<(Duration, Sample, usize)> {
    let started = Instant::now();
    let mut peak = Sample::default();
    let mut last_check = Instant::now() - Duration::from_secs(10);
    loop {
        let s = sample(pid);
        peak.rss_kib = peak.rss_kib.max(s.rss_kib);
        peak.threads = peak.threads.max(s.threads);
        peak.amqp_connections = peak.amqp_connections.max(s.amqp_connections);
        if last_check.elapsed() >= Duration::from_secs(2) {
            last_check = Instant::now();
            let ready = ics
                .list(&ListParams::default())
                .await?
                .items
                .iter()
                .filter(|ic| {
                    ic.status.as_ref().is_some_and(|s| {
                        s.conditions
                            .iter()
                            .any(|c| c.type_ == "Ready" && c.status == "True")
                    })
                })
                .count();
            if ready == n {
                return Ok((started.elapsed(), peak, ready));
            }
            anyhow::ensure!(
                started.elapsed() < timeout,
                "only {ready} of {n} Ready after {timeout:?} (peak {peak:?})"
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn create_all(client: &Client, ns: &str, n: usize, run: &str) -> anyhow::Result<()> {
    let permits = Arc::new(tokio::sync::Semaphore::new(32));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        let (client, ns, run, permits) = (
            client.clone(),
            ns.to_string(),
            run.to_string(),
            permits.clone(),
        );
        tasks.spawn(async move {
            let _permit = permits.acquire().await?;
            let deployment: Deployment = serde_json::from_value(json!({
                "apiVersion": "apps/v1", "kind": "Deployment",
                "metadata": { "name": format!("worker-{i}") },
                "spec": {
                    "replicas": 0,
                    "selector": { "matchLabels": { "app": format!("worker-{i}") } },
                    "template": {
                        "metadata": { "labels": { "app": format!("worker-{i}") } },
                        "spec": { "containers": [{ "name": "app", "image": "example/worker:1" }] }
                    }
                }
            }))?;
            Api::<Deployment>::namespaced(client.clone(), &ns)
                .create(&PostParams::default(), &deployment)
                .await?;
            let ic: IdempotentConsumer = serde_json::from_value(json!({
                "apiVersion": "idemq.dev/v1alpha1", "kind": "IdempotentConsumer",
                "metadata": { "name": format!("c-{i}") },
                "spec": {
                    "target": { "kind": "Deployment", "name": format!("worker-{i}") },
                    "broker": { "rabbitmq": { "connectionSecretRef": { "name": "rabbitmq" },
                                              "queue": format!("{run}-{i}"), "deleteOnCleanup": true } },
                    "key": { "from": "messageId" },
                    "delivery": { "port": 8080 },
                    "store": { "mode": "external", "external": { "secretRef": { "name": "redis" } } }
                }
            }))?;
            Api::<IdempotentConsumer>::namespaced(client, &ns)
                .create(&PostParams::default(), &ic)
                .await?;
            anyhow::Ok(())
        });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    Ok(())
}

#[tokio::test]
#[ignore = "a scale run: needs IDEMQ_E2E_KUBECONFIG and IDEMQ_SCALE_RESOURCES (see the module docs)"]
async fn n_resources_then_a_restart_stay_within_bounded_memory_and_connections(
) -> anyhow::Result<()> {
    let kubeconfig = e2e_kubeconfig()?;
    let n: usize = std::env::var("IDEMQ_SCALE_RESOURCES")
        .map_err(|_| anyhow::anyhow!("IDEMQ_SCALE_RESOURCES is not set (say 1000)"))?
        .parse()?;
    let client = client(&kubeconfig).await?;
    install_crd(&client).await?;
    let ns = unique("idemq-scale");
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({ "metadata": { "name": ns } }))?,
        )
        .await?;
    let result = scale(&client, &kubeconfig, &ns, n).await;
    namespaces.delete(&ns, &DeleteParams::default()).await?;
    result
}

async fn scale(
    client: &Client,
    kubeconfig: &std::path::Path,
    ns: &str,
    n: usize,
) -> anyhow::Result<()> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    for (name, url) in [("rabbitmq", AMQP), ("redis", "redis://127.0.0.1:6379")] {
        secrets
            .create(
                &PostParams::default(),
                &serde_json::from_value(
                    json!({ "metadata": { "name": name }, "stringData": { "url": url } }),
                )?,
            )
            .await?;
    }
    let run = unique("scale");
    let created = Instant::now();
    create_all(client, ns, n, &run).await?;
    println!(
        "scale: created {n} Deployments and IdempotentConsumers in {:.1?}",
        created.elapsed()
    );
    let identity = chart_identity(client, kubeconfig, ns).await?;
    let ics: Api<IdempotentConsumer> = Api::namespaced(client.clone(), ns);
    let timeout = Duration::from_secs(60 + n as u64 / 2);

    let outcome = async {
        let (operator, admin) = start(identity.path(), ns)?;
        let (took, peak, ready) = watch_until_ready(operator.0.id(), &ics, n, timeout).await?;
        let work = reconciles(&admin).await?;
        println!(
            "scale: first start with {n} resources: {ready}/{n} Ready after {took:.1?}; peak RSS {:.1} MiB, peak threads {}, peak AMQP connections {} (pool {POOL}); reconciles {} ok, {} failed, mean {:.3} s",
            peak.rss_kib as f64 / 1024.0,
            peak.threads,
            peak.amqp_connections,
            work.ok,
            work.failed,
            work.mean_seconds
        );
        let settled = sample(operator.0.id());
        println!(
            "scale: once all Ready: RSS {:.1} MiB, threads {}, AMQP connections {}",
            settled.rss_kib as f64 / 1024.0,
            settled.threads,
            settled.amqp_connections
        );
        drop(operator);

        // The restart: every resource is Ready already and stays so; the
        // restarted operator has verified them all again once it has
        // reconciled each (ok count ≥ n). Then 30 s more are sampled.
        let (operator, admin) = start(identity.path(), ns)?;
        let pid = operator.0.id();
        let restarted = Instant::now();
        let mut restart_peak = Sample::default();
        let observe = |peak: &mut Sample| {
            let s = sample(pid);
            peak.rss_kib = peak.rss_kib.max(s.rss_kib);
            peak.threads = peak.threads.max(s.threads);
            peak.amqp_connections = peak.amqp_connections.max(s.amqp_connections);
        };
        let mut work = Reconciles::default();
        while work.ok < n as u64 {
            anyhow::ensure!(
                restarted.elapsed() < timeout,
                "the restarted operator reconciled only {work:?} of {n} in {timeout:?}"
            );
            observe(&mut restart_peak);
            tokio::time::sleep(Duration::from_millis(200)).await;
            work = reconciles(&admin).await.unwrap_or(work);
        }
        let reverified = restarted.elapsed();
        let until = Instant::now() + Duration::from_secs(30);
        while Instant::now() < until {
            observe(&mut restart_peak);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let still_ready = watch_until_ready(pid, &ics, n, Duration::from_secs(5)).await?.2;
        println!(
            "scale: restart with {n} Ready resources: all {n} reconciled again after {reverified:.1?} (mean {:.3} s, {} failed), {still_ready}/{n} still Ready; first {:.0?} + 30 s: peak RSS {:.1} MiB, peak threads {}, peak AMQP connections {}",
            work.mean_seconds,
            work.failed,
            reverified,
            restart_peak.rss_kib as f64 / 1024.0,
            restart_peak.threads,
            restart_peak.amqp_connections
        );
        anyhow::ensure!(
            peak.amqp_connections <= POOL && restart_peak.amqp_connections <= POOL,
            "more AMQP connections than the pool holds"
        );
        anyhow::Ok(operator)
    }
    .await;

    // Cleanup: the operator deletes the queues it declared with the resources.
    let (operator, failed) = match outcome {
        Ok(operator) => (Some(operator), None),
        Err(e) => (start(identity.path(), ns).ok().map(|(o, _)| o), Some(e)),
    };
    // A loaded API server may drop a connection now and then: an error
    // here must not stop the operator before it has finished the resources
    // (their finalizers would then hold the namespace for ever).
    let deleting = Instant::now();
    let (mut remaining, mut asked) = (n, false);
    while remaining > 0 && deleting.elapsed() < timeout {
        if !asked {
            match ics
                .delete_collection(&DeleteParams::default(), &ListParams::default())
                .await
            {
                Ok(_) => asked = true,
                Err(e) => println!("scale: deleting the resources: {e} (trying again)"),
            }
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        match ics.list(&ListParams::default().limit(1)).await {
            Ok(list) => remaining = list.items.len(),
            Err(e) => println!("scale: listing the resources: {e} (trying again)"),
        }
    }
    println!(
        "scale: {n} resources deleted (queues with them) in {:.1?}",
        deleting.elapsed()
    );
    drop(operator);
    failed.map_or(Ok(()), Err)
}
