//! The custom resources of example-operator (group `example.com`, version `v1`).
//!
//! This crate holds data only: the typed spec/status of each kind, their validation as
//! OpenAPI schema, and the names shared with the reconcilers. It must never do I/O.

mod message_broadcast;
mod my_resource;
mod status;

pub use message_broadcast::{MessageBroadcast, MessageBroadcastSpec, MessageBroadcastStatus};
pub use my_resource::{MyResource, MyResourceSpec, MyResourceStatus};
pub use status::{Condition, ConditionStatus, Phase};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

/// API group of every custom resource in this crate.
pub const GROUP: &str = "example.com";

/// Largest `spec.message` accepted, in characters. At four bytes per character at most, the
/// owned ConfigMap stays far below the API server's 1 MiB object limit.
pub const MAX_MESSAGE_LENGTH: u32 = 65_536;

/// The CustomResourceDefinitions of this crate, one per kind, in a stable order, in the form the
/// API server takes without warnings (see [`tidy_schema`]).
pub fn crds() -> Vec<CustomResourceDefinition> {
    let mut crds = vec![MyResource::crd(), MessageBroadcast::crd()];
    for crd in &mut crds {
        for version in &mut crd.spec.versions {
            let schema = version.schema.as_mut().and_then(|s| s.open_api_v3_schema.as_mut());
            if let Some(schema) = schema {
                tidy_schema(schema);
                if let Some(spec) = schema.properties.as_mut().and_then(|properties| properties.get_mut("spec")) {
                    forbid_null(spec);
                }
            }
        }
    }
    crds
}

/// Makes every field of `schema` non-nullable: the API server then drops a `null` a client sends
/// (it prunes nulls of non-nullable fields) instead of storing it, so admission policies and
/// the operator both see an absent field, never a null one (`configMapName: null` would
/// otherwise read as no name in CEL and as the broadcast's name in the operator).
pub fn forbid_null(schema: &mut k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::JSONSchemaProps) {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
        JSONSchemaPropsOrArray, JSONSchemaPropsOrBool,
    };
    schema.nullable = None;
    for child in schema.properties.iter_mut().flat_map(|properties| properties.values_mut()) {
        forbid_null(child);
    }
    if let Some(JSONSchemaPropsOrArray::Schema(item)) = schema.items.as_mut() {
        forbid_null(item);
    }
    if let Some(JSONSchemaPropsOrBool::Schema(extra)) = schema.additional_properties.as_mut() {
        forbid_null(extra);
    }
}

/// Integer formats the API server recognises; schemars also writes `uint32` and the like, which
/// the server accepts with a warning ("unrecognized format") on every apply.
const KNOWN_INTEGER_FORMATS: [&str; 2] = ["int32", "int64"];

/// Makes a generated schema what `kubectl explain` and the API server expect: integer formats
/// Kubernetes does not know are dropped (the `minimum`/`maximum` bounds stay), and descriptions
/// are re-flowed from the Rust doc comments' line breaks into one line per paragraph.
pub fn tidy_schema(schema: &mut k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::JSONSchemaProps) {
    if schema
        .format
        .as_deref()
        .is_some_and(|f| f.starts_with("uint") || (f.starts_with("int") && !KNOWN_INTEGER_FORMATS.contains(&f)))
    {
        schema.format = None;
    }
    if let Some(description) = schema.description.as_mut() {
        *description = reflow(description);
    }
    let children = schema
        .properties
        .iter_mut()
        .flat_map(|properties| properties.values_mut())
        .chain(schema.pattern_properties.iter_mut().flat_map(|properties| properties.values_mut()))
        .chain(schema.all_of.iter_mut().flatten())
        .chain(schema.any_of.iter_mut().flatten())
        .chain(schema.one_of.iter_mut().flatten())
        .chain(schema.not.as_deref_mut());
    let items = match schema.items.as_mut() {
        Some(k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::JSONSchemaPropsOrArray::Schema(
            item,
        )) => Some(item.as_mut()),
        _ => None,
    };
    let additional = match schema.additional_properties.as_mut() {
        Some(k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::JSONSchemaPropsOrBool::Schema(
            extra,
        )) => Some(extra.as_mut()),
        _ => None,
    };
    for child in children.chain(items).chain(additional) {
        tidy_schema(child);
    }
}

/// Joins the lines of each paragraph with spaces; paragraphs stay separated by a blank line.
fn reflow(text: &str) -> String {
    text.split("\n\n")
        .map(|paragraph| paragraph.lines().map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>().join(" "))
        .filter(|paragraph| !paragraph.is_empty())
        .collect::<Vec<_>>()
        .join("\n\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_spec_field_takes_null() {
        for crd in crds() {
            let spec = crd.spec.versions.iter().filter_map(|v| v.schema.as_ref()?.open_api_v3_schema.as_ref());
            for schema in spec.filter_map(|s| s.properties.as_ref()?.get("spec")) {
                let json = serde_json::to_string(schema).unwrap_or_default();
                assert!(!json.contains("\"nullable\""), "{}: {json}", crd.spec.names.kind);
            }
        }
    }
}
