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
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::Api;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Client, Resource};
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;

use crate::controller_context::ControllerContext;
use crate::metrics::Metrics;
use crate::runtime::{Controller, Reconciler};
use crate::shared_cache::{Admission, SharedCache, strip_metadata};
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
    /// Where and how much resources may make the operator write.
    pub tenancy: Arc<crate::tenancy::Tenancy>,
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

    /// Whether objects of this kind own the operator's ConfigMaps, and where: a ConfigMap is
    /// cached only while its controller reference names an object of such a kind in the caches.
    const OWNS_CONFIG_MAPS: Option<OwnerScope> = None;

    /// The API and watch configuration; `scope` is `--watch-namespace`.
    fn watch(client: &Client, scope: Option<&str>) -> (Api<Self>, watcher::Config);

    /// Drops what no reconciler reads before the object is stored.
    fn strip(&mut self) {
        strip_metadata(self);
    }

    /// Which delivered objects the cache keeps (all unless said otherwise).
    fn admission(_owners: &Owners) -> Option<Admission<Self>> {
        None
    }
}

/// Where the owner of a ConfigMap lives relative to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OwnerScope {
    /// In the ConfigMap's namespace.
    Namespaced,
    /// Cluster-scoped.
    Cluster,
}

/// The caches of the kinds that own ConfigMaps: who may own a cached ConfigMap. Cheap to clone.
#[derive(Clone, Default)]
pub struct Owners(Arc<std::sync::RwLock<Vec<OwnerKind>>>);

/// The uid of the cached object of one kind with a namespace (of the ConfigMap) and a name.
type UidOf = Box<dyn Fn(&str, &str) -> Option<String> + Send + Sync>;

/// One owning kind: its identity and how to find an object of it by namespace and name.
struct OwnerKind {
    api_version: String,
    kind: String,
    uid_of: UidOf,
    synced: Box<dyn Fn() -> BoxFuture<'static, bool> + Send + Sync>,
}

impl Owners {
    fn add<K: Cached>(&self, scope: OwnerScope, cache: &SharedCache<K>) {
        let store = cache.store();
        let uid_of = move |namespace: &str, name: &str| {
            let key = match scope {
                OwnerScope::Namespaced => ObjectRef::new(name).within(namespace),
                OwnerScope::Cluster => ObjectRef::new(name),
            };
            store.get(&key).and_then(|owner| owner.meta().uid.clone())
        };
        let cache = cache.clone();
        let kind = OwnerKind {
            api_version: K::api_version(&()).into_owned(),
            kind: K::kind(&()).into_owned(),
            uid_of: Box::new(uid_of),
            synced: Box::new(move || cache.synced()),
        };
        self.0.write().unwrap_or_else(|poisoned| poisoned.into_inner()).push(kind);
    }

    /// True when `reference` is a controller reference to an object the owners' caches hold in
    /// `namespace` (same kind, name and uid): a reference to an object that does not exist, or to
    /// an older object of the same name, names no owner.
    pub fn holds(&self, namespace: &str, reference: &OwnerReference) -> bool {
        let kinds = self.0.read().unwrap_or_else(|poisoned| poisoned.into_inner());
        reference.controller == Some(true)
            && kinds.iter().any(|kind| {
                kind.kind == reference.kind
                    && kind.api_version == reference.api_version
                    && (kind.uid_of)(namespace, &reference.name).is_some_and(|uid| uid == reference.uid)
            })
    }

    /// One future per owner cache, resolving once it has completed its first list (false if it
    /// never will).
    fn synced(&self) -> Vec<BoxFuture<'static, bool>> {
        let kinds = self.0.read().unwrap_or_else(|poisoned| poisoned.into_inner());
        kinds.iter().map(|kind| (kind.synced)()).collect()
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

/// Objects per page of a (re)list of custom resources: each may be a few hundred KiB (a 64 Ki
/// character message), so a page stays within tens of MiB.
const CUSTOM_RESOURCE_PAGE: u32 = 100;

/// How long a cache that admits by owner waits for the owners' caches before its first list. An
/// owner cache that has not synced by then (its kind's CRD missing, its list forbidden) does not
/// hold up the others: the cache lists again when it syncs.
const OWNERS_SYNC_WAIT: Duration = Duration::from_secs(5);

/// ConfigMaps per page of a (re)list: anyone can label a ConfigMap of up to 1 MiB as ours, and a
/// page is held whole while it is parsed.
const CONFIG_MAP_PAGE: u32 = 16;

impl Cached for ConfigMap {
    const RESOURCE: &'static str = "configmaps";

