//! Where controllers are registered: [`CONTROLLERS`] is the one list the binary, its flags and
//! the chart's defaults come from. A registration names the controller, its default
//! concurrency, and how to build it over the shared caches ([`CacheSet`] makes each cache once,
//! however many controllers read it).

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::fmt::Debug;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use crd_types::{MessageBroadcast, MyResource};
use futures::FutureExt;
use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::api::Api;
use kube::runtime::watcher;
use kube::{Client, Resource};
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;

use crate::controller_context::ControllerContext;
use crate::metrics::Metrics;
use crate::runtime::{Controller, Reconciler};
use crate::shared_cache::{SharedCache, strip_metadata};
use crate::{message_broadcast, my_resource, owned_config_map};

/// One controller, as the binary knows it.
pub struct Registration {
    /// Name in `--controllers`, `--concurrency`, metrics, logs and spans.
    pub name: &'static str,
    /// Reconciles running at once unless configured otherwise.
    pub default_concurrency: u16,
    /// Builds the controller, taking the caches it reads from `caches`.
    pub build: fn(&mut CacheSet, &ControllerEnv) -> Built,
}

/// Every controller of this operator, in the order they start.
pub const CONTROLLERS: &[Registration] = &[my_resource::REGISTRATION, message_broadcast::REGISTRATION];

/// The registration named `name`.
pub fn find(name: &str) -> Option<&'static Registration> {
    CONTROLLERS.iter().find(|registration| registration.name == name)
}

/// The registered names, for messages.
pub fn names() -> Vec<&'static str> {
    CONTROLLERS.iter().map(|registration| registration.name).collect()
}

/// What every controller gets besides its caches.
#[derive(Clone)]
pub struct ControllerEnv {
    pub client: Client,
    pub metrics: Metrics,
    /// This replica's name, shown in events.
    pub instance: Option<String>,
    pub reconcile_timeout: Duration,
    /// `--watch-namespace`: the one namespace the operator works in, or all of them.
    pub scope: Option<String>,
}

impl ControllerEnv {
    /// The shared plumbing (client, events, metrics, spans) of controller `name`.
    pub fn context<K>(&self, name: &'static str) -> Arc<ControllerContext<K>>
    where
        K: Resource<DynamicType = ()> + Send + Sync + 'static,
    {
        Arc::new(ControllerContext::new(
            name,
            self.client.clone(),
            self.metrics.clone(),
            self.instance.clone(),
            self.reconcile_timeout,
        ))
    }
}

/// A built controller, run once per leadership term.
pub struct Built(Box<dyn Run>);

trait Run: Send + Sync {
    fn run(&self, concurrency: u16, sync_period: Option<Duration>, stop: CancellationToken) -> BoxFuture<'static, ()>;
    fn end_term(&self) -> BoxFuture<'static, ()>;
}

impl<R: Reconciler> Run for Controller<R> {
    fn run(&self, concurrency: u16, sync_period: Option<Duration>, stop: CancellationToken) -> BoxFuture<'static, ()> {
        Controller::run(self, concurrency, sync_period, stop).boxed()
    }

    fn end_term(&self) -> BoxFuture<'static, ()> {
        Controller::end_term(self).boxed()
    }
}

impl Built {
    /// Runs the controller with `concurrency` workers, resyncing every `sync_period`, until
    /// `stop` (see [`Controller::run`]).
    pub fn run(
        &self,
        concurrency: u16,
        sync_period: Option<Duration>,
        stop: CancellationToken,
    ) -> BoxFuture<'static, ()> {
        self.0.run(concurrency, sync_period, stop)
    }

    /// Aborts and awaits what the last term started in the background (see
    /// [`Controller::end_term`]).
    pub fn end_term(&self) -> BoxFuture<'static, ()> {
        self.0.end_term()
    }
}

impl<R: Reconciler> From<Controller<R>> for Built {
    fn from(controller: Controller<R>) -> Self {
        Self(Box::new(controller))
    }
}

/// A kind the shared caches can hold: how it is listed and watched, and what of it is kept.
pub trait Cached: Resource<DynamicType = ()> + Clone + Debug + DeserializeOwned + Send + Sync + 'static {
    /// Name in metrics and logs (the plural resource).
    const RESOURCE: &'static str;

    /// The API and watch configuration; `scope` is `--watch-namespace`.
    fn watch(client: &Client, scope: Option<&str>) -> (Api<Self>, watcher::Config);

    /// Drops what no reconciler reads before the object is stored.
    fn strip(&mut self) {
        strip_metadata(self);
    }
}

