//! `cargo xtask cluster up | down | status | env`: the local control plane every test uses.
//!
//! etcd, kube-apiserver (TLS, RBAC, OwnerReferencesPermissionEnforcement, its own CA) and
//! kube-controller-manager (garbage collector and namespace controllers only) run as plain
//! processes on 127.0.0.1, with free ports and their state in a temporary folder. The running
//! cluster is recorded in `target/cluster/state.json`; `down` stops exactly the PIDs recorded there.

pub mod binaries;
mod monitoring;
pub mod node;
mod pki;
mod process;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

pub use binaries::Binaries;
use process::ProcessRecord;

/// Everything a later command needs to reach, check or stop a running cluster.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ClusterState {
    /// Temporary folder holding certificates, kubeconfigs, data and logs.
    pub dir: PathBuf,
    /// HTTPS address of the API server.
    pub server: String,
    /// Kubeconfig of the cluster administrator (system:masters).
    pub admin_kubeconfig: PathBuf,
    /// Kubeconfig of the restricted user standing for the operator's ServiceAccount.
    pub restricted_kubeconfig: PathBuf,
    /// Folders of the built tools (helm, kube-apiserver, etcd) for PATH.
    pub tool_dirs: Vec<PathBuf>,
    /// Version the API server reports.
    pub kubernetes_version: String,
    /// The processes started, in start order.
    pub processes: Vec<ProcessRecord>,
    /// The node's containerd socket, when the cluster has a node.
    #[serde(default)]
    pub containerd_socket: Option<PathBuf>,
}

pub use crate::harness::CLUSTER_DIR_ENV;
use crate::harness::{AUDIT_LOG, client_for};

/// The ServiceAccount (namespace, name) the benchmarks run the operator, the controller-runtime
/// peer and the bare client as: the audit policy records every request of this one identity, reads
/// included, so requests per object are counted by the API server (`cargo xtask bench`).
pub const BENCH_SERVICE_ACCOUNT: (&str, &str) = ("example-operator-bench", "bench");

/// Records every write (not reads, which would swamp the log): Lease writes with their request
/// body (who took the Lease, and when), every other write with its metadata (verb, object, user,
/// User-Agent, receive time, response code). Only the benchmark identity has its reads recorded
/// too; the tests never use it, so their log stays writes only.
fn audit_policy() -> String {
    let (namespace, name) = BENCH_SERVICE_ACCOUNT;
    format!(
        r#"apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: ["RequestReceived"]
rules:
  - level: Metadata
    users: ["system:serviceaccount:{namespace}:{name}"]
  - level: Request
    resources: [{{group: coordination.k8s.io, resources: [leases]}}]
    verbs: [create, update, patch, delete]
  - level: Metadata
    verbs: [create, update, patch, delete, deletecollection]
  - level: None
"#
    )
}

/// The minor of a version (`1.37` of `v1.37.2`).
fn minor_of(version: &str) -> Option<&str> {
    let version = version.strip_prefix('v')?;
    let (major, rest) = version.split_once('.')?;
    let minor_len = rest.find('.').unwrap_or(rest.len());
    version.get(..major.len() + 1 + minor_len)
}

#[test]
fn the_minor_is_read_from_the_version() {
    assert_eq!(minor_of("v1.37.2"), Some("1.37"));
    assert_eq!(minor_of("v1.33.13"), Some("1.33"));
    assert_eq!(minor_of("1.33.13"), None);
}

fn state_file(root: &Path) -> PathBuf {
    root.join("target/cluster/state.json")
}

impl ClusterState {
    /// The cluster recorded for this work tree, if any.
    pub fn load(root: &Path) -> Result<Option<Self>> {
        let path = state_file(root);
        match std::fs::read_to_string(&path) {
            Ok(text) => Ok(Some(serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?)),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(err) => Err(err).with_context(|| format!("reading {}", path.display())),
        }
    }

    fn save(&self, root: &Path) -> Result<()> {
        let path = state_file(root);
        std::fs::create_dir_all(path.parent().context("state file has a parent")?)?;
        std::fs::write(&path, serde_json::to_string_pretty(self)?)
            .with_context(|| format!("writing {}", path.display()))
    }

