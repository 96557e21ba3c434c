//! The API server's audit log, read back: what the server recorded is the truth about who
//! wrote what and when, whatever the replicas' own metrics say.
//!
//! "Never two writers" is checked from it in two ways: every successful write of a replica other
//! than to the Lease was received while the Lease, by the Lease writes the server recorded, named
//! that replica; and grouped by replica, ordered by receive time, the writers' intervals never
//! overlap.

use std::path::Path;

use anyhow::{Context, Result, bail};
use k8s_openapi::jiff::Timestamp;

/// One write request as the API server recorded it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditedWrite {
    /// When the server received the request.
    pub received: Timestamp,
    pub user_agent: String,
    pub verb: String,
    /// Resource (plural), e.g. `configmaps`; `None` for non-resource requests.
    pub resource: Option<String>,
    pub namespace: Option<String>,
    pub name: Option<String>,
    /// HTTP status code of the response.
    pub code: u16,
    /// For a Lease write: the holder its request body names, if it names one.
    pub lease_holder: Option<String>,
}

impl AuditedWrite {
    fn succeeded(&self) -> bool {
        (200..300).contains(&self.code)
    }

    /// The operator identity in the User-Agent (`example-operator/<version> (<identity>)`).
    pub fn operator_identity(&self) -> Option<&str> {
        let rest = self.user_agent.strip_prefix("example-operator/")?;
        let inner = rest.split_once(" (")?.1;
        inner.strip_suffix(')')
    }

    fn is_lease(&self) -> bool {
        self.resource.as_deref() == Some("leases")
    }

    /// False for the reviews a `create` asks without storing anything: a standby checking a
    /// secure-metrics caller (TokenReview, SubjectAccessReview) writes nothing.
    fn stores_state(&self) -> bool {
        !matches!(
            self.resource.as_deref(),
            Some("tokenreviews" | "subjectaccessreviews" | "selfsubjectaccessreviews" | "localsubjectaccessreviews")
        )
    }
}

/// Reads every write the API server recorded in `log` so far.
pub fn read(log: &Path) -> Result<Vec<AuditedWrite>> {
    let text = std::fs::read_to_string(log).with_context(|| format!("reading the audit log {}", log.display()))?;
    let mut writes = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        // A line being written right now may be incomplete: skip what does not parse.
        let Ok(event) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        if event["stage"] != "ResponseComplete" {
            continue;
        }
        let text = |value: &serde_json::Value| value.as_str().map(str::to_owned);
        let received: Timestamp = event["requestReceivedTimestamp"]
            .as_str()
            .context("an audit event without requestReceivedTimestamp")?
            .parse()
            .context("parsing requestReceivedTimestamp")?;
        writes.push(AuditedWrite {
            received,
            user_agent: text(&event["userAgent"]).unwrap_or_default(),
            verb: text(&event["verb"]).unwrap_or_default(),
            resource: text(&event["objectRef"]["resource"]),
            namespace: text(&event["objectRef"]["namespace"]),
            name: text(&event["objectRef"]["name"]),
            code: event["responseStatus"]["code"].as_u64().and_then(|c| u16::try_from(c).ok()).unwrap_or(0),
            lease_holder: text(&event["requestObject"]["spec"]["holderIdentity"]),
        });
    }
    writes.sort_by_key(|w| w.received);
    Ok(writes)
}

/// A stretch of successful writes by one replica, in receive order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WriterInterval {
    pub identity: String,
    pub first: Timestamp,
    pub last: Timestamp,
    pub writes: usize,
}

/// What the audit log says about `replicas` and the Lease `namespace/lease`.
#[derive(Debug)]
pub struct WriterReport {
    /// Each replica's successful writes other than to the Lease, as one interval per replica.
    pub intervals: Vec<WriterInterval>,
    /// Who the Lease named, and from when, by the Lease writes the server accepted.
    pub holders: Vec<(Timestamp, String)>,
}

impl WriterReport {
    /// Successful writes by `identity` other than to the Lease.
    pub fn writes_of(&self, identity: &str) -> usize {
        self.intervals.iter().filter(|i| i.identity == identity).map(|i| i.writes).sum()
    }
}

