//! The target step: the sidecar, its config volume and the config-hash
//! annotation applied to the target workload's pod template (server-side
//! apply, so only idemq's fields are touched), and withdrawn on cleanup.

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use kube::api::{Api, Patch};
use kube::Client;

use super::status::{verdict, Verdict};
use super::{apply_params, Context, Error};
use crate::crd::conditions::*;
use crate::crd::{IdempotentConsumer, TargetKind};
use crate::render;

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

/// The target workload's API and whether it exists.
async fn target_exists(
    ic: &IdempotentConsumer,
    client: &Client,
    ns: &str,
) -> Result<bool, kube::Error> {
    let name = &ic.spec.target.name;
    Ok(match ic.spec.target.kind {
        TargetKind::Deployment => Api::<Deployment>::namespaced(client.clone(), ns)
            .get_opt(name)
            .await?
            .is_some(),
        TargetKind::StatefulSet => Api::<StatefulSet>::namespaced(client.clone(), ns)
            .get_opt(name)
            .await?
            .is_some(),
    })
}

async fn patch_target(
    ic: &IdempotentConsumer,
    client: &Client,
    ns: &str,
    patch: &serde_json::Value,
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

pub async fn inject(
    ic: &IdempotentConsumer,
    ctx: &Context,
    ns: &str,
    hash: &str,
) -> Result<Verdict, Error> {
    let target = describe(ic);
    if !target_exists(ic, &ctx.client, ns).await? {
        return Ok(verdict(
            SIDECAR_INJECTED,
            false,
            TARGET_NOT_FOUND,
            format!("{target} does not exist in namespace {ns}"),
        ));
    }
    let patch = render::sidecar::workload_patch(ic, hash, &ctx.sidecar_image);
    patch_target(ic, &ctx.client, ns, &patch).await?;
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
    if target_exists(ic, &ctx.client, ns).await? {
        patch_target(ic, &ctx.client, ns, &render::sidecar::withdrawal_patch(ic)).await?;
    }
    Ok(())
}
