//! The webhook's own CA and serving certificate, and the `caBundle` that
//! makes the API server trust it.
//!
//! Both live in one Secret in the operator's namespace, shared by every
//! replica: the first replica to find it missing creates it (a create, so
//! that of two replicas racing only one wins; the other reads the winner's),
//! and a replica that finds the serving certificate past two thirds of its
//! lifetime issues a new one from the same CA and replaces the Secret at the
//! resourceVersion it read (a conflict means another replica renewed first:
//! its certificate is read instead). Every replica re-reads the Secret
//! periodically and serves what it holds, so all replicas move to a renewed
//! certificate without a restart. The `caBundle` (the CA, which a serving
//! certificate renewal leaves unchanged) is patched into every webhook of the
//! MutatingWebhookConfiguration when it differs.
//!
//! The CA lives ten serving lifetimes and is renewed the same way at two
//! thirds of its own. The replaced CA stays in the Secret (`ca-previous.crt`)
//! and in the `caBundle` next to the new one until the next CA renewal (or
//! its expiry), so that while the replicas move from a certificate of the
//! old CA to one of the new, the API server trusts both: a replica serves a
//! certificate of a new CA only once it has seen that CA in the `caBundle`
//! (see [`super::keep`]).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::ByteString;
use kube::api::{Api, Patch, PatchParams, PostParams};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use serde_json::json;

use crate::labels;

pub const CA_CERT: &str = "ca.crt";
pub const CA_KEY: &str = "ca.key";
pub const TLS_CERT: &str = "tls.crt";
pub const TLS_KEY: &str = "tls.key";
/// The CA replaced by the last CA renewal, trusted until the next one.
pub const CA_PREVIOUS: &str = "ca-previous.crt";

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("generate a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("read the certificate in Secret key {key}: {message}")]
    Read { key: &'static str, message: String },
    #[error("Secret {name}: {source}")]
    Secret {
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("MutatingWebhookConfiguration {name}: {source}")]
    Configuration {
        name: String,
        #[source]
        source: kube::Error,
    },
}

/// The CA and the serving certificate with their keys, as PEM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Material {
    pub ca: String,
    pub ca_key: String,
    pub cert: String,
    pub key: String,
    /// The CA this one replaced, if any.
    pub previous_ca: Option<String>,
}

/// A serving certificate (with its chain) and its key, as PEM: what the
/// server needs, whoever issued it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Serving {
    pub cert: String,
    pub key: String,
}

impl Material {
    pub fn serving(&self) -> Serving {
        Serving {
            cert: self.cert.clone(),
            key: self.key.clone(),
        }
    }

    /// What the API server must trust at `now`: the CA, then the one it
    /// replaced while that is unexpired.
    pub fn ca_bundle(&self, now: SystemTime) -> String {
        let previous = self
            .previous_ca
            .as_deref()
            .filter(|pem| facts(pem, CA_PREVIOUS).is_ok_and(|f| now < f.not_after));
        match previous {
            Some(previous) => format!("{}\n{}", self.ca.trim_end(), previous.trim_end()) + "\n",
            None => self.ca.clone(),
        }
    }
}

/// What the serving certificate must be.
#[derive(Debug, Clone)]
pub struct Wanted {
    /// The names clients use: the Service's DNS names, or 127.0.0.1.
    pub names: Vec<String>,
    /// The serving certificate's lifetime; the CA lives ten times as long.
    pub lifetime: Duration,
}

impl Wanted {
    fn ca_lifetime(&self) -> Duration {
        self.lifetime.saturating_mul(10)
    }
}