/// Proves "never two writers" for `replicas` from the audit `writes` received from `since` on
/// (identities are reused by later runs against the same cluster): every successful write of a
/// replica other than to the Lease was received while the Lease `namespace/lease` named that
/// replica (by the accepted Lease writes before it). With `one_term_each`, also checks the
/// literal form: grouped by replica, the intervals from first to last write never overlap.
pub fn one_writer_at_a_time(
    writes: &[AuditedWrite],
    since: Timestamp,
    namespace: &str,
    lease: &str,
    replicas: &[&str],
    one_term_each: bool,
) -> Result<WriterReport> {
    let writes: Vec<&AuditedWrite> = writes.iter().filter(|w| w.received >= since).collect();
    let holders: Vec<(Timestamp, String)> = writes
        .iter()
        .filter(|w| w.is_lease() && w.succeeded())
        .filter(|w| w.namespace.as_deref() == Some(namespace) && w.name.as_deref() == Some(lease))
        .filter_map(|w| Some((w.received, w.lease_holder.clone()?)))
        .collect();
    let ours: Vec<(&str, &AuditedWrite)> = writes
        .iter()
        .copied()
        .filter(|w| w.succeeded() && !w.is_lease() && w.stores_state())
        .filter_map(|w| w.operator_identity().filter(|id| replicas.contains(id)).map(|id| (id, w)))
        .collect();
    for (identity, write) in &ours {
        let holder = holders.iter().take_while(|(at, _)| *at <= write.received).last().map(|(_, h)| h.as_str());
        if holder != Some(*identity) {
            bail!(
                "{identity} wrote {} {}/{} at {} while the Lease named {:?}\nLease holders: {holders:?}",
                write.verb,
                write.namespace.as_deref().unwrap_or("-"),
                write.name.as_deref().unwrap_or("-"),
                write.received,
                holder.unwrap_or("nobody")
            );
        }
    }
    let mut intervals: Vec<WriterInterval> = Vec::new();
    for (identity, write) in &ours {
        match intervals.iter_mut().find(|i| i.identity == *identity) {
            Some(interval) => {
                interval.last = write.received;
                interval.writes += 1;
            }
            None => intervals.push(WriterInterval {
                identity: (*identity).to_owned(),
                first: write.received,
                last: write.received,
                writes: 1,
            }),
        }
    }
    if one_term_each {
        for a in &intervals {
            for b in intervals.iter().filter(|b| b.identity != a.identity) {
                if a.first <= b.last && b.first <= a.last {
                    bail!("the writes of {} and {} overlap in time: {a:?} and {b:?}", a.identity, b.identity);
                }
            }
        }
    }
    Ok(WriterReport { intervals, holders })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(second: i64, agent: &str, resource: &str, holder: Option<&str>) -> AuditedWrite {
        AuditedWrite {
            received: Timestamp::from_second(second).unwrap_or_default(),
            user_agent: agent.into(),
            verb: "update".into(),
            resource: Some(resource.into()),
            namespace: Some("ns".into()),
            name: Some(if resource == "leases" { "lease" } else { "cm" }.into()),
            code: 200,
            lease_holder: holder.map(str::to_owned),
        }
    }

    const A: &str = "example-operator/0.1.0 (a)";
    const B: &str = "example-operator/0.1.0 (b)";

    #[test]
    fn identities_come_from_the_user_agent() {
        assert_eq!(write(1, A, "configmaps", None).operator_identity(), Some("a"));
        assert_eq!(write(1, "kubectl/v1.37.2", "configmaps", None).operator_identity(), None);
    }

    #[test]
    fn handovers_pass_and_a_write_outside_the_writers_term_fails() -> Result<()> {
        let log = vec![
            write(1, A, "leases", Some("a")),
            write(2, A, "configmaps", None),
            write(3, B, "leases", Some("b")),
            write(4, B, "configmaps", None),
        ];
        let report = one_writer_at_a_time(&log, Timestamp::UNIX_EPOCH, "ns", "lease", &["a", "b"], true)?;
        assert_eq!(report.writes_of("a"), 1);
        assert_eq!(report.writes_of("b"), 1);

        let mut late = log.clone();
        late.push(write(5, A, "configmaps", None));
        let error = one_writer_at_a_time(&late, Timestamp::UNIX_EPOCH, "ns", "lease", &["a", "b"], false)
            .err()
            .map(|e| e.to_string());
        assert!(error.is_some_and(|e| e.contains("a wrote update ns/cm") && e.contains("named \"b\"")));
        Ok(())
    }

    #[test]
    fn a_standby_checking_a_metrics_caller_stores_nothing() -> Result<()> {
        let log = vec![
            write(1, A, "leases", Some("a")),
            write(2, B, "tokenreviews", None),
            write(3, B, "subjectaccessreviews", None),
            write(4, A, "configmaps", None),
        ];
        let report = one_writer_at_a_time(&log, Timestamp::UNIX_EPOCH, "ns", "lease", &["a", "b"], true)?;
        assert_eq!(report.writes_of("b"), 0);
        let mut stored = log.clone();
        stored.push(write(5, B, "configmaps", None));
        assert!(one_writer_at_a_time(&stored, Timestamp::UNIX_EPOCH, "ns", "lease", &["a", "b"], true).is_err());
        Ok(())
    }

    #[test]
    fn writes_before_the_test_are_not_its_business() -> Result<()> {
        let log =
            vec![write(1, A, "configmaps", None), write(2, A, "leases", Some("a")), write(3, A, "configmaps", None)];
        assert!(one_writer_at_a_time(&log, Timestamp::UNIX_EPOCH, "ns", "lease", &["a"], true).is_err());
        let since = Timestamp::from_second(2).unwrap_or_default();
        assert_eq!(one_writer_at_a_time(&log, since, "ns", "lease", &["a"], true)?.writes_of("a"), 1);
        Ok(())
    }

    #[test]
    fn overlapping_intervals_fail_the_one_term_check() -> Result<()> {
        let log = vec![
            write(1, A, "leases", Some("a")),
            write(2, A, "configmaps", None),
            write(3, B, "leases", Some("b")),
            write(4, B, "configmaps", None),
            write(5, A, "leases", Some("a")),
            write(6, A, "configmaps", None),
        ];
        assert!(
            one_writer_at_a_time(&log, Timestamp::UNIX_EPOCH, "ns", "lease", &["a", "b"], false).is_ok(),
            "two terms of a"
        );
        assert!(one_writer_at_a_time(&log, Timestamp::UNIX_EPOCH, "ns", "lease", &["a", "b"], true).is_err());
        Ok(())
    }
}
