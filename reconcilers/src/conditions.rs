//! Status vocabulary of the controllers: condition reasons as a type, and the rule that a
//! condition's lastTransitionTime moves only when its status changes.

use std::fmt;

use crd_types::{Condition, ConditionStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

/// The condition type every resource of this operator reports.
pub const READY: &str = "Ready";

/// Machine-readable reasons of the Ready condition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// The owned ConfigMap holds the message.
    ConfigMapSynced,
    /// Every selected namespace holds an up-to-date copy.
    CopiesSynced,
    /// A ConfigMap of the wanted name exists and is owned by someone else.
    ConfigMapConflict,
    /// The ConfigMap name derived from the resource is not a valid name.
    InvalidConfigMapName,
    /// The namespace selector cannot be evaluated.
    InvalidSelector,
    /// The ConfigMap name is reserved for other components.
    ReservedConfigMapName,
    /// The resource is in a namespace the operator never writes into.
    NamespaceProtected,
    /// The broadcast would write more bytes in total than the operator allows.
    BroadcastTooLarge,
    /// Writes are in progress or failed transiently and are being retried.
    Reconciling,
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// The Ready condition with `status`, `reason` and `message`, keeping the previous
/// lastTransitionTime when the status did not change (Kubernetes API conventions).
pub fn ready_condition(
    previous: &[Condition],
    status: ConditionStatus,
    reason: Reason,
    message: String,
    generation: Option<i64>,
    now: Time,
) -> Condition {
    let last_transition_time = previous
        .iter()
        .find(|c| c.type_ == READY && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or(now);
    Condition {
        type_: READY.to_owned(),
        status,
        reason: reason.to_string(),
        message,
        last_transition_time,
        observed_generation: generation,
    }
}

/// The current time as a Kubernetes timestamp, truncated to whole seconds as the API server
/// stores it, so that comparing a status with its stored copy is exact.
pub fn now() -> Time {
    let seconds = k8s_openapi::jiff::Timestamp::now().as_second();
    Time(k8s_openapi::jiff::Timestamp::from_second(seconds).unwrap_or_else(|_| k8s_openapi::jiff::Timestamp::now()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: i64) -> Time {
        Time(k8s_openapi::jiff::Timestamp::from_second(seconds).expect("valid timestamp"))
    }

    #[test]
    fn transition_time_is_kept_while_the_status_holds() {
        let first = ready_condition(&[], ConditionStatus::True, Reason::ConfigMapSynced, "ok".into(), Some(1), at(100));
        assert_eq!(first.last_transition_time, at(100));
        let again = ready_condition(
            std::slice::from_ref(&first),
            ConditionStatus::True,
            Reason::ConfigMapSynced,
            "ok".into(),
            Some(2),
            at(200),
        );
        assert_eq!(again.last_transition_time, at(100), "same status keeps the transition time");
        assert_eq!(again.observed_generation, Some(2));
        let failed = ready_condition(
            &[again],
            ConditionStatus::False,
            Reason::ConfigMapConflict,
            "taken".into(),
            Some(2),
            at(300),
        );
        assert_eq!(failed.last_transition_time, at(300), "a new status moves it");
        assert_eq!(failed.reason, "ConfigMapConflict");
    }
}
