//! The target step: the sidecar, its config volume and the config-hash and
//! secrets-hash annotations applied to the target workload's pod template (server-side
//! apply, so only idemq's fields are touched), and withdrawn on cleanup.

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use kube::api::{Api, Patch};
use kube::{Client, ResourceExt};
use serde_json::Value;

use super::status::{verdict, Verdict};
use super::{apply_params, ssa, Context, Error};
use crate::crd::conditions::*;
use crate::crd::{IdempotentConsumer, TargetKind};
use crate::{labels, render};

pub fn kind_name(kind: &TargetKind) -> &'static str {
    match kind {
        TargetKind::Deployment => "Deployment",
        TargetKind::StatefulSet => "StatefulSet",
    }
}

/// "Deployment orders-worker": the target as a sentence names it.
pub fn describe(ic: &IdempotentConsumer) -> String {
    format!(
        "{} {}",
        kind_name(&ic.spec.target.kind),
        ic.spec.target.name
    )
}

/// The target workload as JSON, if it exists.
async fn get_target(
    ic: &IdempotentConsumer,
    client: &Client,
    ns: &str,
) -> Result<Option<Value>, Error> {
    let name = &ic.spec.target.name;
    let object = match ic.spec.target.kind {
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
) -> Result<(), kube::Error> {
    let name = &ic.spec.target.name;
    let params = apply_params();
    match ic.spec.target.kind {
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
    ));
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
pub async fn withdraw(ic: &IdempotentConsumer, ctx: &Context, ns: &str) -> Result<(), Error> {
    let Some(target) = get_target(ic, &ctx.client, ns).await? else {
        return Ok(());
    };
    // A resource that never got the workload leaves it alone.
    if claimed_by(&target).is_none_or(|owner| owner == ic.name_any()) {
        patch_target(ic, &ctx.client, ns, &render::sidecar::withdrawal_patch(ic)).await?;
    }
    Ok(())
}
