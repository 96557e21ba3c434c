//! `cargo xtask bench`: the benchmarks of SPEC §8, on a control plane of their own (started for the
//! run, stopped after it) so nothing else shares the API server. Every figure is the median of
//! several interleaved rounds with the phase order rotated, each round on fresh namespaces and a
//! compacted, defragmented etcd; requests are counted by the API server's audit log, not by the
//! clients. Prints a table with medians and spreads and writes `target/bench/results.json`
//! (`results-<objects>.json` for another size), rewritten after every round so an interrupted run
//! keeps the rounds it finished.

mod audit;
mod convergence;
mod cpu;
mod identity;
mod report;
mod scenarios;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use crd_types::{MyResource, MyResourceSpec, Phase};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, DeleteParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use serde_json::json;
use tokio::process::{Child, Command};

use crate::cluster::{self, ClusterState};
use crate::harness::{AUDIT_LOG, free_port, http_get};

pub use convergence::ConvergencePhase;

/// MyResources per phase unless `--objects` says otherwise; its results go to `results.json`.
pub const DEFAULT_OBJECTS: usize = 1000;
/// Rounds per run unless `--rounds` says otherwise.
pub const DEFAULT_ROUNDS: usize = 5;
/// Namespaces the 64 KiB broadcast is fanned out to.
pub const FANOUT_NAMESPACES: usize = 2000;
/// The chart's default memory limit, which the fan-out must stay within.
const CHART_MEMORY_LIMIT_MIB: f64 = 256.0;
/// Parallel creates (and deletes) from the benchmark's admin client.
const CREATE_PARALLELISM: usize = 32;
/// How long one convergence may take before the run fails.
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(1800);

/// What `cargo xtask bench` was asked for.
#[derive(Clone, Debug)]
pub struct Options {
    /// MyResources per convergence phase (and in the restart and failover scenarios).
    pub objects: usize,
    /// Interleaved rounds; every figure is their median.
    pub rounds: usize,
    /// Namespaces of the fan-out scenario ([`FANOUT_NAMESPACES`] unless reduced for a smoke run).
    pub fanout_namespaces: usize,
}

/// Runs every benchmark on a private control plane and reports them.
pub fn run(root: &Path, options: &Options) -> Result<()> {
    anyhow::ensure!(options.rounds >= 1 && options.objects >= 1, "--rounds and --objects must be at least 1");
    let operator = crate::build_release_operator(root)?;
    let peer = cluster::binaries::ensure_peer(root)?;
    eprintln!("starting a private control plane for the benchmarks (the work tree's cluster is left alone)");
    let state = cluster::start_private(root, cluster::binaries::DEFAULT_KUBERNETES)?;
    eprintln!(
        "benchmarking against {} (Kubernetes {}): {} objects, {} rounds, fan-out to {} namespaces",
        state.server, state.kubernetes_version, options.objects, options.rounds, options.fanout_namespaces
    );
    let results = results_path(root, options.objects);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let outcome = runtime.block_on(async {
        let admin = cluster::admin_client(&state).await?;
        install_crds(root, &state)?;
        let kubeconfig = identity::ensure(&admin, &state).await?;
        let bench = Bench {
            results: results.clone(),
            admin,
            kubeconfig,
            operator,
            peer,
            state: state.clone(),
            options: options.clone(),
            audit: Mutex::new(audit::Tally::new(state.dir.join(AUDIT_LOG))),
            cpu: cpu::Watched { apiserver: state.component("kube-apiserver")?.pid, etcd: state.component("etcd")?.pid },
        };
        bench.all_rounds().await
    });
    drop(runtime);
    if let Err(error) = state.stop_private() {
        eprintln!("stopping the private control plane: {error:#}");
    }
    let rounds = outcome?;
    let report = report::Report::new(options, rounds);
    report.print();
    report.write(&results)?;
    println!("\nwrote {}", results.display());
    Ok(())
}

/// `target/bench/results.json` for the default size, `results-<objects>.json` for another, so the
/// 10,000-object run does not replace the 1,000-object one.
fn results_path(root: &Path, objects: usize) -> PathBuf {
    let dir = crate::target_dir(root).join("bench");
    if objects == DEFAULT_OBJECTS { dir.join("results.json") } else { dir.join(format!("results-{objects}.json")) }
}

/// Applies the CRDs with the private control plane's own kubectl.
fn install_crds(root: &Path, state: &cluster::ClusterState) -> Result<()> {
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
            .env("PATH", state.path_with_tools()?)
            .arg("--kubeconfig")
            .arg(&state.admin_kubeconfig)
            .args(&args)
            .stdout(std::process::Stdio::null())
            .status()?;
        anyhow::ensure!(status.success(), "kubectl {} failed", args.join(" "));
    }
    Ok(())
}