    /// The Kubernetes minor it runs (`1.37` of `v1.37.2`).
    pub fn minor(&self) -> Option<&str> {
        minor_of(&self.kubernetes_version)
    }

    /// Reports of recorded processes that are no longer running.
    pub fn crashed(&self) -> Vec<String> {
        self.processes.iter().filter(|p| !p.is_running()).map(ProcessRecord::crash_report).collect()
    }

    /// The `export` lines that point a shell (and the tests) at this cluster.
    pub fn env_lines(&self) -> String {
        let path: Vec<String> = self.tool_dirs.iter().map(|d| d.display().to_string()).collect();
        format!(
            "export KUBECONFIG='{}'\nexport {CLUSTER_DIR_ENV}='{}'\nexport EXAMPLE_OPERATOR_RESTRICTED_KUBECONFIG='{}'\nexport PATH='{}':\"$PATH\"\n",
            self.admin_kubeconfig.display(),
            self.dir.display(),
            self.restricted_kubeconfig.display(),
            path.join(":"),
        )
    }

    /// PATH with the built tools in front.
    pub fn path_with_tools(&self) -> Result<std::ffi::OsString> {
        let current = std::env::var_os("PATH").unwrap_or_default();
        let dirs = self.tool_dirs.iter().cloned().chain(std::env::split_paths(&current));
        std::env::join_paths(dirs).context("building PATH")
    }

    /// Stops every recorded process (API server before etcd), removes the folder and forgets the
    /// cluster of this work tree.
    pub fn stop(&self, root: &Path) -> Result<()> {
        self.stop_private()?;
        let _ = std::fs::remove_file(state_file(root));
        Ok(())
    }

    /// Stops every process of this cluster (API server before etcd) and removes its folder,
    /// leaving the work tree's state file alone: for a cluster from [`start_private`].
    pub fn stop_private(&self) -> Result<()> {
        if let Some(socket) = &self.containerd_socket {
            node::stop(&self.processes, socket, &self.dir);
        }
        for process in self.processes.iter().rev() {
            process.stop(Duration::from_secs(10));
        }
        if let Some(still) = self.processes.iter().find(|p| p.is_running()) {
            bail!("{} (pid {}) did not stop", still.name, still.pid);
        }
        if self.containerd_socket.is_some() {
            let left = node::leftovers(&self.dir);
            if !left.is_empty() {
                bail!("the node left behind:\n{}", left.join("\n"));
            }
        }
        if self.dir.exists() {
            std::fs::remove_dir_all(&self.dir).with_context(|| format!("removing {}", self.dir.display()))?;
        }
        Ok(())
    }
}

/// Brings the control plane of Kubernetes `minor` up, or returns the one already running for this
/// work tree; either way makes sure it has the Prometheus Operator's monitoring CRDs (cached, so
/// cheap). The boolean is true when this call started it. A recorded cluster of another minor is
/// an error (stop it first), and so is a node asked of a minor built without one.
pub fn up(root: &Path, with_node: bool, minor: &str) -> Result<(ClusterState, bool)> {
    if with_node && !binaries::has_node(minor) {
        bail!(
            "Kubernetes {minor} is built without a node (the chart's Pods run on {}): add --no-node",
            binaries::DEFAULT_KUBERNETES
        );
    }
    if let Some(state) = ClusterState::load(root)? {
        if state.crashed().is_empty() {
            if state.minor() != Some(minor) {
                bail!(
                    "the running local cluster is Kubernetes {}, not {minor}: stop it first with `cargo xtask cluster down`",
                    state.kubernetes_version
                );
            }
            monitoring::install(root, &state)?;
            return Ok((state, false));
        }
        eprintln!("the recorded cluster has stopped; cleaning it up:\n{}", state.crashed().join("\n"));
        state.stop(root)?;
    }
    // Packages first: a missing one, or not being root, is said before any long build.
    if with_node {
        crate::packages::ensure(crate::packages::NODE)?;
    }
    let binaries = binaries::ensure(root, minor)?;
    let state = start(&binaries, with_node)?;
    state.save(root)?;
    monitoring::install(root, &state)?;
    Ok((state, true))
}

