//! The managed key store: one Redis per consumer, with a generated password.
//!
//! The password is an input: the controller generates it once, keeps it in
//! the Secret, and reads it back on every later reconcile, so re-rendering never
//! changes it (a new password would cut every sidecar off).

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::core::v1::{
    Container, ContainerPort, EmptyDirVolumeSource, EnvVar, EnvVarSource, ExecAction,
    PodSecurityContext, PodSpec, PodTemplateSpec, Probe, ResourceRequirements, Secret,
    SecretKeySelector, Service, ServicePort, ServiceSpec, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::ByteString;

use super::sidecar::restricted_security_context;
use super::{owned_meta, RenderError};
use crate::crd::IdempotentConsumer;
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

pub fn deployment(ic: &IdempotentConsumer) -> Result<Deployment, RenderError> {
    let name = labels::redis(ic);
    let managed = ic.spec.store.managed.clone().unwrap_or_default();
    let resources = managed.resources.unwrap_or_else(|| ResourceRequirements {
        requests: Some(BTreeMap::from([
            ("cpu".to_string(), Quantity("100m".to_string())),
            ("memory".to_string(), Quantity("128Mi".to_string())),
        ])),
        limits: Some(BTreeMap::from([(
            "memory".to_string(),
            Quantity("512Mi".to_string()),
        )])),
        ..ResourceRequirements::default()
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
    let container = Container {
        name: "redis".to_string(),
        image: Some(
            managed
                .image
                .unwrap_or_else(|| labels::DEFAULT_REDIS_IMAGE.to_string()),
        ),
        // Dedup keys must never be evicted: a full store refuses writes
        // (the sidecar then fails closed) instead of forgetting keys. No
        // snapshots (`--save ""`); append-only is off by default. Arguments
        // avoid bare words like `no`, which YAML 1.1 readers (kubectl) turn
        // into booleans when they read `inject` output.
        args: Some(
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
    };
    let selector = labels::redis_selector(ic);
    Ok(Deployment {
        metadata: owned_meta(ic, name, "redis")?,
        spec: Some(DeploymentSpec {
            replicas: Some(1),
            selector: LabelSelector {
                match_labels: Some(selector.clone()),
                ..LabelSelector::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(selector),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    containers: vec![container],
                    automount_service_account_token: Some(false),
                    security_context: Some(PodSecurityContext {
                        fs_group: Some(999),
                        ..PodSecurityContext::default()
                    }),
                    volumes: Some(vec![Volume {
                        name: "data".to_string(),
                        empty_dir: Some(EmptyDirVolumeSource::default()),
                        ..Volume::default()
                    }]),
                    ..PodSpec::default()
                }),
            },
            ..DeploymentSpec::default()
        }),
        ..Deployment::default()
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

    #[test]
    fn the_password_is_the_one_given() {
        let s = secret(&sample::policy(), "p4ss").expect("renders");
        assert_eq!(s.data.expect("data")["password"].0, b"p4ss");
        let a = generate_password();
        assert_eq!(a.len(), 32);
        assert_ne!(a, generate_password());
    }
}
