//! Leader election on a coordination.k8s.io/v1 Lease with kube-leader-election.
//!
//! This module decides when this replica may write: only after it holds the Lease AND has
//! confirmed it (the crate patches without a resourceVersion, so two racing candidates can both
//! be told "acquired"), and never after it fails to renew within the renew deadline or sees
//! another holder. Since renew deadline < lease duration, it stops before anyone else may take over.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::jiff;
use kube::Client;
use kube::api::Api;
use kube_leader_election::{LeaseLock, LeaseLockParams, LeaseLockResult};
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

/// How leading ended.
#[derive(Debug, PartialEq, Eq)]
pub enum LeadershipEnd {
    /// Shutdown was requested while leading; the lease is still ours to release.
    Shutdown,
    /// This replica can no longer be sure it leads; the reason says why.
    Lost(String),
}

/// Campaigns for, confirms, renews and releases one Lease.
pub struct Elector {
    lock: LeaseLock,
    leases: Api<Lease>,
    config: ElectionConfig,
    namespace: String,
    metrics: LeaderMetrics,
    health: Arc<Health>,
}

fn holder(lease: &Lease) -> Option<&str> {
    lease.spec.as_ref().and_then(|s| s.holder_identity.as_deref())
}

fn acquire_time(lease: &Lease) -> Option<jiff::Timestamp> {
    lease.spec.as_ref().and_then(|s| s.acquire_time.as_ref()).map(|t| t.0)
}

impl Elector {
    /// An elector for `config`'s Lease in `namespace`.
    pub fn new(
        client: Client,
        namespace: &str,
        config: ElectionConfig,
        metrics: LeaderMetrics,
        health: Arc<Health>,
    ) -> Self {
        let lock = LeaseLock::new(
            client.clone(),
            namespace,
            LeaseLockParams {
                lease_name: config.lease_name.clone(),
                holder_id: config.identity.clone(),
                lease_ttl: config.lease_duration,
            },
        );
        metrics.master_status.with_label_values(&[config.lease_name.as_str()]).set(0);
        Self {
            lock,
            leases: Api::namespaced(client, namespace),
            config,
            namespace: namespace.to_owned(),
            metrics,
            health,
        }
    }

    fn is_me(&self, lease: &Lease) -> bool {
        holder(lease) == Some(self.config.identity.as_str())
    }

    fn set_leading(&self, leading: bool) {
        self.health.set_leading(leading);
        self.metrics.master_status.with_label_values(&[self.config.lease_name.as_str()]).set(i64::from(leading));
    }

    fn renewed(&self) {
        self.health.heartbeat();
        self.metrics.last_renew.set(jiff::Timestamp::now().as_millisecond() as f64 / 1000.0);
    }

    /// Acquisition retries wait the retry period plus up to 20% jitter, as client-go does, so
    /// candidates started together spread out.
    fn jittered_retry(&self) -> Duration {
        self.config.retry_period.mul_f64(1.0 + rand::random_range(0.0..0.2))
    }

    /// Campaigns until this replica holds and has confirmed the Lease. Returns when it does the
    /// instant of the acquisition (the renew deadline counts from there), or `None` on shutdown.
    pub async fn acquire(&self, shutdown: &CancellationToken) -> Option<Instant> {
        tracing::info!(lease = %self.config.lease_name, namespace = %self.namespace, identity = %self.config.identity, "campaigning for leadership");
        let mut observed_leader: Option<String> = None;
        loop {
            self.health.heartbeat();
            let attempt = Instant::now();
            match tokio::time::timeout(self.config.renew_deadline, self.lock.try_acquire_or_renew()).await {
                Ok(Ok(LeaseLockResult::Acquired(lease))) if self.is_me(&lease) => {
                    match self.confirm(&lease, shutdown).await {
                        None => return None,
                        Some(false) => {}
                        Some(true) => {
                            self.renewed();
                            self.set_leading(true);
                            self.metrics.transitions.inc();
                            tracing::info!(lease = %self.config.lease_name, identity = %self.config.identity, "became leader");
                            return Some(attempt);
                        }
                    }
                }
                Ok(Ok(result)) => {
                    let leader = result.lease().and_then(holder).map(str::to_owned);
                    if leader != observed_leader {
                        tracing::info!(leader = leader.as_deref().unwrap_or(""), "another replica leads");
                        observed_leader = leader;
                    }
                }
                Ok(Err(error)) => tracing::warn!(%error, "leader election attempt failed"),
                Err(_) => tracing::warn!(timeout = ?self.config.renew_deadline, "leader election attempt timed out"),
            }
            tokio::select! {
                () = shutdown.cancelled() => return None,
                () = tokio::time::sleep(self.jittered_retry()) => {}
            }
        }
    }