/// Starts a control plane of Kubernetes `minor` of its own (no node) in a fresh temporary folder,
/// not recorded as the work tree's cluster: for a caller that must neither disturb nor be
/// disturbed by the shared one (the benchmarks, the oldest minor's tests). Stop it with
/// [`ClusterState::stop_private`].
pub fn start_private(root: &Path, minor: &str) -> Result<ClusterState> {
    let binaries = binaries::ensure(root, minor)?;
    start(&binaries, false)
}

fn start(binaries: &Binaries, with_node: bool) -> Result<ClusterState> {
    let dir = std::env::temp_dir().join(format!("example-operator-cluster-{:08x}", rand::random::<u32>()));
    let logs = dir.join("logs");
    std::fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
    let identities =
        [&pki::ADMIN, &pki::CONTROLLER_MANAGER, &pki::RESTRICTED, &node::KUBELET, &node::KUBE_PROXY, &node::SCHEDULER];
    let pki = pki::generate(&dir.join("pki"), &identities)?;

    let etcd_client = process::free_port()?;
    let etcd_peer = process::free_port()?;
    let apiserver_port = process::free_port()?;
    let server = format!("https://127.0.0.1:{apiserver_port}");
    let admin_kubeconfig = pki::write_kubeconfig(&pki, &pki::ADMIN, &server, &dir)?;
    let restricted_kubeconfig = pki::write_kubeconfig(&pki, &pki::RESTRICTED, &server, &dir)?;
    let controller_manager_kubeconfig = pki::write_kubeconfig(&pki, &pki::CONTROLLER_MANAGER, &server, &dir)?;

    let mut state = ClusterState {
        dir: dir.clone(),
        server: server.clone(),
        admin_kubeconfig,
        restricted_kubeconfig,
        tool_dirs: binaries.dirs(),
        kubernetes_version: binaries.kubernetes_version.clone(),
        processes: Vec::new(),
        containerd_socket: None,
    };
    let result = (|| {
        let etcd_url = format!("http://127.0.0.1:{etcd_client}");
        let peer_url = format!("http://127.0.0.1:{etcd_peer}");
        let etcd_args = vec![
            "--name=local".to_owned(),
            format!("--data-dir={}", dir.join("etcd").display()),
            format!("--listen-client-urls={etcd_url}"),
            format!("--advertise-client-urls={etcd_url}"),
            format!("--listen-peer-urls={peer_url}"),
            format!("--initial-advertise-peer-urls={peer_url}"),
            format!("--initial-cluster=local={peer_url}"),
            // Test cluster only: durability is not worth the fsync latency on a shared disk.
            "--unsafe-no-fsync=true".to_owned(),
            "--log-level=warn".to_owned(),
        ];
        state.processes.push(process::spawn("etcd", &binaries.etcd, &etcd_args, &logs)?);
        wait_for(&state, "etcd to report healthy", Duration::from_secs(60), || etcd_healthy(etcd_client))?;

        let path = |p: &Path| p.display().to_string();
        if with_node {
            // The node's bridge carries the address Pods reach the API server at.
            node::network_up()?;
        }
        let audit_policy_file = dir.join("audit-policy.yaml");
        std::fs::write(&audit_policy_file, audit_policy())
            .with_context(|| format!("writing {}", audit_policy_file.display()))?;
        let apiserver_args = vec![
            format!("--etcd-servers={etcd_url}"),
            // With a node, Pods reach the API server on the bridge address (through the
            // `kubernetes` Service); without one, loopback only.
            format!("--bind-address={}", if with_node { "0.0.0.0" } else { "127.0.0.1" }),
            format!("--secure-port={apiserver_port}"),
            format!("--cert-dir={}", dir.join("apiserver").display()),
            format!("--tls-cert-file={}", path(&pki.serving_cert)),
            format!("--tls-private-key-file={}", path(&pki.serving_key)),
            format!("--client-ca-file={}", path(&pki.ca_cert)),
            "--authorization-mode=Node,RBAC".to_owned(),
            // Added to the default plugins, as OpenShift runs it: setting an ownerReference needs
            // delete on the dependent, and `blockOwnerDeletion` update on the owner's
            // `finalizers`, so the chart's RBAC is tested against what such clusters enforce.
            "--enable-admission-plugins=OwnerReferencesPermissionEnforcement".to_owned(),
            format!("--service-account-issuer={server}"),
            format!("--service-account-key-file={}", path(&pki.service_account_public_key)),
            format!("--service-account-signing-key-file={}", path(&pki.service_account_key)),
            "--service-cluster-ip-range=10.0.0.0/24".to_owned(),
            "--allow-privileged=true".to_owned(),
            "--profiling=false".to_owned(),
            format!("--kubelet-client-certificate={}", path(&pki.client_files(&pki::ADMIN).0)),
            format!("--kubelet-client-key={}", path(&pki.client_files(&pki::ADMIN).1)),
            "--kubelet-preferred-address-types=InternalIP".to_owned(),
            // Every write, with who sent it (User-Agent) and when the server received it: the
            // record the tests prove "never two writers" from.
            format!("--audit-policy-file={}", path(&audit_policy_file)),
            format!("--audit-log-path={}", path(&dir.join(AUDIT_LOG))),
            "--audit-log-format=json".to_owned(),
            "--audit-log-mode=blocking".to_owned(),
            // One file, never rotated (the default rotates it at 100 MB, and the tests and the
            // benchmark read it as one file: a busy bench round fills 100 MB).
            "--audit-log-maxsize=0".to_owned(),
        ];
        let mut apiserver_args = apiserver_args;
        if with_node {
            apiserver_args.push(format!("--advertise-address={}", node::NODE_IP));
        }
        state.processes.push(process::spawn("kube-apiserver", &binaries.kube_apiserver, &apiserver_args, &logs)?);
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let client = runtime.block_on(admin_client(&state))?;
        wait_for(&state, "kube-apiserver /readyz", Duration::from_secs(180), || {
            runtime.block_on(apiserver_ready(&client))
        })?;

        let controller_manager_args = vec![
            format!("--kubeconfig={}", path(&controller_manager_kubeconfig)),
            format!("--controllers={}", controllers(with_node)),
            format!("--root-ca-file={}", path(&pki.ca_cert)),
            format!("--service-account-private-key-file={}", path(&pki.service_account_key)),
            "--leader-elect=false".to_owned(),
            "--secure-port=0".to_owned(),
            "--use-service-account-credentials=false".to_owned(),
            // The default client rate (20 QPS) makes the garbage collector take minutes to catch up
            // on thousands of orphans; a test cluster has the API server to itself.
            "--kube-api-qps=200".to_owned(),
            "--kube-api-burst=400".to_owned(),
        ];
        state.processes.push(process::spawn(
            "kube-controller-manager",
            &binaries.kube_controller_manager,
            &controller_manager_args,
            &logs,
        )?);
        runtime.block_on(prove_namespace_controller(&state, &client))?;
        if with_node {
            start_node(binaries, &pki, &server, &dir, &logs, &mut state, &runtime, &client)?;
        }
        Ok::<_, anyhow::Error>(())
    })();
    if let Err(err) = result {
        if let Some(socket) = &state.containerd_socket {
            node::stop(&state.processes, socket, &dir);
        } else if with_node {
            node::network_down();
        }
        for process in state.processes.iter().rev() {
            process.stop(Duration::from_secs(5));
        }
        bail!("the local control plane did not come up: {err:#}\n(its files are kept in {})", dir.display());
    }
    Ok(state)
}

