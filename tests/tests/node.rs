//! The chart on the local cluster's real node: Pods from the operator's own image (built by
//! `cargo xtask test` with `cargo xtask image --debug` and loaded into the node), probed by a real
//! kubelet, reaching the API server through the `kubernetes` Service with their projected
//! service-account token. What a user installing with Helm would see.

use std::net::SocketAddr;
use std::process::Output;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use e2e_tests::prometheus::{PrometheusServer, value};
use e2e_tests::{Fixture, eventually, http_get_at, sample, stdout_of, succeeded};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams};
use tokio::sync::Mutex;

static ONE_AT_A_TIME: Mutex<()> = Mutex::const_new(());

const RELEASE: &str = "on-node";
const DEPLOYMENT: &str = "on-node-example-operator";
const LEASE: &str = "on-node-example-operator-leader";

/// The image `cargo xtask test` loaded into the node, as `--set` arguments for the chart.
fn image_values() -> Result<Vec<String>> {
    let reference = std::env::var("EXAMPLE_OPERATOR_IMAGE").context(
        "EXAMPLE_OPERATOR_IMAGE is not set: run the tests with `cargo xtask test`, which builds the image and loads it into the node",
    )?;
    let (repository, tag) = reference.rsplit_once(':').context("an image reference repository:tag")?;
    Ok(vec![format!("image.repository={repository}"), format!("image.tag={tag}"), "image.pullPolicy=Never".to_owned()])
}

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
}

impl<'a> Release<'a> {
    fn install(f: &'a Fixture, values: &[String]) -> Result<Self> {
        succeeded(helm(f, &["install", RELEASE, &chart(), "--namespace", f.ns()], values)?)?;
        Ok(Self { f })
    }
}

impl Drop for Release<'_> {
    fn drop(&mut self) {
        let _ = helm(self.f, &["uninstall", RELEASE, "--namespace", self.f.ns()], &[]);
    }
}

fn chart() -> String {
    format!("{}/../charts/example-operator", env!("CARGO_MANIFEST_DIR"))
}

/// Short election timings so the tests see hand-overs quickly; the CRDs are the tests' own.
fn values() -> Result<Vec<String>> {
    let mut values = image_values()?;
    values.extend(
        [
            "crds.install=false",
            "leaderElection.leaseDuration=4s",
            "leaderElection.renewDeadline=3s",
            "leaderElection.retryPeriod=500ms",
            "terminationGracePeriodSeconds=15",
        ]
        .map(str::to_owned),
    );
    Ok(values)
}

/// The release's Pods that are Ready (by the kubelet's probes), by name with their IPs.
async fn ready_pods(f: &Fixture) -> Result<Vec<(String, String)>> {
    let pods: Api<Pod> = Api::namespaced(f.client.clone(), f.ns());
    let listed = pods.list(&ListParams::default().labels(&format!("app.kubernetes.io/instance={RELEASE}"))).await?;
    Ok(listed
        .items
        .iter()
        .filter(|pod| pod.metadata.deletion_timestamp.is_none())
        .filter(|pod| {
            pod.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|conditions| conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        })
        .filter_map(|pod| Some((pod.name_any(), pod.status.as_ref()?.pod_ip.clone()?)))
        .collect())
}

/// Waits until exactly `count` Pods are Ready and the Lease names one of them, which alone
/// reports leading; returns the Pods and the leader's name.
async fn ready_with_one_leader(
    f: &Fixture,
    count: usize,
    timeout: Duration,
) -> Result<(Vec<(String, String)>, String)> {
    eventually(timeout, &format!("{count} Ready Pods with exactly one leader"), || async {
        let pods = ready_pods(f).await?;
        if pods.len() != count {
            return Ok(None);
        }
        let Some(holder) = f.lease_holder(LEASE).await? else { return Ok(None) };
        let mut leading = Vec::new();
        for (name, ip) in &pods {
            let address: SocketAddr = format!("{ip}:8080").parse()?;
            let (code, metrics) = http_get_at(address, "/metrics").await?;
            ensure!(code == 200, "{name}'s /metrics answered {code}");
            if sample(&metrics, &format!("leader_election_master_status{{name=\"{LEASE}\"}}")) == Some(1.0) {
                leading.push(name.clone());
            }
        }
        Ok((leading == [holder.clone()]).then_some((pods, holder)))
    })
    .await
}

/// Prometheus scraping each of the namespace's Pods on its `metrics` port every second.
///
/// Debian's Prometheus 2.42 is built without Kubernetes service discovery (its configuration
/// rejects `kubernetes_sd_configs`), so discovery is done as it would be: as a ServiceAccount
/// allowed only to list Pods, with its token, the Pods' addresses are read from the API server and
/// handed to Prometheus through `file_sd_configs`, refreshed until the Pods are found.
async fn scraping_prometheus(f: &Fixture) -> Result<PrometheusServer> {
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
    let config = format!(
        "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: example-operator\n    file_sd_configs:\n      - files: [\"{}\"]\n        refresh_interval: 1s\n",
        file.display()
    );
    PrometheusServer::start(&config)
}

#[tokio::test]
async fn the_chart_runs_on_the_node_hands_over_and_upgrades_with_one_writer_at_a_time() -> Result<()> {
    let _serial = ONE_AT_A_TIME.lock().await;
    let f = Fixture::new("node-chart").await?;
    let values = values()?;
    let release = Release::install(&f, &values)?;

    // Both Pods Ready through the kubelet's probes; exactly one leads, and the Lease names a Pod.
    let (pods, leader) = ready_with_one_leader(&f, 2, Duration::from_secs(120)).await?;
    ensure!(pods.iter().any(|(name, _)| *name == leader), "the Lease holder {leader} is one of the Pods {pods:?}");
    f.create("on-the-node", "reconciled by a Pod").await?;
    f.wait_ready("on-the-node", Duration::from_secs(60)).await?;

    // `helm test`: the chart's test Pod (the operator's own image) checks the release through its
    // metrics Service.
    let tested = succeeded(helm(&f, &["test", RELEASE, "--namespace", f.ns(), "--logs"], &[])?)?;
    ensure!(tested.contains("Phase:          Succeeded") || tested.contains("Phase: Succeeded"), "{tested}");
    ensure!(tested.contains("metric leader_election_master_status: exposed"), "{tested}");

    // A real Prometheus scrapes both Pods on their Pod addresses, found through the API server
    // with a ServiceAccount's token.
    let prometheus = scraping_prometheus(&f).await?;
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
    let (pods, _) = ready_with_one_leader(&f, 2, Duration::from_secs(120)).await?;
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
    ready_with_one_leader(&f, 2, Duration::from_secs(60)).await?;
    f.create("after-upgrade", "reconciled after the rolling update").await?;
    f.wait_ready("after-upgrade", Duration::from_secs(60)).await?;

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

    drop(release);
    Ok(())
}