    /// The ConfigMaps labelled as managed by this operator; the admission keeps only ours.
    fn watch(client: &Client, scope: Option<&str>) -> (Api<Self>, watcher::Config) {
        let config = watcher::Config::default()
            .labels(&owned_config_map::managed_selector())
            .page_size(CONFIG_MAP_PAGE)
            .any_semantic();
        (scoped(client, scope), config)
    }

    /// One digest of the keys we own, our label and our controller reference: a fixed size.
    fn strip(&mut self) {
        owned_config_map::reduce_for_cache(self);
    }

    /// Only ConfigMaps whose controller reference names an object in the owners' caches: the
    /// label alone is anyone's to set.
    fn admission(owners: &Owners) -> Option<Admission<Self>> {
        let owners = owners.clone();
        Some(Arc::new(move |config_map: &ConfigMap| {
            let namespace = config_map.metadata.namespace.as_deref().unwrap_or_default();
            let controller = config_map.metadata.owner_references.iter().flatten().find(|o| o.controller == Some(true));
            controller.is_some_and(|reference| owners.holds(namespace, reference))
        }))
    }
}

/// Keeps only the conditions this operator writes: others' neither grow the cache nor count as
/// a difference from the status it wants.
fn keep_own_conditions(conditions: &mut Vec<crd_types::Condition>) {
    conditions.retain(|condition| condition.type_ == crate::conditions::READY);
}

impl Cached for MyResource {
    const RESOURCE: &'static str = "myresources";
    const OWNS_CONFIG_MAPS: Option<OwnerScope> = Some(OwnerScope::Namespaced);

    fn watch(client: &Client, scope: Option<&str>) -> (Api<Self>, watcher::Config) {
        (scoped(client, scope), watcher::Config::default().page_size(CUSTOM_RESOURCE_PAGE).any_semantic())
    }

    fn strip(&mut self) {
        strip_metadata(self);
        if let Some(status) = self.status.as_mut() {
            keep_own_conditions(&mut status.conditions);
        }
    }
}

impl Cached for MessageBroadcast {
    const RESOURCE: &'static str = "messagebroadcasts";
    const OWNS_CONFIG_MAPS: Option<OwnerScope> = Some(OwnerScope::Cluster);

    fn watch(client: &Client, _scope: Option<&str>) -> (Api<Self>, watcher::Config) {
        (Api::all(client.clone()), watcher::Config::default().page_size(CUSTOM_RESOURCE_PAGE).any_semantic())
    }

