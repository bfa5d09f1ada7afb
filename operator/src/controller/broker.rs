//! The broker step: reads the connection Secret and has the [`Binder`]
//! declare the consumer's queues; on cleanup, deletes them if asked to.
//!
//! [`Binder`]: crate::broker::Binder

use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;
use kube::runtime::events::EventType;
use sha2::{Digest, Sha256};

use super::status::{publish, verdict, Verdict};
use super::{secret_value, Context};
use crate::broker::{self, BindError, Plan};
use crate::crd::conditions::*;
use crate::crd::IdempotentConsumer;

/// The connection URL, or the verdict saying why there is none.
async fn url(ic: &IdempotentConsumer, ctx: &Context, ns: &str) -> Result<String, Verdict> {
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    let r = broker::connection_secret(ic);
    match secret_value(&secrets, &r.name, &r.key).await {
        Ok(Some(url)) => Ok(url),
        Ok(None) => Err(verdict(
            BROKER_BOUND,
            false,
            SECRET_NOT_FOUND,
            format!("Secret {} does not exist", r.name),
        )),
        Err(v) => Err(Verdict {
            type_: BROKER_BOUND,
            ..v
        }),
    }
}

/// The digest of what the bindings depend on: the plan and the URL (with
/// its credentials), salted with the resource's uid so that the status shows
/// nothing that could be checked against a guessed password.
fn digest(ic: &IdempotentConsumer, plan: &Plan, url: &str) -> String {
    let mut h = Sha256::new();
    h.update(ic.metadata.uid.as_deref().unwrap_or_default());
    h.update(format!("{plan:?}"));
    h.update(url);
    hex::encode(&h.finalize()[..12])
}

/// Declares the bindings when they may have changed (the plan or the
/// Secret's content differ from what was last bound) or a periodic check is
/// due; returns the verdict and, once bound, the digest to record.
pub async fn bind(ic: &IdempotentConsumer, ctx: &Context, ns: &str) -> (Verdict, Option<String>) {
    let url = match url(ic, ctx, ns).await {
        Ok(url) => url,
        Err(v) => return (v, None),
    };
    let plan = Plan::of(ic);
    let digest = digest(ic, &plan, &url);
    let status = ic.status.as_ref();
    let unchanged = status.and_then(|s| s.binding_hash.as_deref()) == Some(digest.as_str())
        && status.is_some_and(|s| {
            s.conditions
                .iter()
                .any(|c| c.type_ == BROKER_BOUND && c.status == "True")
        });
    if unchanged && !ctx.recheck_due(ic) {
        return (
            verdict(BROKER_BOUND, true, BOUND, plan.describe()),
            Some(digest),
        );
    }
    let bound = {
        let _permit = ctx.broker_operations.acquire().await;
        ctx.binder.bind(&url, &plan).await
    };
    let verdict = match bound {
        Ok(()) => {
            return (
                verdict(BROKER_BOUND, true, BOUND, plan.describe()),
                Some(digest),
            )
        }
        Err(BindError::Unreachable(e)) => verdict(BROKER_BOUND, false, BROKER_UNREACHABLE, e),
        Err(e @ BindError::ArgumentsMismatch(_)) => {
            verdict(BROKER_BOUND, false, QUEUE_MISMATCH, e.to_string())
        }
        Err(e @ BindError::ExchangeNotFound(_)) => {
            verdict(BROKER_BOUND, false, EXCHANGE_NOT_FOUND, e.to_string())
        }
        Err(BindError::Refused(e)) => verdict(BROKER_BOUND, false, BROKER_REFUSED, e),
    };
    (verdict, None)
}

/// Deletes the queues when the spec asks for it; a failure is an Event, not
/// a reason to keep the resource from going away.
pub async fn unbind(ic: &IdempotentConsumer, ctx: &Context, ns: &str) {
    if !broker::delete_on_cleanup(ic) {
        return;
    }
    let Ok(url) = url(ic, ctx, ns).await else {
        return;
    };
    let deleted = {
        let _permit = ctx.broker_operations.acquire().await;
        ctx.binder.delete_queues(&url, &Plan::of(ic)).await
    };
    if let Err(e) = deleted {
        publish(
            ctx,
            ic,
            EventType::Warning,
            "QueueDeleteFailed",
            e.to_string(),
        )
        .await;
    }
}
