//! `MyResource`: a namespaced message that the operator materialises as a ConfigMap.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::status::{Condition, Phase};

/// Desired state of a MyResource: the message to publish.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "example.com",
    version = "v1",
    kind = "MyResource",
    plural = "myresources",
    singular = "myresource",
    shortname = "mr",
    namespaced,
    status = "MyResourceStatus",
    derive = "PartialEq",
    doc = "A message that the operator publishes as the ConfigMap `<name>-configmap` in the same namespace.",
    printcolumn = r#"{"name":"Phase","type":"string","description":"Lifecycle phase","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"ConfigMap","type":"string","description":"Name of the owned ConfigMap","jsonPath":".status.configMapName"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct MyResourceSpec {
    /// The message to publish. The operator copies it verbatim into `data.message` of the
    /// ConfigMap `<name>-configmap`; changing it updates the ConfigMap within seconds.
    #[schemars(length(min = 1, max = crate::MAX_MESSAGE_LENGTH))]
    pub message: String,
}

/// Observed state of a MyResource, written only by the operator.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MyResourceStatus {
    /// Lifecycle phase: Pending, Ready or Failed. The Ready condition explains it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    /// Name of the ConfigMap that holds the message, once the operator has written it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_map_name: Option<String>,
    /// The `metadata.generation` of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Standard conditions; `Ready` is True when the ConfigMap matches the spec.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}