    /// After being told "acquired", waits a moment for any racing candidate's write to land and
    /// re-reads the Lease: we lead only if it still names us with the acquire time we wrote.
    /// `None` on shutdown.
    async fn confirm(&self, ours: &Lease, shutdown: &CancellationToken) -> Option<bool> {
        let settle = (self.config.retry_period / 2).min(Duration::from_secs(1));
        tokio::select! {
            () = shutdown.cancelled() => return None,
            () = tokio::time::sleep(settle) => {}
        }
        match self.leases.get(&self.config.lease_name).await {
            Ok(current) if self.is_me(&current) && acquire_time(&current) == acquire_time(ours) => Some(true),
            Ok(current) => {
                tracing::info!(leader = holder(&current).unwrap_or(""), "lost the race for the lease");
                Some(false)
            }
            Err(error) => {
                tracing::warn!(%error, "could not confirm the lease");
                Some(false)
            }
        }
    }

    /// Renews every retry period while leading. Returns as soon as this replica can no longer be
    /// sure it leads (no successful renewal within the renew deadline, or another holder), or on
    /// shutdown.
    pub async fn hold(&self, acquired_at: Instant, shutdown: &CancellationToken) -> LeadershipEnd {
        let mut last_renew = acquired_at;
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return LeadershipEnd::Shutdown,
                () = tokio::time::sleep(self.config.retry_period) => {}
            }
            self.health.heartbeat();
            let deadline = last_renew + self.config.renew_deadline;
            let attempt = Instant::now();
            match tokio::time::timeout_at(deadline, self.lock.try_acquire_or_renew()).await {
                Err(_) => {
                    return self.lost(format!(
                        "could not renew the lease within the renew deadline of {:?}",
                        self.config.renew_deadline
                    ));
                }
                Ok(Ok(LeaseLockResult::Acquired(lease))) if self.is_me(&lease) => {
                    last_renew = attempt;
                    self.renewed();
                }
                Ok(Ok(result)) => {
                    let leader = result.lease().and_then(holder).unwrap_or("").to_owned();
                    return self.lost(format!("the lease is now held by {leader:?}"));
                }
                Ok(Err(error)) => {
                    tracing::warn!(%error, "renewing the lease failed; retrying until the renew deadline");
                    if Instant::now() >= deadline {
                        return self.lost(format!("could not renew the lease within the renew deadline: {error}"));
                    }
                }
            }
        }
    }

    fn lost(&self, reason: String) -> LeadershipEnd {
        self.set_leading(false);
        tracing::error!(%reason, "stopped leading");
        LeadershipEnd::Lost(reason)
    }

    /// Releases the Lease so a standby takes over within about a second instead of a lease
    /// duration. Call only after the controllers stopped.
    pub async fn step_down(&self) {
        self.set_leading(false);
        match tokio::time::timeout(self.config.renew_deadline, self.lock.step_down()).await {
            Ok(Ok(())) => tracing::info!(lease = %self.config.lease_name, "released the lease"),
            Ok(Err(error)) => tracing::warn!(%error, "releasing the lease failed; it expires on its own"),
            Err(_) => tracing::warn!("releasing the lease timed out; it expires on its own"),
        }
    }

    /// Marks this replica as not leading (after a loss handled by the caller).
    pub fn mark_not_leading(&self) {
        self.set_leading(false);
    }
}
