//! Writing the ConfigMaps the controllers own, shared by both controllers: create, repair drift,
//! delete, and refuse to touch a ConfigMap that belongs to someone else.
//!
//! Reads come from the shared ConfigMap cache, which holds only ConfigMaps labelled as managed by
//! this operator. Nothing here writes when the cached copy already matches.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Client, Resource, ResourceExt};
use serde_json::json;

use crate::error::{Error, Result};

/// The standard label naming the tool that manages an object.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
/// Value of [`MANAGED_BY_LABEL`] and the field manager of every write.
pub const MANAGER: &str = "example-operator";

/// Label selector of the ConfigMaps this operator manages (the shared cache watches only these).
pub fn managed_selector() -> String {
    format!("{MANAGED_BY_LABEL}={MANAGER}")
}

/// Annotation of a cached ConfigMap whose data values were replaced by their digests
/// ([`digest_data`]): the cache holds what reconciles compare, not a 64 KiB message per copy.
pub const DIGESTED_ANNOTATION: &str = "example.com/cached-data-digests";

/// The digest that stands in for a data value in the cache.
fn digest(value: &str) -> String {
    use sha2::Digest;
    format!("sha256:{:x}", sha2::Sha256::digest(value.as_bytes()))
}

/// Replaces every data value of a ConfigMap about to be cached by its digest, and binary data by
/// nothing (only its presence is compared); marks it with [`DIGESTED_ANNOTATION`].
pub fn digest_data(config_map: &mut ConfigMap) {
    for value in config_map.data.iter_mut().flat_map(|data| data.values_mut()) {
        *value = digest(value);
    }
    for value in config_map.binary_data.iter_mut().flat_map(|data| data.values_mut()) {
        value.0.clear();
    }
    config_map
        .metadata
        .annotations
        .get_or_insert_with(BTreeMap::new)
        .insert(DIGESTED_ANNOTATION.into(), "sha256".into());
}

/// A ConfigMap as a controller wants it.
#[derive(Clone, Debug, PartialEq)]
pub struct DesiredConfigMap {
    pub namespace: String,
    pub name: String,
    /// The controller reference to the owning resource.
    pub owner: OwnerReference,
    pub data: BTreeMap<String, String>,
}

/// What [`ensure`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteOutcome {
    /// The ConfigMap already matched; nothing was written.
    Unchanged,
    /// The ConfigMap did not exist and was created.
    Created,
    /// The ConfigMap drifted and was repaired.
    Updated,
}

/// UID of the controller owner of `object`, if it has one.
pub fn controller_uid(meta: &ObjectMeta) -> Option<&str> {
    meta.owner_references.iter().flatten().find(|o| o.controller == Some(true)).map(|o| o.uid.as_str())
}

/// The controller reference of `meta` when it points at a `K` (kind and apiVersion match).
pub fn controller_of_kind<K: Resource<DynamicType = ()>>(meta: &ObjectMeta) -> Option<&OwnerReference> {
    meta.owner_references.iter().flatten().find(|owner| {
        owner.controller == Some(true) && owner.kind == K::kind(&()) && owner.api_version == K::api_version(&())
    })
}

impl DesiredConfigMap {
    /// The full object to create.
    pub fn to_config_map(&self) -> ConfigMap {
        ConfigMap {
            metadata: ObjectMeta {
                name: Some(self.name.clone()),
                namespace: Some(self.namespace.clone()),
                labels: Some(BTreeMap::from([(MANAGED_BY_LABEL.to_owned(), MANAGER.to_owned())])),
                owner_references: Some(vec![self.owner.clone()]),
                ..ObjectMeta::default()
            },
            data: Some(self.data.clone()),
            ..ConfigMap::default()
        }
    }

    /// True when `existing` is controlled by our owner.
    pub fn is_owner_of(&self, existing: &ConfigMap) -> bool {
        controller_uid(&existing.metadata) == Some(self.owner.uid.as_str())
    }

    /// True when `existing` needs no write: ours, labelled, and holding the desired value under
    /// each key this controller owns. Keys, binary data and labels other writers added are theirs:
    /// they neither cause a write nor are removed.
    pub fn is_satisfied_by(&self, existing: &ConfigMap) -> bool {
        let labelled = existing.labels().get(MANAGED_BY_LABEL).map(String::as_str) == Some(MANAGER);
        let empty = BTreeMap::new();
        let data = existing.data.as_ref().unwrap_or(&empty);
        // A cached copy holds digests; one read from the API server holds the values.
        let digested = existing.annotations().contains_key(DIGESTED_ANNOTATION);
        let data_matches = self.data.iter().all(|(key, wanted)| {
            data.get(key).is_some_and(|held| if digested { *held == digest(wanted) } else { held == wanted })
        });
        self.is_owner_of(existing) && labelled && data_matches
    }

