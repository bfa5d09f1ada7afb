//! What the injected pods say: the `SidecarsReady` condition.
//!
//! The sidecar knows whether it consumes (its `/readyz` fails while the
//! application is starting, down or failing everything, or the store or
//! broker is away), and the kubelet writes that into each pod's status as the
//! sidecar container's `ready`. The operator watches the pods that carry the
//! consumer label (get/list/watch on pods, nothing more: the sidecar needs no
//! permission of its own) and turns them into one condition per resource.
//!
//! The watch keeps a trimmed copy of each pod (what the condition reads), and
//! triggers a reconcile only when something the condition reads changed, or
//! the pod is gone: pods change status often while they start, and a full
//! reconcile for each of those changes would be wasted.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::{DefaultHasher, Hash, Hasher};

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Container, Pod, PodSpec, PodStatus};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::ResourceExt;

use super::status::{verdict, Verdict};
use super::Guarded;
use crate::crd::conditions::*;
use crate::crd::IdempotentConsumer;
use crate::labels;

/// Not-ready pods named in the condition's message; the rest are counted.
const NAMED: usize = 5;

/// Keeps only what [`sidecars_ready`], [`counts`] and the roll
/// ([`super::rollout`]) read, so that a cache of many pods stays small:
/// labels, the config-hash annotation, the controlling owner, the sidecar's
/// place among the init containers, the phase, the Ready condition and the
/// sidecar's status.
pub fn trim(pod: &mut Pod) {
    pod.metadata.managed_fields = None;
    pod.metadata.annotations = pod.metadata.annotations.take().and_then(|mut a| {
        let hash = a.remove(labels::CONFIG_HASH)?;
        Some(BTreeMap::from([(labels::CONFIG_HASH.to_string(), hash)]))
    });
    pod.metadata.owner_references = pod.metadata.owner_references.take().map(|owners| {
        owners
            .into_iter()
            .filter(|o| o.controller == Some(true))
            .collect()
    });
    let has_sidecar = pod
        .spec
        .as_ref()
        .and_then(|s| s.init_containers.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.name == labels::SIDECAR_CONTAINER));
    pod.spec = has_sidecar.then(|| PodSpec {
        init_containers: Some(vec![Container {
            name: labels::SIDECAR_CONTAINER.to_string(),
            ..Container::default()
        }]),
        ..PodSpec::default()
    });
    pod.status = pod.status.take().map(|status| PodStatus {
        phase: status.phase,
        conditions: status
            .conditions
            .map(|c| c.into_iter().filter(|c| c.type_ == "Ready").collect()),
        init_container_statuses: status.init_container_statuses.map(|statuses| {
            statuses
                .into_iter()
                .filter(|s| s.name == labels::SIDECAR_CONTAINER)
                .collect()
        }),
        ..PodStatus::default()
    });
}

/// Whether `pod` runs idemq's sidecar (the managed Redis pods carry the
/// consumer label too, and do not).
fn injected(pod: &Pod) -> bool {
    pod.spec
        .as_ref()
        .and_then(|s| s.init_containers.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.name == labels::SIDECAR_CONTAINER))
}

/// Whether `pod` carries the consumer label of `ic`, in its namespace.
pub fn serves(ic: &IdempotentConsumer, pod: &Pod) -> bool {
    pod.namespace() == ic.namespace()
        && pod.labels().get(labels::CONSUMER_LABEL) == Some(&ic.name_any())
}

/// Whether the kubelet says `pod` is Ready (every container ready).
pub fn ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// A pod that counts: injected, not terminating, not finished.
pub fn running(pod: &Pod) -> bool {
    let finished = pod
        .status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .is_some_and(|p| p == "Succeeded" || p == "Failed");
    injected(pod) && pod.metadata.deletion_timestamp.is_none() && !finished
}

