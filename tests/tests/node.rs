//! The chart on the local cluster's real node: Pods from the operator's own image (built by
//! `cargo xtask test` with `cargo xtask image --debug` and loaded into the node), probed by a real
//! kubelet, reaching the API server through the `kubernetes` Service with their projected
//! service-account token. What a user installing with Helm would see.

use std::process::Output;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use crd_types::{MessageBroadcast, MessageBroadcastSpec, MyResource, MyResourceSpec, Phase};
use e2e_tests::prometheus::{PrometheusServer, value};
use e2e_tests::{Fixture, TestNamespace, client_for, eventually, sample, stdout_of, succeeded};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, Secret};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::rbac::v1::{ClusterRole, Role};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use operator::check::{Answer, Request, get};
use serde_json::json;
use tokio::sync::Mutex;

static ONE_AT_A_TIME: Mutex<()> = Mutex::const_new(());

const RELEASE: &str = "on-node";
const DEPLOYMENT: &str = "on-node-example-operator";
const LEASE: &str = "on-node-example-operator-leader";

/// helm with `values` as `--set` arguments.
fn helm(f: &Fixture, args: &[&str], values: &[String]) -> Result<Output> {
    let mut all: Vec<&str> = args.to_vec();
    for value in values {
        all.extend(["--set", value]);
    }
    e2e_tests::helm(&f.cluster, &all)
}

/// A Helm release uninstalled when dropped, so a failed test leaves no cluster-wide RBAC behind.
struct Release<'a> {
    f: &'a Fixture,
    name: &'static str,
    installed: bool,
}

impl<'a> Release<'a> {
    fn install(f: &'a Fixture, name: &'static str, args: &[&str], values: &[String]) -> Result<Self> {
        let chart = chart();
        let mut all = vec!["install", name, chart.as_str(), "--namespace", f.ns()];
        all.extend(args);
        succeeded(helm(f, &all, values)?)?;
        Ok(Self { f, name, installed: true })
    }

    /// `helm uninstall`, reporting its failure.
    fn uninstall(mut self) -> Result<()> {
        self.installed = false;
        succeeded(helm(self.f, &["uninstall", self.name, "--namespace", self.f.ns(), "--wait"], &[])?).map(drop)
    }
}

impl Drop for Release<'_> {
    fn drop(&mut self) {
        if self.installed {
            let _ = helm(self.f, &["uninstall", self.name, "--namespace", self.f.ns()], &[]);
        }
    }
}

fn chart() -> String {
    format!("{}/../charts/example-operator", env!("CARGO_MANIFEST_DIR"))
}

/// Short election timings so the tests see hand-overs quickly; the CRDs are the tests' own.
fn values() -> Result<Vec<String>> {
    let mut values = e2e_tests::chart_image_values()?;
    values.extend(
        [
            "crds.install=false",
            "leaderElection.leaseDuration=4s",
            "leaderElection.renewDeadline=3s",
            "leaderElection.retryPeriod=500ms",
            "terminationGracePeriodSeconds=20",
        ]
        .map(str::to_owned),
    );
    Ok(values)
}

/// The release's Pods that are Ready (by the kubelet's probes), by name with their IPs.
async fn ready_pods(f: &Fixture, release: &str) -> Result<Vec<(String, String)>> {
    let pods = e2e_tests::ready_pods(&f.client, f.ns(), release).await?;
    Ok(pods.into_iter().map(|pod| (pod.name, pod.ip)).collect())
}

/// How to read a release's secure /metrics: HTTPS (the self-signed certificate) with a token of
/// ServiceAccount `metrics-reader`, bound to the release's metrics-reader ClusterRole as NOTES
/// tells users to bind their Prometheus (the operator's own ServiceAccount is not bound to it).
/// The binding goes when the returned guard is dropped.
fn metrics_reader(f: &Fixture, release: &str) -> Result<(Request, ClusterBinding)> {
    let created = f.cluster.kubectl(&["create", "serviceaccount", "metrics-reader", "-n", f.ns()])?;
    ensure!(
        created.status.success() || String::from_utf8_lossy(&created.stderr).contains("already exists"),
        "creating ServiceAccount metrics-reader: {}",
        String::from_utf8_lossy(&created.stderr)
    );
    let name = format!("{}-{release}-metrics-reader", f.ns());
    let _ = f.cluster.kubectl(&["delete", "clusterrolebinding", &name, "--ignore-not-found"]);
    stdout_of(&f.cluster.kubectl(&[
        "create",
        "clusterrolebinding",
        &name,
        &format!("--clusterrole={release}-example-operator-metrics-reader"),
        &format!("--serviceaccount={}:metrics-reader", f.ns()),
    ])?)?;
    let binding = ClusterBinding { cluster: f.cluster.clone(), name };
    let token =
        stdout_of(&f.cluster.kubectl(&["create", "token", "metrics-reader", "-n", f.ns(), "--duration=1h"])?)?;
    let request =
        Request { token: Some(token.trim().to_owned()), insecure_skip_tls_verify: true, ..Request::default() };
    Ok((request, binding))
}

