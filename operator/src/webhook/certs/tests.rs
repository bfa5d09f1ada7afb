//! The certificate Secret and the webhook configuration's caBundle against
//! a mocked API server, and the certificates themselves.

use std::time::{Duration, SystemTime};

use http::{Method, StatusCode};
use serde_json::{json, Value};

use super::*;
use crate::fixtures::{self, not_found, Expect};

const SECRET: &str = "/api/v1/namespaces/idemq-system/secrets/idemq-webhook-tls";
const CONFIG: &str = "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/idemq";
const DAY: Duration = Duration::from_secs(86_400);

fn wanted() -> Wanted {
    Wanted {
        names: vec!["idemq-webhook.idemq-system.svc".into(), "127.0.0.1".into()],
        lifetime: 90 * DAY,
    }
}

fn secret_json(m: &Material, resource_version: &str) -> Value {
    let mut s = serde_json::to_value(to_secret(
        "idemq-webhook-tls",
        m,
        Some(resource_version.into()),
    ))
    .expect("json");
    s["metadata"]["namespace"] = json!("idemq-system");
    s
}

fn material_of(body: &Value) -> Material {
    from_secret(&serde_json::from_value(body.clone()).expect("a Secret")).expect("every key")
}

fn client() -> (kube::Client, fixtures::Handle) {
    let (service, handle) = tower_test::mock::pair();
    (kube::Client::new(service, "idemq-system"), handle)
}

/// Issued `age` ago.
fn issued(age: Duration) -> Material {
    plan(None, &wanted(), SystemTime::now() - age)
        .expect("issues")
        .expect("something to store")
}

#[test]
fn a_new_certificate_serves_its_names_and_is_renewed_at_two_thirds_of_its_life() {
    let now = SystemTime::now();
    let m = plan(None, &wanted(), now).expect("issues").expect("new");
    let serving = facts(&m.cert, TLS_CERT).expect("readable");
    let mut names = serving.names.clone();
    names.sort();
    assert_eq!(names, ["127.0.0.1", "idemq-webhook.idemq-system.svc"]);
    let life = serving
        .not_after
        .duration_since(serving.not_before)
        .expect("positive");
    assert!(life.abs_diff(90 * DAY) < Duration::from_secs(2), "{life:?}");
    let renew = serving
        .renew_at()
        .duration_since(serving.not_before)
        .expect("after");
    assert!(
        renew.abs_diff(60 * DAY) < Duration::from_secs(2),
        "{renew:?}"
    );
    let ca = facts(&m.ca, CA_CERT).expect("readable");
    assert!(ca.not_after.duration_since(now).expect("later") > 800 * DAY);

    assert_eq!(
        plan(Some(&m), &wanted(), now + 59 * DAY).expect("plans"),
        None,
        "fresh: kept"
    );
    let renewed = plan(Some(&m), &wanted(), now + 61 * DAY)
        .expect("plans")
        .expect("due: renewed");
    assert_eq!(
        (&renewed.ca, &renewed.ca_key),
        (&m.ca, &m.ca_key),
        "the same CA, so the caBundle stays"
    );
    assert_ne!(renewed.cert, m.cert);

    let mut moved = wanted();
    moved.names = vec!["idemq-webhook.other.svc".into()];
    let reissued = plan(Some(&m), &moved, now)
        .expect("plans")
        .expect("other names: reissued");
    assert_eq!(reissued.ca, m.ca);
    assert_eq!(
        facts(&reissued.cert, TLS_CERT).expect("readable").names,
        ["idemq-webhook.other.svc"]
    );

    let mut broken = m.clone();
    broken.ca = "not a certificate".into();
    let fresh = plan(Some(&broken), &wanted(), now)
        .expect("plans")
        .expect("unreadable: replaced");
    assert_ne!(fresh.ca, m.ca, "a new CA");
}

