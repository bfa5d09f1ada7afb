//! ZeroMQ ingress: the sidecar binds an endpoint and peers send it messages
//! directly; ZeroMQ has no broker, so reliability is the peers' own
//! protocol and this source is where it becomes exactly-once processing.
//!
//! - `router`: a peer (REQ or DEALER) sends `[message-id, header, body]`
//!   and gets `[message-id, status]` back only once the outcome is settled:
//!   `ok` (processed, or a duplicate of a processed message), `retry` with
//!   why (in flight elsewhere, key store or application unavailable: send it
//!   again later), `dead` with the reason (dead-lettered). A client that
//!   resends until it gets an answer (the "Lazy Pirate" pattern) loses
//!   nothing, and its resends never reach the application twice.
//! - `pull` and `sub`: deduplicated delivery without replies. What waits in
//!   libzmq's queues, and what is in flight, is lost when the sidecar dies;
//!   so a message that cannot be decided yet (store or application
//!   unavailable, its key in flight elsewhere) waits here and is tried
//!   again rather than dropped.
//!
//! Dead letters go where `deadLetter` says ([`dead`]): over PUSH to a second
//! ZeroMQ endpoint ([`wire::dead_letter`]; the socket queues only to a
//! connected peer, `ZMQ_IMMEDIATE`), or to a RabbitMQ exchange or queue, or a
//! Kafka topic ([`wire::broker_letter`]). A dead letter counts as sent once
//! libzmq took it for a live connection, RabbitMQ confirmed it, or the Kafka
//! brokers acknowledged it; only then is a `router` peer answered `dead`.
//! While the target does not have it, a `router` request is answered `retry`
//! and a `pull`/`sub` message waits and is tried again: none is dropped.
//!
//! CURVE (on unless `plain: true`): the socket is a CURVE server with the
//! secret key from `IDEMQ_ZMQ_SERVER_SECRET_KEY`, and a ZAP handler admits
//! only the public keys in `IDEMQ_ZMQ_CLIENT_KEYS` ([`socket`]).

pub mod dead;
pub mod socket;
pub mod wire;

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::{Common, InFlightWait, Verdict};
use crate::config::{ZeroMqConfig, ZeroMqPattern};
use crate::flow::Permit;
use crate::traces::Origin;
use socket::{Handle, Received, SocketError};
use wire::{Frames, Status};

/// The dead-letter reason of a request that breaks the wire protocol.
pub const MALFORMED: &str = "malformed";
/// What `bind` writes for the pod's address, resolved from `POD_IP`.
pub const POD_IP: &str = "$(POD_IP)";
/// How often a `pull`/`sub` dead letter is tried while its target does not take it.
const DEAD_LETTER_RETRY: Duration = Duration::from_millis(500);

/// The CURVE keys of the endpoint, from the environment (raw 32-byte keys).
#[derive(Clone)]
pub struct CurveKeys {
    pub secret_key: Vec<u8>,
    pub client_keys: Vec<Vec<u8>>,
}

impl std::fmt::Debug for CurveKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CurveKeys")
            .field("secret_key", &"***")
            .field("client_keys", &self.client_keys.len())
            .finish()
    }
}

/// Decodes one Z85 key (40 characters) into its 32 bytes.
pub fn decode_key(text: &str) -> Option<Vec<u8>> {
    let text = text.trim();
    if text.len() != 40 {
        return None;
    }
    zmq::z85_decode(text).ok().filter(|key| key.len() == 32)
}

/// Why `bind` cannot be used, if it cannot: it must be `tcp://<ip>:<port>`
/// with the loopback address or a specific one (the pod's), never a wildcard.
pub fn bind_problem(bind: &str) -> Option<&'static str> {
    const SHAPE: &str = "must be tcp://<address>:<port>, the address a loopback or specific one (an IP literal, or $(POD_IP) for the pod's)";
    let Some((host, port)) = bind.strip_prefix("tcp://").and_then(|r| r.rsplit_once(':')) else {
        return Some(SHAPE);
    };
    if !port.parse::<u16>().is_ok_and(|p| p > 0) {
        return Some("must end with a port between 1 and 65535");
    }
    if host == POD_IP {
        return None;
    }
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    match host.parse::<std::net::IpAddr>() {
        Ok(ip) if ip.is_unspecified() => Some(
            "must not bind every interface: bind the loopback address or the pod's ($(POD_IP))",
        ),
        Ok(_) => None,
        Err(_) => Some(SHAPE),
    }
}

