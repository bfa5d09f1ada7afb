//! The real Redis on 127.0.0.1:6379, and stores scoped to one test.

use std::time::Duration;

use idemq_sidecar::store::redis::{RedisOptions, RedisStore};

pub const URL: &str = "redis://127.0.0.1:6379";
const START: &str =
    "redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save \"\" --appendonly no";

/// A Redis store whose keys live under a namespace unique to this test.
/// Panics with the command that starts Redis when it does not answer.
pub async fn store(test: &str) -> RedisStore {
    let store = RedisStore::new(RedisOptions {
        url: URL.to_string(),
        password: None,
        namespace: super::unique(test),
        timeout: Duration::from_secs(2),
    })
    .expect("valid redis options");
    use idemq_sidecar::store::KeyStore;
    if let Err(e) = store.ping().await {
        panic!("Redis does not answer on {URL} ({e}); start it with: {START}");
    }
    store
}

/// Deletes every key under `prefix`, and nothing else.
pub async fn cleanup(prefix: &str) {
    let keys = keys_under(prefix).await;
    let mut conn = connection().await;
    for chunk in keys.chunks(1000) {
        let _: i64 = redis::cmd("UNLINK")
            .arg(chunk)
            .query_async(&mut conn)
            .await
            .expect("UNLINK");
    }
}

/// Counts the keys under `prefix`.
pub async fn count(prefix: &str) -> usize {
    keys_under(prefix).await.len()
}

async fn connection() -> redis::aio::MultiplexedConnection {
    redis::Client::open(URL)
        .expect("valid url")
        .get_multiplexed_async_connection()
        .await
        .expect("redis answers")
}

async fn keys_under(prefix: &str) -> Vec<Vec<u8>> {
    let mut conn = connection().await;
    let pattern = format!("{}*", glob_escape(prefix));
    let mut cursor = 0u64;
    let mut keys = Vec::new();
    loop {
        let (next, batch): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut conn)
            .await
            .expect("SCAN");
        keys.extend(batch);
        if next == 0 {
            return keys;
        }
        cursor = next;
    }
}

/// Our prefixes contain `{` and `}`, which glob patterns treat literally, but
/// escape the glob metacharacters anyway so a prefix never matches more.
fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}
