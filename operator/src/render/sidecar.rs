//! The sidecar as injected: into the target's pod template (injection:
//! workload), or into each pod at its creation (injection: pod, a JSON
//! patch the admission webhook returns). Both add the same
//! [`PodAdditions`].
//!
//! The workload patch holds only the fields idemq owns (one init container, one volume,
//! one annotation), for server-side apply under the `idemq-operator` field
//! manager: the application's own fields stay the application owner's, and
//! applying an empty patch later withdraws exactly what idemq added. Lists
//! merge by `name`, so the app's containers and volumes are untouched.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapVolumeSource, Container, ContainerPort, EnvVar, EnvVarSource,
    HTTPGetAction, KeyToPath, ObjectFieldSelector, Pod, Probe, ResourceRequirements,
    SeccompProfile, SecretKeySelector, SecretVolumeSource, SecurityContext, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;
use serde_json::{json, Value};

use idemq_sidecar::config::{memory_limit_bytes, memory_request_bytes, SecretEnv};

use crate::crd::{
    BrokerKind, DeadLetterTarget, DeliveryMode, IdempotentConsumer, KafkaSecurityProtocol,
    MqttAuth, NatsAuth, StoreMode, TargetKind,
};
use crate::labels;
use crate::render::RenderError;

pub(crate) fn secret_env(name: &str, secret: &str, key: &str) -> EnvVar {
    EnvVar {
        name: name.to_string(),
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: secret.to_string(),
                key: key.to_string(),
                optional: Some(false),
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }
}

pub(crate) fn plain_env(name: &str, value: &str) -> EnvVar {
    EnvVar {
        name: name.to_string(),
        value: Some(value.to_string()),
        ..EnvVar::default()
    }
}

/// An env var from a field of the pod (the Downward API).
pub(crate) fn field_env(name: &str, field_path: &str) -> EnvVar {
    EnvVar {
        name: name.to_string(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: field_path.to_string(),
                ..ObjectFieldSelector::default()
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }
}

fn probe(path: &str) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_string()),
            port: IntOrString::String("idemq-admin".to_string()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(5),
        failure_threshold: Some(3),
        ..Probe::default()
    }
}

/// Non-root, read-only, no privilege, no capabilities.
pub fn restricted_security_context(user: i64) -> SecurityContext {
    SecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(user),
        read_only_root_filesystem: Some(true),
        allow_privilege_escalation: Some(false),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".to_string()]),
            ..Capabilities::default()
        }),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".to_string(),
            ..SeccompProfile::default()
        }),
        ..SecurityContext::default()
    }
}

/// The sidecar's resources when the policy sets none. In http mode its
/// memory follows from the in-flight byte budget (the sidecar's own
/// `memory_limit_bytes`: 128Mi limit and 64Mi request for the default 32 MiB);
/// in gate mode it holds no messages.
fn default_resources(ic: &IdempotentConsumer) -> ResourceRequirements {
    let (request, limit) = if ic.spec.delivery.mode == DeliveryMode::Gate {
        (32 * MIB, 128 * MIB)
    } else {
        let budget = super::config::in_flight_budget(ic);
        (memory_request_bytes(budget), memory_limit_bytes(budget))
    };
    let mebibytes = |bytes: u64| Quantity(format!("{}Mi", bytes.div_ceil(MIB)));
    ResourceRequirements {
        requests: Some(BTreeMap::from([
            ("cpu".to_string(), Quantity("50m".to_string())),
            ("memory".to_string(), mebibytes(request)),
        ])),
        limits: Some(BTreeMap::from([("memory".to_string(), mebibytes(limit))])),
        ..ResourceRequirements::default()
    }
}

const MIB: u64 = 1024 * 1024;

/// The sidecar container: a native sidecar (an init container that keeps
/// running), so it starts before the app and stops after it.
pub fn container(ic: &IdempotentConsumer, default_image: &str) -> Container {
    let spec = &ic.spec;
    let mut env = vec![
        plain_env(
            "IDEMQ_CONFIG",
            &format!("{}/{}", labels::CONFIG_MOUNT, labels::CONFIG_KEY),
        ),
        plain_env(
            "IDEMQ_LOG",
            spec.sidecar.log_level.as_deref().unwrap_or("info"),
        ),
    ];
    match spec.store.mode {
        StoreMode::Managed => {
            let redis = labels::redis(ic);
            // With replicas, the Sentinels (the configuration names the
            // primary they monitor): they follow the primary through a
            // failover, which one address could not.
            let url = if super::redis::replicas(ic) > 0 {
                super::redis::sentinel_urls(ic)
            } else {
                format!("redis://{redis}:{}", labels::REDIS_PORT)
            };
            env.push(plain_env(SecretEnv::REDIS_URL, &url));
            env.push(secret_env(
                SecretEnv::REDIS_PASSWORD,
                &redis,
                labels::REDIS_PASSWORD_KEY,
            ));
        }
        StoreMode::External => {
            if let Some(external) = &spec.store.external {
                env.push(secret_env(
                    SecretEnv::REDIS_URL,
                    &external.secret_ref.name,
                    &external.secret_ref.key,
                ));
                if let Some(ca_key) = &external.ca_key {
                    env.push(secret_env(
                        SecretEnv::REDIS_CA,
                        &external.secret_ref.name,
                        ca_key,
                    ));
                }
            }
        }
    }
    let mut ports = vec![ContainerPort {
        name: Some("idemq-admin".to_string()),
        container_port: i32::from(labels::ADMIN_PORT),
        ..ContainerPort::default()
    }];
    if spec.delivery.mode == DeliveryMode::Http {
        env.extend(broker_env(ic));
        if let Some(BrokerKind::ZeroMq(zmq)) = spec.broker.kind() {
            ports.push(ContainerPort {
                name: Some(labels::ZEROMQ_PORT_NAME.to_string()),
                container_port: i32::from(zmq.port()),
                protocol: Some("TCP".to_string()),
                ..ContainerPort::default()
            });
        }
    } else {
        ports.push(ContainerPort {
            name: Some("idemq-gate".to_string()),
            container_port: i32::from(labels::GATE_PORT),
            ..ContainerPort::default()
        });
    }
    Container {
        name: labels::SIDECAR_CONTAINER.to_string(),
        image: Some(
            spec.sidecar
                .image
                .clone()
                .unwrap_or_else(|| default_image.to_string()),
        ),
        restart_policy: Some("Always".to_string()),
        env: Some(env),
        ports: Some(ports),
        readiness_probe: Some(probe("/readyz")),
        liveness_probe: Some(probe("/healthz")),
        resources: Some(
            spec.sidecar
                .resources
                .clone()
                .unwrap_or_else(|| default_resources(ic)),
        ),
        security_context: Some(restricted_security_context(65532)),
        volume_mounts: Some(volumes(ic).into_iter().map(|(_, mount)| mount).collect()),
        ..Container::default()
    }
}