/// The sidecar's readiness in `pod`, and when it is not ready, why if the
/// kubelet says (a waiting reason such as CrashLoopBackOff).
fn sidecar_state(pod: &Pod) -> (bool, Option<String>) {
    let sidecar = pod
        .status
        .as_ref()
        .and_then(|s| s.init_container_statuses.as_ref())
        .and_then(|s| s.iter().find(|s| s.name == labels::SIDECAR_CONTAINER));
    match sidecar {
        Some(s) if s.ready => (true, None),
        Some(s) => (
            false,
            s.state
                .as_ref()
                .and_then(|state| state.waiting.as_ref())
                .and_then(|w| w.reason.clone()),
        ),
        None => (false, None),
    }
}

/// The `SidecarsReady` verdict of `ic` from the pods that carry its label:
/// True when every counted pod's sidecar is ready, False when one is not or
/// no pod runs the sidecar. The message names not-ready pods in name order
/// (so that an unchanged set of pods gives an unchanged status).
pub fn sidecars_ready<'a>(
    ic: &IdempotentConsumer,
    pods: impl IntoIterator<Item = &'a Pod>,
) -> Verdict {
    let (ns, name) = (ic.namespace(), ic.name_any());
    let mut ready = 0;
    let mut not_ready: BTreeMap<String, Option<String>> = BTreeMap::new();
    for pod in pods {
        if pod.namespace() != ns
            || pod.labels().get(labels::CONSUMER_LABEL) != Some(&name)
            || !running(pod)
        {
            continue;
        }
        match sidecar_state(pod) {
            (true, _) => ready += 1,
            (false, why) => {
                not_ready.insert(pod.name_any(), why);
            }
        }
    }
    let total = ready + not_ready.len();
    if total == 0 {
        return verdict(
            SIDECARS_READY,
            false,
            NO_PODS,
            "no running pod has the sidecar yet",
        );
    }
    if not_ready.is_empty() {
        return verdict(
            SIDECARS_READY,
            true,
            PODS_READY,
            format!("{ready} of {total} pods ready"),
        );
    }
    let mut named: Vec<String> = not_ready
        .iter()
        .take(NAMED)
        .map(|(pod, why)| match why {
            Some(why) => format!("{pod} ({why})"),
            None => pod.clone(),
        })
        .collect();
    if not_ready.len() > NAMED {
        named.push(format!("and {} more", not_ready.len() - NAMED));
    }
    verdict(
        SIDECARS_READY,
        false,
        PODS_NOT_READY,
        format!(
            "{ready} of {total} pods ready; not ready: {}",
            named.join(", ")
        ),
    )
}

fn config_hash(pod: &Pod) -> Option<&String> {
    pod.annotations().get(labels::CONFIG_HASH)
}

/// The running pods of a resource with injection: pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Counts {
    /// Running pods that carry the sidecar.
    pub injected: i32,
    /// Those of them whose config-hash annotation is `hash`, the current one.
    pub current: i32,
}

/// Counts the running pods of `ic` and those carrying configuration `hash`.
pub fn counts<'a>(
    ic: &IdempotentConsumer,
    hash: &str,
    pods: impl IntoIterator<Item = &'a Pod>,
) -> Counts {
    pods.into_iter()
        .filter(|pod| serves(ic, pod) && running(pod))
        .fold(Counts::default(), |c, pod| Counts {
            injected: c.injected + 1,
            current: c.current + i32::from(config_hash(pod).is_some_and(|h| h == hash)),
        })
}

/// The resource a pod's consumer label names.
pub fn owner(pod: &Pod) -> Option<ObjectRef<Guarded>> {
    let name = pod.labels().get(labels::CONSUMER_LABEL)?;
    Some(ObjectRef::new(name).within(&pod.namespace()?))
}

/// What [`sidecars_ready`] reads of one pod, as a number to compare.
fn fingerprint(pod: &Pod) -> u64 {
    let mut hasher = DefaultHasher::new();
    (
        pod.labels().get(labels::CONSUMER_LABEL),
        running(pod),
        ready(pod),
        sidecar_state(pod),
        config_hash(pod),
    )
        .hash(&mut hasher);
    hasher.finish()
}