/// Waits until exactly `count` Pods are Ready and the Lease names one of them, which alone
/// reports leading; returns the Pods and the leader's name.
async fn ready_with_one_leader(
    f: &Fixture,
    release: &str,
    count: usize,
    timeout: Duration,
) -> Result<(Vec<(String, String)>, String)> {
    let lease = format!("{release}-example-operator-leader");
    // Secure metrics (the chart's default): a reader bound to the release's metrics-reader role.
    let (reader, _binding) = metrics_reader(f, release)?;
    eventually(timeout, &format!("{count} Ready Pods with exactly one leader"), || async {
        let pods = ready_pods(f, release).await?;
        if pods.len() != count {
            return Ok(None);
        }
        let Some(holder) = f.lease_holder(&lease).await? else { return Ok(None) };
        let mut leading = Vec::new();
        for (name, ip) in &pods {
            let Answer { code, body: metrics, .. } = get(&format!("https://{ip}:8080/metrics"), &reader).await?;
            ensure!(code == 200, "{name}'s /metrics answered {code}: {metrics}");
            if sample(&metrics, &format!("leader_election_master_status{{name=\"{lease}\"}}")) == Some(1.0) {
                leading.push(name.clone());
            }
        }
        Ok((leading == [holder.clone()]).then_some((pods, holder)))
    })
    .await
}

/// Prometheus scraping each of the namespace's Pods on its `metrics` port every second, with the
/// endpoint settings of the ServiceMonitor the chart renders for `values` (HTTPS, a bearer token,
/// TLS verification as configured), as a ServiceAccount bound to the chart's metrics-reader role.
///
/// Debian's Prometheus 2.42 is built without Kubernetes service discovery (its configuration
/// rejects `kubernetes_sd_configs`), so discovery is done as it would be: as a ServiceAccount
/// allowed only to list Pods, with its token, the Pods' addresses are read from the API server and
/// handed to Prometheus through `file_sd_configs`, refreshed until the Pods are found.
async fn scraping_prometheus(f: &Fixture, release: &str, values: &[String]) -> Result<ScrapingPrometheus> {
    let reader_binding = format!("{}-prometheus-metrics", f.ns());
    for args in [
        vec!["create", "serviceaccount", "prometheus"],
        vec!["create", "role", "pod-discovery", "--verb=get,list,watch", "--resource=pods"],
        vec![
            "create",
            "rolebinding",
            "prometheus",
            "--role=pod-discovery",
            "--serviceaccount",
            &format!("{}:prometheus", f.ns()),
        ],
    ] {
        let mut args = args;
        args.extend(["--namespace", f.ns()]);
        stdout_of(&f.cluster.kubectl(&args)?)?;
    }
    // What NOTES tells users to run for their Prometheus.
    stdout_of(&f.cluster.kubectl(&[
        "create",
        "clusterrolebinding",
        &reader_binding,
        &format!("--clusterrole={release}-example-operator-metrics-reader"),
        &format!("--serviceaccount={}:prometheus", f.ns()),
    ])?)?;
    let binding = ClusterBinding { cluster: f.cluster.clone(), name: reader_binding };
    Ok(ScrapingPrometheus { server: scrape_with(f, release, values).await?, _binding: binding })
}

/// A ClusterRoleBinding the test made, deleted when dropped.
struct ClusterBinding {
    cluster: e2e_tests::TestCluster,
    name: String,
}

impl Drop for ClusterBinding {
    fn drop(&mut self) {
        let _ = self.cluster.kubectl(&["delete", "clusterrolebinding", &self.name, "--ignore-not-found"]);
    }
}

/// Prometheus and the binding that lets it read /metrics.
struct ScrapingPrometheus {
    server: PrometheusServer,
    _binding: ClusterBinding,
}

impl std::ops::Deref for ScrapingPrometheus {
    type Target = PrometheusServer;
    fn deref(&self) -> &PrometheusServer {
        &self.server
    }
}

