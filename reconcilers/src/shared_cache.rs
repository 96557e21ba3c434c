//! One watch and one local cache per resource type for the whole process, shared by every
//! controller that needs the type (client-go's SharedInformerFactory idea).
//!
//! Unlike kube-runtime's `reflect_shared`, the fan-out here also carries deletions (including
//! objects found gone after a relist), so a controller sees its ConfigMap deleted by hand.
//! A cache never writes to the cluster; it only lists and watches.

use std::collections::HashSet;
use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use kube::Resource;
use kube::api::Api;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::watcher::{self, Event};
use kube::runtime::{WatchStreamExt, watcher as watch};
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::queue::Priority;

/// A cached object that changed, with how urgent its reconcile is: [`Priority::Live`] for a
/// watch event, [`Priority::Low`] for the initial list, a relist and the replay a late
/// subscriber gets.
pub type Notification<K> = (Arc<K>, Priority);

/// How many change notifications may wait for the slowest subscriber before the watch pauses.
const SUBSCRIBER_BUFFER: usize = 1024;

/// Read side of a watched, locally cached resource type: the store, and change notifications
/// for any number of subscribers. Cheap to clone. The watch itself is a [`CacheWatch`], run on
/// every replica (leader or standby), so a replica that starts leading finds its caches warm.
pub struct SharedCache<K: Resource<DynamicType = ()> + Clone + 'static> {
    store: Store<K>,
    subscribers: async_broadcast::InactiveReceiver<Notification<K>>,
    health: SharedHealth,
    /// True once the first list completed. (kube's `Store::wait_until_ready` wakes only its
    /// latest poller: a check that polls it once and drops it would leave the waiters asleep.)
    ready: tokio::sync::watch::Receiver<bool>,
}

/// Whether an object the watch delivered belongs in the cache; one that stops qualifying is
/// removed from it.
pub type Admission<K> = Arc<dyn Fn(&K) -> bool + Send + Sync>;

/// How long the watch of a synced cache may keep failing before the cache counts as unsynced
/// again (in `/readyz` and `example_operator_cache_synced`): a CRD deleted or a right revoked
/// shows within this, a watch reconnecting after an API server restart does not.
pub const STALE_AFTER: Duration = Duration::from_secs(30);

/// The watch's last error and since when it has been failing, until the watch delivers again.
#[derive(Debug, Default)]
struct WatchHealth {
    error: Option<String>,
    failing_since: Option<tokio::time::Instant>,
}

impl WatchHealth {
    /// Records a failure; true when the watch has now failed for longer than [`STALE_AFTER`].
    fn failed(&mut self, error: String) -> bool {
        self.error = Some(error);
        self.failing_since.get_or_insert_with(tokio::time::Instant::now).elapsed() > STALE_AFTER
    }

    /// Records that the watch delivered; true when it had been failing.
    fn delivered(&mut self) -> bool {
        self.error = None;
        self.failing_since.take().is_some()
    }

    /// Why a synced cache is stale, if its watch has failed for longer than [`STALE_AFTER`].
    fn staleness(&self) -> Option<String> {
        let since = self.failing_since.filter(|since| since.elapsed() > STALE_AFTER)?;
        let error = self.error.as_deref().unwrap_or("no detail");
        Some(format!("the watch has failed for {} s: {error}", since.elapsed().as_secs()))
    }
}

type SharedHealth = Arc<std::sync::Mutex<WatchHealth>>;

impl<K: Resource<DynamicType = ()> + Clone + 'static> Clone for SharedCache<K> {
    fn clone(&self) -> Self {
        Self {
            store: self.store.clone(),
            subscribers: self.subscribers.clone(),
            health: self.health.clone(),
            ready: self.ready.clone(),
        }
    }
}

/// The list-and-watch that fills a [`SharedCache`]; never writes to the cluster.
pub struct CacheWatch<K: Resource<DynamicType = ()> + Clone + 'static> {
    api: Api<K>,
    config: watcher::Config,
    strip: fn(&mut K),
    admission: Option<Admission<K>>,
    store: Store<K>,
    writer: reflector::store::Writer<K>,
    sender: async_broadcast::Sender<Notification<K>>,
    resource: &'static str,
    metrics: Metrics,
    health: SharedHealth,
    ready: tokio::sync::watch::Sender<bool>,
}

