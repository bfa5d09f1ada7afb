//! Claim throughput of one Redis store with many concurrent callers, next to
//! `redis-benchmark` doing plain SETs with as many clients, in the same run;
//! with `--cluster`, the same loops against a Redis Cluster too, and the
//! ratio of the two.

use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use idemq_sidecar::store::redis::{Durability, RedisStore};
use idemq_sidecar::store::{Claim, KeyStore};

use crate::redis_admin::{self, Servers};

#[derive(clap::Args)]
pub struct Args {
    /// Concurrent callers.
    #[arg(long, default_value_t = 64)]
    callers: usize,
    /// Seconds per measurement.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    #[arg(long, default_value = "redis://127.0.0.1:6379")]
    redis: String,
    /// Seed nodes of a Redis Cluster (comma-separated URLs) to measure too.
    #[arg(long)]
    cluster: Option<String>,
    /// Hash tags the Cluster store spreads a consumer's keys over.
    #[arg(long, default_value_t = 12)]
    partitions: u16,
    /// Measure the Cluster a second time with `durability: replicated`
    /// (each completion batch waits for a replica), and the ratio.
    #[arg(long, requires = "cluster")]
    replicated: bool,
}

const RETENTION: Duration = Duration::from_secs(3600);
const LEASE: Duration = Duration::from_secs(30);

pub async fn run(args: Args) -> anyhow::Result<()> {
    let duration = Duration::from_secs(args.seconds);
    let mut node = Servers::connect(&args.redis, false).await?;
    let one = measure_store(&mut node, &args, duration, Durability::Local).await?;
    let mut admin = redis_admin::connection(&args.redis).await?;
    let set = redis_benchmark_set(&args, &mut admin).await?;
    let (mut cluster, mut replicated) = (None, None);
    if let Some(seeds) = &args.cluster {
        let mut servers = Servers::connect(seeds, true).await?;
        cluster = Some(measure_store(&mut servers, &args, duration, Durability::Local).await?);
        if args.replicated {
            replicated =
                Some(measure_store(&mut servers, &args, duration, Durability::Replicated).await?);
        }
    }

    println!("callers:                          {}", args.callers);
    one.print();
    println!("redis-benchmark SET/s ({} clients): {set:.0}", args.callers);
    println!("ratio claims/SET:                 {:.2}", one.claims / set);
    if let Some(cluster) = &cluster {
        cluster.print();
        println!(
            "ratio Cluster/one node:           claims {:.2}, cycles {:.2}",
            cluster.claims / one.claims,
            cluster.cycles / one.cycles
        );
    }
    if let (Some(cluster), Some(replicated)) = (&cluster, &replicated) {
        replicated.print();
        println!(
            "ratio replicated/local cycles:    {:.2} (Cluster)",
            replicated.cycles / cluster.cycles
        );
    }
    Ok(())
}

/// What one store setup did: claims alone, then claim+complete cycles.
struct Figures {
    setup: String,
    claims: f64,
    claim_cpu: f64,
    cycles: f64,
    cycle_cpu: f64,
}

impl Figures {
    fn print(&self) {
        println!("{}:", self.setup);
        println!(
            "  idemq claims/s (claim only):    {:.0}  (Redis CPU {:.2} s/100k)",
            self.claims, self.claim_cpu
        );
        println!(
            "  idemq claim+complete cycles/s:  {:.0}  ({:.0} store calls/s; Redis CPU {:.2} s/100k cycles)",
            self.cycles,
            self.cycles * 2.0,
            self.cycle_cpu
        );
    }
}

async fn measure_store(
    servers: &mut Servers,
    args: &Args,
    duration: Duration,
    durability: Durability,
) -> anyhow::Result<Figures> {
    let store = servers.store("bench-claims", args.partitions, |o| {
        o.durability = durability
    })?;
    store.ping().await?;
    let (claims, claim_cpu) = measure(&store, servers, args.callers, duration, false).await?;
    let (cycles, cycle_cpu) = measure(&store, servers, args.callers, duration, true).await?;
    servers.delete_prefix(store.prefix()).await?;
    Ok(Figures {
        setup: if servers.cluster {
            format!(
                "{}, {} partitions, durability {durability:?}",
                servers.describe(),
                store.partition_prefixes().len()
            )
        } else {
            servers.describe()
        },
        claims,
        claim_cpu,
        cycles,
        cycle_cpu,
    })
}

/// Runs `callers` loops for `duration`, each claiming fresh keys (and
/// completing them when `complete`); returns operations per second and the
/// Redis server's CPU seconds per 100,000 operations.
async fn measure(
    store: &Arc<RedisStore>,
    servers: &mut Servers,
    callers: usize,
    duration: Duration,
    complete: bool,
) -> anyhow::Result<(f64, f64)> {
    let done = Arc::new(AtomicU64::new(0));
    let cpu_before = servers.cpu_seconds().await?;
    let started = Instant::now();
    let tasks: Vec<_> = (0..callers)
        .map(|caller| {
            let store = store.clone();
            let done = done.clone();
            tokio::spawn(async move {
                let mut i = 0u64;
                while started.elapsed() < duration {
                    let key = format!("{complete}-{caller}-{i}");
                    i += 1;
                    let Claim::Acquired { token } =
                        store.claim(&key, None, LEASE, RETENTION).await?
                    else {
                        anyhow::bail!("fresh key {key} was not acquired");
                    };
                    if complete {
                        store.complete(&key, &token, RETENTION).await?;
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                }
                Ok(())
            })
        })
        .collect();
    for task in tasks {
        task.await??;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = servers.cpu_seconds().await? - cpu_before;
    let done = done.load(Ordering::Relaxed) as f64;
    Ok((done / elapsed, cpu * 100_000.0 / done.max(1.0)))
}

/// `redis-benchmark` SET on keys under a prefix of our own, then deletes them.
async fn redis_benchmark_set(
    args: &Args,
    admin: &mut redis::aio::MultiplexedConnection,
) -> anyhow::Result<f64> {
    let url = url::Url::parse(&args.redis)?;
    let host = url.host_str().unwrap_or("127.0.0.1").to_string();
    let port = url.port().unwrap_or(6379).to_string();
    let prefix = format!(
        "bench-set-{}:",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let requests = (args.seconds * 80_000).to_string();
    let output = Command::new("redis-benchmark")
        .args(["-h", &host, "-p", &port, "-c", &args.callers.to_string()])
        .args(["-n", &requests, "-r", "1000000", "-q", "--csv"])
        .args(["SET", &format!("{prefix}__rand_int__"), "x"])
        .output()
        .map_err(|e| anyhow::anyhow!("run redis-benchmark (apt-get install redis-tools): {e}"))?;
    anyhow::ensure!(
        output.status.success(),
        "redis-benchmark failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let csv = String::from_utf8_lossy(&output.stdout);
    redis_admin::delete_prefix(admin, &prefix).await?;
    // CSV rows: "test","rps",...; the data row is the last.
    csv.lines()
        .last()
        .and_then(|row| row.split(',').nth(1))
        .and_then(|rps| rps.trim_matches('"').parse().ok())
        .ok_or_else(|| anyhow::anyhow!("unexpected redis-benchmark output: {csv}"))
}
