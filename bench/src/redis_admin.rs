//! The benchmarks' own Redis chores: connections, stores under fresh
//! namespaces, cleaning up what a run wrote, and figures from `INFO`.

use std::sync::Arc;
use std::time::Duration;

use idemq_sidecar::store::redis::{RedisOptions, RedisStore};

/// A Redis store under a namespace of its own (`<label>-<random>`), so that a
/// run touches no key it did not create.
pub fn fresh_store(url: &str, label: &str) -> anyhow::Result<Arc<RedisStore>> {
    fresh_store_with(url, label, |_| {})
}

/// [`fresh_store`] with options adjusted by `adjust`.
pub fn fresh_store_with(
    url: &str,
    label: &str,
    adjust: impl FnOnce(&mut RedisOptions),
) -> anyhow::Result<Arc<RedisStore>> {
    let mut options = RedisOptions {
        timeout: Duration::from_secs(5),
        ..RedisOptions::new(
            url,
            format!(
                "{label}-{}",
                &uuid::Uuid::new_v4().simple().to_string()[..8]
            ),
        )
    };
    adjust(&mut options);
    Ok(Arc::new(RedisStore::new(options)?))
}

pub async fn connection(url: &str) -> anyhow::Result<redis::aio::MultiplexedConnection> {
    Ok(redis::Client::open(url)?
        .get_multiplexed_async_connection()
        .await?)
}

/// Deletes the keys under `prefix` (and only those); returns how many.
pub async fn delete_prefix(
    conn: &mut redis::aio::MultiplexedConnection,
    prefix: &str,
) -> anyhow::Result<u64> {
    let mut cursor = 0u64;
    let mut deleted = 0;
    loop {
        let (next, keys): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}*"))
            .arg("COUNT")
            .arg(1000)
            .query_async(conn)
            .await?;
        if !keys.is_empty() {
            let n: u64 = redis::cmd("UNLINK").arg(&keys).query_async(conn).await?;
            deleted += n;
        }
        if next == 0 {
            return Ok(deleted);
        }
        cursor = next;
    }
}

/// Bytes of memory the Redis server uses (`used_memory`).
pub async fn used_memory(conn: &mut redis::aio::MultiplexedConnection) -> anyhow::Result<u64> {
    let info = info(conn, "memory").await?;
    Ok(field(&info, "used_memory")? as u64)
}

/// CPU seconds (user + system) the Redis server has used so far.
pub async fn cpu_seconds(conn: &mut redis::aio::MultiplexedConnection) -> anyhow::Result<f64> {
    let info = info(conn, "cpu").await?;
    Ok(field(&info, "used_cpu_sys")? + field(&info, "used_cpu_user")?)
}

async fn info(
    conn: &mut redis::aio::MultiplexedConnection,
    section: &str,
) -> anyhow::Result<String> {
    Ok(redis::cmd("INFO").arg(section).query_async(conn).await?)
}

/// One numeric field (`name:value` line) of an `INFO` reply.
fn field(info: &str, name: &str) -> anyhow::Result<f64> {
    info.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| anyhow::anyhow!("INFO has no numeric {name}"))
}