/// The broker's connection, as references to its Secret (pipeline mode).
fn broker_env(ic: &IdempotentConsumer) -> Vec<EnvVar> {
    match ic.spec.broker.kind() {
        Some(BrokerKind::RabbitMq(rabbit)) => {
            let r = &rabbit.connection_secret_ref;
            vec![secret_env(SecretEnv::BROKER_URL, &r.name, &r.key)]
        }
        Some(BrokerKind::Mqtt(mqtt)) => {
            let r = &mqtt.connection_secret_ref;
            let mut env = vec![secret_env(SecretEnv::BROKER_URL, &r.name, &r.key)];
            if mqtt.auth == MqttAuth::UserPassword {
                env.push(secret_env(
                    SecretEnv::BROKER_USER,
                    &r.name,
                    labels::MQTT_USERNAME_KEY,
                ));
                env.push(secret_env(
                    SecretEnv::BROKER_PASSWORD,
                    &r.name,
                    labels::MQTT_PASSWORD_KEY,
                ));
            }
            env
        }
        Some(BrokerKind::Kafka(kafka)) => kafka_env(
            &kafka.connection_secret_ref.name,
            is_sasl(kafka.security_protocol),
        ),
        Some(BrokerKind::JetStream(js)) => {
            let r = &js.connection_secret_ref;
            let mut env = vec![secret_env(SecretEnv::BROKER_URL, &r.name, &r.key)];
            let keys: &[(&str, &str)] = match js.auth {
                NatsAuth::None => &[],
                NatsAuth::UserPassword => &[
                    (SecretEnv::BROKER_USER, labels::NATS_USERNAME_KEY),
                    (SecretEnv::BROKER_PASSWORD, labels::NATS_PASSWORD_KEY),
                ],
                NatsAuth::Token => &[(SecretEnv::NATS_TOKEN, labels::NATS_TOKEN_KEY)],
                NatsAuth::Creds => &[(SecretEnv::NATS_CREDS, labels::NATS_CREDS_KEY)],
            };
            env.extend(keys.iter().map(|(var, key)| secret_env(var, &r.name, key)));
            env
        }
        // The service-account key is a mounted file (see `volumes`).
        Some(BrokerKind::PubSub(_)) => Vec::new(),
        // The endpoint binds the pod's address, and CURVE's keys come from
        // their Secret.
        Some(BrokerKind::ZeroMq(zmq)) => {
            let mut env = vec![field_env(labels::POD_IP_ENV, "status.podIP")];
            if let Some(curve) = &zmq.curve {
                env.push(secret_env(
                    SecretEnv::ZMQ_SERVER_SECRET_KEY,
                    &curve.secret_name,
                    &curve.server_secret_key,
                ));
                env.push(secret_env(
                    SecretEnv::ZMQ_CLIENT_KEYS,
                    &curve.secret_name,
                    &curve.client_public_keys,
                ));
            }
            // A dead-letter broker's connection, in the variables its own
            // source would read: a ZeroMQ sidecar has no other use for them.
            match zmq.dead_letter.target() {
                Some(DeadLetterTarget::RabbitMq(rabbit)) => {
                    let r = &rabbit.connection_secret_ref;
                    env.push(secret_env(SecretEnv::BROKER_URL, &r.name, &r.key));
                }
                Some(DeadLetterTarget::Kafka(kafka)) => env.extend(kafka_env(
                    &kafka.connection_secret_ref.name,
                    is_sasl(kafka.security_protocol),
                )),
                Some(DeadLetterTarget::Endpoint(_)) | None => {}
            }
            env
        }
        // Refused by validation before anything is rendered.
        None => Vec::new(),
    }
}

