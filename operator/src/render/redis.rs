//! The managed key store: one Redis per consumer, with a generated password.
//!
//! Durable by default: a StatefulSet whose Redis writes an append-only file
//! (fsync every second, or on every write) to a PersistentVolumeClaim, with a
//! PodDisruptionBudget, so a restart, a drain or an upgrade keeps every
//! completed key. `ephemeral: true` keeps the former Deployment with an
//! emptyDir, which forgets everything when its pod goes.
//!
//! With `replicas` (2 or more) the StatefulSet runs 1 + replicas pods, each
//! with a Redis and a Sentinel: the Sentinels promote a replica when the
//! primary is lost, and the sidecars ask them where the primary is. The
//! Service is then headless, so every pod has a stable name
//! (`<set>-N.<set>.<namespace>.svc`) that Redis and Sentinel announce. The
//! start scripts (in `redis/`) read every address from the environment, so
//! a test runs them on loopback.
//!
//! The password is an input: the controller generates it once, keeps it in
//! the Secret, and reads it back on every later reconcile, so re-rendering never
//! changes it (a new password would cut every sidecar off).

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, StatefulSet, StatefulSetPersistentVolumeClaimRetentionPolicy,
    StatefulSetSpec,
};
use k8s_openapi::api::core::v1::{
    Affinity, Container, ContainerPort, EmptyDirVolumeSource, EnvVar, ExecAction, Lifecycle,
    LifecycleHandler, PersistentVolumeClaim, PersistentVolumeClaimSpec, PodAffinityTerm,
    PodAntiAffinity, PodSecurityContext, PodSpec, PodTemplateSpec, Probe, ResourceRequirements,
    Secret, Service, ServicePort, ServiceSpec, Volume, VolumeMount, VolumeResourceRequirements,
    WeightedPodAffinityTerm,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::ByteString;

use kube::ResourceExt;

use super::sidecar::{field_env, plain_env, restricted_security_context, secret_env};
use super::{owned_meta, RenderError};
use crate::crd::{AppendFsync, IdempotentConsumer, ManagedStore, StoreDurability, MANAGED_PRIMARY};
use crate::labels;

/// A fresh random password for a new managed Redis.
pub fn generate_password() -> String {
    use rand::distr::{Alphanumeric, SampleString};
    Alphanumeric.sample_string(&mut rand::rng(), 32)
}

pub fn secret(ic: &IdempotentConsumer, password: &str) -> Result<Secret, RenderError> {
    Ok(Secret {
        metadata: owned_meta(ic, labels::redis(ic), "redis")?,
        type_: Some("Opaque".to_string()),
        data: Some(BTreeMap::from([(
            labels::REDIS_PASSWORD_KEY.to_string(),
            ByteString(password.as_bytes().to_vec()),
        )])),
        ..Secret::default()
    })
}

/// The Service of the managed Redis: one address for the one Redis; with
/// replicas, headless, for the pods' own names. Their names exist before the
/// pods are ready (`publishNotReadyAddresses`): a starting Sentinel and
/// Redis look each other up by them.
pub fn service(ic: &IdempotentConsumer) -> Result<Service, RenderError> {
    let port = |name: &str, number: u16| ServicePort {
        name: Some(name.to_string()),
        port: i32::from(number),
        target_port: Some(IntOrString::String(name.to_string())),
        ..ServicePort::default()
    };
    let spec = if replicas(ic) > 0 {
        ServiceSpec {
            cluster_ip: Some("None".to_string()),
            publish_not_ready_addresses: Some(true),
            selector: Some(labels::redis_selector(ic)),
            ports: Some(vec![
                port("redis", labels::REDIS_PORT),
                port("sentinel", labels::SENTINEL_PORT),
            ]),
            ..ServiceSpec::default()
        }
    } else {
        ServiceSpec {
            selector: Some(labels::redis_selector(ic)),
            ports: Some(vec![port("redis", labels::REDIS_PORT)]),
            ..ServiceSpec::default()
        }
    };
    Ok(Service {
        metadata: owned_meta(ic, labels::redis(ic), "redis")?,
        spec: Some(spec),
        ..Service::default()
    })
}

/// Whether a Service is headless. Kubernetes cannot change a Service's
/// cluster IP in place: the controller re-creates the Service when the
/// rendered one differs in this from the one in the cluster.
pub fn is_headless(service: &Service) -> bool {
    service.spec.as_ref().and_then(|s| s.cluster_ip.as_deref()) == Some("None")
}

/// Redis replicas beside the primary (0: one Redis).
pub fn replicas(ic: &IdempotentConsumer) -> u8 {
    ic.spec.store.managed_replicas()
}

/// The stable host name of pod `ordinal` of the managed Redis, as Redis and
/// Sentinel announce it: with the namespace, so that the operator reaches it
/// from its own.
fn node_host(ic: &IdempotentConsumer, ordinal: u8) -> String {
    let set = labels::redis(ic);
    match ic.namespace() {
        Some(ns) => format!("{set}-{ordinal}.{set}.{ns}.svc"),
        None => format!("{set}-{ordinal}.{set}"),
    }
}

/// `host:port` of every pod's Redis (or Sentinel, with its port), in ordinal
/// order, separated by spaces: what the start scripts read.
fn node_list(ic: &IdempotentConsumer, port: u16) -> String {
    (0..=replicas(ic))
        .map(|ordinal| format!("{}:{port}", node_host(ic, ordinal)))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The Sentinels of a managed store with replicas, as the sidecar and the
/// operator are given them: URLs separated by commas, without the password
/// (the clients add the store's password, which the Sentinels ask for too).
pub fn sentinel_urls(ic: &IdempotentConsumer) -> String {
    (0..=replicas(ic))
        .map(|ordinal| {
            format!(
                "redis://{}:{}",
                node_host(ic, ordinal),
                labels::SENTINEL_PORT
            )
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// Whether the managed store keeps nothing on disk.
pub fn is_ephemeral(ic: &IdempotentConsumer) -> bool {
    ic.spec
        .store
        .managed
        .as_ref()
        .and_then(|m| m.ephemeral)
        .unwrap_or(false)
}

/// Completed keys a managed store is sized for when none are declared.
const DEFAULT_EXPECTED_KEYS: u64 = 1_000_000;
/// Bytes per retained key to plan for: the measured figure is under 32
/// (see the README); the margin covers in-progress claims and the per-window
/// bookkeeping.
const BYTES_PER_KEY: u64 = 48;
/// What Redis uses with no key at all, and the replication/AOF buffers.
const BASE_BYTES: u64 = 64 << 20;

/// The memory a managed Redis may hold (`--maxmemory`) and the memory its
/// pod requests: the data at the declared key count, plus its base; twice
/// that for the pod, since rewriting the append-only file forks Redis, and
/// the copy-on-write copy of a busy dataset approaches the dataset.
pub fn memory_for(expected_keys: u64) -> (u64, u64) {
    let maxmemory = BASE_BYTES + expected_keys.saturating_mul(BYTES_PER_KEY);
    (maxmemory, maxmemory.saturating_mul(2))
}

/// Requests of `cpu` and `memory`, and a limit of memory only (no CPU limit:
/// throttling a store delays every sidecar's calls).
fn resources(cpu: &str, memory: Quantity, memory_limit: Quantity) -> ResourceRequirements {
    ResourceRequirements {
        requests: Some(BTreeMap::from([
            ("cpu".to_string(), Quantity(cpu.to_string())),
            ("memory".to_string(), memory),
        ])),
        limits: Some(BTreeMap::from([("memory".to_string(), memory_limit)])),
        ..ResourceRequirements::default()
    }
}

fn mebibytes(bytes: u64) -> Quantity {
    Quantity(format!("{}Mi", bytes.div_ceil(1 << 20)))
}

/// The append-only file's fsync policy and the memory bound (`--maxmemory`)
/// of a durable Redis; no bound when the policy sets resources of its own.
fn durable_settings(managed: &ManagedStore) -> (&'static str, Option<u64>) {
    let fsync = match managed.append_fsync.clone().unwrap_or_default() {
        AppendFsync::Everysec => "everysec",
        AppendFsync::Always => "always",
    };
    let maxmemory = managed
        .resources
        .is_none()
        .then(|| memory_for(managed.expected_keys.unwrap_or(DEFAULT_EXPECTED_KEYS)).0);
    (fsync, maxmemory)
}

fn image(managed: &ManagedStore) -> String {
    managed
        .image
        .clone()
        .unwrap_or_else(|| labels::DEFAULT_REDIS_IMAGE.to_string())
}

/// The store's password, from the generated Secret: never in a manifest.
fn password_env(ic: &IdempotentConsumer) -> EnvVar {
    secret_env(
        "REDIS_PASSWORD",
        &labels::redis(ic),
        labels::REDIS_PASSWORD_KEY,
    )
}

/// A readiness probe that pings the Redis (or Sentinel) on `port`.
fn ping_probe(port: u16) -> Probe {
    Probe {
        exec: Some(ExecAction {
            command: Some(
                [
                    "sh".to_string(),
                    "-c".to_string(),
                    format!(
                        "redis-cli {}-a \"$REDIS_PASSWORD\" --no-auth-warning ping | grep -q PONG",
                        if port == labels::REDIS_PORT {
                            String::new()
                        } else {
                            format!("-p {port} ")
                        }
                    ),
                ]
                .to_vec(),
            ),
        }),
        period_seconds: Some(5),
        ..Probe::default()
    }
}

/// The Redis container. `durable` adds the append-only file and the memory
/// bound derived from the expected key count.
fn container(ic: &IdempotentConsumer, durable: bool) -> Container {
    let managed = ic.spec.store.managed.clone().unwrap_or_default();
    let (_, request) = memory_for(managed.expected_keys.unwrap_or(DEFAULT_EXPECTED_KEYS));
    let resources = managed.resources.clone().unwrap_or_else(|| {
        if durable {
            resources("100m", mebibytes(request), mebibytes(request))
        } else {
            resources("100m", Quantity("128Mi".into()), Quantity("512Mi".into()))
        }
    });
    let (command, args) = if durable {
        // One shell line, so that `yes` stays inside a string: YAML 1.1
        // readers (kubectl) turn a bare `yes` argument into a boolean. `exec`
        // makes Redis PID 1: SIGTERM reaches it, and it flushes the
        // append-only file before it exits (the clean shutdown).
        let (fsync, maxmemory) = durable_settings(&managed);
        let maxmemory = maxmemory
            .map(|bytes| format!(" --maxmemory {bytes}"))
            .unwrap_or_default();
        (
            Some(["sh", "-c"].map(String::from).to_vec()),
            Some(vec![format!(
                "exec redis-server --requirepass \"$REDIS_PASSWORD\" --dir /data \
                 --appendonly yes --appendfsync {fsync} --save '' \
                 --maxmemory-policy noeviction{maxmemory}"
            )]),
        )
    } else {
        // Dedup keys must never be evicted: a full store refuses writes
        // (the sidecar then fails closed) instead of forgetting keys. No
        // snapshots (`--save ""`); append-only is off by default. Arguments
        // avoid bare words like `no`, which YAML 1.1 readers (kubectl) turn
        // into booleans when they read `inject` output.
        (
            None,
            Some(
                [
                    "--requirepass",
                    "$(REDIS_PASSWORD)",
                    "--save",
                    "",
                    "--maxmemory-policy",
                    "noeviction",
                ]
                .map(String::from)
                .to_vec(),
            ),
        )
    };
    Container {
        name: "redis".to_string(),
        image: Some(image(&managed)),
        command,
        args,
        env: Some(vec![password_env(ic)]),
        ports: Some(vec![ContainerPort {
            name: Some("redis".to_string()),
            container_port: i32::from(labels::REDIS_PORT),
            ..ContainerPort::default()
        }]),
        readiness_probe: Some(ping_probe(labels::REDIS_PORT)),
        resources: Some(resources),
        // 999 is the redis user of the official image.
        security_context: Some(restricted_security_context(999)),
        volume_mounts: Some(vec![VolumeMount {
            name: "data".to_string(),
            mount_path: "/data".to_string(),
            ..VolumeMount::default()
        }]),
        ..Container::default()
    }
}

/// The start scripts of a managed store with replicas, each after the
/// functions they share. Files beside this one, so that they read (and are
/// checked) as shell.
const START_REDIS: &str = concat!(
    include_str!("redis/nodes.sh"),
    include_str!("redis/start-redis.sh")
);
const START_SENTINEL: &str = concat!(
    include_str!("redis/nodes.sh"),
    include_str!("redis/start-sentinel.sh")
);
const HAND_OVER: &str = concat!(
    include_str!("redis/nodes.sh"),
    include_str!("redis/hand-over.sh")
);
/// Where a Sentinel writes (and rewrites) its configuration file.
const SENTINEL_DIR: &str = "/sentinel";

/// What both start scripts read (see `redis/nodes.sh`): the pod's name,
/// whose ordinal is its place in the lists, every pod's Redis and Sentinel
/// by stable name, the monitored name, and the password.
fn node_env(ic: &IdempotentConsumer) -> Vec<EnvVar> {
    vec![
        password_env(ic),
        field_env("POD_NAME", "metadata.name"),
        plain_env("IDEMQ_PRIMARY_NAME", MANAGED_PRIMARY),
        plain_env("IDEMQ_REDIS_NODES", &node_list(ic, labels::REDIS_PORT)),
        plain_env("IDEMQ_SENTINELS", &node_list(ic, labels::SENTINEL_PORT)),
    ]
}

fn shell(script: &str) -> (Option<Vec<String>>, Option<Vec<String>>) {
    (
        Some(["sh", "-c"].map(String::from).to_vec()),
        Some(vec![script.to_string()]),
    )
}

/// The Redis container of a store with replicas: as the one durable Redis,
/// but started by the script that asks the Sentinels for its role, and
/// stopped after the script that hands the primary over (see
/// `redis/hand-over.sh`).
fn replicated_redis(ic: &IdempotentConsumer) -> Container {
    let managed = ic.spec.store.managed.clone().unwrap_or_default();
    let (fsync, maxmemory) = durable_settings(&managed);
    let mut env = node_env(ic);
    env.push(plain_env("IDEMQ_DATA_DIR", "/data"));
    env.push(plain_env("IDEMQ_APPENDFSYNC", fsync));
    // durability: replicated: a primary that has heard from no replica for
    // a few seconds (cut off, or its replicas gone) refuses writes, so the
    // sidecars keep their completions and pause instead of writing where a
    // failover would lose them.
    let replicated = ic.spec.store.durability == Some(StoreDurability::Replicated);
    env.push(plain_env(
        "IDEMQ_MIN_REPLICAS",
        if replicated { "1" } else { "0" },
    ));
    if let Some(bytes) = maxmemory {
        env.push(plain_env("IDEMQ_MAXMEMORY", &bytes.to_string()));
    }
    let (command, args) = shell(START_REDIS);
    Container {
        command,
        args,
        env: Some(env),
        lifecycle: Some(Lifecycle {
            pre_stop: Some(LifecycleHandler {
                exec: Some(ExecAction {
                    command: Some(["sh", "-c", HAND_OVER].map(String::from).to_vec()),
                }),
                ..LifecycleHandler::default()
            }),
            ..Lifecycle::default()
        }),
        ..container(ic, true)
    }
}

/// The Sentinel beside each Redis: same image, its configuration written at
/// start into an emptyDir, since the root filesystem is read-only.
fn sentinel(ic: &IdempotentConsumer) -> Container {
    let managed = ic.spec.store.managed.clone().unwrap_or_default();
    let mut env = node_env(ic);
    env.push(plain_env("IDEMQ_SENTINEL_DIR", SENTINEL_DIR));
    let (command, args) = shell(START_SENTINEL);
    Container {
        name: "sentinel".to_string(),
        image: Some(image(&managed)),
        command,
        args,
        env: Some(env),
        ports: Some(vec![ContainerPort {
            name: Some("sentinel".to_string()),
            container_port: i32::from(labels::SENTINEL_PORT),
            ..ContainerPort::default()
        }]),
        readiness_probe: Some(ping_probe(labels::SENTINEL_PORT)),
        // A Sentinel holds a few connections and no data.
        resources: Some(resources(
            "20m",
            Quantity("32Mi".into()),
            Quantity("64Mi".into()),
        )),
        security_context: Some(restricted_security_context(999)),
        volume_mounts: Some(vec![VolumeMount {
            name: "sentinel".to_string(),
            mount_path: SENTINEL_DIR.to_string(),
            ..VolumeMount::default()
        }]),
        ..Container::default()
    }
}

/// The pod of a store with replicas: Redis and Sentinel, the Sentinel's
/// configuration in memory (it holds the password), and pods spread over
/// nodes where the cluster allows, so that one lost node loses one pod.
fn replicated_pod_template(ic: &IdempotentConsumer) -> PodTemplateSpec {
    let mut template = pod_template(
        ic,
        vec![replicated_redis(ic), sentinel(ic)],
        Some(vec![Volume {
            name: "sentinel".to_string(),
            empty_dir: Some(EmptyDirVolumeSource {
                medium: Some("Memory".to_string()),
                size_limit: Some(Quantity("1Mi".to_string())),
            }),
            ..Volume::default()
        }]),
    );
    if let Some(pod) = template.spec.as_mut() {
        pod.affinity = Some(Affinity {
            pod_anti_affinity: Some(PodAntiAffinity {
                preferred_during_scheduling_ignored_during_execution: Some(vec![
                    WeightedPodAffinityTerm {
                        weight: 100,
                        pod_affinity_term: PodAffinityTerm {
                            label_selector: Some(selector(ic)),
                            topology_key: "kubernetes.io/hostname".to_string(),
                            ..PodAffinityTerm::default()
                        },
                    },
                ]),
                ..PodAntiAffinity::default()
            }),
            ..Affinity::default()
        });
    }
    template
}

/// The pod of the managed Redis; `volumes` are those not claimed.
fn pod_template(
    ic: &IdempotentConsumer,
    containers: Vec<Container>,
    volumes: Option<Vec<Volume>>,
) -> PodTemplateSpec {
    PodTemplateSpec {
        metadata: Some(ObjectMeta {
            labels: Some(labels::redis_selector(ic)),
            ..ObjectMeta::default()
        }),
        spec: Some(PodSpec {
            containers,
            automount_service_account_token: Some(false),
            security_context: Some(PodSecurityContext {
                fs_group: Some(999),
                ..PodSecurityContext::default()
            }),
            // Time to flush the append-only file on SIGTERM.
            termination_grace_period_seconds: Some(60),
            volumes,
            ..PodSpec::default()
        }),
    }
}

fn selector(ic: &IdempotentConsumer) -> LabelSelector {
    LabelSelector {
        match_labels: Some(labels::redis_selector(ic)),
        ..LabelSelector::default()
    }
}

/// The ephemeral managed store (`ephemeral: true`): nothing on disk.
pub fn deployment(ic: &IdempotentConsumer) -> Result<Deployment, RenderError> {
    Ok(Deployment {
        metadata: owned_meta(ic, labels::redis(ic), "redis")?,
        spec: Some(DeploymentSpec {
            replicas: Some(1),
            selector: selector(ic),
            template: pod_template(
                ic,
                vec![container(ic, false)],
                Some(vec![Volume {
                    name: "data".to_string(),
                    empty_dir: Some(EmptyDirVolumeSource::default()),
                    ..Volume::default()
                }]),
            ),
            ..DeploymentSpec::default()
        }),
        ..Deployment::default()
    })
}

/// The durable managed store: one Redis with its append-only file on a
/// PersistentVolumeClaim that is deleted with the resource (and only then);
/// with replicas, 1 + replicas pods of Redis and Sentinel, each with its
/// claim. Name, selector, Service name and claim template are the same
/// either way (Kubernetes cannot change them in place), so a store can go
/// from one Redis to replicas and back, and pod 0 keeps its claim.
pub fn stateful_set(ic: &IdempotentConsumer) -> Result<StatefulSet, RenderError> {
    let replicas = replicas(ic);
    let template = if replicas > 0 {
        replicated_pod_template(ic)
    } else {
        pod_template(ic, vec![container(ic, true)], None)
    };
    let managed = ic.spec.store.managed.clone().unwrap_or_default();
    let claim = PersistentVolumeClaim {
        metadata: ObjectMeta {
            name: Some("data".to_string()),
            labels: Some(labels::redis_selector(ic)),
            ..ObjectMeta::default()
        },
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec!["ReadWriteOnce".to_string()]),
            storage_class_name: managed.storage_class_name.clone(),
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([(
                    "storage".to_string(),
                    Quantity(
                        managed
                            .storage_size
                            .clone()
                            .unwrap_or_else(|| "1Gi".to_string()),
                    ),
                )])),
                ..VolumeResourceRequirements::default()
            }),
            ..PersistentVolumeClaimSpec::default()
        }),
        ..PersistentVolumeClaim::default()
    };
    Ok(StatefulSet {
        metadata: owned_meta(ic, labels::redis(ic), "redis")?,
        spec: Some(StatefulSetSpec {
            replicas: Some(1 + i32::from(replicas)),
            service_name: Some(labels::redis(ic)),
            selector: selector(ic),
            template,
            volume_claim_templates: Some(vec![claim]),
            persistent_volume_claim_retention_policy: Some(
                StatefulSetPersistentVolumeClaimRetentionPolicy {
                    when_deleted: Some("Delete".to_string()),
                    when_scaled: Some("Retain".to_string()),
                },
            ),
            ..StatefulSetSpec::default()
        }),
        ..StatefulSet::default()
    })
}

