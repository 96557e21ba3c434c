//! The scenarios after a round's convergence phases, each over the namespace the operator
//! converged at its default concurrency (N objects, all in sync): a full resync, a restart with
//! user changes arriving behind the initial list, a failover, and a broadcast fan-out.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use crd_types::{MessageBroadcast, MessageBroadcastSpec, MyResource};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use nix::sys::signal::Signal;
use serde_json::json;

use super::{Bench, CREATE_PARALLELISM, Process, object_name};
use crate::harness::sum_samples;

/// Changes made once a restarted operator has read its initial list.
pub const RESTART_CHANGES: usize = 100;
/// The steady rate of those changes.
const RESTART_CHANGE_INTERVAL: Duration = Duration::from_millis(50);

/// Writes of a fresh operator reconciling `namespace`, already in sync: every object is
/// reconciled once and nothing should change.
pub async fn resync(bench: &Bench, round: usize, namespace: &str) -> Result<u64> {
    let label = format!("bench-r{round}-resync");
    let operator =
        bench.start_operator(&label, Some(namespace), &["--leader-elect=false", "--controllers=myresource"])?;
    operator.wait_for_metrics().await?;
    let objects = bench.options.objects as f64;
    wait_for_metric(&operator, Duration::from_secs(1800), "the resync", |metrics| {
        sum_samples(metrics, "controller_runtime_reconcile_total", "controller=\"myresource\"") >= objects
    })
    .await?;
    operator.stop().await?;
    let requests = bench.audited(&label)?;
    // Its initial list and watches at least: none means the count by User-Agent found nothing.
    anyhow::ensure!(requests.total > 0, "the audit log holds no request of {label}");
    Ok(requests.writes)
}

/// Latency of user changes to a restarted operator, from the patch to the ConfigMap holding it.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct RestartLatency {
    pub changes: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub samples_ms: Vec<f64>,
}

