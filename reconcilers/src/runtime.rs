//! The controller runtime: events from the shared caches are mapped to keys, queued in a
//! [`WorkQueue`], and handed to a fixed number of workers that reconcile one key at a time.
//!
//! ```text
//! watch → SharedCache (store + notifications) → sources (map to keys) → WorkQueue → workers
//!       → Reconciler::reconcile (desired state) → writes; result → forget / requeue / backoff
//! ```
//!
//! A controller is a [`Controller`]: its [`Reconciler`], the cache of its own kind, and the
//! sources that map other caches' changes to its keys. It runs per leadership term
//! ([`Controller::run`]); its queue and metrics are made fresh each time.

use std::fmt::Debug;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use kube::Resource;
use kube::runtime::reflector::{ObjectRef, Store};
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;

use crate::controller_context::{ControllerContext, Requeue};
use crate::error::Result;
use crate::queue::{Priority, WorkQueue};
use crate::shared_cache::{SharedCache, wait_until_synced};

/// The desired-state logic of one controller: everything else (queueing, retries, metrics,
/// spans, timeouts, panics) is the runtime's.
pub trait Reconciler: Send + Sync + 'static {
    /// The kind this controller reconciles.
    type Object: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static;

    /// Brings the cluster in line with `object`; says when to look again.
    fn reconcile(&self, object: Arc<Self::Object>) -> impl Future<Output = Result<Requeue>> + Send;

    /// Forgets what this controller remembered of an earlier term (statuses or copies it wrote):
    /// another replica may have led in between. Called as each term starts, before any reconcile.
    fn start_term(&self) {}
}

/// Keys for the queue, with their priority.
type Keys<K> = BoxStream<'static, (ObjectRef<K>, Priority)>;
/// Subscribes a source anew for each run (a late subscriber gets the cache replayed).
type Source<K> = Box<dyn Fn() -> Keys<K> + Send + Sync>;
/// Resolves when a cache the controller reads has synced.
type Synced = Box<dyn Fn() -> BoxFuture<'static, bool> + Send + Sync>;

/// How often the in-progress gauges are refreshed between completions (client-go: 500 ms).
const UNFINISHED_REFRESH: Duration = Duration::from_millis(500);

/// One controller: a reconciler, the caches it reads, and the events that map to its keys.
pub struct Controller<R: Reconciler> {
    reconciler: Arc<R>,
    context: Arc<ControllerContext<R::Object>>,
    store: Store<R::Object>,
    sources: Vec<Source<R::Object>>,
    synced: Vec<Synced>,
}

impl<R: Reconciler> Controller<R> {
    /// A controller of `R::Object` reading `primary`'s store; add its sources with
    /// [`Self::owns_events`], [`Self::watches`] or [`Self::source`].
    pub fn new(
        reconciler: Arc<R>,
        context: Arc<ControllerContext<R::Object>>,
        primary: &SharedCache<R::Object>,
    ) -> Self {
        let synced_cache = primary.clone();
        Self {
            reconciler,
            context,
            store: primary.store(),
            sources: Vec::new(),
            synced: vec![Box::new(move || synced_cache.synced())],
        }
    }

    /// Every change of the controller's own kind queues that object.
    pub fn owns_events(self, primary: &SharedCache<R::Object>) -> Self {
        let primary = primary.clone();
        self.source(move || {
            primary.subscribe().map(|(object, priority)| (ObjectRef::from_obj(&*object), priority)).boxed()
        })
    }

    /// Changes of `cache`'s kind queue the keys `map` returns (and the controller waits for that
    /// cache to sync before reconciling).
    pub fn watches<O, I>(mut self, cache: &SharedCache<O>, map: impl Fn(&O) -> I + Send + Sync + 'static) -> Self
    where
        O: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
        I: IntoIterator<Item = ObjectRef<R::Object>>,
        I::IntoIter: Send,
    {
        let synced_cache = cache.clone();
        self.synced.push(Box::new(move || synced_cache.synced()));
        let cache = cache.clone();
        let map = Arc::new(map);
        self.source(move || {
            let map = map.clone();
            cache
                .subscribe()
                .flat_map(move |(object, priority)| {
                    let keys: Vec<_> = map(&object).into_iter().map(|key| (key, priority)).collect();
                    futures::stream::iter(keys)
                })
                .boxed()
        })
    }

    /// A source of keys, subscribed anew on each run.
    pub fn source(mut self, subscribe: impl Fn() -> Keys<R::Object> + Send + Sync + 'static) -> Self {
        self.sources.push(Box::new(subscribe));
        self
    }

    /// The name in metrics, logs and spans.
    pub fn name(&self) -> &'static str {
        self.context.controller
    }

