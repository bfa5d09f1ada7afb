//! The frames ZeroMQ peers and the sidecar exchange (the README's "ZeroMQ
//! wire protocol" section is the reference for clients):
//!
//! - a request (`router`, `pull`): `[message-id, header, body]`; `sub`
//!   puts the topic first: `[topic, message-id, header, body]`. The header
//!   frame is empty or a JSON object of text (or number, or boolean) values.
//! - a reply (`router`): `[message-id, status]` or `[message-id, status,
//!   detail]`, after the request's route (the peer's routing id, and the
//!   empty delimiter a REQ socket adds).
//! - a dead letter: `[json, …the request's frames as received]`, the JSON
//!   holding the reason, the attempts and the pattern; sent to RabbitMQ or
//!   Kafka, one message ([`BrokerLetter`]).

use bytes::Bytes;

use crate::config::ZeroMqPattern;
use crate::source::Envelope;

/// A request's frames, apart from its route.
pub type Frames = Vec<Vec<u8>>;

/// A `router` request split from the route its reply takes back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Routed {
    /// The peer's routing id, then the empty delimiter of a REQ socket.
    pub route: Frames,
    pub frames: Frames,
}

/// Splits what a ROUTER socket received: the routing id it prepended, the
/// empty delimiter when the peer is a REQ socket (a request of four frames
/// whose first is empty), and the request.
pub fn split_route(mut received: Frames) -> Routed {
    if received.is_empty() {
        return Routed {
            route: Vec::new(),
            frames: received,
        };
    }
    let mut route = vec![received.remove(0)];
    if received.len() == 4 && received[0].is_empty() {
        route.push(received.remove(0));
    }
    Routed {
        route,
        frames: received,
    }
}