/// The pods of a watch whose change may change a condition: those whose
/// fingerprint changed, and every deleted one (a deleted object need not
/// carry a deletion timestamp, so a predicate on its fields could miss it).
/// After a re-list, pods that no longer exist are forgotten.
pub fn changes<S>(events: S) -> impl Stream<Item = Result<Pod, watcher::Error>>
where
    S: Stream<Item = Result<watcher::Event<Pod>, watcher::Error>>,
{
    let mut seen: HashMap<String, u64> = HashMap::new();
    let mut relisted: HashSet<String> = HashSet::new();
    events.filter_map(move |event| {
        let changed = match event {
            Err(e) => Some(Err(e)),
            Ok(watcher::Event::Init) => {
                relisted.clear();
                None
            }
            Ok(watcher::Event::InitDone) => {
                seen.retain(|uid, _| relisted.contains(uid));
                relisted.clear();
                None
            }
            Ok(watcher::Event::Delete(pod)) => {
                seen.remove(pod.uid().as_deref().unwrap_or_default());
                Some(Ok(pod))
            }
            Ok(watcher::Event::Apply(pod)) | Ok(watcher::Event::InitApply(pod)) => {
                let uid = pod.uid().unwrap_or_default();
                relisted.insert(uid.clone());
                let print = fingerprint(&pod);
                (seen.insert(uid, print) != Some(print)).then_some(Ok(pod))
            }
        };
        std::future::ready(changed)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::pod;
    use serde_json::json;

    fn policy() -> IdempotentConsumer {
        crate::render::sample::policy()
    }

    #[test]
    fn every_sidecar_ready_is_true_and_one_not_ready_is_false_naming_it() {
        let pods = [
            pod("worker-b", "orders", Some(true)),
            pod("worker-a", "orders", Some(true)),
        ];
        let v = sidecars_ready(&policy(), &pods);
        assert_eq!(
            (v.ok, v.reason, v.message.as_str()),
            (true, PODS_READY, "2 of 2 pods ready")
        );
        let pods = [
            pod("worker-c", "orders", Some(false)),
            pod("worker-a", "orders", Some(true)),
            pod("worker-b", "orders", None),
        ];
        let v = sidecars_ready(&policy(), &pods);
        assert_eq!(
            (v.ok, v.reason, v.message.as_str()),
            (
                false,
                PODS_NOT_READY,
                "1 of 3 pods ready; not ready: worker-b, worker-c"
            )
        );
    }

    #[test]
    fn the_message_is_bounded_and_says_why_when_the_kubelet_does() {
        let mut pods: Vec<Pod> = (0..8)
            .map(|i| pod(&format!("worker-{i}"), "orders", Some(false)))
            .collect();
        pods[0]
            .status
            .as_mut()
            .and_then(|s| s.init_container_statuses.as_mut())
            .expect("statuses")[0]
            .state = serde_json::from_value(
            json!({ "waiting": { "reason": "CrashLoopBackOff", "message": "back-off 5m" } }),
        )
        .expect("state");
        let v = sidecars_ready(&policy(), &pods);
        assert_eq!(
            v.message,
            "0 of 8 pods ready; not ready: worker-0 (CrashLoopBackOff), worker-1, worker-2, worker-3, worker-4, and 3 more"
        );
    }

    #[test]
    fn other_consumers_redis_terminating_and_finished_pods_do_not_count() {
        let mut other = pod("other-1", "payments", Some(false));
        other.metadata.namespace = Some("shop".into());
        let mut elsewhere = pod("worker-x", "orders", Some(false));
        elsewhere.metadata.namespace = Some("staging".into());
        let mut redis = pod("orders-idemq-redis-0", "orders", None);
        redis.spec.as_mut().expect("spec").init_containers = None;
        let mut leaving = pod("worker-old", "orders", Some(false));
        leaving.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::now(),
            ));
        let mut done = pod("worker-done", "orders", Some(false));
        done.status.as_mut().expect("status").phase = Some("Failed".into());
        let pods = [
            other,
            elsewhere,
            redis,
            leaving,
            done,
            pod("worker-1", "orders", Some(true)),
        ];
        let v = sidecars_ready(&policy(), &pods);
        assert_eq!((v.ok, v.message.as_str()), (true, "1 of 1 pods ready"));
        let v = sidecars_ready(&policy(), &pods[..5]);
        assert_eq!((v.ok, v.reason), (false, NO_PODS));
    }

    #[test]
    fn a_trimmed_pod_reads_the_same_and_keeps_little() {
        let mut pods = [
            pod("worker-a", "orders", Some(true)),
            pod("worker-b", "orders", Some(false)),
        ];
        let before = sidecars_ready(&policy(), &pods);
        let size = serde_json::to_vec(&pods[0]).expect("json").len();
        for p in &mut pods {
            trim(p);
        }
        assert_eq!(sidecars_ready(&policy(), &pods), before);
        let trimmed = serde_json::to_vec(&pods[0]).expect("json").len();
        assert!(trimmed * 3 < size, "{size} bytes trimmed to {trimmed}");
        let mut redis = pod("orders-idemq-redis-0", "orders", None);
        redis.spec.as_mut().expect("spec").init_containers = None;
        trim(&mut redis);
        assert!(
            !injected(&redis),
            "trimming keeps a pod without the sidecar out"
        );
    }

    #[tokio::test]
    async fn only_changes_the_condition_reads_and_deletions_trigger() {
        let ready = pod("worker-a", "orders", Some(true));
        let mut restarted = ready.clone();
        restarted.metadata.resource_version = Some("2".into());
        let not_ready = pod("worker-a", "orders", Some(false));
        let other = pod("worker-b", "orders", Some(true));
        let events = futures::stream::iter(
            [
                watcher::Event::Init,
                watcher::Event::InitApply(ready.clone()),
                watcher::Event::InitApply(other.clone()),
                watcher::Event::InitDone,
                watcher::Event::Apply(restarted),
                watcher::Event::Apply(not_ready.clone()),
                watcher::Event::Apply(not_ready.clone()),
                watcher::Event::Delete(not_ready),
                // A re-list in which worker-b is gone without a Delete event,
                // then it comes back: it is news again.
                watcher::Event::Init,
                watcher::Event::InitDone,
                watcher::Event::Apply(other.clone()),
            ]
            .into_iter()
            .map(Ok),
        );
        let passed: Vec<(String, bool)> = changes(events)
            .map(|p| {
                let p = p.expect("pod");
                let ready = sidecar_state(&p).0;
                (p.name_any(), ready)
            })
            .collect()
            .await;
        assert_eq!(
            passed,
            [
                ("worker-a".to_string(), true),
                ("worker-b".to_string(), true),
                ("worker-a".to_string(), false),
                ("worker-a".to_string(), false),
                ("worker-b".to_string(), true),
            ]
        );
        assert_eq!(owner(&other), Some(ObjectRef::new("orders").within("shop")));
    }

    #[test]
    fn pods_with_the_current_hash_are_counted_and_the_hash_survives_trimming() {
        let with_hash = |name: &str, hash: &str| {
            let mut p = pod(name, "orders", Some(true));
            p.metadata
                .annotations
                .get_or_insert_default()
                .insert(labels::CONFIG_HASH.into(), hash.into());
            trim(&mut p);
            p
        };
        let mut done = with_hash("worker-done", "new");
        done.status.as_mut().expect("status").phase = Some("Succeeded".into());
        let pods = [
            with_hash("worker-a", "new"),
            with_hash("worker-b", "old"),
            pod("worker-c", "orders", Some(true)),
            with_hash("other", "new"),
            done,
        ];
        let mut other = pods[3].clone();
        other.metadata.labels = Some([(labels::CONSUMER_LABEL.into(), "payments".into())].into());
        let pods = [
            pods[0].clone(),
            pods[1].clone(),
            pods[2].clone(),
            other,
            pods[4].clone(),
        ];
        assert_eq!(
            counts(&policy(), "new", &pods),
            Counts {
                injected: 3,
                current: 1
            }
        );
    }
}
