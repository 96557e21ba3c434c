//! Harness for the end-to-end tests: the local control plane started by `cargo xtask test`
//! (or `cargo xtask cluster up`), one namespace per test, and polling with deadlines.
//!
//! Tests never skip: without a control plane they fail with the command that provides one.
//! Namespaces and operator replicas are cleaned up by drop guards, even when a test fails early.

pub mod audit;
pub mod fault_proxy;
pub mod webhook;
pub use xtask::prometheus;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use crd_types::{MyResource, MyResourceSpec, Phase};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::{Client, Config};

pub use xtask::harness::{CLUSTER_DIR_ENV, client_for, free_port, http_get, http_get_at, sample, sum_samples};

/// The local control plane the tests run against.
#[derive(Clone, Debug)]
pub struct TestCluster {
    /// Folder of the running control plane (certificates, kubeconfigs, logs).
    pub dir: PathBuf,
    /// Kubeconfig of the administrator (system:masters).
    pub admin_kubeconfig: PathBuf,
    /// Kubeconfig of the restricted user `example-operator`, with no rights until RBAC grants them.
    pub restricted_kubeconfig: PathBuf,
}

/// The user name of the restricted identity, for RBAC subjects.
pub const RESTRICTED_USER: &str = "example-operator";

impl TestCluster {
    /// The running local control plane, or an error naming the command that starts one.
    pub fn get() -> Result<Self> {
        let dir = std::env::var_os(CLUSTER_DIR_ENV).map(PathBuf::from).ok_or_else(|| {
            anyhow!(
                "no local control plane: {CLUSTER_DIR_ENV} is not set. Run the tests with `cargo xtask test`, \
                 or start one with `cargo xtask cluster up` and `eval \"$(cargo xtask cluster env)\"`"
            )
        })?;
        let cluster = Self {
            dir: dir.clone(),
            admin_kubeconfig: dir.join("admin.kubeconfig"),
            restricted_kubeconfig: dir.join("restricted.kubeconfig"),
        };
        if !cluster.admin_kubeconfig.is_file() {
            bail!(
                "{CLUSTER_DIR_ENV}={} holds no admin.kubeconfig: the control plane is gone. \
                 Start one with `cargo xtask cluster up`",
                dir.display()
            );
        }
        Ok(cluster)
    }

    /// Writes a kubeconfig that authenticates with a bearer `token` (e.g. a ServiceAccount token
    /// from the TokenRequest API) and returns its path.
    pub async fn kubeconfig_with_token(&self, name: &str, token: &str) -> Result<PathBuf> {
        let admin = Config::from_custom_kubeconfig(
            kube::config::Kubeconfig::read_from(&self.admin_kubeconfig)?,
            &Default::default(),
        )
        .await?;
        let config = serde_json::json!({
            "apiVersion": "v1", "kind": "Config",
            "clusters": [{"name": "local", "cluster": {"server": admin.cluster_url.to_string(), "certificate-authority": self.dir.join("pki/ca.crt")}}],
            "users": [{"name": name, "user": {"token": token}}],
            "contexts": [{"name": name, "context": {"cluster": "local", "user": name}}],
            "current-context": name,
        });
        let path = std::env::temp_dir().join(format!("{name}-{:06x}.kubeconfig", rand::random::<u32>() & 0xff_ffff));
        std::fs::write(&path, serde_yaml::to_string(&config)?)?;
        Ok(path)
    }

    /// The API server's audit log (every write request, see [`audit`]).
    pub fn audit_log(&self) -> PathBuf {
        self.dir.join(xtask::harness::AUDIT_LOG)
    }

    /// The API server's address, for a [`fault_proxy::FaultProxy`] to forward to.
    pub async fn api_server_address(&self) -> Result<std::net::SocketAddr> {
        let admin = Config::from_custom_kubeconfig(
            kube::config::Kubeconfig::read_from(&self.admin_kubeconfig)?,
            &Default::default(),
        )
        .await?;
        let host = admin.cluster_url.host().context("the API server URL names no host")?;
        let port = admin.cluster_url.port_u16().context("the API server URL names no port")?;
        Ok(std::net::SocketAddr::new(host.parse()?, port))
    }