/// Restarts the operator over `namespace`; once its cache holds every object (the initial list
/// is read, the reconciles of the list are queued), makes [`RESTART_CHANGES`] spec changes (to
/// distinct objects, as far as there are enough) at a steady rate and times each one to its
/// ConfigMap. The live-first queue should put them ahead of the backlog.
pub async fn restart_latency(bench: &Bench, round: usize, namespace: &str) -> Result<RestartLatency> {
    let changes = RESTART_CHANGES.min(bench.options.objects);
    let sent: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let seen: Arc<Mutex<Vec<f64>>> = Arc::default();
    let config_maps: Api<ConfigMap> = Api::namespaced(bench.admin.clone(), namespace);
    let observer = {
        let (sent, seen) = (sent.clone(), seen.clone());
        tokio::spawn(async move {
            let stream = watcher::watcher(config_maps, watcher::Config::default()).default_backoff().applied_objects();
            let mut stream = std::pin::pin!(stream);
            while let Some(Ok(config_map)) = stream.next().await {
                let Some(message) = config_map.data.as_ref().and_then(|d| d.get("message")) else { continue };
                let started = sent.lock().unwrap_or_else(|p| p.into_inner()).remove(message);
                if let Some(started) = started {
                    seen.lock().unwrap_or_else(|p| p.into_inner()).push(started.elapsed().as_secs_f64() * 1000.0);
                }
            }
        })
    };
    let label = format!("bench-r{round}-restart");
    let operator =
        bench.start_operator(&label, Some(namespace), &["--leader-elect=false", "--controllers=myresource"])?;
    operator.wait_for_metrics().await?;
    let objects = bench.options.objects as f64;
    wait_for_metric(&operator, Duration::from_secs(600), "the initial list", |metrics| {
        sum_samples(metrics, "example_operator_cache_objects", "resource=\"myresources\"") >= objects
    })
    .await?;
    let api: Api<MyResource> = Api::namespaced(bench.admin.clone(), namespace);
    let mut ticker = tokio::time::interval(RESTART_CHANGE_INTERVAL);
    let mut patches = Vec::new();
    for change in 0..changes {
        ticker.tick().await;
        // A stride coprime with the object count spreads the changes over the namespace.
        let name = object_name((change * 7919) % bench.options.objects);
        let message = format!("restart r{round} change {change}");
        sent.lock().unwrap_or_else(|p| p.into_inner()).insert(message.clone(), Instant::now());
        let api = api.clone();
        patches.push(tokio::spawn(async move {
            api.patch(&name, &PatchParams::default(), &Patch::Merge(json!({"spec": {"message": message}}))).await
        }));
    }
    for patch in patches {
        patch.await?.context("patching a MyResource")?;
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while seen.lock().unwrap_or_else(|p| p.into_inner()).len() < changes && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    observer.abort();
    operator.stop().await?;
    let mut samples = seen.lock().unwrap_or_else(|p| p.into_inner()).clone();
    anyhow::ensure!(samples.len() == changes, "only {} of {changes} changes reached their ConfigMap", samples.len());
    samples.sort_by(f64::total_cmp);
    Ok(RestartLatency {
        changes,
        p50_ms: super::report::percentile(&samples, 0.5),
        p99_ms: super::report::percentile(&samples, 0.99),
        samples_ms: samples,
    })
}

/// Seconds from signalling the leader over `namespace` to the standby's first reconcile, for
/// SIGTERM then SIGKILL, with the default election timings (Lease 15 s, retry 2 s).
pub async fn failover(bench: &Bench, round: usize, namespace: &str) -> Result<(f64, f64)> {
    let identity = |n: usize| format!("bench-r{round}-failover-{n}");
    let start = |n: usize| bench.start_operator(&identity(n), Some(namespace), &["--controllers=myresource"]);
    let mut replicas = vec![start(0)?, start(1)?];
    let mut times = Vec::new();
    for (step, signal) in [Signal::SIGTERM, Signal::SIGKILL].into_iter().enumerate() {
        let leader = wait_for_leader(&replicas).await?;
        let standby = 1 - leader;
        replicas[standby].wait_for_metrics().await?;
        let before = sum_samples(&replicas[standby].metrics().await?, "controller_runtime_reconcile_total", "");
        let started = Instant::now();
        replicas[leader].signal(signal)?;
        let deadline = started + Duration::from_secs(120);
        loop {
            let metrics = replicas[standby].metrics().await.unwrap_or_default();
            if sum_samples(&metrics, "controller_runtime_reconcile_total", "") > before {
                break;
            }
            anyhow::ensure!(Instant::now() < deadline, "the standby never reconciled after {signal}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        times.push(started.elapsed().as_secs_f64());
        // The signalled replica is replaced by a fresh standby for the next step.
        let replacement = start(step + 2)?;
        drop(std::mem::replace(&mut replicas[leader], replacement));
    }
    for replica in replicas {
        let _ = replica.stop().await;
    }
    Ok((times[0], times[1]))
}

async fn wait_for_leader(replicas: &[Process]) -> Result<usize> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        for (index, replica) in replicas.iter().enumerate() {
            let metrics = replica.metrics().await.unwrap_or_default();
            if sum_samples(&metrics, "leader_election_master_status", "") == 1.0
                && sum_samples(&metrics, "controller_runtime_reconcile_total", "") > 0.0
            {
                return Ok(index);
            }
        }
        anyhow::ensure!(Instant::now() < deadline, "no replica led");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Polls the operator's /metrics until `done` holds.
async fn wait_for_metric(operator: &Process, timeout: Duration, what: &str, done: impl Fn(&str) -> bool) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if done(&operator.metrics().await.unwrap_or_default()) {
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < deadline, "{what} did not finish in {timeout:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The fan-out's namespaces, created once per run (thousands take minutes) and left to the private
/// control plane's end.
pub struct FanOut {
    pub namespaces: Vec<String>,
}

/// The label selecting the fan-out's namespaces.
const FANOUT_LABEL: &str = "example.com/bench-fanout";

impl FanOut {
    pub async fn create_namespaces(bench: &Bench) -> Result<Self> {
        let count = bench.options.fanout_namespaces;
        eprintln!("creating the {count} fan-out namespaces");
        let namespaces: Vec<String> = (0..count).map(|i| format!("bench-fanout-{i:05}")).collect();
        futures::stream::iter(&namespaces)
            .map(|name| bench.create_namespace(name, json!({FANOUT_LABEL: "yes"})))
            .buffer_unordered(CREATE_PARALLELISM)
            .try_collect::<Vec<()>>()
            .await?;
        Ok(Self { namespaces })
    }

    /// A fresh operator (broadcasts only, cluster-wide) copies a 64 KiB message into every
    /// namespace. Returns the seconds until every copy is reported and the operator's peak RSS;
    /// removes the copies again before returning.
    pub async fn run(&self, bench: &Bench, round: usize) -> Result<(f64, f64)> {
        let label = format!("bench-r{round}-fanout");
        let operator =
            bench.start_operator(&label, None, &["--leader-elect=false", "--controllers=messagebroadcast"])?;
        operator.wait_for_metrics().await?;
        let broadcasts: Api<MessageBroadcast> = Api::all(bench.admin.clone());
        let name = format!("bench-fanout-r{round}");
        let selector = LabelSelector {
            match_labels: Some(BTreeMap::from([(FANOUT_LABEL.to_owned(), "yes".to_owned())])),
            match_expressions: None,
        };
        let message = "x".repeat(crd_types::MAX_MESSAGE_LENGTH as usize);
        let spec = MessageBroadcastSpec { message, namespace_selector: selector, config_map_name: Some(name.clone()) };
        let started = Instant::now();
        broadcasts.create(&PostParams::default(), &MessageBroadcast::new(&name, spec)).await?;
        let deadline = started + Duration::from_secs(1800);
        loop {
            let status = broadcasts.get(&name).await?.status.unwrap_or_default();
            if status.ready_namespaces as usize >= self.namespaces.len() {
                break;
            }
            anyhow::ensure!(Instant::now() < deadline, "the fan-out reached {} namespaces", status.ready_namespaces);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let seconds = started.elapsed().as_secs_f64();
        let rss = operator.peak_rss_mib()?;
        operator.stop().await?;
        // The copies are owned by the broadcast: the garbage collector removes them.
        broadcasts.delete(&name, &DeleteParams::default()).await?;
        let copies: Api<ConfigMap> = Api::all(bench.admin.clone());
        let by_name = ListParams::default().fields(&format!("metadata.name={name}")).limit(1);
        let deadline = Instant::now() + Duration::from_secs(1800);
        while !copies.list_metadata(&by_name).await?.items.is_empty() {
            anyhow::ensure!(Instant::now() < deadline, "the copies of {name} were not collected");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        Ok((seconds, rss))
    }
}
