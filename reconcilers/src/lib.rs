//! The controllers of example-operator, one module per controller, and the mechanics they share.
//!
//! Reconcilers are level-triggered and idempotent: they compare the desired state with the shared
//! caches and write only the difference, so an in-sync cluster costs no writes. [`run`] is the
//! entry point; the binary calls it only while this replica holds the leader lease.

pub mod backoff;
pub mod conditions;
pub mod controller_context;
pub mod error;
pub mod message_broadcast;
pub mod metrics;
pub mod my_resource;
pub mod owned_config_map;
pub mod queue;
pub mod shared_cache;

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use crd_types::{MessageBroadcast, MyResource};
use std::future::Future;

use futures::FutureExt;
use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::Client;
use kube::api::Api;
use kube::runtime::watcher;
use tokio_util::sync::CancellationToken;

pub use error::{Error, Result};
pub use metrics::Metrics;

use controller_context::ControllerContext;
use shared_cache::{SharedCache, strip_metadata};

/// A controller this crate can run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ControllerKind {
    /// MyResource → ConfigMap `<name>-configmap`.
    MyResource,
    /// MessageBroadcast → a ConfigMap copy per selected namespace.
    MessageBroadcast,
}

impl ControllerKind {
    /// Every controller.
    pub const ALL: [ControllerKind; 2] = [ControllerKind::MyResource, ControllerKind::MessageBroadcast];

    /// The name used in flags, metrics and logs.
    pub fn name(self) -> &'static str {
        match self {
            ControllerKind::MyResource => my_resource::CONTROLLER,
            ControllerKind::MessageBroadcast => message_broadcast::CONTROLLER,
        }
    }
}

impl fmt::Display for ControllerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for ControllerKind {
    type Err = String;

    fn from_str(name: &str) -> std::result::Result<Self, Self::Err> {
        Self::ALL.into_iter().find(|kind| kind.name() == name).ok_or_else(|| {
            let known: Vec<&str> = Self::ALL.iter().map(|k| k.name()).collect();
            format!("unknown controller {name:?}; known controllers: {}", known.join(", "))
        })
    }
}

/// What to run and how wide.
#[derive(Clone, Debug)]
pub struct Settings {
    /// The controllers to run.
    pub controllers: BTreeSet<ControllerKind>,
    /// Reconciles of MyResources running at once.
    pub my_resource_concurrency: u16,
    /// Reconciles of MessageBroadcasts running at once.
    pub message_broadcast_concurrency: u16,
    /// This replica's name (the pod name), shown in the events it writes.
    pub instance: Option<String>,
    /// Watch and manage only this namespace (MessageBroadcasts then copy only into it);
    /// `None` manages the whole cluster.
    pub watch_namespace: Option<String>,
    /// A reconcile running longer than this is cancelled and retried with backoff.
    pub reconcile_timeout: std::time::Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            controllers: ControllerKind::ALL.into_iter().collect(),
            my_resource_concurrency: 4,
            message_broadcast_concurrency: 2,
            instance: None,
            watch_namespace: None,
            reconcile_timeout: std::time::Duration::from_secs(60),
        }
    }
}

/// An API for a namespaced kind over one namespace, or over all of them.
fn scoped_api<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: kube::Resource<Scope = kube::core::NamespaceResourceScope, DynamicType = ()>,
{
    match namespace {
        Some(namespace) => Api::namespaced(client.clone(), namespace),
        None => Api::all(client.clone()),
    }
}

/// Strips a cached Namespace down to name, labels and phase: all the broadcast controller reads.
fn strip_namespace(namespace: &mut Namespace) {
    strip_metadata(namespace);
    namespace.spec = None;
    if let Some(status) = namespace.status.as_mut() {
        status.conditions = None;
    }
}

/// The shared caches the selected controllers read: one watch and one cache per resource type
/// for the whole process. They run on every replica from the start, so a standby keeps them warm
/// and starts reconciling at once when it becomes leader. Caches only read; the controllers,
/// which write, run only while this replica leads ([`Caches::controllers`]).
pub struct Caches {
    client: Client,
    settings: Settings,
    metrics: Metrics,
    config_maps: SharedCache<ConfigMap>,
    resources: Option<SharedCache<MyResource>>,
    broadcasts: Option<(SharedCache<MessageBroadcast>, SharedCache<Namespace>)>,
}