async fn scrape_with(f: &Fixture, release: &str, values: &[String]) -> Result<PrometheusServer> {
    let token = stdout_of(&f.cluster.kubectl(&["create", "token", "prometheus", "--namespace", f.ns()])?)?;
    let kubeconfig = f.cluster.kubeconfig_with_token("prometheus", token.trim()).await?;
    let as_prometheus = e2e_tests::client_for(&kubeconfig).await?;
    let pods: Api<Pod> = Api::namespaced(as_prometheus, f.ns());
    let targets: Vec<serde_json::Value> = pods
        .list(&ListParams::default())
        .await?
        .items
        .iter()
        .filter_map(|pod| {
            let ip = pod.status.as_ref()?.pod_ip.clone()?;
            let port = pod.spec.as_ref()?.containers.iter().flat_map(|c| c.ports.iter().flatten()).find(|p| p.name.as_deref() == Some("metrics"))?.container_port;
            Some(serde_json::json!({"targets": [format!("{ip}:{port}")], "labels": {"pod": pod.name_any(), "namespace": f.ns()}}))
        })
        .collect();
    ensure!(targets.len() == 2, "the ServiceAccount finds both Pods' metrics ports: {targets:?}");
    let dir = std::env::temp_dir().join(format!("{}-targets", f.ns()));
    std::fs::create_dir_all(&dir)?;
    let file = dir.join("pods.json");
    std::fs::write(&file, serde_json::to_string(&targets)?)?;
    let token_file = dir.join("token");
    std::fs::write(&token_file, token.trim())?;

    // The ServiceMonitor's endpoint, as the Prometheus Operator would turn it into a scrape config
    // (the token file is this Prometheus's, since it does not run in a Pod).
    let chart = chart();
    let args = ["template", release, &chart, "--namespace", f.ns(), "--show-only", "templates/servicemonitor.yaml"];
    let all: Vec<String> = values.iter().cloned().chain(["serviceMonitor.enabled=true".to_owned()]).collect();
    let rendered = succeeded(helm(f, &args, &all)?)?;
    let monitor: serde_json::Value = serde_yaml::from_str(&rendered)?;
    let endpoint = &monitor["spec"]["endpoints"][0];
    ensure!(endpoint["scheme"] == "https", "the chart's ServiceMonitor scrapes over HTTPS: {endpoint}");
    ensure!(endpoint["bearerTokenFile"].is_string(), "the chart's ServiceMonitor sends a token: {endpoint}");
    let skip_verify = endpoint["tlsConfig"]["insecureSkipVerify"].as_bool().unwrap_or(false);
    let config = format!(
        "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: example-operator\n    scheme: https\n    metrics_path: {}\n    bearer_token_file: \"{}\"\n    tls_config:\n      insecure_skip_verify: {skip_verify}\n    file_sd_configs:\n      - files: [\"{}\"]\n        refresh_interval: 1s\n",
        endpoint["path"].as_str().unwrap_or("/metrics"),
        token_file.display(),
        file.display()
    );
    PrometheusServer::start(&config)
}

