//! Server-side apply that sends nothing when nothing would change.
//!
//! Every object idemq applies carries an annotation with the digest of what
//! was applied. Before applying, the object is read: when it carries the
//! digest of the desired object and still contains every desired field (so
//! nobody removed or changed one of idemq's fields since), the apply is
//! skipped. A reconcile that changes nothing therefore writes nothing, and an
//! object is never rewritten in a loop.

use std::fmt::Debug;

use kube::api::{Api, Patch};
use serde::de::DeserializeOwned;
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::{apply_params, Error};
use crate::labels::APPLIED_HASH;

/// `desired` with the digest of its content in `metadata.annotations`.
pub fn stamped(mut desired: Value) -> Value {
    let digest = hex::encode(&Sha256::digest(desired.to_string().as_bytes())[..12]);
    if let Some(metadata) = desired.get_mut("metadata").and_then(Value::as_object_mut) {
        let annotations = metadata
            .entry("annotations")
            .or_insert_with(|| Value::Object(Default::default()));
        if let Some(a) = annotations.as_object_mut() {
            a.insert(APPLIED_HASH.to_string(), Value::String(digest));
        }
    }
    desired
}

/// Whether `observed` already holds every field of (stamped) `desired`.
pub fn up_to_date(observed: &Value, desired: &Value) -> bool {
    contains(observed, desired)
}

/// `observed` has every field of `desired` with the same value. Objects may
/// have more fields (defaults the API server adds); lists of objects match
/// element by element in any order; other lists and scalars are equal.
pub fn contains(observed: &Value, desired: &Value) -> bool {
    match (observed, desired) {
        (Value::Object(o), Value::Object(d)) => d
            .iter()
            .all(|(k, dv)| o.get(k).is_some_and(|ov| contains(ov, dv))),
        (Value::Array(o), Value::Array(d)) if d.iter().all(Value::is_object) => {
            o.len() >= d.len() && d.iter().all(|dv| o.iter().any(|ov| contains(ov, dv)))
        }
        (Value::Number(o), Value::Number(d)) => o.as_f64() == d.as_f64(),
        (o, d) => o == d,
    }
}

/// Applies `desired` as `name` unless the object already matches it;
/// returns the object as it now is.
pub async fn apply<K>(api: &Api<K>, name: &str, desired: Value) -> Result<K, Error>
where
    K: kube::Resource + Clone + Debug + DeserializeOwned + serde::Serialize,
{
    let desired = stamped(desired);
    if let Some(observed) = api.get_opt(name).await? {
        let value = serde_json::to_value(&observed).unwrap_or(Value::Null);
        if up_to_date(&value, &desired) {
            return Ok(observed);
        }
    }
    Ok(api
        .patch(name, &apply_params(), &Patch::Apply(&desired))
        .await?)
}

/// What [`apply_owned`] found.
pub enum Owned<K> {
    /// Applied (or already up to date): the object as it now is.
    Applied(K),
    /// An object of that name exists and another owner's: left alone.
    Taken,
}

/// Whether `object` is controlled by the object with `uid`.
pub fn owned_by<K: kube::Resource>(object: &K, uid: &str) -> bool {
    object
        .meta()
        .owner_references
        .iter()
        .flatten()
        .any(|o| o.uid == uid && o.controller == Some(true))
}

/// [`apply`] for an object `owner_uid` creates and owns, under a name
/// people may have used: an existing object of someone else's is never
/// taken over (a forced apply would rewrite its fields).
pub async fn apply_owned<K>(
    api: &Api<K>,
    name: &str,
    desired: Value,
    owner_uid: &str,
) -> Result<Owned<K>, Error>
where
    K: kube::Resource + Clone + Debug + DeserializeOwned + serde::Serialize,
{
    let desired = stamped(desired);
    if let Some(observed) = api.get_opt(name).await? {
        if !owned_by(&observed, owner_uid) {
            return Ok(Owned::Taken);
        }
        let value = serde_json::to_value(&observed).unwrap_or(Value::Null);
        if up_to_date(&value, &desired) {
            return Ok(Owned::Applied(observed));
        }
    }
    Ok(Owned::Applied(
        api.patch(name, &apply_params(), &Patch::Apply(&desired))
            .await?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn defaults_added_by_the_server_still_match_but_a_changed_field_does_not() {
        let desired = stamped(json!({
            "metadata": { "name": "w" },
            "spec": { "template": { "spec": { "initContainers": [
                { "name": "idemq-sidecar", "image": "img:1", "args": ["run"] } ] } } }
        }));
        let mut observed = desired.clone();
        observed["spec"]["template"]["spec"]["initContainers"][0]["imagePullPolicy"] =
            json!("IfNotPresent");
        observed["spec"]["template"]["spec"]["containers"] = json!([{ "name": "app" }]);
        assert!(up_to_date(&observed, &desired));

        let mut changed = observed.clone();
        changed["spec"]["template"]["spec"]["initContainers"][0]["image"] = json!("img:0");
        assert!(!up_to_date(&changed, &desired));

        let mut removed = observed.clone();
        removed["spec"]["template"]["spec"]["initContainers"] = json!([]);
        assert!(!up_to_date(&removed, &desired));
    }

    #[test]
    fn the_stamp_follows_the_content() {
        let a = stamped(json!({ "metadata": { "name": "w" }, "data": { "k": "1" } }));
        let b = stamped(json!({ "metadata": { "name": "w" }, "data": { "k": "2" } }));
        assert_ne!(
            a["metadata"]["annotations"][APPLIED_HASH],
            b["metadata"]["annotations"][APPLIED_HASH]
        );
        // A field that was idemq's and no longer is: the old stamp differs.
        let mut observed = a.clone();
        observed["data"]["k"] = json!("2");
        assert!(!up_to_date(&observed, &b));
    }
}