/// Keeps voluntary disruptions (drains, autoscaler scale-downs) from taking
/// the one Redis away unannounced: it is moved when a person deletes its pod,
/// which is safe (the data is on the claim) but pauses the consumer. With
/// replicas, one pod at a time may go: the two left keep a primary and a
/// Sentinel quorum.
pub fn pod_disruption_budget(ic: &IdempotentConsumer) -> Result<PodDisruptionBudget, RenderError> {
    let (min_available, max_unavailable) = if replicas(ic) > 0 {
        (None, Some(IntOrString::Int(1)))
    } else {
        (Some(IntOrString::Int(1)), None)
    };
    Ok(PodDisruptionBudget {
        metadata: owned_meta(ic, labels::redis(ic), "redis")?,
        spec: Some(PodDisruptionBudgetSpec {
            min_available,
            max_unavailable,
            selector: Some(selector(ic)),
            ..PodDisruptionBudgetSpec::default()
        }),
        ..PodDisruptionBudget::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::render::sample;

    #[test]
    fn managed_redis_is_owned_locked_down_and_never_evicts() {
        let ic = sample::policy();
        let d = deployment(&ic).expect("renders");
        assert_eq!(d.metadata.name.as_deref(), Some("orders-idemq-redis"));
        assert_eq!(d.metadata.owner_references.as_ref().map(Vec::len), Some(1));
        let pod = d.spec.expect("spec").template.spec.expect("pod");
        let redis = &pod.containers[0];
        let args = redis.args.clone().expect("args");
        assert!(args
            .windows(2)
            .any(|w| w == ["--maxmemory-policy", "noeviction"]));
        for word in ["no", "yes", "on", "off", "y", "n"] {
            assert!(
                !args.iter().any(|a| a.eq_ignore_ascii_case(word)),
                "{word:?} reads as a boolean in YAML 1.1"
            );
        }
        assert!(redis.readiness_probe.is_some());
        assert!(redis
            .resources
            .as_ref()
            .and_then(|r| r.requests.as_ref())
            .is_some());
        assert_eq!(
            redis
                .security_context
                .as_ref()
                .and_then(|s| s.read_only_root_filesystem),
            Some(true)
        );
        let svc = service(&ic).expect("renders").spec.expect("spec");
        assert_eq!(svc.selector, Some(labels::redis_selector(&ic)));
    }

    fn durable_script(set: &StatefulSet) -> String {
        let pod = set
            .spec
            .as_ref()
            .and_then(|s| s.template.spec.as_ref())
            .expect("pod");
        let redis = &pod.containers[0];
        assert_eq!(
            redis.command.as_deref(),
            Some(&["sh".to_string(), "-c".to_string()][..])
        );
        redis.args.as_ref().expect("args")[0].clone()
    }

    #[test]
    fn managed_store_is_durable_by_default() {
        let ic = sample::policy();
        assert!(!is_ephemeral(&ic));
        let set = stateful_set(&ic).expect("renders");
        assert_eq!(set.metadata.name.as_deref(), Some("orders-idemq-redis"));
        assert_eq!(
            set.metadata.owner_references.as_ref().map(Vec::len),
            Some(1)
        );
        let script = durable_script(&set);
        for option in [
            "--appendonly yes",
            "--appendfsync everysec",
            "--maxmemory-policy noeviction",
            "--dir /data",
        ] {
            assert!(script.contains(option), "{option} missing from {script}");
        }
        assert!(
            script.starts_with("exec redis-server"),
            "SIGTERM reaches Redis"
        );
        let spec = set.spec.expect("spec");
        assert_eq!(spec.replicas, Some(1));
        let claims = spec.volume_claim_templates.expect("claim");
        assert_eq!(claims[0].metadata.name.as_deref(), Some("data"));
        let requested = claims[0]
            .spec
            .as_ref()
            .and_then(|s| s.resources.as_ref())
            .and_then(|r| r.requests.as_ref())
            .map(|r| r["storage"].0.clone());
        assert_eq!(requested.as_deref(), Some("1Gi"));
        assert_eq!(
            spec.persistent_volume_claim_retention_policy
                .and_then(|p| p.when_deleted)
                .as_deref(),
            Some("Delete"),
            "no claim is orphaned when the resource goes"
        );
        let pod = spec.template.spec.expect("pod");
        assert!(
            pod.volumes.is_none(),
            "data comes from the claim, not an emptyDir"
        );
        assert_eq!(pod.termination_grace_period_seconds, Some(60));

        let pdb = pod_disruption_budget(&ic).expect("renders");
        let pdb_spec = pdb.spec.expect("spec");
        assert_eq!(pdb_spec.min_available, Some(IntOrString::Int(1)));
        assert_eq!(
            pdb_spec.selector.and_then(|s| s.match_labels),
            Some(labels::redis_selector(&ic))
        );
    }

    #[test]
    fn storage_fsync_and_memory_follow_the_spec() {
        let mut ic = sample::policy();
        ic.spec.store.managed = Some(crate::crd::ManagedStore {
            storage_size: Some("20Gi".to_string()),
            storage_class_name: Some("fast-ssd".to_string()),
            append_fsync: Some(AppendFsync::Always),
            expected_keys: Some(10_000_000),
            ..Default::default()
        });
        let set = stateful_set(&ic).expect("renders");
        let script = durable_script(&set);
        assert!(script.contains("--appendfsync always"), "{script}");
        let (maxmemory, request) = memory_for(10_000_000);
        assert!(
            script.contains(&format!("--maxmemory {maxmemory}")),
            "{script}"
        );
        let spec = set.spec.expect("spec");
        let claim = spec.volume_claim_templates.expect("claims")[0]
            .spec
            .clone()
            .expect("claim spec");
        assert_eq!(claim.storage_class_name.as_deref(), Some("fast-ssd"));
        assert_eq!(
            claim
                .resources
                .and_then(|r| r.requests)
                .map(|r| r["storage"].0.clone()),
            Some("20Gi".to_string())
        );
        let resources = spec.template.spec.expect("pod").containers[0]
            .resources
            .clone()
            .expect("resources");
        let memory = resources.requests.expect("requests")["memory"].0.clone();
        assert_eq!(memory, format!("{}Mi", request.div_ceil(1 << 20)));
        // 10M keys: 64 MiB + 480 MB of data, twice that for the fork.
        assert_eq!(memory, "1044Mi");
    }

    #[test]
    fn ephemeral_store_keeps_the_deployment_without_persistence() {
        let mut ic = sample::policy();
        ic.spec.store.managed = Some(crate::crd::ManagedStore {
            ephemeral: Some(true),
            ..Default::default()
        });
        assert!(is_ephemeral(&ic));
        let d = deployment(&ic).expect("renders");
        let pod = d.spec.expect("spec").template.spec.expect("pod");
        let args = pod.containers[0].args.clone().expect("args");
        assert!(!args.iter().any(|a| a.contains("appendonly")));
        assert!(pod.volumes.expect("volumes")[0].empty_dir.is_some());
    }

    fn with_replicas(replicas: u8) -> IdempotentConsumer {
        let mut ic = sample::policy();
        ic.spec.store.managed = Some(crate::crd::ManagedStore {
            replicas: Some(replicas),
            ..Default::default()
        });
        ic
    }

    fn env_value(container: &Container, name: &str) -> String {
        container
            .env
            .iter()
            .flatten()
            .find(|e| e.name == name)
            .and_then(|e| e.value.clone())
            .unwrap_or_else(|| panic!("{name} not set on {}", container.name))
    }

    #[test]
    fn no_replicas_renders_the_one_redis_as_before() {
        let single = sample::policy();
        let explicit = with_replicas(0);
        for render in [
            |ic: &IdempotentConsumer| serde_json::to_value(stateful_set(ic).expect("renders")),
            |ic: &IdempotentConsumer| serde_json::to_value(service(ic).expect("renders")),
            |ic: &IdempotentConsumer| {
                serde_json::to_value(pod_disruption_budget(ic).expect("renders"))
            },
        ] {
            assert_eq!(render(&single).ok(), render(&explicit).ok());
        }
        let set = stateful_set(&explicit).expect("renders");
        let pod = set.spec.and_then(|s| s.template.spec).expect("pod");
        assert_eq!(pod.containers.len(), 1, "no Sentinel");
        assert!(
            pod.containers[0].lifecycle.is_none(),
            "nothing to hand over to"
        );
        assert_eq!(
            durable_script(&stateful_set(&explicit).expect("renders")),
            "exec redis-server --requirepass \"$REDIS_PASSWORD\" --dir /data \
             --appendonly yes --appendfsync everysec --save '' \
             --maxmemory-policy noeviction --maxmemory 115108864",
            "the one Redis starts exactly as before"
        );
        assert!(!is_headless(&service(&explicit).expect("renders")));
    }

    #[test]
    fn replicas_render_redis_and_sentinel_pods_behind_a_headless_service() {
        let ic = with_replicas(2);
        let set = stateful_set(&ic).expect("renders");
        assert_eq!(set.metadata.name.as_deref(), Some("orders-idemq-redis"));
        let spec = set.spec.expect("spec");
        assert_eq!(spec.replicas, Some(3), "the primary and two replicas");
        assert_eq!(
            spec.service_name.as_deref(),
            Some("orders-idemq-redis"),
            "the Service name a StatefulSet cannot change"
        );
        assert_eq!(
            spec.selector.match_labels,
            Some(labels::redis_selector(&ic)),
            "the selector a StatefulSet cannot change"
        );
        assert_eq!(
            spec.volume_claim_templates.expect("claims")[0]
                .metadata
                .name
                .as_deref(),
            Some("data"),
            "pod 0 keeps its claim"
        );
        let pod = spec.template.spec.expect("pod");
        let names: Vec<_> = pod.containers.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["redis", "sentinel"]);
        let hook = pod.containers[0]
            .lifecycle
            .as_ref()
            .and_then(|l| l.pre_stop.as_ref()?.exec.as_ref()?.command.clone())
            .expect("Redis hands the primary over before it stops");
        assert_eq!(hook[..2], ["sh", "-c"]);
        assert!(hook[2].contains("SENTINEL failover"), "{}", hook[2]);
        assert!(
            pod.containers[1].lifecycle.is_none(),
            "the Sentinel stops at once"
        );
        assert_eq!(env_value(&pod.containers[0], "IDEMQ_MIN_REPLICAS"), "0");
        let mut replicated = ic.clone();
        replicated.spec.store.durability = Some(StoreDurability::Replicated);
        let set = stateful_set(&replicated).expect("renders");
        let redis = &set
            .spec
            .and_then(|s| s.template.spec)
            .expect("pod")
            .containers[0];
        assert_eq!(
            env_value(redis, "IDEMQ_MIN_REPLICAS"),
            "1",
            "durability: replicated: no writes without a replica"
        );
        for c in &pod.containers {
            let security = c.security_context.clone().expect("security context");
            assert_eq!(security.read_only_root_filesystem, Some(true), "{}", c.name);
            assert_eq!(security.run_as_non_root, Some(true), "{}", c.name);
            assert_eq!(c.image.as_deref(), Some(labels::DEFAULT_REDIS_IMAGE));
            let script = &c.args.as_ref().expect("script")[0];
            assert!(script.contains("set -eu"), "{script}");
            let password = c
                .env
                .iter()
                .flatten()
                .find(|e| e.name == "REDIS_PASSWORD")
                .expect("password");
            assert_eq!(password.value, None, "no password in the manifest");
            assert_eq!(
                crate::render::secret_key_ref(password),
                ("orders-idemq-redis".into(), "password".into())
            );
            assert_eq!(
                env_value(c, "IDEMQ_REDIS_NODES"),
                "orders-idemq-redis-0.orders-idemq-redis.shop.svc:6379 \
                 orders-idemq-redis-1.orders-idemq-redis.shop.svc:6379 \
                 orders-idemq-redis-2.orders-idemq-redis.shop.svc:6379"
            );
            assert_eq!(
                env_value(c, "IDEMQ_SENTINELS"),
                "orders-idemq-redis-0.orders-idemq-redis.shop.svc:26379 \
                 orders-idemq-redis-1.orders-idemq-redis.shop.svc:26379 \
                 orders-idemq-redis-2.orders-idemq-redis.shop.svc:26379"
            );
            assert_eq!(env_value(c, "IDEMQ_PRIMARY_NAME"), "idemq");
        }
        let redis = &pod.containers[0];
        assert_eq!(env_value(redis, "IDEMQ_APPENDFSYNC"), "everysec");
        assert_eq!(env_value(redis, "IDEMQ_DATA_DIR"), "/data");
        let redis_script = &redis.args.as_ref().expect("script")[0];
        for part in [
            "--masterauth",
            "--replica-announce-ip",
            "--replicaof",
            "--appendonly yes",
        ] {
            assert!(
                redis_script.contains(part),
                "{part} missing: {redis_script}"
            );
        }
        let sentinel = &pod.containers[1];
        let sentinel_script = &sentinel.args.as_ref().expect("script")[0];
        for part in [
            "sentinel resolve-hostnames yes",
            "sentinel announce-hostnames yes",
            "sentinel announce-ip",
            "sentinel auth-pass",
            "sentinel monitor $name ${primary%:*} ${primary##*:} 2",
            "sentinel down-after-milliseconds $name 5000",
            "exec redis-server \"$conf\" --sentinel",
        ] {
            assert!(
                sentinel_script.contains(part),
                "{part} missing: {sentinel_script}"
            );
        }
        assert_eq!(env_value(sentinel, "IDEMQ_SENTINEL_DIR"), "/sentinel");
        let volumes = pod.volumes.expect("the Sentinel's emptyDir");
        assert_eq!(volumes[0].name, "sentinel");
        assert!(volumes[0].empty_dir.is_some());
        assert!(pod.affinity.is_some(), "pods spread over nodes");

        let svc = service(&ic).expect("renders");
        assert!(is_headless(&svc));
        let svc = svc.spec.expect("spec");
        assert_eq!(svc.publish_not_ready_addresses, Some(true));
        let ports: Vec<_> = svc.ports.iter().flatten().map(|p| p.port).collect();
        assert_eq!(ports, [6379, 26379]);

        let pdb = pod_disruption_budget(&ic)
            .expect("renders")
            .spec
            .expect("spec");
        assert_eq!(pdb.max_unavailable, Some(IntOrString::Int(1)));
        assert_eq!(pdb.min_available, None);

        assert_eq!(
            sentinel_urls(&ic),
            "redis://orders-idemq-redis-0.orders-idemq-redis.shop.svc:26379,\
             redis://orders-idemq-redis-1.orders-idemq-redis.shop.svc:26379,\
             redis://orders-idemq-redis-2.orders-idemq-redis.shop.svc:26379"
        );
    }

    #[test]
    fn replicas_need_the_durable_store() {
        let mut ic = with_replicas(2);
        if let Some(managed) = ic.spec.store.managed.as_mut() {
            managed.ephemeral = Some(true);
        }
        assert_eq!(
            replicas(&ic),
            0,
            "an ephemeral store stored before the rule keeps one Redis"
        );
        assert_eq!(ic.spec.store.sentinel(), None);
    }

    #[test]
    fn the_password_is_the_one_given() {
        let s = secret(&sample::policy(), "p4ss").expect("renders");
        assert_eq!(s.data.expect("data")["password"].0, b"p4ss");
        let a = generate_password();
        assert_eq!(a.len(), 32);
        assert_ne!(a, generate_password());
    }
}