#[tokio::test]
async fn the_chart_runs_on_the_node_hands_over_and_upgrades_with_one_writer_at_a_time() -> Result<()> {
    let _serial = ONE_AT_A_TIME.lock().await;
    let f = Fixture::new("node-chart").await?;
    let mut values = values()?;
    // The release installs (and adopts) the CRDs, so its uninstall shows they are kept.
    values.push("crds.install=true".to_owned());
    let release = Release::install(&f, RELEASE, &["--take-ownership"], &values)?;

    // Both Pods Ready through the kubelet's probes; exactly one leads, and the Lease names a Pod.
    let (pods, leader) = ready_with_one_leader(&f, RELEASE, 2, Duration::from_secs(120)).await?;
    ensure!(pods.iter().any(|(name, _)| *name == leader), "the Lease holder {leader} is one of the Pods {pods:?}");
    let (tenant, resources) = tenant(&f, "node-chart-tenant").await?;
    create_ready(&resources, "on-the-node", "reconciled by a Pod").await?;

    // `helm test`: the chart's test Pod (the operator's own image) checks the release through its
    // metrics Service.
    let tested = succeeded(helm(&f, &["test", RELEASE, "--namespace", f.ns(), "--logs"], &[])?)?;
    ensure!(tested.contains("Phase:          Succeeded") || tested.contains("Phase: Succeeded"), "{tested}");
    ensure!(tested.contains("metric leader_election_master_status: exposed"), "{tested}");

    // A real Prometheus scrapes both Pods on their Pod addresses, found through the API server
    // with a ServiceAccount's token.
    let prometheus = scraping_prometheus(&f, RELEASE, &values).await?;
    let up = "up{job=\"example-operator\"}";
    prometheus
        .eventually(Duration::from_secs(60), up, |series| {
            (series.len() == 2 && series.iter().all(|s| value(s) == Some(1.0))).then_some(())
        })
        .await?;
    let leaders = "sum(leader_election_master_status{job=\"example-operator\"})";
    prometheus
        .eventually(Duration::from_secs(30), leaders, |series| {
            (series.first().and_then(value) == Some(1.0)).then_some(())
        })
        .await?;
    drop(prometheus);

    // The leader's Pod is deleted: the standby leads within a lease duration, and the
    // Deployment brings the replica count back.
    let deleted = Instant::now();
    let pods_api: Api<Pod> = Api::namespaced(f.client.clone(), f.ns());
    pods_api.delete(&leader, &DeleteParams::default()).await?;
    let successor = eventually(Duration::from_secs(30), "another Pod to hold the Lease", || async {
        Ok(f.lease_holder(LEASE).await?.filter(|holder| *holder != leader && !holder.is_empty()))
    })
    .await?;
    let took = deleted.elapsed();
    ensure!(took <= Duration::from_secs(4), "{successor} led {took:?} after the delete; the lease is 4 s");
    let (pods, _) = ready_with_one_leader(&f, RELEASE, 2, Duration::from_secs(120)).await?;
    ensure!(!pods.iter().any(|(name, _)| *name == leader), "the deleted Pod was replaced: {pods:?}");

    // An upgrade that changes a value rolls every Pod.
    let mut upgraded = values.clone();
    upgraded.push("logging.level=debug".to_owned());
    succeeded(helm(&f, &["upgrade", RELEASE, &chart(), "--namespace", f.ns()], &upgraded)?)?;
    let deployments: Api<Deployment> = Api::namespaced(f.client.clone(), f.ns());
    eventually(Duration::from_secs(180), "the rolling update to complete", || async {
        let deployment = deployments.get(DEPLOYMENT).await?;
        let status = deployment.status.unwrap_or_default();
        let generation = deployment.metadata.generation;
        let done = status.observed_generation == generation
            && status.updated_replicas == Some(2)
            && status.ready_replicas == Some(2)
            && status.replicas == Some(2);
        Ok(done.then_some(()))
    })
    .await?;
    ready_with_one_leader(&f, RELEASE, 2, Duration::from_secs(60)).await?;
    create_ready(&resources, "after-upgrade", "reconciled after the rolling update").await?;

    // What the API server recorded: across the delete and the rolling update, the Pods never
    // wrote as leader at the same time.
    let writers = e2e_tests::audit::read(&f.cluster.audit_log())?
        .iter()
        .filter(|w| w.received >= f.started)
        .filter_map(|w| w.operator_identity().map(str::to_owned))
        .filter(|identity| identity.starts_with(DEPLOYMENT))
        .collect::<std::collections::BTreeSet<_>>();
    ensure!(writers.len() >= 3, "three or more Pods wrote over the test: {writers:?}");
    let identities: Vec<&str> = writers.iter().map(String::as_str).collect();
    let report = f.one_writer_at_a_time(LEASE, &identities, false)?;
    ensure!(report.intervals.len() >= 2, "{report:?}");

    // `helm uninstall` removes the Pods and the cluster-wide RBAC, and keeps the CRDs and the
    // custom resources (`crds.keep`).
    release.uninstall()?;
    // The Deployment's Pods go (after their grace period); the `helm test` Pod stays for its
    // logs, as Helm leaves every hook (its delete policy only replaces it on the next test).
    let pods: Api<Pod> = Api::namespaced(f.client.clone(), f.ns());
    let test_pod = format!("{DEPLOYMENT}-test");
    eventually(Duration::from_secs(60), "the release's Pods to be gone after uninstall", || async {
        let left = pods.list(&ListParams::default().labels(&format!("app.kubernetes.io/instance={RELEASE}"))).await?;
        let names: Vec<String> = left.items.iter().map(|p| p.name_any()).collect();
        Ok((names == [test_pod.clone()]).then_some(()))
    })
    .await?;
    ensure!(
        Api::<ClusterRole>::all(f.client.clone()).get_opt(DEPLOYMENT).await?.is_none(),
        "the ClusterRole is removed"
    );
    let crds: Api<CustomResourceDefinition> = Api::all(f.client.clone());
    for crd in ["myresources.example.com", "messagebroadcasts.example.com"] {
        let kept = crds.get_opt(crd).await?.context(format!("{crd} was deleted by the uninstall"))?;
        ensure!(
            kept.annotations().get("meta.helm.sh/release-name").map(String::as_str) == Some(RELEASE),
            "{crd} was the release's"
        );
    }
    for name in ["on-the-node", "after-upgrade"] {
        ensure!(resources.get_opt(name).await?.is_some(), "MyResource {name} is kept");
    }
    tenant.delete().await
}

