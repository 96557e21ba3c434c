//! The operator's /metrics passes `promtool check metrics`, and a real Prometheus server scrapes
//! it and answers queries for controller-runtime's metric names. Both tools come from Debian's
//! `prometheus` package, which `.ci/run` installs.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use crd_types::{MyResource, MyResourceSpec, Phase};
use e2e_tests::{
    OperatorProcess, TEST_LEASE, TestCluster, TestNamespace, eventually, free_port, http_get, install_crds,
};
use kube::api::{Api, PostParams};

fn tool(name: &str) -> Result<std::path::PathBuf> {
    let path = std::path::Path::new("/usr/bin").join(name);
    ensure!(path.is_file(), "{name} is missing: install Debian's prometheus package (`apt-get install prometheus`)");
    Ok(path)
}

#[tokio::test]
async fn metrics_pass_promtool_and_a_real_prometheus_scrapes_them() -> Result<()> {
    let promtool = tool("promtool")?;
    let prometheus = tool("prometheus")?;
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
    let dir =
        std::env::temp_dir().join(format!("example-operator-prometheus-{:06x}", rand::random::<u32>() & 0xff_ffff));
    std::fs::create_dir_all(&dir)?;
    let config = format!(
        "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: example-operator\n    static_configs:\n      - targets: ['127.0.0.1:{}']\n",
        operator.metrics_port
    );
    std::fs::write(dir.join("prometheus.yml"), config)?;
    let port = free_port()?;
    let _server = tokio::process::Command::new(&prometheus)
        .arg(format!("--config.file={}", dir.join("prometheus.yml").display()))
        .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(std::fs::File::create(dir.join("prometheus.log"))?)
        .stderr(std::fs::File::create(dir.join("prometheus.err.log"))?)
        .kill_on_drop(true)
        .spawn()?;
    let query = "/api/v1/query?query=controller_runtime_reconcile_total%7Bcontroller%3D%22myresource%22%2Cresult%3D%22success%22%7D";
    let answer = eventually(Duration::from_secs(60), "Prometheus to return the reconcile series", || async {
        let (code, body) = http_get(port, query).await?;
        let value: serde_json::Value = serde_json::from_str(&body)?;
        let results = value["data"]["result"].as_array().cloned().unwrap_or_default();
        Ok((code == 200 && !results.is_empty()).then_some(results))
    })
    .await?;
    let series = &answer[0];
    ensure!(series["metric"]["job"] == "example-operator", "{series}");
    ensure!(series["metric"]["controller"] == "myresource" && series["metric"]["result"] == "success", "{series}");
    let count: f64 = series["value"][1].as_str().context("a sample value")?.parse()?;
    ensure!(count >= 1.0, "{series}");
    let _ = std::fs::remove_dir_all(&dir);
    namespace.delete().await
}
