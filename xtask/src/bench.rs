//! `cargo xtask bench`: the benchmarks of SPEC §8 against the local control plane. Every figure
//! is measured in the same run as what it is compared with, so machine noise mostly cancels:
//! convergence against the physical limit (the same writes from a bare client) and against a
//! controller-runtime peer, API requests per object, writes on a resync, peak memory against the
//! peer, spec-change latency, failover, and a broadcast fan-out. Prints a table and writes
//! `target/bench/results.json`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use crd_types::{MessageBroadcast, MessageBroadcastSpec, MyResource, MyResourceSpec, Phase};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};
use serde_json::json;
use tokio::process::{Child, Command};

use crate::cluster;
use crate::harness::{free_port, http_get, sum_samples};

/// Reconciles at once, for the operator, the peer and the bare client alike.
const CONCURRENCY: usize = 4;
/// Parallel creates from the benchmark client.
const CREATE_PARALLELISM: usize = 16;
const FANOUT_NAMESPACES: usize = 300;
const LATENCY_CHANGES: usize = 200;
const LATENCY_INTERVAL: Duration = Duration::from_millis(50);

/// Everything `results.json` reports.
#[derive(Debug, Default, serde::Serialize)]
struct Results {
    objects: usize,
    concurrency: usize,
    operator_converge_s: f64,
    peer_converge_s: f64,
    limit_s: f64,
    converge_vs_limit: f64,
    converge_vs_peer: f64,
    requests_per_object: f64,
    resync_writes: f64,
    operator_peak_rss_mib: f64,
    peer_peak_rss_mib: f64,
    rss_vs_peer: f64,
    latency_p50_ms: f64,
    latency_p99_ms: f64,
    failover_sigterm_s: f64,
    failover_sigkill_s: f64,
    broadcast_fanout_s: f64,
    broadcast_namespaces: usize,
}

/// Runs every benchmark with `objects` MyResources.
pub fn run(root: &Path, objects: usize) -> Result<()> {
    let operator = crate::build_release_operator(root)?;
    let peer = cluster::binaries::ensure_peer(root)?;
    let (state, started) = cluster::up(root, false)?;
    eprintln!("benchmarking against {} (Kubernetes {}) with {objects} objects", state.server, state.kubernetes_version);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let outcome = runtime.block_on(async {
        let client = cluster::admin_client(&state).await?;
        install_crds(root, &state.admin_kubeconfig)?;
        let bench = Bench {
            client,
            kubeconfig: state.admin_kubeconfig.clone(),
            operator,
            peer,
            objects,
            run_id: format!("{:06x}", rand::random::<u32>() & 0xff_ffff),
        };
        bench.all().await
    });
    drop(runtime);
    if started {
        state.stop(root)?;
    }
    let results = outcome?;
    print_table(&results);
    let dir = crate::target_dir(root).join("bench");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("results.json");
    std::fs::write(&path, serde_json::to_string_pretty(&results)?)?;
    println!("\nwrote {}", path.display());
    Ok(())
}

fn install_crds(root: &Path, kubeconfig: &Path) -> Result<()> {
    let crds = crate::crdgen::crd_dir(root);
    for args in [
        vec!["apply".to_owned(), "--server-side".to_owned(), "-f".to_owned(), crds.display().to_string()],
        vec![
            "wait".into(),
            "--for=condition=Established".into(),
            "--timeout=60s".into(),
            "crd/myresources.example.com".into(),
            "crd/messagebroadcasts.example.com".into(),
        ],
    ] {
        let status = std::process::Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .args(&args)
            .stdout(std::process::Stdio::null())
            .status()?;
        anyhow::ensure!(status.success(), "kubectl {} failed", args.join(" "));
    }
    Ok(())
}

struct Bench {
    client: Client,
    kubeconfig: PathBuf,
    operator: PathBuf,
    peer: PathBuf,
    objects: usize,
    run_id: String,
}

