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
pub mod shared_cache;

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use crd_types::{MessageBroadcast, MyResource};
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

/// Runs the selected controllers over one shared cache per resource type until `shutdown`
/// fires; returns once every controller has finished its in-flight reconciles.
pub async fn run(client: Client, settings: Settings, metrics: Metrics, shutdown: CancellationToken) {
    let wants = |kind| settings.controllers.contains(&kind);
    let scope = settings.watch_namespace.as_deref();
    // ConfigMaps are shared by both controllers; only those this operator manages are watched.
    let config_maps = SharedCache::new(
        scoped_api::<ConfigMap>(&client, scope),
        watcher::Config::default().labels(&owned_config_map::managed_selector()).any_semantic(),
        strip_metadata,
        "configmaps",
        metrics.clone(),
    );
    let mut tasks: Vec<BoxFuture<'static, ()>> = Vec::new();

    if wants(ControllerKind::MyResource) {
        let resources = SharedCache::new(
            scoped_api::<MyResource>(&client, scope),
            watcher::Config::default().any_semantic(),
            strip_metadata,
            "myresources",
            metrics.clone(),
        );
        let context = Arc::new(my_resource::Context {
            base: ControllerContext::new(
                my_resource::CONTROLLER,
                client.clone(),
                metrics.clone(),
                settings.instance.clone(),
                settings.reconcile_timeout,
            ),
            config_maps: config_maps.store(),
            written: Default::default(),
        });
        let concurrency = settings.my_resource_concurrency;
        tasks.push(my_resource::controller(&resources, &config_maps, context, concurrency, shutdown.clone()).boxed());
        tasks.push(resources.run(shutdown.clone()).boxed());
    }
    if wants(ControllerKind::MessageBroadcast) {
        let broadcasts = SharedCache::new(
            Api::<MessageBroadcast>::all(client.clone()),
            watcher::Config::default().any_semantic(),
            strip_metadata,
            "messagebroadcasts",
            metrics.clone(),
        );
        let namespace_filter = match scope {
            Some(namespace) => watcher::Config::default().fields(&format!("metadata.name={namespace}")),
            None => watcher::Config::default(),
        };
        let namespaces = SharedCache::new(
            Api::<Namespace>::all(client.clone()),
            namespace_filter.any_semantic(),
            strip_namespace,
            "namespaces",
            metrics.clone(),
        );
        let context = Arc::new(message_broadcast::Context {
            base: ControllerContext::new(
                message_broadcast::CONTROLLER,
                client.clone(),
                metrics.clone(),
                settings.instance.clone(),
                settings.reconcile_timeout,
            ),
            config_maps: config_maps.store(),
            namespaces: namespaces.store(),
        });
        let concurrency = settings.message_broadcast_concurrency;
        tasks.push(
            message_broadcast::controller(
                &broadcasts,
                &config_maps,
                &namespaces,
                context,
                concurrency,
                shutdown.clone(),
            )
            .boxed(),
        );
        tasks.push(broadcasts.run(shutdown.clone()).boxed());
        tasks.push(namespaces.run(shutdown.clone()).boxed());
    }
    if !tasks.is_empty() {
        tasks.push(config_maps.run(shutdown.clone()).boxed());
    }
    futures::future::join_all(tasks).await;
}
