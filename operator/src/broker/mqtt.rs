//! MQTT bindings: nothing is declared on the broker, since the subscription
//! (which the sidecar makes in its own persistent session) is the binding.
//! The operator checks what it can before the pods depend on it: that the
//! broker answers and accepts the credentials, with a clean session that
//! leaves nothing behind.

use std::time::Duration;

use idemq_sidecar::config::MqttProtocol as SidecarProtocol;
use idemq_sidecar::source::mqtt::{probe, ConnectError, Endpoint};

use super::BindError;
use crate::crd::{IdempotentConsumer, MqttBinding, MqttProtocol};

const TIMEOUT: Duration = Duration::from_secs(10);

/// What an MQTT consumer relies on: the subscription the sidecar makes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub protocol: SidecarProtocol,
    /// The filters as subscribed: `$share/<group>/<filter>`.
    pub filters: Vec<String>,
    pub dead_letter_topic: String,
}

impl Plan {
    pub fn of(ic: &IdempotentConsumer, mqtt: &MqttBinding) -> Self {
        let group = crate::render::config::shared_group(ic, mqtt);
        Self {
            protocol: match mqtt.protocol {
                None | Some(MqttProtocol::V5) => SidecarProtocol::V5,
                Some(MqttProtocol::V311) => SidecarProtocol::V311,
            },
            filters: mqtt
                .topics
                .iter()
                .map(|t| format!("$share/{group}/{t}"))
                .collect(),
            dead_letter_topic: mqtt.dead_letter_topic.clone(),
        }
    }

    pub fn describe(&self) -> String {
        format!(
            "the broker answers and accepts the credentials; the sidecars subscribe to {} and dead-letter to {}",
            self.filters.join(", "),
            self.dead_letter_topic
        )
    }
}

/// The broker URL and credentials from the connection Secret. Secret: its
/// `Debug` shows no value.
#[derive(Clone, PartialEq, Eq)]
pub struct Connection {
    pub url: String,
    pub username: Option<String>,
    pub password: Option<String>,
    /// A PEM bundle of the CAs that verify the broker (`caKey`).
    pub ca_pem: Option<String>,
}

impl Connection {
    /// The bytes that tell two connections apart, credentials included.
    pub fn identity(&self) -> Vec<u8> {
        let mut id = self.url.as_bytes().to_vec();
        for part in [&self.username, &self.password, &self.ca_pem] {
            id.push(0);
            id.extend(part.as_deref().unwrap_or_default().as_bytes());
        }
        id
    }
}

/// Connects with a clean session and disconnects.
pub async fn bind(connection: &Connection, plan: &Plan) -> Result<(), BindError> {
    let mut endpoint = Endpoint::parse(&connection.url).map_err(BindError::Refused)?;
    if connection.username.is_some() {
        endpoint.user = connection.username.clone();
        endpoint.password = connection.password.clone();
    }
    let ca = connection.ca_pem.clone().map(String::into_bytes);
    match tokio::time::timeout(TIMEOUT, probe(endpoint, plan.protocol, ca)).await {
        Ok(Ok(())) => Ok(()),
        // The errors name the endpoint without its credentials.
        Ok(Err(e @ ConnectError::Unreachable { .. })) => Err(BindError::Unreachable(e.to_string())),
        Ok(Err(e @ ConnectError::Refused { .. })) => {
            Err(BindError::AuthenticationFailed(e.to_string()))
        }
        Ok(Err(e @ ConnectError::Rejected { .. })) => Err(BindError::Refused(e.to_string())),
        Err(_) => Err(BindError::Unreachable(format!(
            "no answer within {TIMEOUT:?}"
        ))),
    }
}