impl<K> SharedCache<K>
where
    K: Resource<DynamicType = ()> + Clone + Debug + DeserializeOwned + Send + Sync + 'static,
{
    /// A cache of the objects `api` and `config` select and `admission` (when given) admits, each
    /// passed through `strip` before it is stored (drop what no reconciler reads). Nothing is
    /// watched until the [`CacheWatch`] runs.
    pub fn new(
        api: Api<K>,
        config: watcher::Config,
        strip: fn(&mut K),
        admission: Option<Admission<K>>,
        resource: &'static str,
        metrics: Metrics,
    ) -> (Self, CacheWatch<K>) {
        let (store, writer) = reflector::store();
        let (mut sender, receiver) = async_broadcast::broadcast(SUBSCRIBER_BUFFER);
        // Back-pressure instead of dropping: a lagging controller must not miss a change.
        sender.set_overflow(false);
        sender.set_await_active(false);
        let health = SharedHealth::default();
        let (ready, ready_receiver) = tokio::sync::watch::channel(false);
        // The series exists (at 0) from the start, so "not synced" is a value, not an absence.
        metrics.cache_synced.with_label_values(&[resource]).set(0);
        let watch = CacheWatch {
            api,
            config,
            strip,
            admission,
            store: store.clone(),
            writer,
            sender,
            resource,
            metrics,
            health: health.clone(),
            ready,
        };
        (Self { store, subscribers: receiver.deactivate(), health, ready: ready_receiver }, watch)
    }

    /// `Ok` once the first list completed, unless the watch has failed since for longer than
    /// [`STALE_AFTER`]; otherwise why not (the watch's last error).
    pub fn sync_state(&self) -> Result<(), String> {
        let health = self.health.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if *self.ready.borrow() {
            return health.staleness().map_or(Ok(()), Err);
        }
        Err(health.error.clone().unwrap_or_else(|| "the first list has not completed".to_owned()))
    }

    /// Read handle on the cached objects.
    pub fn store(&self) -> Store<K> {
        self.store.clone()
    }

    /// Resolves once the first list has completed (true), or never if the watch ends first.
    pub fn synced(&self) -> futures::future::BoxFuture<'static, bool> {
        let mut ready = self.ready.clone();
        Box::pin(async move { ready.wait_for(|ready| *ready).await.is_ok() })
    }

    /// A stream of every cached object (once the first list completed), then of every object
    /// that changes or disappears. Subscribing late, as a replica that has just started leading
    /// does, replays what the cache holds; an object may come twice, never not at all.
    pub fn subscribe(&self) -> impl Stream<Item = Notification<K>> + Send + 'static {
        let live = self.subscribers.activate_cloned();
        // Taken after subscribing: whatever changes from here on also arrives live.
        let synced = *self.ready.borrow();
        let cached = if synced { self.store.state() } else { Vec::new() };
        futures::stream::iter(cached.into_iter().map(|object| (object, Priority::Low))).chain(live)
    }
}

impl<K> CacheWatch<K>
where
    K: Resource<DynamicType = ()> + Clone + Debug + DeserializeOwned + Send + Sync + 'static,
{
    /// Lists and watches until `shutdown` fires, keeping the store current and notifying
    /// subscribers. Watch errors (including 410 Gone) are retried with backoff by relisting.
    pub async fn run(self, shutdown: CancellationToken) {
        self.run_after(Vec::new(), Duration::ZERO, shutdown).await;
    }

    /// [`Self::run`], for a cache whose admission reads other caches (`others` resolve when each
    /// has completed its first list): the first list waits for them for at most `wait`, and
    /// every one that completes later makes the cache list again, so objects turned away for
    /// want of it are admitted.
    pub async fn run_after(
        self,
        others: Vec<futures::future::BoxFuture<'static, bool>>,
        wait: Duration,
        shutdown: CancellationToken,
    ) {
        let Self { api, config, strip, admission, store, mut writer, sender, resource, metrics, health, ready } = self;
        let health = || health.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut others: futures::stream::FuturesUnordered<_> = others.into_iter().collect();
        let deadline = tokio::time::sleep(wait);
        let mut deadline = std::pin::pin!(deadline);
        while !others.is_empty() {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = &mut deadline => {
                    tracing::warn!(resource, waiting = others.len(), "listing before every cache it depends on has synced; listing again as each does");
                    break;
                }
                _ = others.next() => {}
            }
        }
        let list_and_watch = || watch::watcher(api.clone(), config.clone()).default_backoff().boxed();
        let mut events = list_and_watch();
        loop {
            let event = tokio::select! {
                () = shutdown.cancelled() => break,
                Some(synced) = others.next(), if !others.is_empty() => {
                    if synced {
                        tracing::info!(resource, "a cache it depends on has synced: listing again");
                        events = list_and_watch();
                    }
                    continue;
                }
                event = events.next() => event,
            };
            match event {
                None => break,
                Some(Err(error)) => {
                    metrics.watch_events_total.with_label_values(&[resource, "ERROR"]).inc();
                    let synced = *ready.borrow();
                    if synced {
                        tracing::warn!(resource, %error, "watch failed; relisting with backoff");
                    } else {
                        tracing::error!(resource, %error, "cache cannot sync: listing failed; retrying with backoff");
                    }
                    if health().failed(error.to_string()) && synced {
                        metrics.cache_synced.with_label_values(&[resource]).set(0);
                    }
                }
                Some(Ok(event)) => {
                    let synced = *ready.borrow();
                    if health().delivered() && synced {
                        metrics.cache_synced.with_label_values(&[resource]).set(1);
                    }
                    let Some(event) = admit(event, &store, admission.as_ref(), strip) else {
                        continue;
                    };
                    let changed = apply(&store, &mut writer, &ready, event, resource, &metrics);
                    for object in changed {
                        // An error only means no controller is subscribed right now (a standby).
                        let _ = sender.broadcast_direct(object).await;
                    }
                    metrics.cache_objects.with_label_values(&[resource]).set(store.len() as i64);
                }
            }
        }
        sender.close();
    }
}

