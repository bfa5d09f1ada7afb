//! The mutating admission webhook of injection: pod.
//!
//! The API server calls `POST /mutate` for each pod created with the label
//! `idemq.dev/inject: enabled` (the webhook configuration's objectSelector:
//! no other pod ever waits on it). The answer is decided by [`admit`], a pure
//! function of the request and the namespace's IdempotentConsumers: the pod
//! selected by a resource with injection: pod gets the sidecar, its volumes,
//! the consumer label and the config-hash annotation, exactly as the pod
//! template gets them with injection: workload ([`render::sidecar::pod_additions`]);
//! a pod that no resource selects is allowed unchanged.
//!
//! The resources are listed from the API server for each request rather than
//! read from the controller's cache: every replica serves the webhook, and
//! only the leader runs the controller; and a pod created right after its
//! resource must not miss it because a cache lags. Only labelled pods come
//! here, so this is one namespaced list per pod that wants a sidecar.
//!
//! [`certs`] keeps the serving certificate and the webhook configuration's
//! `caBundle` (or, when cert-manager issues the certificate, only reads its
//! Secret); [`server`] serves HTTPS with whatever certificate is current.

pub mod certs;
pub mod server;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use json_patch::Patch;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::Api;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, Operation};
use kube::core::{Selector, SelectorExt};
use kube::{Client, ResourceExt};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::crd::{IdempotentConsumer, Injection};
use crate::render;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Cert(#[from] certs::CertError),
    #[error("bind the webhook listener on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Where and how the webhook is served.
#[derive(Debug, Clone)]
pub struct Settings {
    pub addr: SocketAddr,
    /// The operator's namespace, which holds the certificate Secret.
    pub namespace: String,
    pub secret: String,
    pub issuer: Issuer,
}

/// Who issues the serving certificate.
#[derive(Debug, Clone)]
pub enum Issuer {
    /// The operator: its own CA in the Secret, and the `caBundle` kept by it.
    Operator(Own),
    /// Another issuer (cert-manager) keeps the Secret and the `caBundle`:
    /// the operator reads the Secret, serves it, and follows its renewals.
    External,
}

/// What the operator issues, and where it publishes its CA.
#[derive(Debug, Clone)]
pub struct Own {
    /// The MutatingWebhookConfiguration whose caBundle is kept.
    pub configuration: String,
    pub wanted: certs::Wanted,
}

/// How often a certificate kept by another issuer is read again: its
/// renewal (at two thirds of its lifetime by default) is served within this.
const FOLLOW: Duration = Duration::from_secs(30);

/// Obtains the certificate (with the operator as issuer, creating the
/// Secret if no replica has yet), starts serving, and keeps the certificate
/// current until `shutdown`. Returns once the webhook serves.
pub async fn start(
    client: Client,
    settings: Settings,
    sidecar_image: String,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &settings.namespace);
    let configs: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let own = match &settings.issuer {
        Issuer::Operator(own) => Some(renew(&secrets, &configs, &settings.secret, own).await?.0),
        Issuer::External => None,
    };
    let serving = match &own {
        Some(material) => material.serving(),
        None => certs::read_serving(&secrets, &settings.secret).await?,
    };
    let certificate = Arc::new(server::Reloadable::new(&serving)?);
    let listener = tokio::net::TcpListener::bind(settings.addr)
        .await
        .map_err(|source| Error::Bind {
            addr: settings.addr,
            source,
        })?;
    let webhook = server::Webhook {
        client,
        sidecar_image,
    };
    let tls = server::tls_config(certificate.clone());
    tokio::spawn(server::serve(
        listener,
        tls,
        webhook,
        shutdown.clone().cancelled_owned(),
    ));
    match (own, settings.issuer) {
        (Some(material), Issuer::Operator(own)) => tokio::spawn(keep(
            secrets,
            configs,
            settings.secret,
            own,
            certificate,
            material,
            shutdown,
        )),
        _ => tokio::spawn(follow(
            secrets,
            settings.secret,
            certificate,
            serving,
            shutdown,
        )),
    };
    Ok(())
}

/// Reads the Secret another issuer keeps every [`FOLLOW`], and serves what
/// it holds when that changed.
async fn follow(
    secrets: Api<Secret>,
    secret: String,
    certificate: Arc<server::Reloadable>,
    mut serving: certs::Serving,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(FOLLOW) => {}
        }
        if let Err(e) = follow_once(&secrets, &secret, &certificate, &mut serving).await {
            tracing::warn!(error = %e, "cannot read the webhook certificate");
        }
    }
}