    /// A copy of the administrator's kubeconfig that reaches the API server through a proxy on
    /// loopback `port` (TLS still checks the API server's certificate, which names 127.0.0.1).
    pub fn admin_kubeconfig_via(&self, port: u16) -> Result<PathBuf> {
        let text = std::fs::read_to_string(&self.admin_kubeconfig)?;
        let mut config: serde_yaml::Value = serde_yaml::from_str(&text)?;
        let clusters = config["clusters"].as_sequence_mut().context("a kubeconfig with clusters")?;
        for cluster in clusters {
            cluster["cluster"]["server"] = serde_yaml::Value::from(format!("https://127.0.0.1:{port}"));
        }
        let path =
            std::env::temp_dir().join(format!("via-{port}-{:06x}.kubeconfig", rand::random::<u32>() & 0xff_ffff));
        std::fs::write(&path, serde_yaml::to_string(&config)?)?;
        Ok(path)
    }

    /// A client acting as the cluster administrator.
    pub async fn admin_client(&self) -> Result<Client> {
        client_for(&self.admin_kubeconfig).await
    }

    /// A client acting as `user` in `groups`: the administrator impersonating them, so the API
    /// server authorizes and admits each request as theirs.
    pub async fn impersonated_client(&self, user: &str, groups: &[String]) -> Result<Client> {
        let kubeconfig = kube::config::Kubeconfig::read_from(&self.admin_kubeconfig)?;
        let mut config = Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await?;
        config.auth_info.impersonate = Some(user.to_owned());
        config.auth_info.impersonate_groups = (!groups.is_empty()).then(|| groups.to_vec());
        Ok(Client::try_from(config)?)
    }

    /// A client acting as the restricted user.
    pub async fn restricted_client(&self) -> Result<Client> {
        client_for(&self.restricted_kubeconfig).await
    }

    /// Runs kubectl as the administrator; the output is returned whatever the exit code.
    pub fn kubectl(&self, args: &[&str]) -> Result<Output> {
        self.kubectl_with_input(args, None)
    }

    /// Runs kubectl as the administrator with `input` on its standard input.
    pub fn kubectl_with_input(&self, args: &[&str], input: Option<&str>) -> Result<Output> {
        use std::io::Write;
        let mut child = Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(&self.admin_kubeconfig)
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .context("running kubectl")?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(input.unwrap_or_default().as_bytes())?;
        }
        Ok(child.wait_with_output()?)
    }
}

/// The generated CRD files in the chart, as a user would `kubectl apply -f` them.
pub fn crd_files() -> Result<Vec<PathBuf>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/example-operator/files/crds");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "yaml"))
        .collect();
    files.sort();
    Ok(files)
}

/// True once the API server serves the CRD's kind.
fn established(crd: &CustomResourceDefinition) -> bool {
    crd.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|conditions| conditions.iter().any(|c| c.type_ == "Established" && c.status == "True"))
}

/// Applies the chart's CRDs (server-side, idempotent, so parallel tests may all call it) and
/// waits until every one is Established.
pub async fn install_crds(client: &Client) -> Result<Vec<String>> {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let mut names = Vec::new();
    for file in crd_files()? {
        let text = std::fs::read_to_string(&file)?;
        let crd: CustomResourceDefinition =
            serde_yaml::from_str(&text).with_context(|| format!("parsing {}", file.display()))?;
        let name = crd.metadata.name.clone().context("CRD without a name")?;
        crds.patch(&name, &PatchParams::apply("e2e-tests").force(), &Patch::Apply(&crd))
            .await
            .with_context(|| format!("applying CRD {name}"))?;
        names.push(name);
    }
    for name in &names {
        eventually(Duration::from_secs(30), &format!("CRD {name} to be Established"), || async {
            Ok(established(&crds.get(name).await?).then_some(()))
        })
        .await?;
    }
    Ok(names)
}

/// The chart's folder.
pub fn chart_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/example-operator")
}

