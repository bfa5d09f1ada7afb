//! `rollout: evict`: a changed configuration reaches the running pods of a
//! resource with injection: pod.
//!
//! The webhook only sees pods being created, so a pod takes a new
//! configuration when it is re-created. Rather than writing the workload
//! (a `restartedAt` annotation in its pod template, the way `kubectl rollout
//! restart` does, which a GitOps tool would report as drift or revert), the
//! operator evicts the stale pods through the Eviction API: each eviction
//! honours the PodDisruptionBudgets (the API server refuses it with 429 when
//! a budget would be broken), and the pod's owner re-creates it, through the
//! webhook, with the current sidecar.
//!
//! One pod at a time: a pod is evicted only while every other running pod of
//! the resource is ready and none is terminating, so the roll waits for each
//! replacement to be ready (the pod watch brings the next reconcile). Only
//! pods that their owner re-creates are evicted: those of a ReplicaSet (a
//! Deployment's), a StatefulSet or a DaemonSet. A Job's pod would count as a
//! failure and a bare pod would be gone; they keep their configuration.

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, EvictParams};
use kube::runtime::events::EventType;
use kube::ResourceExt;

use super::pods;
use super::status::publish;
use super::Context;
use crate::crd::IdempotentConsumer;
use crate::labels;

/// The owner kinds that re-create an evicted pod.
const RECREATING: [&str; 3] = ["ReplicaSet", "StatefulSet", "DaemonSet"];
/// How soon to try again when an eviction was refused (a budget allows no
/// disruption now) or failed.
const RETRY: Duration = Duration::from_secs(30);

pub const POD_EVICTED: &str = "PodEvicted";

/// Whether `pod`'s owner re-creates it when it is evicted.
fn recreated(pod: &Pod) -> bool {
    pod.owner_references()
        .iter()
        .any(|o| o.controller == Some(true) && RECREATING.contains(&o.kind.as_str()))
}

/// The pod of `ic` to evict next so that it takes configuration `hash`: the
/// first by name of the stale pods that an owner re-creates; none while a
/// pod of `ic` is terminating or a running one is not ready.
pub fn next<'a>(
    ic: &IdempotentConsumer,
    hash: &str,
    all: impl IntoIterator<Item = &'a Pod>,
) -> Option<&'a Pod> {
    let mine: Vec<&Pod> = all.into_iter().filter(|p| pods::serves(ic, p)).collect();
    if mine
        .iter()
        .any(|p| p.metadata.deletion_timestamp.is_some() || (pods::running(p) && !pods::ready(p)))
    {
        return None;
    }
    mine.into_iter()
        .filter(|p| pods::running(p) && recreated(p))
        .filter(|p| p.annotations().get(labels::CONFIG_HASH).map(String::as_str) != Some(hash))
        .min_by_key(|p| p.name_any())
}

/// Evicts the next stale pod of `ic`, if any may go now. Returns how soon to
/// reconcile again when the roll must be retried (an eviction refused by a
/// PodDisruptionBudget, or failed); `None` when nothing is left to do or
/// the pod watch brings the next step.
pub async fn step(
    ic: &IdempotentConsumer,
    ctx: &Context,
    ns: &str,
    hash: &str,
) -> Option<Duration> {
    let (name, stale) = {
        let pods = ctx.pods();
        let pod = next(ic, hash, pods.iter().map(|p| p.as_ref()))?;
        let stale = pod
            .annotations()
            .get(labels::CONFIG_HASH)
            .cloned()
            .unwrap_or_else(|| "none".into());
        (pod.name_any(), stale)
    };
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
    match api.evict(&name, &EvictParams::default()).await {
        Ok(_) => {
            publish(
                ctx,
                ic,
                EventType::Normal,
                POD_EVICTED,
                format!("evicted pod {name} (configuration {stale}) so that it is re-created with configuration {hash}"),
            )
            .await;
            None
        }
        Err(kube::Error::Api(e)) if e.code == 404 => None,
        Err(kube::Error::Api(e)) if e.code == 429 => {
            tracing::info!(pod = %name, message = %e.message, "eviction refused for now (a PodDisruptionBudget allows no disruption)");
            Some(RETRY)
        }
        Err(e) => {
            tracing::warn!(pod = %name, error = %e, "cannot evict a pod with a stale configuration");
            Some(RETRY)
        }
    }
}
