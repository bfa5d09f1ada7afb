//! The key store step: an external Redis is checked (its Secret holds the
//! URL), a managed Redis is applied (password Secret, Service, Deployment) and
//! its rollout read back. Cleanup deletes the managed objects.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use kube::api::{Api, DeleteParams};

use super::ssa::apply;
use super::status::{verdict, Verdict};
use super::{secret_value, Context, Error};
use crate::crd::conditions::*;
use crate::crd::{IdempotentConsumer, StoreMode};
use crate::labels;
use crate::render;

pub async fn ensure(ic: &IdempotentConsumer, ctx: &Context, ns: &str) -> Result<Verdict, Error> {
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
            // The password is generated once and then read back: a new one
            // would lock every sidecar out of its store.
            let password = match secret_value(&secrets, &name, labels::REDIS_PASSWORD_KEY).await {
                Ok(Some(password)) => password,
                _ => render::redis::generate_password(),
            };
            apply(
                &secrets,
                &name,
                json(&render::redis::secret(ic, &password)?),
            )
            .await?;
            let services: Api<Service> = Api::namespaced(ctx.client.clone(), ns);
            apply(&services, &name, json(&render::redis::service(ic)?)).await?;
            let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), ns);
            let applied = apply(&deployments, &name, json(&render::redis::deployment(ic)?)).await?;
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
    gone(
        Api::<Deployment>::namespaced(client.clone(), ns)
            .delete(&redis, &dp)
            .await
            .map(|_| ()),
    )?;
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