/// One read of [`follow`]: Ok(true) when a new certificate is served.
async fn follow_once(
    secrets: &Api<Secret>,
    secret: &str,
    certificate: &server::Reloadable,
    serving: &mut certs::Serving,
) -> Result<bool, certs::CertError> {
    let next = certs::read_serving(secrets, secret).await?;
    if next == *serving {
        return Ok(false);
    }
    certificate.reload(&next)?;
    tracing::info!(secret, "serving the renewed webhook certificate");
    *serving = next;
    Ok(true)
}

/// One check: reads the webhook configuration, then the Secret (creating or
/// renewing the certificate when due), then patches the `caBundle` when it
/// differs. Returns what the Secret holds, and whether the API server
/// trusts its CA (false when the `caBundle` could not be read or written).
///
/// The configuration is read before the Secret: a CA another replica put in
/// the `caBundle` was in the Secret before, so the Secret read after names it
/// and this replica never patches away a CA that another one serves with.
/// The patch is conditional on the version read: a replica that patched in
/// between makes this one try again at its next check.
async fn renew(
    secrets: &Api<Secret>,
    configs: &Api<MutatingWebhookConfiguration>,
    secret: &str,
    own: &Own,
) -> Result<(certs::Material, bool), certs::CertError> {
    let config = certs::read_configuration(configs, &own.configuration).await;
    let material = certs::ensure_secret(secrets, secret, &own.wanted).await?;
    let bundle = material.ca_bundle(SystemTime::now());
    let trusted = match config {
        Ok(Some(config)) => match certs::ensure_ca_bundle(configs, &config, &bundle).await {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(error = %e, "cannot update the webhook caBundle");
                false
            }
        },
        Ok(None) => {
            tracing::warn!(configuration = %own.configuration, "no such MutatingWebhookConfiguration: the API server calls nobody");
            true
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the webhook caBundle");
            false
        }
    };
    Ok((material, trusted))
}

/// Whether a replica serving `serving` moves to `next`: a certificate of the
/// CA it serves with is trusted already; one of a new CA only once the
/// `caBundle` holds that CA.
fn moves_to(serving: &certs::Material, next: &certs::Material, trusted: bool) -> bool {
    next != serving && (next.ca == serving.ca || trusted)
}

/// Checks ([`renew`]) every tenth of the serving certificate's lifetime (at
/// least every second, at most hourly), and serves what the Secret holds
/// when [`moves_to`] says so.
async fn keep(
    secrets: Api<Secret>,
    configs: Api<MutatingWebhookConfiguration>,
    secret: String,
    own: Own,
    certificate: Arc<server::Reloadable>,
    mut serving: certs::Material,
    shutdown: CancellationToken,
) {
    let period =
        (own.wanted.lifetime / 10).clamp(Duration::from_secs(1), Duration::from_secs(3600));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(period) => {}
        }
        match renew(&secrets, &configs, &secret, &own).await {
            Ok((next, trusted)) if moves_to(&serving, &next, trusted) => {
                match certificate.reload(&next.serving()) {
                    Ok(()) => {
                        tracing::info!("serving the renewed webhook certificate");
                        serving = next;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot load the renewed webhook certificate")
                    }
                }
            }
            Ok((next, _)) if next != serving => {
                tracing::info!(
                    "a new webhook CA: its certificate is served once the caBundle holds it"
                )
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "cannot check the webhook certificate"),
        }
    }
}

/// The resource that serves `pod` of namespace `ns`: of the resources with
/// injection: pod whose selector matches the pod's labels, the oldest (by
/// creationTimestamp, then name), as with two resources naming one workload.
/// A resource being deleted serves no new pod.
pub fn select<'a>(
    pod: &Pod,
    ns: &str,
    consumers: &'a [IdempotentConsumer],
) -> Option<&'a IdempotentConsumer> {
    let labels = pod.labels();
    consumers
        .iter()
        .filter(|ic| {
            ic.spec.injection == Injection::Pod
                && ic.namespace().as_deref() == Some(ns)
                && ic.metadata.deletion_timestamp.is_none()
                && ic
                    .spec
                    .target
                    .selector
                    .clone()
                    .and_then(|s| Selector::try_from(s).ok())
                    // An empty selector (refused by the schema) selects nothing.
                    .is_some_and(|s| !s.selects_all() && s.matches(labels))
        })
        .min_by_key(|ic| {
            (
                ic.metadata
                    .creation_timestamp
                    .as_ref()
                    .map(|t| t.0.as_second()),
                ic.name_any(),
            )
        })
}