/// A namespace for MyResources, beside the release's own, which the operator never writes into
/// (it is protected, like kube-system).
async fn tenant(f: &Fixture, prefix: &str) -> Result<(TestNamespace, Api<MyResource>)> {
    let namespace = TestNamespace::create(&f.client, prefix).await?;
    let resources = Api::namespaced(f.client.clone(), &namespace.name);
    Ok((namespace, resources))
}

/// Creates MyResource `name` holding `message` and waits until it is Ready for its generation.
async fn create_ready(resources: &Api<MyResource>, name: &str, message: &str) -> Result<()> {
    let resource = MyResource::new(name, MyResourceSpec { message: message.to_owned() });
    resources.create(&PostParams::default(), &resource).await?;
    eventually(Duration::from_secs(60), &format!("MyResource {name} to be Ready"), || async {
        let resource = resources.get(name).await?;
        let status = resource.status.unwrap_or_default();
        let current = status.observed_generation == resource.metadata.generation;
        Ok((status.phase == Some(Phase::Ready) && current).then_some(()))
    })
    .await
}

/// Everything the operator's RBAC has to allow, as outcomes a user would check. Fails (with the
/// step that did not happen) within about `step` per step when a permission is missing.
async fn exercise_every_permission(client: &Client, ns: &str, other: &str, step: Duration) -> Result<()> {
    let resources: Api<MyResource> = Api::namespaced(client.clone(), ns);
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    // myresources list/watch, configmaps create, myresources/status patch.
    resources
        .create(&PostParams::default(), &MyResource::new("rbac", MyResourceSpec { message: "allowed".into() }))
        .await?;
    eventually(step, "MyResource Ready with its ConfigMap", || async {
        let ready = resources.get("rbac").await?.status.and_then(|s| s.phase) == Some(Phase::Ready);
        Ok((ready && config_maps.get_opt("rbac-configmap").await?.is_some()).then_some(()))
    })
    .await?;
    // configmaps patch (drift repair), twice: the repeated event is merged by events patch.
    for attempt in 0..2 {
        config_maps
            .patch("rbac-configmap", &PatchParams::default(), &Patch::Merge(json!({"data": {"message": "tampered"}})))
            .await?;
        eventually(step, &format!("drift repair #{attempt}"), || async {
            let message = config_maps.get("rbac-configmap").await?.data.and_then(|d| d.get("message").cloned());
            Ok((message.as_deref() == Some("allowed")).then_some(()))
        })
        .await?;
    }
    // configmaps get (a foreign ConfigMap is not in the cache), events create.
    let foreign: ConfigMap =
        serde_json::from_value(json!({"metadata": {"name": "blocked-configmap"}, "data": {"message": "mine"}}))?;
    config_maps.create(&PostParams::default(), &foreign).await?;
    resources
        .create(&PostParams::default(), &MyResource::new("blocked", MyResourceSpec { message: "x".into() }))
        .await?;
    let events: Api<Event> = Api::namespaced(client.clone(), ns);
    eventually(step, "Failed status and a Warning event for the conflict", || async {
        let failed = resources.get("blocked").await?.status.and_then(|s| s.phase) == Some(Phase::Failed);
        let list = events.list(&ListParams::default()).await?;
        let warned = list.items.iter().any(|e| e.reason.as_deref() == Some("ConfigMapConflict"));
        let series = list.items.iter().any(|e| e.reason.as_deref() == Some("ConfigMapUpdated") && e.series.is_some());
        Ok((failed && warned && series).then_some(()))
    })
    .await?;
    // messagebroadcasts list/watch + status patch, namespaces list/watch, configmaps delete.
    let key = format!("rbac.example.com/{ns}");
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .patch(other, &PatchParams::default(), &Patch::Merge(json!({"metadata": {"labels": {&key: "yes"}}})))
        .await?;
    let broadcasts: Api<MessageBroadcast> = Api::all(client.clone());
    let selector =
        LabelSelector { match_labels: Some([(key.clone(), "yes".to_owned())].into()), match_expressions: None };
    let spec = MessageBroadcastSpec { message: "everyone".into(), namespace_selector: selector, config_map_name: None };
    broadcasts.create(&PostParams::default(), &MessageBroadcast::new(ns, spec)).await?;
    let copies: Api<ConfigMap> = Api::namespaced(client.clone(), other);
    let outcome = async {
        eventually(step, "the broadcast's copy and status", || async {
            let status = broadcasts.get(ns).await?.status.unwrap_or_default();
            Ok((status.ready_namespaces == 1 && copies.get_opt(ns).await?.is_some()).then_some(()))
        })
        .await?;
        namespaces
            .patch(other, &PatchParams::default(), &Patch::Merge(json!({"metadata": {"labels": {&key: null}}})))
            .await?;
        eventually(step, "the copy to be deleted from the unselected namespace", || async {
            Ok(copies.get_opt(ns).await?.is_none().then_some(()))
        })
        .await
    }
    .await;
    // The broadcast is cluster-scoped: it goes whatever happened.
    broadcasts.delete(ns, &Default::default()).await?;
    outcome
}