/// Waits until every cache has completed its first list, as controller-runtime waits for its
/// informers before starting workers: reconciling against a half-filled cache would see owned
/// objects as missing. False when `shutdown` fires first.
pub async fn wait_until_synced(
    caches: Vec<futures::future::BoxFuture<'static, bool>>,
    shutdown: CancellationToken,
) -> bool {
    tokio::select! {
        () = shutdown.cancelled() => false,
        synced = futures::future::join_all(caches) => synced.into_iter().all(|ok| ok),
    }
}

/// What of `event` the store takes: admitted objects, stripped; an object that no longer qualifies
/// becomes a deletion when the store holds it, and is dropped otherwise, as is any deletion of an
/// object the store never held and would not admit.
fn admit<K>(event: Event<K>, store: &Store<K>, admission: Option<&Admission<K>>, strip: fn(&mut K)) -> Option<Event<K>>
where
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    let admitted = |object: &K| admission.is_none_or(|admit| admit(object));
    let held = |object: &K| store.get(&ObjectRef::from_obj(object)).is_some();
    let stripped = |mut object: K| {
        strip(&mut object);
        object
    };
    match event {
        Event::Apply(object) if admitted(&object) => Some(Event::Apply(stripped(object))),
        Event::Apply(object) => held(&object).then(|| Event::Delete(stripped(object))),
        Event::InitApply(object) => admitted(&object).then(|| Event::InitApply(stripped(object))),
        Event::Delete(object) => (held(&object) || admitted(&object)).then(|| Event::Delete(stripped(object))),
        other @ (Event::Init | Event::InitDone) => Some(other),
    }
}

