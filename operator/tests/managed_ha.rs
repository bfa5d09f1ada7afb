//! The managed store with replicas, run for real: the start scripts the
//! operator renders into the StatefulSet run with `sh` as three "pods" on
//! loopback (each a redis-server and a redis-sentinel, on ports of their
//! own), the environment as the StatefulSet sets it but for the addresses,
//! directories and password. The primary's pod is killed (its Redis and its
//! Sentinel, SIGKILL); a replica must be promoted with the completions, and
//! the killed pod, started again by the same scripts, must come back as a
//! replica of the new primary.
//!
//! Needs `redis-server` and `redis-cli` (7.0 or later) on the PATH.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use idemq_operator::crd::{IdempotentConsumer, ManagedStore, StoreDurability};
use idemq_operator::render;
use idemq_sidecar::store::redis::{Durability, RedisOptions, RedisStore};
use idemq_sidecar::store::{Claim, KeyStore, Transition};
use k8s_openapi::api::core::v1::Container;

const PODS: usize = 3;
const PASSWORD: &str = "ha-test-password";
const LEASE: Duration = Duration::from_secs(30);
const RETENTION: Duration = Duration::from_secs(3600);

/// The resource of the test: the sample policy with two replicas.
fn replicated_policy() -> IdempotentConsumer {
    let yaml = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/policy.yaml"
    ))
    .expect("sample policy");
    let mut ic: IdempotentConsumer = serde_yaml::from_str(&yaml).expect("sample policy parses");
    ic.metadata.uid = Some("3f7c8a2e-0000-4000-8000-000000000002".to_string());
    ic.spec.store.managed = Some(ManagedStore {
        replicas: Some(2),
        ..ManagedStore::default()
    });
    ic
}

/// A rendered container's start script and its plain environment.
struct Rendered {
    script: String,
    env: BTreeMap<String, String>,
}

