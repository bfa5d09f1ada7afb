//! Idempotency-key extraction: where a message's key comes from, and what
//! happens to a message that has none.

use sha2::{Digest, Sha256};

use crate::config::{KeySource, MissingKeyPolicy};
use crate::source::Envelope;

/// What the key extraction decided for one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyDecision {
    Key(String),
    /// No key and the policy says deliver without deduplication.
    PassThrough,
    /// No key and the policy says dead-letter it (reason `missing_key`).
    DeadLetter,
}

/// Extracts the key of `message` as `source` says, falling back on `missing`.
pub fn extract(source: &KeySource, missing: MissingKeyPolicy, message: &Envelope) -> KeyDecision {
    let found = match source {
        KeySource::MessageId => message.message_id.clone(),
        KeySource::Header { name } | KeySource::Attribute { name } => {
            message.header(name).map(str::to_string)
        }
        KeySource::JsonPointer { pointer } => from_json(&message.body, pointer),
        KeySource::BodyHash => Some(body_hash(&message.body)),
        KeySource::CloudEvent => cloud_event(message),
        KeySource::RecordKey => message.record_key.clone(),
        KeySource::Coordinates => message.coordinates.clone(),
    };
    match found.filter(|k| !k.is_empty()) {
        Some(key) => KeyDecision::Key(key),
        None => match missing {
            MissingKeyPolicy::DeadLetter => KeyDecision::DeadLetter,
            MissingKeyPolicy::HashBody => KeyDecision::Key(body_hash(&message.body)),
            MissingKeyPolicy::PassThrough => KeyDecision::PassThrough,
        },
    }
}