/// `bind` with `$(POD_IP)` replaced by the pod's address.
pub fn resolve_bind(bind: &str, pod_ip: Option<&str>) -> Result<String, SourceError> {
    if !bind.contains(POD_IP) {
        return Ok(bind.to_string());
    }
    let ip = pod_ip
        .filter(|ip| !ip.is_empty())
        .ok_or(SourceError::NoPodIp)?;
    let ip = match ip.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V6(v6)) => format!("[{v6}]"),
        _ => ip.to_string(),
    };
    Ok(bind.replace(POD_IP, &ip))
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("broker.zeromq.bind names {POD_IP} but the POD_IP variable is not set (the operator sets it from the pod's status.podIP)")]
    NoPodIp,
    #[error("CURVE is required (broker.zeromq.plain is not set) but {0}")]
    Curve(&'static str),
    #[error("ZeroMQ endpoint: {0}")]
    Socket(#[from] SocketError),
    #[error("dead-letter endpoint {endpoint}: {source}")]
    DeadLetter {
        endpoint: String,
        source: zmq::Error,
    },
    #[error("{0}")]
    DeadLetterSecrets(&'static str),
    #[error("dead letters: {0}")]
    DeadLetterBroker(String),
    #[error(
        "broker.zeromq.deadLetter: must {} (validated)",
        crate::config::ZeroMqDeadLetter::ONE_TARGET
    )]
    NoDeadLetterTarget,
}

/// Everything a ZeroMQ source needs.
pub struct Source {
    pub common: Common,
    /// The `broker.zeromq` section of `config`.
    pub zeromq: ZeroMqConfig,
    /// CURVE keys; `None` only with `plain: true` (checked in `run`).
    pub curve: Option<CurveKeys>,
    /// The secrets of a RabbitMQ or Kafka dead-letter target.
    pub dead_letter_secrets: dead::Secrets,
}

/// What the message tasks share.
struct Shared {
    pattern: ZeroMqPattern,
    /// The bound endpoint: the span's destination.
    endpoint: String,
    handle: Handle,
    dead: dead::DeadLetters,
    common: Common,
}

impl Source {
    /// Serves the endpoint until `shutdown` fires, then lets what is in
    /// flight settle (at most `shutdownGrace`).
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), SourceError> {
        let curve = match (&self.curve, self.zeromq.plain) {
            (_, true) => None,
            (None, false) => {
                return Err(SourceError::Curve(
                    "IDEMQ_ZMQ_SERVER_SECRET_KEY and IDEMQ_ZMQ_CLIENT_KEYS are not set",
                ))
            }
            (Some(keys), false) => Some(keys.clone()),
        };
        if curve.is_some() && zmq::has("curve") != Some(true) {
            return Err(SourceError::Curve(
                "this libzmq was built without it (zmq_has(\"curve\") is false; Debian's libzmq5 has it)",
            ));
        }
        let endpoint = resolve_bind(&self.zeromq.bind, std::env::var("POD_IP").ok().as_deref())?;
        let ctx = zmq::Context::new();
        let target = self
            .zeromq
            .dead_letter
            .target()
            .ok_or(SourceError::NoDeadLetterTarget)?;
        let dead = dead::DeadLetters::open(
            &ctx,
            target,
            self.dead_letter_secrets,
            &self.common.config.consumer,
        )
        .await?;
        let (handle, mut incoming) = socket::open(
            &ctx,
            socket::Options {
                pattern: self.zeromq.pattern,
                endpoint: endpoint.clone(),
                subscribe: self.zeromq.subscribe.clone(),
                max_in_flight: self.zeromq.max_in_flight as usize,
                curve: curve.clone(),
            },
        )?;
        tracing::info!(
            %endpoint,
            pattern = self.zeromq.pattern.as_str(),
            curve = curve.is_some(),
            max_in_flight = self.zeromq.max_in_flight,
            dead_letters = %dead.describe(),
            "ZeroMQ endpoint bound"
        );
        self.common.health.set(true);
        self.common.metrics.broker_connected.set(1);
        let shared = Arc::new(Shared {
            pattern: self.zeromq.pattern,
            endpoint,
            handle,
            dead,
            common: self.common.clone(),
        });

        let mut tasks = JoinSet::new();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
                received = incoming.recv() => {
                    let Some(received) = received else {
                        tracing::error!("the ZeroMQ socket thread ended");
                        break;
                    };
                    // A router peer is told at once to come back later,
                    // rather than waiting for an application that is away.
                    if shared.pattern == ZeroMqPattern::Router && !self.common.flow.app_state().takes_messages() {
                        let id = wire::message_id(shared.pattern, &received.frames).to_vec();
                        shared.handle.reply(wire::reply(&received.route, &id, Status::Retry("app_unavailable")));
                        continue;
                    }
                    let size = received.frames.iter().map(Vec::len).sum();
                    let Some(permit) = self.common.flow.admit(size, &shutdown).await else { break };
                    tasks.spawn(Box::pin(serve(shared.clone(), received, permit, shutdown.clone())));
                }
            }
        }
        self.common.health.set(false);
        self.common.metrics.broker_connected.set(0);
        let grace = self.common.config.shutdown_grace;
        let drained =
            tokio::time::timeout(grace, async { while tasks.join_next().await.is_some() {} }).await;
        if drained.is_err() {
            tracing::warn!(grace = ?grace, left = tasks.len(), pattern = shared.pattern.as_str(), "in-flight deliveries did not finish in time: router peers send theirs again, pull and sub messages are lost");
            tasks.abort_all();
        }
        shared.dead.close().await;
        let stopping = shared.clone();
        let _ = tokio::task::spawn_blocking(move || stopping.handle.stop()).await;
        Ok(())
    }
}

