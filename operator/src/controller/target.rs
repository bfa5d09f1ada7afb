//! The target step. With injection: workload, the sidecar, its config volume
//! and the config-hash and secrets-hash annotations applied to the target workload's pod
//! template (server-side apply, so only idemq's fields are touched), and
//! withdrawn on cleanup. With injection: pod, nothing is written: the
//! admission webhook ([`crate::webhook`]) adds the sidecar to each new
//! selected pod, and this step counts the running pods that carry the
//! current configuration.

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use kube::api::{Api, Patch};
use kube::{Client, ResourceExt};
use serde_json::Value;

use super::status::{verdict, Verdict};
use super::{apply_params, ssa, Context, Error};
use crate::crd::conditions::*;
use crate::crd::{IdempotentConsumer, Injection, TargetKind};
use crate::{labels, render};

pub fn kind_name(kind: &TargetKind) -> &'static str {
    match kind {
        TargetKind::Deployment => "Deployment",
        TargetKind::StatefulSet => "StatefulSet",
    }
}

/// "Deployment orders-worker", or "the pods selected by app=worker": the
/// target as a sentence names it.
pub fn describe(ic: &IdempotentConsumer) -> String {
    match (ic.spec.target.workload(), &ic.spec.target.selector) {
        (Some((kind, name)), _) => format!("{} {name}", kind_name(kind)),
        (None, Some(selector)) => match kube::core::Selector::try_from(selector.clone()) {
            Ok(selector) => format!("the pods selected by {selector}"),
            Err(_) => "the selected pods".to_string(),
        },
        (None, None) => "no target".to_string(),
    }
}

/// The target workload as JSON, if it exists.
async fn get_target(
    ic: &IdempotentConsumer,
    client: &Client,
    ns: &str,
) -> Result<Option<Value>, Error> {
    let (kind, name) = ic
        .spec
        .target
        .workload()
        .ok_or(render::RenderError::Target)?;
    let object = match kind {
        TargetKind::Deployment => Api::<Deployment>::namespaced(client.clone(), ns)
            .get_opt(name)
            .await?
            .map(|d| serde_json::to_value(d).unwrap_or(Value::Null)),
        TargetKind::StatefulSet => Api::<StatefulSet>::namespaced(client.clone(), ns)
            .get_opt(name)
            .await?
            .map(|s| serde_json::to_value(s).unwrap_or(Value::Null)),
    };
    Ok(object)
}

async fn patch_target(
    ic: &IdempotentConsumer,
    client: &Client,
    ns: &str,
    patch: &Value,
) -> Result<(), Error> {
    let (kind, name) = ic
        .spec
        .target
        .workload()
        .ok_or(render::RenderError::Target)?;
    let params = apply_params();
    match kind {
        TargetKind::Deployment => {
            Api::<Deployment>::namespaced(client.clone(), ns)
                .patch(name, &params, &Patch::Apply(patch))
                .await?;
        }
        TargetKind::StatefulSet => {
            Api::<StatefulSet>::namespaced(client.clone(), ns)
                .patch(name, &params, &Patch::Apply(patch))
                .await?;
        }
    }
    Ok(())
}

/// The resource named by the target's consumer annotation.
fn claimed_by(target: &Value) -> Option<&str> {
    target["metadata"]["annotations"][labels::CONSUMER_ANNOTATION].as_str()
}