/// A string or number at `pointer` in a JSON body; anything else is no key.
fn from_json(body: &[u8], pointer: &str) -> Option<String> {
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    match value.pointer(pointer)? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// Header prefixes of CloudEvents binary mode, by protocol binding: HTTP,
/// Pub/Sub and NATS (`ce-`), Kafka (`ce_`), AMQP (`cloudEvents_`, and
/// `cloudEvents:` of the binding's earlier drafts).
const CLOUD_EVENT_PREFIXES: [&str; 4] = ["ce-", "ce_", "cloudEvents_", "cloudEvents:"];

/// The key of a CloudEvent: its `source` and `id`, which the specification
/// says identify an event uniquely. Structured mode (an
/// `application/cloudevents+json` body) first, then binary mode (attributes
/// in headers). Encoded as a JSON pair, so that no two (source, id) pairs
/// share a key.
fn cloud_event(message: &Envelope) -> Option<String> {
    let (source, id) = structured_cloud_event(message).or_else(|| {
        CLOUD_EVENT_PREFIXES.iter().find_map(|prefix| {
            let source = message.header(&format!("{prefix}source"))?;
            let id = message.header(&format!("{prefix}id"))?;
            Some((source.to_string(), id.to_string()))
        })
    })?;
    (!source.is_empty() && !id.is_empty()).then(|| serde_json::json!([source, id]).to_string())
}

fn structured_cloud_event(message: &Envelope) -> Option<(String, String)> {
    let media_type = message.content_type.as_deref()?.split(';').next()?.trim();
    if !media_type.eq_ignore_ascii_case("application/cloudevents+json") {
        return None;
    }
    let event: serde_json::Value = serde_json::from_slice(&message.body).ok()?;
    let text = |name: &str| event.get(name)?.as_str().map(str::to_string);
    Some((text("source")?, text("id")?))
}

/// Hex SHA-256 of a body: the key of `bodyHash`, and the payload fingerprint.
pub fn body_hash(body: &[u8]) -> String {
    // Into a buffer: `hex::encode` builds the text a char at a time, which
    // cost about as much as the hash itself.
    let mut text = [0u8; 64];
    hex::encode_to_slice(Sha256::digest(body), &mut text).expect("64 bytes hold a SHA-256 in hex");
    String::from_utf8(text.to_vec()).expect("hex is ASCII")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(id: Option<&str>, headers: &[(&str, &str)], body: &str) -> Envelope {
        Envelope {
            message_id: id.map(str::to_string),
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            body: body.as_bytes().to_vec().into(),
            ..Envelope::default()
        }
    }

    fn cloud_event_key(m: &Envelope) -> KeyDecision {
        extract(&KeySource::CloudEvent, MissingKeyPolicy::DeadLetter, m)
    }

    #[test]
    fn a_cloud_event_in_binary_mode_is_keyed_by_source_and_id_in_every_binding() {
        let expected = KeyDecision::Key(r#"["/orders","e-1"]"#.into());
        for prefix in ["ce-", "ce_", "cloudEvents_", "cloudEvents:", "CE-"] {
            let m = message(
                Some("broker-id"),
                &[
                    (&format!("{prefix}source"), "/orders"),
                    (&format!("{prefix}id"), "e-1"),
                    (&format!("{prefix}type"), "order.created"),
                ],
                "{}",
            );
            assert_eq!(cloud_event_key(&m), expected, "prefix {prefix}");
        }
    }

    #[test]
    fn a_cloud_event_in_structured_mode_is_keyed_by_source_and_id() {
        let mut m = message(
            None,
            &[],
            r#"{"specversion":"1.0","id":"e-1","source":"/orders","type":"t","data":{}}"#,
        );
        m.content_type = Some("application/cloudevents+json; charset=utf-8".into());
        assert_eq!(
            cloud_event_key(&m),
            KeyDecision::Key(r#"["/orders","e-1"]"#.into())
        );
        // The same body under another media type is not a CloudEvent.
        m.content_type = Some("application/json".into());
        assert_eq!(cloud_event_key(&m), KeyDecision::DeadLetter);
    }

    #[test]
    fn the_same_id_from_two_sources_is_two_events() {
        let a = message(None, &[("ce-source", "/a"), ("ce-id", "1")], "{}");
        let b = message(None, &[("ce-source", "/b"), ("ce-id", "1")], "{}");
        assert_ne!(cloud_event_key(&a), cloud_event_key(&b));
        // Neither separator tricks nor concatenation make two pairs collide.
        let c = message(None, &[("ce-source", "/a1"), ("ce-id", "")], "{}");
        let d = message(None, &[("ce-source", "/a"), ("ce-id", "1")], "{}");
        assert_ne!(cloud_event_key(&c), cloud_event_key(&d));
    }

    #[test]
    fn a_message_that_is_no_cloud_event_follows_the_missing_key_policy() {
        let m = message(Some("m-1"), &[("ce-id", "e-1")], "{}");
        assert_eq!(cloud_event_key(&m), KeyDecision::DeadLetter);
        let hashed = extract(&KeySource::CloudEvent, MissingKeyPolicy::HashBody, &m);
        assert_eq!(hashed, KeyDecision::Key(body_hash(b"{}")));
    }

    #[test]
    fn message_id_is_the_default_key() {
        let m = message(Some("m-1"), &[], "{}");
        let d = extract(&KeySource::MessageId, MissingKeyPolicy::DeadLetter, &m);
        assert_eq!(d, KeyDecision::Key("m-1".into()));
    }

    #[test]
    fn header_key_is_found_case_insensitively() {
        let m = message(None, &[("X-Order-Id", "o-7")], "{}");
        let source = KeySource::Header {
            name: "x-order-id".into(),
        };
        assert_eq!(
            extract(&source, MissingKeyPolicy::DeadLetter, &m),
            KeyDecision::Key("o-7".into())
        );
    }

    #[test]
    fn json_pointer_takes_strings_and_numbers() {
        let source = KeySource::JsonPointer {
            pointer: "/order/id".into(),
        };
        let m = message(None, &[], r#"{"order":{"id":"o-9"}}"#);
        assert_eq!(
            extract(&source, MissingKeyPolicy::DeadLetter, &m),
            KeyDecision::Key("o-9".into())
        );
        let m = message(None, &[], r#"{"order":{"id":42}}"#);
        assert_eq!(
            extract(&source, MissingKeyPolicy::DeadLetter, &m),
            KeyDecision::Key("42".into())
        );
        let m = message(None, &[], r#"{"order":{"id":{"nested":1}}}"#);
        assert_eq!(
            extract(&source, MissingKeyPolicy::DeadLetter, &m),
            KeyDecision::DeadLetter
        );
        let m = message(None, &[], "not json");
        assert_eq!(
            extract(&source, MissingKeyPolicy::DeadLetter, &m),
            KeyDecision::DeadLetter
        );
    }

    #[test]
    fn missing_key_follows_the_policy() {
        let m = message(None, &[], "same body");
        assert_eq!(
            extract(&KeySource::MessageId, MissingKeyPolicy::DeadLetter, &m),
            KeyDecision::DeadLetter
        );
        assert_eq!(
            extract(&KeySource::MessageId, MissingKeyPolicy::PassThrough, &m),
            KeyDecision::PassThrough
        );
        let hashed = extract(&KeySource::MessageId, MissingKeyPolicy::HashBody, &m);
        assert_eq!(hashed, KeyDecision::Key(body_hash(b"same body")));
        let empty_id = message(Some(""), &[], "same body");
        assert_eq!(
            extract(&KeySource::MessageId, MissingKeyPolicy::HashBody, &empty_id),
            hashed
        );
    }

    #[test]
    fn kafka_keys_come_from_the_record() {
        let m = Envelope {
            record_key: Some("customer-7".into()),
            coordinates: Some("orders/3/1042".into()),
            ..message(None, &[], "{}")
        };
        assert_eq!(
            extract(&KeySource::RecordKey, MissingKeyPolicy::DeadLetter, &m),
            KeyDecision::Key("customer-7".into())
        );
        assert_eq!(
            extract(&KeySource::Coordinates, MissingKeyPolicy::DeadLetter, &m),
            KeyDecision::Key("orders/3/1042".into())
        );
        let keyless = message(None, &[], "{}");
        assert_eq!(
            extract(
                &KeySource::RecordKey,
                MissingKeyPolicy::DeadLetter,
                &keyless
            ),
            KeyDecision::DeadLetter
        );
    }

    #[test]
    fn body_hash_keys_identical_bodies_alike() {
        let a = extract(
            &KeySource::BodyHash,
            MissingKeyPolicy::DeadLetter,
            &message(None, &[], "x"),
        );
        let b = extract(
            &KeySource::BodyHash,
            MissingKeyPolicy::DeadLetter,
            &message(Some("other"), &[], "x"),
        );
        let c = extract(
            &KeySource::BodyHash,
            MissingKeyPolicy::DeadLetter,
            &message(None, &[], "y"),
        );
        assert_eq!(a, b);
        assert_ne!(a, c);
    }
}