impl Caches {
    /// The caches `settings` need, and the future that lists and watches them until `shutdown`.
    pub fn new(
        client: Client,
        settings: Settings,
        metrics: Metrics,
        shutdown: CancellationToken,
    ) -> (Self, impl Future<Output = ()> + Send + 'static) {
        let wants = |kind| settings.controllers.contains(&kind);
        let scope = settings.watch_namespace.as_deref();
        let mut watches: Vec<BoxFuture<'static, ()>> = Vec::new();
        // ConfigMaps are shared by both controllers; only those this operator manages are watched.
        let (config_maps, watch) = SharedCache::new(
            scoped_api::<ConfigMap>(&client, scope),
            watcher::Config::default().labels(&owned_config_map::managed_selector()).any_semantic(),
            strip_metadata,
            "configmaps",
            metrics.clone(),
        );
        watches.push(watch.run(shutdown.clone()).boxed());
        let resources = wants(ControllerKind::MyResource).then(|| {
            let (cache, watch) = SharedCache::new(
                scoped_api::<MyResource>(&client, scope),
                watcher::Config::default().any_semantic(),
                strip_metadata,
                "myresources",
                metrics.clone(),
            );
            watches.push(watch.run(shutdown.clone()).boxed());
            cache
        });
        let broadcasts = wants(ControllerKind::MessageBroadcast).then(|| {
            let (broadcasts, watch) = SharedCache::new(
                Api::<MessageBroadcast>::all(client.clone()),
                watcher::Config::default().any_semantic(),
                strip_metadata,
                "messagebroadcasts",
                metrics.clone(),
            );
            watches.push(watch.run(shutdown.clone()).boxed());
            let namespace_filter = match scope {
                Some(namespace) => watcher::Config::default().fields(&format!("metadata.name={namespace}")),
                None => watcher::Config::default(),
            };
            let (namespaces, watch) = SharedCache::new(
                Api::<Namespace>::all(client.clone()),
                namespace_filter.any_semantic(),
                strip_namespace,
                "namespaces",
                metrics.clone(),
            );
            watches.push(watch.run(shutdown.clone()).boxed());
            (broadcasts, namespaces)
        });
        let caches = Self { client, settings, metrics, config_maps, resources, broadcasts };
        (caches, futures::future::join_all(watches).map(|_| ()))
    }

    fn context<K: kube::Resource<DynamicType = ()> + Send + Sync + 'static>(
        &self,
        controller: &'static str,
    ) -> ControllerContext<K> {
        ControllerContext::new(
            controller,
            self.client.clone(),
            self.metrics.clone(),
            self.settings.instance.clone(),
            self.settings.reconcile_timeout,
        )
    }

    /// The selected controllers over these caches: they subscribe now (replaying what the caches
    /// hold), start reconciling once every cache they read has synced, and run until `stop`
    /// fires; the future then resolves once their in-flight reconciles finished.
    pub fn controllers(&self, stop: CancellationToken) -> impl Future<Output = ()> + Send + 'static {
        let mut tasks: Vec<BoxFuture<'static, ()>> = Vec::new();
        if let Some(resources) = &self.resources {
            let context = Arc::new(my_resource::Context {
                base: self.context(my_resource::CONTROLLER),
                config_maps: self.config_maps.store(),
                written: Default::default(),
            });
            let concurrency = self.settings.my_resource_concurrency;
            tasks.push(
                my_resource::controller(resources, &self.config_maps, context, concurrency, stop.clone()).boxed(),
            );
        }
        if let Some((broadcasts, namespaces)) = &self.broadcasts {
            let context = Arc::new(message_broadcast::Context {
                base: self.context(message_broadcast::CONTROLLER),
                config_maps: self.config_maps.store(),
                namespaces: namespaces.store(),
            });
            let concurrency = self.settings.message_broadcast_concurrency;
            let controller = message_broadcast::controller(
                broadcasts,
                &self.config_maps,
                namespaces,
                context,
                concurrency,
                stop.clone(),
            );
            tasks.push(controller.boxed());
        }
        futures::future::join_all(tasks).map(|_| ())
    }
}

/// Runs the selected controllers over their shared caches until `shutdown` fires; returns once
/// every controller has finished its in-flight reconciles. (Without leader election; with it,
/// the binary runs the caches all along and the controllers only while leading.)
pub async fn run(client: Client, settings: Settings, metrics: Metrics, shutdown: CancellationToken) {
    let (caches, watching) = Caches::new(client, settings, metrics, shutdown.clone());
    futures::future::join(watching, caches.controllers(shutdown)).await;
}
