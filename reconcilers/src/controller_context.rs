//! What every controller shares around its reconcile function: the client, the event recorder,
//! per-object backoff, and the instrumentation (metrics and one tracing span per reconcile).

use std::fmt::Debug;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::future::BoxFuture;
use kube::runtime::controller::{Config, Controller};
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::ObjectRef;
use kube::{Client, Resource};
use opentelemetry::trace::TraceContextExt;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::backoff::PerObjectBackoff;
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::owned_config_map::MANAGER;
use crate::shared_cache::wait_until_synced;

/// First retry delay after a transient error; doubles per consecutive failure.
const RETRY_BASE: Duration = Duration::from_millis(500);
/// Longest delay between retries of one object.
const RETRY_CAP: Duration = Duration::from_secs(300);

/// When a successful reconcile wants to run again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Requeue {
    /// Only when a watched object changes (level-triggered steady state).
    OnChange,
    /// After this long, e.g. to notice a conflict that resolved without an event of ours.
    After(Duration),
}

/// Per-controller plumbing shared by its reconciles.
pub struct ControllerContext<K: Resource<DynamicType = ()>> {
    /// Name in metrics and logs, e.g. `myresource`.
    pub controller: &'static str,
    pub client: Client,
    pub metrics: Metrics,
    recorder: Recorder,
    reconcile_timeout: Duration,
    pending_events: std::sync::Mutex<tokio::task::JoinSet<()>>,
    backoff: PerObjectBackoff<ObjectRef<K>>,
}

impl<K> ControllerContext<K>
where
    K: Resource<DynamicType = ()> + Send + Sync + 'static,
{
    /// Plumbing for `controller`; `instance` (the pod name) tells replicas apart in events; a
    /// reconcile running longer than `reconcile_timeout` is cancelled and retried with backoff.
    pub fn new(
        controller: &'static str,
        client: Client,
        metrics: Metrics,
        instance: Option<String>,
        reconcile_timeout: Duration,
    ) -> Self {
        let reporter = Reporter { controller: MANAGER.to_owned(), instance };
        Self {
            controller,
            recorder: Recorder::new(client.clone(), reporter),
            reconcile_timeout,
            pending_events: std::sync::Mutex::default(),
            client,
            metrics,
            backoff: PerObjectBackoff::new(RETRY_BASE, RETRY_CAP),
        }
    }

    /// Runs `reconcile` for `object` inside a span, recording controller-runtime's metrics, and
    /// forgets the object's backoff when it succeeds.
    pub async fn instrumented<Fut>(&self, object: &K, reconcile: Fut) -> Result<Action>
    where
        Fut: Future<Output = Result<Requeue>>,
    {
        let key = ObjectRef::from_obj(object);
        let span = tracing::info_span!("reconcile", controller = self.controller, object = %key, trace_id = tracing::field::Empty);
        // The OpenTelemetry layer (when installed) gives every span a trace id; carrying it as a
        // field puts it on every log line of the reconcile, for jumping from logs to traces.
        let trace_id = span.context().span().span_context().trace_id();
        if trace_id != opentelemetry::trace::TraceId::INVALID {
            span.record("trace_id", tracing::field::display(trace_id));
        }
        let workers = self.metrics.active_workers.with_label_values(&[self.controller]);
        workers.inc();
        let started = Instant::now();
        let result = tokio::time::timeout(self.reconcile_timeout, reconcile.instrument(span.clone()))
            .await
            .unwrap_or(Err(Error::Timeout(self.reconcile_timeout)));
        workers.dec();
        self.metrics
            .reconcile_time_seconds
            .with_label_values(&[self.controller])
            .observe(started.elapsed().as_secs_f64());
        let label = match &result {
            Ok(Requeue::OnChange) => "success",
            Ok(Requeue::After(_)) => "requeue_after",
            Err(_) => "error",
        };
        self.metrics.reconcile_total.with_label_values(&[self.controller, label]).inc();
        match result {
            Ok(requeue) => {
                self.backoff.reset(&key);
                Ok(match requeue {
                    Requeue::OnChange => Action::await_change(),
                    Requeue::After(delay) => Action::requeue(delay),
                })
            }
            Err(error) => {
                self.metrics.reconcile_errors_total.with_label_values(&[self.controller]).inc();
                self.metrics
                    .reconcile_errors_by_reason
                    .with_label_values(&[self.controller, error.metric_label()])
                    .inc();
                span.in_scope(|| tracing::warn!(%error, "reconcile failed"));
                Err(error)
            }
        }
    }

    /// The error policy: retry `object` after its next backoff delay.
    pub fn retry_after_error(&self, object: &K, error: &Error) -> Action {
        let key = ObjectRef::from_obj(object);
        let delay = self.backoff.next_delay(key.clone());
        self.metrics.workqueue_retries_total.with_label_values(&[self.controller, self.controller]).inc();
        tracing::debug!(controller = self.controller, object = %key, ?delay, transient = error.is_transient(), "requeue after error");
        Action::requeue(delay)
    }

    /// Publishes an event about `object` in the background, so the reconcile does not wait for
    /// it; a failure is logged. Pending events are dropped with the context (when the controller
    /// stops), so none is written after this replica stopped leading.
    pub async fn publish(&self, object: &K, type_: EventType, reason: &str, action: &str, note: String) {
        let reference: ObjectReference = object.object_ref(&());
        let event =
            Event { type_, reason: reason.to_owned(), note: Some(note), action: action.to_owned(), secondary: None };
        let recorder = self.recorder.clone();
        let mut pending = self.pending_events.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        while pending.try_join_next().is_some() {}
        pending.spawn(async move {
            if let Err(error) = recorder.publish(&event, &reference).await {
                tracing::warn!(%error, reason = %event.reason, "publishing an event failed");
            }
        });
    }
}

/// Runs `controller` with `concurrency` workers once every cache in `caches` has synced (as
/// controller-runtime waits for its informers), until `shutdown` fires; in-flight reconciles
/// then finish. Subscriptions are taken by the caller before this is awaited.
#[allow(clippy::too_many_arguments)]
pub fn run_when_synced<K, Ctx, ReconcileFut>(
    name: &'static str,
    controller: Controller<K>,
    caches: Vec<BoxFuture<'static, bool>>,
    reconcile: impl FnMut(Arc<K>, Arc<Ctx>) -> ReconcileFut + Send + 'static,
    error_policy: impl Fn(Arc<K>, &Error, Arc<Ctx>) -> Action + Send + Sync + 'static,
    context: Arc<Ctx>,
    metrics: Metrics,
    concurrency: u16,
    shutdown: CancellationToken,
) -> impl Future<Output = ()> + Send + 'static
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    Ctx: Send + Sync + 'static,
    ReconcileFut: Future<Output = Result<Action>> + Send + 'static,
{
    metrics.max_concurrent_reconciles.with_label_values(&[name]).set(i64::from(concurrency));
    let caches_synced = wait_until_synced(caches, shutdown.clone());
    let running = controller
        .with_config(Config::default().concurrency(concurrency))
        .graceful_shutdown_on(async move { shutdown.cancelled().await })
        .run(reconcile, error_policy, context)
        .for_each(|_| futures::future::ready(()));
    async move {
        if caches_synced.await {
            running.await;
        }
    }
}
