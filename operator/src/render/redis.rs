//! The managed key store: one Redis per consumer, with a generated password.
//!
//! Durable by default: a StatefulSet whose Redis writes an append-only file
//! (fsync every second, or on every write) to a PersistentVolumeClaim, with a
//! PodDisruptionBudget, so a restart, a drain or an upgrade keeps every
//! completed key. `ephemeral: true` keeps the former Deployment with an
//! emptyDir, which forgets everything when its pod goes.
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
    Container, ContainerPort, EmptyDirVolumeSource, EnvVar, EnvVarSource, ExecAction,
    PersistentVolumeClaim, PersistentVolumeClaimSpec, PodSecurityContext, PodSpec, PodTemplateSpec,
    Probe, ResourceRequirements, Secret, SecretKeySelector, Service, ServicePort, ServiceSpec,
    Volume, VolumeMount, VolumeResourceRequirements,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::ByteString;

use super::sidecar::restricted_security_context;
use super::{owned_meta, RenderError};
use crate::crd::{AppendFsync, IdempotentConsumer};
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

pub fn service(ic: &IdempotentConsumer) -> Result<Service, RenderError> {
    Ok(Service {
        metadata: owned_meta(ic, labels::redis(ic), "redis")?,
        spec: Some(ServiceSpec {
            selector: Some(labels::redis_selector(ic)),
            ports: Some(vec![ServicePort {
                name: Some("redis".to_string()),
                port: i32::from(labels::REDIS_PORT),
                target_port: Some(IntOrString::String("redis".to_string())),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    })
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

fn mebibytes(bytes: u64) -> Quantity {
    Quantity(format!("{}Mi", bytes.div_ceil(1 << 20)))
}

/// The Redis container. `durable` adds the append-only file and the memory
/// bound derived from the expected key count.
fn container(ic: &IdempotentConsumer, durable: bool) -> Container {
    let name = labels::redis(ic);
    let managed = ic.spec.store.managed.clone().unwrap_or_default();
    let (maxmemory, request) = memory_for(managed.expected_keys.unwrap_or(DEFAULT_EXPECTED_KEYS));
    let resources = managed.resources.clone().unwrap_or_else(|| {
        if durable {
            ResourceRequirements {
                requests: Some(BTreeMap::from([
                    ("cpu".to_string(), Quantity("100m".to_string())),
                    ("memory".to_string(), mebibytes(request)),
                ])),
                limits: Some(BTreeMap::from([("memory".to_string(), mebibytes(request))])),
                ..ResourceRequirements::default()
            }
        } else {
            ResourceRequirements {
                requests: Some(BTreeMap::from([
                    ("cpu".to_string(), Quantity("100m".to_string())),
                    ("memory".to_string(), Quantity("128Mi".to_string())),
                ])),
                limits: Some(BTreeMap::from([(
                    "memory".to_string(),
                    Quantity("512Mi".to_string()),
                )])),
                ..ResourceRequirements::default()
            }
        }
    });
    let password = EnvVar {
        name: "REDIS_PASSWORD".to_string(),
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: name.clone(),
                key: labels::REDIS_PASSWORD_KEY.to_string(),
                optional: Some(false),
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    };
    let (command, args) = if durable {
        let fsync = match managed.append_fsync.unwrap_or_default() {
            AppendFsync::Everysec => "everysec",
            AppendFsync::Always => "always",
        };
        // One shell line, so that `yes` stays inside a string: YAML 1.1
        // readers (kubectl) turn a bare `yes` argument into a boolean. `exec`
        // makes Redis PID 1: SIGTERM reaches it, and it flushes the
        // append-only file before it exits (the clean shutdown).
        let maxmemory = if managed.resources.is_some() {
            String::new()
        } else {
            format!(" --maxmemory {maxmemory}")
        };
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
        image: Some(
            managed
                .image
                .unwrap_or_else(|| labels::DEFAULT_REDIS_IMAGE.to_string()),
        ),
        command,
        args,
        env: Some(vec![password]),
        ports: Some(vec![ContainerPort {
            name: Some("redis".to_string()),
            container_port: i32::from(labels::REDIS_PORT),
            ..ContainerPort::default()
        }]),
        readiness_probe: Some(Probe {
            exec: Some(ExecAction {
                command: Some(
                    [
                        "sh",
                        "-c",
                        "redis-cli -a \"$REDIS_PASSWORD\" --no-auth-warning ping | grep -q PONG",
                    ]
                    .map(String::from)
                    .to_vec(),
                ),
            }),
            period_seconds: Some(5),
            ..Probe::default()
        }),
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

/// The pod of the managed Redis; `volumes` are those not claimed.
fn pod_template(
    ic: &IdempotentConsumer,
    durable: bool,
    volumes: Option<Vec<Volume>>,
) -> PodTemplateSpec {
    PodTemplateSpec {
        metadata: Some(ObjectMeta {
            labels: Some(labels::redis_selector(ic)),
            ..ObjectMeta::default()
        }),
        spec: Some(PodSpec {
            containers: vec![container(ic, durable)],
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
                false,
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
/// PersistentVolumeClaim that is deleted with the resource (and only then).
pub fn stateful_set(ic: &IdempotentConsumer) -> Result<StatefulSet, RenderError> {
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
            replicas: Some(1),
            service_name: Some(labels::redis(ic)),
            selector: selector(ic),
            template: pod_template(ic, true, None),
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
/// which is safe (the data is on the claim) but pauses the consumer.
pub fn pod_disruption_budget(ic: &IdempotentConsumer) -> Result<PodDisruptionBudget, RenderError> {
    Ok(PodDisruptionBudget {
        metadata: owned_meta(ic, labels::redis(ic), "redis")?,
        spec: Some(PodDisruptionBudgetSpec {
            min_available: Some(IntOrString::Int(1)),
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

    #[test]
    fn the_password_is_the_one_given() {
        let s = secret(&sample::policy(), "p4ss").expect("renders");
        assert_eq!(s.data.expect("data")["password"].0, b"p4ss");
        let a = generate_password();
        assert_eq!(a.len(), 32);
        assert_ne!(a, generate_password());
    }
}
