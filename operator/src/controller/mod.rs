//! The controller: reconciles each `IdempotentConsumer` into its ConfigMap, its
//! key store, its broker bindings and the sidecar in its target workload.
//!
//! A reconcile is a pipeline, one module per step:
//! 1. dereference: read what the resource points at (Secrets, the target),
//! 2. validate: render the sidecar's configuration (pure, see
//!    [`crate::render`]); an invalid spec stops here,
//! 3. apply: the ConfigMap, then [`store`], [`broker`] and [`target`] (through
//!    [`ssa`], which sends nothing when nothing would change), each
//!    returning a verdict rather than failing on what the user must fix,
//! 4. [`status`]: the verdicts become conditions and Events.
//!
//! Reconcile is level-based: desired objects are applied with server-side
//! apply under the `idemq-operator` field manager. Nothing is remembered
//! between reconciles but the per-object back-off and when to check unchanged
//! bindings again (status records what was bound). A finalizer withdraws the
//! sidecar and deletes what the resource owns when it is deleted.

#[cfg(test)]
mod bounds;
mod broker;
pub mod pods;
pub mod rollout;
#[cfg(test)]
mod scenarios;
pub mod secrets;
mod ssa;
pub mod status;
mod store;
mod target;
#[cfg(test)]
mod writes;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::api::{Api, PatchParams};
use kube::core::DeserializeGuard;
use kube::runtime::controller::Action;
use kube::runtime::events::{EventType, Recorder};
use kube::runtime::finalizer::{finalizer, Event as Finalizer};
use kube::runtime::reflector::ObjectRef;
use kube::{Client, ResourceExt};

use crate::broker::Binder;
use crate::crd::conditions::*;
use crate::crd::{IdempotentConsumer, Injection, Rollout};
use crate::labels::{self, FINALIZER, MANAGER};
use crate::metrics::Metrics;
use crate::render::{self, RenderError};
pub use kube::runtime::controller::Config;
pub use status::{conditions, Verdict};
use status::{publish, verdict};

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

/// Broker operations in flight at once unless configured otherwise.
pub const DEFAULT_BROKER_OPERATIONS: usize = 8;