/// The other resource that keeps the target, if one does.
///
/// One workload takes one policy: of the resources that target it and are
/// not being deleted, the oldest (by creationTimestamp, then name) keeps it,
/// whichever is reconciled first, so every reconcile agrees on the owner.
/// The candidates are those in the controller's cache and the one the
/// target's annotation names (read, in case the cache lags).
async fn conflicting(
    ic: &IdempotentConsumer,
    ctx: &Context,
    ns: &str,
    target: &Value,
) -> Result<Option<String>, Error> {
    let mut candidates = ctx.peers(ic);
    if let Some(owner) = claimed_by(target).filter(|o| *o != ic.name_any()) {
        if let Some(other) = Api::<IdempotentConsumer>::namespaced(ctx.client.clone(), ns)
            .get_opt(owner)
            .await?
        {
            candidates.push(other);
        }
    }
    let age = |r: &IdempotentConsumer| {
        (
            r.metadata
                .creation_timestamp
                .as_ref()
                .map(|t| t.0.as_second()),
            r.name_any(),
        )
    };
    let mine = age(ic);
    Ok(candidates
        .iter()
        .filter(|o| {
            o.metadata.deletion_timestamp.is_none()
                && o.spec.target == ic.spec.target
                && o.namespace() == ic.namespace()
                && o.name_any() != ic.name_any()
        })
        .map(age)
        .filter(|other| *other < mine)
        .min()
        .map(|(_, name)| name))
}

pub async fn inject(
    ic: &IdempotentConsumer,
    ctx: &Context,
    ns: &str,
    hash: &str,
    secrets: &str,
) -> Result<Verdict, Error> {
    let target = describe(ic);
    if ic.spec.injection == Injection::Pod {
        let counts = ctx.pod_counts(ic, hash);
        return Ok(verdict(
            SIDECAR_INJECTED,
            true,
            INJECTED_AT_CREATION,
            at_creation(&target, counts),
        ));
    }
    let Some(observed) = get_target(ic, &ctx.client, ns).await? else {
        return Ok(verdict(
            SIDECAR_INJECTED,
            false,
            TARGET_NOT_FOUND,
            format!("{target} does not exist in namespace {ns}"),
        ));
    };
    if let Some(owner) = conflicting(ic, ctx, ns, &observed).await? {
        return Ok(verdict(
            SIDECAR_INJECTED,
            false,
            TARGET_CONFLICT,
            format!(
                "{target} already takes its sidecar from IdempotentConsumer {owner}; one workload takes one policy, so this one leaves it untouched"
            ),
        ));
    }
    let desired = ssa::stamped(render::sidecar::workload_patch(
        ic,
        hash,
        Some(secrets),
        &ctx.sidecar_image,
    )?);
    if !ssa::up_to_date(&observed, &desired) {
        patch_target(ic, &ctx.client, ns, &desired).await?;
    }
    Ok(verdict(
        SIDECAR_INJECTED,
        true,
        INJECTED,
        format!("sidecar injected into {target}"),
    ))
}

/// Applying a patch with none of idemq's fields makes the API server drop
/// the fields only idemq owned: the sidecar, its volume, the annotation.
///
/// With injection: pod there is no workload to withdraw from: running pods
/// keep their sidecar until they are re-created, without it.
pub async fn withdraw(ic: &IdempotentConsumer, ctx: &Context, ns: &str) -> Result<(), Error> {
    if ic.spec.injection == Injection::Pod {
        return Ok(());
    }
    let Some(target) = get_target(ic, &ctx.client, ns).await? else {
        return Ok(());
    };
    // A resource that never got the workload leaves it alone.
    if claimed_by(&target).is_none_or(|owner| owner == ic.name_any()) {
        patch_target(ic, &ctx.client, ns, &render::sidecar::withdrawal_patch(ic)?).await?;
    }
    Ok(())
}

/// The SidecarInjected message with injection: pod: who gets the sidecar,
/// and how many running pods carry the current configuration.
pub fn at_creation(target: &str, counts: super::pods::Counts) -> String {
    let mut message = format!("{target} get the sidecar when they are created (admission webhook)");
    if counts.injected > 0 {
        message.push_str(&format!(
            "; {} of {} running pods carry the current configuration",
            counts.current, counts.injected
        ));
        if counts.current < counts.injected {
            message.push_str(
                ", the others take it when they are re-created (e.g. kubectl rollout restart)",
            );
        }
    }
    message
}
