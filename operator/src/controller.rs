//! The controller: reconciles each `IdempotentConsumer` into its ConfigMap, its
//! key store, its broker bindings and the sidecar in its target workload.
//!
//! Reconcile is level-based: it renders the desired objects (pure, see
//! [`crate::render`]), applies them with server-side apply under the
//! `idemq-operator` field manager, reads back what it cannot decide alone
//! (the target's existence, Secrets, the Redis rollout), and writes status
//! conditions. Nothing is remembered between reconciles but the per-object
//! back-off. A finalizer withdraws the sidecar and deletes what the resource
//! owns when it is deleted.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::core::error_boundary::InvalidObject;
use kube::core::DeserializeGuard;
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::finalizer::{finalizer, Event as Finalizer};
use kube::runtime::reflector::ObjectRef;
use kube::{Client, Resource, ResourceExt};
use serde_json::json;

use crate::broker::{BindError, Binder, Plan};
use crate::crd::conditions::*;
use crate::crd::{IdempotentConsumer, IdempotentConsumerStatus, StoreMode, TargetKind};
use crate::labels::{self, FINALIZER, MANAGER};
use crate::metrics::Metrics;
use crate::render::{self, RenderError};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    #[error("invalid spec: {0}")]
    InvalidSpec(#[from] RenderError),
}

impl Error {
    /// A bounded label for metrics.
    pub fn category(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::Finalizer(_) => "finalizer",
            Error::InvalidSpec(_) => "invalid_spec",
        }
    }
}

/// What every reconcile shares.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub binder: Arc<dyn Binder>,
    pub sidecar_image: String,
    pub metrics: Arc<Metrics>,
    /// Consecutive not-ready reconciles per object, for exponential back-off.
    failures: Mutex<HashMap<ObjectRef<IdempotentConsumer>, u32>>,
    /// Malformed objects already reported, by uid and generation.
    malformed: Mutex<HashSet<(String, Option<i64>)>>,
}

impl Context {
    pub fn new(
        client: Client,
        recorder: Recorder,
        binder: Arc<dyn Binder>,
        sidecar_image: String,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            client,
            recorder,
            binder,
            sidecar_image,
            metrics,
            failures: Mutex::new(HashMap::new()),
            malformed: Mutex::new(HashSet::new()),
        }
    }

    /// The next requeue of `ic`: a back-off that doubles with each
    /// consecutive failure (5s up to 5min) and resets on success.
    fn requeue(&self, ic: &IdempotentConsumer, ready: bool) -> Action {
        let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        let key = ObjectRef::from(ic);
        if ready {
            failures.remove(&key);
            return Action::requeue(Duration::from_secs(300));
        }
        let n = failures.entry(key).or_insert(0);
        *n = n.saturating_add(1);
        Action::requeue(backoff(*n))
    }
}

pub fn backoff(failures: u32) -> Duration {
    Duration::from_secs(
        5u64.saturating_mul(1 << failures.saturating_sub(1).min(6))
            .min(300),
    )
}

/// One condition's verdict before it becomes a `Condition`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub type_: &'static str,
    pub ok: bool,
    pub reason: &'static str,
    pub message: String,
}