/// kube-controller-manager's controllers: the garbage collector, namespaces and ClusterRole
/// aggregation (the chart's user roles join `view`, `edit` and `admin`) always; with a node also
/// what Deployments, Services and Pods' service-account volumes need.
fn controllers(with_node: bool) -> String {
    let mut controllers =
        vec!["garbage-collector-controller", "namespace-controller", "clusterrole-aggregation-controller"];
    if with_node {
        controllers.extend([
            "deployment-controller",
            "replicaset-controller",
            "endpointslice-controller",
            "serviceaccount-controller",
            "root-ca-certificate-publisher-controller",
            "pod-garbage-collector-controller",
            "disruption-controller",
            // Lifts the node.kubernetes.io/not-ready taint once the kubelet reports Ready.
            "node-lifecycle-controller",
        ]);
    }
    controllers.join(",")
}

/// Starts containerd (with the pause image), kubelet, kube-proxy and kube-scheduler, and waits
/// until the node is Ready.
#[allow(clippy::too_many_arguments)]
fn start_node(
    binaries: &Binaries,
    pki: &pki::Pki,
    server: &str,
    dir: &Path,
    logs: &Path,
    state: &mut ClusterState,
    runtime: &tokio::runtime::Runtime,
    client: &kube::Client,
) -> Result<()> {
    let files = node::write_configs(dir, pki)?;
    let containerd = which("containerd")?;
    let containerd_args = vec![format!("--config={}", files.containerd_config.display())];
    // Nothing is ever pulled: every registry request goes to a closed port on loopback.
    let no_pulls: Vec<(String, String)> = ["HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"]
        .iter()
        .map(|name| ((*name).to_owned(), node::NO_REGISTRY.to_owned()))
        .chain([("NO_PROXY".to_owned(), String::new()), ("no_proxy".to_owned(), String::new())])
        .collect();
    state.processes.push(process::spawn_with_env("containerd", &containerd, &containerd_args, &no_pulls, logs)?);
    state.containerd_socket = Some(files.containerd_socket.clone());
    wait_for(state, "containerd's socket", Duration::from_secs(30), || files.containerd_socket.exists())?;
    let pause = binaries::cache_dir()?.join(format!("pause-{}.tar", binaries.kubernetes_version));
    node::pause_image(&binaries.kubernetes_version, &pause)?;
    node::import_image(&files.containerd_socket, &pause)?;

    let kubelet_kubeconfig = pki::write_kubeconfig(pki, &node::KUBELET, server, dir)?;
    let proxy_kubeconfig = pki::write_kubeconfig(pki, &node::KUBE_PROXY, server, dir)?;
    let scheduler_kubeconfig = pki::write_kubeconfig(pki, &node::SCHEDULER, server, dir)?;
    let kubelet_args = node::kubelet_args(&files, &kubelet_kubeconfig);
    let components = binaries.node.as_ref().context("this Kubernetes build has no node components")?;
    state.processes.push(process::spawn("kubelet", &components.kubelet, &kubelet_args, logs)?);
    let proxy_args = node::kube_proxy_args(&proxy_kubeconfig)?;
    state.processes.push(process::spawn("kube-proxy", &components.kube_proxy, &proxy_args, logs)?);
    let scheduler_args = node::scheduler_args(&scheduler_kubeconfig)?;
    state.processes.push(process::spawn("kube-scheduler", &components.kube_scheduler, &scheduler_args, logs)?);
    wait_for(state, "the node to be Ready", Duration::from_secs(180), || runtime.block_on(node_ready(client)))
}

