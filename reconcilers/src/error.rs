//! The one error type of the reconcilers. Each variant knows whether retrying can help
//! (transient: requeue with per-object backoff) or not (permanent: written to status, not retried
//! in a loop), and the label it reports under in metrics.

/// Why a reconcile could not finish.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A Kubernetes API call failed; retried with backoff.
    #[error("kubernetes api call failed: {0}")]
    Kube(#[from] kube::Error),
    /// A ConfigMap of the wanted name exists and belongs to someone else; never overwritten.
    #[error("configmap {namespace}/{name} exists and is not owned by {owner}")]
    ConfigMapConflict {
        /// Namespace of the foreign ConfigMap.
        namespace: String,
        /// Name of the foreign ConfigMap.
        name: String,
        /// `Kind/name` of the resource that wanted it.
        owner: String,
    },
    /// The ConfigMap name derived from the resource is not a valid Kubernetes name.
    #[error("configmap name {name:?} is invalid: {reason}")]
    InvalidConfigMapName {
        /// The derived name.
        name: String,
        /// Which rule it breaks.
        reason: String,
    },
    /// The ConfigMap name is one the operator never writes (`--reserved-configmap-names`).
    #[error(
        "configmap name {name:?} is reserved: other components publish ConfigMaps of that name, so this operator never writes one"
    )]
    ReservedConfigMapName {
        /// The reserved name.
        name: String,
    },
    /// The resource's namespace is one the operator never writes into (`--protected-namespaces`).
    #[error("namespace {namespace} is protected: this operator writes no ConfigMap there")]
    ProtectedNamespace {
        /// The protected namespace.
        namespace: String,
    },
    /// A broadcast would write more than `--broadcast-max-bytes` in total.
    #[error(
        "the broadcast would write {bytes} bytes (its message to {namespaces} namespaces), more than the limit of {limit} bytes; nothing was written, copies already there stay"
    )]
    BroadcastTooLarge {
        /// Message bytes × matching namespaces.
        bytes: u64,
        /// Matching namespaces.
        namespaces: usize,
        /// `--broadcast-max-bytes`.
        limit: u64,
    },
    /// The namespace selector cannot be evaluated.
    #[error("namespace selector is invalid: {0}")]
    InvalidSelector(String),
    /// An object from the API server lacks a field the server always sets.
    #[error("object has no {0}")]
    MissingField(&'static str),
    /// A patch body could not be built.
    #[error("building a patch failed: {0}")]
    Serialize(#[from] serde_json::Error),
    /// The reconcile ran longer than the reconcile timeout and was cancelled; retried with backoff.
    #[error("reconcile did not finish within {0:?}")]
    Timeout(std::time::Duration),
    /// The reconcile panicked; caught by the runtime and retried with backoff.
    #[error("reconcile panicked: {0}")]
    Panicked(String),
}

impl Error {
    /// True when retrying later can succeed without anyone changing the spec.
    pub fn is_transient(&self) -> bool {
        matches!(self, Error::Kube(_) | Error::MissingField(_) | Error::Timeout(_) | Error::Panicked(_))
    }

    /// The error as a condition message: what a user reads in `kubectl describe`. For an API
    /// error that is the server's own message (the full error, with its status, goes to the log).
    pub fn condition_message(&self) -> String {
        match self {
            Error::Kube(kube::Error::Api(status)) => {
                format!("the API server answered {}: {}", status.code, status.message)
            }
            other => other.to_string(),
        }
    }

    /// The reason the Ready condition gives for this error.
    pub fn reason(&self) -> crate::conditions::Reason {
        use crate::conditions::Reason;
        match self {
            Error::ConfigMapConflict { .. } => Reason::ConfigMapConflict,
            Error::InvalidConfigMapName { .. } => Reason::InvalidConfigMapName,
            Error::InvalidSelector(_) => Reason::InvalidSelector,
            Error::ReservedConfigMapName { .. } => Reason::ReservedConfigMapName,
            Error::ProtectedNamespace { .. } => Reason::NamespaceProtected,
            Error::BroadcastTooLarge { .. } => Reason::BroadcastTooLarge,
            _ => Reason::Reconciling,
        }
    }

    /// Label value for `example_operator_reconcile_errors_by_reason_total`.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(kube::Error::Api(status)) if status.code == 409 => "api_conflict",
            Error::Kube(kube::Error::Api(status)) if status.code == 403 => "api_forbidden",
            Error::Kube(kube::Error::Api(_)) => "api_error",
            Error::Kube(_) => "api_unreachable",
            Error::ConfigMapConflict { .. } => "configmap_conflict",
            Error::InvalidConfigMapName { .. } => "invalid_configmap_name",
            Error::InvalidSelector(_) => "invalid_selector",
            Error::ReservedConfigMapName { .. } => "reserved_configmap_name",
            Error::ProtectedNamespace { .. } => "protected_namespace",
            Error::BroadcastTooLarge { .. } => "broadcast_too_large",
            Error::MissingField(_) => "missing_field",
            Error::Serialize(_) => "serialize",
            Error::Timeout(_) => "timeout",
            Error::Panicked(_) => "panic",
        }
    }
}

/// Result of the reconcilers.
pub type Result<T, E = Error> = std::result::Result<T, E>;
