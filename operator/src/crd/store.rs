//! The `store` section of an `IdempotentConsumer`: a managed Redis (durable
//! or ephemeral, with replicas and Sentinel) or an external one.

use super::*;

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum StoreMode {
    /// The operator runs a Redis for this consumer.
    #[default]
    Managed,
    /// A Redis of yours, its URL in a Secret.
    External,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum Unavailable {
    #[default]
    FailClosed,
    PassThrough,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new("self.mode != 'external' || has(self.external)").message("store.external is required when store.mode is external"))]
#[x_kube(validation = kube::core::Rule::new("!has(self.durability) || self.durability != 'replicated' || self.mode == 'external' || (has(self.managed) && has(self.managed.replicas) && self.managed.replicas >= 2)").message("store.durability replicated needs replicas: set store.managed.replicas (2 or more), or use an external store with replicas"))]
pub struct StoreSpec {
    #[serde(default)]
    pub mode: StoreMode,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external: Option<ExternalStore>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub managed: Option<ManagedStore>,
    /// What the sidecar does while the store does not answer.
    #[serde(default)]
    pub unavailable: Unavailable,
    /// `replicated`: a completion waits until a replica holds it (`WAIT 1`)
    /// before the message is acknowledged; needs replicas: a managed store
    /// with `managed.replicas`, or an external Redis Cluster or primary with
    /// replicas.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub durability: Option<StoreDurability>,
    /// What the sidecar does when the store lost its state (default
    /// failClosed: consumption pauses until the reset is acknowledged with
    /// the annotation `idemq.dev/acknowledge-store-reset`).
    #[serde(default)]
    pub on_reset: OnReset,
    /// Hash tags (Redis Cluster slots) the consumer's keys spread over
    /// (default 1). Changing it forgets what was completed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1024))]
    pub partitions: Option<u16>,
    /// Peak messages per second, if known: sizes the store's hashes ahead of
    /// the observed rate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub expected_rate: Option<u32>,
}

impl StoreSpec {
    /// The external store, when the mode is external.
    pub fn external(&self) -> Option<&ExternalStore> {
        self.external
            .as_ref()
            .filter(|_| self.mode == StoreMode::External)
    }

    /// Whether the store is an external Redis Cluster.
    pub fn cluster(&self) -> bool {
        self.external().is_some_and(|e| e.cluster)
    }

    /// The primary's name, when the store is reached through Sentinels: an
    /// external store that names one, or a managed store with replicas.
    pub fn sentinel(&self) -> Option<&str> {
        if self.managed_replicas() > 0 {
            return Some(MANAGED_PRIMARY);
        }
        self.external()?.sentinel.as_deref()
    }

    /// Redis replicas beside the managed primary (0: one Redis, or an
    /// external store).
    pub fn managed_replicas(&self) -> u8 {
        match (&self.mode, &self.managed) {
            // The schema refuses replicas with ephemeral; an object stored
            // otherwise keeps its one ephemeral Redis.
            (StoreMode::Managed, Some(managed)) if !managed.ephemeral.unwrap_or(false) => {
                managed.replicas.unwrap_or(0)
            }
            _ => 0,
        }
    }
}

/// The name under which the Sentinels of a managed store monitor its
/// primary: each store has Sentinels of its own, so one name serves all.
pub const MANAGED_PRIMARY: &str = "idemq";

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum StoreDurability {
    /// A completion is acknowledged once the primary holds it.
    #[default]
    Local,
    /// Once a replica holds it too.
    Replicated,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum OnReset {
    #[default]
    FailClosed,
    Continue,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum AppendFsync {
    /// At most a second of completions lost on a crash of the node.
    #[default]
    Everysec,
    /// Nothing acknowledged is lost; every write waits for the disk.
    Always,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new(
    "!(has(self.cluster) && self.cluster && has(self.sentinel))"
).message("cluster and sentinel exclude each other: a Redis Cluster fails over by itself"))]
pub struct ExternalStore {
    /// Secret holding the Redis URL (`redis://` or `rediss://`, with its
    /// password); with `cluster`, seed nodes separated by commas; with
    /// `sentinel`, the Sentinels, likewise.
    pub secret_ref: SecretKeyRef,
    /// The Secret's URL names nodes of a Redis Cluster: the sidecar routes
    /// each call by slot and spreads the consumer's keys over
    /// `store.partitions` slots (set it to a few times the primaries).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cluster: bool,
    /// The name under which Redis Sentinels monitor the primary: the
    /// Secret's URL then names the Sentinels, and the sidecar follows the
    /// primary they name through failovers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub sentinel: Option<String>,
    /// Key in the same Secret holding the PEM certificate of a private CA
    /// that signed the `rediss://` server's certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub ca_key: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new("!has(self.replicas) || self.replicas == 0 || self.replicas >= 2").message("managed.replicas must be 0 (one Redis) or at least 2: each pod runs a Sentinel, and three Sentinels still hold their quorum of 2 when one pod is lost"))]
#[x_kube(validation = kube::core::Rule::new("!has(self.replicas) || self.replicas == 0 || !has(self.ephemeral) || !self.ephemeral").message("managed.replicas needs the durable store: remove ephemeral (each replica keeps its data on a claim of its own)"))]
pub struct ManagedStore {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Default: derived from `expectedKeys` (see the README).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Keep nothing on disk (a Deployment with an emptyDir, as before): a
    /// restart of the Redis pod forgets every completed key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ephemeral: Option<bool>,
    /// Size of the PersistentVolumeClaim (default 1Gi).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|k|M|G|T)?$"))]
    pub storage_size: Option<String>,
    /// StorageClass of the claim (default: the cluster's default class).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class_name: Option<String>,
    /// When the append-only file is flushed to disk (default everysec).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub append_fsync: Option<AppendFsync>,
    /// Completed keys retained at the peak (rate × retention; default
    /// 1,000,000): sizes the memory request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub expected_keys: Option<u64>,
    /// Redis replicas beside the primary (default 0: one Redis). 2 or more
    /// run a Sentinel in every pod, which promotes a replica when the primary
    /// is lost; the sidecars follow the primary they name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 6))]
    pub replicas: Option<u8>,
}