fn verdict(
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

/// What the controller watches: an object that does not deserialize (a value
/// the schema let through but the types refuse, or an object stored under an
/// older schema) arrives as an error instead of breaking the watch of every
/// other object.
pub type Guarded = DeserializeGuard<IdempotentConsumer>;

/// The controller's entry point: reconciles a well-formed object, reports a
/// malformed one (a condition and an Event) and waits for it to change.
pub async fn reconcile_guarded(guard: Arc<Guarded>, ctx: Arc<Context>) -> Result<Action, Error> {
    match &guard.0 {
        Ok(ic) => reconcile(Arc::new(ic.clone()), ctx).await,
        Err(invalid) => {
            report_malformed(invalid, &ctx).await?;
            Ok(Action::await_change())
        }
    }
}

pub fn error_policy_guarded(guard: Arc<Guarded>, error: &Error, ctx: Arc<Context>) -> Action {
    match &guard.0 {
        Ok(ic) => error_policy(Arc::new(ic.clone()), error, ctx),
        Err(invalid) => {
            tracing::warn!(name = ?invalid.metadata.name, error = %error, "could not report a malformed IdempotentConsumer");
            Action::requeue(backoff(3))
        }
    }
}

/// Ready=False with reason `Malformed` and a Warning Event, once per
/// generation: writing status does not change the generation, so this does
/// not loop on its own write.
async fn report_malformed(invalid: &InvalidObject, ctx: &Context) -> Result<(), Error> {
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
        config_hash: None,
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

pub async fn reconcile(ic: Arc<IdempotentConsumer>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = std::time::Instant::now();
    let ns = ic.namespace().unwrap_or_default();
    let api: Api<IdempotentConsumer> = Api::namespaced(ctx.client.clone(), &ns);
    let result = finalizer(&api, FINALIZER, ic, |event| async {
        match event {
            Finalizer::Apply(ic) => apply(&ic, &ctx).await,
            Finalizer::Cleanup(ic) => cleanup(&ic, &ctx).await,
        }
    })
    .await
    .or_else(|e| match e {
        // A queued reconcile of an object whose finalizer is already gone:
        // the object no longer exists, so there is nothing left to do.
        kube::runtime::finalizer::Error::RemoveFinalizer(kube::Error::Api(s))
            if s.is_not_found() =>
        {
            Ok(Action::await_change())
        }
        e => Err(Error::Finalizer(Box::new(e))),
    });
    ctx.metrics.reconciled(&result, started.elapsed());
    result
}

/// Invalid specs wait for a change (retrying cannot fix them); other errors
/// back off per object.
pub fn error_policy(ic: Arc<IdempotentConsumer>, error: &Error, ctx: Arc<Context>) -> Action {
    tracing::warn!(name = %ic.name_any(), namespace = ?ic.namespace(), error = %error, "reconcile failed");
    if let Error::Finalizer(inner) = error {
        if let kube::runtime::finalizer::Error::ApplyFailed(Error::InvalidSpec(_)) = inner.as_ref()
        {
            return Action::await_change();
        }
    }
    ctx.requeue(&ic, false)
}

fn apply_params() -> PatchParams {
    PatchParams::apply(MANAGER).force()
}

async fn publish(
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

/// Reads `key` of Secret `name`: Ok(None) when the Secret is absent, Err(message) when the key is.
async fn secret_value(api: &Api<Secret>, name: &str, key: &str) -> Result<Option<String>, Verdict> {
    match api.get_opt(name).await {
        Ok(None) => Ok(None),
        Ok(Some(secret)) => match secret.data.as_ref().and_then(|d| d.get(key)) {
            Some(value) => Ok(Some(String::from_utf8_lossy(&value.0).into_owned())),
            None => Err(verdict(
                "",
                false,
                SECRET_KEY_MISSING,
                format!("Secret {name} has no key {key:?}"),
            )),
        },
        Err(e) => Err(verdict(
            "",
            false,
            SECRET_NOT_FOUND,
            format!("cannot read Secret {name}: {e}"),
        )),
    }
}

async fn apply(ic: &IdempotentConsumer, ctx: &Context) -> Result<Action, Error> {
    let ns = ic.namespace().unwrap_or_default();
    let client = &ctx.client;
    let params = apply_params();

    let (config_map, hash) = match render::config::config_map(ic) {
        Ok(rendered) => rendered,
        Err(e) => {
            let message = e.to_string();
            write_status(
                ic,
                ctx,
                &[verdict(READY, false, INVALID_SPEC, message.clone())],
                None,
            )
            .await?;
            publish(ctx, ic, EventType::Warning, INVALID_SPEC, message).await;
            return Err(e.into());
        }
    };
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    cms.patch(&labels::config_map(ic), &params, &Patch::Apply(&config_map))
        .await?;

    let store = ensure_store(ic, ctx, &ns).await?;
    let broker = bind_broker(ic, ctx, &ns).await;
    let injected = inject(ic, ctx, &ns, &hash).await?;

    let all_ok = store.ok && broker.ok && injected.ok;
    let ready = if all_ok {
        verdict(
            READY,
            true,
            ALL_READY,
            "the sidecar is injected, the store is ready and the broker is bound",
        )
    } else {
        let waiting: Vec<_> = [&store, &broker, &injected]
            .iter()
            .filter(|v| !v.ok)
            .map(|v| v.type_)
            .collect();
        verdict(
            READY,
            false,
            NOT_READY,
            format!("waiting for {}", waiting.join(", ")),
        )
    };
    let previous_hash = ic.status.as_ref().and_then(|s| s.config_hash.clone());
    let verdicts = [store, broker, injected.clone(), ready];
    let changed = write_status(ic, ctx, &verdicts, injected.ok.then(|| hash.clone())).await?;
    if injected.ok && previous_hash.as_deref() != Some(hash.as_str()) {
        publish(
            ctx,
            ic,
            EventType::Normal,
            INJECTED,
            format!(
                "sidecar injected into {} {} (config {hash})",
                kind_name(&ic.spec.target.kind),
                ic.spec.target.name
            ),
        )
        .await;
    }
    if changed {
        for v in verdicts.iter().filter(|v| !v.ok && v.reason != NOT_READY) {
            publish(ctx, ic, EventType::Warning, v.reason, v.message.clone()).await;
        }
    }
    Ok(ctx.requeue(ic, all_ok))
}

fn kind_name(kind: &TargetKind) -> &'static str {
    match kind {
        TargetKind::Deployment => "Deployment",
        TargetKind::StatefulSet => "StatefulSet",
    }
}

async fn ensure_store(ic: &IdempotentConsumer, ctx: &Context, ns: &str) -> Result<Verdict, Error> {
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    match ic.spec.store.mode {
        StoreMode::External => {
            let Some(external) = &ic.spec.store.external else {
                return Ok(verdict(
                    STORE_READY,
                    false,
                    INVALID_SPEC,
                    "store.external is required in external mode",
                ));
            };
            let r = &external.secret_ref;
            Ok(match secret_value(&secrets, &r.name, &r.key).await {
                Ok(Some(_)) => verdict(
                    STORE_READY,
                    true,
                    EXTERNAL_SECRET_FOUND,
                    format!("Secret {} holds the Redis URL", r.name),
                ),
                Ok(None) => verdict(
                    STORE_READY,
                    false,
                    SECRET_NOT_FOUND,
                    format!("Secret {} does not exist", r.name),
                ),
                Err(v) => Verdict {
                    type_: STORE_READY,
                    ..v
                },
            })
        }
        StoreMode::Managed => {
            let name = labels::redis(ic);
            let params = apply_params();
            // The password is generated once and then read back: a new one
            // would lock every sidecar out of its store.
            let password = match secret_value(&secrets, &name, labels::REDIS_PASSWORD_KEY).await {
                Ok(Some(password)) => password,
                _ => render::redis::generate_password(),
            };
            secrets
                .patch(
                    &name,
                    &params,
                    &Patch::Apply(&render::redis::secret(ic, &password)?),
                )
                .await?;
            let services: Api<Service> = Api::namespaced(ctx.client.clone(), ns);
            services
                .patch(&name, &params, &Patch::Apply(&render::redis::service(ic)?))
                .await?;
            let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), ns);
            let applied = deployments
                .patch(
                    &name,
                    &params,
                    &Patch::Apply(&render::redis::deployment(ic)?),
                )
                .await?;
            let available = applied
                .status
                .and_then(|s| s.available_replicas)
                .unwrap_or(0);
            Ok(if available > 0 {
                verdict(
                    STORE_READY,
                    true,
                    REDIS_READY,
                    format!("Redis {name} is available"),
                )
            } else {
                verdict(
                    STORE_READY,
                    false,
                    REDIS_NOT_READY,
                    format!("Redis {name} has no available replica yet"),
                )
            })
        }
    }
}

