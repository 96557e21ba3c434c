//! `cargo xtask demo`: the main job on a fresh machine. On the local cluster (brought up with its
//! node when none runs) it builds the operator's image, installs the Helm chart with it, starts a
//! real Prometheus scraping both Pods, applies the samples and shows them converge. With a cluster
//! in KUBECONFIG (where the local image cannot be had) it installs the CRDs and runs two replicas
//! as local processes instead. It runs until Ctrl-C (or, with `--once`, until the samples
//! converged), then removes what it started.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use crd_types::{MessageBroadcast, MyResource, Phase};
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::Api;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::{cluster, crdgen};
use xtask::prometheus::PrometheusServer;

/// Namespace of the replicas' Lease.
const SYSTEM_NAMESPACE: &str = "example-operator-system";
const LEASE: &str = "example-operator-leader";
/// The Helm release on the local node (its full name, so the Lease is `example-operator-leader`).
const RELEASE: &str = "example-operator";

/// PATH for kubectl and helm: the local cluster's own tools first (kubectl matching its API
/// server); unset with a cluster from KUBECONFIG, where the machine's kubectl is used.
static TOOL_PATH: std::sync::OnceLock<std::ffi::OsString> = std::sync::OnceLock::new();

/// `kubectl`, with the local cluster's tools first on PATH when there is one.
fn kubectl_command() -> Command {
    let mut command = Command::new("kubectl");
    if let Some(path) = TOOL_PATH.get() {
        command.env("PATH", path);
    }
    command
}

fn kubectl(kubeconfig: &Path, args: &[&str]) -> Result<String> {
    let output =
        kubectl_command().arg("--kubeconfig").arg(kubeconfig).args(args).output().context("running kubectl")?;
    if !output.status.success() {
        bail!("kubectl {} failed: {}", args.join(" "), String::from_utf8_lossy(&output.stderr));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// A running operator replica.
struct Replica {
    child: Child,
    identity: String,
}

impl Replica {
    fn start(binary: &Path, kubeconfig: &Path, index: usize, log_dir: &Path) -> Result<Self> {
        let identity = format!("example-operator-demo-{index}");
        let log = std::fs::File::create(log_dir.join(format!("{identity}.log")))?;
        let metrics = format!("127.0.0.1:{}", 18080 + index * 10);
        let probes = format!("127.0.0.1:{}", 18081 + index * 10);
        let child = Command::new(binary)
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .args(["--metrics-bind-address", &metrics, "--health-probe-bind-address", &probes])
            .env("POD_NAME", &identity)
            .env("POD_NAMESPACE", SYSTEM_NAMESPACE)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting the operator")?;
        eprintln!("started replica {identity} (metrics on http://{metrics}/metrics, probes on http://{probes}/readyz)");
        Ok(Self { child, identity })
    }

    /// SIGTERM and wait: the leader stops its controllers and releases the lease.
    fn stop(mut self) -> Result<()> {
        if self.child.try_wait()?.is_none() {
            let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM);
        }
        let status = self.child.wait()?;
        eprintln!("replica {} exited ({status})", self.identity);
        Ok(())
    }
}

/// Runs the demo. With `once`, returns after showing convergence instead of waiting for Ctrl-C.
pub fn run(root: &Path, once: bool) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    if let Some(path) = std::env::var_os("KUBECONFIG").filter(|k| !k.is_empty()) {
        eprintln!("using the cluster in KUBECONFIG={}", path.to_string_lossy());
        if Command::new("kubectl").arg("version").arg("--client").output().is_err() {
            bail!("kubectl is needed to demo against the cluster in KUBECONFIG: install one matching that cluster");
        }
        return run_processes(root, &PathBuf::from(path), once, &runtime);
    }
    crate::packages::ensure(&[crate::packages::NODE, crate::packages::PROMETHEUS].concat())?;
    let (state, started) = cluster::up(root, true, cluster::binaries::DEFAULT_KUBERNETES)?;
    let _ = TOOL_PATH.set(state.path_with_tools()?);
    let verb = if started { "started" } else { "reusing" };
    eprintln!("{verb} the local cluster at {} (Kubernetes {})", state.server, state.kubernetes_version);
    let result = if state.containerd_socket.is_some() {
        run_on_node(root, &state, once, &runtime)
    } else {
        run_processes(root, &state.admin_kubeconfig, once, &runtime)
    };
    if started {
        state.stop(root)?;
        eprintln!("stopped the local cluster");
    }
    result
}

