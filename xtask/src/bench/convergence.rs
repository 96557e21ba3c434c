//! One convergence phase: N MyResources created in a fresh namespace until every one is Ready,
//! reconciled by the operator, by the controller-runtime peer, or by a bare client making the
//! same writes (the limit). Times from the first create to the last Ready; requests come from the
//! audit log by the phase's User-Agent label.

use std::time::Instant;

use anyhow::{Context, Result};
use crd_types::MyResource;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, ObjectReference};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::{Client, Resource, ResourceExt};
use serde_json::json;
use tokio::process::Command;

use super::cpu::CpuTime;
use super::{Bench, CONVERGE_TIMEOUT, Process, identity};

/// The operator's default `--concurrency myresource=N`, and the peer's.
pub const DEFAULT_CONCURRENCY: usize = 4;
/// The bare client's concurrencies; the limit is the best of them.
pub const LIMIT_CONCURRENCIES: [usize; 4] = [4, 16, 64, 256];
/// The operator's concurrencies; its best setting is the fastest median.
pub const OPERATOR_CONCURRENCIES: [usize; 3] = [DEFAULT_CONCURRENCY, 16, 64];

/// Who reconciles in a phase, and at what concurrency.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ConvergencePhase {
    Limit(usize),
    Peer,
    Operator(usize),
}

impl ConvergencePhase {
    /// Every phase, in the first round's order.
    pub fn all() -> Vec<Self> {
        let limits = LIMIT_CONCURRENCIES.iter().map(|c| Self::Limit(*c));
        let operators = OPERATOR_CONCURRENCIES.iter().map(|c| Self::Operator(*c));
        limits.chain([Self::Peer]).chain(operators).collect()
    }

    /// Round `round`'s order (1-based): the list rotated by one more place each round, so no
    /// phase always runs on the coldest or the warmest API server.
    pub fn rotated(round: usize) -> Vec<Self> {
        let mut phases = Self::all();
        let len = phases.len();
        phases.rotate_left((round.saturating_sub(1) * 3) % len);
        phases
    }

    pub fn name(&self) -> String {
        match self {
            Self::Limit(c) => format!("limit-c{c}"),
            Self::Peer => format!("peer-c{DEFAULT_CONCURRENCY}"),
            Self::Operator(c) => format!("operator-c{c}"),
        }
    }
}

/// What one phase measured.
#[derive(Clone, Debug, serde::Serialize)]
pub struct PhaseResult {
    pub phase: String,
    pub seconds: f64,
    /// Requests of the reconciler the API server recorded, from its start until it stopped.
    pub requests: u64,
    pub writes: u64,
    /// Peak RSS of the reconciling process (the bare client runs inside the benchmark: none).
    pub peak_rss_mib: Option<f64>,
    /// Where the operator's time went, from its own metrics (operator phases only).
    pub operator_time: Option<OperatorTime>,
    /// CPU used from the first create until the last Ready.
    pub cpu: CpuTime,
}

/// The operator's reconciles in one phase, from its metrics when the phase ends: what each
/// reconcile took, how long keys waited in the queue, and how busy the workers were. Workers
/// that are rarely busy wait for work (the creates); workers always busy are bound by the time
/// of one reconcile.
#[derive(Clone, Debug, serde::Serialize)]
pub struct OperatorTime {
    pub reconciles: f64,
    pub mean_reconcile_ms: f64,
    pub mean_queue_wait_ms: f64,
    /// Reconcile time summed over the workers / (workers × phase time).
    pub workers_busy: f64,
}

impl OperatorTime {
    fn from_metrics(metrics: &str, concurrency: usize, seconds: f64) -> Self {
        let controller = "controller=\"myresource\"";
        let of = |name: &str| crate::harness::sum_samples(metrics, name, controller);
        let reconciles = of("controller_runtime_reconcile_time_seconds_count");
        let reconcile_s = of("controller_runtime_reconcile_time_seconds_sum");
        let queued = of("workqueue_queue_duration_seconds_count");
        let per = |sum: f64, count: f64| if count > 0.0 { sum / count * 1000.0 } else { 0.0 };
        Self {
            reconciles,
            mean_reconcile_ms: per(reconcile_s, reconciles),
            mean_queue_wait_ms: per(of("workqueue_queue_duration_seconds_sum"), queued),
            workers_busy: reconcile_s / (concurrency as f64 * seconds),
        }
    }
}