/// Applies one watch event to the store and returns the objects subscribers must hear about.
fn apply<K>(
    store: &Store<K>,
    writer: &mut reflector::store::Writer<K>,
    ready: &tokio::sync::watch::Sender<bool>,
    event: Event<K>,
    resource: &'static str,
    metrics: &Metrics,
) -> Vec<Notification<K>>
where
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    let label = match &event {
        Event::Apply(_) => "APPLY",
        Event::Delete(_) => "DELETE",
        Event::Init => "INIT",
        Event::InitApply(_) => "INIT_APPLY",
        Event::InitDone => "INIT_DONE",
    };
    metrics.watch_events_total.with_label_values(&[resource, label]).inc();
    match event {
        Event::Apply(object) => {
            let key = ObjectRef::from_obj(&object);
            let before = store.get(&key);
            writer.apply_watcher_event(&Event::Apply(object));
            let after = store.get(&key);
            // An object whose owners changed concerns its former owners too (as
            // controller-runtime's owner handler maps both the old and the new object).
            let former = before.filter(|before| {
                after.as_ref().is_some_and(|after| after.meta().owner_references != before.meta().owner_references)
            });
            after.into_iter().chain(former).map(|object| (object, Priority::Live)).collect()
        }
        Event::Delete(object) => {
            let stored = store.get(&ObjectRef::from_obj(&object));
            writer.apply_watcher_event(&Event::Delete(object.clone()));
            // An object that stopped qualifying arrives as its new self: the copy the store held
            // names the owners that must hear of it.
            let former = stored.filter(|stored| stored.meta().owner_references != object.meta().owner_references);
            std::iter::once(Arc::new(object)).chain(former).map(|object| (object, Priority::Live)).collect()
        }
        Event::InitDone => {
            // The store is ready from the first list on; a later relist does not unready it.
            metrics.cache_synced.with_label_values(&[resource]).set(1);
            ready.send_replace(true);
            // After a (re)list, objects that vanished while the watch was down get no Delete
            // event of their own: report them, then everything that is present.
            let before = store.state();
            writer.apply_watcher_event(&Event::InitDone);
            let present: HashSet<ObjectRef<K>> =
                store.state().iter().map(|o| ObjectRef::from_obj(o.as_ref())).collect();
            let vanished = before.into_iter().filter(|o| !present.contains(&ObjectRef::from_obj(o.as_ref())));
            // Vanished objects are news; the rest is the list, reconciled after live changes.
            vanished
                .map(|object| (object, Priority::Live))
                .chain(store.state().into_iter().map(|object| (object, Priority::Low)))
                .collect()
        }
        other => {
            writer.apply_watcher_event(&other);
            Vec::new()
        }
    }
}

/// Removes what no reconciler reads from every cached object, so its size is not in the hands of
/// whoever writes it: managedFields (often the larger half of an object), annotations (kubectl's
/// last-applied copy duplicates the whole spec), labels, finalizers and owner references.
pub fn strip_metadata<K: Resource>(object: &mut K) {
    let meta = object.meta_mut();
    meta.managed_fields = None;
    meta.annotations = None;
    meta.labels = None;
    meta.finalizers = None;
    meta.owner_references = None;
}

/// A cache fed by hand, for the runtime's unit tests.
#[cfg(test)]
pub(crate) struct TestFeed<K: Resource<DynamicType = ()> + Clone + 'static> {
    store: Store<K>,
    writer: reflector::store::Writer<K>,
    sender: async_broadcast::Sender<Notification<K>>,
    metrics: Metrics,
    ready: tokio::sync::watch::Sender<bool>,
}