/// Handles one request: decides it, dead-letters it if need be, and
/// replies (`router`) or frees its slot.
async fn serve(
    shared: Arc<Shared>,
    received: Received,
    permit: Permit,
    shutdown: CancellationToken,
) {
    let _in_flight = shared.common.metrics.received();
    let status = decide(&shared, &received.frames, &shutdown).await;
    match (shared.pattern, status) {
        (ZeroMqPattern::Router, Some(status)) => {
            let id = wire::message_id(shared.pattern, &received.frames);
            shared
                .handle
                .reply(wire::reply(&received.route, id, status));
        }
        _ => shared.handle.settled(),
    }
    drop(permit);
}

/// The outcome of one request; `None` when a `pull`/`sub` message could not
/// be settled before shutdown (it is lost, and logged).
async fn decide(shared: &Shared, frames: &Frames, shutdown: &CancellationToken) -> Option<Status> {
    let (envelope, topic) = match wire::envelope(shared.pattern, frames) {
        Ok(parsed) => parsed,
        Err(problem) => {
            tracing::warn!(%problem, "a request breaks the ZeroMQ wire protocol: dead-lettering it");
            let letter = dead::Letter {
                pattern: shared.pattern,
                endpoint: &shared.endpoint,
                frames,
                reason: MALFORMED,
                attempts: 0,
                problem: Some(problem.as_str()),
            };
            return dead_letter(shared, &letter, shutdown).await;
        }
    };
    let span = shared.common.engine.trace(
        &envelope,
        Origin {
            system: "zeromq",
            destination: topic.as_deref().unwrap_or(&shared.endpoint),
        },
    );
    let router = shared.pattern == ZeroMqPattern::Router;
    let mut wait = InFlightWait::default();
    loop {
        let verdict = shared
            .common
            .engine
            .handle(&envelope, &span, shutdown)
            .await;
        let _step = span.settlement(&verdict);
        match verdict {
            Verdict::Ack => {
                shared.common.metrics.message("delivered");
                return Some(Status::Ok);
            }
            Verdict::Duplicate => {
                shared.common.metrics.message("duplicate");
                return Some(Status::Ok);
            }
            Verdict::DeadLetter { reason, attempts } => {
                let letter = dead::Letter {
                    pattern: shared.pattern,
                    endpoint: &shared.endpoint,
                    frames,
                    reason: reason.as_str(),
                    attempts,
                    problem: None,
                };
                return dead_letter(shared, &letter, shutdown).await;
            }
            Verdict::Requeue { .. } if shutdown.is_cancelled() => {
                return retry_or_lost(router, "shutting_down", frames, shared.pattern);
            }
            Verdict::Requeue { delay } => {
                shared.common.metrics.message("in_flight_requeued");
                if router {
                    return Some(Status::Retry("in_flight"));
                }
                if !wait.sleep(delay, shutdown).await {
                    return retry_or_lost(router, "shutting_down", frames, shared.pattern);
                }
            }
            Verdict::StoreUnavailable => {
                if router {
                    return Some(Status::Retry("store_unavailable"));
                }
                if !super::sessions::wait_for_store(shared.common.store.as_ref(), shutdown).await {
                    return retry_or_lost(router, "shutting_down", frames, shared.pattern);
                }
            }
            Verdict::AppUnavailable => {
                if router {
                    return Some(Status::Retry("app_unavailable"));
                }
                if !shared.common.flow.until_available(shutdown).await {
                    return retry_or_lost(router, "shutting_down", frames, shared.pattern);
                }
            }
        }
    }
}

