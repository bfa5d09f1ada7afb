//! The benchmarks' own Redis chores: connections, stores under fresh
//! namespaces, cleaning up what a run wrote, and figures from `INFO`, of one
//! node or summed over a Cluster's primaries ([`Servers`]).

use std::sync::Arc;
use std::time::Duration;

use idemq_sidecar::store::redis::{RedisOptions, RedisStore};

/// A Redis store under a namespace of its own (`<label>-<random>`), so that a
/// run touches no key it did not create; options adjusted by `adjust`.
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
            // One key per UNLINK: on a Cluster node a command may not name
            // keys of two slots.
            let mut pipe = redis::pipe();
            for key in &keys {
                pipe.cmd("UNLINK").arg(key);
            }
            let unlinked: Vec<u64> = pipe.query_async(conn).await?;
            deleted += unlinked.iter().sum::<u64>();
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

/// The servers a run measures: one node, or every primary of a Redis Cluster
/// (found from the first seed's `CLUSTER NODES`), whose figures are summed.
pub struct Servers {
    /// The store URL: one node, or the Cluster's seeds separated by commas.
    pub url: String,
    pub cluster: bool,
    nodes: Vec<redis::aio::MultiplexedConnection>,
}

impl Servers {
    pub async fn connect(url: &str, cluster: bool) -> anyhow::Result<Self> {
        let first = url.split(',').next().unwrap_or(url).trim();
        let mut seed = connection(first).await?;
        let nodes = if cluster {
            let text: String = redis::cmd("CLUSTER")
                .arg("NODES")
                .query_async(&mut seed)
                .await?;
            let mut nodes = Vec::new();
            for line in text.lines() {
                // <id> <ip:port@bus> <flags> ...
                let fields: Vec<&str> = line.split(' ').collect();
                if fields.len() > 2 && fields[2].contains("master") && !fields[2].contains("fail") {
                    let addr = fields[1].split('@').next().unwrap_or_default();
                    nodes.push(connection(&format!("redis://{addr}")).await?);
                }
            }
            anyhow::ensure!(!nodes.is_empty(), "{first} lists no live primary");
            nodes
        } else {
            vec![seed]
        };
        Ok(Self {
            url: url.to_string(),
            cluster,
            nodes,
        })
    }

    /// A store on these servers under a fresh namespace; on a Cluster its
    /// keys spread over `partitions` hash tags.
    pub fn store(
        &self,
        label: &str,
        partitions: u16,
        adjust: impl FnOnce(&mut RedisOptions),
    ) -> anyhow::Result<Arc<RedisStore>> {
        fresh_store_with(&self.url, label, |o| {
            o.cluster = self.cluster;
            o.partitions = if self.cluster { partitions } else { 1 };
            adjust(o);
        })
    }

    pub fn describe(&self) -> String {
        if self.cluster {
            format!("Redis Cluster ({} primaries)", self.nodes.len())
        } else {
            format!("one Redis node ({})", self.url)
        }
    }

    pub async fn used_memory(&mut self) -> anyhow::Result<u64> {
        let mut sum = 0;
        for node in &mut self.nodes {
            sum += used_memory(node).await?;
        }
        Ok(sum)
    }

    pub async fn cpu_seconds(&mut self) -> anyhow::Result<f64> {
        let mut sum = 0.0;
        for node in &mut self.nodes {
            sum += cpu_seconds(node).await?;
        }
        Ok(sum)
    }

    pub async fn delete_prefix(&mut self, prefix: &str) -> anyhow::Result<u64> {
        let mut sum = 0;
        for node in &mut self.nodes {
            sum += delete_prefix(node, prefix).await?;
        }
        Ok(sum)
    }
}