/// What the sidecar answers a `router` request with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Processed, or a duplicate of a processed message.
    Ok,
    /// Not settled; send it again later. The detail says why.
    Retry(&'static str),
    /// Dead-lettered, for the reason given.
    Dead(&'static str),
}

/// The reply frames: the route, the message id, the status and its detail.
pub fn reply(route: &[Vec<u8>], message_id: &[u8], status: Status) -> Frames {
    let mut frames = route.to_vec();
    frames.push(message_id.to_vec());
    match status {
        Status::Ok => frames.push(b"ok".to_vec()),
        Status::Retry(why) => frames.extend([b"retry".to_vec(), why.as_bytes().to_vec()]),
        Status::Dead(reason) => frames.extend([b"dead".to_vec(), reason.as_bytes().to_vec()]),
    }
    frames
}

/// The message-id frame of a request, empty when it has none.
pub fn message_id(pattern: ZeroMqPattern, frames: &[Vec<u8>]) -> &[u8] {
    let index = usize::from(pattern == ZeroMqPattern::Sub);
    frames.get(index).map(Vec::as_slice).unwrap_or_default()
}

/// A request as the engine sees it, and its topic (`sub`). The error says
/// how the frames break the protocol.
pub fn envelope(
    pattern: ZeroMqPattern,
    frames: &[Vec<u8>],
) -> Result<(Envelope, Option<String>), String> {
    let (topic, rest) = match pattern {
        ZeroMqPattern::Sub => match frames.split_first() {
            Some((topic, rest)) => (Some(String::from_utf8_lossy(topic).into_owned()), rest),
            None => return Err("no frames".into()),
        },
        ZeroMqPattern::Router | ZeroMqPattern::Pull => (None, frames),
    };
    let [id, header, body] = rest else {
        return Err(format!(
            "{} frames where [{}message-id, header, body] has {}",
            frames.len(),
            if topic.is_some() { "topic, " } else { "" },
            3 + usize::from(topic.is_some())
        ));
    };
    let headers = headers(header)?;
    let content_type = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-type"))
        .map(|(_, v)| v.clone());
    let message_id = (!id.is_empty()).then(|| match std::str::from_utf8(id) {
        Ok(text) => text.to_string(),
        Err(_) => hex::encode(id),
    });
    Ok((
        Envelope {
            message_id,
            headers,
            content_type,
            body: Bytes::copy_from_slice(body),
            ..Envelope::default()
        },
        topic,
    ))
}

/// The header frame: empty, or a JSON object of text, number or boolean values.
fn headers(frame: &[u8]) -> Result<Vec<(String, String)>, String> {
    if frame.is_empty() {
        return Ok(Vec::new());
    }
    let value: serde_json::Value =
        serde_json::from_slice(frame).map_err(|e| format!("header frame is not JSON: {e}"))?;
    let serde_json::Value::Object(map) = value else {
        return Err("header frame is not a JSON object".into());
    };
    map.into_iter()
        .map(|(k, v)| match v {
            serde_json::Value::String(s) => Ok((k, s)),
            serde_json::Value::Number(n) => Ok((k, n.to_string())),
            serde_json::Value::Bool(b) => Ok((k, b.to_string())),
            _ => Err(format!("header {k:?} is not text, a number or a boolean")),
        })
        .collect()
}

/// A dead letter: a JSON frame with the reason, then the request's frames.
pub fn dead_letter(
    pattern: ZeroMqPattern,
    frames: &[Vec<u8>],
    reason: &str,
    attempts: u32,
    problem: Option<&str>,
) -> Frames {
    let mut about = serde_json::json!({
        "reason": reason,
        "attempts": attempts,
        "pattern": pattern.as_str(),
    });
    if let Some(problem) = problem {
        about["problem"] = problem.into();
    }
    let mut letter = vec![about.to_string().into_bytes()];
    letter.extend(frames.iter().cloned());
    letter
}

/// A dead letter as one broker message (RabbitMQ, Kafka): the request's
/// body, its header frame's values as headers, its message id; or, for a
/// request that breaks the protocol, its frames in a JSON array (each
/// hex-encoded), with the problem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerLetter {
    /// The message-id frame (text, or hex when it is not UTF-8); the AMQP
    /// `message_id` and the Kafka record key.
    pub message_id: Option<String>,
    pub content_type: Option<String>,
    /// The header frame's values.
    pub headers: Vec<(String, String)>,
    /// Where the request came from (`x-idemq-original-*`), and the problem
    /// of a malformed one (`x-idemq-problem`).
    pub origin: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// The broker form of a dead letter of a request received on `endpoint`.
pub fn broker_letter(
    pattern: ZeroMqPattern,
    endpoint: &str,
    frames: &[Vec<u8>],
    problem: Option<&str>,
) -> BrokerLetter {
    let mut origin = vec![(
        "x-idemq-original-endpoint".to_string(),
        endpoint.to_string(),
    )];
    let parsed = match problem {
        None => envelope(pattern, frames).ok(),
        Some(_) => None,
    };
    let mut letter = match parsed {
        Some((envelope, topic)) => {
            if let Some(topic) = topic {
                origin.push(("x-idemq-original-topic".to_string(), topic));
            }
            BrokerLetter {
                message_id: envelope.message_id,
                content_type: envelope.content_type,
                headers: envelope.headers,
                origin: Vec::new(),
                body: envelope.body.to_vec(),
            }
        }
        None => {
            let id = message_id(pattern, frames);
            let hex: Vec<String> = frames.iter().map(hex::encode).collect();
            origin.push((
                "x-idemq-problem".to_string(),
                problem.unwrap_or("malformed").to_string(),
            ));
            BrokerLetter {
                message_id: (!id.is_empty()).then(|| match std::str::from_utf8(id) {
                    Ok(text) => text.to_string(),
                    Err(_) => hex::encode(id),
                }),
                content_type: Some("application/json".to_string()),
                headers: vec![("content-type".to_string(), "application/json".to_string())],
                origin: Vec::new(),
                body: serde_json::json!({ "frames": hex })
                    .to_string()
                    .into_bytes(),
            }
        }
    };
    if let Some(id) = &letter.message_id {
        origin.push(("x-idemq-original-message-id".to_string(), id.clone()));
    }
    letter.origin = origin;
    letter
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(parts: &[&[u8]]) -> Frames {
        parts.iter().map(|p| p.to_vec()).collect()
    }

    #[test]
    fn a_req_peer_keeps_its_delimiter_and_a_dealer_its_empty_header() {
        let req = split_route(frames(&[b"peer", b"", b"m-1", b"", b"{}"]));
        assert_eq!(req.route, frames(&[b"peer", b""]));
        assert_eq!(req.frames, frames(&[b"m-1", b"", b"{}"]));
        let dealer = split_route(frames(&[b"peer", b"m-1", b"", b"{}"]));
        assert_eq!(dealer.route, frames(&[b"peer"]));
        assert_eq!(dealer.frames.len(), 3);
        assert_eq!(
            reply(&req.route, b"m-1", Status::Dead("poison")),
            frames(&[b"peer", b"", b"m-1", b"dead", b"poison"])
        );
        assert_eq!(
            reply(&dealer.route, b"m-1", Status::Ok),
            frames(&[b"peer", b"m-1", b"ok"])
        );
    }

    #[test]
    fn requests_become_envelopes_and_bad_frames_say_why() {
        let (e, topic) = envelope(
            ZeroMqPattern::Router,
            &frames(&[
                b"m-1",
                br#"{"tenant":"acme","n":3,"content-type":"application/json"}"#,
                b"{}",
            ]),
        )
        .expect("valid");
        assert_eq!(e.message_id.as_deref(), Some("m-1"));
        assert_eq!(e.header("Tenant"), Some("acme"));
        assert_eq!(e.header("n"), Some("3"));
        assert_eq!(e.content_type.as_deref(), Some("application/json"));
        assert!(topic.is_none());
        let (e, topic) = envelope(
            ZeroMqPattern::Sub,
            &frames(&[b"orders", &[0xff, 0x01], b"", b"x"]),
        )
        .expect("valid");
        assert_eq!(e.message_id.as_deref(), Some("ff01"));
        assert_eq!(topic.as_deref(), Some("orders"));
        assert_eq!(
            message_id(ZeroMqPattern::Sub, &frames(&[b"t", b"id"])),
            b"id"
        );
        let (e, _) = envelope(ZeroMqPattern::Pull, &frames(&[b"", b"", b"x"])).expect("valid");
        assert!(e.message_id.is_none());
        for (bad, says) in [
            (frames(&[b"m-1", b"x"]), "2 frames"),
            (frames(&[b"m-1", b"not json", b"x"]), "not JSON"),
            (frames(&[b"m-1", b"[1]", b"x"]), "not a JSON object"),
            (frames(&[b"m-1", br#"{"a":{}}"#, b"x"]), "\"a\""),
        ] {
            let err = envelope(ZeroMqPattern::Pull, &bad).expect_err("malformed");
            assert!(err.contains(says), "{err}");
        }
    }

    #[test]
    fn dead_letters_keep_the_request_after_their_reason() {
        let letter = dead_letter(
            ZeroMqPattern::Router,
            &frames(&[b"m-1", b"", b"x"]),
            "poison",
            3,
            None,
        );
        let about: serde_json::Value = serde_json::from_slice(&letter[0]).expect("json");
        assert_eq!(about["reason"], "poison");
        assert_eq!(about["attempts"], 3);
        assert_eq!(about["pattern"], "router");
        assert_eq!(&letter[1..], &frames(&[b"m-1", b"", b"x"])[..]);
    }

    #[test]
    fn broker_dead_letters_carry_the_body_headers_and_id_or_the_raw_frames() {
        let letter = broker_letter(
            ZeroMqPattern::Sub,
            "tcp://10.0.0.7:5555",
            &frames(&[b"orders", b"m-1", br#"{"tenant":"acme"}"#, b"{\"n\":1}"]),
            None,
        );
        assert_eq!(letter.message_id.as_deref(), Some("m-1"));
        assert_eq!(letter.body, b"{\"n\":1}");
        let header = |l: &BrokerLetter, name: &str| {
            l.headers
                .iter()
                .chain(&l.origin)
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        };
        assert_eq!(header(&letter, "tenant").as_deref(), Some("acme"));
        assert_eq!(
            header(&letter, "x-idemq-original-topic").as_deref(),
            Some("orders")
        );
        assert_eq!(
            header(&letter, "x-idemq-original-message-id").as_deref(),
            Some("m-1")
        );
        assert_eq!(
            header(&letter, "x-idemq-original-endpoint").as_deref(),
            Some("tcp://10.0.0.7:5555")
        );
        let malformed = broker_letter(
            ZeroMqPattern::Pull,
            "tcp://127.0.0.1:5555",
            &frames(&[b"m-x", b"not json", b"{}"]),
            Some("header frame is not JSON"),
        );
        assert_eq!(malformed.message_id.as_deref(), Some("m-x"));
        let body: serde_json::Value = serde_json::from_slice(&malformed.body).expect("json");
        assert_eq!(body["frames"][0], hex::encode(b"m-x"));
        assert_eq!(body["frames"].as_array().map(Vec::len), Some(3));
        assert_eq!(
            header(&malformed, "x-idemq-problem").as_deref(),
            Some("header frame is not JSON")
        );
    }
}
