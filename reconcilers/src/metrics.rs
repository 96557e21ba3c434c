//! Prometheus metrics of the controllers, the shared caches and the Kubernetes client.
//!
//! Where controller-runtime has a metric for the same thing, the name and labels are its own, so
//! existing dashboards and alerts work unchanged; the rest live under `example_operator_`.
//! Everything registers into one [`Registry`] owned here; the binary adds its own metrics to it.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use prometheus::core::Collector;
use prometheus::{GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry};

use crate::queue::QueueMetrics;

/// The labels of every `workqueue_*` metric: controller-runtime names each queue after its
/// controller and gives both labels that name.
const QUEUE_LABELS: &[&str] = &["name", "controller"];

/// Every metric of the reconcilers, registered in [`Metrics::registry`].
#[derive(Clone, Debug)]
pub struct Metrics {
    registry: Registry,
    /// `controller_runtime_reconcile_total{controller,result}`; result is success, error,
    /// requeue_after.
    pub reconcile_total: IntCounterVec,
    /// `controller_runtime_reconcile_errors_total{controller}`.
    pub reconcile_errors_total: IntCounterVec,
    /// `controller_runtime_reconcile_time_seconds{controller}`.
    pub reconcile_time_seconds: HistogramVec,
    /// `controller_runtime_max_concurrent_reconciles{controller}`.
    pub max_concurrent_reconciles: IntGaugeVec,
    /// `controller_runtime_active_workers{controller}`.
    pub active_workers: IntGaugeVec,
    /// `workqueue_retries_total{name,controller}`: every delayed add (error retries and
    /// requeue-after), as controller-runtime ≥ 0.24 counts.
    pub workqueue_retries_total: IntCounterVec,
    /// `workqueue_depth{name,controller}`: keys ready to be worked on.
    pub workqueue_depth: IntGaugeVec,
    /// `workqueue_adds_total{name,controller}`: keys that entered the ready queue.
    pub workqueue_adds_total: IntCounterVec,
    /// `workqueue_queue_duration_seconds{name,controller}`: ready → handed to a worker.
    pub workqueue_queue_duration_seconds: HistogramVec,
    /// `workqueue_work_duration_seconds{name,controller}`: handed to a worker → done.
    pub workqueue_work_duration_seconds: HistogramVec,
    /// `workqueue_unfinished_work_seconds{name,controller}`: summed age of work in progress.
    pub workqueue_unfinished_work_seconds: GaugeVec,
    /// `workqueue_longest_running_processor_seconds{name,controller}`: age of the oldest.
    pub workqueue_longest_running_processor_seconds: GaugeVec,
    /// `controller_runtime_reconcile_panics_total{controller}`: reconciles that panicked.
    pub reconcile_panics_total: IntCounterVec,
    /// `controller_runtime_terminal_reconcile_errors_total{controller}`: reconciles that ended in
    /// an error retrying cannot fix (reported in status, not retried with backoff).
    pub terminal_reconcile_errors_total: IntCounterVec,
    /// `rest_client_requests_total{code,method,host}`: every attempt, a retried one too.
    pub rest_client_requests_total: IntCounterVec,
    /// `rest_client_request_duration_seconds{verb,host}`: from sending an attempt to its
    /// response headers (client-go's series and buckets; `verb` is the HTTP method).
    pub rest_client_request_duration_seconds: HistogramVec,
    /// `rest_client_request_retries_total{code,verb,host}`: attempts retried, by the code that
    /// made the client retry (429, 503, 504).
    pub rest_client_request_retries_total: IntCounterVec,
    /// `controller_runtime_reconcile_timeouts_total{controller}`: reconciles cancelled at the
    /// reconcile timeout.
    pub reconcile_timeouts_total: IntCounterVec,
    /// `example_operator_reconcile_errors_by_reason_total{controller,reason}`.
    pub reconcile_errors_by_reason: IntCounterVec,
    /// `example_operator_watch_events_total{resource,type}`.
    pub watch_events_total: IntCounterVec,
    /// `example_operator_cache_objects{resource}`.
    pub cache_objects: IntGaugeVec,
    /// `example_operator_cache_synced{resource}`: 1 once the shared cache completed its first
    /// list, 0 before (a controller waits for its caches, so 0 on the leader means no reconciles).
    pub cache_synced: IntGaugeVec,
}

