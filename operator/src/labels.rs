//! Every name, label and annotation the operator writes, in one place.

use std::collections::BTreeMap;

use crate::crd::IdempotentConsumer;
use kube::ResourceExt;

/// The field manager of every server-side apply, and the managed-by label.
pub const MANAGER: &str = "idemq-operator";
pub const FINALIZER: &str = "idemq.dev/cleanup";
/// Pod-template annotation: changes with the sidecar config, so pods roll.
pub const CONFIG_HASH: &str = "idemq.dev/config-hash";
/// Pod-template annotation: changes with the content of the Secrets the
/// sidecar reads (broker connection, external store), so a rotation rolls.
pub const SECRETS_HASH: &str = "idemq.dev/secrets-hash";
/// Annotation whose value, a store reset record as the StoreReset condition
/// quotes it, acknowledges that reset and lets consumption resume.
pub const ACKNOWLEDGE_STORE_RESET: &str = "idemq.dev/acknowledge-store-reset";
pub const CONSUMER_LABEL: &str = "idemq.dev/consumer";
/// Pod label that lets a pod reach the admission webhook (its
/// objectSelector): only pods that carry it ever wait on the webhook.
pub const INJECT_LABEL: &str = "idemq.dev/inject";
pub const INJECT_ENABLED: &str = "enabled";
/// Annotation on a target workload: the resource whose sidecar it runs. The
/// first resource to claim a workload keeps it; others report a conflict.
pub const CONSUMER_ANNOTATION: &str = "idemq.dev/consumer";
/// Annotation on every applied object: the digest of what idemq applied, so
/// an apply that would change nothing is not sent.
pub const APPLIED_HASH: &str = "idemq.dev/applied-hash";
pub const SIDECAR_CONTAINER: &str = "idemq-sidecar";
pub const CONFIG_VOLUME: &str = "idemq-config";
pub const CONFIG_KEY: &str = "sidecar.yaml";
pub const CONFIG_MOUNT: &str = "/etc/idemq";
pub const REDIS_PASSWORD_KEY: &str = "password";
/// Keys of a Kafka connection Secret.
pub const KAFKA_BOOTSTRAP_SERVERS_KEY: &str = "bootstrapServers";
pub const KAFKA_USERNAME_KEY: &str = "username";
pub const KAFKA_PASSWORD_KEY: &str = "password";
/// Keys of a JetStream connection Secret, besides the URL's.
pub const NATS_USERNAME_KEY: &str = "username";
pub const NATS_PASSWORD_KEY: &str = "password";
pub const NATS_TOKEN_KEY: &str = "token";
pub const NATS_CREDS_KEY: &str = "creds";
/// Keys of an MQTT connection Secret with `auth: userPassword`.
pub const MQTT_USERNAME_KEY: &str = "username";
pub const MQTT_PASSWORD_KEY: &str = "password";
/// The Kafka CA bundle, mounted from the connection Secret (a file, since
/// librdkafka reads a CA location; not a secret, but it lives beside them).
pub const KAFKA_CA_VOLUME: &str = "idemq-kafka-ca";
pub const KAFKA_CA_MOUNT: &str = "/etc/idemq-kafka";
/// A broker CA bundle's file name in its mount.
pub const CA_FILE_NAME: &str = "ca.crt";

/// Where the sidecar reads the Kafka CA bundle.
pub fn kafka_ca_file() -> String {
    format!("{KAFKA_CA_MOUNT}/{CA_FILE_NAME}")
}
/// The MQTT CA bundle, mounted from the connection Secret as Kafka's is.
pub const MQTT_CA_VOLUME: &str = "idemq-mqtt-ca";
pub const MQTT_CA_MOUNT: &str = "/etc/idemq-mqtt";

/// Where the sidecar reads the MQTT CA bundle.
pub fn mqtt_ca_file() -> String {
    format!("{MQTT_CA_MOUNT}/{CA_FILE_NAME}")
}
/// The Pub/Sub service-account key, mounted from the credentials Secret
/// (the sidecar's client reads a key file).
pub const PUBSUB_KEY_VOLUME: &str = "idemq-pubsub-key";
pub const PUBSUB_KEY_MOUNT: &str = "/etc/idemq-pubsub";
pub const PUBSUB_KEY_NAME: &str = "key.json";

/// Where the sidecar reads the Pub/Sub service-account key.
pub fn pubsub_key_file() -> String {
    format!("{PUBSUB_KEY_MOUNT}/{PUBSUB_KEY_NAME}")
}
/// The ZeroMQ port's name on the sidecar container, which the Service targets.
pub const ZEROMQ_PORT_NAME: &str = "idemq-zmq";
/// Pod label of a ZeroMQ consumer's injected pods, which its Service and
/// NetworkPolicy select. Not the consumer label: the managed Redis's pods
/// carry that one too.
pub const ZEROMQ_ENDPOINT_LABEL: &str = "idemq.dev/zeromq-endpoint";
/// The variable the sidecar reads the pod's address from (downward API).
pub const POD_IP_ENV: &str = "POD_IP";
pub const ADMIN_PORT: u16 = 9090;
pub const GATE_PORT: u16 = 7071;
pub const REDIS_PORT: u16 = 6379;
/// The Sentinels' port, in every pod of a managed store with replicas.
pub const SENTINEL_PORT: u16 = 26379;
pub const DEFAULT_SIDECAR_IMAGE: &str = "ghcr.io/idemq/idemq-sidecar:0.1.0";
pub const DEFAULT_REDIS_IMAGE: &str = "redis:7.2-alpine";

/// The sidecar's consumer name: unique in the cluster, so consumers sharing an
/// external Redis never share keys.
pub fn consumer(ic: &IdempotentConsumer) -> String {
    format!("{}.{}", ic.namespace().unwrap_or_default(), ic.name_any())
}

/// The default durable JetStream consumer: the consumer's name with its dots
/// as underscores (NATS names take no dots; namespaces take no underscores
/// or dots, so no two resources share one).
pub fn jetstream_consumer(ic: &IdempotentConsumer) -> String {
    consumer(ic).replace('.', "_")
}

pub fn config_map(ic: &IdempotentConsumer) -> String {
    format!("{}-idemq", ic.name_any())
}

/// Name of a ZeroMQ consumer's Service and NetworkPolicy: the resource's, so
/// clients connect to `tcp://<name>.<namespace>.svc:<port>`.
pub fn zeromq_service(ic: &IdempotentConsumer) -> String {
    ic.name_any()
}

/// Name of the managed Redis Deployment, Service and password Secret.
pub fn redis(ic: &IdempotentConsumer) -> String {
    format!("{}-idemq-redis", ic.name_any())
}

/// Labels of every object owned by `ic`.
pub fn owned(ic: &IdempotentConsumer, component: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_string(), "idemq".to_string()),
        (
            "app.kubernetes.io/component".to_string(),
            component.to_string(),
        ),
        (
            "app.kubernetes.io/managed-by".to_string(),
            MANAGER.to_string(),
        ),
        (CONSUMER_LABEL.to_string(), ic.name_any()),
    ])
}

/// Labels that select the managed Redis pods.
pub fn redis_selector(ic: &IdempotentConsumer) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_string(), "idemq".to_string()),
        (
            "app.kubernetes.io/component".to_string(),
            "redis".to_string(),
        ),
        (CONSUMER_LABEL.to_string(), ic.name_any()),
    ])
}