/// A benchmarked process with its metrics port (the peer has none).
struct Process {
    child: Child,
    metrics_port: u16,
}

impl Process {
    fn pid(&self) -> Result<u32> {
        self.child.id().context("the process has exited")
    }

    /// Peak resident memory (VmHWM) in MiB.
    fn peak_rss_mib(&self) -> Result<f64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()?))?;
        let kib: f64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.split_whitespace().next())
            .context("VmHWM in /proc status")?
            .parse()?;
        Ok(kib / 1024.0)
    }

    async fn metrics(&self) -> Result<String> {
        Ok(http_get(self.metrics_port, "/metrics").await?.1)
    }

    fn signal(&self, signal: nix::sys::signal::Signal) -> Result<()> {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()? as i32), signal)?;
        Ok(())
    }

    async fn stop(mut self) -> Result<()> {
        self.signal(nix::sys::signal::Signal::SIGTERM)?;
        tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await??;
        Ok(())
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

impl Bench {
    /// Starts the release operator; `namespace` scopes it (and holds its lease) when given.
    fn start_operator(&self, identity: &str, namespace: Option<&str>, extra: &[&str]) -> Result<Process> {
        let metrics_port = free_port()?;
        let log = std::fs::File::create(std::env::temp_dir().join(format!("bench-{identity}.log")))?;
        let mut command = Command::new(&self.operator);
        command
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args([
                "--identity",
                identity,
                "--metrics-bind-address",
                &format!("127.0.0.1:{metrics_port}"),
                "--health-probe-bind-address",
                "0",
            ])
            .args(["--myresource-concurrency", &CONCURRENCY.to_string()])
            .args(extra)
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true);
        if let Some(namespace) = namespace {
            command.args(["--watch-namespace", namespace, "--leader-election-namespace", namespace]);
        }
        Ok(Process { child: command.spawn().context("starting the operator")?, metrics_port })
    }

    async fn namespace(&self, name: &str, labels: serde_json::Value) -> Result<()> {
        let namespace: Namespace = serde_json::from_value(json!({"metadata": {"name": name, "labels": labels}}))?;
        Api::<Namespace>::all(self.client.clone()).create(&PostParams::default(), &namespace).await?;
        Ok(())
    }

    /// Creates `self.objects` MyResources in `namespace`, sending each created object on `created`.
    async fn create_resources(
        &self,
        namespace: &str,
        created: Option<tokio::sync::mpsc::UnboundedSender<MyResource>>,
    ) -> Result<()> {
        let api: Api<MyResource> = Api::namespaced(self.client.clone(), namespace);
        futures::stream::iter(0..self.objects)
            .map(|i| {
                let api = api.clone();
                let created = created.clone();
                async move {
                    let resource =
                        MyResource::new(&format!("bench-{i:05}"), MyResourceSpec { message: format!("message {i}") });
                    let resource = api.create(&PostParams::default(), &resource).await?;
                    if let Some(created) = created {
                        let _ = created.send(resource);
                    }
                    Ok::<_, anyhow::Error>(())
                }
            })
            .buffer_unordered(CREATE_PARALLELISM)
            .try_collect::<Vec<()>>()
            .await?;
        Ok(())
    }

    /// Watches MyResources in `namespace` until `count` are Ready for their current generation.
    async fn all_ready(&self, namespace: &str, count: usize, timeout: Duration) -> Result<()> {
        let api: Api<MyResource> = Api::namespaced(self.client.clone(), namespace);
        let mut ready = HashSet::new();
        let stream = watcher::watcher(api, watcher::Config::default()).default_backoff().applied_objects();
        let mut stream = std::pin::pin!(stream);
        let deadline = tokio::time::Instant::now() + timeout;
        while ready.len() < count {
            let next = tokio::time::timeout_at(deadline, stream.next())
                .await
                .with_context(|| format!("{} of {count} Ready in {timeout:?}", ready.len()))?;
            let Some(resource) = next.transpose()? else { bail!("the watch ended") };
            let status = resource.status.as_ref();
            if status.and_then(|s| s.phase) == Some(Phase::Ready)
                && status.and_then(|s| s.observed_generation) == resource.metadata.generation
            {
                ready.insert(resource.name_any());
            }
        }
        Ok(())
    }

    /// Seconds from the first create until every object is Ready, with `driver` reconciling.
    async fn converge(&self, namespace: &str) -> Result<f64> {
        let started = Instant::now();
        let (created, ready) = tokio::join!(
            self.create_resources(namespace, None),
            self.all_ready(namespace, self.objects, Duration::from_secs(1800))
        );
        created?;
        ready?;
        Ok(started.elapsed().as_secs_f64())
    }

    /// The physical limit: the operator's writes per object (create the ConfigMap, apply the
    /// status) issued by a bare client with the same concurrency, pipelined with the creates.
    async fn limit(&self, namespace: &str) -> Result<f64> {
        let started = Instant::now();
        let (sender, receiver) = tokio::sync::mpsc::unbounded_channel::<MyResource>();
        let receiver = tokio_stream_from(receiver);
        let client = self.client.clone();
        let ns = namespace.to_owned();
        let writer = async move {
            receiver
                .map(|resource| {
                    let client = client.clone();
                    let ns = ns.clone();
                    async move { write_like_the_operator(&client, &ns, &resource).await }
                })
                .buffer_unordered(CONCURRENCY)
                .try_collect::<Vec<()>>()
                .await
        };
        let (created, written) = tokio::join!(self.create_resources(namespace, Some(sender)), writer);
        created?;
        written?;
        Ok(started.elapsed().as_secs_f64())
    }

    async fn all(&self) -> Result<Results> {
        let mut results = Results {
            objects: self.objects,
            concurrency: CONCURRENCY,
            broadcast_namespaces: FANOUT_NAMESPACES,
            ..Results::default()
        };
        let id = &self.run_id;

        // The physical limit.
        let limit_ns = format!("bench-limit-{id}");
        self.namespace(&limit_ns, json!({})).await?;
        results.limit_s = self.limit(&limit_ns).await?;
        eprintln!("limit: {:.2}s", results.limit_s);

        // The controller-runtime peer.
        let peer_ns = format!("bench-peer-{id}");
        self.namespace(&peer_ns, json!({})).await?;
        let log = std::fs::File::create(std::env::temp_dir().join("bench-peer.log"))?;
        let peer = Process {
            child: Command::new(&self.peer)
                .args(["--concurrency", &CONCURRENCY.to_string(), "--namespace", &peer_ns])
                .env("KUBECONFIG", &self.kubeconfig)
                .stdout(log.try_clone()?)
                .stderr(log)
                .kill_on_drop(true)
                .spawn()
                .context("starting the controller-runtime peer")?,
            metrics_port: 0,
        };
        results.peer_converge_s = self.converge(&peer_ns).await?;
        results.peer_peak_rss_mib = peer.peak_rss_mib()?;
        eprintln!("peer: {:.2}s, {:.1} MiB", results.peer_converge_s, results.peer_peak_rss_mib);
        peer.stop().await?;

        // The operator.
        let ns = format!("bench-operator-{id}");
        self.namespace(&ns, json!({})).await?;
        let operator = self.start_operator("bench-operator", Some(&ns), &["--leader-elect=false"])?;
        wait_for_metrics(&operator).await?;
        let before = sum_samples(&operator.metrics().await?, "rest_client_requests_total", "");
        results.operator_converge_s = self.converge(&ns).await?;
        let after = sum_samples(&operator.metrics().await?, "rest_client_requests_total", "");
        results.requests_per_object = (after - before) / self.objects as f64;
        eprintln!(
            "operator: {:.2}s, {:.2} requests per object",
            results.operator_converge_s, results.requests_per_object
        );

        let (p50, p99) = self.latency(&ns).await?;
        results.latency_p50_ms = p50;
        results.latency_p99_ms = p99;
        results.operator_peak_rss_mib = operator.peak_rss_mib()?;
        eprintln!("latency p50 {p50:.1} ms, p99 {p99:.1} ms; operator {:.1} MiB", results.operator_peak_rss_mib);
        operator.stop().await?;

        // A full resync of the in-sync namespace by a fresh operator.
        let resync = self.start_operator("bench-resync", Some(&ns), &["--leader-elect=false"])?;
        wait_for_metrics(&resync).await?;
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            let metrics = resync.metrics().await?;
            if sum_samples(&metrics, "controller_runtime_reconcile_total", "myresource") >= self.objects as f64 {
                results.resync_writes = ["POST", "PUT", "PATCH", "DELETE"]
                    .iter()
                    .map(|m| sum_samples(&metrics, "rest_client_requests_total", &format!("method=\"{m}\"")))
                    .sum();
                break;
            }
            anyhow::ensure!(Instant::now() < deadline, "the resync did not finish");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        resync.stop().await?;
        eprintln!("resync writes: {}", results.resync_writes);

        let (sigterm, sigkill) = self.failover().await?;
        results.failover_sigterm_s = sigterm;
        results.failover_sigkill_s = sigkill;
        eprintln!("failover: SIGTERM {sigterm:.2}s, SIGKILL {sigkill:.2}s");

        results.broadcast_fanout_s = self.fan_out().await?;
        eprintln!("fan-out over {FANOUT_NAMESPACES} namespaces: {:.2}s", results.broadcast_fanout_s);

        results.converge_vs_limit = results.limit_s / results.operator_converge_s;
        results.converge_vs_peer = results.peer_converge_s / results.operator_converge_s;
        results.rss_vs_peer = results.operator_peak_rss_mib / results.peer_peak_rss_mib;
        for namespace in [limit_ns, peer_ns, ns] {
            let _ = Api::<Namespace>::all(self.client.clone()).delete(&namespace, &DeleteParams::default()).await;
        }
        Ok(results)
    }

    /// Spec changes at a steady rate; milliseconds from each patch to its ConfigMap update.
    async fn latency(&self, namespace: &str) -> Result<(f64, f64)> {
        let sent: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
        let seen: Arc<Mutex<Vec<f64>>> = Arc::default();
        let config_maps: Api<ConfigMap> = Api::namespaced(self.client.clone(), namespace);
        let observer = {
            let (sent, seen) = (sent.clone(), seen.clone());
            tokio::spawn(async move {
                let stream =
                    watcher::watcher(config_maps, watcher::Config::default()).default_backoff().applied_objects();
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
        let api: Api<MyResource> = Api::namespaced(self.client.clone(), namespace);
        let mut ticker = tokio::time::interval(LATENCY_INTERVAL);
        for change in 0..LATENCY_CHANGES {
            ticker.tick().await;
            let name = format!("bench-{:05}", (change * 7919) % self.objects);
            let message = format!("latency {change}");
            sent.lock().unwrap_or_else(|p| p.into_inner()).insert(message.clone(), Instant::now());
            let api = api.clone();
            tokio::spawn(async move {
                let _ = api
                    .patch(&name, &PatchParams::default(), &Patch::Merge(json!({"spec": {"message": message}})))
                    .await;
            });
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        while seen.lock().unwrap_or_else(|p| p.into_inner()).len() < LATENCY_CHANGES && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        observer.abort();
        let mut samples = seen.lock().unwrap_or_else(|p| p.into_inner()).clone();
        anyhow::ensure!(
            samples.len() == LATENCY_CHANGES,
            "only {} of {LATENCY_CHANGES} changes reached their ConfigMap",
            samples.len()
        );
        samples.sort_by(f64::total_cmp);
        Ok((percentile(&samples, 0.5), percentile(&samples, 0.99)))
    }

    /// Seconds from signalling the leader to the standby's first reconcile, for SIGTERM then
    /// SIGKILL, with the default election timings.
    async fn failover(&self) -> Result<(f64, f64)> {
        let ns = format!("bench-failover-{}", self.run_id);
        self.namespace(&ns, json!({})).await?;
        let api: Api<MyResource> = Api::namespaced(self.client.clone(), &ns);
        api.create(&PostParams::default(), &MyResource::new("failover", MyResourceSpec { message: "x".into() }))
            .await?;
        let mut replicas = vec![
            self.start_operator("failover-0", Some(&ns), &[])?,
            self.start_operator("failover-1", Some(&ns), &[])?,
        ];
        let mut times = Vec::new();
        for (round, signal) in
            [nix::sys::signal::Signal::SIGTERM, nix::sys::signal::Signal::SIGKILL].into_iter().enumerate()
        {
            let leader = wait_for_leader(&replicas).await?;
            let standby = 1 - leader;
            wait_for_metrics(&replicas[standby]).await?;
            let before = sum_samples(&replicas[standby].metrics().await?, "controller_runtime_reconcile_total", "");
            let started = Instant::now();
            replicas[leader].signal(signal)?;
            let deadline = started + Duration::from_secs(120);
            loop {
                let now = sum_samples(
                    &replicas[standby].metrics().await.unwrap_or_default(),
                    "controller_runtime_reconcile_total",
                    "",
                );
                if now > before {
                    break;
                }
                anyhow::ensure!(Instant::now() < deadline, "the standby never reconciled");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            times.push(started.elapsed().as_secs_f64());
            // Replace the signalled replica with a fresh standby for the next round.
            let replacement = self.start_operator(&format!("failover-{}", round + 2), Some(&ns), &[])?;
            let old = std::mem::replace(&mut replicas[leader], replacement);
            drop(old);
        }
        for replica in replicas {
            let _ = replica.stop().await;
        }
        let _ = Api::<Namespace>::all(self.client.clone()).delete(&ns, &DeleteParams::default()).await;
        Ok((times[0], times[1]))
    }

    /// Seconds from creating one broadcast to a copy in each of the selected namespaces.
    async fn fan_out(&self) -> Result<f64> {
        let key = "example.com/bench-fanout";
        let namespaces: Vec<String> =
            (0..FANOUT_NAMESPACES).map(|i| format!("bench-fanout-{}-{i:03}", self.run_id)).collect();
        futures::stream::iter(namespaces.clone())
            .map(|name| async move { self.namespace(&name, json!({key: self.run_id})).await })
            .buffer_unordered(CREATE_PARALLELISM)
            .try_collect::<Vec<()>>()
            .await?;
        let operator =
            self.start_operator("bench-fanout", None, &["--leader-elect=false", "--controllers=messagebroadcast"])?;
        wait_for_metrics(&operator).await?;
        let broadcasts: Api<MessageBroadcast> = Api::all(self.client.clone());
        let name = format!("bench-fanout-{}", self.run_id);
        let selector = LabelSelector {
            match_labels: Some(BTreeMap::from([(key.to_owned(), self.run_id.clone())])),
            match_expressions: None,
        };
        let started = Instant::now();
        broadcasts
            .create(
                &PostParams::default(),
                &MessageBroadcast::new(
                    &name,
                    MessageBroadcastSpec {
                        message: "fan-out".into(),
                        namespace_selector: selector,
                        config_map_name: None,
                    },
                ),
            )
            .await?;
        let deadline = started + Duration::from_secs(600);
        loop {
            let status = broadcasts.get(&name).await?.status.unwrap_or_default();
            if status.ready_namespaces as usize == FANOUT_NAMESPACES {
                break;
            }
            anyhow::ensure!(Instant::now() < deadline, "fan-out reached {} namespaces", status.ready_namespaces);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let elapsed = started.elapsed().as_secs_f64();
        operator.stop().await?;
        let _ = broadcasts.delete(&name, &DeleteParams::default()).await;
        for namespace in namespaces {
            let _ = Api::<Namespace>::all(self.client.clone()).delete(&namespace, &DeleteParams::default()).await;
        }
        Ok(elapsed)
    }
}

/// The writes the operator makes for a new object: create the ConfigMap, apply the status.
async fn write_like_the_operator(client: &Client, namespace: &str, resource: &MyResource) -> Result<()> {
    let owner = resource.controller_owner_ref(&()).context("created object has a uid")?;
    let name = format!("{}-configmap", resource.name_any());
    let config_map: ConfigMap = serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"app.kubernetes.io/managed-by": "bench-limit"}, "ownerReferences": [owner]},
        "data": {"message": resource.spec.message},
    }))?;
    Api::<ConfigMap>::namespaced(client.clone(), namespace).create(&PostParams::default(), &config_map).await?;
    let status = json!({
        "apiVersion": "example.com/v1", "kind": "MyResource",
        "status": {"phase": "Ready", "configMapName": name, "observedGeneration": resource.metadata.generation},
    });
    Api::<MyResource>::namespaced(client.clone(), namespace)
        .patch_status(&resource.name_any(), &PatchParams::apply("bench-limit").force(), &Patch::Apply(status))
        .await?;
    Ok(())
}

fn tokio_stream_from<T: Send + 'static>(
    mut receiver: tokio::sync::mpsc::UnboundedReceiver<T>,
) -> impl futures::Stream<Item = T> {
    futures::stream::poll_fn(move |cx| receiver.poll_recv(cx))
}

