//! The Secrets a resource names (its broker connection, a ZeroMQ endpoint's
//! dead-letter broker, an external store's URL). The sidecar reads them from its environment when it starts, so a
//! change of their content must roll the pods: a digest of that content goes
//! into the pod template. And a Secret created, changed or deleted reconciles
//! the resources that name it at once, rather than at their next back-off.
//!
//! The broker step and the digest read their Secrets through one [`Read`]
//! per reconcile, so that the broker's are fetched from the API server once,
//! not once for the bindings and again for the digest.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::ByteString;
use kube::api::Api;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::ResourceExt;
use sha2::{Digest, Sha256};

use super::{Context, Guarded};
use crate::broker::Connection;
use crate::crd::{IdempotentConsumer, StoreMode};

/// The names of the Secrets whose values reach the sidecar, sorted.
pub fn referenced(ic: &IdempotentConsumer) -> Vec<&str> {
    let store = match ic.spec.store.mode {
        StoreMode::External => ic
            .spec
            .store
            .external
            .as_ref()
            .map(|e| e.secret_ref.name.as_str()),
        StoreMode::Managed => None,
    };
    // A ZeroMQ endpoint's dead-letter RabbitMQ or Kafka has a Secret of its own.
    let dead_letters = ic
        .spec
        .broker
        .zeromq
        .as_ref()
        .and_then(|z| z.dead_letter.secret_name());
    let mut names: Vec<&str> = Connection::secret_name(ic)
        .into_iter()
        .chain(store)
        .chain(dead_letters)
        .collect();
    names.sort_unstable();
    names.dedup();
    names
}

/// A Secret's `data`.
pub type Data = BTreeMap<String, ByteString>;

/// The Secrets one reconcile has read, by name (`None`: absent). The broker
/// step reads its connection Secret and the pod template's digest needs the
/// same content: one GET serves both, and both see the same content.
/// A failed read is not kept, so the next step tries again.
#[derive(Default)]
pub struct Read(BTreeMap<String, Option<Data>>);

impl Read {
    /// The data of Secret `name`: what this reconcile read already, or else
    /// the API server's answer.
    pub async fn data(
        &mut self,
        api: &Api<Secret>,
        name: &str,
    ) -> Result<Option<Data>, kube::Error> {
        if let Some(data) = self.0.get(name) {
            return Ok(data.clone());
        }
        let data = api.get_opt(name).await?.map(|s| s.data.unwrap_or_default());
        self.0.insert(name.to_string(), data.clone());
        Ok(data)
    }
}

/// A digest of the content of the Secrets the resource names (an absent one
/// counts as absent), salted with the resource's uid so that the pod
/// template shows nothing that could be checked against a guessed password.
pub async fn digest(
    ic: &IdempotentConsumer,
    ctx: &Context,
    ns: &str,
    read: &mut Read,
) -> Result<String, kube::Error> {
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    let mut h = Sha256::new();
    h.update(ic.metadata.uid.as_deref().unwrap_or_default());
    for name in referenced(ic) {
        h.update(name);
        h.update([0]);
        match read.data(&api, name).await? {
            None => h.update(b"\x01absent"),
            // `data` is a BTreeMap: its order is the same on every read.
            Some(data) => {
                for (key, value) in data {
                    h.update(key);
                    h.update([0]);
                    h.update(&value.0);
                    h.update([0]);
                }
            }
        }
    }
    Ok(hex::encode(&h.finalize()[..12]))
}

/// The resources in `store` that name Secret `namespace`/`name`.
pub fn naming(store: &Store<Guarded>, namespace: &str, name: &str) -> Vec<ObjectRef<Guarded>> {
    store
        .state()
        .iter()
        .filter(|guard| {
            guard.0.as_ref().is_ok_and(|ic| {
                ic.namespace().as_deref() == Some(namespace) && referenced(ic).contains(&name)
            })
        })
        .map(|guard| ObjectRef::from(guard.as_ref()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{ExternalStore, SecretKeyRef};
    use crate::fixtures;
    use kube::core::DeserializeGuard;
    use kube::runtime::reflector;
    use kube::runtime::watcher::Event;

    fn external(mut ic: IdempotentConsumer, secret: &str) -> IdempotentConsumer {
        ic.spec.store.mode = StoreMode::External;
        ic.spec.store.external = Some(ExternalStore {
            secret_ref: SecretKeyRef {
                name: secret.into(),
                key: "url".into(),
            },
            cluster: false,
            sentinel: None,
            ca_key: None,
        });
        ic
    }

    #[test]
    fn the_broker_and_an_external_store_secret_are_named_the_managed_one_is_not() {
        let ic = fixtures::policy();
        assert_eq!(referenced(&ic), ["rabbitmq-orders"]);
        let ic = external(ic, "redis-url");
        assert_eq!(referenced(&ic), ["rabbitmq-orders", "redis-url"]);
        // One Secret holding both is named once.
        let ic = external(fixtures::policy(), "rabbitmq-orders");
        assert_eq!(referenced(&ic), ["rabbitmq-orders"]);
    }

    #[test]
    fn a_zeromq_endpoints_dead_letter_broker_secret_is_named_too() {
        let mut ic = crate::render::sample::zeromq_policy();
        assert_eq!(referenced(&ic), ["zeromq-orders"]);
        ic.spec.broker.zeromq.as_mut().expect("zeromq").dead_letter = serde_yaml::from_str(
            "kafka: { connectionSecretRef: { name: kafka-dead }, topic: orders.dead }",
        )
        .expect("a deadLetter");
        assert_eq!(referenced(&ic), ["kafka-dead", "zeromq-orders"]);
    }

    #[test]
    fn a_secret_reconciles_exactly_the_resources_of_its_namespace_that_name_it() {
        let (store, mut writer) = reflector::store::<Guarded>();
        let mut other = fixtures::policy();
        other.metadata.name = Some("refunds".into());
        other.spec.target.name = Some("refunds-worker".into());
        let other = external(other, "redis-url");
        let mut elsewhere = fixtures::policy();
        elsewhere.metadata.namespace = Some("billing".into());
        for ic in [fixtures::policy(), other, elsewhere] {
            writer.apply_watcher_event(&Event::Apply(DeserializeGuard(Ok(ic))));
        }
        let names = |secret: &str| {
            let mut names: Vec<String> = naming(&store, "shop", secret)
                .into_iter()
                .map(|r| r.name)
                .collect();
            names.sort();
            names
        };
        assert_eq!(names("rabbitmq-orders"), ["orders", "refunds"]);
        assert_eq!(names("redis-url"), ["refunds"]);
        assert!(names("unrelated").is_empty());
    }
}