/// A Kafka connection from its Secret `name`: the bootstrap servers, and
/// the SASL credentials with `sasl`.
fn kafka_env(name: &str, sasl: bool) -> Vec<EnvVar> {
    let mut env = vec![secret_env(
        SecretEnv::KAFKA_BOOTSTRAP_SERVERS,
        name,
        labels::KAFKA_BOOTSTRAP_SERVERS_KEY,
    )];
    if sasl {
        env.push(secret_env(
            SecretEnv::KAFKA_USERNAME,
            name,
            labels::KAFKA_USERNAME_KEY,
        ));
        env.push(secret_env(
            SecretEnv::KAFKA_PASSWORD,
            name,
            labels::KAFKA_PASSWORD_KEY,
        ));
    }
    env
}

fn is_sasl(protocol: KafkaSecurityProtocol) -> bool {
    matches!(
        protocol,
        KafkaSecurityProtocol::SaslPlaintext | KafkaSecurityProtocol::SaslSsl
    )
}

fn read_only_mount(name: &str, path: &str) -> VolumeMount {
    VolumeMount {
        name: name.to_string(),
        mount_path: path.to_string(),
        read_only: Some(true),
        ..VolumeMount::default()
    }
}

/// The sidecar's volumes and their mounts: its configuration, and in
/// pipeline mode the Kafka or MQTT CA bundle when the connection Secret
/// holds one, or the Pub/Sub service-account key.
fn volumes(ic: &IdempotentConsumer) -> Vec<(Volume, VolumeMount)> {
    let mut volumes = vec![(
        config_volume(ic),
        read_only_mount(labels::CONFIG_VOLUME, labels::CONFIG_MOUNT),
    )];
    let pipeline = ic.spec.delivery.mode == DeliveryMode::Http;
    let file = match ic.spec.broker.kind() {
        Some(BrokerKind::Kafka(kafka)) if pipeline => {
            let r = &kafka.connection_secret_ref;
            r.ca_key.as_ref().map(|key| SecretFile {
                volume: labels::KAFKA_CA_VOLUME,
                mount: labels::KAFKA_CA_MOUNT,
                secret: &r.name,
                key,
                path: labels::CA_FILE_NAME,
            })
        }
        // A ZeroMQ endpoint's dead-letter Kafka: the Kafka source's CA file.
        Some(BrokerKind::ZeroMq(zmq)) if pipeline => match zmq.dead_letter.target() {
            Some(DeadLetterTarget::Kafka(kafka)) => {
                let r = &kafka.connection_secret_ref;
                r.ca_key.as_ref().map(|key| SecretFile {
                    volume: labels::KAFKA_CA_VOLUME,
                    mount: labels::KAFKA_CA_MOUNT,
                    secret: &r.name,
                    key,
                    path: labels::CA_FILE_NAME,
                })
            }
            _ => None,
        },
        Some(BrokerKind::Mqtt(mqtt)) if pipeline => mqtt.ca_key.as_ref().map(|key| SecretFile {
            volume: labels::MQTT_CA_VOLUME,
            mount: labels::MQTT_CA_MOUNT,
            secret: &mqtt.connection_secret_ref.name,
            key,
            path: labels::CA_FILE_NAME,
        }),
        Some(BrokerKind::PubSub(ps)) if pipeline => {
            let r = &ps.credentials_secret_ref;
            Some(SecretFile {
                volume: labels::PUBSUB_KEY_VOLUME,
                mount: labels::PUBSUB_KEY_MOUNT,
                secret: &r.name,
                key: &r.key,
                path: labels::PUBSUB_KEY_NAME,
            })
        }
        _ => None,
    };
    volumes.extend(file.map(SecretFile::volume));
    volumes
}

/// One key of a Secret, mounted as the file `<mount>/<path>`.
struct SecretFile<'a> {
    volume: &'static str,
    mount: &'static str,
    secret: &'a str,
    key: &'a str,
    path: &'static str,
}

impl SecretFile<'_> {
    fn volume(self) -> (Volume, VolumeMount) {
        (
            Volume {
                name: self.volume.to_string(),
                secret: Some(SecretVolumeSource {
                    secret_name: Some(self.secret.to_string()),
                    items: Some(vec![KeyToPath {
                        key: self.key.to_string(),
                        path: self.path.to_string(),
                        ..KeyToPath::default()
                    }]),
                    ..SecretVolumeSource::default()
                }),
                ..Volume::default()
            },
            read_only_mount(self.volume, self.mount),
        )
    }
}

pub fn config_volume(ic: &IdempotentConsumer) -> Volume {
    Volume {
        name: labels::CONFIG_VOLUME.to_string(),
        config_map: Some(ConfigMapVolumeSource {
            name: labels::config_map(ic),
            ..ConfigMapVolumeSource::default()
        }),
        ..Volume::default()
    }
}

fn api_version_kind(kind: &TargetKind) -> (&'static str, &'static str) {
    match kind {
        TargetKind::Deployment => ("apps/v1", "Deployment"),
        TargetKind::StatefulSet => ("apps/v1", "StatefulSet"),
    }
}

/// What idemq adds to a pod, whether into a workload's pod template or into
/// a pod at its creation: one way to build the sidecar for both modes.
pub struct PodAdditions {
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    pub init_container: Container,
    pub volumes: Vec<Volume>,
}