/// Scales the release's Deployment to `replicas` and, for zero, waits until its Pods are gone.
async fn scale(f: &Fixture, deployment: &str, release: &str, replicas: i32) -> Result<()> {
    let deployments: Api<Deployment> = Api::namespaced(f.client.clone(), f.ns());
    deployments
        .patch(deployment, &PatchParams::default(), &Patch::Merge(json!({"spec": {"replicas": replicas}})))
        .await?;
    let pods: Api<Pod> = Api::namespaced(f.client.clone(), f.ns());
    let selector = format!("app.kubernetes.io/instance={release}");
    eventually(Duration::from_secs(90), &format!("{replicas} running Pods of {deployment}"), || async {
        let listed = pods.list(&ListParams::default().labels(&selector)).await?.items;
        let running = listed
            .iter()
            .filter(|pod| pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
            .filter(|pod| pod.metadata.deletion_timestamp.is_none())
            .count();
        Ok((running == replicas as usize && listed.len() == replicas as usize).then_some(()))
    })
    .await
}

/// The chart's RBAC, as the Pods use it (projected ServiceAccount token, in-cluster
/// configuration): everything works with all of it, Secrets stay out of reach, and with each
/// ClusterRole and Role rule removed in turn something a user would check breaks.
#[tokio::test]
async fn the_pods_run_with_exactly_the_charts_rbac_and_each_rule_is_needed() -> Result<()> {
    const RBAC_RELEASE: &str = "rbac";
    const RBAC_DEPLOYMENT: &str = "rbac-example-operator";
    let _serial = ONE_AT_A_TIME.lock().await;
    let f = Fixture::new("node-rbac").await?;
    let mut values = values()?;
    values.push("replicaCount=1".to_owned());
    let release = Release::install(&f, RBAC_RELEASE, &[], &values)?;
    ready_with_one_leader(&f, RBAC_RELEASE, 1, Duration::from_secs(120)).await?;
    let (tenant, _) = tenant(&f, "node-rbac-tenant").await?;
    let other = TestNamespace::create(&f.client, "node-rbac-other").await?;
    exercise_every_permission(&f.client, &tenant.name, &other.name, Duration::from_secs(30))
        .await
        .context("with the chart's full RBAC")?;
    other.delete().await?;
    tenant.delete().await?;

    // It cannot read Secrets.
    let token = stdout_of(&f.cluster.kubectl(&["create", "token", RBAC_DEPLOYMENT, "-n", f.ns(), "--duration=1h"])?)?;
    let as_operator = client_for(&f.cluster.kubeconfig_with_token(RBAC_DEPLOYMENT, token.trim()).await?).await?;
    let denied = Api::<Secret>::all(as_operator.clone()).list(&ListParams::default()).await;
    ensure!(matches!(&denied, Err(kube::Error::Api(s)) if s.code == 403), "listing Secrets: {denied:?}");
    let denied = Api::<Secret>::namespaced(as_operator, f.ns()).get_opt("anything").await;
    ensure!(matches!(&denied, Err(kube::Error::Api(s)) if s.code == 403), "reading a Secret: {denied:?}");

    // Each rule, removed in turn from a fresh start (no Pod, no Lease): something breaks.
    let cluster_roles: Api<ClusterRole> = Api::all(f.client.clone());
    let roles: Api<Role> = Api::namespaced(f.client.clone(), f.ns());
    let role_name = format!("{RBAC_DEPLOYMENT}-leader-election");
    let leases: Api<Lease> = Api::namespaced(f.client.clone(), f.ns());
    let cluster_rules = cluster_roles.get(RBAC_DEPLOYMENT).await?.rules.unwrap_or_default();
    let role_rules = roles.get(&role_name).await?.rules.unwrap_or_default();
    let cases = (0..cluster_rules.len()).map(|i| (true, i)).chain((0..role_rules.len()).map(|i| (false, i)));
    for (cluster_wide, index) in cases {
        scale(&f, RBAC_DEPLOYMENT, RBAC_RELEASE, 0).await?;
        let _ = leases.delete(&format!("{RBAC_DEPLOYMENT}-leader"), &DeleteParams::default()).await;
        let (mut clusters, mut namespaced) = (cluster_rules.clone(), role_rules.clone());
        let removed = if cluster_wide { clusters.remove(index) } else { namespaced.remove(index) };
        cluster_roles
            .patch(RBAC_DEPLOYMENT, &PatchParams::default(), &Patch::Merge(json!({"rules": clusters})))
            .await?;
        roles.patch(&role_name, &PatchParams::default(), &Patch::Merge(json!({"rules": namespaced}))).await?;
        scale(&f, RBAC_DEPLOYMENT, RBAC_RELEASE, 1).await?;
        let scratch = TestNamespace::create(&f.client, "node-rbac-cut").await?;
        let scratch_other = TestNamespace::create(&f.client, "node-rbac-cut-other").await?;
        let outcome =
            exercise_every_permission(&f.client, &scratch.name, &scratch_other.name, Duration::from_secs(8)).await;
        ensure!(
            outcome.is_err(),
            "removing {} rule {index} ({:?} {:?} {:?}) changed nothing",
            if cluster_wide { "ClusterRole" } else { "Role" },
            removed.api_groups,
            removed.resources,
            removed.verbs
        );
        scratch.delete().await?;
        scratch_other.delete().await?;
    }
    release.uninstall()
}

/// The kinds and names of what a release installed (`helm get manifest`).
fn release_objects(f: &Fixture, release: &str) -> Result<Vec<(String, String)>> {
    let manifest = succeeded(helm(f, &["get", "manifest", release, "--namespace", f.ns()], &[])?)?;
    Ok(manifest
        .split("\n---")
        .filter_map(|doc| serde_yaml::from_str::<serde_yaml::Value>(doc).ok())
        .filter(|doc| !doc.is_null())
        .map(|doc| {
            let text = |v: &serde_yaml::Value| v.as_str().unwrap_or_default().to_owned();
            (text(&doc["kind"]), text(&doc["metadata"]["name"]))
        })
        .collect())
}

/// Namespaced mode, as a team without cluster-wide rights would run it: the release's RBAC is a
/// Role in the watched namespace and nothing cluster-wide, and a MyResource there converges.
/// Enabling MessageBroadcasts (cluster-scoped) adds only their narrow ClusterRole, and a
/// broadcast reaches the watched namespace through it.
#[tokio::test]
async fn in_namespaced_mode_the_operator_converges_its_namespace_with_no_cluster_wide_rbac() -> Result<()> {
    const SCOPED_RELEASE: &str = "scoped";
    let _serial = ONE_AT_A_TIME.lock().await;
    let f = Fixture::new("node-scoped").await?;
    let watched = TestNamespace::create(&f.client, "node-scoped-watched").await?;
    let mut values = values()?;
    values.extend(
        [
            "replicaCount=1".to_owned(),
            // Secure metrics asks the API server about callers (cluster-wide reviews).
            "metrics.secure=false".to_owned(),
            format!("watchNamespace={}", watched.name),
        ]
        .into_iter(),
    );
    let mut only_my_resources = values.clone();
    only_my_resources.push("controllers.enabled={myresource}".to_owned());
    let release = Release::install(&f, SCOPED_RELEASE, &[], &only_my_resources)?;

    let objects = release_objects(&f, SCOPED_RELEASE)?;
    ensure!(
        !objects.iter().any(|(kind, _)| kind == "ClusterRole" || kind == "ClusterRoleBinding"),
        "nothing cluster-wide: {objects:?}"
    );
    let role = Api::<Role>::namespaced(f.client.clone(), &watched.name).get_opt("scoped-example-operator").await?;
    ensure!(role.is_some(), "the Role is in the watched namespace");
    eventually(Duration::from_secs(120), "the Pod to be Ready", || async {
        Ok((ready_pods(&f, SCOPED_RELEASE).await?.len() == 1).then_some(()))
    })
    .await?;

    let resources: Api<MyResource> = Api::namespaced(f.client.clone(), &watched.name);
    let config_maps: Api<ConfigMap> = Api::namespaced(f.client.clone(), &watched.name);
    let resource = MyResource::new("scoped", MyResourceSpec { message: "only here".into() });
    resources.create(&PostParams::default(), &resource).await?;
    eventually(Duration::from_secs(60), "the watched namespace's MyResource Ready with its ConfigMap", || async {
        let phase = resources.get("scoped").await?.status.and_then(|s| s.phase);
        let message = config_maps.get_opt("scoped-configmap").await?.and_then(|cm| cm.data?.get("message").cloned());
        Ok((phase == Some(Phase::Ready) && message.as_deref() == Some("only here")).then_some(()))
    })
    .await?;
    // By this release's Pod (not another operator on the cluster): its event names it.
    let by_this_release = |namespace: &str, regarding: &str| {
        let events: Api<Event> = Api::namespaced(f.client.clone(), namespace);
        let regarding = regarding.to_owned();
        async move {
            let listed = events.list(&ListParams::default()).await?.items;
            Ok::<_, anyhow::Error>(listed.iter().any(|event| {
                event.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(regarding.as_str())
                    && event.reporting_instance.as_deref().is_some_and(|i| i.starts_with("scoped-example-operator-"))
            }))
        }
    };
    eventually(Duration::from_secs(30), "the Pod's event about the MyResource", || async {
        Ok(by_this_release(&watched.name, "scoped").await?.then_some(()))
    })
    .await?;

    // Both controllers: the release gains the broadcasts' ClusterRole (and no other), and a
    // broadcast selecting the watched namespace puts its copy there.
    succeeded(helm(&f, &["upgrade", SCOPED_RELEASE, &chart(), "--namespace", f.ns()], &values)?)?;
    let objects = release_objects(&f, SCOPED_RELEASE)?;
    let cluster_wide: Vec<&str> =
        objects.iter().filter(|(kind, _)| kind.starts_with("Cluster")).map(|(_, name)| name.as_str()).collect();
    ensure!(
        cluster_wide == ["scoped-example-operator-messagebroadcasts", "scoped-example-operator-messagebroadcasts"],
        "one ClusterRole and its binding: {objects:?}"
    );
    let deployments: Api<Deployment> = Api::namespaced(f.client.clone(), f.ns());
    eventually(Duration::from_secs(120), "the upgraded Pod to be Ready", || async {
        let deployment = deployments.get("scoped-example-operator").await?;
        let status = deployment.status.unwrap_or_default();
        let done = status.observed_generation == deployment.metadata.generation
            && status.updated_replicas == Some(1)
            && status.ready_replicas == Some(1)
            && status.replicas == Some(1);
        Ok(done.then_some(()))
    })
    .await?;
    let key = format!("example.com/{}", watched.name);
    let labelled = json!({"metadata": {"labels": {&key: "yes"}}});
    Api::<Namespace>::all(f.client.clone())
        .patch(&watched.name, &PatchParams::default(), &Patch::Merge(labelled))
        .await?;
    let broadcasts: Api<MessageBroadcast> = Api::all(f.client.clone());
    let selector = LabelSelector { match_labels: Some([(key, "yes".to_owned())].into()), match_expressions: None };
    let spec =
        MessageBroadcastSpec { message: "to the team".into(), namespace_selector: selector, config_map_name: None };
    broadcasts.create(&PostParams::default(), &MessageBroadcast::new(&watched.name, spec)).await?;
    let outcome = eventually(Duration::from_secs(60), "the broadcast's copy in the watched namespace", || async {
        let status = broadcasts.get(&watched.name).await?.status.unwrap_or_default();
        let copy = config_maps.get_opt(&watched.name).await?.and_then(|cm| cm.data?.get("message").cloned());
        Ok((status.ready_namespaces == 1 && copy.as_deref() == Some("to the team")).then_some(()))
    })
    .await;
    // Events about a cluster-scoped broadcast go to `default`, through the release's Role there.
    let outcome = match outcome {
        Ok(()) => {
            eventually(Duration::from_secs(30), "the Pod's event about the broadcast in default", || async {
                Ok(by_this_release("default", &watched.name).await?.then_some(()))
            })
            .await
        }
        Err(error) => Err(error),
    };
    // The broadcast is cluster-scoped: it goes whatever happened.
    broadcasts.delete(&watched.name, &DeleteParams::default()).await?;
    outcome?;
    release.uninstall()?;
    watched.delete().await
}