/// True once the node reports Ready.
async fn node_ready(client: &kube::Client) -> bool {
    use k8s_openapi::api::core::v1::Node;
    let nodes: kube::api::Api<Node> = kube::api::Api::all(client.clone());
    let Ok(Some(node)) = nodes.get_opt(node::NODE_NAME).await else { return false };
    node.status.and_then(|s| s.conditions).unwrap_or_default().iter().any(|c| c.type_ == "Ready" && c.status == "True")
}

/// The full path of `program` on PATH.
fn which(program: &str) -> Result<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .map(|dir| dir.join(program))
        .find(|path| path.is_file())
        .with_context(|| format!("{program} is not installed"))
}

/// Polls `check` until it returns true, failing early with the crash report when a recorded
/// process dies meanwhile.
fn wait_for(state: &ClusterState, what: &str, timeout: Duration, mut check: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if check() {
            return Ok(());
        }
        let crashed = state.crashed();
        if !crashed.is_empty() {
            bail!("while waiting for {what}:\n{}", crashed.join("\n"));
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn etcd_healthy(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else { return false };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    if stream.write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").is_err() {
        return false;
    }
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response.starts_with("HTTP/1.0 200") || response.starts_with("HTTP/1.1 200")
}

/// A client for the administrator identity of a cluster.
pub async fn admin_client(state: &ClusterState) -> Result<kube::Client> {
    client_for(&state.admin_kubeconfig).await
}

async fn apiserver_ready(client: &kube::Client) -> bool {
    let Ok(request) = http::Request::get("/readyz").body(Vec::new()) else { return false };
    matches!(client.request_text(request).await, Ok(body) if body.trim() == "ok")
}

/// kube-controller-manager has no port here; proves it works by having its namespace controller
/// finish the deletion of a scratch namespace.
async fn prove_namespace_controller(state: &ClusterState, client: &kube::Client) -> Result<()> {
    use k8s_openapi::api::core::v1::Namespace;
    use kube::api::{Api, DeleteParams, PostParams};
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let name = "example-operator-startup-check";
    let namespace: Namespace = serde_json::from_value(serde_json::json!({"metadata": {"name": name}}))?;
    namespaces.create(&PostParams::default(), &namespace).await.context("creating the startup-check namespace")?;
    namespaces.delete(name, &DeleteParams::default()).await.context("deleting the startup-check namespace")?;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Ok(None) = namespaces.get_opt(name).await {
            return Ok(());
        }
        let crashed = state.crashed();
        if !crashed.is_empty() {
            bail!("while waiting for the namespace controller:\n{}", crashed.join("\n"));
        }
        if Instant::now() > deadline {
            bail!("kube-controller-manager did not finish deleting namespace {name} within 120s");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// `cluster status`: every process and the API server's readiness.
pub fn status(root: &Path) -> Result<()> {
    let Some(state) = ClusterState::load(root)? else {
        bail!("no local control plane is recorded for this work tree; start one with `cargo xtask cluster up`");
    };
    println!(
        "cluster folder: {}\nAPI server:     {} ({})",
        state.dir.display(),
        state.server,
        state.kubernetes_version
    );
    let mut healthy = true;
    for process in &state.processes {
        if process.is_running() {
            println!("{:<24} running (pid {})", process.name, process.pid);
        } else {
            healthy = false;
            println!("{}", process.crash_report());
        }
    }
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let ready =
        runtime.block_on(async { apiserver_ready(&admin_client(&state).await?).await.then_some(()).context("") });
    println!("{:<24} {}", "/readyz", if ready.is_ok() { "ok" } else { "NOT ready" });
    let mut node_ok = true;
    if state.containerd_socket.is_some() {
        node_ok = runtime.block_on(async { Ok::<_, anyhow::Error>(node_ready(&admin_client(&state).await?).await) })?;
        println!("{:<24} {} {}", "node", node::NODE_NAME, if node_ok { "Ready" } else { "NOT Ready" });
    } else {
        println!("{:<24} none (started with --no-node)", "node");
    }
    if !healthy || ready.is_err() || !node_ok {
        bail!("the local control plane is not healthy");
    }
    Ok(())
}

/// `cluster stop COMPONENT`: stops one component (fault injection); `cluster start` restarts it.
pub fn stop_component(root: &Path, name: &str) -> Result<()> {
    let state = ClusterState::load(root)?.context("no local control plane is recorded")?;
    let process = state.component(name)?;
    process.stop(Duration::from_secs(10));
    println!("stopped {name} (pid {})", process.pid);
    Ok(())
}

/// `cluster start COMPONENT`: starts a stopped component again with its recorded arguments and
/// waits until it serves.
pub fn start_component(root: &Path, name: &str) -> Result<()> {
    let mut state = ClusterState::load(root)?.context("no local control plane is recorded")?;
    let process = state.component(name)?.clone();
    if process.is_running() {
        println!("{name} is already running (pid {})", process.pid);
        return Ok(());
    }
    let log_dir = process.log.parent().context("log file has a folder")?.to_path_buf();
    let started = process::spawn_with_env(name, &process.binary, &process.args, &process.env, &log_dir)?;
    let pid = started.pid;
    if let Some(record) = state.processes.iter_mut().find(|p| p.name == name) {
        *record = started;
    }
    state.save(root)?;
    if name == "kube-apiserver" {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let client = runtime.block_on(admin_client(&state))?;
        wait_for(&state, "kube-apiserver /readyz", Duration::from_secs(180), || {
            runtime.block_on(apiserver_ready(&client))
        })?;
    } else if name == "etcd" {
        let port = etcd_port(&process.args).context("etcd's recorded arguments name no client URL")?;
        wait_for(&state, "etcd to report healthy", Duration::from_secs(60), || etcd_healthy(port))?;
    }
    println!("started {name} (pid {pid})");
    Ok(())
}

/// `cluster compact`: compacts etcd's history up to its current revision, so watches resuming
/// from an older resourceVersion get 410 Gone and must relist (fault injection).
pub fn compact(root: &Path) -> Result<()> {
    let state = ClusterState::load(root)?.context("no local control plane is recorded")?;
    let revision = compact_etcd(&state)?;
    println!("compacted etcd up to revision {revision}");
    Ok(())
}

/// Compacts etcd's history up to its current revision; returns that revision.
pub fn compact_etcd(state: &ClusterState) -> Result<String> {
    let port = etcd_port(&state.component("etcd")?.args).context("etcd's recorded arguments name no client URL")?;
    // etcd's JSON gateway: keys are base64; "AA==" is the zero byte, a key that never exists.
    let range = etcd_post(port, "/v3/kv/range", r#"{"key":"AA=="}"#)?;
    let header: serde_json::Value = serde_json::from_str(&range).with_context(|| format!("etcd answered {range}"))?;
    let revision = header["header"]["revision"].as_str().context("etcd reported no revision")?.to_owned();
    etcd_post(port, "/v3/kv/compaction", &format!(r#"{{"revision":"{revision}","physical":true}}"#))?;
    Ok(revision)
}

/// Compacts etcd's history and defragments its database, so a run that follows finds etcd as
/// small as the live objects make it (the benchmarks, between rounds). Returns the revision.
pub fn compact_and_defragment_etcd(state: &ClusterState) -> Result<String> {
    let revision = compact_etcd(state)?;
    let port = etcd_port(&state.component("etcd")?.args).context("etcd's recorded arguments name no client URL")?;
    etcd_post(port, "/v3/maintenance/defragment", "{}")?;
    Ok(revision)
}

/// POSTs `body` to etcd's gRPC gateway and returns the response body.
fn etcd_post(port: u16, path: &str, body: &str) -> Result<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).context("connecting to etcd")?;
    // Defragmenting a large database rewrites it; that takes longer than a read.
    stream.set_read_timeout(Some(Duration::from_secs(120)))?;
    let request = format!(
        "POST {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes())?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response.split_once("\r\n\r\n").context("an HTTP response from etcd")?;
    if !head.starts_with("HTTP/1.0 200") && !head.starts_with("HTTP/1.1 200") {
        bail!("etcd {path} failed: {head} {body}");
    }
    Ok(body.to_owned())
}

/// The client port of etcd from its `--listen-client-urls` argument.
fn etcd_port(args: &[String]) -> Option<u16> {
    args.iter().find_map(|a| a.strip_prefix("--listen-client-urls=http://127.0.0.1:")).and_then(|p| p.parse().ok())
}

impl ClusterState {
    /// The recorded process named `name`.
    pub fn component(&self, name: &str) -> Result<&ProcessRecord> {
        self.processes.iter().find(|p| p.name == name).with_context(|| {
            let known: Vec<&str> = self.processes.iter().map(|p| p.name.as_str()).collect();
            format!("no component {name:?}; components: {}", known.join(", "))
        })
    }
}

/// `cluster down`: stops the recorded processes and removes the cluster folder.
pub fn down(root: &Path) -> Result<()> {
    match ClusterState::load(root)? {
        Some(state) => {
            state.stop(root)?;
            println!("stopped the local control plane and removed {}", state.dir.display());
        }
        None => println!("no local control plane is recorded for this work tree"),
    }
    Ok(())
}