async fn bind_broker(ic: &IdempotentConsumer, ctx: &Context, ns: &str) -> Verdict {
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    let r = &ic.spec.broker.rabbitmq.connection_secret_ref;
    let url = match secret_value(&secrets, &r.name, &r.key).await {
        Ok(Some(url)) => url,
        Ok(None) => {
            return verdict(
                BROKER_BOUND,
                false,
                SECRET_NOT_FOUND,
                format!("Secret {} does not exist", r.name),
            )
        }
        Err(v) => {
            return Verdict {
                type_: BROKER_BOUND,
                ..v
            }
        }
    };
    let plan = Plan::of(ic);
    match ctx.binder.bind(&url, &plan).await {
        Ok(()) => verdict(
            BROKER_BOUND,
            true,
            BOUND,
            format!(
                "queue {} and dead-letter queue {} are declared",
                plan.queue, plan.dead_letter_queue
            ),
        ),
        Err(BindError::Unreachable(e)) => verdict(BROKER_BOUND, false, BROKER_UNREACHABLE, e),
        Err(e @ BindError::ArgumentsMismatch(_)) => {
            verdict(BROKER_BOUND, false, QUEUE_MISMATCH, e.to_string())
        }
        Err(e @ BindError::ExchangeNotFound(_)) => {
            verdict(BROKER_BOUND, false, EXCHANGE_NOT_FOUND, e.to_string())
        }
        Err(BindError::Refused(e)) => verdict(BROKER_BOUND, false, BROKER_REFUSED, e),
    }
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

async fn inject(
    ic: &IdempotentConsumer,
    ctx: &Context,
    ns: &str,
    hash: &str,
) -> Result<Verdict, Error> {
    let target = format!(
        "{} {}",
        kind_name(&ic.spec.target.kind),
        ic.spec.target.name
    );
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

/// Writes status when it differs from what is there; returns whether it did.
async fn write_status(
    ic: &IdempotentConsumer,
    ctx: &Context,
    verdicts: &[Verdict],
    hash: Option<String>,
) -> Result<bool, Error> {
    let previous = ic.status.clone().unwrap_or_default();
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    let status = IdempotentConsumerStatus {
        observed_generation: ic.metadata.generation,
        conditions: conditions(verdicts, &previous.conditions, ic.metadata.generation, &now),
        config_hash: hash.or(previous.config_hash.clone()),
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

async fn cleanup(ic: &IdempotentConsumer, ctx: &Context) -> Result<Action, Error> {
    let ns = ic.namespace().unwrap_or_default();
    let client = &ctx.client;
    // Applying a patch with none of idemq's fields makes the API server drop
    // the fields only idemq owned: the sidecar, its volume, the annotation.
    if target_exists(ic, client, &ns).await? {
        patch_target(ic, client, &ns, &render::sidecar::withdrawal_patch(ic)).await?;
    }
    let dp = DeleteParams::background();
    let gone = |r: Result<_, kube::Error>| match r {
        Ok(()) => Ok(()),
        Err(kube::Error::Api(status)) if status.is_not_found() => Ok(()),
        Err(e) => Err(e),
    };
    gone(
        Api::<ConfigMap>::namespaced(client.clone(), &ns)
            .delete(&labels::config_map(ic), &dp)
            .await
            .map(|_| ()),
    )?;
    let redis = labels::redis(ic);
    gone(
        Api::<Deployment>::namespaced(client.clone(), &ns)
            .delete(&redis, &dp)
            .await
            .map(|_| ()),
    )?;
    gone(
        Api::<Service>::namespaced(client.clone(), &ns)
            .delete(&redis, &dp)
            .await
            .map(|_| ()),
    )?;
    gone(
        Api::<Secret>::namespaced(client.clone(), &ns)
            .delete(&redis, &dp)
            .await
            .map(|_| ()),
    )?;
    if ic.spec.broker.rabbitmq.delete_on_cleanup {
        let r = &ic.spec.broker.rabbitmq.connection_secret_ref;
        let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
        if let Ok(Some(url)) = secret_value(&secrets, &r.name, &r.key).await {
            if let Err(e) = ctx.binder.delete_queues(&url, &Plan::of(ic)).await {
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
    }
    publish(
        ctx,
        ic,
        EventType::Normal,
        "CleanedUp",
        "sidecar withdrawn and owned objects deleted".to_string(),
    )
    .await;
    Ok(Action::await_change())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(secs: i64) -> Time {
        Time(k8s_openapi::jiff::Timestamp::from_second(secs).expect("time"))
    }

    #[test]
    fn backoff_doubles_to_five_minutes() {
        let delays: Vec<_> = (1..=8).map(|n| backoff(n).as_secs()).collect();
        assert_eq!(delays, [5, 10, 20, 40, 80, 160, 300, 300]);
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

/// The exact requests of each reconcile, against a mocked API server.
#[cfg(test)]
mod scenarios {
    use std::sync::{Arc, Mutex};

    use http::{Method, StatusCode};
    use serde_json::{json, Value};

    use super::reconcile;
    use crate::crd::{IdempotentConsumer, IdempotentConsumerStatus};
    use crate::fixtures::{self, not_found, Expect};

    const IC: &str = "/apis/idemq.dev/v1alpha1/namespaces/shop/idempotentconsumers/orders";
    const CM: &str = "/api/v1/namespaces/shop/configmaps/orders-idemq";
    const REDIS_SECRET: &str = "/api/v1/namespaces/shop/secrets/orders-idemq-redis";
    const BROKER_SECRET: &str = "/api/v1/namespaces/shop/secrets/rabbitmq-orders";
    const REDIS_SVC: &str = "/api/v1/namespaces/shop/services/orders-idemq-redis";
    const REDIS_DEPLOY: &str = "/apis/apps/v1/namespaces/shop/deployments/orders-idemq-redis";
    const TARGET: &str = "/apis/apps/v1/namespaces/shop/deployments/orders-worker";
    const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/shop/events";

    fn broker_secret() -> Value {
        // "amqp://guest:guest@rabbit:5672" in base64.
        json!({ "apiVersion": "v1", "kind": "Secret", "metadata": { "name": "rabbitmq-orders", "namespace": "shop" },
                "data": { "url": "YW1xcDovL2d1ZXN0Omd1ZXN0QHJhYmJpdDo1Njcy" } })
    }

    fn target() -> Value {
        json!({ "apiVersion": "apps/v1", "kind": "Deployment", "metadata": { "name": "orders-worker", "namespace": "shop" } })
    }

    fn event(reason: &'static str) -> Expect {
        Expect::new(Method::POST, EVENTS, StatusCode::CREATED, Value::Null).with_body(move |e| {
            assert_eq!(e["reason"], reason, "event {e}");
            assert!(
                !e.to_string().contains("guest:guest"),
                "no secret in events"
            );
        })
    }

    /// The requests that apply the store, the bindings and the ConfigMap.
    fn apply_prefix() -> Vec<Expect> {
        vec![
            Expect::apply(CM).with_body(|cm| {
                assert!(cm["data"]["sidecar.yaml"]
                    .as_str()
                    .is_some_and(|y| !y.contains("amqp://")))
            }),
            Expect::get(REDIS_SECRET, StatusCode::NOT_FOUND, not_found()),
            Expect::apply(REDIS_SECRET)
                .with_body(|s| assert_eq!(s["data"]["password"].as_str().map(str::len), Some(44))),
            Expect::apply(REDIS_SVC),
            Expect::apply(REDIS_DEPLOY),
            Expect::get(BROKER_SECRET, StatusCode::OK, broker_secret()),
        ]
    }

    async fn run(
        ic: IdempotentConsumer,
        expected: Vec<Expect>,
    ) -> Result<kube::runtime::controller::Action, super::Error> {
        let (ctx, handle) = fixtures::context();
        let server = tokio::spawn(fixtures::serve(handle, expected));
        let result = reconcile(Arc::new(ic), ctx).await;
        if let Err(e) = &result {
            eprintln!("reconcile failed: {e:?}");
        }
        server
            .await
            .expect("every expected request came, as expected");
        result
    }

    /// Captures the status a status patch sends.
    fn status_patch(into: Arc<Mutex<Option<Value>>>) -> Expect {
        let answer = serde_json::to_value(fixtures::policy()).expect("json");
        Expect::new(
            Method::PATCH,
            &format!("{IC}/status"),
            StatusCode::OK,
            answer,
        )
        .with_body(move |b| {
            *into.lock().expect("lock") = Some(b["status"].clone());
        })
    }

    fn with_status(
        mut ic: IdempotentConsumer,
        status: &Mutex<Option<Value>>,
    ) -> IdempotentConsumer {
        let value = status
            .lock()
            .expect("lock")
            .clone()
            .expect("a status was written");
        ic.status =
            Some(serde_json::from_value::<IdempotentConsumerStatus>(value).expect("status"));
        ic
    }

    fn conditions(status: &Mutex<Option<Value>>) -> Vec<(String, String, String)> {
        status.lock().expect("lock").as_ref().expect("status")["conditions"]
            .as_array()
            .expect("conditions")
            .iter()
            .map(|c| {
                (
                    c["type"].as_str().unwrap_or_default().into(),
                    c["status"].as_str().unwrap_or_default().into(),
                    c["reason"].as_str().unwrap_or_default().into(),
                )
            })
            .collect()
    }

    #[tokio::test]
    async fn a_new_policy_first_gets_the_finalizer() {
        let mut ic = fixtures::policy();
        ic.metadata.finalizers = None;
        let added = Expect::new(
            Method::PATCH,
            IC,
            StatusCode::OK,
            serde_json::to_value(fixtures::policy()).expect("json"),
        )
        .with_body(|patch| assert!(patch.to_string().contains("idemq.dev/cleanup"), "{patch}"));
        run(ic, vec![added]).await.expect("reconciles");
    }

    #[tokio::test]
    async fn create_then_noop_then_spec_change() {
        // Create: everything is applied, the status written, and Events sent.
        let status = Arc::new(Mutex::new(None));
        let mut create = apply_prefix();
        create.push(Expect::get(TARGET, StatusCode::OK, target()));
        create.push(Expect::apply(TARGET).with_body(|p| {
            let pod = &p["spec"]["template"]["spec"];
            assert_eq!(pod["initContainers"][0]["name"], "idemq-sidecar");
            assert_eq!(pod["initContainers"][0]["restartPolicy"], "Always");
            assert!(p["spec"].get("replicas").is_none());
        }));
        create.push(status_patch(status.clone()));
        create.push(event("Injected"));
        create.push(event("RedisNotReady"));
        run(fixtures::policy(), create).await.expect("reconciles");
        assert_eq!(
            conditions(&status),
            [
                ("StoreReady".into(), "False".into(), "RedisNotReady".into()),
                ("BrokerBound".into(), "True".into(), "Bound".into()),
                ("SidecarInjected".into(), "True".into(), "Injected".into()),
                ("Ready".into(), "False".into(), "NotReady".into()),
            ]
        );

        // No change: the same applies (no-ops on the server), no status write, no Event.
        let unchanged = with_status(fixtures::policy(), &status);
        let mut noop = apply_prefix();
        noop[1] = Expect::get(
            REDIS_SECRET,
            StatusCode::OK,
            json!({
            "apiVersion": "v1", "kind": "Secret", "metadata": { "name": "orders-idemq-redis", "namespace": "shop" },
            "data": { "password": "a2VwdC1wYXNzd29yZA==" } }),
        );
        // The password read back is kept, never regenerated.
        noop[2] = Expect::apply(REDIS_SECRET)
            .with_body(|s| assert_eq!(s["data"]["password"], "a2VwdC1wYXNzd29yZA=="));
        noop.push(Expect::get(TARGET, StatusCode::OK, target()));
        noop.push(Expect::apply(TARGET));
        run(unchanged.clone(), noop).await.expect("reconciles");

        // A spec change: a new config hash reaches the pod template and the status.
        let mut changed = unchanged;
        changed.spec.max_attempts = Some(9);
        changed.metadata.generation = Some(2);
        let old_hash = changed
            .status
            .as_ref()
            .and_then(|s| s.config_hash.clone())
            .expect("hash");
        let new_status = Arc::new(Mutex::new(None));
        let mut change = apply_prefix();
        change.push(Expect::get(TARGET, StatusCode::OK, target()));
        let old = old_hash.clone();
        change.push(Expect::apply(TARGET).with_body(move |p| {
            let hash = &p["spec"]["template"]["metadata"]["annotations"]["idemq.dev/config-hash"];
            assert_ne!(hash.as_str(), Some(old.as_str()), "the pods roll");
        }));
        change.push(status_patch(new_status.clone()));
        change.push(event("Injected"));
        change.push(event("RedisNotReady"));
        run(changed, change).await.expect("reconciles");
        let written = new_status.lock().expect("lock").clone().expect("status");
        assert_eq!(written["observedGeneration"], 2);
        assert_ne!(written["configHash"].as_str(), Some(old_hash.as_str()));
    }

    #[tokio::test]
    async fn a_missing_target_is_reported_not_patched() {
        let status = Arc::new(Mutex::new(None));
        let mut expected = apply_prefix();
        expected.push(Expect::get(TARGET, StatusCode::NOT_FOUND, not_found()));
        expected.push(status_patch(status.clone()));
        expected.push(event("RedisNotReady"));
        expected.push(event("TargetNotFound"));
        let action = run(fixtures::policy(), expected)
            .await
            .expect("reconciles without error");
        assert!(conditions(&status).contains(&(
            "SidecarInjected".into(),
            "False".into(),
            "TargetNotFound".into()
        )));
        assert_eq!(
            action,
            kube::runtime::controller::Action::requeue(std::time::Duration::from_secs(5)),
            "backs off"
        );
    }

    #[tokio::test]
    async fn an_invalid_spec_gets_a_condition_and_an_event_then_waits_for_a_change() {
        // Passes the schema's pattern, but the sidecar needs a lease of at least 100ms.
        let mut ic = fixtures::policy();
        ic.spec.lease = Some("5ms".into());
        let status = Arc::new(Mutex::new(None));
        let expected = vec![
            status_patch(status.clone()),
            Expect::new(Method::POST, EVENTS, StatusCode::CREATED, Value::Null).with_body(|e| {
                assert_eq!(e["reason"], "InvalidSpec");
                assert_eq!(e["type"], "Warning");
                assert!(
                    e["note"]
                        .as_str()
                        .is_some_and(|n| n.contains("dedup.lease")),
                    "{e}"
                );
            }),
        ];
        let (ctx, handle) = fixtures::context();
        let server = tokio::spawn(fixtures::serve(handle, expected));
        let ic = Arc::new(ic);
        let error = reconcile(ic.clone(), ctx.clone())
            .await
            .expect_err("an invalid spec is an error");
        server.await.expect("every expected request came");
        assert_eq!(
            conditions(&status),
            [("Ready".into(), "False".into(), "InvalidSpec".into())]
        );
        assert_eq!(
            super::error_policy(ic, &error, ctx),
            kube::runtime::controller::Action::await_change(),
            "retrying cannot fix it"
        );
    }

    #[tokio::test]
    async fn a_malformed_object_gets_a_condition_and_an_event_once_per_generation() {
        // Stored under an older schema: `target` was a plain string.
        let guard: super::Guarded = serde_json::from_value(json!({
            "apiVersion": "idemq.dev/v1alpha1", "kind": "IdempotentConsumer",
            "metadata": { "name": "orders", "namespace": "shop", "uid": "u-1", "generation": 3 },
            "spec": { "target": "orders-worker" }
        }))
        .expect("a guard always deserializes");
        assert!(guard.0.is_err(), "the object is malformed");
        let status = Arc::new(Mutex::new(None));
        let expected = vec![
            status_patch(status.clone()),
            Expect::new(Method::POST, EVENTS, StatusCode::CREATED, Value::Null).with_body(|e| {
                assert_eq!(e["reason"], "Malformed");
                assert_eq!(e["type"], "Warning");
                assert_eq!(e["regarding"]["name"], "orders");
                assert!(
                    e["note"]
                        .as_str()
                        .is_some_and(|n| n.contains("Expected struct Target")),
                    "the note names the problem: {e}"
                );
            }),
        ];
        let (ctx, handle) = fixtures::context();
        let server = tokio::spawn(fixtures::serve(handle, expected));
        let guard = Arc::new(guard);
        let action = super::reconcile_guarded(guard.clone(), ctx.clone())
            .await
            .expect("reported, not failed");
        server.await.expect("every expected request came");
        assert_eq!(action, kube::runtime::controller::Action::await_change());
        assert_eq!(
            conditions(&status),
            [("Ready".into(), "False".into(), "Malformed".into())]
        );
        let written = status.lock().expect("lock").clone().expect("status");
        assert_eq!(written["observedGeneration"], 3);

        // Its own status write comes back as a watch event: no second report
        // (the mock API server is gone, so any request would fail).
        super::reconcile_guarded(guard, ctx)
            .await
            .expect("nothing more to say about this generation");
    }

    #[tokio::test]
    async fn deletion_withdraws_the_sidecar_deletes_owned_objects_and_drops_the_finalizer() {
        let mut ic = fixtures::policy();
        ic.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::now(),
            ));
        let deleted =
            json!({ "kind": "Status", "apiVersion": "v1", "status": "Success", "code": 200 });
        let mut gone = ic.clone();
        gone.metadata.finalizers = None;
        let expected = vec![
            Expect::get(TARGET, StatusCode::OK, target()),
            Expect::apply(TARGET).with_body(|p| {
                assert!(
                    p.get("spec").is_none(),
                    "an empty apply withdraws idemq's fields: {p}"
                )
            }),
            Expect::new(Method::DELETE, CM, StatusCode::OK, deleted.clone()),
            Expect::new(
                Method::DELETE,
                REDIS_DEPLOY,
                StatusCode::OK,
                deleted.clone(),
            ),
            Expect::new(
                Method::DELETE,
                REDIS_SVC,
                StatusCode::NOT_FOUND,
                not_found(),
            ),
            Expect::new(Method::DELETE, REDIS_SECRET, StatusCode::OK, deleted),
            event("CleanedUp"),
            Expect::new(
                Method::PATCH,
                IC,
                StatusCode::OK,
                serde_json::to_value(&gone).expect("json"),
            )
            .with_body(|patch| {
                assert!(
                    patch.to_string().contains("remove")
                        || patch.to_string().contains("finalizers"),
                    "{patch}"
                )
            }),
        ];
        run(ic, expected).await.expect("cleans up");
    }
}