/// What every reconcile shares.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub binder: Arc<dyn Binder>,
    pub sidecar_image: String,
    pub metrics: Arc<Metrics>,
    /// Bounds the broker operations in flight, whatever the number of
    /// reconciles running at once.
    pub broker_operations: tokio::sync::Semaphore,
    /// Consecutive not-ready reconciles per object, for exponential back-off.
    failures: Mutex<HashMap<ObjectRef<IdempotentConsumer>, u32>>,
    /// When each resource's bindings are next declared again although
    /// nothing changed (a check that the broker still has them), spread at
    /// random over [`RECHECK`] so that they never come in one burst.
    rechecks: Mutex<HashMap<ObjectRef<IdempotentConsumer>, tokio::time::Instant>>,
    /// The controller's cache of resources, to find others naming the same
    /// target without asking the API server.
    caches: Mutex<Vec<kube::runtime::reflector::Store<Guarded>>>,
    /// The injected pods (trimmed, see [`pods::trim`]), one cache per
    /// watched scope, read for the SidecarsReady condition.
    pod_caches: Mutex<Vec<kube::runtime::reflector::Store<Pod>>>,
    /// Malformed objects already reported, by uid and generation.
    pub(crate) malformed: Mutex<HashSet<(String, Option<i64>)>>,
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
            broker_operations: tokio::sync::Semaphore::new(DEFAULT_BROKER_OPERATIONS),
            failures: Mutex::new(HashMap::new()),
            rechecks: Mutex::new(HashMap::new()),
            caches: Mutex::new(Vec::new()),
            pod_caches: Mutex::new(Vec::new()),
            malformed: Mutex::new(HashSet::new()),
        }
    }

    /// Also looks for resources sharing a target in `cache` (one per
    /// controller, so one per watched namespace).
    pub fn add_cache(&self, cache: kube::runtime::reflector::Store<Guarded>) {
        self.caches
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(cache);
    }

    /// Also reads the pods of `cache` for the SidecarsReady condition.
    pub fn add_pod_cache(&self, cache: kube::runtime::reflector::Store<Pod>) {
        self.pod_caches
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(cache);
    }

    /// The cached pods (trimmed), of every watched scope.
    fn pods(&self) -> Vec<Arc<Pod>> {
        let caches = self.pod_caches.lock().unwrap_or_else(|e| e.into_inner());
        caches.iter().flat_map(|cache| cache.state()).collect()
    }

    /// The running pods of `ic` and those with configuration `hash`, from
    /// the cached pods.
    fn pod_counts(&self, ic: &IdempotentConsumer, hash: &str) -> pods::Counts {
        pods::counts(ic, hash, self.pods().iter().map(|p| p.as_ref()))
    }

    /// The SidecarsReady verdict of `ic` from the cached pods.
    fn sidecars_ready(&self, ic: &IdempotentConsumer) -> Verdict {
        pods::sidecars_ready(ic, self.pods().iter().map(|p| p.as_ref()))
    }

    /// The other resources of `ic`'s namespace that name the same target.
    /// Only those are cloned: this runs in every reconcile, over every
    /// cached resource.
    fn peers(&self, ic: &IdempotentConsumer) -> Vec<IdempotentConsumer> {
        let caches = self.caches.lock().unwrap_or_else(|e| e.into_inner());
        let (ns, name) = (ic.namespace(), ic.name_any());
        caches
            .iter()
            .flat_map(|cache| cache.state())
            .filter_map(|g| {
                g.0.as_ref()
                    .ok()
                    .filter(|o| {
                        o.spec.target == ic.spec.target
                            && o.namespace() == ns
                            && o.name_any() != name
                    })
                    .cloned()
            })
            .collect()
    }

    /// At most `n` broker operations at a time.
    pub fn with_broker_operations(mut self, n: usize) -> Self {
        self.broker_operations = tokio::sync::Semaphore::new(n.max(1));
        self
    }

    /// Whether `ic`'s unchanged bindings are due for a periodic check. The
    /// first time a resource is seen (after a restart, say) its check is set
    /// at a random point of the next period.
    fn recheck_due(&self, ic: &IdempotentConsumer) -> bool {
        let mut rechecks = self.rechecks.lock().unwrap_or_else(|e| e.into_inner());
        let now = tokio::time::Instant::now();
        match rechecks.get(&ObjectRef::from(ic)) {
            Some(at) if *at > now => false,
            Some(_) => {
                rechecks.insert(ObjectRef::from(ic), now + jitter(RECHECK));
                true
            }
            None => {
                let first = RECHECK.mul_f64(rand::random_range(0.0..1.0));
                rechecks.insert(ObjectRef::from(ic), now + first);
                false
            }
        }
    }

    /// The next requeue of `ic`: a back-off that doubles with each
    /// consecutive failure (5s up to 5min) and resets on success.
    fn requeue(&self, ic: &IdempotentConsumer, ready: bool) -> Action {
        let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        let key = ObjectRef::from(ic);
        if ready {
            failures.remove(&key);
            return Action::requeue(jitter(READY_REQUEUE));
        }
        let n = failures.entry(key).or_insert(0);
        *n = n.saturating_add(1);
        Action::requeue(backoff(*n))
    }
}

/// How often a ready resource is reconciled again, give or take a fifth.
pub const READY_REQUEUE: Duration = Duration::from_secs(300);
/// How often unchanged bindings are declared again, give or take a fifth.
pub const RECHECK: Duration = Duration::from_secs(1800);

/// `period`, give or take a fifth at random, so that resources reconciled
/// together (at a restart) drift apart instead of coming back together.
pub fn jitter(period: Duration) -> Duration {
    period.mul_f64(rand::random_range(0.8..1.2))
}

pub fn backoff(failures: u32) -> Duration {
    Duration::from_secs(
        5u64.saturating_mul(1 << failures.saturating_sub(1).min(6))
            .min(300),
    )
}

/// What the controller watches: an object that does not deserialize (a value
/// the schema let through but the types refuse, or an object stored under an
/// older schema) arrives as an error instead of breaking the watch of every
/// other object.
pub type Guarded = DeserializeGuard<IdempotentConsumer>;

/// What people (or other tools) change in a resource, as a hash for a
/// watch's predicate filter: its spec (through the generation, which its
/// deletion also bumps), its annotations (the store-reset acknowledgement),
/// its finalizers and its deletion. A status write is the operator's own,
/// and reconciling after it would only read everything again.
pub fn changed_by_people(resource: &Guarded) -> Option<u64> {
    use std::hash::{Hash, Hasher};
    let meta = kube::Resource::meta(resource);
    let mut hasher = std::hash::DefaultHasher::new();
    (
        meta.generation,
        &meta.annotations,
        &meta.finalizers,
        meta.deletion_timestamp.as_ref().map(|t| t.0.as_second()),
    )
        .hash(&mut hasher);
    Some(hasher.finish())
}