/// Everything one round measured.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Round {
    pub round: usize,
    /// The convergence phases in the order they ran.
    pub order: Vec<String>,
    pub phases: Vec<convergence::PhaseResult>,
    pub resync_writes: u64,
    pub restart: scenarios::RestartLatency,
    pub failover_sigterm_s: f64,
    pub failover_sigkill_s: f64,
    pub fanout_s: f64,
    pub fanout_peak_rss_mib: f64,
}

/// The run's shared state: the private cluster, the binaries, the identity, the audit tally.
struct Bench {
    admin: Client,
    /// The benchmark identity's kubeconfig.
    kubeconfig: PathBuf,
    operator: PathBuf,
    peer: PathBuf,
    state: ClusterState,
    options: Options,
    audit: Mutex<audit::Tally>,
    /// The control plane's processes, for CPU time per phase.
    cpu: cpu::Watched,
    /// Where the report so far is written after each round.
    results: PathBuf,
}

impl Bench {
    /// Runs every round. Nothing is cleaned up after the last one: the private control plane is
    /// stopped right after (deleting 2,000 namespaces first took minutes for nothing).
    async fn all_rounds(&self) -> Result<Vec<Round>> {
        let fanout = scenarios::FanOut::create_namespaces(self).await?;
        let mut rounds = Vec::new();
        for round in 1..=self.options.rounds {
            eprintln!("\n== round {round} of {} ==", self.options.rounds);
            let started = Instant::now();
            rounds.push(self.round(round, &fanout).await.with_context(|| format!("round {round}"))?);
            let partial = report::Report::new(&self.options, rounds.clone());
            if let Err(error) = partial.write(&self.results) {
                eprintln!("  writing the rounds so far to {}: {error:#}", self.results.display());
            }
            if round < self.options.rounds {
                self.between_rounds().await?;
            }
            eprintln!("round {round} took {:.0} s", started.elapsed().as_secs_f64());
        }
        Ok(rounds)
    }

    async fn round(&self, round: usize, fanout: &scenarios::FanOut) -> Result<Round> {
        let order = ConvergencePhase::rotated(round);
        let mut result = Round { round, order: order.iter().map(ConvergencePhase::name).collect(), ..Round::default() };
        let mut in_sync_namespace = None;
        for phase in order {
            let namespace = format!("bench-r{round}-{}", phase.name());
            let measured = convergence::run(self, round, phase, &namespace).await?;
            eprintln!("  {}", measured.summary(self.options.objects));
            if phase == ConvergencePhase::Operator(convergence::DEFAULT_CONCURRENCY) {
                in_sync_namespace = Some(namespace);
            }
            result.phases.push(measured);
        }
        let namespace = in_sync_namespace.context("the round ran no operator at its default concurrency")?;
        result.resync_writes = scenarios::resync(self, round, &namespace).await?;
        eprintln!("  full resync: {} writes", result.resync_writes);
        result.restart = scenarios::restart_latency(self, round, &namespace).await?;
        eprintln!(
            "  restart, change → ConfigMap over {} changes: p50 {:.0} ms, p99 {:.0} ms",
            result.restart.changes, result.restart.p50_ms, result.restart.p99_ms
        );
        let (sigterm, sigkill) = scenarios::failover(self, round, &namespace).await?;
        result.failover_sigterm_s = sigterm;
        result.failover_sigkill_s = sigkill;
        eprintln!("  failover over {} objects: SIGTERM {sigterm:.2} s, SIGKILL {sigkill:.2} s", self.options.objects);
        let (seconds, rss) = fanout.run(self, round).await?;
        result.fanout_s = seconds;
        result.fanout_peak_rss_mib = rss;
        eprintln!(
            "  fan-out of 64 KiB to {} namespaces: {seconds:.2} s, operator peak RSS {rss:.1} MiB",
            fanout.namespaces.len()
        );
        Ok(result)
    }

    /// Deletes the round's namespaces (waiting until they are gone), then compacts and
    /// defragments etcd, so the next round starts from the same database size.
    async fn between_rounds(&self) -> Result<()> {
        let namespaces: Api<Namespace> = Api::all(self.admin.clone());
        let names: Vec<String> = namespaces
            .list(&Default::default())
            .await?
            .items
            .iter()
            .map(|n| n.name_any())
            .filter(|n| n.starts_with("bench-r"))
            .collect();
        eprintln!("  deleting {} namespaces, then compacting and defragmenting etcd", names.len());
        self.delete_namespaces(&names).await?;
        let state = self.state.clone();
        let revision = tokio::task::spawn_blocking(move || cluster::compact_and_defragment_etcd(&state)).await??;
        eprintln!("  etcd compacted at revision {revision} and defragmented");
        Ok(())
    }