impl Metrics {
    /// Creates the metrics in a fresh registry.
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| -> Result<IntCounterVec, prometheus::Error> {
            let metric = IntCounterVec::new(Opts::new(name, help), labels)?;
            registry.register(Box::new(metric.clone()))?;
            Ok(metric)
        };
        let gauge = |name: &str, help: &str, labels: &[&str]| -> Result<IntGaugeVec, prometheus::Error> {
            let metric = IntGaugeVec::new(Opts::new(name, help), labels)?;
            registry.register(Box::new(metric.clone()))?;
            Ok(metric)
        };
        let reconcile_time_seconds = HistogramVec::new(
            HistogramOpts::new(
                "controller_runtime_reconcile_time_seconds",
                "Length of time per reconciliation per controller",
            )
            // controller-runtime's buckets, so its dashboards' quantiles read the same.
            .buckets(vec![
                0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0,
                1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 15.0, 20.0, 25.0, 30.0,
                40.0, 50.0, 60.0,
            ]),
            &["controller"],
        )?;
        registry.register(Box::new(reconcile_time_seconds.clone()))?;
        let rest_client_request_duration_seconds = HistogramVec::new(
            HistogramOpts::new(
                "rest_client_request_duration_seconds",
                "Request latency in seconds. Broken down by verb, and host.",
            )
            // client-go's buckets.
            .buckets(vec![0.005, 0.025, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0]),
            &["verb", "host"],
        )?;
        registry.register(Box::new(rest_client_request_duration_seconds.clone()))?;
        // client-go's workqueue buckets: 10 ns to 1000 s, ten per decade step.
        let queue_histogram = |name: &str, help: &str| -> Result<HistogramVec, prometheus::Error> {
            let buckets = prometheus::exponential_buckets(10e-9, 10.0, 12)?;
            let metric = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), QUEUE_LABELS)?;
            registry.register(Box::new(metric.clone()))?;
            Ok(metric)
        };
        let float_gauge = |name: &str, help: &str| -> Result<GaugeVec, prometheus::Error> {
            let metric = GaugeVec::new(Opts::new(name, help), QUEUE_LABELS)?;
            registry.register(Box::new(metric.clone()))?;
            Ok(metric)
        };
        Ok(Self {
            workqueue_depth: gauge("workqueue_depth", "Current depth of workqueue", QUEUE_LABELS)?,
            workqueue_adds_total: counter(
                "workqueue_adds_total",
                "Total number of adds handled by workqueue",
                QUEUE_LABELS,
            )?,
            workqueue_queue_duration_seconds: queue_histogram(
                "workqueue_queue_duration_seconds",
                "How long in seconds an item stays in workqueue before being requested",
            )?,
            workqueue_work_duration_seconds: queue_histogram(
                "workqueue_work_duration_seconds",
                "How long in seconds processing an item from workqueue takes.",
            )?,
            workqueue_unfinished_work_seconds: float_gauge(
                "workqueue_unfinished_work_seconds",
                "How many seconds of work has been done that is in progress and hasn't been observed by work_duration. Large values indicate stuck threads. One can deduce the number of stuck threads by observing the rate at which this increases.",
            )?,
            workqueue_longest_running_processor_seconds: float_gauge(
                "workqueue_longest_running_processor_seconds",
                "How many seconds has the longest running processor for workqueue been running.",
            )?,
            terminal_reconcile_errors_total: counter(
                "controller_runtime_terminal_reconcile_errors_total",
                "Total number of terminal reconciliation errors per controller",
                &["controller"],
            )?,
            reconcile_panics_total: counter(
                "controller_runtime_reconcile_panics_total",
                "Total number of reconciliation panics per controller",
                &["controller"],
            )?,
            reconcile_total: counter(
                "controller_runtime_reconcile_total",
                "Total number of reconciliations per controller",
                &["controller", "result"],
            )?,
            reconcile_errors_total: counter(
                "controller_runtime_reconcile_errors_total",
                "Total number of reconciliation errors per controller",
                &["controller"],
            )?,
            reconcile_time_seconds,
            max_concurrent_reconciles: gauge(
                "controller_runtime_max_concurrent_reconciles",
                "Maximum number of concurrent reconciles per controller",
                &["controller"],
            )?,
            active_workers: gauge(
                "controller_runtime_active_workers",
                "Number of currently used workers per controller",
                &["controller"],
            )?,
            workqueue_retries_total: counter(
                "workqueue_retries_total",
                "Total number of retries handled by workqueue",
                QUEUE_LABELS,
            )?,
            rest_client_requests_total: counter(
                "rest_client_requests_total",
                "Number of HTTP requests, partitioned by status code, method, and host.",
                &["code", "method", "host"],
            )?,
            rest_client_request_duration_seconds,
            rest_client_request_retries_total: counter(
                "rest_client_request_retries_total",
                "Number of request retries, partitioned by status code, verb, and host.",
                &["code", "verb", "host"],
            )?,
            reconcile_timeouts_total: counter(
                "controller_runtime_reconcile_timeouts_total",
                "Total number of reconciliation timeouts per controller",
                &["controller"],
            )?,
            reconcile_errors_by_reason: counter(
                "example_operator_reconcile_errors_by_reason_total",
                "Reconcile errors per controller and error reason",
                &["controller", "reason"],
            )?,
            watch_events_total: counter(
                "example_operator_watch_events_total",
                "Watch events received per resource and event type",
                &["resource", "type"],
            )?,
            cache_objects: gauge("example_operator_cache_objects", "Objects held in each shared cache", &["resource"])?,
            cache_synced: gauge(
                "example_operator_cache_synced",
                "Whether each shared cache has completed its initial list (1) or not (0)",
                &["resource"],
            )?,
            registry,
        })
    }

    /// The registry holding every metric, for `/metrics` and for the binary's own metrics.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// A tower layer for the Kubernetes client that counts every request by method and code.
    pub fn rest_client_layer(&self, host: impl Into<String>) -> RestClientMetricsLayer {
        RestClientMetricsLayer {
            requests: self.rest_client_requests_total.clone(),
            durations: self.rest_client_request_duration_seconds.clone(),
            retries: self.rest_client_request_retries_total.clone(),
            host: host.into(),
        }
    }

    /// Requests with `method` counted so far, whatever their code.
    pub fn requests_with_method(&self, method: &str) -> u64 {
        self.rest_client_requests_total
            .collect()
            .iter()
            .flat_map(|family| family.get_metric())
            .filter(|metric| metric.get_label().iter().any(|l| l.name() == "method" && l.value() == method))
            .map(|metric| metric.get_counter().get_value() as u64)
            .sum()
    }

    /// Requests counted so far as `METHOD code: count` lines, for failure messages.
    pub fn request_summary(&self) -> String {
        let mut lines: Vec<String> = self
            .rest_client_requests_total
            .collect()
            .iter()
            .flat_map(|family| family.get_metric())
            .map(|metric| {
                let label = |name: &str| {
                    metric
                        .get_label()
                        .iter()
                        .find(|l| l.name() == name)
                        .map(|l| l.value().to_owned())
                        .unwrap_or_default()
                };
                format!("{} {}: {}", label("method"), label("code"), metric.get_counter().get_value())
            })
            .collect();
        lines.sort();
        lines.join(", ")
    }

    /// Write requests (POST, PUT, PATCH, DELETE) counted so far.
    pub fn write_requests(&self) -> u64 {
        ["POST", "PUT", "PATCH", "DELETE"].iter().map(|m| self.requests_with_method(m)).sum()
    }

    /// Everything registered, in the Prometheus text format.
    pub fn text(&self) -> Result<String, prometheus::Error> {
        prometheus::TextEncoder::new().encode_to_string(&self.registry.gather())
    }

    /// Creates every per-controller series of `controller` at zero (controller-runtime does the
    /// same), so an alert on, say, `result="error"` finds a series before the first error.
    pub fn initialize_controller(&self, controller: &str) {
        for result in ["success", "error", "requeue", "requeue_after"] {
            self.reconcile_total.with_label_values(&[controller, result]);
        }
        self.reconcile_errors_total.with_label_values(&[controller]);
        self.terminal_reconcile_errors_total.with_label_values(&[controller]);
        self.reconcile_panics_total.with_label_values(&[controller]);
        self.reconcile_timeouts_total.with_label_values(&[controller]);
        self.reconcile_time_seconds.with_label_values(&[controller]);
        self.active_workers.with_label_values(&[controller]);
        let _ = self.queue_metrics(controller);
    }

    /// The `workqueue_*` metrics of `controller`'s queue, every series present from the start.
    pub fn queue_metrics(&self, controller: &str) -> QueueMetrics {
        let labels = [controller, controller];
        QueueMetrics {
            depth: self.workqueue_depth.with_label_values(&labels),
            adds: self.workqueue_adds_total.with_label_values(&labels),
            queue_duration: self.workqueue_queue_duration_seconds.with_label_values(&labels),
            work_duration: self.workqueue_work_duration_seconds.with_label_values(&labels),
            unfinished_work: self.workqueue_unfinished_work_seconds.with_label_values(&labels),
            longest_running: self.workqueue_longest_running_processor_seconds.with_label_values(&labels),
            retries: self.workqueue_retries_total.with_label_values(&labels),
        }
    }

    /// Reconciles of `controller` counted so far, whatever their result.
    pub fn reconciles(&self, controller: &str) -> u64 {
        self.reconcile_total
            .collect()
            .iter()
            .flat_map(|family| family.get_metric())
            .filter(|metric| metric.get_label().iter().any(|l| l.name() == "controller" && l.value() == controller))
            .map(|metric| metric.get_counter().get_value() as u64)
            .sum()
    }
}