/// The chart on the local node, with the image built here, scraped by a real Prometheus.
fn run_on_node(
    root: &Path,
    state: &cluster::ClusterState,
    once: bool,
    runtime: &tokio::runtime::Runtime,
) -> Result<()> {
    let kubeconfig = &state.admin_kubeconfig;
    let reference = crate::image::run(root, false)?;
    let (repository, tag) = reference.rsplit_once(':').context("an image reference")?;
    let helm = |args: &[&str]| -> Result<String> {
        let output = Command::new("helm")
            .env("PATH", TOOL_PATH.get().context("the local cluster's tools")?)
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .args(args)
            .output()
            .context("running helm")?;
        if !output.status.success() {
            bail!("helm {} failed: {}", args.join(" "), String::from_utf8_lossy(&output.stderr));
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    };
    let chart = root.join("charts/example-operator").display().to_string();
    let (repository_value, tag_value) = (format!("image.repository={repository}"), format!("image.tag={tag}"));
    helm(&[
        "install",
        RELEASE,
        &chart,
        "--namespace",
        SYSTEM_NAMESPACE,
        "--create-namespace",
        "--set",
        &repository_value,
        "--set",
        &tag_value,
        "--set",
        "image.pullPolicy=Never",
    ])?;
    eprintln!("installed the chart as release {RELEASE} with {reference}");
    let result = runtime.block_on(async {
        let client = crate::harness::client_for(kubeconfig).await?;
        let pods = ready_pods(&client, Duration::from_secs(180)).await?;
        let token = metrics_reader_token(kubeconfig)?;
        let prometheus = scraping(root, &pods, &token)?;
        show_convergence(root, kubeconfig).await?;
        println!(
            "$ kubectl get pods -n {SYSTEM_NAMESPACE} -o wide\n{}",
            kubectl(kubeconfig, &["get", "pods", "-n", SYSTEM_NAMESPACE, "-o", "wide"])?.trim_end()
        );
        // Once both Pods are scraped, the number of replicas that say they lead.
        let query = "sum(leader_election_master_status) and on() (count(up == 1) == 2)";
        let answer = prometheus
            .eventually(Duration::from_secs(60), query, |series| series.first().and_then(xtask::prometheus::value))
            .await?;
        println!(
            "\nPrometheus (http://127.0.0.1:{}) scraping both Pods: sum(leader_election_master_status) = {answer}\n",
            prometheus.port
        );
        if !once {
            eprintln!("running. Press Ctrl-C to uninstall and stop.");
            tokio::signal::ctrl_c().await?;
        }
        Ok::<_, anyhow::Error>(())
    });
    let _ = kubectl(kubeconfig, &["delete", "clusterrolebinding", PROMETHEUS_BINDING, "--ignore-not-found"]);
    let uninstalled = helm(&["uninstall", RELEASE, "--namespace", SYSTEM_NAMESPACE, "--wait"]);
    eprintln!("uninstalled the release (the CRDs and custom resources are kept)");
    result.and(uninstalled.map(|_| ()))
}

/// The binding that lets the demo's Prometheus read the release's secure /metrics.
const PROMETHEUS_BINDING: &str = "example-operator-demo-prometheus";

/// What NOTES tells a user to do for their Prometheus: a ServiceAccount bound to the release's
/// metrics-reader ClusterRole; returns a token of it.
fn metrics_reader_token(kubeconfig: &Path) -> Result<String> {
    let account = kubectl(
        kubeconfig,
        &["create", "serviceaccount", "prometheus", "-n", SYSTEM_NAMESPACE, "--dry-run=client", "-o", "yaml"],
    )?;
    apply_stdin(kubeconfig, &account)?;
    let binding = kubectl(
        kubeconfig,
        &[
            "create",
            "clusterrolebinding",
            PROMETHEUS_BINDING,
            &format!("--clusterrole={RELEASE}-metrics-reader"),
            &format!("--serviceaccount={SYSTEM_NAMESPACE}:prometheus"),
            "--dry-run=client",
            "-o",
            "yaml",
        ],
    )?;
    apply_stdin(kubeconfig, &binding)?;
    Ok(kubectl(kubeconfig, &["create", "token", "prometheus", "-n", SYSTEM_NAMESPACE, "--duration=24h"])?
        .trim()
        .to_owned())
}

/// Waits until both of the release's Pods are Ready; returns their metrics addresses.
async fn ready_pods(client: &kube::Client, timeout: Duration) -> Result<Vec<String>> {
    use k8s_openapi::api::core::v1::Pod;
    let pods: Api<Pod> = Api::namespaced(client.clone(), SYSTEM_NAMESPACE);
    let deadline = Instant::now() + timeout;
    loop {
        let listed = pods
            .list(&kube::api::ListParams::default().labels(&format!("app.kubernetes.io/instance={RELEASE}")))
            .await?;
        let ready: Vec<String> = listed
            .items
            .iter()
            .filter(|pod| {
                pod.status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
            })
            .filter_map(|pod| Some(format!("{}:8080", pod.status.as_ref()?.pod_ip.as_ref()?)))
            .collect();
        if ready.len() == 2 {
            eprintln!("both Pods are Ready (kubelet probes): {}", ready.join(", "));
            return Ok(ready);
        }
        if Instant::now() > deadline {
            bail!("the release's Pods were not Ready within {timeout:?}:\n{}", listed.items.len());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Debian's Prometheus scraping the Pods every second (it is built without Kubernetes service
/// discovery, so the Pods' addresses are given to it as a file).
fn scraping(root: &Path, targets: &[String], token: &str) -> Result<PrometheusServer> {
    let dir = crate::target_dir(root).join("demo");
    std::fs::create_dir_all(&dir)?;
    let targets = serde_json::json!([{"targets": targets, "labels": {"namespace": SYSTEM_NAMESPACE}}]);
    std::fs::write(dir.join("pods.json"), serde_json::to_string(&targets)?)?;
    std::fs::write(dir.join("token"), token)?;
    // The chart's ServiceMonitor settings: HTTPS to the self-signed certificate, with a token.
    let config = format!(
        "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: example-operator\n    scheme: https\n    bearer_token_file: \"{}\"\n    tls_config:\n      insecure_skip_verify: true\n    file_sd_configs:\n      - files: [\"{}\"]\n",
        dir.join("token").display(),
        dir.join("pods.json").display()
    );
    PrometheusServer::start(&config)
}

/// Two replicas as local processes against `kubeconfig` (a cluster that cannot run the local image).
fn run_processes(root: &Path, kubeconfig: &Path, once: bool, runtime: &tokio::runtime::Runtime) -> Result<()> {
    let crds = crdgen::crd_dir(root);
    kubectl(kubeconfig, &["apply", "--server-side", "-f", &crds.display().to_string()])?;
    kubectl(
        kubeconfig,
        &[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd/myresources.example.com",
            "crd/messagebroadcasts.example.com",
        ],
    )?;
    eprintln!("CRDs installed");
    let namespace = kubectl(kubeconfig, &["create", "namespace", SYSTEM_NAMESPACE, "--dry-run=client", "-o", "yaml"])?;
    apply_stdin(kubeconfig, &namespace)?;
    let binary = crate::build_operator(root)?;
    let log_dir = root.join("target/demo");
    std::fs::create_dir_all(&log_dir)?;
    let replicas =
        vec![Replica::start(&binary, kubeconfig, 0, &log_dir)?, Replica::start(&binary, kubeconfig, 1, &log_dir)?];
    let shown = runtime.block_on(show_convergence(root, kubeconfig));
    if shown.is_ok() && !once {
        eprintln!("\nrunning; replica logs are in {}. Press Ctrl-C to stop.", log_dir.display());
        runtime.block_on(tokio::signal::ctrl_c())?;
        eprintln!();
    }
    for replica in replicas {
        replica.stop()?;
    }
    shown
}

fn apply_stdin(kubeconfig: &Path, manifest: &str) -> Result<()> {
    use std::io::Write;
    let mut child = kubectl_command()
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(["apply", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()?;
    child.stdin.take().context("kubectl stdin")?.write_all(manifest.as_bytes())?;
    if !child.wait()?.success() {
        bail!("kubectl apply failed");
    }
    Ok(())
}

/// Applies the samples, waits until they converge, and prints what `kubectl` shows.
async fn show_convergence(root: &Path, kubeconfig: &Path) -> Result<()> {
    let samples = root.join("charts/example-operator/samples");
    kubectl(kubeconfig, &["apply", "-f", &samples.display().to_string()])?;
    eprintln!("applied the samples in {}", samples.display());
    let client = crate::harness::client_for(kubeconfig).await?;
    let leases: Api<Lease> = Api::namespaced(client.clone(), SYSTEM_NAMESPACE);
    let resources: Api<MyResource> = Api::namespaced(client.clone(), "default");
    let broadcasts: Api<MessageBroadcast> = Api::all(client);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let leader =
            leases.get_opt(LEASE).await?.and_then(|l| l.spec).and_then(|s| s.holder_identity).filter(|h| !h.is_empty());
        let resource_ready =
            resources.get_opt("example").await?.and_then(|r| r.status).and_then(|s| s.phase) == Some(Phase::Ready);
        let broadcast = broadcasts.get_opt("greeting").await?.and_then(|b| b.status);
        let broadcast_ready =
            broadcast.is_some_and(|s| s.ready_namespaces >= 2 && s.ready_namespaces == s.matched_namespaces);
        if let (Some(leader), true, true) = (&leader, resource_ready, broadcast_ready) {
            println!("\nleader: {leader}\n");
            break;
        }
        if Instant::now() > deadline {
            bail!("the samples did not converge within 120s (leader: {leader:?}); see the replica logs in target/demo");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    for args in [
        vec!["get", "lease", "-n", SYSTEM_NAMESPACE, LEASE],
        vec!["get", "myresources", "-A"],
        vec!["get", "messagebroadcasts"],
        vec!["get", "configmaps", "-A", "-l", "app.kubernetes.io/managed-by=example-operator"],
        vec!["get", "configmap", "example-configmap", "-n", "default", "-o", "jsonpath={.data.message}"],
    ] {
        println!("$ kubectl {}\n{}\n", args.join(" "), kubectl(kubeconfig, &args)?.trim_end());
    }
    Ok(())
}
