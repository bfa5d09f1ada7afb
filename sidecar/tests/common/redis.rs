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
        timeout: Duration::from_secs(2),
        ..RedisOptions::new(URL.to_string(), super::unique(test))
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

/// A redis-server of the test's own, on a free port, in a directory of its
/// own: a test may stop, restart or flush it without touching the shared one.
/// Stopped when dropped; its directory goes with it.
pub struct OwnRedis {
    pub port: u16,
    dir: tempfile::TempDir,
    args: Vec<String>,
    child: Option<std::process::Child>,
}

impl OwnRedis {
    /// Starts `redis-server` with `args` added to a loopback-only, port and
    /// directory of its own; waits until it answers.
    pub async fn start(args: &[&str]) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let mut redis = Self {
            port,
            dir: tempfile::tempdir().expect("temp dir"),
            args: args.iter().map(|a| a.to_string()).collect(),
            child: None,
        };
        redis.restart().await;
        redis
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts the server again (stopping it first if it runs), on the same
    /// port and directory, with the same settings.
    pub async fn restart(&mut self) {
        self.shutdown().await;
        let child = std::process::Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .arg("--dir")
            .arg(self.dir.path())
            .args(&self.args)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("start redis-server (apt-get install redis-server)");
        self.child = Some(child);
        for _ in 0..100 {
            if let Ok(mut conn) = self.connection().await {
                if redis::cmd("PING")
                    .query_async::<String>(&mut conn)
                    .await
                    .is_ok()
                {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("own redis-server on {} did not answer", self.port);
    }

    /// Kills the server (SIGKILL), as a crash would.
    pub fn crash(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// A clean stop: `SHUTDOWN` writes what persistence is configured, then
    /// the process is reaped.
    pub async fn shutdown(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Ok(mut conn) = self.connection().await {
            let _: redis::RedisResult<()> = redis::cmd("SHUTDOWN").query_async(&mut conn).await;
        }
        for _ in 0..100 {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    pub async fn connection(&self) -> redis::RedisResult<redis::aio::MultiplexedConnection> {
        redis::Client::open(self.url())?
            .get_multiplexed_async_connection()
            .await
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