/// Counts requests of the wrapped client service in `rest_client_requests_total`.
#[derive(Clone, Debug)]
pub struct RestClientMetricsLayer {
    requests: IntCounterVec,
    durations: HistogramVec,
    retries: IntCounterVec,
    host: String,
}

impl RestClientMetricsLayer {
    /// Where the client's retry policy counts its retries, for the same host.
    pub fn retries(&self) -> RetryCounter {
        RetryCounter { retries: self.retries.clone(), host: self.host.clone() }
    }
}

/// Counts retries in `rest_client_request_retries_total{code,verb,host}`.
#[derive(Clone, Debug)]
pub struct RetryCounter {
    retries: IntCounterVec,
    host: String,
}

impl RetryCounter {
    /// One retry of a `verb` request, caused by a response with `code` (or `<error>`).
    pub fn count(&self, code: &str, verb: &str) {
        self.retries.with_label_values(&[code, verb, self.host.as_str()]).inc();
    }
}

impl<S> tower::Layer<S> for RestClientMetricsLayer {
    type Service = RestClientMetrics<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RestClientMetrics {
            inner,
            requests: self.requests.clone(),
            durations: self.durations.clone(),
            host: self.host.clone(),
        }
    }
}

/// The service made by [`RestClientMetricsLayer`].
#[derive(Clone, Debug)]
pub struct RestClientMetrics<S> {
    inner: S,
    requests: IntCounterVec,
    durations: HistogramVec,
    host: String,
}

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for RestClientMetrics<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let attempt = Attempt {
            requests: self.requests.clone(),
            method: request.method().as_str().to_owned(),
            host: self.host.clone(),
            counted: false,
        };
        let duration = self.durations.with_label_values(&[attempt.method.as_str(), self.host.as_str()]);
        let response = self.inner.call(request);
        Box::pin(async move {
            let mut attempt = attempt;
            let started = std::time::Instant::now();
            let result = response.await;
            duration.observe(started.elapsed().as_secs_f64());
            // controller-runtime reports transport failures with the code "<error>".
            match &result {
                Ok(response) => attempt.count(response.status().as_str()),
                Err(_) => attempt.count("<error>"),
            }
            result
        })
    }
}

/// One attempt of a request, counted once: with its code, or as `<error>` when it is dropped
/// unanswered (a caller's timeout gave up on it).
struct Attempt {
    requests: IntCounterVec,
    method: String,
    host: String,
    counted: bool,
}

impl Attempt {
    fn count(&mut self, code: &str) {
        self.counted = true;
        self.requests.with_label_values(&[code, self.method.as_str(), self.host.as_str()]).inc();
    }
}

impl Drop for Attempt {
    fn drop(&mut self) {
        if !self.counted {
            self.count("<error>");
        }
    }
}
