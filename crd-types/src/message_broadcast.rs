//! `MessageBroadcast`: a cluster-scoped message copied as a ConfigMap into every selected namespace.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::status::Condition;

/// Desired state of a MessageBroadcast: what to publish, and where.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "example.com",
    version = "v1",
    kind = "MessageBroadcast",
    plural = "messagebroadcasts",
    singular = "messagebroadcast",
    shortname = "mb",
    status = "MessageBroadcastStatus",
    derive = "PartialEq",
    doc = "A message that the operator copies as a ConfigMap into every Active namespace matching a selector.",
    printcolumn = r#"{"name":"Matched","type":"integer","description":"Namespaces matching the selector","jsonPath":".status.matchedNamespaces"}"#,
    printcolumn = r#"{"name":"Ready","type":"integer","description":"Namespaces holding an up-to-date copy","jsonPath":".status.readyNamespaces"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct MessageBroadcastSpec {
    /// The message to publish. Each copy holds it verbatim in `data.message`.
    #[schemars(length(min = 1, max = crate::MAX_MESSAGE_LENGTH))]
    pub message: String,
    /// Namespaces that receive a copy, by label. `{}` selects every namespace; only Active
    /// namespaces receive copies.
    pub namespace_selector: LabelSelector,
    /// Name of the ConfigMap written into each namespace. Defaults to the broadcast's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
    )]
    pub config_map_name: Option<String>,
}

impl MessageBroadcast {
    /// Name of the ConfigMap copy in each selected namespace.
    pub fn config_map_name(&self) -> &str {
        self.spec.config_map_name.as_deref().or(self.metadata.name.as_deref()).unwrap_or_default()
    }
}

/// Observed state of a MessageBroadcast, written only by the operator.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MessageBroadcastStatus {
    /// Number of Active namespaces matching the selector.
    #[serde(default)]
    pub matched_namespaces: u32,
    /// Number of matching namespaces whose copy is up to date.
    #[serde(default)]
    pub ready_namespaces: u32,
    /// The `metadata.generation` of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Standard conditions; `Ready` is False with reason `Conflict` naming the namespaces whose
    /// copy could not be written.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}