/// Fails unless the Prometheus Operator's ServiceMonitor and PrometheusRule CRDs are
/// Established (`cargo xtask cluster up`, which `cargo xtask test` runs, installs them).
pub async fn require_monitoring_crds(client: &Client) -> Result<()> {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for name in ["servicemonitors.monitoring.coreos.com", "prometheusrules.monitoring.coreos.com"] {
        let crd = crds.get_opt(name).await?.with_context(|| {
            format!("CRD {name} is not installed: run `cargo xtask cluster up` (it installs the monitoring CRDs)")
        })?;
        anyhow::ensure!(established(&crd), "CRD {name} is not Established");
    }
    Ok(())
}

/// A namespace of one's own, created with a unique name. Deleted by [`TestNamespace::delete`],
/// or when dropped (a test that fails early leaves nothing behind).
pub struct TestNamespace {
    pub name: String,
    client: Client,
    deleted: bool,
}

impl TestNamespace {
    /// Creates `e2e-<prefix>-<random>`.
    pub async fn create(client: &Client, prefix: &str) -> Result<Self> {
        let name = format!("e2e-{prefix}-{:06x}", rand::random::<u32>() & 0xff_ffff);
        let namespace: Namespace = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "labels": {"example-operator.test/e2e": "true"}}
        }))?;
        Api::<Namespace>::all(client.clone()).create(&PostParams::default(), &namespace).await?;
        Ok(Self { name, client: client.clone(), deleted: false })
    }

    /// Deletes the namespace; the namespace controller removes its contents.
    pub async fn delete(mut self) -> Result<()> {
        self.deleted = true;
        Api::<Namespace>::all(self.client.clone()).delete(&self.name, &DeleteParams::default()).await?;
        Ok(())
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        if self.deleted {
            return;
        }
        // Drop cannot await: kubectl does it, without waiting for the namespace controller.
        if let Ok(cluster) = TestCluster::get() {
            let _ = cluster.kubectl(&["delete", "namespace", &self.name, "--wait=false", "--ignore-not-found"]);
        }
    }
}

/// What most end-to-end tests start from: the cluster, an administrator client, the CRDs
/// installed, and a namespace of the test's own (deleted when the fixture is dropped).
pub struct Fixture {
    pub cluster: TestCluster,
    pub client: Client,
    pub namespace: TestNamespace,
    /// MyResources in the namespace.
    pub resources: Api<MyResource>,
    /// ConfigMaps in the namespace.
    pub config_maps: Api<ConfigMap>,
    /// When the fixture was made: the audit log before it belongs to other tests.
    pub started: k8s_openapi::jiff::Timestamp,
}

impl Fixture {
    /// A fixture whose namespace is named after `prefix`.
    pub async fn new(prefix: &str) -> Result<Self> {
        let started = k8s_openapi::jiff::Timestamp::now();
        let cluster = TestCluster::get()?;
        let client = cluster.admin_client().await?;
        install_crds(&client).await?;
        let namespace = TestNamespace::create(&client, prefix).await?;
        Ok(Self {
            resources: Api::namespaced(client.clone(), &namespace.name),
            config_maps: Api::namespaced(client.clone(), &namespace.name),
            cluster,
            client,
            namespace,
            started,
        })
    }

    /// The namespace's name.
    pub fn ns(&self) -> &str {
        &self.namespace.name
    }

    /// Creates MyResource `name` holding `message`.
    pub async fn create(&self, name: &str, message: &str) -> Result<MyResource> {
        let resource = MyResource::new(name, MyResourceSpec { message: message.to_owned() });
        Ok(self.resources.create(&PostParams::default(), &resource).await?)
    }

    /// Waits until MyResource `name` is Ready for its current generation.
    pub async fn wait_ready(&self, name: &str, timeout: Duration) -> Result<MyResource> {
        eventually(timeout, &format!("MyResource {name} to be Ready"), || async {
            let resource = self.resources.get(name).await?;
            let status = resource.status.clone().unwrap_or_default();
            let current = status.observed_generation == resource.metadata.generation;
            Ok((status.phase == Some(Phase::Ready) && current).then_some(resource))
        })
        .await
    }