pub fn pod_additions(
    ic: &IdempotentConsumer,
    config_hash: &str,
    secrets_hash: Option<&str>,
    default_image: &str,
) -> PodAdditions {
    let mut annotations =
        BTreeMap::from([(labels::CONFIG_HASH.to_string(), config_hash.to_string())]);
    // The consumer label lets the chart's PodMonitor and the operator's pod
    // watch find the sidecars; a ZeroMQ endpoint's Service and
    // NetworkPolicy select its pods by a label of their own.
    let mut pod_labels = BTreeMap::from([(labels::CONSUMER_LABEL.to_string(), ic.name_any())]);
    if ic.spec.broker.zeromq.is_some() && ic.spec.delivery.mode == DeliveryMode::Http {
        pod_labels.extend(super::zeromq::endpoint_selector(ic));
    }
    if let Some(secrets_hash) = secrets_hash {
        annotations.insert(labels::SECRETS_HASH.to_string(), secrets_hash.to_string());
    }
    PodAdditions {
        labels: pod_labels,
        annotations,
        init_container: container(ic, default_image),
        volumes: volumes(ic).into_iter().map(|(volume, _)| volume).collect(),
    }
}

/// The server-side-apply patch that injects the sidecar into the target
/// (injection: workload). Either hash changing rolls the pods: the
/// config's, and that of the Secrets' content (None offline, where no
/// Secret can be read), which the sidecar reads from its environment at start.
pub fn workload_patch(
    ic: &IdempotentConsumer,
    config_hash: &str,
    secrets_hash: Option<&str>,
    default_image: &str,
) -> Result<Value, RenderError> {
    let (kind, name) = ic.spec.target.workload().ok_or(RenderError::Target)?;
    let (api_version, kind) = api_version_kind(kind);
    let add = pod_additions(ic, config_hash, secrets_hash, default_image);
    Ok(json!({
        "apiVersion": api_version,
        "kind": kind,
        "metadata": {
            "name": name,
            "namespace": ic.namespace(),
            // Claims the workload: a second resource naming it reports a conflict.
            "annotations": { labels::CONSUMER_ANNOTATION: ic.name_any() },
        },
        "spec": { "template": {
            "metadata": { "annotations": add.annotations, "labels": add.labels },
            "spec": { "initContainers": [add.init_container], "volumes": add.volumes },
        }}
    }))
}

/// The patch that withdraws everything idemq added: applying it under the
/// same field manager releases idemq's fields, and the API server removes
/// those nobody else owns.
pub fn withdrawal_patch(ic: &IdempotentConsumer) -> Result<Value, RenderError> {
    let (kind, name) = ic.spec.target.workload().ok_or(RenderError::Target)?;
    let (api_version, kind) = api_version_kind(kind);
    Ok(json!({
        "apiVersion": api_version,
        "kind": kind,
        "metadata": { "name": name, "namespace": ic.namespace() },
    }))
}

