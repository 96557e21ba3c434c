//! Leader election on a coordination.k8s.io/v1 Lease, with client-go's guarantees.
//!
//! This module owns the Lease and decides when this replica may write anything else: from a
//! successful acquisition until it fails to renew within the renew deadline. Every write that can
//! change the holder carries the resourceVersion this replica read (a 409 means another replica
//! won), and a Lease counts as expired only after this replica has seen the same record unchanged
//! for the lease duration by its own monotonic clock, so clock skew between replicas never lets a
//! standby take a live Lease. It writes nothing but the one Lease.
//!
//! kube-leader-election's `LeaseLock` cannot give these guarantees (its takeover and release are
//! merge patches without a resourceVersion, and it judges expiry by comparing its wall clock with
//! the holder's `renewTime`), so the operator reads and writes the Lease itself; see README.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff;
use kube::Client;
use kube::api::{Api, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use prometheus::{Gauge, IntCounter, IntGaugeVec, Opts, Registry};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::ElectionConfig;
use crate::health::Health;

/// Leader metrics, named as client-go's where it has them.
#[derive(Clone, Debug)]
pub struct LeaderMetrics {
    /// `leader_election_master_status{name}`: 1 while this replica leads.
    pub master_status: IntGaugeVec,
    /// `example_operator_leader_transitions_total`: times this replica became leader.
    pub transitions: IntCounter,
    /// `example_operator_leader_last_renew_timestamp_seconds`: last successful renewal (Unix time).
    pub last_renew: Gauge,
}

impl LeaderMetrics {
    /// Registers the leader metrics in `registry`.
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let master_status = IntGaugeVec::new(
            Opts::new(
                "leader_election_master_status",
                "Gauge of if the reporting system is master of the relevant lease, 0 indicates backup, 1 indicates master. 'name' is the string used to identify the lease.",
            ),
            &["name"],
        )?;
        let transitions =
            IntCounter::new("example_operator_leader_transitions_total", "Times this replica became the leader")?;
        let last_renew = Gauge::new(
            "example_operator_leader_last_renew_timestamp_seconds",
            "Unix time of this replica's last successful lease acquisition or renewal",
        )?;
        registry.register(Box::new(master_status.clone()))?;
        registry.register(Box::new(transitions.clone()))?;
        registry.register(Box::new(last_renew.clone()))?;
        Ok(Self { master_status, transitions, last_renew })
    }
}

/// How far this replica's writes may go: the send time of its last successful renewal plus the
/// renew deadline, the moment it would stop leading without another renewal. A successor can
/// take over one lease duration after that renewal at the earliest (a standby counts from when it
/// saw it, which is later), so a write given up here has lease duration − renew deadline left to
/// clear the wire. `None` outside a term. The controllers' client bounds every write by it and
/// reports the writes it gave up unanswered ([`crate::client`]): their bytes may still be on their
/// way to the API server, so a term that gave one up less than a lease duration ago is not ended
/// early by a release.
#[derive(Debug, Default)]
pub struct TermDeadline {
    deadline: Mutex<Option<Instant>>,
    last_abandoned: Mutex<Option<Instant>>,
}

fn locked<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl TermDeadline {
    /// Sets the deadline; a term that starts (from `None`) starts with no abandoned write.
    fn set(&self, deadline: Option<Instant>) {
        let mut current = locked(&self.deadline);
        if current.is_none() && deadline.is_some() {
            *locked(&self.last_abandoned) = None;
        }
        *current = deadline;
    }

    /// Records a write of this term given up before its answer came (timed out, failed on its
    /// connection, or dropped when its reconcile was cancelled or aborted).
    pub fn abandoned_write(&self) {
        *locked(&self.last_abandoned) = Some(Instant::now());
    }

    /// When the current (or last) term last gave up a write unanswered.
    pub fn last_abandoned_write(&self) -> Option<Instant> {
        *locked(&self.last_abandoned)
    }

    /// Sets the deadline, for tests of what it bounds.
    #[cfg(test)]
    pub fn set_for_test(&self, deadline: Option<Instant>) {
        self.set(deadline);
    }

    /// The deadline, while this replica leads.
    pub fn get(&self) -> Option<Instant> {
        *locked(&self.deadline)
    }
}

/// Why this replica stopped leading.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum LeadershipLost {
    /// No renewal succeeded within the renew deadline: another replica may take over soon.
    #[error("could not renew the lease within the renew deadline of {0:?}")]
    RenewDeadline(Duration),
    /// Another replica holds the Lease.
    #[error("the lease is now held by {0:?}")]
    HeldBy(String),
}