/// `retry` for a router peer, which sends it again; for `pull`/`sub` the
/// message is lost, and said so.
fn retry_or_lost(
    router: bool,
    why: &'static str,
    frames: &Frames,
    pattern: ZeroMqPattern,
) -> Option<Status> {
    if router {
        return Some(Status::Retry(why));
    }
    let id = String::from_utf8_lossy(wire::message_id(pattern, frames)).into_owned();
    tracing::error!(message_id = %id, pattern = pattern.as_str(), "shutting down before this message was settled: it is lost (ZeroMQ pull and sub have no redelivery)");
    None
}

/// Sends a dead letter. A router peer is answered `dead` once the target
/// has it, or `retry` when it does not take it now; a `pull`/`sub` message
/// waits until it does.
async fn dead_letter(
    shared: &Shared,
    letter: &dead::Letter<'_>,
    shutdown: &CancellationToken,
) -> Option<Status> {
    let reason = letter.reason;
    let mut logged = false;
    loop {
        match shared.dead.send(letter).await {
            Ok(()) => {
                tracing::info!(reason, attempts = letter.attempts, "dead-lettered");
                shared.common.metrics.dead_letter(reason);
                return Some(Status::Dead(reason));
            }
            Err(why) if shared.pattern == ZeroMqPattern::Router => {
                tracing::warn!(error = %why, "dead letter not taken: the peer is told to retry");
                return Some(Status::Retry("dead_letter_unavailable"));
            }
            Err(why) => {
                if !logged {
                    tracing::warn!(error = %why, "dead letter not taken: the message waits and is tried again");
                    logged = true;
                }
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return retry_or_lost(false, "shutting_down", letter.frames, shared.pattern),
            _ = tokio::time::sleep(DEAD_LETTER_RETRY) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binds_are_loopback_or_specific_addresses_never_wildcards() {
        for ok in [
            "tcp://127.0.0.1:5555",
            "tcp://[::1]:5555",
            "tcp://10.1.2.3:5555",
            "tcp://$(POD_IP):5555",
        ] {
            assert_eq!(bind_problem(ok), None, "{ok}");
        }
        for bad in [
            "tcp://0.0.0.0:5555",
            "tcp://*:5555",
            "tcp://[::]:5555",
            "tcp://127.0.0.1",
            "tcp://127.0.0.1:0",
            "ipc:///tmp/x",
            "tcp://localhost:5555",
        ] {
            assert!(bind_problem(bad).is_some(), "{bad}");
        }
        assert_eq!(
            resolve_bind("tcp://$(POD_IP):5555", Some("10.0.0.7")).expect("resolves"),
            "tcp://10.0.0.7:5555"
        );
        assert_eq!(
            resolve_bind("tcp://$(POD_IP):5555", Some("fd00::7")).expect("resolves"),
            "tcp://[fd00::7]:5555"
        );
        assert!(matches!(
            resolve_bind("tcp://$(POD_IP):5555", None),
            Err(SourceError::NoPodIp)
        ));
    }

    #[test]
    fn keys_are_40_z85_characters() {
        let pair = zmq::CurveKeyPair::new().expect("libzmq with CURVE");
        let text = zmq::z85_encode(&pair.public_key).expect("encode");
        assert_eq!(decode_key(&text), Some(pair.public_key.to_vec()));
        assert_eq!(decode_key(&text[..39]), None);
        assert_eq!(decode_key("not a key"), None);
    }
}