impl PhaseResult {
    pub fn summary(&self, objects: usize) -> String {
        let per = |n: u64| n as f64 / objects as f64;
        let rss = self.peak_rss_mib.map(|m| format!(", peak RSS {m:.1} MiB")).unwrap_or_default();
        let time = self
            .operator_time
            .as_ref()
            .map(|t| {
                format!(
                    "; reconcile {:.1} ms, queue wait {:.1} ms, workers busy {:.0} %",
                    t.mean_reconcile_ms,
                    t.mean_queue_wait_ms,
                    t.workers_busy * 100.0
                )
            })
            .unwrap_or_default();
        let cpu = &self.cpu;
        let reconciler = cpu.reconciler_s.map(|s| format!("reconciler {s:.1}, ")).unwrap_or_default();
        format!(
            "{:<14} {:>8.2} s, {:.2} requests ({:.2} writes) per object{rss}{time}; CPU s: {reconciler}apiserver {:.1}, etcd {:.1}, bench {:.1}, machine busy {:.0} %",
            self.phase,
            self.seconds,
            per(self.requests),
            per(self.writes),
            cpu.apiserver_s,
            cpu.etcd_s,
            cpu.bench_s,
            cpu.machine_busy * 100.0
        )
    }
}

/// Runs `phase` of `round` in a fresh `namespace`.
pub async fn run(bench: &Bench, round: usize, phase: ConvergencePhase, namespace: &str) -> Result<PhaseResult> {
    bench.create_namespace(namespace, json!({})).await?;
    let label = format!("bench-r{round}-{}", phase.name());
    let mut operator_time = None;
    let (seconds, peak_rss_mib, cpu) = match phase {
        ConvergencePhase::Limit(concurrency) => {
            let before = bench.cpu.sample(None)?;
            let seconds = limit(bench, namespace, &label, concurrency).await?;
            (seconds, None, before.until(&bench.cpu.sample(None)?))
        }
        ConvergencePhase::Peer => {
            let peer = start_peer(bench, namespace, &label)?;
            let (seconds, cpu) = converge(bench, namespace, Some(peer.pid()?)).await?;
            let rss = peer.peak_rss_mib()?;
            peer.stop().await?;
            (seconds, Some(rss), cpu)
        }
        ConvergencePhase::Operator(workers) => {
            let concurrency = format!("myresource={workers}");
            let operator = bench.start_operator(
                &label,
                Some(namespace),
                &["--leader-elect=false", "--controllers=myresource", "--concurrency", &concurrency],
            )?;
            operator.wait_for_metrics().await?;
            let (seconds, cpu) = converge(bench, namespace, Some(operator.pid()?)).await?;
            operator_time = Some(OperatorTime::from_metrics(&operator.metrics().await?, workers, seconds));
            let rss = operator.peak_rss_mib()?;
            operator.stop().await?;
            (seconds, Some(rss), cpu)
        }
    };
    let requests = bench.audited(&label)?;
    Ok(PhaseResult {
        phase: phase.name(),
        seconds,
        requests: requests.total,
        writes: requests.writes,
        peak_rss_mib,
        operator_time,
        cpu,
    })
}

/// The controller-runtime peer as the benchmark identity, watching `namespace`.
fn start_peer(bench: &Bench, namespace: &str, label: &str) -> Result<Process> {
    let log = std::fs::File::create(bench.log_path(label))?;
    let child = Command::new(&bench.peer)
        .args(["--concurrency", &DEFAULT_CONCURRENCY.to_string(), "--namespace", namespace])
        .args(["--user-agent", &identity::user_agent("example-operator-bench-peer", label)])
        .env("KUBECONFIG", &bench.kubeconfig)
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .context("starting the controller-runtime peer")?;
    Ok(Process { child, metrics_port: 0 })
}