    async fn create_namespace(&self, name: &str, labels: serde_json::Value) -> Result<()> {
        let namespace: Namespace = serde_json::from_value(json!({"metadata": {"name": name, "labels": labels}}))?;
        Api::<Namespace>::all(self.admin.clone()).create(&PostParams::default(), &namespace).await?;
        Ok(())
    }

    /// Deletes `names` and waits until every one is gone (its objects deleted by the namespace
    /// controller).
    async fn delete_namespaces(&self, names: &[String]) -> Result<()> {
        let api: Api<Namespace> = Api::all(self.admin.clone());
        futures::stream::iter(names)
            .map(|name| {
                let api = api.clone();
                async move {
                    match api.delete(name, &DeleteParams::default()).await {
                        Ok(_) => Ok(()),
                        Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
                        Err(error) => Err(anyhow::Error::from(error).context(format!("deleting namespace {name}"))),
                    }
                }
            })
            .buffer_unordered(CREATE_PARALLELISM)
            .try_collect::<Vec<()>>()
            .await?;
        let wanted: HashSet<&str> = names.iter().map(String::as_str).collect();
        let deadline = Instant::now() + Duration::from_secs(1800);
        loop {
            let left = api
                .list(&Default::default())
                .await?
                .items
                .iter()
                .filter(|n| wanted.contains(n.name_any().as_str()))
                .count();
            if left == 0 {
                return Ok(());
            }
            anyhow::ensure!(Instant::now() < deadline, "{left} namespaces still terminating after 30 minutes");
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// Creates `self.options.objects` MyResources in `namespace`, sending each created object on
    /// `created`.
    async fn create_resources(
        &self,
        namespace: &str,
        created: Option<tokio::sync::mpsc::UnboundedSender<MyResource>>,
    ) -> Result<()> {
        let api: Api<MyResource> = Api::namespaced(self.admin.clone(), namespace);
        futures::stream::iter(0..self.options.objects)
            .map(|i| {
                let api = api.clone();
                let created = created.clone();
                async move {
                    let resource = MyResource::new(&object_name(i), MyResourceSpec { message: format!("message {i}") });
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
        let api: Api<MyResource> = Api::namespaced(self.admin.clone(), namespace);
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

    /// Starts the release operator as the benchmark identity; its User-Agent names `identity`.
    /// `namespace` scopes it (and holds its Lease) when given.
    fn start_operator(&self, identity: &str, namespace: Option<&str>, extra: &[&str]) -> Result<Process> {
        let metrics_port = free_port()?;
        let log = std::fs::File::create(self.log_path(identity))?;
        let mut command = Command::new(&self.operator);
        command
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(["--identity", identity, "--metrics-bind-address", &format!("127.0.0.1:{metrics_port}")])
            .args(["--health-probe-bind-address", "0"])
            .args(extra)
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true);
        if let Some(namespace) = namespace {
            command.args(["--watch-namespace", namespace, "--leader-election-namespace", namespace]);
        }
        Ok(Process { child: command.spawn().context("starting the operator")?, metrics_port })
    }

    /// Where a benchmarked process writes its log (kept after the private cluster is gone).
    fn log_path(&self, name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("example-operator-bench-{name}.log"))
    }

    /// Reads the audit log up to now and returns the requests of the client labelled `label`.
    fn audited(&self, label: &str) -> Result<audit::Requests> {
        let mut tally = self.audit.lock().unwrap_or_else(|p| p.into_inner());
        tally.refresh()?;
        Ok(tally.of(label))
    }
}

/// The name of the `i`th benchmark object.
fn object_name(i: usize) -> String {
    format!("bench-{i:05}")
}

/// A benchmarked process with its metrics port (0 for the peer, which serves none).
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

    async fn wait_for_metrics(&self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.metrics().await.is_err() {
            anyhow::ensure!(Instant::now() < deadline, "the operator never served /metrics");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    fn signal(&self, signal: nix::sys::signal::Signal) -> Result<()> {
        let pid = i32::try_from(self.pid()?)?;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal)?;
        Ok(())
    }

    /// SIGTERM, then waits for the exit (so its watches end and the audit log has them).
    async fn stop(mut self) -> Result<()> {
        self.signal(nix::sys::signal::Signal::SIGTERM)?;
        tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await??;
        Ok(())
    }
}