/// The result of one attempt to acquire or renew.
#[derive(Debug, PartialEq, Eq)]
enum Attempt {
    /// This replica holds the Lease; the instant is when the successful write was sent.
    Leading(Instant),
    /// Another replica holds a Lease that has not expired by this replica's clock.
    HeldBy(String),
    /// Another writer changed the Lease since it was read (409): nothing was written.
    Conflict,
    /// The Lease is gone, and the last record this replica saw (or, having seen none, its first
    /// look) is not yet a lease duration old by its own clock: its holder may still lead and
    /// re-create it, so nothing was written.
    Vanished,
}

/// What this replica last saw of the Lease, and when by its own clock the record last changed.
#[derive(Clone, Debug)]
struct Observed {
    lease: Lease,
    changed_at: Instant,
}

/// Campaigns for, renews and releases one Lease.
pub struct Elector {
    leases: Api<Lease>,
    config: ElectionConfig,
    namespace: String,
    metrics: LeaderMetrics,
    health: Arc<Health>,
    state: Mutex<ElectorState>,
    term: Arc<TermDeadline>,
}

#[derive(Debug, Default)]
struct ElectorState {
    /// The last record seen, kept when the Lease is deleted: a deletion is not a release.
    observed: Option<Observed>,
    /// When this replica, having seen no record at all, first found no Lease.
    absent_since: Option<Instant>,
    /// When this replica's last successful acquisition or renewal was sent, while it leads.
    last_renew: Option<Instant>,
}

fn spec(lease: &Lease) -> LeaseSpec {
    lease.spec.clone().unwrap_or_default()
}

fn holder(lease: &Lease) -> &str {
    lease.spec.as_ref().and_then(|s| s.holder_identity.as_deref()).unwrap_or_default()
}

fn now_micro() -> MicroTime {
    MicroTime(jiff::Timestamp::now())
}

fn is_conflict(error: &kube::Error) -> bool {
    matches!(error, kube::Error::Api(status) if status.code == 409)
}

fn is_not_found(error: &kube::Error) -> bool {
    matches!(error, kube::Error::Api(status) if status.code == 404)
}

impl Elector {
    /// An elector for `config`'s Lease in `namespace`, reading and writing through `client`
    /// (the election's own client, see [`crate::client`]).
    pub fn new(
        client: Client,
        namespace: &str,
        config: ElectionConfig,
        metrics: LeaderMetrics,
        health: Arc<Health>,
    ) -> Self {
        metrics.master_status.with_label_values(&[config.lease_name.as_str()]).set(0);
        Self {
            leases: Api::namespaced(client, namespace),
            config,
            namespace: namespace.to_owned(),
            metrics,
            health,
            state: Mutex::default(),
            term: Arc::default(),
        }
    }

    /// Publishes the end of each term in `term` (see [`TermDeadline`]).
    pub fn with_term_deadline(mut self, term: Arc<TermDeadline>) -> Self {
        self.term = term;
        self
    }