/// An API over `scope`'s namespace, or over all of them (kube's `Api::constrain`, where an
/// empty namespace means all).
pub(crate) fn scoped<K>(client: &Client, scope: Option<&str>) -> Api<K>
where
    K: Resource<Scope = kube::core::NamespaceResourceScope, DynamicType = ()>,
{
    Api::all(client.clone()).constrain(scope.unwrap_or_default())
}

impl Cached for ConfigMap {
    const RESOURCE: &'static str = "configmaps";

    /// Only the ConfigMaps this operator manages.
    fn watch(client: &Client, scope: Option<&str>) -> (Api<Self>, watcher::Config) {
        let config = watcher::Config::default().labels(&owned_config_map::managed_selector()).any_semantic();
        (scoped(client, scope), config)
    }

    /// Data values become digests: reconciles only compare them.
    fn strip(&mut self) {
        strip_metadata(self);
        owned_config_map::digest_data(self);
    }
}

impl Cached for MyResource {
    const RESOURCE: &'static str = "myresources";

    fn watch(client: &Client, scope: Option<&str>) -> (Api<Self>, watcher::Config) {
        (scoped(client, scope), watcher::Config::default().any_semantic())
    }
}

impl Cached for MessageBroadcast {
    const RESOURCE: &'static str = "messagebroadcasts";

    fn watch(client: &Client, _scope: Option<&str>) -> (Api<Self>, watcher::Config) {
        (Api::all(client.clone()), watcher::Config::default().any_semantic())
    }
}

impl Cached for Namespace {
    const RESOURCE: &'static str = "namespaces";

    /// With `--watch-namespace`, only that namespace.
    fn watch(client: &Client, scope: Option<&str>) -> (Api<Self>, watcher::Config) {
        let config = match scope {
            Some(namespace) => watcher::Config::default().fields(&format!("metadata.name={namespace}")),
            None => watcher::Config::default(),
        };
        (Api::all(client.clone()), config.any_semantic())
    }

    /// Name, labels and phase: all the broadcast controller reads.
    fn strip(&mut self) {
        strip_metadata(self);
        self.spec = None;
        if let Some(status) = self.status.as_mut() {
            status.conditions = None;
        }
    }
}

/// The shared caches, made on first use, and the watches that fill them.
pub struct CacheSet {
    client: Client,
    scope: Option<String>,
    metrics: Metrics,
    caches: HashMap<TypeId, Box<dyn Any + Send + Sync>>,
    watches: Vec<Box<dyn FnOnce(CancellationToken) -> BoxFuture<'static, ()> + Send>>,
    states: Vec<SyncState>,
}

/// Whether one cache has synced, and why not.
pub type SyncState = (&'static str, Box<dyn Fn() -> Result<(), String> + Send + Sync>);

impl CacheSet {
    /// No caches yet; `scope` is `--watch-namespace`.
    pub fn new(client: Client, scope: Option<String>, metrics: Metrics) -> Self {
        Self { client, scope, metrics, caches: HashMap::new(), watches: Vec::new(), states: Vec::new() }
    }

    /// The one cache of `K`, made now if no controller asked for it before.
    pub fn get<K: Cached>(&mut self) -> SharedCache<K> {
        if let Some(cache) = self.caches.get(&TypeId::of::<K>()).and_then(|c| c.downcast_ref::<SharedCache<K>>()) {
            return cache.clone();
        }
        let (api, config) = K::watch(&self.client, self.scope.as_deref());
        let (cache, watch) = SharedCache::new(api, config, K::strip, K::RESOURCE, self.metrics.clone());
        self.watches.push(Box::new(move |shutdown| watch.run(shutdown).boxed()));
        self.caches.insert(TypeId::of::<K>(), Box::new(cache.clone()));
        let state = cache.clone();
        self.states.push((K::RESOURCE, Box::new(move || state.sync_state())));
        cache
    }

    /// Each cache's sync state, by resource name (for readiness).
    pub fn states(&mut self) -> Vec<SyncState> {
        std::mem::take(&mut self.states)
    }

    /// Lists and watches every cache made until `shutdown`.
    pub fn run(self, shutdown: CancellationToken) -> impl Future<Output = ()> + Send + 'static {
        let watches: Vec<_> = self.watches.into_iter().map(|watch| watch(shutdown.clone())).collect();
        futures::future::join_all(watches).map(|_| ())
    }
}