#[cfg(test)]
impl<K> TestFeed<K>
where
    K: Resource<DynamicType = ()> + Clone + Debug + DeserializeOwned + Send + Sync + 'static,
{
    /// An empty cache and the feed that fills it.
    pub(crate) fn new(metrics: Metrics) -> (SharedCache<K>, Self) {
        let (store, writer) = reflector::store();
        let (mut sender, receiver) = async_broadcast::broadcast(SUBSCRIBER_BUFFER);
        sender.set_overflow(false);
        sender.set_await_active(false);
        let (ready, ready_receiver) = tokio::sync::watch::channel(false);
        let cache = SharedCache {
            store: store.clone(),
            subscribers: receiver.deactivate(),
            health: SharedHealth::default(),
            ready: ready_receiver,
        };
        (cache, Self { store, writer, sender, metrics, ready })
    }

    /// Applies `event` as if the watch delivered it.
    pub(crate) async fn event(&mut self, event: Event<K>) {
        for object in apply(&self.store, &mut self.writer, &self.ready, event, "test", &self.metrics) {
            let _ = self.sender.broadcast_direct(object).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::ConfigMap;

    use super::*;

    /// A client whose every request fails: the watch is driven by hand here.
    fn offline_client() -> kube::Client {
        let service = tower::service_fn(|_request: http::Request<kube::client::Body>| async {
            Err::<http::Response<kube::client::Body>, _>(std::io::Error::other("offline"))
        });
        kube::Client::new(service, "default")
    }

    fn synced(metrics: &Metrics) -> Option<f64> {
        let text = metrics.text().ok()?;
        text.lines().find_map(|line| {
            line.strip_prefix("example_operator_cache_synced{resource=\"configmaps\"} ")?.trim().parse().ok()
        })
    }

    #[tokio::test]
    async fn cache_synced_reads_zero_until_the_first_list_completes_and_stays_one_through_a_relist() {
        let metrics = Metrics::new().unwrap_or_else(|error| panic!("metrics: {error}"));
        let (cache, mut watch) = SharedCache::<ConfigMap>::new(
            Api::all(offline_client()),
            watcher::Config::default(),
            strip_metadata,
            None,
            "configmaps",
            metrics.clone(),
        );
        assert_eq!(synced(&metrics), Some(0.0), "the series is exposed before the first list");

        let CacheWatch { store, writer, ready, .. } = &mut watch;
        apply(store, writer, ready, Event::Init, "configmaps", &metrics);
        let mut listed = ConfigMap::default();
        listed.metadata.name = Some("listed".to_owned());
        apply(store, writer, ready, Event::InitApply(listed), "configmaps", &metrics);
        assert_eq!(synced(&metrics), Some(0.0), "a list in progress is not synced");
        assert!(cache.sync_state().is_err());

        apply(store, writer, ready, Event::InitDone, "configmaps", &metrics);
        assert_eq!(synced(&metrics), Some(1.0));
        assert!(cache.sync_state().is_ok());

        // A relist after a watch error keeps serving the cache: still synced.
        apply(store, writer, ready, Event::Init, "configmaps", &metrics);
        assert_eq!(synced(&metrics), Some(1.0));
    }

    #[test]
    fn an_object_that_stops_qualifying_leaves_the_store_and_one_never_admitted_is_never_news() {
        let metrics = Metrics::new().unwrap_or_else(|error| panic!("metrics: {error}"));
        let (store, mut writer) = reflector::store::<ConfigMap>();
        let (ready, _) = tokio::sync::watch::channel(false);
        let named = |name: &str, admitted: bool| {
            let mut cm = ConfigMap::default();
            cm.metadata.name = Some(name.to_owned());
            cm.metadata.namespace = Some("ns".to_owned());
            cm.data = Some(std::collections::BTreeMap::from([("admitted".to_owned(), admitted.to_string())]));
            cm
        };
        let admission: Admission<ConfigMap> =
            Arc::new(|cm: &ConfigMap| cm.data.as_ref().is_some_and(|d| d.get("admitted").is_some_and(|v| v == "true")));
        let strip: fn(&mut ConfigMap) = |cm| cm.metadata.labels = None;
        let mut feed = |event| {
            let event = admit(event, &store, Some(&admission), strip);
            let news = event.map(|event| apply(&store, &mut writer, &ready, event, "configmaps", &metrics));
            news.unwrap_or_default().len()
        };
        feed(Event::Init);
        assert_eq!(feed(Event::InitApply(named("forged", false))), 0);
        feed(Event::InitApply(named("ours", true)));
        feed(Event::InitDone);
        assert_eq!(store.len(), 1, "the list admitted only ours");

        assert_eq!(feed(Event::Apply(named("forged", false))), 0, "a change to a foreign object is no news");
        assert_eq!(feed(Event::Delete(named("forged", false))), 0, "nor is its deletion");
        assert_eq!(feed(Event::Apply(named("ours", false))), 1, "ours stopped qualifying: news, as a deletion");
        assert_eq!(store.len(), 0, "and it left the store");

        // Its owner changed, or went, on the way: the former owner hears of it too.
        let owned = |owner: Option<&str>, admitted: bool| {
            let mut cm = named("moved", admitted);
            cm.metadata.owner_references = owner.map(|uid| {
                vec![k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
                    uid: uid.to_owned(),
                    controller: Some(true),
                    ..Default::default()
                }]
            });
            cm
        };
        feed(Event::Apply(owned(Some("a"), true)));
        assert_eq!(feed(Event::Apply(owned(Some("a"), true))), 1, "same owner: one notification");
        assert_eq!(feed(Event::Apply(owned(Some("b"), true))), 2, "re-pointed: the new and the former owner");
        assert_eq!(feed(Event::Apply(owned(None, false))), 2, "reference removed: its deletion and the former owner");
    }

    #[tokio::test(start_paused = true)]
    async fn a_synced_cache_whose_watch_keeps_failing_counts_as_unsynced_after_the_bound() {
        let mut health = WatchHealth::default();
        assert!(!health.failed("403 forbidden".into()), "one failure is not staleness");
        assert_eq!(health.staleness(), None);
        tokio::time::advance(STALE_AFTER + Duration::from_secs(1)).await;
        assert!(health.failed("403 forbidden".into()), "still failing past the bound");
        let stale = health.staleness().unwrap_or_default();
        assert!(stale.starts_with("the watch has failed for 31 s: 403 forbidden"), "{stale}");
        assert!(health.delivered(), "it had been failing");
        assert_eq!(health.staleness(), None, "a delivery ends it");
        assert!(!health.delivered());
    }
}
