//! The last step of a reconcile: verdicts become status conditions and Events.
//!
//! Each step of the pipeline returns a [`Verdict`]; this module turns them
//! into conditions (keeping `lastTransitionTime` when nothing changed), writes
//! status only when it differs from what is stored, and publishes Events.

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{Api, Patch, PatchParams};
use kube::core::error_boundary::InvalidObject;
use kube::runtime::events::{Event, EventType};
use kube::{Resource, ResourceExt};
use serde_json::json;

use super::{Context, Error, Guarded};
use crate::crd::conditions::*;
use crate::crd::{IdempotentConsumer, IdempotentConsumerStatus};

/// One condition's verdict before it becomes a `Condition`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub type_: &'static str,
    pub ok: bool,
    pub reason: &'static str,
    pub message: String,
}

pub fn verdict(
    type_: &'static str,
    ok: bool,
    reason: &'static str,
    message: impl Into<String>,
) -> Verdict {
    Verdict {
        type_,
        ok,
        reason,
        message: message.into(),
    }
}

/// Turns verdicts into conditions, keeping `lastTransitionTime` of those
/// whose status did not change (so it tells when something last changed).
pub fn conditions(
    verdicts: &[Verdict],
    previous: &[Condition],
    generation: Option<i64>,
    now: &Time,
) -> Vec<Condition> {
    verdicts
        .iter()
        .map(|v| {
            let status = if v.ok { "True" } else { "False" }.to_string();
            let since = previous
                .iter()
                .find(|c| c.type_ == v.type_ && c.status == status)
                .map(|c| c.last_transition_time.clone())
                .unwrap_or_else(|| now.clone());
            Condition {
                type_: v.type_.to_string(),
                status,
                reason: v.reason.to_string(),
                message: v.message.clone(),
                observed_generation: generation,
                last_transition_time: since,
            }
        })
        .collect()
}

/// Whether `v` differs from the condition of its type in the stored status
/// (its Event is then news).
pub fn is_new(ic: &IdempotentConsumer, v: &Verdict) -> bool {
    let status = if v.ok { "True" } else { "False" };
    !ic.status.as_ref().is_some_and(|s| {
        s.conditions
            .iter()
            .any(|c| c.type_ == v.type_ && c.status == status && c.message == v.message)
    })
}

/// `StatePreserved`: False when the key definition changed since the
/// injected one (what was completed is forgotten), kept False for the rest of
/// that generation; None when nothing is to be said.
pub fn state_preserved(ic: &IdempotentConsumer, key_definition: &str) -> Option<Verdict> {
    let status = ic.status.as_ref()?;
    let previous = status.key_definition.as_deref()?;
    if previous != key_definition {
        return Some(verdict(
            STATE_PRESERVED,
            false,
            KEY_DEFINITION_CHANGED,
            "the key definition (key source or store partitions) changed: messages get other keys, so duplicates of messages completed before this change will not be stopped",
        ));
    }
    status
        .conditions
        .iter()
        .find(|c| {
            c.type_ == STATE_PRESERVED
                && c.status == "False"
                && c.observed_generation == ic.metadata.generation
        })
        .map(|c| {
            verdict(
                STATE_PRESERVED,
                false,
                KEY_DEFINITION_CHANGED,
                c.message.clone(),
            )
        })
}

/// The Ready verdict that sums up the others.
pub fn ready(verdicts: &[&Verdict]) -> Verdict {
    // A conflict is not something to wait for: say it as it is.
    if let Some(conflict) = verdicts.iter().find(|v| v.reason == TARGET_CONFLICT) {
        return verdict(READY, false, TARGET_CONFLICT, conflict.message.clone());
    }
    if verdicts.iter().all(|v| v.ok) {
        return verdict(
            READY,
            true,
            ALL_READY,
            "the sidecar is injected, the store is ready and the broker is bound",
        );
    }
    let waiting: Vec<_> = verdicts.iter().filter(|v| !v.ok).map(|v| v.type_).collect();
    verdict(
        READY,
        false,
        NOT_READY,
        format!("waiting for {}", waiting.join(", ")),
    )
}

/// Writes status when it differs from what is there; returns whether it did.
/// What a status write records besides the conditions; `None` keeps what
/// is stored.
#[derive(Debug, Default)]
pub struct Recorded {
    pub hash: Option<String>,
    pub binding: Option<String>,
    pub key_definition: Option<String>,
    /// With injection: pod, the running pods and those with the current configuration.
    pub pods: Option<super::pods::Counts>,
}

