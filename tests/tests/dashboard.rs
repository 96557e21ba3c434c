//! The chart's Grafana dashboard (`dashboards.enabled`): every query of every panel, with the
//! dashboard's variables filled in as Grafana would, is valid PromQL and returns series from a
//! real Prometheus that scrapes a running operator, labelled as a ServiceMonitor labels it.
//! The dashboard is read from the ConfigMap the chart renders, so what is tested is what ships.

use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use crd_types::Phase;
use e2e_tests::prometheus::{PrometheusServer, value};
use e2e_tests::{Fixture, OperatorProcess, TEST_LEASE, chart_dir, eventually, helm, succeeded};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::PostParams;
use serde_json::Value;

/// The labels a ServiceMonitor gives the scraped series: the metrics Service's name as `job`,
/// the pod's name and namespace.
const JOB: &str = "dash-example-operator-metrics";
const POD: &str = "dash-example-operator-0";

/// The dashboard as the chart's ConfigMap carries it, checked equal to the chart's file.
fn shipped_dashboard(cluster: &e2e_tests::TestCluster) -> Result<Value> {
    let chart = chart_dir();
    let rendered = succeeded(helm(
        cluster,
        &[
            "template",
            "dash",
            &chart.display().to_string(),
            "--set",
            "dashboards.enabled=true",
            "--show-only",
            "templates/dashboards.yaml",
        ],
    )?)?;
    let config_map: ConfigMap = serde_yaml::from_str(&rendered).context("parsing the dashboards ConfigMap")?;
    let labels = config_map.metadata.labels.unwrap_or_default();
    ensure!(labels.get("grafana_dashboard").map(String::as_str) == Some("1"), "the sidecar's label: {labels:?}");
    let data = config_map.data.unwrap_or_default();
    let embedded = data.get("example-operator.json").context("the ConfigMap holds example-operator.json")?;
    let dashboard: Value = serde_json::from_str(embedded).context("the embedded dashboard is JSON")?;
    let file = std::fs::read_to_string(chart.join("files/dashboards/example-operator.json"))?;
    ensure!(dashboard == serde_json::from_str::<Value>(&file)?, "the ConfigMap embeds the chart's dashboard file");
    Ok(dashboard)
}

/// Every panel, rows' nested panels included.
fn panels(dashboard: &Value) -> Vec<&Value> {
    let mut all = Vec::new();
    for panel in dashboard["panels"].as_array().into_iter().flatten() {
        all.push(panel);
        all.extend(panel["panels"].as_array().into_iter().flatten());
    }
    all
}

/// `query` with the dashboard's variables as Grafana fills them for this operator.
fn substituted(query: &str, namespace: &str) -> String {
    query.replace("$__rate_interval", "1m").replace("$namespace", namespace).replace("$job", JOB).replace("$pod", POD)
}

/// True when some series of an instant query's answer has a number (not NaN) as its value.
fn has_a_number(series: &[Value]) -> bool {
    series.iter().filter_map(value).any(f64::is_finite)
}