    fn strip(&mut self) {
        strip_metadata(self);
        if let Some(status) = self.status.as_mut() {
            keep_own_conditions(&mut status.conditions);
        }
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
        let labels = self.metadata.labels.take();
        strip_metadata(self);
        self.metadata.labels = labels;
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
    owners: Owners,
}

/// Whether one cache has synced, and why not.
pub type SyncState = (&'static str, Box<dyn Fn() -> Result<(), String> + Send + Sync>);

impl CacheSet {
    /// No caches yet; `scope` is `--watch-namespace`.
    pub fn new(client: Client, scope: Option<String>, metrics: Metrics) -> Self {
        Self {
            client,
            scope,
            metrics,
            caches: HashMap::new(),
            watches: Vec::new(),
            states: Vec::new(),
            owners: Owners::default(),
        }
    }

    /// The one cache of `K`, made now if no controller asked for it before.
    pub fn get<K: Cached>(&mut self) -> SharedCache<K> {
        if let Some(cache) = self.caches.get(&TypeId::of::<K>()).and_then(|c| c.downcast_ref::<SharedCache<K>>()) {
            return cache.clone();
        }
        let (api, config) = K::watch(&self.client, self.scope.as_deref());
        let admission = K::admission(&self.owners);
        let owners = admission.as_ref().map(|_| self.owners.clone());
        let (cache, watch) = SharedCache::new(api, config, K::strip, admission, K::RESOURCE, self.metrics.clone());
        self.watches.push(Box::new(move |shutdown| {
            let owners_synced = owners.map(|owners| owners.synced()).unwrap_or_default();
            watch.run_after(owners_synced, OWNERS_SYNC_WAIT, shutdown).boxed()
        }));
        self.caches.insert(TypeId::of::<K>(), Box::new(cache.clone()));
        if let Some(scope) = K::OWNS_CONFIG_MAPS {
            self.owners.add(scope, &cache);
        }
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use kube::runtime::watcher::Event;

    use super::*;
    use crate::shared_cache::TestFeed;

    fn my_resource(namespace: &str, name: &str, uid: &str) -> MyResource {
        let mut resource = MyResource::new(name, crd_types::MyResourceSpec { message: "hi".into() });
        resource.metadata.namespace = Some(namespace.into());
        resource.metadata.uid = Some(uid.into());
        resource
    }

    fn config_map(namespace: &str, owner: Option<OwnerReference>) -> ConfigMap {
        let mut cm = ConfigMap::default();
        cm.metadata.name = Some("copy".into());
        cm.metadata.namespace = Some(namespace.into());
        cm.metadata.owner_references = owner.map(|owner| vec![owner]);
        cm
    }

    fn reference(name: &str, uid: &str, controller: bool) -> OwnerReference {
        OwnerReference {
            api_version: "example.com/v1".into(),
            kind: "MyResource".into(),
            name: name.into(),
            uid: uid.into(),
            controller: Some(controller),
            block_owner_deletion: Some(true),
        }
    }

    #[tokio::test]
    async fn a_config_map_is_admitted_only_under_a_controller_reference_to_a_cached_owner() {
        let metrics = Metrics::new().unwrap_or_else(|error| panic!("metrics: {error}"));
        let (cache, mut feed) = TestFeed::<MyResource>::new(metrics);
        let owners = Owners::default();
        owners.add(OwnerScope::Namespaced, &cache);
        feed.event(Event::Init).await;
        feed.event(Event::InitApply(my_resource("team", "hello", "uid-1"))).await;
        feed.event(Event::InitDone).await;
        let admit = ConfigMap::admission(&owners).unwrap_or_else(|| panic!("ConfigMaps are admitted by owner"));

        assert!(admit(&config_map("team", Some(reference("hello", "uid-1", true)))));
        assert!(!admit(&config_map("team", None)), "the label alone admits nothing");
        assert!(!admit(&config_map("team", Some(reference("hello", "forged", true)))), "a forged uid");
        assert!(!admit(&config_map("team", Some(reference("absent", "uid-1", true)))), "an owner that does not exist");
        assert!(!admit(&config_map("other", Some(reference("hello", "uid-1", true)))), "an owner elsewhere");
        assert!(!admit(&config_map("team", Some(reference("hello", "uid-1", false)))), "not the controller");
        let mut wrong_kind = reference("hello", "uid-1", true);
        wrong_kind.kind = "MessageBroadcast".into();
        assert!(!admit(&config_map("team", Some(wrong_kind))));

        // The owner deleted and recreated under the same name: the old reference no longer admits.
        feed.event(Event::Apply(my_resource("team", "hello", "uid-2"))).await;
        assert!(!admit(&config_map("team", Some(reference("hello", "uid-1", true)))));
    }

    #[test]
    fn custom_resources_keep_only_what_reconciles_read() {
        let mut resource = my_resource("team", "hello", "uid-1");
        resource.metadata.labels = Some(BTreeMap::from([("a".to_owned(), "x".repeat(1000))]));
        resource.metadata.finalizers = Some(vec!["tenant.example/f".into(); 100]);
        resource.metadata.owner_references = Some(vec![reference("x", "y", false); 100]);
        let condition = |type_: &str| crd_types::Condition {
            type_: type_.into(),
            status: crd_types::ConditionStatus::True,
            reason: "R".into(),
            message: "m".repeat(1000),
            last_transition_time: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(Default::default()),
            observed_generation: None,
        };
        resource.status = Some(crd_types::MyResourceStatus {
            conditions: vec![condition("Ready"), condition("TenantCondition"), condition("Other")],
            ..Default::default()
        });
        Cached::strip(&mut resource);
        assert!(resource.metadata.labels.is_none() && resource.metadata.finalizers.is_none());
        assert!(resource.metadata.owner_references.is_none());
        let types: Vec<&str> = resource.status.iter().flat_map(|s| &s.conditions).map(|c| c.type_.as_str()).collect();
        assert_eq!(types, ["Ready"]);
    }
}