/// The answer to one admission request: allowed, with the sidecar's patch
/// when a resource selects the pod; refused when the resource that selects
/// it cannot be rendered (the pod must not start without its sidecar).
pub fn admit(
    request: &AdmissionRequest<Pod>,
    consumers: &[IdempotentConsumer],
    default_image: &str,
) -> AdmissionResponse {
    let allowed = AdmissionResponse::from(request);
    let (Operation::Create, Some(pod)) = (&request.operation, &request.object) else {
        return allowed;
    };
    let ns = request
        .namespace
        .clone()
        .or_else(|| pod.namespace())
        .unwrap_or_default();
    let Some(ic) = select(pod, &ns, consumers) else {
        return allowed;
    };
    let hash = match render::config::config_map(ic) {
        Ok((_, hash)) => hash,
        Err(e) => {
            return allowed.deny(format!(
                "IdempotentConsumer {} selects this pod, and its sidecar cannot be configured: {e}",
                ic.name_any()
            ))
        }
    };
    // No secrets-hash: pods are not rolled in this mode, and the webhook
    // reads no Secret.
    let additions = render::sidecar::pod_additions(ic, &hash, None, default_image);
    let ops = render::sidecar::pod_patch(pod, additions);
    if ops.is_empty() {
        return allowed;
    }
    let patch = serde_json::from_value::<Patch>(Value::Array(ops))
        .map_err(|e| e.to_string())
        .and_then(|patch| allowed.clone().with_patch(patch).map_err(|e| e.to_string()));
    match patch {
        Ok(response) => response,
        Err(e) => allowed.deny(format!("cannot build the sidecar's patch: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::core::admission::AdmissionReview;
    use serde_json::json;

    fn pod_policy(name: &str, selector: Value, created: &str) -> IdempotentConsumer {
        let mut ic = crate::fixtures::policy();
        ic.metadata.name = Some(name.into());
        ic.metadata.creation_timestamp = serde_json::from_value(json!(created)).expect("time");
        ic.spec.injection = Injection::Pod;
        ic.spec.target = serde_json::from_value(json!({ "selector": selector })).expect("target");
        ic
    }

    fn request(labels: Value) -> AdmissionRequest<Pod> {
        let review: AdmissionReview<Pod> = serde_json::from_value(json!({
            "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {
                "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
                "kind": { "group": "", "version": "v1", "kind": "Pod" },
                "resource": { "group": "", "version": "v1", "resource": "pods" },
                "requestKind": { "group": "", "version": "v1", "kind": "Pod" },
                "requestResource": { "group": "", "version": "v1", "resource": "pods" },
                "namespace": "shop", "operation": "CREATE",
                "userInfo": { "username": "system:serviceaccount:kube-system:replicaset-controller" },
                "object": { "apiVersion": "v1", "kind": "Pod",
                            "metadata": { "generateName": "worker-7d9f-", "labels": labels },
                            "spec": { "containers": [{ "name": "app", "image": "app:1" }] } },
                "oldObject": null, "dryRun": false,
                "options": { "apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions" }
            }
        }))
        .expect("an AdmissionReview");
        review.try_into().expect("a request")
    }

    /// The answer as the API server reads it.
    fn answer(response: AdmissionResponse) -> Value {
        serde_json::to_value(response.into_review()).expect("json")["response"].clone()
    }

    /// The patch's bytes (kube writes them as a JSON array, which the API
    /// server reads as well as base64).
    fn patch_of(answer: &Value) -> Vec<Value> {
        let bytes: Vec<u8> = serde_json::from_value(answer["patch"].clone()).expect("a patch");
        serde_json::from_slice(&bytes).expect("a JSON patch")
    }

    #[test]
    fn a_selected_pod_gets_the_sidecar_and_the_others_go_through_unchanged() {
        let consumers = [
            pod_policy(
                "orders",
                json!({ "matchLabels": { "app": "worker" } }),
                "2026-01-01T00:00:00Z",
            ),
            pod_policy(
                "batch",
                json!({ "matchExpressions": [{ "key": "job-name", "operator": "Exists" }] }),
                "2026-01-01T00:00:00Z",
            ),
        ];
        let selected = request(json!({ "app": "worker", "idemq.dev/inject": "enabled" }));
        let a = answer(admit(&selected, &consumers, "img:1"));
        assert_eq!(a["uid"], "705ab4f5-6393-11e8-b7cc-42010a800002");
        assert_eq!(a["allowed"], true);
        assert_eq!(a["patchType"], "JSONPatch");
        let ops = patch_of(&a);
        let paths: Vec<&str> = ops.iter().filter_map(|o| o["path"].as_str()).collect();
        assert_eq!(
            paths,
            [
                "/metadata/labels/idemq.dev~1consumer",
                "/metadata/annotations",
                "/spec/initContainers",
                "/spec/volumes"
            ]
        );
        assert_eq!(ops[0]["value"], "orders");
        let (_, hash) = render::config::config_map(&consumers[0]).expect("renders");
        assert_eq!(ops[1]["value"]["idemq.dev/config-hash"], hash.as_str());
        assert_eq!(ops[2]["value"][0]["name"], "idemq-sidecar");
        assert_eq!(ops[2]["value"][0]["image"], "img:1");
        assert_eq!(ops[3]["value"][0]["configMap"]["name"], "orders-idemq");

        let job = request(json!({ "job-name": "nightly-1", "idemq.dev/inject": "enabled" }));
        assert_eq!(
            patch_of(&answer(admit(&job, &consumers, "img:1")))[0]["value"],
            "batch"
        );

        let unrelated = request(json!({ "app": "web", "idemq.dev/inject": "enabled" }));
        let a = answer(admit(&unrelated, &consumers, "img:1"));
        assert_eq!((a["allowed"].clone(), a.get("patch")), (json!(true), None));
    }

    #[test]
    fn workload_mode_other_namespaces_and_deleted_resources_select_nothing() {
        let selector = json!({ "matchLabels": { "app": "worker" } });
        let mut workload = pod_policy("a", selector.clone(), "2026-01-01T00:00:00Z");
        workload.spec.injection = Injection::Workload;
        let mut elsewhere = pod_policy("b", selector.clone(), "2026-01-01T00:00:00Z");
        elsewhere.metadata.namespace = Some("staging".into());
        let mut deleted = pod_policy("c", selector.clone(), "2026-01-01T00:00:00Z");
        deleted.metadata.deletion_timestamp =
            serde_json::from_value(json!("2026-01-02T00:00:00Z")).expect("time");
        let empty = pod_policy("d", json!({}), "2026-01-01T00:00:00Z");
        let consumers = [workload, elsewhere, deleted, empty];
        let pod = request(json!({ "app": "worker" }));
        let a = answer(admit(&pod, &consumers, "img"));
        assert_eq!((a["allowed"].clone(), a.get("patch")), (json!(true), None));
    }

    #[test]
    fn of_two_resources_selecting_a_pod_the_oldest_serves_it() {
        let selector = json!({ "matchLabels": { "app": "worker" } });
        let consumers = [
            pod_policy("newer", selector.clone(), "2026-03-01T00:00:00Z"),
            pod_policy("older", selector.clone(), "2026-01-01T00:00:00Z"),
            pod_policy("also-older", selector, "2026-01-01T00:00:00Z"),
        ];
        let pod = request(json!({ "app": "worker" })).object.expect("pod");
        assert_eq!(
            select(&pod, "shop", &consumers).map(|ic| ic.name_any()),
            Some("also-older".into()),
            "same age: by name"
        );
    }

    #[test]
    fn a_pod_selected_by_an_invalid_resource_is_refused() {
        let mut ic = pod_policy(
            "orders",
            json!({ "matchLabels": { "app": "worker" } }),
            "2026-01-01T00:00:00Z",
        );
        ic.spec.lease = Some("soon".into());
        let a = answer(admit(&request(json!({ "app": "worker" })), &[ic], "img"));
        assert_eq!(a["allowed"], false);
        let message = a["status"]["message"].as_str().unwrap_or_default();
        assert!(
            message.contains("IdempotentConsumer orders selects this pod"),
            "{message}"
        );
    }
}
