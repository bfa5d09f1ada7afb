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
        KeySource::Header { name } => message.header(name).map(str::to_string),
        KeySource::JsonPointer { pointer } => from_json(&message.body, pointer),
        KeySource::BodyHash => Some(body_hash(&message.body)),
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

/// Hex SHA-256 of a body: the key of `bodyHash`, and the payload fingerprint.
pub fn body_hash(body: &[u8]) -> String {
    hex::encode(Sha256::digest(body))
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