#[tokio::test]
async fn the_first_replica_creates_the_secret() {
    let (client, handle) = client();
    let created = std::sync::Arc::new(std::sync::Mutex::new(None));
    let seen = created.clone();
    let server = tokio::spawn(fixtures::serve(
        handle,
        vec![
            Expect::get(SECRET, StatusCode::NOT_FOUND, not_found()),
            Expect::new(
                Method::POST,
                "/api/v1/namespaces/idemq-system/secrets",
                StatusCode::CREATED,
                Value::Null,
            )
            .with_body(move |s| {
                assert_eq!(s["metadata"]["name"], "idemq-webhook-tls");
                assert_eq!(
                    s["metadata"]["labels"]["app.kubernetes.io/component"],
                    "webhook"
                );
                *seen.lock().expect("lock") = Some(material_of(s));
            }),
        ],
    ));
    let m = ensure_secret(
        &kube::Api::namespaced(client, "idemq-system"),
        "idemq-webhook-tls",
        &wanted(),
    )
    .await
    .expect("a certificate");
    server.await.expect("every request came");
    assert_eq!(
        Some(m),
        created.lock().expect("lock").clone(),
        "serves what it stored"
    );
}

#[tokio::test]
async fn a_replica_that_loses_the_race_to_create_serves_the_winners() {
    let theirs = issued(Duration::ZERO);
    let (client, handle) = client();
    let exists = json!({ "kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "AlreadyExists", "code": 409, "message": "already exists" });
    let server = tokio::spawn(fixtures::serve(
        handle,
        vec![
            Expect::get(SECRET, StatusCode::NOT_FOUND, not_found()),
            Expect::new(
                Method::POST,
                "/api/v1/namespaces/idemq-system/secrets",
                StatusCode::CONFLICT,
                exists,
            ),
            Expect::get(SECRET, StatusCode::OK, secret_json(&theirs, "7")),
        ],
    ));
    let m = ensure_secret(
        &kube::Api::namespaced(client, "idemq-system"),
        "idemq-webhook-tls",
        &wanted(),
    )
    .await
    .expect("a certificate");
    server.await.expect("every request came");
    assert_eq!(m, theirs);
}

#[tokio::test]
async fn a_fresh_certificate_is_read_and_nothing_is_written() {
    let stored = issued(DAY);
    let (client, handle) = client();
    let server = tokio::spawn(fixtures::serve(
        handle,
        vec![Expect::get(
            SECRET,
            StatusCode::OK,
            secret_json(&stored, "7"),
        )],
    ));
    let m = ensure_secret(
        &kube::Api::namespaced(client, "idemq-system"),
        "idemq-webhook-tls",
        &wanted(),
    )
    .await
    .expect("a certificate");
    server.await.expect("every request came");
    assert_eq!(m, stored);
}

#[tokio::test]
async fn a_certificate_past_two_thirds_of_its_life_is_renewed_at_the_version_read() {
    let stored = issued(61 * DAY);
    let (client, handle) = client();
    let expected = stored.clone();
    let server = tokio::spawn(fixtures::serve(
        handle,
        vec![
            Expect::get(SECRET, StatusCode::OK, secret_json(&stored, "7")),
            Expect::new(Method::PUT, SECRET, StatusCode::OK, Value::Null).with_body(move |s| {
                assert_eq!(s["metadata"]["resourceVersion"], "7", "conflict-safe");
                let renewed = material_of(s);
                assert_eq!(renewed.ca, expected.ca);
                assert_ne!(renewed.cert, expected.cert);
            }),
        ],
    ));
    let m = ensure_secret(
        &kube::Api::namespaced(client, "idemq-system"),
        "idemq-webhook-tls",
        &wanted(),
    )
    .await
    .expect("a certificate");
    server.await.expect("every request came");
    assert_eq!(m.ca, stored.ca);
    let serving = facts(&m.cert, TLS_CERT).expect("readable");
    assert!(serving.renew_at() > SystemTime::now() + 59 * DAY);
}

#[tokio::test]
async fn a_renewal_that_conflicts_serves_the_other_replicas_renewal() {
    let stored = issued(61 * DAY);
    let theirs = plan(Some(&stored), &wanted(), SystemTime::now())
        .expect("plans")
        .expect("renewed");
    let (client, handle) = client();
    let conflict = json!({ "kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Conflict", "code": 409, "message": "the object has been modified" });
    let server = tokio::spawn(fixtures::serve(
        handle,
        vec![
            Expect::get(SECRET, StatusCode::OK, secret_json(&stored, "7")),
            Expect::new(Method::PUT, SECRET, StatusCode::CONFLICT, conflict),
            Expect::get(SECRET, StatusCode::OK, secret_json(&theirs, "8")),
        ],
    ));
    let m = ensure_secret(
        &kube::Api::namespaced(client, "idemq-system"),
        "idemq-webhook-tls",
        &wanted(),
    )
    .await
    .expect("a certificate");
    server.await.expect("every request came");
    assert_eq!(m, theirs);
}

fn configuration(bundles: &[Option<&str>]) -> Value {
    let webhooks: Vec<Value> = bundles
        .iter()
        .enumerate()
        .map(|(i, bundle)| {
            let mut client = json!({ "url": "https://127.0.0.1:9443/mutate" });
            if let Some(b) = bundle {
                client["caBundle"] = json!(ByteString(b.as_bytes().to_vec()));
            }
            json!({ "name": format!("pods-{i}.idemq.dev"), "clientConfig": client,
                    "sideEffects": "None", "admissionReviewVersions": ["v1"] })
        })
        .collect();
    json!({ "apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
            "metadata": { "name": "idemq", "resourceVersion": "3" }, "webhooks": webhooks })
}

fn bundle_of(patch: &Value, webhook: usize) -> String {
    let bundle: ByteString =
        serde_json::from_value(patch["webhooks"][webhook]["clientConfig"]["caBundle"].clone())
            .expect("base64");
    String::from_utf8(bundle.0).expect("PEM")
}

#[tokio::test]
async fn the_ca_bundle_is_patched_into_each_webhook_that_lacks_it_and_only_then() {
    let ca = issued(Duration::ZERO).ca;
    let (client, handle) = client();
    let want = ca.clone();
    let server = tokio::spawn(fixtures::serve(
        handle,
        vec![
            Expect::get(CONFIG, StatusCode::OK, configuration(&[None, Some(&ca)])),
            Expect::new(
                Method::PATCH,
                CONFIG,
                StatusCode::OK,
                configuration(&[Some(&ca), Some(&ca)]),
            )
            .with_body(move |p| {
                let webhooks = p["webhooks"].as_array().expect("webhooks");
                assert_eq!(webhooks.len(), 1, "only the stale one: {p}");
                assert_eq!(webhooks[0]["name"], "pods-0.idemq.dev");
                assert_eq!(bundle_of(p, 0), want);
                assert_eq!(p["metadata"]["resourceVersion"], "3", "at the version read");
            }),
            Expect::get(
                CONFIG,
                StatusCode::OK,
                configuration(&[Some(&ca), Some(&ca)]),
            ),
            Expect::get(CONFIG, StatusCode::NOT_FOUND, not_found()),
        ],
    ));
    let api = kube::Api::all(client);
    let read = |config: Option<MutatingWebhookConfiguration>| config.expect("exists");
    let config = read(read_configuration(&api, "idemq").await.expect("read"));
    ensure_ca_bundle(&api, &config, &ca).await.expect("patched");
    let config = read(read_configuration(&api, "idemq").await.expect("read"));
    ensure_ca_bundle(&api, &config, &ca)
        .await
        .expect("current: no write");
    assert!(read_configuration(&api, "idemq")
        .await
        .expect("absent: said so")
        .is_none());
    server.await.expect("every request came");
}

/// PEM certificates in `bundle`, in order.
fn certificates(bundle: &str) -> Vec<String> {
    bundle
        .split_inclusive("-----END CERTIFICATE-----")
        .map(|c| c.trim().to_string())
        .filter(|c| !c.is_empty())
        .collect()
}

#[test]
fn a_renewed_ca_keeps_the_one_it_replaced_in_the_bundle_until_the_next_renewal() {
    let now = SystemTime::now();
    let old = issued(601 * DAY);
    assert_eq!(certificates(&old.ca_bundle(now)), [old.ca.trim()]);
    let renewed = plan(Some(&old), &wanted(), now)
        .expect("plans")
        .expect("the CA is due: renewed");
    assert_ne!(renewed.ca, old.ca);
    assert_eq!(renewed.previous_ca.as_deref(), Some(old.ca.as_str()));
    assert_eq!(
        certificates(&renewed.ca_bundle(now)),
        [renewed.ca.trim(), old.ca.trim()],
        "both trusted while replicas move from one to the other"
    );
    let serving = plan(Some(&renewed), &wanted(), now + 61 * DAY)
        .expect("plans")
        .expect("serving renewal");
    assert_eq!(
        (&serving.ca, &serving.previous_ca),
        (&renewed.ca, &renewed.previous_ca)
    );
    assert_eq!(
        certificates(&serving.ca_bundle(now + 300 * DAY)),
        [serving.ca.trim()],
        "the old CA expired (900 days after its issue): no longer in the bundle"
    );
    let next = plan(Some(&serving), &wanted(), now + 601 * DAY)
        .expect("plans")
        .expect("the next CA renewal");
    assert_eq!(next.previous_ca.as_deref(), Some(renewed.ca.as_str()));

    // Stored and read back.
    let secret = to_secret("s", &renewed, None);
    assert_eq!(from_secret(&secret), Some(renewed));
}

fn own() -> crate::webhook::Own {
    crate::webhook::Own {
        configuration: "idemq".into(),
        wanted: wanted(),
    }
}

/// A CA renewal against a mocked API server: the configuration is read
/// first, the Secret renewed with the old CA kept, and the caBundle patched
/// with both at the version read; `patched` is the API server's answer.
async fn rotate(patched: StatusCode) -> (Material, Material, bool) {
    let old = issued(601 * DAY);
    let (client, handle) = client();
    let (stored, written) = (
        old.clone(),
        std::sync::Arc::new(std::sync::Mutex::new(None)),
    );
    let seen = written.clone();
    let answer = if patched == StatusCode::OK {
        configuration(&[Some(&old.ca)])
    } else {
        json!({ "kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Conflict", "code": 409, "message": "the object has been modified" })
    };
    let server = tokio::spawn(fixtures::serve(
        handle,
        vec![
            Expect::get(CONFIG, StatusCode::OK, configuration(&[Some(&old.ca)])),
            Expect::get(SECRET, StatusCode::OK, secret_json(&old, "7")),
            Expect::new(Method::PUT, SECRET, StatusCode::OK, Value::Null).with_body(move |s| {
                let m = material_of(s);
                assert_eq!(m.previous_ca.as_deref(), Some(stored.ca.as_str()));
                *seen.lock().expect("lock") = Some(m);
            }),
            Expect::new(Method::PATCH, CONFIG, patched, answer).with_body(move |p| {
                let m = written.lock().expect("lock").clone().expect("written");
                assert_eq!(p["metadata"]["resourceVersion"], "3");
                assert_eq!(
                    certificates(&bundle_of(p, 0)),
                    [m.ca.trim(), m.previous_ca.as_deref().expect("old").trim()],
                    "the new CA and the old"
                );
            }),
        ],
    ));
    let (next, trusted) = crate::webhook::renew(
        &kube::Api::namespaced(client.clone(), "idemq-system"),
        &kube::Api::all(client),
        "idemq-webhook-tls",
        &own(),
    )
    .await
    .expect("renewed");
    server.await.expect("every request came");
    (old, next, trusted)
}

#[tokio::test]
async fn a_replica_serves_a_certificate_of_a_new_ca_only_once_the_ca_bundle_holds_both() {
    let (old, next, trusted) = rotate(StatusCode::OK).await;
    assert!(trusted);
    assert_ne!(next.ca, old.ca);
    assert!(crate::webhook::moves_to(&old, &next, trusted));

    let (old, next, trusted) = rotate(StatusCode::CONFLICT).await;
    assert!(!trusted, "another replica patched in between");
    assert!(
        !crate::webhook::moves_to(&old, &next, trusted),
        "keeps serving the old CA's certificate, which the caBundle still trusts"
    );
    let mut renewal = old.clone();
    renewal.cert = next.cert.clone();
    assert!(
        crate::webhook::moves_to(&old, &renewal, false),
        "a renewal by the same CA needs no caBundle change"
    );
}

const ISSUED: &str = "/api/v1/namespaces/idemq-system/secrets/idemq-webhook-cert";

/// Secret idemq-webhook-cert as cert-manager writes it; `keys` of `m`.
fn issued_secret(m: &Material, keys: &[&str]) -> Value {
    let mut data = serde_json::Map::new();
    for (key, pem) in [(CA_CERT, &m.ca), (TLS_CERT, &m.cert), (TLS_KEY, &m.key)] {
        if keys.contains(&key) {
            data.insert(key.into(), json!(ByteString(pem.as_bytes().to_vec())));
        }
    }
    json!({ "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
            "metadata": { "name": "idemq-webhook-cert", "namespace": "idemq-system",
                          "annotations": { "cert-manager.io/certificate-name": "idemq-operator-webhook" } },
            "data": data })
}

fn der(pem: &str) -> Vec<u8> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::pem_slice_iter(pem.as_bytes())
        .next()
        .expect("a certificate")
        .expect("PEM")
        .to_vec()
}

#[tokio::test]
async fn an_externally_issued_certificate_is_only_read_and_its_renewal_served_without_a_restart() {
    let first = issued(Duration::ZERO);
    let renewed = plan(Some(&first), &wanted(), SystemTime::now() + 61 * DAY)
        .expect("plans")
        .expect("renewed");
    let all = [CA_CERT, TLS_CERT, TLS_KEY];
    let (client, handle) = client();
    // Reads only: a write (or any call on the webhook configuration) would
    // not match what is expected.
    let server = tokio::spawn(fixtures::serve(
        handle,
        vec![
            Expect::get(ISSUED, StatusCode::OK, issued_secret(&first, &all)),
            Expect::get(ISSUED, StatusCode::OK, issued_secret(&first, &all)),
            Expect::get(ISSUED, StatusCode::OK, issued_secret(&renewed, &all)),
            Expect::get(
                ISSUED,
                StatusCode::OK,
                issued_secret(&renewed, &[CA_CERT, TLS_CERT]),
            ),
        ],
    ));
    let api = kube::Api::namespaced(client, "idemq-system");
    let mut serving = read_serving(&api, "idemq-webhook-cert")
        .await
        .expect("issued");
    assert_eq!(serving, first.serving());
    let certificate = crate::webhook::server::Reloadable::new(&serving).expect("loads");
    assert!(
        !crate::webhook::follow_once(&api, "idemq-webhook-cert", &certificate, &mut serving)
            .await
            .expect("read"),
        "unchanged"
    );
    assert_eq!(certificate.current(), der(&first.cert));
    assert!(
        crate::webhook::follow_once(&api, "idemq-webhook-cert", &certificate, &mut serving)
            .await
            .expect("read"),
        "renewed"
    );
    assert_eq!(certificate.current(), der(&renewed.cert), "served at once");
    let incomplete =
        crate::webhook::follow_once(&api, "idemq-webhook-cert", &certificate, &mut serving)
            .await
            .expect_err("no tls.key");
    assert!(incomplete.to_string().contains("tls.key"), "{incomplete}");
    assert_eq!(
        certificate.current(),
        der(&renewed.cert),
        "an incomplete Secret leaves the served certificate alone"
    );
    server.await.expect("every request came");
}

#[tokio::test]
async fn with_an_external_issuer_the_webhook_starts_on_the_secret_alone() {
    let first = issued(Duration::ZERO);
    let (client, handle) = client();
    let server = tokio::spawn(fixtures::serve(
        handle,
        vec![Expect::get(
            ISSUED,
            StatusCode::OK,
            issued_secret(&first, &[CA_CERT, TLS_CERT, TLS_KEY]),
        )],
    ));
    let shutdown = tokio_util::sync::CancellationToken::new();
    let settings = crate::webhook::Settings {
        addr: "127.0.0.1:0".parse().expect("addr"),
        namespace: "idemq-system".into(),
        secret: "idemq-webhook-cert".into(),
        issuer: crate::webhook::Issuer::External,
    };
    crate::webhook::start(client, settings, "img".into(), shutdown.clone())
        .await
        .expect("serves");
    shutdown.cancel();
    server
        .await
        .expect("one read of the Secret, no CA, no caBundle");
}