    /// A JSON merge patch that turns `existing` into the desired ConfigMap where it is ours: sets
    /// our label, our owner reference (other owners' references stay, in place) and the keys we
    /// own; keys, binary data and labels other writers added stay. The uid and resourceVersion
    /// make it conditional on the object as read: a recreated ConfigMap, or one changed since (a
    /// new owner, say), is not written; the server answers 409 and the retry reads it again.
    fn repair_patch(&self, existing: &ConfigMap) -> serde_json::Value {
        let data: serde_json::Map<String, serde_json::Value> =
            self.data.iter().map(|(k, v)| (k.clone(), json!(v))).collect();
        let mut owners: Vec<OwnerReference> = existing.metadata.owner_references.clone().unwrap_or_default();
        match owners.iter_mut().find(|owner| owner.uid == self.owner.uid) {
            Some(ours) => *ours = self.owner.clone(),
            None => owners.push(self.owner.clone()),
        }
        json!({
            "metadata": {
                "uid": existing.metadata.uid,
                "resourceVersion": existing.metadata.resource_version,
                "labels": {MANAGED_BY_LABEL: MANAGER},
                "ownerReferences": owners,
            },
            "data": data,
        })
    }
}

/// Makes the cluster hold `desired`, writing only when it differs. A ConfigMap of that name that
/// `desired.owner` does not control is never modified: that is [`Error::ConfigMapConflict`].
pub async fn ensure(client: &Client, cache: &Store<ConfigMap>, desired: &DesiredConfigMap) -> Result<WriteOutcome> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), &desired.namespace);
    let key = ObjectRef::new(&desired.name).within(&desired.namespace);
    let existing = match cache.get(&key) {
        Some(cached) => (*cached).clone(),
        None => {
            // Not in the cache: either absent, or present without our label (foreign, or ours
            // with the label removed). Creating tells which in one call in the common case.
            let params = PostParams { field_manager: Some(MANAGER.to_owned()), ..PostParams::default() };
            match api.create(&params, &desired.to_config_map()).await {
                Ok(_) => return Ok(WriteOutcome::Created),
                Err(kube::Error::Api(status)) if status.code == 409 => {}
                Err(error) => return Err(error.into()),
            }
            // Already exists: read it directly; it may be gone again, which the next attempt handles.
            api.get_opt(&desired.name).await?.ok_or(Error::MissingField("configmap that was just reported to exist"))?
        }
    };
    if !desired.is_owner_of(&existing) {
        return Err(Error::ConfigMapConflict {
            namespace: desired.namespace.clone(),
            name: desired.name.clone(),
            owner: format!("{}/{}", desired.owner.kind, desired.owner.name),
        });
    }
    if desired.is_satisfied_by(&existing) {
        return Ok(WriteOutcome::Unchanged);
    }
    let params = PatchParams { field_manager: Some(MANAGER.to_owned()), ..PatchParams::default() };
    api.patch(&desired.name, &params, &Patch::Merge(desired.repair_patch(&existing))).await?;
    Ok(WriteOutcome::Updated)
}

/// Deletes the owned ConfigMap `existing` (only that object: the uid is a precondition).
pub async fn delete(client: &Client, existing: &ConfigMap) -> Result<()> {
    let namespace = existing.namespace().ok_or(Error::MissingField("metadata.namespace"))?;
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), &namespace);
    let params = DeleteParams {
        preconditions: Some(Preconditions { uid: existing.metadata.uid.clone(), resource_version: None }),
        ..DeleteParams::default()
    };
    match api.delete(&existing.name_any(), &params).await {
        Ok(_) => Ok(()),
        // Already gone, or replaced by another object of the same name: nothing of ours to delete.
        Err(kube::Error::Api(status)) if status.code == 404 || status.code == 409 => Ok(()),
        Err(error) => Err(error.into()),
    }
}

