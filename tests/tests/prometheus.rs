//! The operator's /metrics passes `promtool check metrics`, and a real Prometheus server scrapes
//! it and answers queries for controller-runtime's metric names. Both tools come from Debian's
//! `prometheus` package, which `.ci/run` installs.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use crd_types::{MyResource, MyResourceSpec, Phase};
use e2e_tests::prometheus::{PrometheusServer, tool, value};
use e2e_tests::{OperatorProcess, TEST_LEASE, TestCluster, TestNamespace, eventually, install_crds};
use kube::api::{Api, PostParams};

#[tokio::test]
async fn metrics_pass_promtool_and_a_real_prometheus_scrapes_them() -> Result<()> {
    let promtool = tool("promtool")?;
    let cluster = TestCluster::get()?;
    let client = cluster.admin_client().await?;
    install_crds(&client).await?;
    let namespace = TestNamespace::create(&client, "prometheus").await?;
    let ns = namespace.name.clone();
    let operator =
        OperatorProcess::spawn(&cluster.admin_kubeconfig, "scraped", "scraped-leader", &ns, &TEST_LEASE, &[])?;
    let resources: Api<MyResource> = Api::namespaced(client.clone(), &ns);
    resources
        .create(&PostParams::default(), &MyResource::new("measured", MyResourceSpec { message: "count me".into() }))
        .await?;
    eventually(Duration::from_secs(30), "the resource to be Ready", || async {
        Ok((resources.get("measured").await?.status.and_then(|s| s.phase) == Some(Phase::Ready)).then_some(()))
    })
    .await?;

    let exposition = operator.metrics().await?;
    for name in [
        "controller_runtime_reconcile_total{controller=\"myresource\",result=\"success\"}",
        "controller_runtime_max_concurrent_reconciles{controller=\"myresource\"}",
        "controller_runtime_active_workers{controller=\"myresource\"}",
        "leader_election_master_status{name=\"scraped-leader\"}",
        "example_operator_cache_objects{resource=\"myresources\"}",
        "example_operator_cache_synced{resource=\"myresources\"} 1",
        "process_resident_memory_bytes",
    ] {
        ensure!(exposition.lines().any(|l| l.starts_with(name)), "{name} is missing from /metrics");
    }
    ensure!(exposition.contains("controller_runtime_reconcile_time_seconds_bucket"));
    ensure!(exposition.contains("rest_client_requests_total{code=\"201\",host=\"127.0.0.1\",method=\"POST\"}"));

    let mut check = tokio::process::Command::new(&promtool)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    {
        use tokio::io::AsyncWriteExt;
        let mut stdin = check.stdin.take().context("promtool stdin")?;
        stdin.write_all(exposition.as_bytes()).await?;
    }
    let output = check.wait_with_output().await?;
    ensure!(
        output.status.success(),
        "promtool check metrics failed:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );

    // A real Prometheus scraping the operator every second.
    let config = format!(
        "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: example-operator\n    static_configs:\n      - targets: ['127.0.0.1:{}']\n",
        operator.metrics_port
    );
    let prometheus = PrometheusServer::start(&config)?;
    let query = "controller_runtime_reconcile_total{controller=\"myresource\",result=\"success\"}";
    let series = prometheus.eventually(Duration::from_secs(60), query, |series| series.first().cloned()).await?;
    ensure!(series["metric"]["job"] == "example-operator", "{series}");
    ensure!(series["metric"]["controller"] == "myresource" && series["metric"]["result"] == "success", "{series}");
    let count = value(&series).context("a sample value")?;
    ensure!(count >= 1.0, "{series}");
    namespace.delete().await
}
