//! Liveness and readiness state shared by the election loop and the HTTP probes.
//!
//! Liveness means the process and its election loop are alive: the loop must report a heartbeat
//! at least every retry period, so a wedged loop makes `/healthz` fail and the kubelet restarts
//! the pod. A standby replica is live and ready.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// One named check and its outcome.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckResult {
    pub name: &'static str,
    /// `None` when the check passed; the reason otherwise.
    pub failure: Option<String>,
}

/// Shared health state.
#[derive(Debug)]
pub struct Health {
    started: Instant,
    /// Milliseconds since `started` of the election loop's last heartbeat.
    heartbeat_millis: AtomicU64,
    leading: AtomicBool,
    /// A heartbeat older than this means the election loop is wedged; `None` without election.
    stale_after: Option<Duration>,
    /// The caches that have not synced, with why (set once the caches exist).
    unsynced: std::sync::OnceLock<CacheCheck>,
}

/// Names the caches that have not synced.
struct CacheCheck(Box<dyn Fn() -> Vec<String> + Send + Sync>);

impl std::fmt::Debug for CacheCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CacheCheck")
    }
}

impl Health {
    /// Health of a process whose election loop beats at least every `stale_after`
    /// (`None`: no election loop, the check always passes).
    pub fn new(stale_after: Option<Duration>) -> Self {
        Self {
            started: Instant::now(),
            heartbeat_millis: AtomicU64::new(0),
            leading: AtomicBool::new(false),
            stale_after,
            unsynced: std::sync::OnceLock::new(),
        }
    }

    /// Installs the check of the caches: `unsynced` names those that have not synced.
    pub fn watch_caches(&self, unsynced: impl Fn() -> Vec<String> + Send + Sync + 'static) {
        let _ = self.unsynced.set(CacheCheck(Box::new(unsynced)));
    }

    /// On the leader, every cache must have synced: a controller waits for its caches, so one
    /// that cannot list (a missing CRD, RBAC that does not allow it) stops that controller. A
    /// standby is ready regardless; it only keeps its caches warm.
    fn caches_check(&self) -> CheckResult {
        let unsynced = match self.unsynced.get() {
            Some(check) if self.is_leading() => (check.0)(),
            _ => Vec::new(),
        };
        let failure = (!unsynced.is_empty()).then(|| format!("caches not synced: {}", unsynced.join("; ")));
        CheckResult { name: "caches", failure }
    }

    /// Called by the election loop on every iteration.
    pub fn heartbeat(&self) {
        let millis = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.heartbeat_millis.store(millis, Ordering::Relaxed);
    }

    /// Records whether this replica currently leads.
    pub fn set_leading(&self, leading: bool) {
        self.leading.store(leading, Ordering::Relaxed);
    }

    /// True while this replica leads (or runs without election).
    pub fn is_leading(&self) -> bool {
        self.leading.load(Ordering::Relaxed)
    }

    fn election_check(&self) -> CheckResult {
        let failure = self.stale_after.and_then(|stale_after| {
            let last = Duration::from_millis(self.heartbeat_millis.load(Ordering::Relaxed));
            let age = self.started.elapsed().saturating_sub(last);
            (age > stale_after).then(|| format!("election loop silent for {}s", age.as_secs()))
        });
        CheckResult { name: "leader-election", failure }
    }

    /// Checks behind `/healthz`.
    pub fn liveness(&self) -> Vec<CheckResult> {
        vec![CheckResult { name: "ping", failure: None }, self.election_check()]
    }

    /// Checks behind `/readyz`: a standby is ready unless its election loop is wedged; the
    /// leader also needs every cache synced.
    pub fn readiness(&self) -> Vec<CheckResult> {
        let mut checks = self.liveness();
        checks.push(self.caches_check());
        checks
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_silent_election_loop_fails_liveness() {
        let health = Health::new(Some(Duration::ZERO));
        std::thread::sleep(Duration::from_millis(5));
        let checks = health.liveness();
        assert_eq!(checks[0], CheckResult { name: "ping", failure: None });
        assert!(checks[1].failure.as_deref().is_some_and(|f| f.contains("election loop silent")));
    }

    #[test]
    fn the_leader_is_not_ready_while_a_cache_has_not_synced_and_a_standby_is() {
        let health = Health::new(None);
        health.watch_caches(|| vec!["namespaces: forbidden".to_owned()]);
        let failure =
            |health: &Health| health.readiness().into_iter().find(|c| c.name == "caches").and_then(|c| c.failure);
        assert_eq!(failure(&health), None, "a standby is ready");
        health.set_leading(true);
        assert_eq!(failure(&health).as_deref(), Some("caches not synced: namespaces: forbidden"));
        assert!(health.liveness().iter().all(|c| c.failure.is_none()), "and alive");
    }

    #[test]
    fn a_beating_election_loop_passes_and_no_election_always_passes() {
        let health = Health::new(Some(Duration::from_secs(60)));
        health.heartbeat();
        assert!(health.liveness().iter().all(|c| c.failure.is_none()));
        assert!(Health::new(None).readiness().iter().all(|c| c.failure.is_none()));
    }
}
