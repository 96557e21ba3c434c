//! The controllers of example-operator, one module per controller, and the mechanics they share.
//!
//! Reconcilers are level-triggered and idempotent: they compare the desired state with the shared
//! caches and write only the difference, so an in-sync cluster costs no writes. [`run`] is the
//! entry point; the binary calls it only while this replica holds the leader lease.

pub mod backoff;
pub mod conditions;
pub mod controller_context;
pub mod error;
pub mod events;
pub mod message_broadcast;
pub mod metrics;
pub mod my_resource;
pub mod owned_config_map;
pub mod queue;
pub mod registry;
pub mod runtime;
pub mod shared_cache;
pub mod tenancy;

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::time::Duration;

use futures::FutureExt;
use kube::Client;
use tokio_util::sync::CancellationToken;

pub use error::{Error, Result};
pub use metrics::Metrics;
pub use registry::{CONTROLLERS, Registration};

use registry::{Built, CacheSet, ControllerEnv};

/// controller-runtime's default SyncPeriod.
pub const DEFAULT_SYNC_PERIOD: Duration = Duration::from_secs(10 * 60 * 60);

/// What to run and how wide.
#[derive(Clone, Debug)]
pub struct Settings {
    /// The controllers to run, by name (see [`CONTROLLERS`]).
    pub controllers: BTreeSet<String>,
    /// Reconciles running at once, per controller name; a controller not named here runs its
    /// registration's default.
    pub concurrency: BTreeMap<String, u16>,
    /// This replica's name (the pod name), shown in the events it writes.
    pub instance: Option<String>,
    /// Watch and manage only this namespace (MessageBroadcasts then copy only into it);
    /// `None` manages the whole cluster.
    pub watch_namespace: Option<String>,
    /// A reconcile running longer than this is cancelled and retried with backoff.
    pub reconcile_timeout: Duration,
    /// How often every cached object is reconciled again without an event (controller-runtime's
    /// SyncPeriod, jittered ±10%); `None` never.
    pub sync_period: Option<Duration>,
    /// Where and how much resources may make the operator write.
    pub tenancy: std::sync::Arc<tenancy::Tenancy>,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            controllers: CONTROLLERS.iter().map(|r| r.name.to_owned()).collect(),
            concurrency: BTreeMap::new(),
            instance: None,
            watch_namespace: None,
            reconcile_timeout: Duration::from_secs(60),
            sync_period: Some(DEFAULT_SYNC_PERIOD),
            tenancy: std::sync::Arc::default(),
        }
    }
}

impl Settings {
    /// Only the controller `name`, with the other settings at their defaults.
    pub fn only(name: &str) -> Self {
        Self { controllers: [name.to_owned()].into(), ..Self::default() }
    }

    /// How many reconciles of `registration` run at once.
    pub fn concurrency_of(&self, registration: &Registration) -> u16 {
        self.concurrency.get(registration.name).copied().unwrap_or(registration.default_concurrency)
    }
}

/// The shared caches the selected controllers read: one watch and one cache per resource type
/// for the whole process. They run on every replica from the start, so a standby keeps them warm
/// and starts reconciling at once when it becomes leader. Caches only read; the controllers,
/// which write, run only while this replica leads ([`Caches::controllers`]).
pub struct Caches {
    controllers: Vec<(Built, u16)>,
    sync_period: Option<Duration>,
    states: std::sync::Arc<Vec<registry::SyncState>>,
}

impl Caches {
    /// The caches and controllers `settings` select, and the future that lists and watches the
    /// caches until `shutdown`.
    pub fn new(
        client: Client,
        settings: Settings,
        metrics: Metrics,
        shutdown: CancellationToken,
    ) -> (Self, impl Future<Output = ()> + Send + 'static) {
        let mut caches = CacheSet::new(client.clone(), settings.watch_namespace.clone(), metrics.clone());
        let env = ControllerEnv {
            client,
            metrics,
            instance: settings.instance.clone(),
            reconcile_timeout: settings.reconcile_timeout,
            scope: settings.watch_namespace.clone(),
            tenancy: settings.tenancy.clone(),
        };
        let controllers = CONTROLLERS
            .iter()
            .filter(|registration| settings.controllers.contains(registration.name))
            .map(|registration| ((registration.build)(&mut caches, &env), settings.concurrency_of(registration)))
            .collect();
        let states = std::sync::Arc::new(caches.states());
        (Self { controllers, sync_period: settings.sync_period, states }, caches.run(shutdown))
    }

    /// A check of the caches for readiness: the ones that have not synced, each with the reason
    /// (the watch's last API error), as `resource: reason`. A controller waits for its caches, so
    /// on the leader an unsynced cache means a controller that does not reconcile.
    pub fn unsynced(&self) -> impl Fn() -> Vec<String> + Send + Sync + 'static {
        let states = self.states.clone();
        move || {
            states
                .iter()
                .filter_map(|(resource, state)| state().err().map(|why| format!("{resource}: {why}")))
                .collect()
        }
    }

    /// The selected controllers over these caches: they subscribe now (replaying what the caches
    /// hold), start reconciling once every cache they read has synced, and run until `stop`
    /// fires; the future then resolves once their in-flight reconciles finished.
    pub fn controllers(&self, stop: CancellationToken) -> impl Future<Output = ()> + Send + 'static {
        let runs: Vec<_> = self
            .controllers
            .iter()
            .map(|(controller, concurrency)| controller.run(*concurrency, self.sync_period, stop.clone()))
            .collect();
        futures::future::join_all(runs).map(|_| ())
    }

    /// Ends a term once the future of [`Self::controllers`] finished or was aborted: aborts and
    /// awaits every write the term started in the background (events), so none lands after the
    /// Lease is released.
    pub fn end_term(&self) -> impl Future<Output = ()> + Send + 'static {
        futures::future::join_all(self.controllers.iter().map(|(controller, _)| controller.end_term())).map(|_| ())
    }
}

/// Runs the selected controllers over their shared caches until `shutdown` fires; returns once
/// every controller has finished its in-flight reconciles. (Without leader election; with it,
/// the binary runs the caches all along and the controllers only while leading.)
pub async fn run(client: Client, settings: Settings, metrics: Metrics, shutdown: CancellationToken) {
    let (caches, watching) = Caches::new(client, settings, metrics, shutdown.clone());
    futures::future::join(watching, caches.controllers(shutdown)).await;
}
