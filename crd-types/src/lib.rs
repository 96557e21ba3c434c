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

/// The CustomResourceDefinitions of this crate, one per kind, in a stable order.
pub fn crds() -> Vec<CustomResourceDefinition> {
    vec![MyResource::crd(), MessageBroadcast::crd()]
}