fn rendered(container: &Container) -> Rendered {
    let args = container.args.as_ref().expect("a start script");
    assert_eq!(
        container.command.as_deref(),
        Some(&["sh".to_string(), "-c".to_string()][..]),
        "{} starts through sh",
        container.name
    );
    Rendered {
        script: args[0].clone(),
        env: container
            .env
            .iter()
            .flatten()
            .filter_map(|e| Some((e.name.clone(), e.value.clone()?)))
            .collect(),
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// One "pod": its Redis and Sentinel processes, started by the rendered
/// scripts. Both are killed when it is dropped.
struct Pod {
    ordinal: usize,
    dir: PathBuf,
    redis_port: u16,
    sentinel_port: u16,
    redis: Option<Child>,
    sentinel: Option<Child>,
}

/// The whole set: what the scripts need to know of every pod.
struct Set {
    redis: Rendered,
    /// The Redis container's preStop hook.
    hand_over: Rendered,
    sentinel: Rendered,
    redis_nodes: String,
    sentinels: String,
    _root: tempfile::TempDir,
    pods: Vec<Pod>,
}

impl Set {
    fn new() -> Self {
        Self::for_policy(&replicated_policy())
    }

    fn for_policy(ic: &IdempotentConsumer) -> Self {
        let set = render::redis::stateful_set(ic).expect("renders");
        let pod = set
            .spec
            .and_then(|s| s.template.spec)
            .expect("a pod template");
        // In memory where the machine has it: Redis and Sentinel fsync
        // their files, which a busy disk (a build beside the tests) can
        // hold up for many seconds.
        let shm = std::path::Path::new("/dev/shm");
        let root = if shm.is_dir() {
            tempfile::tempdir_in(shm)
        } else {
            tempfile::tempdir()
        }
        .expect("temp dir");
        let pods: Vec<Pod> = (0..PODS)
            .map(|ordinal| {
                let dir = root.path().join(format!("pod-{ordinal}"));
                for sub in ["data", "sentinel"] {
                    std::fs::create_dir_all(dir.join(sub)).expect("pod directories");
                }
                Pod {
                    ordinal,
                    dir,
                    redis_port: free_port(),
                    sentinel_port: free_port(),
                    redis: None,
                    sentinel: None,
                }
            })
            .collect();
        let list = |port: fn(&Pod) -> u16| {
            pods.iter()
                .map(|p| format!("127.0.0.1:{}", port(p)))
                .collect::<Vec<_>>()
                .join(" ")
        };
        let redis = rendered(&pod.containers[0]);
        let hook = pod.containers[0]
            .lifecycle
            .as_ref()
            .and_then(|l| l.pre_stop.as_ref()?.exec.as_ref()?.command.clone())
            .expect("the Redis container has a preStop exec hook");
        assert_eq!(hook[..2], ["sh", "-c"], "the hook runs through sh");
        Self {
            hand_over: Rendered {
                script: hook[2].clone(),
                env: redis.env.clone(),
            },
            redis,
            sentinel: rendered(&pod.containers[1]),
            redis_nodes: list(|p| p.redis_port),
            sentinels: list(|p| p.sentinel_port),
            _root: root,
            pods,
        }
    }

    /// Runs `what`'s script for pod `ordinal` as the kubelet would, with
    /// loopback addresses instead of the pods' names.
    fn spawn(&self, what: &Rendered, ordinal: usize, log: &str) -> Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.pods[ordinal].dir.join(log))
            .expect("log file");
        self.command(what, ordinal)
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .spawn()
            .expect("start sh (redis-server and redis-cli must be on the PATH)")
    }

    /// Pod `ordinal`'s preStop hook, run to its end: its exit status and
    /// output.
    async fn run_hand_over(&self, ordinal: usize) -> std::process::Output {
        let mut command = self.command(&self.hand_over, ordinal);
        tokio::task::spawn_blocking(move || command.output().expect("run the preStop hook"))
            .await
            .expect("the hook's thread")
    }

    /// `what`'s script for pod `ordinal`, with the pod's environment.
    fn command(&self, what: &Rendered, ordinal: usize) -> Command {
        let pod = &self.pods[ordinal];
        let mut command = Command::new("sh");
        command
            .arg("-c")
            .arg(&what.script)
            .envs(&what.env)
            .env("POD_NAME", format!("orders-idemq-redis-{ordinal}"))
            .env("REDIS_PASSWORD", PASSWORD)
            .env("IDEMQ_REDIS_NODES", &self.redis_nodes)
            .env("IDEMQ_SENTINELS", &self.sentinels)
            .env("IDEMQ_DATA_DIR", pod.dir.join("data"))
            .env("IDEMQ_SENTINEL_DIR", pod.dir.join("sentinel"));
        command
    }

    async fn start_redis(&mut self, ordinal: usize) {
        let child = self.spawn(&self.redis, ordinal, "redis.log");
        self.pods[ordinal].redis = Some(child);
        let port = self.pods[ordinal].redis_port;
        assert!(
            wait_for(Duration::from_secs(20), async || { ping(port).await }).await,
            "pod {ordinal}'s Redis did not answer; its log:\n{}",
            self.pods[ordinal].log("redis.log")
        );
    }

    async fn start_sentinel(&mut self, ordinal: usize) {
        let child = self.spawn(&self.sentinel, ordinal, "sentinel.log");
        self.pods[ordinal].sentinel = Some(child);
        let port = self.pods[ordinal].sentinel_port;
        assert!(
            wait_for(Duration::from_secs(20), async || { ping(port).await }).await,
            "pod {ordinal}'s Sentinel did not answer; its log:\n{}",
            self.pods[ordinal].log("sentinel.log")
        );
    }

    /// Pod `ordinal` re-created: its Redis and Sentinel start together, as
    /// a pod's containers do, so the Redis may find its own Sentinel not
    /// listening yet.
    async fn recreate(&mut self, ordinal: usize) {
        let redis = self.spawn(&self.redis, ordinal, "redis.log");
        let sentinel = self.spawn(&self.sentinel, ordinal, "sentinel.log");
        let pod = &mut self.pods[ordinal];
        pod.redis = Some(redis);
        pod.sentinel = Some(sentinel);
        for (what, port) in [("Redis", pod.redis_port), ("Sentinel", pod.sentinel_port)] {
            assert!(
                wait_for(Duration::from_secs(20), async || ping(port).await).await,
                "pod {ordinal}'s {what} did not answer; its logs:\n{}\n{}",
                pod.log("redis.log"),
                pod.log("sentinel.log")
            );
        }
    }

    /// Every pod, in order, as a StatefulSet starts them (the next one
    /// once the one before answers).
    async fn start(&mut self) {
        for ordinal in 0..PODS {
            self.start_redis(ordinal).await;
            self.start_sentinel(ordinal).await;
        }
    }

    /// Every pod started, and the Sentinels agreeing on the set.
    async fn start_agreed(&mut self) {
        self.start().await;
        assert!(
            wait_for(Duration::from_secs(60), async || self
                .sentinels_agree()
                .await)
            .await,
            "the Sentinels did not find the replicas and each other; the pods' Sentinel and Redis logs:\n{}",
            self.pods
                .iter()
                .map(|pod| format!("{}\n{}", pod.log("sentinel.log"), pod.log("redis.log")))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }

    /// The sidecar's own store client, through the Sentinels, as the
    /// operator configures it for a managed store with replicas.
    fn store(&self) -> RedisStore {
        RedisStore::new(RedisOptions {
            sentinel: Some(idemq_operator::crd::MANAGED_PRIMARY.to_string()),
            password: Some(PASSWORD.to_string()),
            durability: Durability::Replicated,
            timeout: Duration::from_secs(1),
            ..RedisOptions::new(self.sentinel_urls(), "shop.orders")
        })
        .expect("store options")
    }

    fn sentinel_urls(&self) -> String {
        self.pods
            .iter()
            .map(|p| format!("redis://127.0.0.1:{}", p.sentinel_port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The primary's port as the first Sentinel that answers names it.
    async fn primary_named(&self) -> Option<u16> {
        for pod in &self.pods {
            let answer: Option<Vec<String>> = query(
                pod.sentinel_port,
                redis::cmd("SENTINEL")
                    .arg("GET-MASTER-ADDR-BY-NAME")
                    .arg(idemq_operator::crd::MANAGED_PRIMARY),
            )
            .await;
            if let Some(port) = answer.and_then(|a| a.get(1)?.parse().ok()) {
                return Some(port);
            }
        }
        None
    }

    /// Whether every Sentinel knows the two replicas and the two other
    /// Sentinels: they can agree on a failover.
    async fn sentinels_agree(&self) -> bool {
        for pod in &self.pods {
            for (kind, expected) in [("REPLICAS", PODS - 1), ("SENTINELS", PODS - 1)] {
                let known: Option<Vec<redis::Value>> = query(
                    pod.sentinel_port,
                    redis::cmd("SENTINEL")
                        .arg(kind)
                        .arg(idemq_operator::crd::MANAGED_PRIMARY),
                )
                .await;
                if known.map(|k| k.len()) != Some(expected) {
                    return false;
                }
            }
        }
        true
    }
}

impl Pod {
    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join(name)).unwrap_or_default()
    }

    /// Its Redis alone lost (SIGKILL); its Sentinel stays.
    fn kill_redis(&mut self) {
        if let Some(mut child) = self.redis.take() {
            child.kill().expect("kill");
            child.wait().expect("reap");
        }
    }

    /// The pod lost with its node: SIGKILL of its Redis and its Sentinel.
    fn kill(&mut self) {
        for mut child in [self.redis.take(), self.sentinel.take()]
            .into_iter()
            .flatten()
        {
            child.kill().expect("kill");
            child.wait().expect("reap");
        }
    }

    /// `ROLE`: "master", or "slave" with the primary's port.
    async fn role(&self) -> Option<(String, Option<u16>)> {
        let role: Vec<redis::Value> = query(self.redis_port, &redis::cmd("ROLE")).await?;
        let text = |v: &redis::Value| redis::from_redis_value_ref::<String>(v).ok();
        let kind = text(role.first()?)?;
        let primary_port = match kind.as_str() {
            "slave" => role
                .get(2)
                .and_then(|v| redis::from_redis_value_ref::<u16>(v).ok()),
            _ => None,
        };
        Some((kind, primary_port))
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        for mut child in [self.redis.take(), self.sentinel.take()]
            .into_iter()
            .flatten()
        {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

async fn query<T: redis::FromRedisValue>(port: u16, cmd: &redis::Cmd) -> Option<T> {
    let url = format!("redis://:{PASSWORD}@127.0.0.1:{port}");
    let mut conn = tokio::time::timeout(
        Duration::from_secs(2),
        redis::Client::open(url)
            .ok()?
            .get_multiplexed_async_connection(),
    )
    .await
    .ok()?
    .ok()?;
    tokio::time::timeout(Duration::from_secs(2), cmd.query_async(&mut conn))
        .await
        .ok()?
        .ok()
}

async fn ping(port: u16) -> bool {
    query::<String>(port, &redis::cmd("PING")).await.as_deref() == Some("PONG")
}

async fn wait_for(limit: Duration, mut check: impl AsyncFnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

fn assert_tools() {
    for tool in ["redis-server", "redis-cli"] {
        let found = Command::new(tool)
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            found,
            "{tool} is not on the PATH: apt-get install redis-server (7.0 or later)"
        );
    }
}

/// Claims and completes `order-0` … `order-<n-1>`, each confirmed by a
/// replica.
async fn complete_orders(store: &RedisStore, n: usize) {
    for i in 0..n {
        let key = format!("order-{i}");
        let token = match store
            .claim(&key, Some("fp"), LEASE, RETENTION)
            .await
            .expect("claim")
        {
            Claim::Acquired { token } => token,
            other => panic!("expected to acquire {key}, got {other:?}"),
        };
        let done = store.complete(&key, &token, RETENTION).await;
        assert_eq!(done.expect("a replica confirms"), Transition::Done);
    }
}

/// How many of `order-0` … `order-<n-1>` a claim finds completed.
async fn completed_orders(store: &RedisStore, n: usize) -> usize {
    let mut kept = 0;
    for i in 0..n {
        // The first calls after a failover may still reach the lost primary.
        let mut answer = None;
        for _ in 0..50 {
            match store
                .claim(&format!("order-{i}"), Some("fp"), LEASE, RETENTION)
                .await
            {
                Ok(claim) => {
                    answer = Some(claim);
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
        if answer == Some(Claim::Completed) {
            kept += 1;
        }
    }
    kept
}

fn log_lines(pod: &Pod, file: &str, pattern: &str) -> Vec<String> {
    pod.log(file)
        .lines()
        .filter(|l| l.contains(pattern))
        .map(str::to_string)
        .collect()
}

#[tokio::test]
async fn a_lost_primary_is_replaced_without_losing_replicated_completions_and_comes_back_as_a_replica(
) {
    assert_tools();
    let mut set = Set::new();
    set.start_agreed().await;
    let first = set.pods[0].redis_port;
    assert_eq!(set.pods[0].role().await, Some(("master".into(), None)));
    for pod in &set.pods[1..] {
        assert_eq!(
            pod.role().await,
            Some(("slave".into(), Some(first))),
            "pod {} starts as a replica of pod 0",
            pod.ordinal
        );
    }

    let store = set.store();
    const COMPLETED: usize = 200;
    complete_orders(&store, COMPLETED).await;

    set.pods[0].kill();
    let killed = Instant::now();
    let promoted = wait_for(
        Duration::from_secs(60),
        async || matches!(set.primary_named().await, Some(port) if port != first),
    )
    .await;
    let failover = killed.elapsed();
    assert!(
        promoted,
        "no replica was promoted within 60 s; pod 1's Sentinel log:\n{}",
        set.pods[1].log("sentinel.log")
    );
    let new_primary = set.primary_named().await.expect("a primary");
    let promoted_pod = set
        .pods
        .iter()
        .position(|p| p.redis_port == new_primary)
        .expect("the new primary is one of the pods");
    assert!(
        wait_for(Duration::from_secs(20), async || {
            set.pods[promoted_pod].role().await.map(|r| r.0).as_deref() == Some("master")
        })
        .await,
        "pod {promoted_pod} is named but not promoted"
    );

    let kept = completed_orders(&store, COMPLETED).await;

    // Pod 0 again, by the same scripts: the other Sentinels name the new
    // primary to its Sentinel and to its Redis.
    set.recreate(0).await;
    let rejoined = wait_for(Duration::from_secs(20), async || {
        set.pods[0].role().await == Some(("slave".into(), Some(new_primary)))
    })
    .await;
    let role = set.pods[0].role().await;
    let decision = log_lines(&set.pods[0], "redis.log", "starting 127.0.0.1");
    println!(
        "managed store with replicas: pod {} promoted {:.1} s after the primary's pod was killed \
         (down-after 5 s); completions kept {kept}/{COMPLETED}; resets {}; \
         pod 0 restarted with ROLE {} (its script: {})",
        promoted_pod,
        failover.as_secs_f64(),
        store.resets(),
        match &role {
            Some((kind, Some(port))) => format!("{kind} of port {port}"),
            Some((kind, None)) => kind.clone(),
            None => "none (no answer)".to_string(),
        },
        decision
            .last()
            .map(String::as_str)
            .unwrap_or("no decision logged"),
    );
    assert_eq!(kept, COMPLETED, "every replicated completion survives");
    assert_eq!(store.resets(), 0, "a failover is not a reset");
    assert!(
        failover < Duration::from_secs(30),
        "the failover took {failover:?}"
    );
    assert!(
        rejoined,
        "pod 0 came back as {role:?}, not as a replica of {new_primary}; its log:\n{}",
        set.pods[0].log("redis.log")
    );
    // And it stays one: nothing promotes it behind the Sentinels' back.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let masters = {
        let mut masters = Vec::new();
        for pod in &set.pods {
            if pod.role().await.map(|r| r.0).as_deref() == Some("master") {
                masters.push(pod.ordinal);
            }
        }
        masters
    };
    assert_eq!(
        masters,
        [promoted_pod],
        "exactly one primary after the restart"
    );
}

/// A pod stopped on purpose (a drain, a rolling update): the Redis
/// container's preStop hook. On a replica's pod it changes nothing; on the
/// primary's it has the Sentinels fail the primary over while that Redis
/// still runs, so the sidecars move at once instead of after down-after
/// (5 s), and every replicated completion is on the new primary.
#[tokio::test]
async fn a_primary_stopped_on_purpose_hands_over_before_it_stops() {
    assert_tools();
    let mut set = Set::new();
    set.start_agreed().await;
    let first = set.pods[0].redis_port;
    let store = set.store();
    const COMPLETED: usize = 100;
    complete_orders(&store, COMPLETED).await;

    let replica = set.run_hand_over(2).await;
    let replica_said = String::from_utf8_lossy(&replica.stdout).to_string();
    assert!(replica.status.success(), "{replica_said}");
    assert!(
        replica_said.contains("nothing to hand over"),
        "{replica_said}"
    );
    assert_eq!(
        set.primary_named().await,
        Some(first),
        "a replica's stop moves nothing"
    );

    let started = Instant::now();
    let primary = set.run_hand_over(0).await;
    let took = started.elapsed();
    let said = String::from_utf8_lossy(&primary.stdout).to_string();
    assert!(primary.status.success(), "{said}");
    let named = set.primary_named().await;
    // Named while pod 0's Redis still runs: the hand-over, not down-after.
    let role_before_stop = set.pods[0].role().await;
    set.pods[0].kill();

    let kept = completed_orders(&store, COMPLETED).await;
    println!(
        "hand-over: the hook took {:.1} s; primary :{first} -> {named:?}; the old primary was \
         {role_before_stop:?} when it stopped; completions kept {kept}/{COMPLETED}; resets {}; \
         its output:\n{said}",
        took.as_secs_f64(),
        store.resets()
    );
    assert!(
        said.contains("fails 127.0.0.1") && said.contains("is the primary"),
        "a Sentinel took the failover and named another primary:\n{said}"
    );
    assert!(
        matches!(named, Some(port) if port != first),
        "another primary is named before pod 0 stops: {named:?}"
    );
    assert_eq!(
        role_before_stop.map(|r| r.0).as_deref(),
        Some("slave"),
        "the old primary is a replica when it stops"
    );
    assert_eq!(
        kept, COMPLETED,
        "every replicated completion is on the new primary"
    );
    assert_eq!(store.resets(), 0, "a hand-over is not a reset");
}

/// `durability: replicated` on the managed store: a primary that no replica
/// has acknowledged for 4 s refuses writes (`min-replicas-to-write`), so a
/// sidecar cut off with it keeps its completions and pauses, instead of
/// having them acknowledged where a failover would discard them. Once a
/// replica is back, it writes again.
#[tokio::test]
async fn with_replicated_durability_a_primary_without_replicas_refuses_writes() {
    assert_tools();
    let mut ic = replicated_policy();
    ic.spec.store.durability = Some(StoreDurability::Replicated);
    let mut set = Set::for_policy(&ic);
    set.start_agreed().await;
    let store = set.store();
    let mut n = 0;
    let mut claim_next = async || {
        n += 1;
        store
            .claim(&format!("order-{n}"), None, LEASE, RETENTION)
            .await
            .map_err(|e| e.to_string())
    };
    assert!(claim_next().await.is_ok(), "the store takes writes");

    // Both replicas' Redis lost; the primary and every Sentinel stay, so
    // there is no failover: only the primary can refuse.
    set.pods[1].kill_redis();
    set.pods[2].kill_redis();
    let cut = Instant::now();
    let mut refusal = String::new();
    let refused = wait_for(Duration::from_secs(20), async || match claim_next().await {
        Err(e) => {
            refusal = e;
            refusal.contains("NOREPLICAS")
        }
        Ok(_) => false,
    })
    .await;
    let refused_after = cut.elapsed();
    set.start_redis(1).await;
    let back = Instant::now();
    let resumed = wait_for(Duration::from_secs(20), async || claim_next().await.is_ok()).await;
    println!(
        "replicated durability: writes refused {:.1} s after both replicas were lost ({refusal}); \
         taken again {:.1} s after one came back",
        refused_after.as_secs_f64(),
        back.elapsed().as_secs_f64()
    );
    assert!(refused, "the primary went on taking writes: {refusal}");
    assert!(resumed, "writes resume once a replica is back");
    assert_eq!(set.primary_named().await, Some(set.pods[0].redis_port));
}

/// The scripts refuse to run with an ordinal outside the lists, rather than
/// start a Redis that announces a wrong name.
#[test]
fn a_pod_outside_the_lists_does_not_start() {
    let set = Set::new();
    let out = Command::new("sh")
        .arg("-c")
        .arg(&set.redis.script)
        .envs(&set.redis.env)
        .env("POD_NAME", "orders-idemq-redis-7")
        .env("REDIS_PASSWORD", PASSWORD)
        .env("IDEMQ_REDIS_NODES", &set.redis_nodes)
        .env("IDEMQ_SENTINELS", "")
        .output()
        .expect("run sh");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no entry 7"), "{stderr}");
}