async fn wait_for_metrics(process: &Process) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while process.metrics().await.is_err() {
        anyhow::ensure!(Instant::now() < deadline, "the operator never served /metrics");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
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

fn print_table(r: &Results) {
    let machine = format!("{} cores", std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0));
    println!("\nexample-operator benchmarks: {} MyResources, concurrency {}, {machine}\n", r.objects, r.concurrency);
    println!("| figure | value | compared with | ratio |");
    println!("| --- | --- | --- | --- |");
    println!(
        "| convergence, operator | {:.2} s | bare-client limit {:.2} s | {:.2} (`converge_vs_limit`, limit / operator) |",
        r.operator_converge_s, r.limit_s, r.converge_vs_limit
    );
    println!(
        "| convergence, operator | {:.2} s | controller-runtime peer {:.2} s | {:.2} (`converge_vs_peer`, peer / operator) |",
        r.operator_converge_s, r.peer_converge_s, r.converge_vs_peer
    );
    println!(
        "| peak RSS, operator | {:.1} MiB | peer {:.1} MiB | {:.2} (`rss_vs_peer`, operator / peer) |",
        r.operator_peak_rss_mib, r.peer_peak_rss_mib, r.rss_vs_peer
    );
    println!("| API requests per object to converge | {:.2} | | |", r.requests_per_object);
    println!("| writes on a full resync of an in-sync cluster | {} | goal 0 | |", r.resync_writes);
    println!(
        "| spec change → ConfigMap, p50 / p99 | {:.1} / {:.1} ms | {} changes at {}/s | |",
        r.latency_p50_ms,
        r.latency_p99_ms,
        LATENCY_CHANGES,
        1000 / LATENCY_INTERVAL.as_millis()
    );
    println!(
        "| failover, leader SIGTERM → standby reconciles | {:.2} s | lease 15 s, retry 2 s | |",
        r.failover_sigterm_s
    );
    println!(
        "| failover, leader SIGKILL → standby reconciles | {:.2} s | lease 15 s, retry 2 s | |",
        r.failover_sigkill_s
    );
    println!("| MessageBroadcast fan-out | {:.2} s | {} namespaces | |", r.broadcast_fanout_s, r.broadcast_namespaces);
}
