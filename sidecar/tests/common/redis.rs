//! The real Redis on 127.0.0.1:6379 and the local Redis Cluster on
//! 7000–7005 (both from `.ci/services.sh`), stores scoped to one test, and
//! servers a test owns (one node, or a whole Cluster it may break).

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
    unlink_under(&mut connection(URL).await, prefix).await;
}

/// Counts the keys under `prefix`.
pub async fn count(prefix: &str) -> usize {
    keys_under(&mut connection(URL).await, prefix).await.len()
}

pub async fn connection(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .expect("valid url")
        .get_multiplexed_async_connection()
        .await
        .unwrap_or_else(|e| panic!("redis answers on {url}: {e}"))
}

/// Unlinks the keys under `prefix` one by one: on a Cluster node a command
/// may not name keys of two slots.
async fn unlink_under(conn: &mut redis::aio::MultiplexedConnection, prefix: &str) {
    let keys = keys_under(conn, prefix).await;
    for chunk in keys.chunks(1000) {
        let mut pipe = redis::pipe();
        for key in chunk {
            pipe.cmd("UNLINK").arg(key).ignore();
        }
        let _: () = pipe.query_async(conn).await.expect("UNLINK");
    }
}

async fn keys_under(conn: &mut redis::aio::MultiplexedConnection, prefix: &str) -> Vec<Vec<u8>> {
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
            .query_async(conn)
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
        assert!(
            answers_ping(self.port).await,
            "own redis-server on {} did not answer",
            self.port
        );
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

/// A Redis Sentinel of the test's own, monitoring one primary under `name`.
/// Stopped when dropped.
pub struct OwnSentinel {
    pub port: u16,
    _dir: tempfile::TempDir,
    child: std::process::Child,
}

impl OwnSentinel {
    /// Starts `redis-server --sentinel` watching `primary` as `name`, with a
    /// quorum of `quorum` and a primary judged down after one second.
    pub async fn start(name: &str, primary: u16, quorum: u32) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let dir = tempfile::tempdir().expect("temp dir");
        // Sentinel rewrites its configuration file, so it has one of its own.
        let conf = dir.path().join("sentinel.conf");
        std::fs::write(
            &conf,
            format!(
                "port {port}\nbind 127.0.0.1\ndir {dir}\n\
                 sentinel monitor {name} 127.0.0.1 {primary} {quorum}\n\
                 sentinel down-after-milliseconds {name} 1000\n\
                 sentinel failover-timeout {name} 10000\n\
                 sentinel parallel-syncs {name} 1\n",
                dir = dir.path().display()
            ),
        )
        .expect("write sentinel.conf");
        let child = std::process::Command::new("redis-server")
            .arg(&conf)
            .arg("--sentinel")
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("start redis-server --sentinel (apt-get install redis-server)");
        assert!(
            answers_ping(port).await,
            "own sentinel on {port} did not answer"
        );
        Self {
            port,
            _dir: dir,
            child,
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The primary's port as this Sentinel names it now.
    pub async fn primary(&self, name: &str) -> Option<u16> {
        let mut conn = redis::Client::open(self.url())
            .ok()?
            .get_multiplexed_async_connection()
            .await
            .ok()?;
        let addr: Vec<String> = redis::cmd("SENTINEL")
            .arg("GET-MASTER-ADDR-BY-NAME")
            .arg(name)
            .query_async(&mut conn)
            .await
            .ok()?;
        addr.get(1)?.parse().ok()
    }

    /// How many replicas and other Sentinels this Sentinel knows of.
    pub async fn knows(&self, name: &str) -> (usize, usize) {
        let Ok(conn) = redis::Client::open(self.url())
            .expect("url")
            .get_multiplexed_async_connection()
            .await
        else {
            return (0, 0);
        };
        let count = |kind: &'static str| {
            let cmd = redis::cmd("SENTINEL").arg(kind).arg(name).clone();
            let mut conn = conn.clone();
            async move {
                cmd.query_async::<Vec<redis::Value>>(&mut conn)
                    .await
                    .map(|v| v.len())
                    .unwrap_or(0)
            }
        };
        (count("REPLICAS").await, count("SENTINELS").await)
    }
}

impl Drop for OwnSentinel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The local Redis Cluster of `.ci/services.sh`: three primaries and their
/// replicas on 7000–7005.
pub mod cluster {
    use std::time::Duration;

    use idemq_sidecar::store::redis::{RedisOptions, RedisStore};

    /// Seed nodes: any one answering is enough.
    pub const SEEDS: &str = "redis://127.0.0.1:7000,redis://127.0.0.1:7001,redis://127.0.0.1:7002";
    const PORTS: [u16; 6] = [7000, 7001, 7002, 7003, 7004, 7005];
    /// Hash tags of a test's consumer: enough to land on every primary.
    pub const PARTITIONS: u16 = 12;
    const START: &str = "bash -c 'source .ci/services.sh && ensure_redis_cluster'";

    /// A store on the Cluster whose keys live under a namespace unique to
    /// this test, spread over [`PARTITIONS`] slots. Panics with the command
    /// that starts the Cluster when it does not answer.
    pub async fn store(test: &str) -> RedisStore {
        let store = RedisStore::new(RedisOptions {
            cluster: true,
            partitions: PARTITIONS,
            timeout: Duration::from_secs(2),
            ..RedisOptions::new(SEEDS, super::super::unique(test))
        })
        .expect("valid redis options");
        use idemq_sidecar::store::KeyStore;
        if let Err(e) = store.ping().await {
            panic!("the Redis Cluster does not answer on {SEEDS} ({e}); start it with: {START}");
        }
        store
    }

    /// The ports of the Cluster's primaries now.
    pub async fn primaries() -> Vec<u16> {
        super::primaries(&PORTS).await
    }

    /// Deletes every key under `prefix` on every primary, and nothing else.
    pub async fn cleanup(prefix: &str) {
        for port in primaries().await {
            let mut conn = super::connection(&format!("redis://127.0.0.1:{port}")).await;
            super::unlink_under(&mut conn, prefix).await;
        }
    }

    /// The port of the primary serving the slot of `key` now.
    pub async fn primary_of(key: &str) -> u16 {
        super::serving(PORTS[0], key)
            .await
            .unwrap_or_else(|| panic!("no live primary serves the slot of {key}"))
    }

    /// Counts the keys under `prefix` on each primary: `(port, count)`.
    pub async fn count_per_primary(prefix: &str) -> Vec<(u16, usize)> {
        let mut counts = Vec::new();
        for port in primaries().await {
            let mut conn = super::connection(&format!("redis://127.0.0.1:{port}")).await;
            counts.push((port, super::keys_under(&mut conn, prefix).await.len()));
        }
        counts
    }
}

/// Those of `ports` whose node is a primary now (`ROLE` says `master`).
async fn primaries(ports: &[u16]) -> Vec<u16> {
    let mut out = Vec::new();
    for &port in ports {
        let Ok(client) = redis::Client::open(format!("redis://127.0.0.1:{port}")) else {
            continue;
        };
        let Ok(mut conn) = client.get_multiplexed_async_connection().await else {
            continue;
        };
        let role: redis::RedisResult<Vec<redis::Value>> =
            redis::cmd("ROLE").query_async(&mut conn).await;
        if let Ok(role) = role {
            if matches!(role.first(), Some(redis::Value::BulkString(b)) if b == b"master") {
                out.push(port);
            }
        }
    }
    out
}

/// A Redis Cluster of the test's own: three primaries and three replicas on
/// `base`..`base+5` (their bus ports 10000 above), each in a directory of
/// its own, with a short node timeout so a killed primary is replaced within
/// seconds. A test may kill its nodes without touching the shared Cluster.
/// Stopped when dropped.
pub struct OwnCluster {
    pub ports: Vec<u16>,
    children: Vec<(u16, std::process::Child)>,
    _dir: tempfile::TempDir,
}

impl OwnCluster {
    pub async fn start(base: u16) -> Self {
        let ports: Vec<u16> = (base..base + 6).collect();
        for port in &ports {
            assert!(
                std::net::TcpListener::bind(("127.0.0.1", *port)).is_ok()
                    && std::net::TcpListener::bind(("127.0.0.1", *port + 10000)).is_ok(),
                "port {port} or its bus port is taken: the test's own Cluster needs {base}-{}",
                base + 5
            );
        }
        let dir = tempfile::tempdir().expect("temp dir");
        let children = ports
            .iter()
            .map(|port| {
                let node_dir = dir.path().join(port.to_string());
                std::fs::create_dir_all(&node_dir).expect("node dir");
                let child = std::process::Command::new("redis-server")
                    .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                    .args(["--cluster-enabled", "yes", "--cluster-node-timeout", "1000"])
                    // A replica's first sync starts at once, not 5 s later.
                    .args(["--repl-diskless-sync-delay", "0"])
                    .args(["--save", "", "--appendonly", "no"])
                    .arg("--dir")
                    .arg(&node_dir)
                    .stdout(std::process::Stdio::null())
                    .spawn()
                    .expect("start redis-server (apt-get install redis-server)");
                (*port, child)
            })
            .collect();
        let cluster = Self {
            ports,
            children,
            _dir: dir,
        };
        for port in &cluster.ports {
            assert!(
                answers_ping(*port).await,
                "own cluster node on {port} did not answer"
            );
        }
        let created = tokio::process::Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(cluster.ports.iter().map(|p| format!("127.0.0.1:{p}")))
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdout(std::process::Stdio::null())
            .status()
            .await
            .expect("run redis-cli --cluster create");
        assert!(created.success(), "redis-cli --cluster create failed");
        assert!(
            cluster.wait_until_ok(3, Duration::from_secs(30)).await,
            "the test's own Cluster did not become ready"
        );
        cluster
    }

    /// Seed nodes, for a store's URL.
    pub fn seeds(&self) -> String {
        self.ports[..3]
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Waits until a live node says `cluster_state:ok` and at least
    /// `replicas` replicas are in sync with their primaries (a replica that
    /// never finished its first sync cannot take over).
    pub async fn wait_until_ok(&self, replicas: usize, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        while tokio::time::Instant::now() < deadline {
            let mut ok = false;
            let mut online = 0;
            for (port, _) in &self.children {
                let Ok(mut conn) = connection_to(*port).await else {
                    continue;
                };
                let info: redis::RedisResult<String> = redis::cmd("CLUSTER")
                    .arg("INFO")
                    .query_async(&mut conn)
                    .await;
                ok |= info.is_ok_and(|i| i.contains("cluster_state:ok"));
                let replication: redis::RedisResult<String> = redis::cmd("INFO")
                    .arg("replication")
                    .query_async(&mut conn)
                    .await;
                online += replication.map_or(0, |r| {
                    r.lines()
                        .filter(|l| l.starts_with("slave") && l.contains("state=online"))
                        .count()
                });
            }
            if ok && online >= replicas {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        false
    }

    /// The port of the primary serving the slot of `key` now.
    pub async fn primary_of(&self, key: &str) -> u16 {
        let (port, _) = self.children.first().expect("a live node");
        serving(*port, key)
            .await
            .unwrap_or_else(|| panic!("no live primary serves the slot of {key}"))
    }

    /// Waits until a primary other than `old` serves the slot of `key` (a
    /// replica took over), and says which one and after how long.
    pub async fn wait_for_takeover(
        &self,
        key: &str,
        old: u16,
        timeout: Duration,
    ) -> Option<(u16, Duration)> {
        let start = tokio::time::Instant::now();
        while start.elapsed() < timeout {
            let (port, _) = self.children.first().expect("a live node");
            if let Some(new) = serving(*port, key).await.filter(|p| *p != old) {
                return Some((new, start.elapsed()));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        None
    }

    /// The port of a replica of the primary on `primary`, once `CLUSTER
    /// NODES` shows one (gossip may lag the replication itself), within 10 s.
    pub async fn replica_of(&self, primary: u16) -> Option<u16> {
        for _ in 0..100 {
            if let Some(replica) = self.replica_now(primary).await {
                return Some(replica);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        None
    }

    async fn replica_now(&self, primary: u16) -> Option<u16> {
        let (port, _) = self.children.first().expect("a live node");
        let mut conn = connection_to(*port).await.expect("a node answers");
        let nodes: String = redis::cmd("CLUSTER")
            .arg("NODES")
            .query_async(&mut conn)
            .await
            .expect("CLUSTER NODES");
        let port_of = |addr: &str| {
            addr.split('@')
                .next()
                .and_then(|a| a.rsplit(':').next())
                .and_then(|p| p.parse::<u16>().ok())
        };
        // <id> <ip:port@bus> <flags> <primary id> ...
        let lines: Vec<Vec<&str>> = nodes.lines().map(|l| l.split(' ').collect()).collect();
        let id = lines
            .iter()
            .find(|f| port_of(f[1]) == Some(primary))
            .map(|f| f[0])?;
        lines
            .iter()
            .find(|f| f[2].contains("slave") && f[3] == id)
            .and_then(|f| port_of(f[1]))
    }

    /// SIGKILL of the node on `port`, as a crash would.
    pub fn kill(&mut self, port: u16) {
        if let Some(i) = self.children.iter().position(|(p, _)| *p == port) {
            let (_, mut child) = self.children.remove(i);
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The port of the primary serving the slot of `key` now, as the node on
/// `port` tells (`CLUSTER NODES`); none while that primary is failing.
async fn serving(port: u16, key: &str) -> Option<u16> {
    let mut conn = connection_to(port).await.expect("a node answers");
    let slot: u16 = redis::cmd("CLUSTER")
        .arg("KEYSLOT")
        .arg(key)
        .query_async(&mut conn)
        .await
        .expect("CLUSTER KEYSLOT");
    let nodes: String = redis::cmd("CLUSTER")
        .arg("NODES")
        .query_async(&mut conn)
        .await
        .expect("CLUSTER NODES");
    let serves = |range: &str| {
        let mut bounds = range.split('-').filter_map(|b| b.parse::<u16>().ok());
        match (bounds.next(), bounds.next()) {
            (Some(lo), Some(hi)) => (lo..=hi).contains(&slot),
            (Some(one), None) => one == slot,
            _ => false,
        }
    };
    for line in nodes.lines() {
        // <id> <ip:port@bus> <flags> <primary> <ping> <pong> <epoch> <state> <slots>...
        let fields: Vec<&str> = line.split(' ').collect();
        let primary = fields[2].contains("master") && !fields[2].contains("fail");
        if primary && fields[8..].iter().any(|r| serves(r)) {
            return fields[1]
                .split('@')
                .next()
                .and_then(|addr| addr.rsplit(':').next())
                .and_then(|p| p.parse().ok());
        }
    }
    None
}

/// Whether a server of the test's own on `port` answers PING within 5 s.
async fn answers_ping(port: u16) -> bool {
    for _ in 0..100 {
        if let Ok(mut conn) = connection_to(port).await {
            if redis::cmd("PING")
                .query_async::<String>(&mut conn)
                .await
                .is_ok()
            {
                return true;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

async fn connection_to(port: u16) -> redis::RedisResult<redis::aio::MultiplexedConnection> {
    redis::Client::open(format!("redis://127.0.0.1:{port}"))?
        .get_multiplexed_async_connection()
        .await
}

impl Drop for OwnCluster {
    fn drop(&mut self) {
        for (_, child) in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
