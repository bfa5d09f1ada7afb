//! The webhook's HTTPS server: `POST /mutate` on a TLS listener whose
//! certificate is swapped in place when [`certs`](super::certs) renews it, so
//! a renewal needs no restart and drops no connection.
//!
//! TLS handshakes run in their own tasks (bounded by a timeout), so one slow
//! client cannot hold up the others; finished handshakes are handed to
//! `axum::serve` as its listener.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::extract::State;
use axum::routing::post;
use axum::Json;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview};
use kube::core::DynamicObject;
use kube::Client;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;

use super::certs::{CertError, Serving, TLS_CERT, TLS_KEY};
use crate::controller::Guarded;
use crate::crd::IdempotentConsumer;

/// How long a TLS handshake may take.
const HANDSHAKE: Duration = Duration::from_secs(10);
/// How long listing a namespace's resources may take: within the webhook
/// configuration's timeoutSeconds, so the answer is a clear refusal rather
/// than the API server's timeout.
const LIST: Duration = Duration::from_secs(3);

/// The serving certificate, replaced in place on renewal.
#[derive(Debug)]
pub struct Reloadable(RwLock<Arc<CertifiedKey>>);

impl Reloadable {
    pub fn new(serving: &Serving) -> Result<Self, CertError> {
        Ok(Self(RwLock::new(Arc::new(certified_key(serving)?))))
    }

    /// Serves `serving` from the next handshake on.
    pub fn reload(&self, serving: &Serving) -> Result<(), CertError> {
        let key = Arc::new(certified_key(serving)?);
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = key;
        Ok(())
    }

    /// The certificate served now (DER), first of its chain.
    pub fn current(&self) -> Vec<u8> {
        let key = self.0.read().unwrap_or_else(|e| e.into_inner()).clone();
        key.cert.first().map(|c| c.to_vec()).unwrap_or_default()
    }
}

impl ResolvesServerCert for Reloadable {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.read().unwrap_or_else(|e| e.into_inner()).clone())
    }
}

fn certified_key(material: &Serving) -> Result<CertifiedKey, CertError> {
    let read = |key, e: &dyn std::fmt::Display| CertError::Read {
        key,
        message: e.to_string(),
    };
    let chain = CertificateDer::pem_slice_iter(material.cert.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| read(TLS_CERT, &e))?;
    let key =
        PrivateKeyDer::from_pem_slice(material.key.as_bytes()).map_err(|e| read(TLS_KEY, &e))?;
    let signer =
        rustls::crypto::ring::sign::any_supported_type(&key).map_err(|e| read(TLS_KEY, &e))?;
    Ok(CertifiedKey::new(chain, signer))
}

/// The TLS configuration serving whatever `certificate` holds.
pub fn tls_config(certificate: Arc<Reloadable>) -> Arc<rustls::ServerConfig> {
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("ring supports the default protocol versions")
    .with_no_client_auth()
    .with_cert_resolver(certificate);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

/// What `/mutate` needs.
#[derive(Clone)]
pub struct Webhook {
    pub client: Client,
    pub sidecar_image: String,
}

/// Serves the webhook on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    webhook: Webhook,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let router = axum::Router::new()
        .route("/mutate", post(mutate))
        .with_state(webhook);
    let listener = TlsListener::spawn(listener, tls)?;
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
}

async fn mutate(
    State(webhook): State<Webhook>,
    Json(review): Json<AdmissionReview<Pod>>,
) -> Json<AdmissionReview<DynamicObject>> {
    let request: AdmissionRequest<Pod> = match review.try_into() {
        Ok(request) => request,
        Err(e) => return Json(AdmissionResponse::invalid(e).into_review()),
    };
    let ns = request.namespace.clone().unwrap_or_default();
    let api: Api<Guarded> = Api::namespaced(webhook.client.clone(), &ns);
    let listed = tokio::time::timeout(LIST, api.list(&ListParams::default())).await;
    let consumers: Vec<IdempotentConsumer> = match listed {
        Ok(Ok(list)) => list.items.into_iter().filter_map(|g| g.0.ok()).collect(),
        failed => {
            let why = match failed {
                Ok(Err(e)) => e.to_string(),
                _ => format!("no answer within {LIST:?}"),
            };
            tracing::warn!(namespace = %ns, error = %why, "cannot list IdempotentConsumers for an admission");
            let refused = AdmissionResponse::from(&request).deny(format!(
                "idemq cannot read the IdempotentConsumers of namespace {ns} ({why}); a pod labelled idemq.dev/inject=enabled is not created without its sidecar"
            ));
            return Json(refused.into_review());
        }
    };
    let response = super::admit(&request, &consumers, &webhook.sidecar_image);
    tracing::debug!(namespace = %ns, allowed = response.allowed, patched = response.patch.is_some(), "admission");
    Json(response.into_review())
}

/// Finished TLS handshakes, as an `axum::serve` listener.
struct TlsListener {
    streams: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
}

impl TlsListener {
    fn spawn(listener: TcpListener, tls: Arc<rustls::ServerConfig>) -> std::io::Result<Self> {
        let local = listener.local_addr()?;
        let (send, streams) = mpsc::channel(64);
        let acceptor = tokio_rustls::TlsAcceptor::from(tls);
        tokio::spawn(async move {
            loop {
                let (tcp, peer) = match listener.accept().await {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        tracing::warn!(error = %e, "webhook accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                if send.is_closed() {
                    return;
                }
                let (acceptor, handed) = (acceptor.clone(), send.clone());
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => {
                            let _ = handed.send((stream, peer)).await;
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(Self { streams, local })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.streams.recv().await {
            Some(accepted) => accepted,
            // The accepting task is gone: nothing will come again.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Ok(self.local)
    }
}