    /// Ends a term after [`Self::run`] finished or was aborted: aborts and awaits what the term
    /// started in the background (event publishing), so none of its writes outlives it.
    pub fn end_term(&self) -> impl Future<Output = ()> + Send + 'static {
        let context = self.context.clone();
        async move { context.end_term().await }
    }

    /// Subscribes to the sources now (so nothing that changes from here on is missed) and returns
    /// the run: queue every event at once, start `concurrency` workers once every cache synced,
    /// and on `stop` hand out no more keys and let the workers finish what they hold.
    ///
    /// Every `sync_period` (jittered by ±10%, controller-runtime's SyncPeriod), every cached
    /// object is queued again at low priority: a level-triggered check that repairs what no
    /// event reported, and writes nothing when the cluster is in sync.
    pub fn run(
        &self,
        concurrency: u16,
        sync_period: Option<Duration>,
        stop: CancellationToken,
    ) -> impl Future<Output = ()> + Send + 'static {
        self.reconciler.start_term();
        let metrics = &self.context.metrics;
        metrics.max_concurrent_reconciles.with_label_values(&[self.name()]).set(i64::from(concurrency));
        metrics.active_workers.with_label_values(&[self.name()]).set(0);
        let queue = Arc::new(WorkQueue::new(metrics.queue_metrics(self.name())));
        let events = futures::stream::select_all(self.sources.iter().map(|subscribe| subscribe()));
        let synced = wait_until_synced(self.synced.iter().map(|synced| synced()).collect(), stop.clone());
        let feed = feed(events, queue.clone(), stop.clone());
        let workers: Vec<_> = (0..concurrency.max(1))
            .map(|_| work(self.reconciler.clone(), self.context.clone(), self.store.clone(), queue.clone()))
            .collect();
        let refresh = refresh_unfinished(queue.clone(), stop.clone());
        let resync = sync_period.map(|period| resync(self.store.clone(), queue.clone(), period, stop.clone()));
        async move {
            let feeding = tokio::spawn(feed);
            let refreshing = tokio::spawn(refresh);
            if synced.await {
                let resyncing = resync.map(tokio::spawn);
                let shutdown = {
                    let queue = queue.clone();
                    async move {
                        stop.cancelled().await;
                        queue.shut_down();
                    }
                };
                futures::future::join(shutdown, futures::future::join_all(workers)).await;
                if let Some(resyncing) = resyncing {
                    resyncing.abort();
                }
            }
            queue.shut_down();
            feeding.abort();
            refreshing.abort();
        }
    }
}

/// Queues every key the sources produce until `stop`.
async fn feed<K>(
    events: impl futures::Stream<Item = (ObjectRef<K>, Priority)>,
    queue: Arc<WorkQueue<ObjectRef<K>>>,
    stop: CancellationToken,
) where
    K: Resource<DynamicType = ()>,
{
    let mut events = std::pin::pin!(events.take_until(stop.cancelled_owned()));
    while let Some((key, priority)) = events.next().await {
        queue.add(key, priority);
    }
}

/// Queues every cached object at low priority every `period` (jittered) until `stop`.
async fn resync<K>(store: Store<K>, queue: Arc<WorkQueue<ObjectRef<K>>>, period: Duration, stop: CancellationToken)
where
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    loop {
        let wait = period.mul_f64(rand::random_range(0.9..1.1));
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
        for object in store.state() {
            queue.add(ObjectRef::from_obj(&*object), Priority::Low);
        }
    }
}

/// Keeps the in-progress gauges current while work runs longer than the refresh interval.
async fn refresh_unfinished<K: Clone + Eq + std::hash::Hash>(queue: Arc<WorkQueue<K>>, stop: CancellationToken) {
    let mut ticks = tokio::time::interval(UNFINISHED_REFRESH);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticks.tick() => queue.update_unfinished(),
        }
    }
}

/// One worker: takes keys until the queue shuts down and reconciles the object each names.
async fn work<R: Reconciler>(
    reconciler: Arc<R>,
    context: Arc<ControllerContext<R::Object>>,
    store: Store<R::Object>,
    queue: Arc<WorkQueue<ObjectRef<R::Object>>>,
) {
    while let Some((key, priority)) = queue.get().await {
        // An object no longer in the cache was deleted, and one being deleted (foreground or
        // orphan deletion holds it with the garbage collector's finalizer) is being taken apart
        // by the garbage collector: its owned objects go with it or are let go, so there is
        // nothing to reconcile. (These controllers keep no finalizers of their own.) Repairing
        // it would fight the collector: recreate what it just deleted, or re-adopt what it let go.
        let object = store.get(&key).filter(|object| object.meta().deletion_timestamp.is_none());
        if let Some(object) = object {
            match context.instrumented(&object, reconciler.reconcile(object.clone())).await {
                Ok(Requeue::OnChange) => queue.forget(&key),
                Ok(Requeue::After(delay)) => {
                    queue.forget(&key);
                    queue.add_after(key.clone(), delay, Priority::Low);
                }
                Err(error) => {
                    let delay = queue.add_rate_limited(key.clone(), priority);
                    tracing::debug!(controller = context.controller, object = %key, ?delay, transient = error.is_transient(), "requeue after error");
                }
            }
        } else {
            queue.forget(&key);
        }
        queue.done(&key);
    }
}

#[cfg(test)]
mod tests;
