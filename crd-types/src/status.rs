//! Status vocabulary shared by every kind: the phase and the standard Kubernetes Condition.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Coarse lifecycle of a resource, for humans and printer columns; conditions carry the detail.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum Phase {
    /// Seen by the controller but not yet reconciled.
    #[default]
    Pending,
    /// Everything the spec asks for exists and matches it.
    Ready,
    /// The spec cannot be satisfied as written; the Ready condition says why.
    Failed,
}

/// Whether a condition holds, following the Kubernetes convention.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum ConditionStatus {
    /// The condition holds.
    True,
    /// The condition does not hold.
    False,
    /// The controller cannot tell yet.
    #[default]
    Unknown,
}

/// The standard Kubernetes Condition shape (as in `metav1.Condition`), so generic tooling such as
/// `kubectl wait --for=condition=Ready` understands it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// Type of the condition in CamelCase, for example `Ready`.
    #[serde(rename = "type")]
    pub type_: String,
    /// Status of the condition: True, False or Unknown.
    pub status: ConditionStatus,
    /// Machine-readable CamelCase reason for the last transition.
    pub reason: String,
    /// Human-readable detail of the last transition.
    #[serde(default)]
    pub message: String,
    /// When the condition last changed status.
    pub last_transition_time: Time,
    /// The `metadata.generation` this condition was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}
