//! The Pub/Sub client and the streaming pull's settings, shared with the
//! operator's bindings and the benchmark.

use std::time::Duration;

use gcloud_gax::conn::{ConnectionOptions, Environment};
use gcloud_pubsub::client::google_cloud_auth;
use gcloud_pubsub::client::{Client, ClientConfig};
use gcloud_pubsub::subscriber::SubscriberConfig;
use gcloud_pubsub::subscription::SubscribeConfig;

use super::{SourceError, BUFFERED};
use crate::config::PubSubConfig;

/// Pub/Sub's bounds on an ack deadline, in seconds.
const MIN_DEADLINE: i32 = 10;
const MAX_DEADLINE: i32 = 600;

/// A Pub/Sub client of `pubsub.project`: the emulator at `emulator_host`
/// without credentials, or Google Cloud with the key file or Application
/// Default Credentials (Workload Identity).
pub async fn connect(
    pubsub: &PubSubConfig,
    emulator_host: Option<&str>,
) -> Result<Client, SourceError> {
    let key = match (&pubsub.credentials_file, emulator_host) {
        (Some(path), None) => Some(
            google_cloud_auth::credentials::CredentialsFile::new_from_file(path.clone())
                .await
                .map_err(|source| SourceError::KeyFile {
                    path: path.clone(),
                    source,
                })?,
        ),
        _ => None,
    };
    client(&pubsub.project, emulator_host, key).await
}

/// A Pub/Sub client of `project`: the emulator at `emulator_host` without
/// credentials, or Google Cloud with the service-account `key` or, without
/// one, Application Default Credentials. The operator's client too.
pub async fn client(
    project: &str,
    emulator_host: Option<&str>,
    key: Option<google_cloud_auth::credentials::CredentialsFile>,
) -> Result<Client, SourceError> {
    let mut config = ClientConfig {
        project_id: Some(project.to_string()),
        connection_option: ConnectionOptions {
            connect_timeout: Some(Duration::from_secs(5)),
            ..ConnectionOptions::default()
        },
        ..ClientConfig::default()
    };
    match emulator_host {
        Some(host) => config.environment = Environment::Emulator(host.to_string()),
        None => {
            // TLS to Google Cloud: the process-wide provider (ring).
            let _ = rustls::crypto::ring::default_provider().install_default();
            config = match key {
                Some(key) => config.with_credentials(key).await,
                None => config.with_auth().await,
            }
            .map_err(SourceError::Credentials)?;
        }
    }
    Client::new(config).await.map_err(SourceError::Connect)
}

/// The streaming pull's settings: the flow control of `pubsub`, the ack
/// deadline the sidecar keeps, and few messages buffered in the client.
pub fn subscribe_config(pubsub: &PubSubConfig, deadline: i32) -> SubscribeConfig {
    SubscribeConfig::default()
        .with_channel_capacity(BUFFERED)
        .with_subscriber_config(SubscriberConfig {
            stream_ack_deadline_seconds: deadline,
            max_outstanding_messages: i64::from(pubsub.max_outstanding_messages),
            max_outstanding_bytes: i64::try_from(pubsub.max_outstanding_bytes).unwrap_or(i64::MAX),
            ..SubscriberConfig::default()
        })
}

/// The ack deadline the sidecar keeps: the subscription's, or the claim
/// lease when that is longer, within Pub/Sub's bounds.
pub fn ack_deadline(subscription_seconds: i32, lease: Duration) -> i32 {
    let lease = i32::try_from(lease.as_secs_f64().ceil() as u64).unwrap_or(MAX_DEADLINE);
    subscription_seconds
        .max(lease)
        .clamp(MIN_DEADLINE, MAX_DEADLINE)
}

/// Whole seconds of a deadline that gives a message back after `delay`.
pub(super) fn deadline_seconds(delay: Duration) -> i32 {
    i32::try_from(delay.as_secs_f64().ceil() as u64)
        .unwrap_or(MAX_DEADLINE)
        .min(MAX_DEADLINE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ack_deadline_covers_the_claim_lease_within_pubsub_bounds() {
        assert_eq!(ack_deadline(10, Duration::from_secs(30)), 30);
        assert_eq!(ack_deadline(60, Duration::from_secs(30)), 60);
        assert_eq!(ack_deadline(0, Duration::from_secs(2)), MIN_DEADLINE);
        assert_eq!(ack_deadline(10, Duration::from_millis(10_500)), 11);
        assert_eq!(ack_deadline(10, Duration::from_secs(3600)), MAX_DEADLINE);
        assert_eq!(deadline_seconds(Duration::from_millis(20)), 1);
        assert_eq!(deadline_seconds(Duration::ZERO), 0);
    }
}
