//! What every controller shares around its reconcile function: the client, the event recorder,
//! per-object backoff, and the instrumentation (metrics and one tracing span per reconcile).

use std::fmt::Debug;
use std::future::Future;
use std::time::{Duration, Instant};

use futures::FutureExt;
use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::EventType;
use kube::runtime::reflector::ObjectRef;
use kube::{Client, Resource};
use opentelemetry::trace::TraceContextExt;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::conditions::READY;
use crate::error::{Error, Result};
use crate::events::EventRecorder;
use crate::metrics::Metrics;
use crate::owned_config_map::MANAGER;

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
    recorder: std::sync::Arc<EventRecorder>,
    reconcile_timeout: Duration,
    pending_events: std::sync::Mutex<tokio::task::JoinSet<()>>,
    kind: std::marker::PhantomData<fn(&K)>,
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
        metrics.initialize_controller(controller);
        Self {
            controller,
            recorder: std::sync::Arc::new(EventRecorder::new(client.clone(), MANAGER, instance)),
            reconcile_timeout,
            pending_events: std::sync::Mutex::default(),
            client,
            metrics,
            kind: std::marker::PhantomData,
        }
    }

    /// Runs `reconcile` for `object` inside a span, with the reconcile timeout, recording
    /// controller-runtime's metrics. A panic inside it is caught, counted and returned as an
    /// error (retried with backoff), so it never takes the process down.
    pub async fn instrumented<Fut>(&self, object: &K, reconcile: Fut) -> Result<Requeue>
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
        let bounded = tokio::time::timeout(self.reconcile_timeout, reconcile.instrument(span.clone()));
        let result = match std::panic::AssertUnwindSafe(bounded).catch_unwind().await {
            Ok(Ok(finished)) => finished,
            Ok(Err(_elapsed)) => {
                self.metrics.reconcile_timeouts_total.with_label_values(&[self.controller]).inc();
                Err(Error::Timeout(self.reconcile_timeout))
            }
            Err(panic) => {
                self.metrics.reconcile_panics_total.with_label_values(&[self.controller]).inc();
                let message = panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "a panic without a message".to_owned());
                Err(Error::Panicked(message))
            }
        };
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
            Ok(requeue) => Ok(requeue),
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

    /// Writes `desired` as `object`'s status (server-side apply of the status subresource, as
    /// this operator's field manager) unless `current` already equals it; returns the written
    /// object, or `None` when nothing needed writing.
    pub async fn update_status<S>(&self, object: &K, current: Option<&S>, desired: &S) -> Result<Option<K>>
    where
        S: serde::Serialize + PartialEq,
        K: serde::de::DeserializeOwned + Clone + std::fmt::Debug,
    {
        if current == Some(desired) {
            return Ok(None);
        }
        let name = object.meta().name.as_deref().ok_or(Error::MissingField("metadata.name"))?;
        let request = kube::core::Request::new(K::url_path(&(), object.meta().namespace.as_deref()));
        let patch = serde_json::json!({
            "apiVersion": K::api_version(&()),
            "kind": K::kind(&()),
            "status": desired,
        });
        let request = request
            .patch_subresource(
                "status",
                name,
                &kube::api::PatchParams::apply(MANAGER).force(),
                &kube::api::Patch::Apply(patch),
            )
            .map_err(kube::Error::BuildRequest)?;
        Ok(Some(self.client.request::<K>(request).await?))
    }

    /// Aborts the events still being published and waits until they are gone: called when a term
    /// ends, after its reconciles stopped.
    pub async fn end_term(&self) {
        let mut pending = {
            let mut pending = self.pending_events.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            std::mem::take(&mut *pending)
        };
        if !pending.is_empty() {
            tracing::info!(controller = self.controller, events = pending.len(), "aborting the term's unsent events");
        }
        pending.shutdown().await;
    }

    /// Counts a reconcile that ended in an error retrying cannot fix (reported in status instead;
    /// controller-runtime's terminal errors).
    pub fn terminal(&self, error: &Error) {
        self.metrics.terminal_reconcile_errors_total.with_label_values(&[self.controller]).inc();
        self.metrics.reconcile_errors_by_reason.with_label_values(&[self.controller, error.metric_label()]).inc();
    }

    /// Says why `object` is not Ready with a Warning event, when its Ready condition is False.
    /// Call it after a status write that changed something, so a failure is reported once per
    /// change, not once per retry.
    pub async fn warn_if_not_ready(&self, object: &K, conditions: &[crd_types::Condition], action: &str) {
        let failing = conditions.iter().find(|c| c.type_ == READY && c.status == crd_types::ConditionStatus::False);
        if let Some(condition) = failing {
            self.publish(object, EventType::Warning, &condition.reason, action, condition.message.clone()).await;
        }
    }

    /// Publishes an event about `object` in the background, so the reconcile does not wait for
    /// it; a failure is logged. Pending events belong to the term: [`Self::end_term`] aborts and
    /// awaits them before the Lease is released, so none is written after it.
    pub async fn publish(&self, object: &K, type_: EventType, reason: &str, action: &str, note: String) {
        let reference: ObjectReference = object.object_ref(&());
        let (reason, action) = (reason.to_owned(), action.to_owned());
        let recorder = self.recorder.clone();
        let mut pending = self.pending_events.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        while pending.try_join_next().is_some() {}
        pending.spawn(async move {
            if let Err(error) = recorder.publish(&reference, type_, &reason, &action, &note).await {
                tracing::warn!(%error, %reason, "publishing an event failed");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use crd_types::{MyResource, MyResourceSpec};
    use kube::runtime::events::EventType;

    use super::ControllerContext;

    /// Counts requests that were started and requests that were dropped unanswered.
    #[derive(Default)]
    struct Counts {
        started: AtomicUsize,
        dropped: AtomicUsize,
    }

    struct Dropped(Arc<Counts>);

    impl Drop for Dropped {
        fn drop(&mut self) {
            self.0.dropped.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// An API server that never answers.
    fn silent_client(counts: Arc<Counts>) -> kube::Client {
        let service = tower::service_fn(move |_: http::Request<kube::client::Body>| {
            let counts = counts.clone();
            async move {
                counts.started.fetch_add(1, Ordering::SeqCst);
                let _dropped = Dropped(counts);
                std::future::pending::<Result<http::Response<String>, std::convert::Infallible>>().await
            }
        });
        kube::Client::new(service, "default")
    }

    /// An event still being published when a term ends is aborted, and gone when `end_term`
    /// returns: it cannot land after the Lease is released.
    #[tokio::test]
    async fn a_terms_unsent_events_are_aborted_when_it_ends() -> Result<(), Box<dyn std::error::Error>> {
        let counts = Arc::new(Counts::default());
        let metrics = crate::Metrics::new()?;
        let context = ControllerContext::<MyResource>::new(
            "test",
            silent_client(counts.clone()),
            metrics,
            None,
            std::time::Duration::from_secs(60),
        );
        let mut object = MyResource::new("a", MyResourceSpec { message: "m".into() });
        object.metadata.namespace = Some("default".into());
        context.publish(&object, EventType::Normal, "Created", "Create", "created".into()).await;
        while counts.started.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        context.end_term().await;
        assert_eq!(counts.dropped.load(Ordering::SeqCst), 1, "the pending event's request was dropped");
        context.end_term().await;
        Ok(())
    }

    #[tokio::test(start_paused = true)]
    async fn a_reconcile_cancelled_at_its_timeout_is_counted_as_one() -> Result<(), Box<dyn std::error::Error>> {
        let metrics = crate::Metrics::new()?;
        let timeout = std::time::Duration::from_secs(5);
        let context = ControllerContext::<MyResource>::new(
            "test",
            silent_client(Arc::new(Counts::default())),
            metrics.clone(),
            None,
            timeout,
        );
        let object = MyResource::new("a", MyResourceSpec { message: "m".into() });
        let result = context.instrumented(&object, std::future::pending()).await;
        assert!(matches!(result, Err(crate::Error::Timeout(t)) if t == timeout), "{result:?}");
        assert_eq!(metrics.reconcile_timeouts_total.with_label_values(&["test"]).get(), 1);
        Ok(())
    }
}