/// The JSON patch (RFC 6902) that adds the sidecar to `pod` at its creation
/// (injection: pod): the same additions as the workload patch, appended to
/// what the pod has. Empty when the pod already runs the sidecar (the
/// webhook may be called again after other webhooks, and a workload may
/// carry it from workload mode).
pub fn pod_patch(pod: &Pod, additions: PodAdditions) -> Vec<Value> {
    let spec = pod.spec.as_ref();
    let init = spec.and_then(|s| s.init_containers.as_ref());
    if init.is_some_and(|c| c.iter().any(|c| c.name == labels::SIDECAR_CONTAINER)) {
        return Vec::new();
    }
    let mut ops = Vec::new();
    let mut map = |path: &str, present: bool, entries: BTreeMap<String, String>| {
        if present {
            for (key, value) in entries {
                let key = key.replace('~', "~0").replace('/', "~1");
                ops.push(json!({ "op": "add", "path": format!("{path}/{key}"), "value": value }));
            }
        } else {
            ops.push(json!({ "op": "add", "path": path, "value": entries }));
        }
    };
    map(
        "/metadata/labels",
        pod.metadata.labels.is_some(),
        additions.labels,
    );
    map(
        "/metadata/annotations",
        pod.metadata.annotations.is_some(),
        additions.annotations,
    );
    let mut list = |path: &str, present: bool, items: Vec<Value>| {
        if present {
            for item in items {
                ops.push(json!({ "op": "add", "path": format!("{path}/-"), "value": item }));
            }
        } else {
            ops.push(json!({ "op": "add", "path": path, "value": items }));
        }
    };
    list(
        "/spec/initContainers",
        init.is_some(),
        vec![json!(additions.init_container)],
    );
    list(
        "/spec/volumes",
        spec.and_then(|s| s.volumes.as_ref()).is_some(),
        additions.volumes.iter().map(|v| json!(v)).collect(),
    );
    ops
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{ExternalStore, SecretKeyRef};
    use crate::render::{sample, secret_key_ref};

    fn env_of(c: &Container, name: &str) -> EnvVar {
        c.env
            .iter()
            .flatten()
            .find(|e| e.name == name)
            .cloned()
            .unwrap_or_else(|| panic!("no env {name}"))
    }

    #[test]
    fn sidecar_is_native_probed_and_locked_down() {
        let c = container(&sample::policy(), "img:1");
        assert_eq!(c.restart_policy.as_deref(), Some("Always"));
        assert_eq!(c.image.as_deref(), Some("img:1"));
        let ready = c
            .readiness_probe
            .and_then(|p| p.http_get)
            .expect("readiness");
        assert_eq!(ready.path.as_deref(), Some("/readyz"));
        assert_eq!(
            c.liveness_probe
                .and_then(|p| p.http_get)
                .and_then(|h| h.path)
                .as_deref(),
            Some("/healthz")
        );
        let sc = c.security_context.expect("security context");
        assert_eq!(
            sc.capabilities.and_then(|c| c.drop),
            Some(vec!["ALL".to_string()])
        );
        assert_eq!(
            sc.seccomp_profile.map(|s| s.type_).as_deref(),
            Some("RuntimeDefault")
        );
    }

    fn memory(c: &Container) -> (String, String) {
        let r = c.resources.clone().expect("resources");
        let get = |m: Option<BTreeMap<String, Quantity>>| {
            m.and_then(|m| m.get("memory").cloned())
                .map(|q| q.0)
                .unwrap_or_default()
        };
        (get(r.requests), get(r.limits))
    }

    #[test]
    fn memory_follows_the_in_flight_byte_budget_unless_the_policy_sets_resources() {
        let mut ic = sample::policy();
        assert_eq!(
            memory(&container(&ic, "img")),
            ("64Mi".into(), "128Mi".into()),
            "the default 32 MiB budget"
        );
        ic.spec.delivery.max_in_flight_bytes = Some(256 * MIB);
        assert_eq!(
            memory(&container(&ic, "img")),
            ("288Mi".into(), "576Mi".into())
        );
        // 100 × 64 KiB = 6.25 MiB is all the policy can hold in flight.
        if let Some(rabbit) = ic.spec.broker.rabbitmq.as_mut() {
            rabbit.prefetch = Some(100);
        }
        ic.spec.delivery.expected_message_bytes = Some(64 * 1024);
        assert_eq!(
            memory(&container(&ic, "img")),
            ("39Mi".into(), "77Mi".into())
        );
        ic.spec.sidecar.resources = Some(ResourceRequirements::default());
        assert_eq!(
            container(&ic, "img").resources,
            Some(ResourceRequirements::default()),
            "the policy's resources win"
        );
    }

    #[test]
    fn secrets_reach_the_sidecar_only_as_secret_references() {
        let mut ic = sample::policy();
        let c = container(&ic, "img");
        assert_eq!(
            secret_ref(&c, "IDEMQ_BROKER_URL"),
            ("rabbitmq-orders".into(), "url".into())
        );
        assert_eq!(
            secret_ref(&c, "IDEMQ_REDIS_PASSWORD").0,
            "orders-idemq-redis"
        );
        assert_eq!(
            env_of(&c, "IDEMQ_REDIS_URL").value.as_deref(),
            Some("redis://orders-idemq-redis:6379")
        );

        ic.spec.store.mode = StoreMode::External;
        ic.spec.store.external = Some(ExternalStore {
            secret_ref: SecretKeyRef {
                name: "shared-redis".into(),
                key: "uri".into(),
            },
            cluster: false,
            sentinel: None,
            ca_key: Some("ca.pem".into()),
        });
        let c = container(&ic, "img");
        assert_eq!(
            secret_ref(&c, "IDEMQ_REDIS_URL"),
            ("shared-redis".into(), "uri".into())
        );
        assert_eq!(
            secret_ref(&c, "IDEMQ_REDIS_CA"),
            ("shared-redis".into(), "ca.pem".into()),
            "the private CA comes from the Secret"
        );
        assert!(c
            .env
            .iter()
            .flatten()
            .all(|e| e.name != "IDEMQ_REDIS_PASSWORD"));
    }

    #[test]
    fn a_managed_store_with_replicas_is_given_as_its_sentinels() {
        let mut ic = sample::policy();
        ic.spec.store.managed = Some(crate::crd::ManagedStore {
            replicas: Some(2),
            ..Default::default()
        });
        let c = container(&ic, "img");
        assert_eq!(
            env_of(&c, "IDEMQ_REDIS_URL").value.as_deref(),
            Some(
                "redis://orders-idemq-redis-0.orders-idemq-redis.shop.svc:26379,\
                 redis://orders-idemq-redis-1.orders-idemq-redis.shop.svc:26379,\
                 redis://orders-idemq-redis-2.orders-idemq-redis.shop.svc:26379"
            )
        );
        assert_eq!(
            secret_ref(&c, "IDEMQ_REDIS_PASSWORD"),
            ("orders-idemq-redis".to_string(), "password".to_string()),
            "the Sentinels ask for the store's password too"
        );
    }

    /// The Secret and key of `c`'s variable `name`.
    fn secret_ref(c: &Container, name: &str) -> (String, String) {
        secret_key_ref(&env_of(c, name))
    }

    #[test]
    fn a_zeromq_sidecar_declares_its_port_learns_its_address_and_gets_curve_keys_by_reference() {
        let mut ic = sample::zeromq_policy();
        let c = container(&ic, "img");
        let port = c
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some("idemq-zmq"))
            .expect("the ZeroMQ port");
        assert_eq!(port.container_port, 5555);
        let pod_ip = env_of(&c, "POD_IP")
            .value_from
            .and_then(|v| v.field_ref)
            .expect("downward API");
        assert_eq!(pod_ip.field_path, "status.podIP");
        for (var, key) in [
            ("IDEMQ_ZMQ_SERVER_SECRET_KEY", "serverSecretKey"),
            ("IDEMQ_ZMQ_CLIENT_KEYS", "clientPublicKeys"),
        ] {
            let e = env_of(&c, var);
            assert_eq!(e.value, None, "a reference, not a value");
            assert_eq!(secret_key_ref(&e), ("zeromq-orders".into(), key.into()));
        }
        let additions = pod_additions(&ic, "h", None, "img");
        assert_eq!(
            additions
                .labels
                .get("idemq.dev/zeromq-endpoint")
                .map(String::as_str),
            Some("orders"),
            "the label the Service selects"
        );

        let zmq = ic.spec.broker.zeromq.as_mut().expect("zeromq");
        zmq.curve = None;
        zmq.plain = Some(true);
        let c = container(&ic, "img");
        assert!(
            !c.env
                .iter()
                .flatten()
                .any(|e| e.name.starts_with("IDEMQ_ZMQ")),
            "plain: no keys"
        );
        let other = pod_additions(&sample::policy(), "h", None, "img");
        assert!(!other.labels.contains_key("idemq.dev/zeromq-endpoint"));
    }

    /// The dead-letter choices of a ZeroMQ spec, built from YAML as a user
    /// writes them.
    fn zeromq_dead_letters(ic: &mut IdempotentConsumer, yaml: &str) {
        ic.spec.broker.zeromq.as_mut().expect("zeromq").dead_letter =
            serde_yaml::from_str(yaml).expect("a deadLetter");
    }

    #[test]
    fn a_zeromq_dead_letter_broker_is_reached_through_secret_references_only() {
        let refs = |ic: &IdempotentConsumer| -> Vec<(String, String, String)> {
            broker_env(ic)
                .into_iter()
                .filter(|e| e.name.starts_with("IDEMQ_") && !e.name.starts_with("IDEMQ_ZMQ"))
                .map(|e| {
                    assert_eq!(e.value, None, "a reference, not a value");
                    let (secret, key) = secret_key_ref(&e);
                    (e.name, secret, key)
                })
                .collect()
        };
        let triple = |var: &str, secret: &str, key: &str| {
            (var.to_string(), secret.to_string(), key.to_string())
        };
        let mut ic = sample::zeromq_policy();
        assert_eq!(
            refs(&ic),
            [],
            "a ZeroMQ endpoint: nothing but the CURVE keys"
        );

        zeromq_dead_letters(
            &mut ic,
            "rabbitmq: { connectionSecretRef: { name: rabbitmq-dead, key: amqp }, exchange: dlx, routingKey: orders }",
        );
        assert_eq!(
            refs(&ic),
            [triple("IDEMQ_BROKER_URL", "rabbitmq-dead", "amqp")]
        );

        zeromq_dead_letters(
            &mut ic,
            "kafka: { connectionSecretRef: { name: kafka-dead }, topic: orders.dead }",
        );
        assert_eq!(
            refs(&ic),
            [triple(
                "IDEMQ_KAFKA_BOOTSTRAP_SERVERS",
                "kafka-dead",
                "bootstrapServers"
            )]
        );
        assert_eq!(volumes(&ic).len(), 1, "the config only: no CA asked for");

        zeromq_dead_letters(
            &mut ic,
            "kafka: { connectionSecretRef: { name: kafka-dead, caKey: ca.crt }, topic: orders.dead, securityProtocol: saslSsl, saslMechanism: scramSha512 }",
        );
        assert_eq!(
            refs(&ic),
            [
                triple(
                    "IDEMQ_KAFKA_BOOTSTRAP_SERVERS",
                    "kafka-dead",
                    "bootstrapServers"
                ),
                triple("IDEMQ_KAFKA_USERNAME", "kafka-dead", "username"),
                triple("IDEMQ_KAFKA_PASSWORD", "kafka-dead", "password"),
            ]
        );
        let (ca, mount) = volumes(&ic).pop().expect("the CA volume");
        let source = ca.secret.expect("a Secret volume");
        assert_eq!(source.secret_name.as_deref(), Some("kafka-dead"));
        assert_eq!(
            source.items.expect("one key")[0].key,
            "ca.crt",
            "the CA bundle's key"
        );
        assert_eq!(mount.mount_path, labels::KAFKA_CA_MOUNT);
    }

    #[test]
    fn jetstream_credentials_reach_the_sidecar_only_as_secret_references() {
        let mut ic = sample::jetstream_policy();
        let refs = |ic: &IdempotentConsumer| -> Vec<(String, String, String)> {
            broker_env(ic)
                .into_iter()
                .map(|e| {
                    assert_eq!(e.value, None, "a reference, not a value");
                    let (secret, key) = secret_key_ref(&e);
                    (e.name, secret, key)
                })
                .collect()
        };
        let pair =
            |var: &str, key: &str| (var.to_string(), "nats-orders".to_string(), key.to_string());
        assert_eq!(
            refs(&ic),
            [
                pair("IDEMQ_BROKER_URL", "url"),
                pair("IDEMQ_BROKER_USER", "username"),
                pair("IDEMQ_BROKER_PASSWORD", "password")
            ]
        );
        let js = ic.spec.broker.jetstream.as_mut().expect("jetstream");
        js.auth = crate::crd::NatsAuth::Creds;
        assert_eq!(
            refs(&ic),
            [
                pair("IDEMQ_BROKER_URL", "url"),
                pair("IDEMQ_NATS_CREDS", "creds")
            ]
        );
        let js = ic.spec.broker.jetstream.as_mut().expect("jetstream");
        js.auth = crate::crd::NatsAuth::Token;
        assert_eq!(
            refs(&ic),
            [
                pair("IDEMQ_BROKER_URL", "url"),
                pair("IDEMQ_NATS_TOKEN", "token")
            ]
        );
    }

    #[test]
    fn kafka_connection_reaches_the_sidecar_only_as_secret_references() {
        let mut ic = sample::kafka_policy();
        let c = container(&ic, "img");
        assert_eq!(
            secret_ref(&c, "IDEMQ_KAFKA_BOOTSTRAP_SERVERS"),
            ("kafka-orders".into(), "bootstrapServers".into())
        );
        assert!(
            c.env
                .iter()
                .flatten()
                .all(|e| e.name != "IDEMQ_KAFKA_PASSWORD" && e.name != "IDEMQ_BROKER_URL"),
            "no credentials without SASL, no AMQP URL"
        );
        assert_eq!(c.volume_mounts.as_ref().map(Vec::len), Some(1));

        let kafka = ic.spec.broker.kafka.as_mut().expect("kafka");
        kafka.security_protocol = KafkaSecurityProtocol::SaslSsl;
        kafka.sasl_mechanism = Some(crate::crd::SaslMechanism::ScramSha256);
        kafka.connection_secret_ref.ca_key = Some("ca.pem".into());
        let c = container(&ic, "img");
        assert_eq!(
            secret_ref(&c, "IDEMQ_KAFKA_USERNAME"),
            ("kafka-orders".into(), "username".into())
        );
        assert_eq!(
            secret_ref(&c, "IDEMQ_KAFKA_PASSWORD"),
            ("kafka-orders".into(), "password".into())
        );
        assert!(
            c.env.iter().flatten().all(|e| e
                .value
                .as_deref()
                .is_none_or(|v| !v.contains("kafka-orders"))),
            "every Kafka value is a reference"
        );
        // The CA bundle: a file from the Secret, where the config says.
        let patch = workload_patch(&ic, "abc", Some("def"), "img").expect("a workload");
        let pod = &patch["spec"]["template"]["spec"];
        assert_eq!(pod["volumes"][1]["secret"]["secretName"], "kafka-orders");
        assert_eq!(pod["volumes"][1]["secret"]["items"][0]["key"], "ca.pem");
        assert_eq!(pod["volumes"][1]["secret"]["items"][0]["path"], "ca.crt");
        let mount = &pod["initContainers"][0]["volumeMounts"][1];
        assert_eq!(
            format!("{}/ca.crt", mount["mountPath"].as_str().unwrap_or_default()),
            crate::render::config::sidecar_config(&ic)
                .expect("renders")
                .broker
                .and_then(|b| b.kafka)
                .and_then(|k| k.ca_file)
                .expect("a CA file")
        );
        assert_eq!(mount["readOnly"], true);
    }

    #[test]
    fn an_mqtt_ca_bundle_is_mounted_from_the_connection_secret_where_the_config_says() {
        let mut ic = sample::mqtt_policy();
        let pod = |ic: &IdempotentConsumer| {
            workload_patch(ic, "abc", Some("def"), "img").expect("a workload")["spec"]["template"]
                ["spec"]
                .clone()
        };
        assert_eq!(
            pod(&ic)["volumes"].as_array().map(Vec::len),
            Some(1),
            "no CA volume without caKey"
        );
        let mqtt = ic.spec.broker.mqtt.as_mut().expect("mqtt");
        mqtt.ca_key = Some("ca.pem".into());
        let secret = mqtt.connection_secret_ref.name.clone();
        let pod = pod(&ic);
        assert_eq!(pod["volumes"][1]["name"], labels::MQTT_CA_VOLUME);
        assert_eq!(pod["volumes"][1]["secret"]["secretName"], secret.as_str());
        assert_eq!(pod["volumes"][1]["secret"]["items"][0]["key"], "ca.pem");
        let mount = &pod["initContainers"][0]["volumeMounts"][1];
        assert_eq!(mount["name"], labels::MQTT_CA_VOLUME);
        assert_eq!(mount["readOnly"], true);
        let path = format!(
            "{}/{}",
            mount["mountPath"].as_str().unwrap_or_default(),
            pod["volumes"][1]["secret"]["items"][0]["path"]
                .as_str()
                .unwrap_or_default()
        );
        assert_eq!(
            Some(path),
            crate::render::config::sidecar_config(&ic)
                .expect("renders")
                .broker
                .and_then(|b| b.mqtt)
                .and_then(|m| m.ca_file),
            "the sidecar reads the CA where it is mounted"
        );
    }

    #[test]
    fn the_pubsub_key_reaches_the_sidecar_as_a_file_from_the_secret_never_in_the_config_map() {
        let ic = sample::pubsub_policy();
        let c = container(&ic, "img");
        assert!(
            c.env.iter().flatten().all(|e| !e.name.contains("BROKER")
                && !serde_json::to_string(e)
                    .expect("json")
                    .contains("pubsub-orders")),
            "no broker variable: the key is a file"
        );
        let patch = workload_patch(&ic, "abc", Some("def"), "img").expect("a workload");
        let pod = &patch["spec"]["template"]["spec"];
        assert_eq!(pod["volumes"][1]["name"], "idemq-pubsub-key");
        assert_eq!(pod["volumes"][1]["secret"]["secretName"], "pubsub-orders");
        assert_eq!(pod["volumes"][1]["secret"]["items"][0]["key"], "key.json");
        let mount = &pod["initContainers"][0]["volumeMounts"][1];
        assert_eq!(mount["readOnly"], true);
        let (cm, _) = crate::render::config::config_map(&ic).expect("renders");
        let yaml = cm
            .data
            .as_ref()
            .and_then(|d| d.get(labels::CONFIG_KEY))
            .expect("sidecar.yaml");
        let config = idemq_sidecar::config::Config::from_yaml(yaml).expect("the sidecar takes it");
        let pubsub = config.broker.and_then(|b| b.pubsub).expect("broker.pubsub");
        assert_eq!(
            (pubsub.project.as_str(), pubsub.subscription.as_str()),
            ("shop-prod", "orders-billing")
        );
        assert_eq!(
            pubsub.credentials_file,
            Some(format!(
                "{}/key.json",
                mount["mountPath"].as_str().unwrap_or_default()
            )),
            "the config names the mounted file"
        );
        assert_eq!(
            config.dedup.key,
            idemq_sidecar::config::KeySource::Attribute {
                name: "event-id".into()
            }
        );
        assert!(
            !yaml.contains("private_key") && !yaml.contains("pubsub-orders"),
            "no key, not even the Secret's name, in the ConfigMap: {yaml}"
        );
    }

    #[test]
    fn gate_mode_exposes_the_claim_port_and_needs_no_broker_secret() {
        let mut ic = sample::policy();
        ic.spec.delivery.mode = DeliveryMode::Gate;
        let c = container(&ic, "img");
        assert!(c.env.iter().flatten().all(|e| e.name != "IDEMQ_BROKER_URL"));
        assert!(c.ports.iter().flatten().any(|p| p.container_port == 7071));
    }

    #[test]
    fn patch_holds_only_idemqs_fields() {
        let patch =
            workload_patch(&sample::policy(), "abc", Some("def"), "img").expect("a workload");
        assert_eq!(patch["kind"], "Deployment");
        assert_eq!(patch["metadata"]["name"], "orders-worker");
        assert_eq!(
            patch["spec"]["template"]["metadata"]["annotations"]["idemq.dev/config-hash"],
            "abc"
        );
        assert_eq!(
            patch["spec"]["template"]["metadata"]["annotations"]["idemq.dev/secrets-hash"],
            "def"
        );
        let offline = workload_patch(&sample::policy(), "abc", None, "img").expect("a workload");
        assert!(offline["spec"]["template"]["metadata"]["annotations"]
            .get("idemq.dev/secrets-hash")
            .is_none());
        let pod = &patch["spec"]["template"]["spec"];
        assert_eq!(
            pod.as_object().map(|o| o.len()),
            Some(2),
            "initContainers and volumes only"
        );
        assert_eq!(pod["initContainers"][0]["name"], "idemq-sidecar");
        assert_eq!(pod["volumes"][0]["configMap"]["name"], "orders-idemq");
        assert!(
            patch["spec"].get("replicas").is_none(),
            "the app owner keeps replicas"
        );
        assert_eq!(
            withdrawal_patch(&sample::policy())
                .expect("a workload")
                .get("spec"),
            None
        );
    }

    fn pod(json: Value) -> Pod {
        serde_json::from_value(json).expect("pod")
    }

    /// `pod` with `patch` applied, as the API server would.
    fn patched(pod: &Pod, patch: &[Value]) -> Pod {
        let mut doc = serde_json::to_value(pod).expect("json");
        let patch: json_patch::Patch =
            serde_json::from_value(Value::Array(patch.to_vec())).expect("a JSON patch");
        json_patch::patch(&mut doc, &patch).expect("the patch applies");
        serde_json::from_value(doc).expect("still a pod")
    }

    #[test]
    fn a_pod_gets_what_the_pod_template_gets() {
        let mut ic = sample::policy();
        ic.spec.injection = crate::crd::Injection::Pod;
        let bare = pod(json!({
            "metadata": { "generateName": "worker-" },
            "spec": { "containers": [{ "name": "app", "image": "app:1" }] }
        }));
        let full = pod(json!({
            "metadata": { "generateName": "worker-", "labels": { "app": "worker" },
                          "annotations": { "team": "orders" } },
            "spec": { "initContainers": [{ "name": "migrate", "image": "app:1" }],
                      "containers": [{ "name": "app", "image": "app:1" }],
                      "volumes": [{ "name": "data", "emptyDir": {} }] }
        }));
        let template = {
            let mut ic = sample::policy();
            ic.spec.injection = crate::crd::Injection::Workload;
            workload_patch(&ic, "abc", None, "img").expect("a workload")["spec"]["template"].clone()
        };
        for before in [bare, full] {
            let after = patched(
                &before,
                &pod_patch(&before, pod_additions(&ic, "abc", None, "img")),
            );
            let json = serde_json::to_value(&after).expect("json");
            for (key, value) in template["metadata"]["labels"].as_object().expect("labels") {
                assert_eq!(&json["metadata"]["labels"][key], value);
            }
            assert_eq!(
                json["metadata"]["annotations"]["idemq.dev/config-hash"],
                "abc"
            );
            let spec = after.spec.clone().expect("spec");
            let init = spec.init_containers.expect("init containers");
            assert_eq!(
                json!(init.last()),
                template["spec"]["initContainers"][0],
                "the same sidecar, after the pod's own init containers"
            );
            assert_eq!(
                json!(spec.volumes.expect("volumes").last()),
                template["spec"]["volumes"][0]
            );
            assert_eq!(spec.containers.len(), 1, "the app container is untouched");
            if before.metadata.labels.is_some() {
                assert_eq!(json["metadata"]["labels"]["app"], "worker");
                assert_eq!(json["metadata"]["annotations"]["team"], "orders");
                assert_eq!(init[0].name, "migrate");
            }
            assert!(
                pod_patch(&after, pod_additions(&ic, "abc", None, "img")).is_empty(),
                "a pod that has the sidecar is left as it is"
            );
        }
    }
}
