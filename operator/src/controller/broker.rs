//! The broker step: reads the connection Secret and has the [`Binder`]
//! declare the consumer's queues (or check its topics), or, for a ZeroMQ
//! endpoint, applies its Service and NetworkPolicy; on cleanup, deletes the
//! queues if asked to (the endpoint's objects go with their owner).
//!
//! [`Binder`]: crate::broker::Binder

use k8s_openapi::api::core::v1::{Secret, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{Api, DeleteParams};
use kube::runtime::events::EventType;
use kube::ResourceExt;
use sha2::{Digest, Sha256};

use super::ssa::{apply_owned, owned_by, Owned};
use super::status::{publish, verdict, Verdict};
use super::{key_missing, secrets, unreadable, Context, Error};
use crate::broker::{self, zeromq, BindError, Connection, Plan, SecretProblem};
use crate::crd::conditions::*;
use crate::crd::{DeadLetterTarget, IdempotentConsumer};
use crate::render;

/// The data of Secret `name`, read once per reconcile through `read`, or
/// the BrokerBound verdict saying why there is none; `whose` follows the
/// name in the sentence for an absent Secret (" (the dead-letter
/// broker's)"), or is empty.
async fn read_secret(
    read: &mut secrets::Read,
    ctx: &Context,
    ns: &str,
    name: &str,
    whose: &str,
) -> Result<secrets::Data, Verdict> {
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    match read.data(&api, name).await {
        Ok(Some(data)) => Ok(data),
        Ok(None) => Err(verdict(
            BROKER_BOUND,
            false,
            SECRET_NOT_FOUND,
            format!("Secret {name}{whose} does not exist"),
        )),
        Err(e) => Err(in_broker(unreadable(name, &e))),
    }
}

/// A verdict of the shared Secret helpers, as the broker step's.
fn in_broker(v: Verdict) -> Verdict {
    Verdict {
        type_: BROKER_BOUND,
        ..v
    }
}

/// The broker connection from the resource's Secret, or the verdict saying
/// why there is none.
async fn connection(
    ic: &IdempotentConsumer,
    ctx: &Context,
    ns: &str,
    read: &mut secrets::Read,
) -> Result<Connection, Verdict> {
    let Some(name) = Connection::secret_name(ic) else {
        return Connection::without_secret(ic).ok_or_else(no_broker);
    };
    let data = read_secret(read, ctx, ns, name, "").await?;
    Connection::from_secret(ic, &data).map_err(|problem| match problem {
        SecretProblem::Missing(key) => in_broker(key_missing(name, &key)),
        SecretProblem::Invalid { key, problem } => verdict(
            BROKER_BOUND,
            false,
            CURVE_KEY_INVALID,
            format!("key {key:?} of Secret {name} {problem}"),
        ),
    })
}

/// A ZeroMQ endpoint's dead-letter broker Secret, when its dead letters go
/// to a broker: it exists and holds the keys the sidecars read, or the pods
/// would not start, with nothing on the resource to say why.
async fn dead_letter_secret(
    ic: &IdempotentConsumer,
    ctx: &Context,
    ns: &str,
    read: &mut secrets::Read,
) -> Result<(), Verdict> {
    let Some(dead) = ic.spec.broker.zeromq.as_ref().map(|z| &z.dead_letter) else {
        return Ok(());
    };
    let Some(name) = dead.secret_name() else {
        return Ok(());
    };
    let data = read_secret(read, ctx, ns, name, " (the dead-letter broker's)").await?;
    let value = |key: &str| broker::secret_value(&data, key);
    let checked = match dead.target() {
        Some(DeadLetterTarget::RabbitMq(r)) => value(&r.connection_secret_ref.key).map(drop),
        Some(DeadLetterTarget::Kafka(k)) => broker::kafka::Connection::from_secret_parts(
            &k.connection_secret_ref,
            k.security_protocol,
            k.sasl_mechanism,
            value,
        )
        .map(drop),
        Some(DeadLetterTarget::Endpoint(_)) | None => Ok(()),
    };
    checked.map_err(|key| in_broker(key_missing(name, &key)))
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
/// due; returns the verdict and, once bound, the digest to record. A ZeroMQ
/// endpoint's objects are applied on every reconcile instead (an apply that
/// would change nothing sends nothing). The Secrets go through `read`, so
/// the rest of the reconcile finds them there.
pub async fn bind(
    ic: &IdempotentConsumer,
    ctx: &Context,
    ns: &str,
    read: &mut secrets::Read,
) -> Result<(Verdict, Option<String>), Error> {
    let Some(plan) = Plan::of(ic) else {
        return Ok((no_broker(), None));
    };
    let connection = match connection(ic, ctx, ns, read).await {
        Ok(connection) => connection,
        Err(v) => return Ok((v, None)),
    };
    let digest = digest(ic, &plan, &connection);
    if let Plan::ZeroMq(endpoint) = &plan {
        if let Err(v) = dead_letter_secret(ic, ctx, ns, read).await {
            return Ok((v, None));
        }
        let verdict = expose(ic, ctx, ns, endpoint).await?;
        let bound = verdict.ok.then_some(digest);
        return Ok((verdict, bound));
    }
    Ok(declare(ic, ctx, plan, connection, digest).await)
}

/// The broker step proper: has the binder declare the plan.
async fn declare(
    ic: &IdempotentConsumer,
    ctx: &Context,
    plan: Plan,
    connection: Connection,
    digest: String,
) -> (Verdict, Option<String>) {
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

/// A ZeroMQ endpoint: applies the Service in front of the sidecars' port
/// and, when asked, the NetworkPolicy admitting only the selected clients
/// (one no longer asked for is deleted). An object of the same name that
/// is not this resource's is reported, never taken over.
async fn expose(
    ic: &IdempotentConsumer,
    ctx: &Context,
    ns: &str,
    plan: &zeromq::Plan,
) -> Result<Verdict, Error> {
    let uid = ic.metadata.uid.as_deref().unwrap_or_default();
    let services: Api<Service> = Api::namespaced(ctx.client.clone(), ns);
    let service = serde_json::to_value(render::zeromq::service(ic)?).unwrap_or_default();
    if let Some(v) =
        apply_endpoint_object(&services, "Service", &plan.service, service, uid).await?
    {
        return Ok(v);
    }
    let policies: Api<NetworkPolicy> = Api::namespaced(ctx.client.clone(), ns);
    match render::zeromq::network_policy(ic)? {
        Some(policy) => {
            let policy = serde_json::to_value(policy).unwrap_or_default();
            if let Some(v) =
                apply_endpoint_object(&policies, "NetworkPolicy", &plan.service, policy, uid)
                    .await?
            {
                return Ok(v);
            }
        }
        None => {
            // No longer asked for: ours goes.
            if let Err(v) = forbidden_as_verdict(
                delete_owned(&policies, &plan.service, uid).await,
                "NetworkPolicy",
                &plan.service,
            )? {
                return Ok(v);
            }
        }
    }
    Ok(verdict(BROKER_BOUND, true, BOUND, plan.describe()))
}

/// Applies one object of the endpoint; a verdict when it cannot be (the
/// name is another owner's, or the operator may not write it).
async fn apply_endpoint_object<K>(
    api: &Api<K>,
    kind: &str,
    name: &str,
    desired: serde_json::Value,
    uid: &str,
) -> Result<Option<Verdict>, Error>
where
    K: kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + serde::Serialize,
{
    Ok(
        match forbidden_as_verdict(apply_owned(api, name, desired, uid).await, kind, name)? {
            Ok(Owned::Applied(_)) => None,
            Ok(Owned::Taken) => Some(taken(kind, name)),
            Err(v) => Some(v),
        },
    )
}

/// An API refusal to the operator's own account (its RBAC lacks a verb) as
/// a verdict a person can act on; other errors stay errors (retried).
fn forbidden_as_verdict<T>(
    result: Result<T, Error>,
    kind: &str,
    name: &str,
) -> Result<Result<T, Verdict>, Error> {
    match result {
        Ok(t) => Ok(Ok(t)),
        Err(Error::Kube(kube::Error::Api(status))) if status.code == 403 => Ok(Err(verdict(
            BROKER_BOUND,
            false,
            PERMISSION_DENIED,
            format!(
                "the operator may not write {kind} {name}: {}; grant its service account get, create, patch and delete on {} (the chart's role does)",
                status.message,
                if kind == "Service" { "services" } else { "networkpolicies" }
            ),
        ))),
        Err(e) => Err(e),
    }
}

fn taken(kind: &str, name: &str) -> Verdict {
    verdict(
        BROKER_BOUND,
        false,
        NAME_TAKEN,
        format!("{kind} {name} exists and is not this resource's; delete or rename it, or give the resource another name"),
    )
}

/// Deletes a ZeroMQ endpoint's Service and NetworkPolicy on cleanup,
/// rather than leave them to the garbage collector while clients still
/// connect; absent ones, and those of someone else's, are left alone.
pub async fn withdraw_endpoint(
    ic: &IdempotentConsumer,
    ctx: &Context,
    ns: &str,
) -> Result<(), Error> {
    if ic.spec.broker.zeromq.is_none() {
        return Ok(());
    }
    let name = crate::labels::zeromq_service(ic);
    let uid = ic.metadata.uid.as_deref().unwrap_or_default();
    delete_owned(
        &Api::<Service>::namespaced(ctx.client.clone(), ns),
        &name,
        uid,
    )
    .await?;
    delete_owned(
        &Api::<NetworkPolicy>::namespaced(ctx.client.clone(), ns),
        &name,
        uid,
    )
    .await
}

/// Deletes `name` if it exists and `uid` controls it.
async fn delete_owned<K>(api: &Api<K>, name: &str, uid: &str) -> Result<(), Error>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match api.get_opt(name).await? {
        Some(object) if owned_by(&object, uid) => {
            match api.delete(name, &DeleteParams::background()).await {
                Ok(_) => Ok(()),
                Err(kube::Error::Api(status)) if status.is_not_found() => Ok(()),
                Err(e) => Err(e.into()),
            }
        }
        _ => Ok(()),
    }
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
    let connection = match connection(ic, ctx, ns, &mut secrets::Read::default()).await {
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
