//! The key store step: an external Redis is checked (its Secret holds the
//! URL), a managed Redis is applied (password Secret, Service, and a
//! StatefulSet with its PodDisruptionBudget, or a Deployment when ephemeral)
//! and its rollout read back. Cleanup deletes the managed objects.
//!
//! Switching between the two kinds (an upgrade from the former Deployment, or
//! `ephemeral` toggled) deletes the other kind first, so that two Redis
//! servers never serve one consumer behind its Service. Adding replicas to
//! the StatefulSet (or removing them) keeps it, and re-creates the Service,
//! which becomes headless (or stops being so).

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{Api, DeleteParams};

use super::ssa::apply;
use super::status::{verdict, Verdict};
use super::{key_missing, secrets, unreadable, Context, Error};
use crate::crd::conditions::*;
use crate::crd::{IdempotentConsumer, StoreMode};
use crate::labels;
use crate::render;

pub async fn ensure(
    ic: &IdempotentConsumer,
    ctx: &Context,
    ns: &str,
    read: &mut secrets::Read,
) -> Result<Verdict, Error> {
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
            Ok(match read.data(&secrets, &r.name).await {
                Ok(Some(data)) if data.contains_key(&r.key) => verdict(
                    STORE_READY,
                    true,
                    EXTERNAL_SECRET_FOUND,
                    format!("Secret {} holds the Redis URL", r.name),
                ),
                Ok(Some(_)) => Verdict {
                    type_: STORE_READY,
                    ..key_missing(&r.name, &r.key)
                },
                Ok(None) => verdict(
                    STORE_READY,
                    false,
                    SECRET_NOT_FOUND,
                    format!("Secret {} does not exist", r.name),
                ),
                Err(e) => Verdict {
                    type_: STORE_READY,
                    ..unreadable(&r.name, &e)
                },
            })
        }
        StoreMode::Managed => {
            let name = labels::redis(ic);
            // The password is generated once and then read back: a new one
            // would lock every sidecar out of its store. So a Secret that
            // cannot be read now fails the reconcile (it is retried); only
            // an absent one, or one without the key, gets a new password.
            let password = read
                .data(&secrets, &name)
                .await?
                .and_then(|data| data.get(labels::REDIS_PASSWORD_KEY).map(text))
                .unwrap_or_else(render::redis::generate_password);
            apply(
                &secrets,
                &name,
                json(&render::redis::secret(ic, &password)?),
            )
            .await?;
            let services: Api<Service> = Api::namespaced(ctx.client.clone(), ns);
            let service = render::redis::service(ic)?;
            replace_if_headless_changes(&services, &name, &service).await?;
            apply(&services, &name, json(&service)).await?;
            let client = &ctx.client;
            let available = if render::redis::is_ephemeral(ic) {
                delete_if_present(&Api::<StatefulSet>::namespaced(client.clone(), ns), &name)
                    .await?;
                delete_if_present(
                    &Api::<PodDisruptionBudget>::namespaced(client.clone(), ns),
                    &name,
                )
                .await?;
                let deployments: Api<Deployment> = Api::namespaced(client.clone(), ns);
                apply(&deployments, &name, json(&render::redis::deployment(ic)?))
                    .await?
                    .status
                    .and_then(|s| s.available_replicas)
                    .unwrap_or(0)
            } else {
                delete_if_present(&Api::<Deployment>::namespaced(client.clone(), ns), &name)
                    .await?;
                let sets: Api<StatefulSet> = Api::namespaced(client.clone(), ns);
                let set = apply(&sets, &name, json(&render::redis::stateful_set(ic)?)).await?;
                let budgets: Api<PodDisruptionBudget> = Api::namespaced(client.clone(), ns);
                apply(
                    &budgets,
                    &name,
                    json(&render::redis::pod_disruption_budget(ic)?),
                )
                .await?;
                set.status.and_then(|s| s.available_replicas).unwrap_or(0)
            };
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

/// Deletes the Service when it is to become headless or stop being so
/// (replicas added or removed): its cluster IP cannot change in place, so the
/// apply that follows creates it anew. Clients of the one Redis lose its
/// address for that moment; the Sentinels' clients do not use it.
async fn replace_if_headless_changes(
    services: &Api<Service>,
    name: &str,
    desired: &Service,
) -> Result<(), Error> {
    let Some(current) = services.get_opt(name).await? else {
        return Ok(());
    };
    if render::redis::is_headless(&current) != render::redis::is_headless(desired) {
        tracing::info!(
            service = name,
            "re-creating the Redis Service: its cluster IP changes"
        );
        delete(services, name).await?;
    }
    Ok(())
}

/// Deletes `name` unless it is already gone.
async fn delete<K>(api: &Api<K>, name: &str) -> Result<(), Error>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match api.delete(name, &DeleteParams::background()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.is_not_found() => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Deletes `name` if it exists; a reconcile that finds nothing to delete
/// writes nothing.
async fn delete_if_present<K>(api: &Api<K>, name: &str) -> Result<(), Error>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    if api.get_opt(name).await?.is_some() {
        delete(api, name).await?;
    }
    Ok(())
}

/// Deletes the ConfigMap and the managed Redis objects; absent ones are fine
/// (cleanup must tolerate apply never having run).
pub async fn delete_owned(ic: &IdempotentConsumer, ctx: &Context, ns: &str) -> Result<(), Error> {
    let client = &ctx.client;
    let dp = DeleteParams::background();
    let gone = |r: Result<_, kube::Error>| match r {
        Ok(()) => Ok(()),
        Err(kube::Error::Api(status)) if status.is_not_found() => Ok(()),
        Err(e) => Err(e),
    };
    gone(
        Api::<ConfigMap>::namespaced(client.clone(), ns)
            .delete(&labels::config_map(ic), &dp)
            .await
            .map(|_| ()),
    )?;
    let redis = labels::redis(ic);
    delete(&Api::<Deployment>::namespaced(client.clone(), ns), &redis).await?;
    delete(&Api::<StatefulSet>::namespaced(client.clone(), ns), &redis).await?;
    delete(
        &Api::<PodDisruptionBudget>::namespaced(client.clone(), ns),
        &redis,
    )
    .await?;
    gone(
        Api::<Service>::namespaced(client.clone(), ns)
            .delete(&redis, &dp)
            .await
            .map(|_| ()),
    )?;
    gone(
        Api::<Secret>::namespaced(client.clone(), ns)
            .delete(&redis, &dp)
            .await
            .map(|_| ()),
    )?;
    Ok(())
}

fn json<T: serde::Serialize>(object: &T) -> serde_json::Value {
    serde_json::to_value(object).unwrap_or_default()
}

/// Where the consumer's store is, as the operator reaches it.
struct StoreAddress {
    url: String,
    password: Option<String>,
    /// PEM of the private CA of a `rediss://` store.
    ca: Option<String>,
}

/// A Secret value as text.
fn text(value: &k8s_openapi::ByteString) -> String {
    String::from_utf8_lossy(&value.0).into_owned()
}

/// Dereference: the consumer's store address, from its Secret (as this
/// reconcile read it).
async fn store_address(
    ic: &IdempotentConsumer,
    ctx: &Context,
    ns: &str,
    read: &mut secrets::Read,
) -> Option<StoreAddress> {
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    match ic.spec.store.mode {
        StoreMode::External => {
            let external = ic.spec.store.external.as_ref()?;
            let r = &external.secret_ref;
            let data = read.data(&secrets, &r.name).await.ok()??;
            let ca = match &external.ca_key {
                Some(key) => Some(text(data.get(key)?)),
                None => None,
            };
            Some(StoreAddress {
                url: text(data.get(&r.key)?),
                password: None,
                ca,
            })
        }
        StoreMode::Managed => {
            let name = labels::redis(ic);
            let data = read.data(&secrets, &name).await.ok()??;
            let password = text(data.get(labels::REDIS_PASSWORD_KEY)?);
            // With replicas, the Sentinels say where the primary is now.
            let url = if render::redis::replicas(ic) > 0 {
                render::redis::sentinel_urls(ic)
            } else {
                format!("redis://{name}.{ns}.svc:{}", labels::REDIS_PORT)
            };
            Some(StoreAddress {
                url,
                password: Some(password),
                ca: None,
            })
        }
    }
}

/// Dereference: reads the store's reset records, acknowledges the one the
/// resource's annotation names, and says whether the store lost its state
/// (`StoreReset` True, quoting the record to acknowledge). None when the
/// store cannot be read now: no verdict rather than a wrong one.
pub async fn reset(
    ic: &IdempotentConsumer,
    ctx: &Context,
    ns: &str,
    read: &mut secrets::Read,
) -> Option<Verdict> {
    use idemq_sidecar::store::admin;
    use idemq_sidecar::store::connection::Endpoint;
    let address = store_address(ic, ctx, ns, read).await?;
    let namespace = labels::consumer(ic);
    let target = admin::Target {
        endpoint: Endpoint {
            url: &address.url,
            password: address.password.as_deref(),
            ca: address.ca.as_deref().map(str::as_bytes),
            cluster: ic.spec.store.cluster(),
            sentinel: ic.spec.store.sentinel(),
            timeout: std::time::Duration::from_secs(2),
        },
        namespace: &namespace,
        partitions: ic.spec.store.partitions.unwrap_or(1),
    };
    let acknowledged = ic
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(labels::ACKNOWLEDGE_STORE_RESET))
        .cloned();
    if let Some(record) = &acknowledged {
        match admin::acknowledge_reset(&target, record).await {
            Ok(released) if released > 0 => {
                tracing::info!(%record, released, "store reset acknowledged");
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "could not acknowledge the store reset");
                return None;
            }
        }
    }
    match admin::reset_records(&target).await {
        Ok(records) => Some(match records.first() {
            Some((prefix, record)) => verdict(
                STORE_RESET,
                true,
                RESET_DETECTED,
                format!(
                    "the key store lost its state ({} of {} partitions, {prefix}...: reset {record}); duplicates of messages completed before it will not be stopped. With onReset=failClosed consumption is paused: after checking, acknowledge with the annotation {}={record}",
                    records.len(),
                    target.partitions,
                    labels::ACKNOWLEDGE_STORE_RESET
                ),
            ),
            None if acknowledged.is_some() => verdict(
                STORE_RESET,
                false,
                RESET_ACKNOWLEDGED,
                "the last store reset was acknowledged",
            ),
            None => verdict(
                STORE_RESET,
                false,
                NO_RESET,
                "the key store kept its state",
            ),
        }),
        Err(e) => {
            tracing::debug!(error = %e, "could not read the store's reset records");
            None
        }
    }
}
