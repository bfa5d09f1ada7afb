//! ZeroMQ bindings: ZeroMQ has no broker, so nothing is declared anywhere
//! but in Kubernetes. The binding is the endpoint: a Service named after the
//! resource in front of the sidecars' port, and a NetworkPolicy when asked
//! (both rendered by [`crate::render::zeromq`], applied by the controller).
//! What can be checked before the pods depend on it is the CURVE Secret:
//! that it holds a server secret key and at least one client public key,
//! each a Z85-encoded CURVE key, since a sidecar given anything else would
//! only fail at start.

use idemq_sidecar::source::zeromq::decode_key;

use super::SecretProblem;
use crate::crd::{IdempotentConsumer, ZeroMqBinding, ZeroMqPattern};
use crate::labels;

/// What clients of a ZeroMQ consumer rely on: the Service and its port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub service: String,
    pub port: u16,
    pub pattern: ZeroMqPattern,
    /// Whether a NetworkPolicy admits only labelled clients.
    pub network_policy: bool,
    pub curve: bool,
}

impl Plan {
    pub fn of(ic: &IdempotentConsumer, zmq: &ZeroMqBinding) -> Self {
        Self {
            service: labels::zeromq_service(ic),
            port: zmq.port(),
            pattern: zmq.pattern.unwrap_or(ZeroMqPattern::Router),
            network_policy: zmq.network_policy.is_some(),
            curve: zmq.curve.is_some(),
        }
    }

    pub fn describe(&self) -> String {
        let socket = match self.pattern {
            ZeroMqPattern::Router => "ROUTER",
            ZeroMqPattern::Pull => "PULL",
            ZeroMqPattern::Sub => "SUB",
        };
        format!(
            "Service {} exposes the sidecars' {socket} socket on port {} ({}){}",
            self.service,
            self.port,
            if self.curve {
                "CURVE"
            } else {
                "plain TCP, no authentication"
            },
            if self.network_policy {
                format!(
                    "; NetworkPolicy {} admits only the selected clients to it",
                    self.service
                )
            } else {
                String::new()
            }
        )
    }
}

/// The CURVE keys from the Secret, or none with `plain: true`. Secret: its
/// `Debug` shows no value.
#[derive(Clone, PartialEq, Eq)]
pub enum Connection {
    Plain,
    Curve {
        server_secret_key: String,
        client_public_keys: String,
    },
}

impl Connection {
    /// The keys from the Secret's values (`value(key)` is `None` when the
    /// Secret lacks `key`).
    pub fn from_secret(
        zmq: &ZeroMqBinding,
        value: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, SecretProblem> {
        let Some(curve) = &zmq.curve else {
            return Ok(Connection::Plain);
        };
        let read = |key: &str| value(key).ok_or_else(|| SecretProblem::Missing(key.to_string()));
        let server_secret_key = read(&curve.server_secret_key)?;
        let client_public_keys = read(&curve.client_public_keys)?;
        if decode_key(&server_secret_key).is_none() {
            return Err(SecretProblem::Invalid {
                key: curve.server_secret_key.clone(),
                problem: "is not a Z85-encoded CURVE key (40 characters)",
            });
        }
        let clients: Vec<&str> = client_public_keys
            .split(|c: char| c.is_whitespace() || c == ',')
            .filter(|k| !k.is_empty())
            .collect();
        if clients.is_empty() || clients.iter().any(|k| decode_key(k).is_none()) {
            return Err(SecretProblem::Invalid {
                key: curve.client_public_keys.clone(),
                problem: "must hold one or more Z85-encoded CURVE public keys (40 characters each), one per line",
            });
        }
        Ok(Connection::Curve {
            server_secret_key,
            client_public_keys,
        })
    }

    /// The bytes that tell two connections apart, keys included.
    pub fn identity(&self) -> Vec<u8> {
        match self {
            Connection::Plain => b"plain".to_vec(),
            Connection::Curve {
                server_secret_key,
                client_public_keys,
            } => [server_secret_key.as_bytes(), client_public_keys.as_bytes()].join(&0u8),
        }
    }
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Connection::Plain => f.write_str("Connection::Plain"),
            Connection::Curve { .. } => f.write_str("Connection::Curve(..)"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::render::sample;

    /// A CURVE key pair's public and secret halves, Z85.
    fn keypair() -> (String, String) {
        let pair = zmq::CurveKeyPair::new().expect("CURVE");
        (
            zmq::z85_encode(&pair.public_key).expect("z85"),
            zmq::z85_encode(&pair.secret_key).expect("z85"),
        )
    }

    fn zmq_binding() -> ZeroMqBinding {
        sample::zeromq_policy()
            .spec
            .broker
            .zeromq
            .expect("a ZeroMQ sample")
    }

    #[test]
    fn the_curve_secret_needs_a_secret_key_and_client_keys_and_names_what_is_wrong() {
        let zmq = zmq_binding();
        let (client, _) = keypair();
        let (_, server) = keypair();
        let none = |_: &str| None;
        assert_eq!(
            Connection::from_secret(&zmq, none),
            Err(SecretProblem::Missing("serverSecretKey".into()))
        );
        let garbled = |key: &str| match key {
            "serverSecretKey" => Some("not-a-key".to_string()),
            _ => Some(client.clone()),
        };
        let Err(SecretProblem::Invalid { key, .. }) = Connection::from_secret(&zmq, garbled) else {
            panic!("a garbled secret key is refused");
        };
        assert_eq!(key, "serverSecretKey");
        let no_clients = |key: &str| match key {
            "serverSecretKey" => Some(server.clone()),
            _ => Some("\n".to_string()),
        };
        assert!(matches!(
            Connection::from_secret(&zmq, no_clients),
            Err(SecretProblem::Invalid { key, .. }) if key == "clientPublicKeys"
        ));
        let (other, _) = keypair();
        let two = format!("{client}\n{other}\n");
        let good = |key: &str| match key {
            "serverSecretKey" => Some(server.clone()),
            _ => Some(two.clone()),
        };
        let connection = Connection::from_secret(&zmq, good).expect("valid keys");
        assert!(
            !format!("{connection:?}").contains(&server[..10]),
            "Debug shows no key"
        );
        let mut plain = zmq.clone();
        plain.curve = None;
        plain.plain = Some(true);
        assert_eq!(Connection::from_secret(&plain, none), Ok(Connection::Plain));
    }

    #[test]
    fn the_plan_names_the_service_and_port_clients_connect_to() {
        let ic = sample::zeromq_policy();
        let plan = Plan::of(&ic, ic.spec.broker.zeromq.as_ref().expect("zeromq"));
        assert_eq!((plan.service.as_str(), plan.port), ("orders", 5555));
        assert_eq!(
            plan.describe(),
            "Service orders exposes the sidecars' ROUTER socket on port 5555 (CURVE); NetworkPolicy orders admits only the selected clients to it"
        );
    }
}
