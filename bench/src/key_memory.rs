//! Redis memory per retained key: completes N keys through the real store
//! scripts and divides the growth of `used_memory` by N.

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
    let store = crate::redis_admin::fresh_store_with(&args.redis, "bench-mem", |o| {
        o.expected_rate = (rate > 0.0).then_some(rate);
    })?;
    let mut admin = crate::redis_admin::connection(&args.redis).await?;
    let before = crate::redis_admin::used_memory(&mut admin).await?;
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
    let after = crate::redis_admin::used_memory(&mut admin).await?;
    let deleted = crate::redis_admin::delete_prefix(&mut admin, store.prefix()).await?;
    let per_key = (after.saturating_sub(before)) as f64 / args.keys as f64;
    println!("keys completed:        {}", args.keys);
    println!("declared rate:         {rate:.1} msg/s");
    println!("time:                  {:.1} s", elapsed.as_secs_f64());
    println!("used_memory before:    {before} B");
    println!("used_memory after:     {after} B");
    println!("bytes per retained key: {per_key:.1}");
    println!("cleaned up {deleted} redis keys under {}", store.prefix());
    Ok(())
}