pub async fn write(
    ic: &IdempotentConsumer,
    ctx: &Context,
    verdicts: &[Verdict],
    recorded: Recorded,
) -> Result<bool, Error> {
    let previous = ic.status.clone().unwrap_or_default();
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    let status = IdempotentConsumerStatus {
        observed_generation: ic.metadata.generation,
        conditions: conditions(verdicts, &previous.conditions, ic.metadata.generation, &now),
        config_hash: recorded.hash.or(previous.config_hash.clone()),
        binding_hash: recorded.binding.or(previous.binding_hash.clone()),
        key_definition: recorded.key_definition.or(previous.key_definition.clone()),
        injected_pods: recorded.pods.map(|p| p.injected).or(previous.injected_pods),
        current_pods: recorded.pods.map(|p| p.current).or(previous.current_pods),
    };
    if status == previous {
        return Ok(false);
    }
    let api: Api<IdempotentConsumer> =
        Api::namespaced(ctx.client.clone(), &ic.namespace().unwrap_or_default());
    api.patch_status(
        &ic.name_any(),
        &PatchParams::default(),
        &Patch::Merge(json!({ "status": status })),
    )
    .await?;
    Ok(true)
}

/// Ready=False with reason `Malformed` and a Warning Event, once per
/// generation: writing status does not change the generation, so this does
/// not loop on its own write.
pub async fn report_malformed(invalid: &InvalidObject, ctx: &Context) -> Result<(), Error> {
    let meta = &invalid.metadata;
    let seen = (meta.uid.clone().unwrap_or_default(), meta.generation);
    let first = ctx
        .malformed
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(seen.clone());
    if !first {
        return Ok(());
    }
    let (name, ns) = (
        meta.name.clone().unwrap_or_default(),
        meta.namespace.clone().unwrap_or_default(),
    );
    tracing::warn!(%name, namespace = %ns, error = %invalid.error, "malformed IdempotentConsumer");
    let message = format!(
        "the resource does not match {}: {}",
        IdempotentConsumer::api_version(&()),
        invalid.error
    );
    let status = IdempotentConsumerStatus {
        observed_generation: meta.generation,
        conditions: conditions(
            &[verdict(READY, false, MALFORMED, message.clone())],
            &[],
            meta.generation,
            &Time(k8s_openapi::jiff::Timestamp::now()),
        ),
        ..IdempotentConsumerStatus::default()
    };
    let written = Api::<Guarded>::namespaced(ctx.client.clone(), &ns)
        .patch_status(
            &name,
            &PatchParams::default(),
            &Patch::Merge(json!({ "status": status })),
        )
        .await;
    if let Err(e) = written {
        ctx.malformed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&seen);
        return Err(e.into());
    }
    let reference = ObjectReference {
        api_version: Some(IdempotentConsumer::api_version(&()).into_owned()),
        kind: Some(IdempotentConsumer::kind(&()).into_owned()),
        name: meta.name.clone(),
        namespace: meta.namespace.clone(),
        uid: meta.uid.clone(),
        ..ObjectReference::default()
    };
    publish_to(ctx, &reference, EventType::Warning, MALFORMED, message).await;
    Ok(())
}

pub async fn publish(
    ctx: &Context,
    ic: &IdempotentConsumer,
    type_: EventType,
    reason: &str,
    note: String,
) {
    publish_to(ctx, &ic.object_ref(&()), type_, reason, note).await;
}

async fn publish_to(
    ctx: &Context,
    reference: &ObjectReference,
    type_: EventType,
    reason: &str,
    note: String,
) {
    let event = Event {
        type_,
        reason: reason.to_string(),
        note: Some(note),
        action: "Reconcile".to_string(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&event, reference).await {
        tracing::warn!(error = %e, "could not publish an event");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(secs: i64) -> Time {
        Time(k8s_openapi::jiff::Timestamp::from_second(secs).expect("time"))
    }

    #[test]
    fn transition_time_moves_only_when_the_status_does() {
        let first = conditions(
            &[verdict(READY, false, NOT_READY, "waiting")],
            &[],
            Some(1),
            &t(100),
        );
        let same = conditions(
            &[verdict(READY, false, NOT_READY, "still waiting")],
            &first,
            Some(2),
            &t(200),
        );
        assert_eq!(same[0].last_transition_time, t(100));
        assert_eq!(same[0].observed_generation, Some(2));
        let flipped = conditions(
            &[verdict(READY, true, ALL_READY, "ok")],
            &same,
            Some(2),
            &t(300),
        );
        assert_eq!(
            (
                flipped[0].status.as_str(),
                flipped[0].last_transition_time.clone()
            ),
            ("True", t(300))
        );
    }
}
