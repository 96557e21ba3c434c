//! Writing the ConfigMaps the controllers own, shared by both controllers: create, repair drift,
//! delete, and refuse to touch a ConfigMap that belongs to someone else.
//!
//! Reads come from the shared ConfigMap cache, which holds only ConfigMaps labelled as managed by
//! this operator. Nothing here writes when the cached copy already matches.

use std::collections::{BTreeMap, BTreeSet};

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

/// Annotation of a cached ConfigMap holding, instead of its data, one digest of the keys this
/// operator's field manager owns and their values ([`reduce_for_cache`]): what the cache holds is
/// the same size whatever others wrote into the ConfigMap.
pub const DIGEST_ANNOTATION: &str = "example.com/cached-owned-data-digest";

/// One digest of a set of keys and their values, length-prefixed so no two sets collide by
/// concatenation.
fn digest<'a>(entries: impl IntoIterator<Item = (&'a str, &'a str)>) -> String {
    use sha2::Digest;
    let mut sorted: Vec<(&str, &str)> = entries.into_iter().collect();
    sorted.sort_unstable();
    let mut hasher = sha2::Sha256::new();
    for (key, value) in sorted {
        hasher.update((key.len() as u64).to_le_bytes());
        hasher.update(key.as_bytes());
        hasher.update((value.len() as u64).to_le_bytes());
        hasher.update(value.as_bytes());
    }
    format!("sha256:{:x}", hasher.finalize())
}

/// The data keys `manager` owns in `meta.managedFields` (by create, update or apply; never through
/// a subresource): the keys this operator wrote and nobody has changed since.
pub fn keys_owned_by<'a>(meta: &'a ObjectMeta, manager: &str) -> BTreeSet<&'a str> {
    meta.managed_fields
        .iter()
        .flatten()
        .filter(|entry| entry.manager.as_deref() == Some(manager) && entry.subresource.is_none())
        .filter_map(|entry| entry.fields_v1.as_ref()?.0.get("f:data")?.as_object())
        .flat_map(|data| data.keys().filter_map(|key| key.strip_prefix("f:")))
        .collect()
}

