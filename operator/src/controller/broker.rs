//! The broker step: reads the connection Secret and has the [`Binder`]
//! declare the consumer's queues (or check its topics); on cleanup, deletes
//! them if asked to.
//!
//! [`Binder`]: crate::broker::Binder

use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;
use kube::runtime::events::EventType;
use kube::ResourceExt;
use sha2::{Digest, Sha256};

use super::status::{publish, verdict, Verdict};
use super::{key_missing, secret_data, Context};
use crate::broker::{self, BindError, Connection, Plan};
use crate::crd::conditions::*;
use crate::crd::IdempotentConsumer;

/// The broker connection from the resource's Secret, or the verdict saying
/// why there is none.
async fn connection(
    ic: &IdempotentConsumer,
    ctx: &Context,
    ns: &str,
) -> Result<Connection, Verdict> {
    let Some(name) = Connection::secret_name(ic) else {
        return Err(no_broker());
    };
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    let in_broker = |v: Verdict| Verdict {
        type_: BROKER_BOUND,
        ..v
    };
    match secret_data(&secrets, name).await {
        Ok(Some(data)) => {
            Connection::from_secret(ic, &data).map_err(|key| in_broker(key_missing(name, &key)))
        }
        Ok(None) => Err(verdict(
            BROKER_BOUND,
            false,
            SECRET_NOT_FOUND,
            format!("Secret {name} does not exist"),
        )),
        Err(v) => Err(in_broker(v)),
    }
}

/// A spec without exactly one broker: validation stops it before this step,
/// so this is said for completeness.
fn no_broker() -> Verdict {
    verdict(
        BROKER_BOUND,
        false,
        INVALID_SPEC,
        crate::render::RenderError::Broker.to_string(),
    )
}

/// The digest of what the bindings depend on: the plan and the connection
/// (with its credentials), salted with the resource's uid so that the status
/// shows nothing that could be checked against a guessed password.
fn digest(ic: &IdempotentConsumer, plan: &Plan, connection: &Connection) -> String {
    let mut h = Sha256::new();
    h.update(ic.metadata.uid.as_deref().unwrap_or_default());
    h.update(format!("{plan:?}"));
    h.update(connection.identity());
    hex::encode(&h.finalize()[..12])
}

/// Declares the bindings when they may have changed (the plan or the
/// Secret's content differ from what was last bound) or a periodic check is
/// due; returns the verdict and, once bound, the digest to record.
pub async fn bind(ic: &IdempotentConsumer, ctx: &Context, ns: &str) -> (Verdict, Option<String>) {
    let Some(plan) = Plan::of(ic) else {
        return (no_broker(), None);
    };
    let connection = match connection(ic, ctx, ns).await {
        Ok(connection) => connection,
        Err(v) => return (v, None),
    };
    let digest = digest(ic, &plan, &connection);
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
        ctx.binder.bind(&connection, &plan).await
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
        Err(e @ BindError::ExchangeMismatch(..)) => {
            verdict(BROKER_BOUND, false, EXCHANGE_MISMATCH, e.to_string())
        }
        Err(e @ BindError::ExchangeNotFound(_)) => {
            verdict(BROKER_BOUND, false, EXCHANGE_NOT_FOUND, e.to_string())
        }
        Err(e @ BindError::TopicNotFound(_)) => {
            verdict(BROKER_BOUND, false, TOPIC_NOT_FOUND, e.to_string())
        }
        Err(e @ BindError::StreamNotFound(_)) => {
            verdict(BROKER_BOUND, false, STREAM_NOT_FOUND, e.to_string())
        }
        Err(BindError::ConsumerMismatch(e)) => verdict(BROKER_BOUND, false, CONSUMER_MISMATCH, e),
        Err(e @ BindError::PubSubTopicNotFound(_)) => {
            verdict(BROKER_BOUND, false, TOPIC_NOT_FOUND, e.to_string())
        }
        Err(BindError::SubscriptionMismatch(e)) => {
            verdict(BROKER_BOUND, false, SUBSCRIPTION_MISMATCH, e)
        }
        Err(e @ BindError::PermissionDenied(_)) => {
            verdict(BROKER_BOUND, false, PERMISSION_DENIED, e.to_string())
        }
        Err(e @ BindError::AuthenticationFailed(_)) => {
            verdict(BROKER_BOUND, false, BROKER_AUTH_FAILED, e.to_string())
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
    let Some(plan) = Plan::of(ic) else {
        return;
    };
    // Deleting a namespace deletes its Secrets at once, while resources
    // wait for this finalizer: the queues then stay, and only a log line
    // can say so (no Event is accepted in a terminating namespace).
    let connection = match connection(ic, ctx, ns).await {
        Ok(connection) => connection,
        Err(v) => {
            tracing::warn!(name = %ic.name_any(), namespace = %ns, reason = v.reason, message = %v.message, "deleteOnCleanup: cannot read the broker Secret, the queues stay");
            publish(
                ctx,
                ic,
                EventType::Warning,
                "QueueDeleteFailed",
                format!("{}: the queues stay", v.message),
            )
            .await;
            return;
        }
    };
    let deleted = {
        let _permit = ctx.broker_operations.acquire().await;
        ctx.binder.delete_queues(&connection, &plan).await
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
