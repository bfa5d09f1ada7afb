//! Redis memory per retained key: completes N keys through the real store
//! scripts and divides the growth of `used_memory` (summed over the
//! primaries, on a Cluster) by N.

use std::time::{Duration, Instant};

use futures::StreamExt;
use idemq_sidecar::store::{Claim, KeyStore};

#[derive(clap::Args)]
pub struct Args {
    /// Keys to complete.
    #[arg(long, default_value_t = 1_000_000)]
    keys: u64,
    #[arg(long, default_value = "redis://127.0.0.1:6379")]
    redis: String,
    /// `--redis` names seed nodes of a Redis Cluster (comma-separated URLs).
    #[arg(long)]
    cluster: bool,
    /// Hash tags the Cluster store spreads the keys over.
    #[arg(long, default_value_t = 12)]
    partitions: u16,
    /// Concurrent store calls.
    #[arg(long, default_value_t = 256)]
    concurrency: usize,
    /// The consumer's declared rate (messages/s), which sizes a window's
    /// shards before its rate is observed. The run completes every key in one
    /// window (a quarter of the 24 h retention), so the default declares the
    /// rate that makes `keys` per window; 0 declares none.
    #[arg(long)]
    rate: Option<f64>,
}

const RETENTION: Duration = Duration::from_secs(24 * 3600);
const LEASE: Duration = Duration::from_secs(30);

pub async fn run(args: Args) -> anyhow::Result<()> {
    let rate = args
        .rate
        .unwrap_or(args.keys as f64 / (RETENTION.as_secs_f64() / 4.0));
    let mut servers = crate::redis_admin::Servers::connect(&args.redis, args.cluster).await?;
    let store = servers.store("bench-mem", args.partitions, |o| {
        o.expected_rate = (rate > 0.0).then_some(rate);
    })?;
    let before = servers.used_memory().await?;
    let started = Instant::now();
    futures::stream::iter(0..args.keys)
        .map(|i| {
            let store = store.clone();
            async move {
                let key = format!("order-{i:010}");
                match store.claim(&key, Some("body"), LEASE, RETENTION).await? {
                    Claim::Acquired { token } => {
                        store.complete(&key, &token, RETENTION).await?;
                        Ok(())
                    }
                    other => anyhow::bail!("fresh key {key} was {other:?}"),
                }
            }
        })
        .buffer_unordered(args.concurrency)
        .collect::<Vec<anyhow::Result<()>>>()
        .await
        .into_iter()
        .collect::<anyhow::Result<Vec<()>>>()?;
    let elapsed = started.elapsed();
    let after = servers.used_memory().await?;
    let deleted = servers.delete_prefix(store.prefix()).await?;
    let per_key = (after.saturating_sub(before)) as f64 / args.keys as f64;
    println!(
        "store:                 {}, {} partitions",
        servers.describe(),
        store.partition_prefixes().len()
    );
    println!("keys completed:        {}", args.keys);
    println!("declared rate:         {rate:.1} msg/s");
    println!("time:                  {:.1} s", elapsed.as_secs_f64());
    println!("used_memory before:    {before} B");
    println!("used_memory after:     {after} B");
    println!("bytes per retained key: {per_key:.1}");
    println!("cleaned up {deleted} redis keys under {}", store.prefix());
    Ok(())
}