/// A new CA, valid from `now` for `lifetime`.
fn new_ca(now: SystemTime, lifetime: Duration) -> Result<(String, String), CertError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params
        .distinguished_name
        .push(DnType::CommonName, "idemq webhook CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = now.into();
    params.not_after = (now + lifetime).into();
    let cert = params.self_signed(&key)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// A serving certificate for `wanted.names`, signed by the CA, valid from `now`.
fn new_serving(
    ca: &str,
    ca_key: &str,
    wanted: &Wanted,
    now: SystemTime,
) -> Result<(String, String), CertError> {
    let issuer = Issuer::from_ca_cert_pem(ca, KeyPair::from_pem(ca_key)?)?;
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(wanted.names.clone())?;
    if let Some(first) = wanted.names.first() {
        params
            .distinguished_name
            .push(DnType::CommonName, first.as_str());
    }
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    params.not_before = now.into();
    params.not_after = (now + wanted.lifetime).into();
    let cert = params.signed_by(&key, &issuer)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// What a certificate says of itself: when it is valid, and for which names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Facts {
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    pub names: Vec<String>,
}

impl Facts {
    /// Two thirds into its lifetime: when it is renewed.
    pub fn renew_at(&self) -> SystemTime {
        let life = self
            .not_after
            .duration_since(self.not_before)
            .unwrap_or_default();
        self.not_before + life.mul_f64(2.0 / 3.0)
    }
}

pub fn facts(pem: &str, key: &'static str) -> Result<Facts, CertError> {
    let read = |message: String| CertError::Read { key, message };
    let (_, pem) =
        x509_parser::pem::parse_x509_pem(pem.as_bytes()).map_err(|e| read(e.to_string()))?;
    let cert = pem.parse_x509().map_err(|e| read(e.to_string()))?;
    let at = |t: i64| SystemTime::UNIX_EPOCH + Duration::from_secs(t.max(0).unsigned_abs());
    let validity = cert.validity();
    let mut names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                x509_parser::extensions::GeneralName::DNSName(dns) => names.push(dns.to_string()),
                x509_parser::extensions::GeneralName::IPAddress(bytes) => {
                    let ip = match bytes.len() {
                        4 => <[u8; 4]>::try_from(*bytes).ok().map(IpAddr::from),
                        16 => <[u8; 16]>::try_from(*bytes).ok().map(IpAddr::from),
                        _ => None,
                    };
                    names.extend(ip.map(|ip| ip.to_string()));
                }
                _ => {}
            }
        }
    }
    Ok(Facts {
        not_before: at(validity.not_before.timestamp()),
        not_after: at(validity.not_after.timestamp()),
        names,
    })
}

/// The material to store, given what is stored (`None`: no Secret, or one
/// that cannot be read): `None` when what is stored serves as it is. Pure,
/// apart from the keys it generates.
pub fn plan(
    stored: Option<&Material>,
    wanted: &Wanted,
    now: SystemTime,
) -> Result<Option<Material>, CertError> {
    let usable = |pem: &str, key| facts(pem, key).ok().filter(|f| now < f.renew_at());
    let ca = stored.filter(|m| usable(&m.ca, CA_CERT).is_some());
    let (ca, ca_key, previous_ca) = match ca {
        Some(m) => {
            let serving = usable(&m.cert, TLS_CERT);
            let mut want: Vec<&String> = wanted.names.iter().collect();
            let mut have: Vec<&String> = serving.iter().flat_map(|f| &f.names).collect();
            want.sort();
            have.sort();
            if serving.is_some() && want == have {
                return Ok(None);
            }
            (m.ca.clone(), m.ca_key.clone(), m.previous_ca.clone())
        }
        None => {
            // The CA being replaced stays trusted while it is valid: the
            // replicas still serve certificates it signed.
            let replaced = stored
                .map(|m| m.ca.clone())
                .filter(|pem| facts(pem, CA_CERT).is_ok_and(|f| now < f.not_after));
            let (ca, ca_key) = new_ca(now, wanted.ca_lifetime())?;
            (ca, ca_key, replaced)
        }
    };
    let (cert, key) = new_serving(&ca, &ca_key, wanted, now)?;
    Ok(Some(Material {
        ca,
        ca_key,
        cert,
        key,
        previous_ca,
    }))
}

fn from_secret(secret: &Secret) -> Option<Material> {
    let data = secret.data.as_ref()?;
    let get = |key: &str| {
        data.get(key)
            .and_then(|v| String::from_utf8(v.0.clone()).ok())
    };
    Some(Material {
        ca: get(CA_CERT)?,
        ca_key: get(CA_KEY)?,
        cert: get(TLS_CERT)?,
        key: get(TLS_KEY)?,
        previous_ca: get(CA_PREVIOUS),
    })
}

fn to_secret(name: &str, material: &Material, resource_version: Option<String>) -> Secret {
    let mut data = BTreeMap::from([
        (
            CA_CERT.to_string(),
            ByteString(material.ca.clone().into_bytes()),
        ),
        (
            CA_KEY.to_string(),
            ByteString(material.ca_key.clone().into_bytes()),
        ),
        (
            TLS_CERT.to_string(),
            ByteString(material.cert.clone().into_bytes()),
        ),
        (
            TLS_KEY.to_string(),
            ByteString(material.key.clone().into_bytes()),
        ),
    ]);
    if let Some(previous) = &material.previous_ca {
        data.insert(
            CA_PREVIOUS.to_string(),
            ByteString(previous.clone().into_bytes()),
        );
    }
    Secret {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            labels: Some(BTreeMap::from([
                ("app.kubernetes.io/name".to_string(), "idemq".to_string()),
                (
                    "app.kubernetes.io/component".to_string(),
                    "webhook".to_string(),
                ),
                (
                    "app.kubernetes.io/managed-by".to_string(),
                    labels::MANAGER.to_string(),
                ),
            ])),
            resource_version,
            ..ObjectMeta::default()
        },
        type_: Some("Opaque".to_string()),
        data: Some(data),
        ..Secret::default()
    }
}