    /// The holder the Lease `lease` in the namespace names, if it exists.
    pub async fn lease_holder(&self, lease: &str) -> Result<Option<String>> {
        let leases: Api<Lease> = Api::namespaced(self.client.clone(), self.ns());
        Ok(leases.get_opt(lease).await?.and_then(|l| l.spec).and_then(|s| s.holder_identity))
    }

    /// Starts replica `identity` of the operator as the administrator, electing on `lease` in
    /// the namespace and managing only it.
    pub fn replica(&self, identity: &str, lease: &str, args: &[&str]) -> Result<OperatorProcess> {
        OperatorProcess::spawn(&self.cluster.admin_kubeconfig, identity, lease, self.ns(), args, &[])
    }

    /// Proves "never two writers" among `replicas` on `lease` from the API server's audit log
    /// (see [`audit::one_writer_at_a_time`]).
    pub fn one_writer_at_a_time(
        &self,
        lease: &str,
        replicas: &[&str],
        one_term_each: bool,
    ) -> Result<audit::WriterReport> {
        let writes = audit::read(&self.cluster.audit_log())?;
        audit::one_writer_at_a_time(&writes, self.started, self.ns(), lease, replicas, one_term_each)
    }
}

/// The image `cargo xtask test` built and loaded into the node, as `--set` arguments for the chart.
pub fn chart_image_values() -> Result<Vec<String>> {
    let reference = std::env::var("EXAMPLE_OPERATOR_IMAGE").context(
        "EXAMPLE_OPERATOR_IMAGE is not set: run the tests with `cargo xtask test`, which builds the image and loads it into the node",
    )?;
    let (repository, tag) = reference.rsplit_once(':').context("an image reference repository:tag")?;
    Ok(vec![format!("image.repository={repository}"), format!("image.tag={tag}"), "image.pullPolicy=Never".to_owned()])
}

/// A Pod of a Helm release that the kubelet's probes report Ready.
#[derive(Clone, Debug)]
pub struct ReadyPod {
    pub name: String,
    pub ip: String,
    /// Restarts of its containers, summed.
    pub restarts: i32,
}

/// The Ready Pods (not being deleted) of Helm release `release` in `namespace`.
pub async fn ready_pods(client: &Client, namespace: &str, release: &str) -> Result<Vec<ReadyPod>> {
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(client.clone(), namespace);
    let listed =
        pods.list(&kube::api::ListParams::default().labels(&format!("app.kubernetes.io/instance={release}"))).await?;
    Ok(listed
        .items
        .iter()
        .filter(|pod| pod.metadata.deletion_timestamp.is_none())
        .filter_map(|pod| {
            let status = pod.status.as_ref()?;
            let ready = status.conditions.iter().flatten().any(|c| c.type_ == "Ready" && c.status == "True");
            let restarts = status.container_statuses.iter().flatten().map(|c| c.restart_count).sum();
            let name = pod.metadata.name.clone()?;
            ready.then(|| Some(ReadyPod { name, ip: status.pod_ip.clone()?, restarts }))?
        })
        .collect())
}