    fn state(&self) -> std::sync::MutexGuard<'_, ElectorState> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn lease_seconds(&self) -> i32 {
        i32::try_from(self.config.lease_duration.as_secs()).unwrap_or(i32::MAX)
    }

    /// Records `lease` as seen now; the expiry clock restarts only when the record changed.
    fn observe(&self, lease: &Lease, now: Instant) {
        let mut state = self.state();
        let changed = state.observed.as_ref().is_none_or(|seen| seen.lease.spec != lease.spec);
        let changed_at = match &state.observed {
            Some(seen) if !changed => seen.changed_at,
            _ => now,
        };
        state.observed = Some(Observed { lease: lease.clone(), changed_at });
    }

    /// Another writer changed the Lease since this replica read it (a 409): the record it holds is
    /// stale, so it counts as changed now, whoever it names.
    fn changed_unseen(&self) {
        if let Some(seen) = self.state().observed.as_mut() {
            seen.changed_at = Instant::now();
        }
    }

    /// When this replica may create a missing Lease: one lease duration after the last change of
    /// the record it saw, whoever that record named (a released record may have been taken by a
    /// replica whose takeover this one did not see), or after it first found none.
    fn free_after_deletion(&self) -> Option<Instant> {
        let state = self.state();
        let since = state.observed.as_ref().map(|seen| seen.changed_at).or(state.absent_since)?;
        Some(since + self.config.lease_duration)
    }

    /// When the observed Lease expires by this replica's clock; `None` when it is free.
    fn expiry(&self) -> Option<Instant> {
        let state = self.state();
        let seen = state.observed.as_ref()?;
        if holder(&seen.lease).is_empty() {
            return None;
        }
        let seconds = seen.lease.spec.as_ref().and_then(|s| s.lease_duration_seconds).unwrap_or(self.lease_seconds());
        Some(seen.changed_at + Duration::from_secs(u64::try_from(seconds.max(1)).unwrap_or(1)))
    }

    /// The Lease as this replica last wrote it, while it holds it.
    fn own_lease(&self) -> Option<Lease> {
        let state = self.state();
        state.last_renew?;
        state.observed.as_ref().filter(|seen| holder(&seen.lease) == self.config.identity).map(|s| s.lease.clone())
    }

    /// One step of client-go's `tryAcquireOrRenew`: renew what this replica holds, take over a
    /// free or expired Lease, or report who holds it. Every write is conditional.
    async fn try_acquire_or_renew(&self) -> Result<Attempt, kube::Error> {
        // Leading: renew with the resourceVersion of our own last write, without a read.
        if let Some(mut lease) = self.own_lease() {
            let sent = Instant::now();
            let mut spec = spec(&lease);
            spec.renew_time = Some(now_micro());
            spec.lease_duration_seconds = Some(self.lease_seconds());
            lease.spec = Some(spec);
            match self.leases.replace(&self.config.lease_name, &PostParams::default(), &lease).await {
                Ok(written) => {
                    self.observe(&written, Instant::now());
                    return Ok(Attempt::Leading(sent));
                }
                // Someone else wrote the Lease, or deleted it: read it and decide.
                Err(error) if is_conflict(&error) || is_not_found(&error) => {}
                Err(error) => return Err(error),
            }
        }
        let Some(current) = self.leases.get_opt(&self.config.lease_name).await? else {
            return self.create_if_free().await;
        };
        let now = Instant::now();
        self.observe(&current, now);
        let current_holder = holder(&current).to_owned();
        let ours = current_holder == self.config.identity;
        if !ours && !current_holder.is_empty() && self.expiry().is_some_and(|expiry| now < expiry) {
            return Ok(Attempt::HeldBy(current_holder));
        }
        let mut spec = spec(&current);
        let now_time = now_micro();
        if !ours {
            spec.holder_identity = Some(self.config.identity.clone());
            spec.acquire_time = Some(now_time.clone());
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        spec.renew_time = Some(now_time);
        spec.lease_duration_seconds = Some(self.lease_seconds());
        let mut desired = current.clone();
        desired.spec = Some(spec);
        // `current` carries the resourceVersion read above: a racing writer makes this a 409.
        let sent = Instant::now();
        match self.leases.replace(&self.config.lease_name, &PostParams::default(), &desired).await {
            Ok(written) => {
                self.observe(&written, Instant::now());
                Ok(Attempt::Leading(sent))
            }
            Err(error) if is_conflict(&error) => {
                self.changed_unseen();
                Ok(Attempt::Conflict)
            }
            Err(error) => Err(error),
        }
    }

    /// No Lease exists. A leader re-creates its own at once, so a deletion never interrupts its
    /// term. A candidate treats a deletion like an unchanged record: it creates the Lease only
    /// once the last record it saw expired by its own clock, as if the Lease were still there
    /// unrenewed; having seen no record at all, it waits one lease duration from its first look
    /// (a leader whose Lease was deleted just before has re-created it by then).
    async fn create_if_free(&self) -> Result<Attempt, kube::Error> {
        let now = Instant::now();
        let leading = {
            let mut state = self.state();
            if state.observed.is_none() && state.absent_since.is_none() {
                state.absent_since = Some(now);
            }
            state.last_renew.is_some()
        };
        if !leading && self.free_after_deletion().is_some_and(|free| now < free) {
            return Ok(Attempt::Vanished);
        }
        match self.create().await? {
            // Leading, and the create met an existing Lease: read who holds it. Another holder
            // can only have created it after this replica's record expired for them: stop at
            // once. This replica's own (an earlier create that landed unanswered) or an empty
            // one: renew or take it at the next attempt.
            Attempt::Conflict if leading => match self.leases.get_opt(&self.config.lease_name).await? {
                Some(current) => {
                    self.observe(&current, Instant::now());
                    let current_holder = holder(&current);
                    if current_holder.is_empty() || current_holder == self.config.identity {
                        Ok(Attempt::Conflict)
                    } else {
                        Ok(Attempt::HeldBy(current_holder.to_owned()))
                    }
                }
                None => Ok(Attempt::Conflict),
            },
            attempt => Ok(attempt),
        }
    }

    /// Creates the Lease naming this replica; a 409 means another replica created it first.
    async fn create(&self) -> Result<Attempt, kube::Error> {
        let now = now_micro();
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(self.config.lease_name.clone()),
                namespace: Some(self.namespace.clone()),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(self.config.identity.clone()),
                lease_duration_seconds: Some(self.lease_seconds()),
                acquire_time: Some(now.clone()),
                renew_time: Some(now),
                lease_transitions: Some(0),
                ..LeaseSpec::default()
            }),
        };
        let sent = Instant::now();
        match self.leases.create(&PostParams::default(), &lease).await {
            Ok(created) => {
                self.observe(&created, Instant::now());
                Ok(Attempt::Leading(sent))
            }
            Err(error) if is_conflict(&error) => Ok(Attempt::Conflict),
            Err(error) => Err(error),
        }
    }

    /// One attempt bounded by the election request timeout and by `deadline`.
    async fn attempt(&self, deadline: Option<Instant>) -> Result<Attempt, String> {
        let limit = Instant::now() + self.config.request_timeout;
        let limit = deadline.map_or(limit, |deadline| deadline.min(limit));
        match tokio::time::timeout_at(limit, self.try_acquire_or_renew()).await {
            Ok(Ok(attempt)) => Ok(attempt),
            Ok(Err(error)) => Err(error.to_string()),
            Err(_) => Err(format!("no answer within {:?}", limit.saturating_duration_since(Instant::now()))),
        }
    }

    fn set_leading(&self, leading: bool) {
        self.health.set_leading(leading);
        self.metrics.master_status.with_label_values(&[self.config.lease_name.as_str()]).set(i64::from(leading));
    }

    fn renewed(&self, sent: Instant) {
        self.state().last_renew = Some(sent);
        self.term.set(Some(sent + self.config.renew_deadline));
        self.health.heartbeat();
        self.metrics.last_renew.set(jiff::Timestamp::now().as_millisecond() as f64 / 1000.0);
    }

    /// Acquisition retries wait the retry period plus up to 20% jitter, as client-go does, so
    /// candidates started together spread out.
    fn jittered_retry(&self) -> Duration {
        self.config.retry_period.mul_f64(1.0 + rand::random_range(0.0..0.2))
    }

    /// Campaigns until this replica holds the Lease, or until `shutdown` (`false`). Between
    /// attempts it watches the Lease, so it notices a release at once and tries again the moment
    /// the record it saw expires by its own clock, without waiting for its next poll.
    pub async fn acquire(&self, shutdown: &CancellationToken) -> bool {
        tracing::info!(lease = %self.config.lease_name, namespace = %self.namespace, identity = %self.config.identity, "campaigning for leadership");
        let selector = format!("metadata.name={}", self.config.lease_name);
        let watch = watcher(self.leases.clone(), watcher::Config::default().fields(&selector)).default_backoff().fuse();
        let mut watch = std::pin::pin!(watch);
        let mut reported_holder: Option<String> = None;
        loop {
            self.health.heartbeat();
            match self.attempt(None).await {
                Ok(Attempt::Leading(sent)) => {
                    self.renewed(sent);
                    self.set_leading(true);
                    self.metrics.transitions.inc();
                    tracing::info!(lease = %self.config.lease_name, identity = %self.config.identity, "became leader");
                    return true;
                }
                Ok(Attempt::HeldBy(leader)) => {
                    if reported_holder.as_deref() != Some(leader.as_str()) {
                        tracing::info!(%leader, "another replica leads");
                        reported_holder = Some(leader);
                    }
                }
                Ok(Attempt::Conflict) => tracing::info!("another replica wrote the lease first"),
                Ok(Attempt::Vanished) => {
                    if reported_holder.as_deref() != Some("") {
                        tracing::info!("the lease is gone; waiting out the last record seen before creating it");
                        reported_holder = Some(String::new());
                    }
                }
                Err(error) => tracing::warn!(%error, "leader election attempt failed"),
            }
            let next_poll = Instant::now() + self.jittered_retry();
            let wake_at = self.expiry().map_or(next_poll, |expiry| expiry.min(next_poll));
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => return false,
                    () = tokio::time::sleep_until(wake_at) => break,
                    event = watch.next() => match event {
                        Some(Ok(watcher::Event::Apply(lease) | watcher::Event::InitApply(lease))) => {
                            self.observe(&lease, Instant::now());
                            if holder(&lease).is_empty() {
                                break;
                            }
                        }
                        // A deletion is not a release: the record seen last stays, and its expiry
                        // still decides when this replica may create a new Lease.
                        Some(Ok(watcher::Event::Delete(_))) => break,
                        Some(Ok(_)) => {}
                        Some(Err(error)) => tracing::debug!(%error, "watching the lease failed; polling meanwhile"),
                        None => {
                            tokio::time::sleep_until(wake_at).await;
                            break;
                        }
                    },
                }
            }
        }
    }

    /// Renews every retry period until `stop` fires (between attempts, never during one), or
    /// until this replica can no longer be sure it leads: no renewal succeeded within the renew
    /// deadline, or another replica holds the Lease.
    pub async fn keep_renewing(&self, stop: &CancellationToken) -> Result<(), LeadershipLost> {
        let mut last_renew = self.state().last_renew.unwrap_or_else(Instant::now);
        loop {
            let deadline = last_renew + self.config.renew_deadline;
            let next = (Instant::now() + self.config.retry_period).min(deadline);
            tokio::select! {
                () = stop.cancelled() => return Ok(()),
                () = tokio::time::sleep_until(next) => {}
            }
            self.health.heartbeat();
            if Instant::now() >= deadline {
                return Err(self.lost(LeadershipLost::RenewDeadline(self.config.renew_deadline)));
            }
            match self.attempt(Some(deadline)).await {
                Ok(Attempt::Leading(sent)) => {
                    last_renew = sent;
                    self.renewed(sent);
                }
                Ok(Attempt::HeldBy(leader)) => return Err(self.lost(LeadershipLost::HeldBy(leader))),
                Ok(Attempt::Conflict | Attempt::Vanished) => {
                    tracing::warn!("renewing the lease met a concurrent write; reading it again")
                }
                Err(error) => tracing::warn!(%error, "renewing the lease failed; retrying until the renew deadline"),
            }
        }
    }

    fn lost(&self, reason: LeadershipLost) -> LeadershipLost {
        self.state().last_renew = None;
        self.term.set(None);
        self.set_leading(false);
        tracing::error!(%reason, "stopped leading");
        reason
    }

    /// Releases the Lease so a standby takes over at once instead of after a lease duration.
    /// Only while this replica still holds it (renewed within the renew deadline), and only if
    /// nobody wrote the Lease since (the write carries our last resourceVersion), and never when
    /// the term gave up a write unanswered less than a lease duration ago (it may still land):
    /// then the Lease expires on its own. Call after the controllers stopped and
    /// [`Elector::keep_renewing`] returned.
    pub async fn release(&self) {
        let last_renew = self.state().last_renew.take();
        let abandoned = self.term.last_abandoned_write();
        self.term.set(None);
        self.set_leading(false);
        // Waiting for the expiry gives such a write at least a lease duration more to land under
        // this term; one given up longer ago has had that already.
        if let Some(at) = abandoned.filter(|at| at.elapsed() < self.config.lease_duration) {
            tracing::warn!(
                given_up_ago = ?at.elapsed(),
                "not releasing the lease: a write of this term was given up unanswered and may still be on its way; it expires on its own"
            );
            return;
        }
        let Some(deadline) = last_renew.map(|at| at + self.config.renew_deadline) else {
            tracing::info!("not releasing the lease: this replica does not hold it");
            return;
        };
        let Some(mut lease) = self.state().observed.as_ref().map(|seen| seen.lease.clone()) else { return };
        if Instant::now() >= deadline || holder(&lease) != self.config.identity {
            tracing::warn!("not releasing the lease: it was not renewed within the renew deadline");
            return;
        }
        let now = now_micro();
        let mut spec = spec(&lease);
        spec.holder_identity = Some(String::new());
        spec.lease_duration_seconds = Some(1);
        spec.acquire_time = Some(now.clone());
        spec.renew_time = Some(now);
        lease.spec = Some(spec);
        let limit = deadline.min(Instant::now() + self.config.request_timeout);
        let params = PostParams::default();
        let release = self.leases.replace(&self.config.lease_name, &params, &lease);
        match tokio::time::timeout_at(limit, release).await {
            Ok(Ok(_)) => tracing::info!(lease = %self.config.lease_name, "released the lease"),
            Ok(Err(error)) if is_conflict(&error) => {
                tracing::warn!("not released: the lease changed since this replica last wrote it")
            }
            Ok(Err(error)) => tracing::warn!(%error, "releasing the lease failed; it expires on its own"),
            Err(_) => tracing::warn!("releasing the lease timed out; it expires on its own"),
        }
    }

    /// Marks this replica as not leading (after a loss handled by the caller).
    pub fn mark_not_leading(&self) {
        self.state().last_renew = None;
        self.term.set(None);
        self.set_leading(false);
    }
}

#[cfg(test)]
pub(crate) mod fake;
#[cfg(test)]
mod tests;