/// Checks `name` is a valid ConfigMap name (an RFC 1123 DNS subdomain), so a bad derived name is
/// reported as such instead of as an API error.
pub fn validate_name(name: &str) -> Result<()> {
    let invalid = |reason: &str| Err(Error::InvalidConfigMapName { name: name.to_owned(), reason: reason.to_owned() });
    if name.is_empty() {
        return invalid("it is empty");
    }
    if name.len() > 253 {
        return invalid("it is longer than 253 characters");
    }
    for label in name.split('.') {
        let valid_chars = label.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        let alphanumeric_ends = label.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
            && label.bytes().last().is_some_and(|b| b.is_ascii_alphanumeric());
        if !valid_chars || !alphanumeric_ends {
            return invalid(
                "it must consist of lower case alphanumeric characters, '-' or '.', and start and end with an alphanumeric character",
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desired() -> DesiredConfigMap {
        DesiredConfigMap {
            namespace: "ns".into(),
            name: "hello-configmap".into(),
            owner: OwnerReference {
                api_version: "example.com/v1".into(),
                kind: "MyResource".into(),
                name: "hello".into(),
                uid: "uid-1".into(),
                controller: Some(true),
                block_owner_deletion: Some(true),
            },
            data: BTreeMap::from([("message".to_owned(), "hi".to_owned())]),
        }
    }

    #[test]
    fn the_desired_object_is_labelled_and_controlled_by_its_owner() {
        let config_map = desired().to_config_map();
        assert_eq!(config_map.labels().get(MANAGED_BY_LABEL).map(String::as_str), Some(MANAGER));
        assert_eq!(controller_uid(&config_map.metadata), Some("uid-1"));
        assert!(desired().is_satisfied_by(&config_map));
    }

    #[test]
    fn drift_in_our_keys_labels_or_owner_is_detected_and_others_keys_are_not_drift() {
        let wanted = desired();
        let mut edited = wanted.to_config_map();
        edited.data = Some(BTreeMap::from([("message".to_owned(), "edited".to_owned())]));
        assert!(!wanted.is_satisfied_by(&edited));
        let mut removed = wanted.to_config_map();
        removed.data = Some(BTreeMap::new());
        assert!(!wanted.is_satisfied_by(&removed));
        let mut extra = wanted.to_config_map();
        extra.data.get_or_insert_default().insert("extra".into(), "x".into());
        extra.binary_data = Some(BTreeMap::from([("b".to_owned(), k8s_openapi::ByteString(vec![1]))]));
        assert!(wanted.is_satisfied_by(&extra), "keys someone else added are theirs, not drift");
        let mut unlabelled = wanted.to_config_map();
        unlabelled.metadata.labels = None;
        assert!(!wanted.is_satisfied_by(&unlabelled) && wanted.is_owner_of(&unlabelled));
        let mut foreign = wanted.to_config_map();
        foreign.metadata.owner_references = None;
        assert!(!wanted.is_owner_of(&foreign));
    }

    #[test]
    fn a_cached_copy_holds_digests_and_still_tells_drift() {
        let wanted =
            DesiredConfigMap { data: BTreeMap::from([("message".to_owned(), "x".repeat(64 * 1024))]), ..desired() };
        let mut cached = wanted.to_config_map();
        digest_data(&mut cached);
        let held = cached.data.as_ref().and_then(|d| d.get("message")).map(String::len);
        assert!(held.is_some_and(|len| len < 100), "a digest, not the value: {held:?}");
        assert!(wanted.is_satisfied_by(&cached));

        let mut edited = wanted.to_config_map();
        edited.data = Some(BTreeMap::from([("message".to_owned(), "edited".to_owned())]));
        digest_data(&mut edited);
        assert!(!wanted.is_satisfied_by(&edited));
        // A value that happens to be the digest text is not taken for a digest when read directly.
        let mut literal = wanted.to_config_map();
        literal.data = cached.data.clone();
        assert!(!wanted.is_satisfied_by(&literal));
        let mut binary = wanted.to_config_map();
        binary.binary_data = Some(BTreeMap::from([("b".to_owned(), k8s_openapi::ByteString(vec![1]))]));
        digest_data(&mut binary);
        assert!(wanted.is_satisfied_by(&binary), "binary data someone added is theirs, digested or not");
    }

    #[test]
    fn repair_patch_keeps_others_keys_and_pins_the_uid() {
        let wanted = desired();
        let mut existing = wanted.to_config_map();
        existing.metadata.uid = Some("cm-uid".into());
        existing.data =
            Some(BTreeMap::from([("message".to_owned(), "old".to_owned()), ("extra".to_owned(), "x".to_owned())]));
        let patch = wanted.repair_patch(&existing);
        assert_eq!(patch["data"]["message"], "hi");
        assert!(patch["data"].get("extra").is_none(), "another writer's key is left alone: {patch}");
        assert!(patch.get("binaryData").is_none(), "and so is binary data: {patch}");
        assert_eq!(patch["metadata"]["uid"], "cm-uid");
        assert_eq!(patch["metadata"]["ownerReferences"][0]["uid"], "uid-1");
    }

    #[test]
    fn repair_patch_keeps_other_owners_and_is_conditional_on_the_version_read() {
        let wanted = desired();
        let mut existing = wanted.to_config_map();
        existing.metadata.resource_version = Some("opaque-42".into());
        let other = OwnerReference {
            api_version: "v1".into(),
            kind: "ConfigMap".into(),
            name: "other".into(),
            uid: "uid-other".into(),
            controller: None,
            block_owner_deletion: None,
        };
        let mut ours = wanted.owner.clone();
        ours.block_owner_deletion = None;
        existing.metadata.owner_references = Some(vec![other.clone(), ours]);
        let patch = wanted.repair_patch(&existing);
        assert_eq!(patch["metadata"]["resourceVersion"], "opaque-42");
        let owners: Vec<OwnerReference> = serde_json::from_value(patch["metadata"]["ownerReferences"].clone())
            .unwrap_or_else(|error| panic!("owner references: {error}"));
        assert_eq!(owners, vec![other, wanted.owner.clone()], "the other owner stays, ours is restored in place");
    }

    #[test]
    fn config_map_names_are_dns_subdomains() {
        assert!(validate_name("hello-configmap").is_ok());
        assert!(validate_name("a.b-c.d").is_ok());
        assert!(validate_name(&format!("{}-configmap", "a".repeat(244))).is_err(), "254 characters");
        assert!(validate_name(&format!("{}-configmap", "a".repeat(243))).is_ok(), "253 characters");
        assert!(validate_name("Upper").is_err());
        assert!(validate_name("-leading").is_err());
        assert!(validate_name("").is_err());
    }
}