/// Seconds from the first create until every object is Ready, and the CPU used meanwhile by
/// `reconciler` and the control plane.
async fn converge(bench: &Bench, namespace: &str, reconciler: Option<u32>) -> Result<(f64, CpuTime)> {
    let before = bench.cpu.sample(reconciler)?;
    let started = Instant::now();
    let (created, ready) = tokio::join!(
        bench.create_resources(namespace, None),
        bench.all_ready(namespace, bench.options.objects, CONVERGE_TIMEOUT)
    );
    created?;
    ready?;
    let seconds = started.elapsed().as_secs_f64();
    Ok((seconds, before.until(&bench.cpu.sample(reconciler)?)))
}

/// The limit: the operator's writes per new object (create the ConfigMap, publish the event,
/// apply the status) from a bare client at `concurrency` as the benchmark identity, pipelined
/// with the creates: nothing to watch, cache or decide.
async fn limit(bench: &Bench, namespace: &str, label: &str, concurrency: usize) -> Result<f64> {
    let client =
        identity::client(&bench.kubeconfig, &identity::user_agent("example-operator-bench-limit", label)).await?;
    let started = Instant::now();
    let (sender, mut receiver) = tokio::sync::mpsc::unbounded_channel::<MyResource>();
    let created = futures::stream::poll_fn(move |cx| receiver.poll_recv(cx));
    let writer = created
        .map(|resource| {
            let client = client.clone();
            async move { write_like_the_operator(&client, namespace, &resource).await }
        })
        .buffer_unordered(concurrency)
        .try_collect::<Vec<()>>();
    let (created, written) = tokio::join!(bench.create_resources(namespace, Some(sender)), writer);
    created?;
    written?;
    Ok(started.elapsed().as_secs_f64())
}

/// The writes the operator makes for a new object: the ConfigMap, its Normal event, the status.
async fn write_like_the_operator(client: &Client, namespace: &str, resource: &MyResource) -> Result<()> {
    let owner = resource.controller_owner_ref(&()).context("created object has a uid")?;
    let name = format!("{}-configmap", resource.name_any());
    let config_map: ConfigMap = serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"app.kubernetes.io/managed-by": "bench-limit"}, "ownerReferences": [owner]},
        "data": {"message": resource.spec.message},
    }))?;
    Api::<ConfigMap>::namespaced(client.clone(), namespace).create(&PostParams::default(), &config_map).await?;
    let event = Event {
        metadata: kube::api::ObjectMeta {
            generate_name: Some(format!("{}-", resource.name_any())),
            namespace: Some(namespace.to_owned()),
            ..Default::default()
        },
        event_time: Some(MicroTime(k8s_openapi::jiff::Timestamp::now())),
        type_: Some("Normal".into()),
        reason: Some("ConfigMapCreated".into()),
        action: Some("Created".into()),
        note: Some(format!("Created ConfigMap {name}")),
        reporting_controller: Some("example-operator-bench-limit".into()),
        reporting_instance: Some("example-operator-bench-limit".into()),
        regarding: Some(ObjectReference {
            api_version: Some("example.com/v1".into()),
            kind: Some("MyResource".into()),
            name: Some(resource.name_any()),
            namespace: Some(namespace.to_owned()),
            uid: resource.uid(),
            ..Default::default()
        }),
        ..Default::default()
    };
    Api::<Event>::namespaced(client.clone(), namespace).create(&PostParams::default(), &event).await?;
    let status = json!({
        "apiVersion": "example.com/v1", "kind": "MyResource",
        "status": {"phase": "Ready", "configMapName": name, "observedGeneration": resource.metadata.generation},
    });
    Api::<MyResource>::namespaced(client.clone(), namespace)
        .patch_status(&resource.name_any(), &PatchParams::apply("bench-limit").force(), &Patch::Apply(status))
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_phase_runs_once_a_round_and_no_phase_keeps_its_place() {
        let first = ConvergencePhase::rotated(1);
        assert_eq!(first.len(), 8);
        for round in 2..=5 {
            let order = ConvergencePhase::rotated(round);
            let mut sorted = order.iter().map(ConvergencePhase::name).collect::<Vec<_>>();
            sorted.sort();
            let mut expected = first.iter().map(ConvergencePhase::name).collect::<Vec<_>>();
            expected.sort();
            assert_eq!(sorted, expected);
            assert!(order.iter().zip(&first).all(|(a, b)| a != b), "round {round} keeps a phase in place");
        }
    }
}