/// Polls `check` until it returns `Some`, or fails after `timeout` with `what` and the last error.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>>>,
{
    let deadline = Instant::now() + timeout;
    let mut last_error = None;
    loop {
        match check().await {
            Ok(Some(value)) => return Ok(value),
            Ok(None) => {}
            Err(err) => last_error = Some(err),
        }
        if Instant::now() > deadline {
            let cause = last_error.map(|e| format!(" (last error: {e:#})")).unwrap_or_default();
            bail!("timed out after {timeout:?} waiting for {what}{cause}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs the built helm (on PATH from `cargo xtask test`) as the administrator.
pub fn helm(cluster: &TestCluster, args: &[&str]) -> Result<Output> {
    Command::new("helm")
        .arg("--kubeconfig")
        .arg(&cluster.admin_kubeconfig)
        .args(args)
        .output()
        .context("running helm (built by `cargo xtask cluster up`; run the tests with `cargo xtask test`)")
}

/// Standard output of a run that must succeed; both outputs in the error otherwise.
pub fn succeeded(output: Output) -> Result<String> {
    if !output.status.success() {
        bail!(
            "failed ({}):\n{}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Standard output of a kubectl run that must succeed.
pub fn stdout_of(output: &Output) -> Result<String> {
    if !output.status.success() {
        bail!("kubectl failed ({}): {}", output.status, String::from_utf8_lossy(&output.stderr));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Controllers running in this test process against the local control plane, with their own
/// metrics (so a test can count their reconciles and API writes).
pub struct RunningControllers {
    pub metrics: reconcilers::Metrics,
    shutdown: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl RunningControllers {
    /// Starts the controllers of `settings` as the identity in `kubeconfig`, counting every API
    /// request in `rest_client_requests_total`.
    pub async fn start(kubeconfig: &Path, settings: reconcilers::Settings) -> Result<Self> {
        let metrics = reconcilers::Metrics::new()?;
        let config =
            Config::from_custom_kubeconfig(kube::config::Kubeconfig::read_from(kubeconfig)?, &Default::default())
                .await?;
        let host = config.cluster_url.host().unwrap_or_default().to_owned();
        let client =
            kube::client::ClientBuilder::try_from(config)?.with_layer(&metrics.rest_client_layer(host)).build();
        let shutdown = tokio_util::sync::CancellationToken::new();
        let task = tokio::spawn(reconcilers::run(client, settings, metrics.clone(), shutdown.clone()));
        Ok(Self { metrics, shutdown, task })
    }

    /// Starts every controller, watching only `namespace`, as the administrator.
    pub async fn start_in(cluster: &TestCluster, namespace: &str) -> Result<Self> {
        let settings = reconcilers::Settings { watch_namespace: Some(namespace.to_owned()), ..Default::default() };
        Self::start(&cluster.admin_kubeconfig, settings).await
    }

    /// Stops the controllers and waits until their in-flight reconciles finished.
    pub async fn stop(self) -> Result<()> {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .context("controllers did not stop within 30s")??;
        Ok(())
    }
}

/// Runs `cargo xtask cluster ACTION [COMPONENT]` (stop, start, compact) for fault injection.
pub fn cluster_component(action: &str, component: &str) -> Result<()> {
    let xtask = std::env::var_os("EXAMPLE_OPERATOR_XTASK")
        .context("EXAMPLE_OPERATOR_XTASK is not set: run the tests with `cargo xtask test`")?;
    let args: Vec<&str> = ["cluster", action, component].into_iter().filter(|a| !a.is_empty()).collect();
    let output = Command::new(xtask).args(args).output()?;
    if !output.status.success() {
        bail!("cluster {action} {component} failed: {}", String::from_utf8_lossy(&output.stderr));
    }
    Ok(())
}

/// The operator binary built by `cargo xtask test`.
pub fn operator_binary() -> Result<PathBuf> {
    let path = std::env::var_os("EXAMPLE_OPERATOR_BIN")
        .map(PathBuf::from)
        .context("EXAMPLE_OPERATOR_BIN is not set: run the tests with `cargo xtask test`, which builds the operator")?;
    ensure_file(&path)?;
    Ok(path)
}

fn ensure_file(path: &Path) -> Result<()> {
    if !path.is_file() {
        bail!("{} does not exist; build it with `cargo build -p operator`", path.display());
    }
    Ok(())
}

/// Waits for the operator's "serving HTTP" log line and returns the port it names.
fn bound_port(log: &Path) -> Result<u16> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let port = text.lines().filter(|line| line.contains("serving HTTP")).find_map(|line| {
            let after = &line[line.find("127.0.0.1:")? + "127.0.0.1:".len()..];
            after.chars().take_while(char::is_ascii_digit).collect::<String>().parse().ok()
        });
        if let Some(port) = port {
            return Ok(port);
        }
        if Instant::now() > deadline {
            bail!("the operator did not start serving HTTP within 30s:\n{text}");
        }
        // A blocking wait: the operator is another process, nothing here needs the runtime.
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Election timing short enough for tests: lease 4 s, renew deadline 3 s, retry 0.5 s.
pub const TEST_LEASE: [&str; 6] = ["--lease-duration", "4s", "--renew-deadline", "3s", "--retry-period", "500ms"];

/// An operator replica running as a child process of the test.
pub struct OperatorProcess {
    pub identity: String,
    pub metrics_port: u16,
    pub probe_port: u16,
    child: tokio::process::Child,
    pub log: PathBuf,
}

impl OperatorProcess {
    /// Starts a replica named `identity` with the Lease `lease` in `namespace`, managing only
    /// `namespace`, plus `extra` arguments and `env`.
    pub fn spawn(
        kubeconfig: &Path,
        identity: &str,
        lease: &str,
        namespace: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Self> {
        let mut args = vec!["--watch-namespace", namespace];
        args.extend_from_slice(extra);
        Self::spawn_cluster_wide(kubeconfig, identity, lease, namespace, &args, env)
    }

    /// Like [`OperatorProcess::spawn`], but managing the whole cluster.
    pub fn spawn_cluster_wide(
        kubeconfig: &Path,
        identity: &str,
        lease: &str,
        namespace: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Self> {
        let log = std::env::temp_dir()
            .join(format!("example-operator-{identity}-{:06x}.log", rand::random::<u32>() & 0xff_ffff));
        let out = std::fs::File::create(&log)?;
        let child = tokio::process::Command::new(operator_binary()?)
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .args(["--identity", identity, "--leader-election-id", lease, "--leader-election-namespace", namespace])
            // Port 0: the operator binds a port of its own choosing and logs it, so parallel
            // replicas never race for a port picked in advance.
            .args(["--metrics-bind-address", "127.0.0.1:0", "--health-probe-bind-address", "127.0.0.1:0"])
            .args(extra)
            .env_remove("POD_NAME")
            .env_remove("POD_NAMESPACE")
            .envs(env.iter().copied())
            .stdout(out.try_clone()?)
            .stderr(out)
            .kill_on_drop(true)
            .spawn()
            .context("starting the operator")?;
        let port = bound_port(&log)?;
        Ok(Self { identity: identity.to_owned(), metrics_port: port, probe_port: port, child, log })
    }

    /// The replica's /metrics text.
    pub async fn metrics(&self) -> Result<String> {
        let (code, body) = http_get(self.metrics_port, "/metrics").await?;
        if code != 200 {
            bail!("/metrics answered {code}");
        }
        Ok(body)
    }

    /// 1 when the replica reports it leads `lease`, 0 when standby.
    pub async fn master_status(&self, lease: &str) -> Result<f64> {
        let metrics = self.metrics().await?;
        sample(&metrics, &format!("leader_election_master_status{{name=\"{lease}\"}}"))
            .context("leader_election_master_status is exposed")
    }

    /// Reconciles this replica ran, over every controller.
    pub async fn reconciles(&self) -> Result<f64> {
        Ok(sum_samples(&self.metrics().await?, "controller_runtime_reconcile_total", "controller="))
    }

    /// Sends `signal` to the replica.
    pub fn signal(&self, signal: nix::sys::signal::Signal) -> Result<()> {
        let pid = self.child.id().context("the replica has exited")?;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal)?;
        Ok(())
    }

    /// Waits up to `timeout` for the replica to exit and returns its exit code.
    pub async fn wait(&mut self, timeout: Duration) -> Result<Option<i32>> {
        let status = tokio::time::timeout(timeout, self.child.wait()).await.context("the replica did not exit")??;
        Ok(status.code())
    }

    /// SIGTERM and wait for the exit: a leader releases its lease on the way out.
    pub async fn stop(mut self) -> Result<Option<i32>> {
        self.signal(nix::sys::signal::Signal::SIGTERM)?;
        self.wait(Duration::from_secs(30)).await
    }

    /// The replica's log so far, for failure messages.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}