#[tokio::test]
async fn every_dashboard_query_returns_series_from_a_real_prometheus() -> Result<()> {
    let f = Fixture::new("dashboard").await?;
    let dashboard = shipped_dashboard(&f.cluster)?;

    // Queries must be those of a dashboard that works on any Prometheus data source, with one
    // rate window throughout.
    let mut queries = Vec::new();
    for panel in panels(&dashboard) {
        if panel["type"] == "row" {
            continue;
        }
        let title = panel["title"].as_str().unwrap_or_default().to_owned();
        ensure!(panel["datasource"]["uid"] == "${datasource}", "panel {title:?} uses the datasource variable");
        let targets = panel["targets"].as_array().with_context(|| format!("panel {title:?} has queries"))?;
        ensure!(!targets.is_empty(), "panel {title:?} has queries");
        for target in targets {
            let expr = target["expr"].as_str().with_context(|| format!("a query of {title:?}"))?.to_owned();
            ensure!(
                expr.contains("namespace=\"$namespace\", job=\"$job\", pod=~\"$pod\""),
                "{title:?} is scoped: {expr}"
            );
            if expr.contains("rate(") {
                ensure!(expr.contains("[$__rate_interval]"), "{title:?} rates over $__rate_interval: {expr}");
            }
            queries.push((title.clone(), expr));
        }
    }
    ensure!(queries.len() >= 16, "the panels hold {} queries", queries.len());

    // A ConfigMap in the way of MyResource `taken`: its reconciles fail, so the error panels
    // have series.
    let foreign: ConfigMap = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "taken-configmap"}, "data": {"message": "not the operator's"}
    }))?;
    f.config_maps.create(&PostParams::default(), &foreign).await?;
    let operator = OperatorProcess::spawn(&f.cluster.admin_kubeconfig, POD, "dash-leader", f.ns(), &TEST_LEASE, &[])?;
    let config = format!(
        "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: {JOB}\n    static_configs:\n      - targets: ['127.0.0.1:{}']\n        labels: {{namespace: {}, pod: {POD}}}\n",
        operator.metrics_port,
        f.ns(),
    );
    let prometheus = PrometheusServer::start(&config)?;
    let up = format!("count_over_time(up{{job=\"{JOB}\"}}[1m])");
    prometheus
        .eventually(Duration::from_secs(60), &up, |series| {
            series.first().and_then(value).filter(|scrapes| *scrapes >= 2.0)
        })
        .await?;

    f.create("measured", "count me").await?;
    f.create("taken", "blocked").await?;
    f.wait_ready("measured", Duration::from_secs(30)).await?;
    eventually(Duration::from_secs(30), "MyResource taken to fail", || async {
        let phase = f.resources.get("taken").await?.status.and_then(|s| s.phase);
        Ok((phase == Some(Phase::Failed)).then_some(()))
    })
    .await?;

    // The variables' own queries (label_values) find this operator.
    let variables = dashboard["templating"]["list"].as_array().context("the dashboard has variables")?;
    for (name, expected) in [("namespace", f.ns()), ("job", JOB), ("pod", POD)] {
        let variable = variables.iter().find(|v| v["name"] == name).with_context(|| format!("variable {name}"))?;
        let definition = variable["definition"].as_str().context("a label_values query")?;
        let (metric, label) = definition
            .strip_prefix("label_values(")
            .and_then(|rest| rest.strip_suffix(')'))
            .and_then(|inner| inner.rsplit_once(", "))
            .with_context(|| format!("{name} is label_values(selector, label): {definition}"))?;
        let query = substituted(&format!("group by ({label}) ({metric})"), f.ns());
        prometheus
            .eventually(Duration::from_secs(30), &query, |series| {
                series.iter().any(|s| s["metric"][label] == expected).then_some(())
            })
            .await
            .with_context(|| format!("variable {name} offers {expected}"))?;
    }

    // Every query answers with series, once Prometheus has scraped the reconciles above.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let mut empty = Vec::new();
        for (title, expr) in &queries {
            let query = substituted(expr, f.ns());
            // An invalid query is an error at once; no series may yet be a scrape away.
            let series = prometheus.query(&query).await.with_context(|| format!("panel {title:?}: {query}"))?;
            if !has_a_number(&series) {
                empty.push(format!("panel {title:?}: {query} answered {series:?}"));
            }
        }
        if empty.is_empty() {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            bail!("queries without series after 60s:\n{}\n{}", empty.join("\n"), operator.log_text());
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    drop(operator);
    f.namespace.delete().await
}

#[tokio::test]
async fn the_dashboard_config_map_takes_the_sidecar_label_namespace_and_annotations_from_values() -> Result<()> {
    let cluster = e2e_tests::TestCluster::get()?;
    let chart = chart_dir().display().to_string();
    let rendered = succeeded(helm(
        &cluster,
        &[
            "template",
            "dash",
            &chart,
            "--namespace",
            "operators",
            "--set",
            "dashboards.enabled=true",
            "--set",
            "dashboards.label=grafana.example/dashboard",
            "--set",
            "dashboards.labelValue=operators",
            "--set",
            "dashboards.namespace=grafana",
            "--set",
            "dashboards.annotations.grafana_folder=Operators",
            "--show-only",
            "templates/dashboards.yaml",
        ],
    )?)?;
    let config_map: ConfigMap = serde_yaml::from_str(&rendered)?;
    let metadata = config_map.metadata;
    ensure!(metadata.namespace.as_deref() == Some("grafana"), "{rendered}");
    let labels = metadata.labels.unwrap_or_default();
    ensure!(labels.get("grafana.example/dashboard").map(String::as_str) == Some("operators"), "{labels:?}");
    ensure!(!labels.contains_key("grafana_dashboard"), "{labels:?}");
    let annotations = metadata.annotations.unwrap_or_default();
    ensure!(annotations.get("grafana_folder").map(String::as_str) == Some("Operators"), "{annotations:?}");

    let disabled = succeeded(helm(&cluster, &["template", "dash", &chart])?)?;
    ensure!(!disabled.contains("example-operator.json"), "no dashboard unless enabled");
    Ok(())
}