/// The controller's entry point: reconciles a well-formed object, reports a
/// malformed one (a condition and an Event) and waits for it to change.
pub async fn reconcile_guarded(guard: Arc<Guarded>, ctx: Arc<Context>) -> Result<Action, Error> {
    match &guard.0 {
        Ok(ic) => reconcile(Arc::new(ic.clone()), ctx).await,
        Err(invalid) => {
            status::report_malformed(invalid, &ctx).await?;
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
        // The cached object was older than the one on the server (its
        // finalizers changed meanwhile), so the guarded patch was refused:
        // an ordinary retry with the fresh object, not a fault to report.
        kube::runtime::finalizer::Error::AddFinalizer(kube::Error::Api(s))
            if s.code == 422 || s.is_conflict() =>
        {
            tracing::debug!(error = %s, "finalizer added concurrently; retrying");
            Ok(Action::requeue(Duration::from_secs(1)))
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

pub(crate) fn apply_params() -> PatchParams {
    PatchParams::apply(MANAGER).force()
}

/// Secret `name` could not be read (the API server failed, or the operator
/// may not read it).
pub(crate) fn unreadable(name: &str, e: &kube::Error) -> Verdict {
    verdict(
        "",
        false,
        SECRET_NOT_FOUND,
        format!("cannot read Secret {name}: {e}"),
    )
}

pub(crate) fn key_missing(name: &str, key: &str) -> Verdict {
    verdict(
        "",
        false,
        SECRET_KEY_MISSING,
        format!("Secret {name} has no key {key:?}"),
    )
}

/// Apply: validate, then each step in turn, then status.
async fn apply(ic: &IdempotentConsumer, ctx: &Context) -> Result<Action, Error> {
    let ns = ic.namespace().unwrap_or_default();

    // Validate: an invalid spec is reported and waits for a change.
    let (config_map, hash) = match render::config::config_map(ic) {
        Ok(rendered) => rendered,
        Err(e) => {
            let message = e.to_string();
            status::write(
                ic,
                ctx,
                &[verdict(READY, false, INVALID_SPEC, message.clone())],
                status::Recorded::default(),
            )
            .await?;
            publish(ctx, ic, EventType::Warning, INVALID_SPEC, message).await;
            return Err(e.into());
        }
    };

    // Apply.
    ssa::apply(
        &Api::<ConfigMap>::namespaced(ctx.client.clone(), &ns),
        &labels::config_map(ic),
        serde_json::to_value(&config_map).unwrap_or_default(),
    )
    .await?;
    // Every step reads a Secret once, and all see the same content.
    let mut read = secrets::Read::default();
    let store = store::ensure(ic, ctx, &ns, &mut read).await?;
    // Only a store that answers can say whether it lost its state.
    let reset = if store.ok {
        store::reset(ic, ctx, &ns, &mut read).await
    } else {
        None
    };
    let (broker, binding) = broker::bind(ic, ctx, &ns, &mut read).await?;
    // Said before the pods roll: a new key definition forgets what was completed.
    let key_definition =
        render::config::sidecar_config(ic).map(|config| render::config::key_definition(&config))?;
    let preserved = status::state_preserved(ic, &key_definition);
    if let Some(v) = preserved
        .as_ref()
        .filter(|v| v.reason == KEY_DEFINITION_CHANGED)
    {
        if status::is_new(ic, v) {
            publish(ctx, ic, EventType::Warning, v.reason, v.message.clone()).await;
        }
    }
    let secrets = secrets::digest(ic, ctx, &ns, &mut read).await?;
    let injected = target::inject(ic, ctx, &ns, &hash, &secrets).await?;
    // Said only of a workload this resource serves; not part of Ready,
    // which says that idemq did its part (a Deployment at zero replicas is
    // Ready with no pod).
    let sidecars = injected.ok.then(|| ctx.sidecars_ready(ic));

    // Status.
    let ready = status::ready(&[&store, &broker, &injected]);
    let all_ok = ready.ok;
    let previous_hash = ic.status.as_ref().and_then(|s| s.config_hash.clone());
    if let Some(v) = reset.as_ref().filter(|v| v.ok) {
        if status::is_new(ic, v) {
            publish(ctx, ic, EventType::Warning, STORE_RESET, v.message.clone()).await;
        }
    }
    // A change of the sidecars' readiness is news only when it flips a
    // condition that was already there: pods starting are not.
    let flipped = sidecars.as_ref().and_then(|v| {
        let before = ic
            .status
            .as_ref()?
            .conditions
            .iter()
            .find(|c| c.type_ == SIDECARS_READY)?;
        (before.status != if v.ok { "True" } else { "False" }).then(|| v.clone())
    });
    let verdicts: Vec<Verdict> = [store, broker, injected.clone(), ready]
        .into_iter()
        .chain(sidecars)
        .chain(reset)
        .chain(preserved)
        .collect();
    let pods = (ic.spec.injection == Injection::Pod).then(|| ctx.pod_counts(ic, &hash));
    status::write(
        ic,
        ctx,
        &verdicts,
        status::Recorded {
            hash: injected.ok.then(|| hash.clone()),
            binding,
            key_definition: injected.ok.then(|| key_definition.clone()),
            pods,
        },
    )
    .await?;
    if injected.ok && previous_hash.as_deref() != Some(hash.as_str()) {
        publish(
            ctx,
            ic,
            EventType::Normal,
            INJECTED,
            format!(
                "sidecar injected into {} (config {hash})",
                target::describe(ic)
            ),
        )
        .await;
        // What the sidecar's check-config would warn about (a lease shorter
        // than the delivery timeout, say): legal, so said once per config.
        let warnings = render::config::sidecar_config(ic)
            .map(|config| config.warnings())
            .unwrap_or_default();
        for warning in warnings {
            publish(
                ctx,
                ic,
                EventType::Warning,
                CONFIG_WARNING,
                warning.to_string(),
            )
            .await;
        }
    }
    // A failure is said once, when it is new. Ready only repeats the
    // others' reasons; StatePreserved was announced before the pods rolled,
    // and a StoreReset when it was found, above (no reset is no news);
    // SidecarsReady speaks below, when it flips.
    for v in verdicts.iter().filter(|v| {
        !v.ok
            && ![READY, STATE_PRESERVED, STORE_RESET, SIDECARS_READY].contains(&v.type_)
            && status::is_new(ic, v)
    }) {
        publish(ctx, ic, EventType::Warning, v.reason, v.message.clone()).await;
    }
    if let Some(v) = flipped {
        let type_ = if v.ok {
            EventType::Normal
        } else {
            EventType::Warning
        };
        publish(ctx, ic, type_, v.reason, v.message).await;
    }
    // rollout: evict takes the running pods to the configuration just
    // recorded, one at a time.
    let retry = match ic.spec.rollout {
        Some(Rollout::Evict) if ic.spec.injection == Injection::Pod && injected.ok => {
            rollout::step(ic, ctx, &ns, &hash).await
        }
        _ => None,
    };
    let action = ctx.requeue(ic, all_ok);
    Ok(retry.map(Action::requeue).unwrap_or(action))
}

/// Cleanup, in the reverse order: the sidecar first (so no pod consumes
/// without its store), then the owned objects, then the queues if asked.
async fn cleanup(ic: &IdempotentConsumer, ctx: &Context) -> Result<Action, Error> {
    let ns = ic.namespace().unwrap_or_default();
    target::withdraw(ic, ctx, &ns).await?;
    store::delete_owned(ic, ctx, &ns).await?;
    broker::withdraw_endpoint(ic, ctx, &ns).await?;
    broker::unbind(ic, ctx, &ns).await;
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

    #[test]
    fn a_status_write_is_no_change_but_spec_annotations_finalizers_and_deletion_are() {
        let guard = |ic: &IdempotentConsumer| -> Guarded {
            serde_json::from_value(serde_json::to_value(ic).expect("json")).expect("guard")
        };
        let ic = crate::fixtures::policy();
        let before = changed_by_people(&guard(&ic));
        let mut status = ic.clone();
        status.status = Some(crate::crd::IdempotentConsumerStatus {
            config_hash: Some("abc".into()),
            ..Default::default()
        });
        status.metadata.resource_version = Some("101".into());
        assert_eq!(changed_by_people(&guard(&status)), before);
        let mut spec = ic.clone();
        spec.metadata.generation = Some(2);
        let mut acknowledged = ic.clone();
        acknowledged.metadata.annotations =
            Some([(labels::ACKNOWLEDGE_STORE_RESET.to_string(), "r".to_string())].into());
        let mut unfinalized = ic.clone();
        unfinalized.metadata.finalizers = None;
        let mut deleted = ic.clone();
        deleted.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::now(),
            ));
        for changed in [spec, acknowledged, unfinalized, deleted] {
            assert_ne!(changed_by_people(&guard(&changed)), before);
        }
    }

    #[test]
    fn backoff_doubles_to_five_minutes() {
        let delays: Vec<_> = (1..=8).map(|n| backoff(n).as_secs()).collect();
        assert_eq!(delays, [5, 10, 20, 40, 80, 160, 300, 300]);
    }
}