/// The certificate another issuer (cert-manager) keeps in Secret `name`
/// (`tls.crt`, `tls.key`): read only, never written.
pub async fn read_serving(api: &Api<Secret>, name: &str) -> Result<Serving, CertError> {
    let secret = api.get(name).await.map_err(|source| CertError::Secret {
        name: name.to_string(),
        source,
    })?;
    let data = secret.data.unwrap_or_default();
    let get = |key: &'static str| {
        data.get(key)
            .and_then(|v| String::from_utf8(v.0.clone()).ok())
            .filter(|pem| !pem.trim().is_empty())
            .ok_or(CertError::Read {
                key,
                message: format!("Secret {name} has no such key (not issued yet?)"),
            })
    };
    Ok(Serving {
        cert: get(TLS_CERT)?,
        key: get(TLS_KEY)?,
    })
}

/// The certificate to serve: what Secret `name` holds, after creating or
/// renewing it when [`plan`] says so. Safe with any number of replicas.
pub async fn ensure_secret(
    api: &Api<Secret>,
    name: &str,
    wanted: &Wanted,
) -> Result<Material, CertError> {
    let failed = |source| CertError::Secret {
        name: name.to_string(),
        source,
    };
    let stored = api.get_opt(name).await.map_err(failed)?;
    let material = stored.as_ref().and_then(from_secret);
    let Some(next) = plan(material.as_ref(), wanted, SystemTime::now())? else {
        // `plan` renews whatever cannot be read, so there is material here.
        return material.ok_or_else(|| CertError::Read {
            key: TLS_CERT,
            message: "unreadable".into(),
        });
    };
    let written = match &stored {
        None => api
            .create(&PostParams::default(), &to_secret(name, &next, None))
            .await
            .map(|_| ()),
        Some(secret) => api
            .replace(
                name,
                &PostParams::default(),
                &to_secret(name, &next, secret.metadata.resource_version.clone()),
            )
            .await
            .map(|_| ()),
    };
    match written {
        Ok(()) => {
            tracing::info!(secret = name, "webhook certificate issued");
            Ok(next)
        }
        // Another replica created or renewed it first: serve theirs.
        Err(kube::Error::Api(s)) if s.is_already_exists() || s.is_conflict() => {
            let theirs = api.get(name).await.map_err(failed)?;
            from_secret(&theirs).ok_or_else(|| CertError::Read {
                key: TLS_CERT,
                message: "the Secret another replica wrote is incomplete".into(),
            })
        }
        Err(e) => Err(failed(e)),
    }
}

/// Configuration `name`, or `None` when it does not exist (the chart
/// installs it; a run without it serves nobody).
pub async fn read_configuration(
    api: &Api<MutatingWebhookConfiguration>,
    name: &str,
) -> Result<Option<MutatingWebhookConfiguration>, CertError> {
    api.get_opt(name)
        .await
        .map_err(|source| CertError::Configuration {
            name: name.to_string(),
            source,
        })
}

/// Patches `bundle` (PEM) into every webhook of `config` whose `caBundle`
/// differs, at the resourceVersion read: if another replica patched it
/// since, the API server answers Conflict and nothing is written.
pub async fn ensure_ca_bundle(
    api: &Api<MutatingWebhookConfiguration>,
    config: &MutatingWebhookConfiguration,
    bundle: &str,
) -> Result<(), CertError> {
    let name = config.metadata.name.clone().unwrap_or_default();
    let stale: Vec<_> = config
        .webhooks
        .iter()
        .flatten()
        .filter(|w| w.client_config.ca_bundle.as_ref().map(|b| b.0.as_slice()) != Some(bundle.as_bytes()))
        .map(|w| json!({ "name": w.name, "clientConfig": { "caBundle": ByteString(bundle.as_bytes().to_vec()) } }))
        .collect();
    if stale.is_empty() {
        return Ok(());
    }
    // A strategic merge patch: the webhooks merge by name, and only their
    // caBundle is written; the resourceVersion is a precondition.
    let patch = json!({
        "metadata": { "resourceVersion": config.metadata.resource_version },
        "webhooks": stale,
    });
    api.patch(&name, &PatchParams::default(), &Patch::Strategic(patch))
        .await
        .map_err(|source| CertError::Configuration {
            name: name.clone(),
            source,
        })?;
    tracing::info!(configuration = %name, "webhook caBundle updated");
    Ok(())
}

#[cfg(test)]
mod tests;