/// Shrinks a ConfigMap about to be cached to what reconciles read, bounded whatever anyone wrote
/// into it: one digest of the keys this operator owns ([`DIGEST_ANNOTATION`]) instead of data and
/// binary data; of the labels only [`MANAGED_BY_LABEL`]; of the owner references only the
/// controller's; no other annotations, finalizers or managed fields.
pub fn reduce_for_cache(config_map: &mut ConfigMap) {
    let owned = keys_owned_by(&config_map.metadata, MANAGER);
    let data = config_map.data.take().unwrap_or_default();
    let held =
        digest(data.iter().filter(|(key, _)| owned.contains(key.as_str())).map(|(k, v)| (k.as_str(), v.as_str())));
    config_map.binary_data = None;
    let meta = &mut config_map.metadata;
    meta.managed_fields = None;
    meta.finalizers = None;
    meta.annotations = Some(BTreeMap::from([(DIGEST_ANNOTATION.to_owned(), held)]));
    if let Some(labels) = meta.labels.as_mut() {
        labels.retain(|key, _| key == MANAGED_BY_LABEL);
    }
    if let Some(owners) = meta.owner_references.as_mut() {
        owners.retain(|owner| owner.controller == Some(true));
        owners.truncate(1);
    }
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
    /// they neither cause a write nor are removed. A cached copy ([`reduce_for_cache`]) is
    /// compared by digest: it matches when the keys this operator's field manager owns are
    /// exactly the desired ones, with the desired values.
    pub fn is_satisfied_by(&self, existing: &ConfigMap) -> bool {
        let labelled = existing.labels().get(MANAGED_BY_LABEL).map(String::as_str) == Some(MANAGER);
        let data_matches = match existing.annotations().get(DIGEST_ANNOTATION) {
            Some(held) => *held == digest(self.data.iter().map(|(k, v)| (k.as_str(), v.as_str()))),
            None => {
                let empty = BTreeMap::new();
                let data = existing.data.as_ref().unwrap_or(&empty);
                self.data.iter().all(|(key, wanted)| data.get(key) == Some(wanted))
            }
        };
        self.is_owner_of(existing) && labelled && data_matches
    }

    /// The server-side apply that makes `existing` the desired ConfigMap where it is ours: our
    /// label, our owner reference and the keys we own, under this operator's field manager.
    /// Fields other writers own (their keys, labels, owner references, binary data) are merged,
    /// not replaced, so they stay. The uid and resourceVersion make it conditional on the object
    /// as read: a recreated ConfigMap, or one changed since (a new owner, say), is not written;
    /// the server answers 409 and the retry reads it again.
    fn repair_apply(&self, existing: &ConfigMap) -> serde_json::Value {
        json!({
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": self.name,
                "namespace": self.namespace,
                "uid": existing.metadata.uid,
                "resourceVersion": existing.metadata.resource_version,
                "labels": {MANAGED_BY_LABEL: MANAGER},
                "ownerReferences": [self.owner],
            },
            "data": self.data,
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
    // Forced: a value someone else changed under one of our keys is taken back.
    let params = PatchParams::apply(MANAGER).force();
    api.patch(&desired.name, &params, &Patch::Apply(desired.repair_apply(&existing))).await?;
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

    /// `cm` as the API server returns it after `manager` wrote `keys` (create, update or apply).
    fn written_by(mut cm: ConfigMap, manager: &str, keys: &[&str]) -> ConfigMap {
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::{FieldsV1, ManagedFieldsEntry};
        let data: serde_json::Map<String, serde_json::Value> =
            keys.iter().map(|key| (format!("f:{key}"), json!({}))).collect();
        cm.metadata.managed_fields.get_or_insert_default().push(ManagedFieldsEntry {
            manager: Some(manager.to_owned()),
            operation: Some("Apply".into()),
            fields_v1: Some(FieldsV1(json!({"f:data": data, "f:metadata": {"f:labels": {}}}))),
            ..ManagedFieldsEntry::default()
        });
        cm
    }

    #[test]
    fn a_cached_copy_is_one_digest_of_our_keys_and_still_tells_drift() {
        let wanted =
            DesiredConfigMap { data: BTreeMap::from([("message".to_owned(), "x".repeat(64 * 1024))]), ..desired() };
        let mut cached = written_by(wanted.to_config_map(), MANAGER, &["message"]);
        reduce_for_cache(&mut cached);
        assert!(cached.data.is_none() && cached.binary_data.is_none());
        let held = cached.annotations().get(DIGEST_ANNOTATION).map(String::len);
        assert!(held.is_some_and(|len| len < 100), "a digest, not the value: {held:?}");
        assert!(wanted.is_satisfied_by(&cached));

        let mut edited = wanted.to_config_map();
        edited.data = Some(BTreeMap::from([("message".to_owned(), "edited".to_owned())]));
        let mut edited = written_by(edited, MANAGER, &["message"]);
        reduce_for_cache(&mut edited);
        assert!(!wanted.is_satisfied_by(&edited));
        // Someone else changed our key: they own it now, and it is ours to take back.
        let mut taken = written_by(wanted.to_config_map(), "kubectl-edit", &["message"]);
        reduce_for_cache(&mut taken);
        assert!(!wanted.is_satisfied_by(&taken));
    }

    #[test]
    fn what_others_write_into_an_owned_config_map_neither_grows_the_cache_nor_is_drift() {
        let wanted = desired();
        let mut small = written_by(wanted.to_config_map(), MANAGER, &["message"]);
        reduce_for_cache(&mut small);
        let size = |cm: &ConfigMap| serde_json::to_vec(cm).map(|json| json.len()).unwrap_or(usize::MAX);

        let mut big = wanted.to_config_map();
        let keys: Vec<String> = (0..3_900).map(|i| format!("{i:0>250}")).collect();
        big.data.get_or_insert_default().extend(keys.iter().map(|key| (key.clone(), String::new())));
        big.binary_data = Some(BTreeMap::from([("b".to_owned(), k8s_openapi::ByteString(vec![1; 4096]))]));
        let labels = big.metadata.labels.get_or_insert_default();
        labels.extend((0..1_000).map(|i| (format!("tenant.example/{i}"), "x".repeat(60))));
        big.metadata.annotations = Some(BTreeMap::from([("big".to_owned(), "x".repeat(200_000))]));
        big.metadata.finalizers = Some((0..1_000).map(|i| format!("tenant.example/{i}")).collect());
        let other = OwnerReference { controller: None, uid: "other".into(), ..wanted.owner.clone() };
        big.metadata.owner_references.get_or_insert_default().extend(std::iter::repeat_n(other, 1_000));
        let key_refs: Vec<&str> = keys.iter().map(String::as_str).collect();
        let mut big = written_by(written_by(big, MANAGER, &["message"]), "tenant", &key_refs);
        assert!(size(&big) > 1_000_000);
        reduce_for_cache(&mut big);
        assert_eq!(size(&big), size(&small), "the cached copy is the same size: {big:?}");
        assert!(wanted.is_satisfied_by(&big), "others' keys, labels and owners are not drift");
    }

    #[test]
    fn keys_owned_come_from_our_managers_entries_only() {
        let cm = written_by(written_by(desired().to_config_map(), MANAGER, &["message"]), "other", &["extra"]);
        assert_eq!(keys_owned_by(&cm.metadata, MANAGER), BTreeSet::from(["message"]));
        assert!(keys_owned_by(&desired().to_config_map().metadata, MANAGER).is_empty());
    }

    #[test]
    fn the_repair_applies_only_our_fields_and_pins_uid_and_version() {
        let wanted = desired();
        let mut existing = wanted.to_config_map();
        existing.metadata.uid = Some("cm-uid".into());
        existing.metadata.resource_version = Some("opaque-42".into());
        existing.data =
            Some(BTreeMap::from([("message".to_owned(), "old".to_owned()), ("extra".to_owned(), "x".to_owned())]));
        let apply = wanted.repair_apply(&existing);
        assert_eq!(apply["data"], json!({"message": "hi"}), "another writer's key is not in our apply: {apply}");
        assert!(apply.get("binaryData").is_none(), "and neither is binary data: {apply}");
        assert_eq!(apply["metadata"]["uid"], "cm-uid");
        assert_eq!(apply["metadata"]["resourceVersion"], "opaque-42");
        assert_eq!(apply["metadata"]["ownerReferences"], json!([wanted.owner]), "only ours; others' are merged");
        assert_eq!(apply["metadata"]["labels"], json!({MANAGED_BY_LABEL: MANAGER}));
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
