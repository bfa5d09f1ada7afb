//! What an administrator (the operator) reads and does in a consumer's Redis
//! store: its unacknowledged reset records, and their acknowledgement.

use super::redis::partition_prefixes;
use crate::store::connection::{Connection, Endpoint};
use crate::store::StoreError;

/// Where a consumer's store is, and how its keys are spread.
pub struct Target<'a> {
    pub endpoint: Endpoint<'a>,
    pub namespace: &'a str,
    pub partitions: u16,
}

fn connection(target: &Target<'_>) -> Result<Connection, StoreError> {
    Connection::open(&target.endpoint)
}

async fn bounded<T>(
    target: &Target<'_>,
    op: &'static str,
    call: impl std::future::Future<Output = redis::RedisResult<T>>,
) -> Result<T, StoreError> {
    let timeout = target.endpoint.timeout;
    match tokio::time::timeout(timeout, call).await {
        Ok(result) => result.map_err(|source| StoreError::Redis { op, source }),
        Err(_) => Err(StoreError::Timeout { op, timeout }),
    }
}

/// The reset records waiting for acknowledgement, one per partition
/// that has one: `(partition prefix, record)`.
pub async fn reset_records(target: &Target<'_>) -> Result<Vec<(String, String)>, StoreError> {
    let mut conn = connection(target)?;
    let mut records = Vec::new();
    for prefix in partition_prefixes(target.namespace, target.partitions) {
        let record: Option<String> = bounded(
            target,
            "read reset",
            redis::cmd("HGET")
                .arg(format!("{prefix}m"))
                .arg("reset")
                .query_async(&mut conn),
        )
        .await?;
        if let Some(record) = record {
            records.push((prefix, record));
        }
    }
    Ok(records)
}

/// Acknowledges the reset `record`: removes it wherever it is still the
/// record (a newer reset is not acknowledged by an older word). Returns
/// how many partitions it released.
pub async fn acknowledge_reset(target: &Target<'_>, record: &str) -> Result<u64, StoreError> {
    let script = redis::Script::new(
        "if redis.call('HGET', KEYS[1], 'reset') == ARGV[1] then \
           return redis.call('HDEL', KEYS[1], 'reset') end return 0",
    );
    let mut conn = connection(target)?;
    let mut released = 0;
    for prefix in partition_prefixes(target.namespace, target.partitions) {
        let mut invocation = script.prepare_invoke();
        invocation.key(format!("{prefix}m")).arg(record);
        let n: u64 = bounded(
            target,
            "acknowledge reset",
            invocation.invoke_async(&mut conn),
        )
        .await?;
        released += n;
    }
    Ok(released)
}
