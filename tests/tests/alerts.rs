//! The chart's PrometheusRule (`prometheusRule.enabled`): its rules pass `promtool check rules`,
//! every alert fires and stays quiet where the committed unit tests say
//! (`tests/promtool/alerts.test.yaml`, run by `promtool test rules`), and the API server accepts
//! the object (and the ServiceMonitor) against the Prometheus Operator's CRDs, which
//! `cargo xtask cluster up` installs.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};
use e2e_tests::prometheus::tool;
use e2e_tests::{TestCluster, TestNamespace, chart_dir, helm, require_monitoring_crds, succeeded};
use serde_yaml::Value;

/// The release and namespace the unit tests' series are labelled for.
const RELEASE: &str = "ops";
const NAMESPACE: &str = "operators";

/// The committed promtool unit tests.
fn unit_tests() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("promtool/alerts.test.yaml")
}

/// The PrometheusRule the chart renders for release `ops` in `namespace` with `sets` (`--set`).
fn rendered_rule(cluster: &TestCluster, namespace: &str, sets: &[&str]) -> Result<Value> {
    let chart = chart_dir().display().to_string();
    let mut args = vec!["template", RELEASE, &chart, "--namespace", namespace, "--set", "prometheusRule.enabled=true"];
    for set in sets {
        args.extend(["--set", set]);
    }
    args.extend(["--show-only", "templates/prometheusrule.yaml"]);
    let rendered = succeeded(helm(cluster, &args)?)?;
    let rule: Value = serde_yaml::from_str(&rendered).context("parsing the rendered PrometheusRule")?;
    ensure!(rule["kind"] == "PrometheusRule", "not a PrometheusRule:\n{rendered}");
    Ok(rule)
}

/// Every alerting rule of the PrometheusRule's groups.
fn alerting_rules(rule: &Value) -> Result<Vec<&Value>> {
    let groups = rule["spec"]["groups"].as_sequence().context("spec.groups is a list")?;
    let mut rules = Vec::new();
    for group in groups {
        rules.extend(group["rules"].as_sequence().context("a group's rules are a list")?.iter());
    }
    Ok(rules.into_iter().filter(|rule| rule["alert"].is_string()).collect())
}

/// The rules file promtool reads: the PrometheusRule's `spec`, which holds `groups:`.
fn rules_file(rule: &Value) -> Result<String> {
    Ok(serde_yaml::to_string(&rule["spec"])?)
}

/// A scratch folder of the test's own.
fn scratch(prefix: &str) -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("{prefix}-{:06x}", rand::random::<u32>() & 0xff_ffff));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Runs promtool in `dir`; its output when it succeeds, both outputs in the error otherwise.
fn promtool(dir: &Path, args: &[&str]) -> Result<String> {
    let output = std::process::Command::new(tool("promtool")?)
        .current_dir(dir)
        .args(args)
        .output()
        .context("running promtool")?;
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    if !output.status.success() {
        bail!("promtool {} failed ({}):\n{text}", args.join(" "), output.status);
    }
    Ok(text)
}

#[tokio::test]
async fn every_alert_passes_promtool_and_fires_and_stays_quiet_as_its_unit_tests_say() -> Result<()> {
    let cluster = TestCluster::get()?;
    let rule = rendered_rule(&cluster, NAMESPACE, &[])?;
    let alerts = alerting_rules(&rule)?;
    let names: BTreeSet<String> = alerts.iter().filter_map(|a| a["alert"].as_str().map(str::to_owned)).collect();
    ensure!(names.len() == 6, "six alerts with leader election on: {names:?}");
    for alert in &alerts {
        let name = &alert["alert"];
        for annotation in ["summary", "description"] {
            let text = alert["annotations"][annotation].as_str().unwrap_or_default();
            ensure!(text.len() > 20, "{name:?} has no {annotation} worth reading: {text:?}");
        }
        ensure!(
            matches!(alert["labels"]["severity"].as_str(), Some("warning" | "critical")),
            "{name:?} has no severity"
        );
    }

    let dir = scratch("alerts")?;
    // The rules as Prometheus loads them, annotation templates included.
    std::fs::write(dir.join("checked.rules.yaml"), rules_file(&rule)?)?;
    let checked = promtool(&dir, &["check", "rules", "checked.rules.yaml"])?;
    ensure!(checked.contains("SUCCESS: 6 rules found"), "{checked}");

    // promtool's unit tests compare annotations verbatim; the descriptions are long prose, so
    // the tests match on labels (which say what fires, and where) and `check rules` above
    // validates the annotation templates.
    let mut unannotated = rule.clone();
    if let Some(groups) = unannotated["spec"]["groups"].as_sequence_mut() {
        for group in groups {
            for rule in group["rules"].as_sequence_mut().into_iter().flatten() {
                if let Some(rule) = rule.as_mapping_mut() {
                    rule.remove("annotations");
                }
            }
        }
    }
    std::fs::write(dir.join("alerts.rules.yaml"), rules_file(&unannotated)?)?;
    std::fs::copy(unit_tests(), dir.join("alerts.test.yaml"))?;
    let tested = promtool(&dir, &["test", "rules", "alerts.test.yaml"])?;
    ensure!(tested.contains("SUCCESS"), "{tested}");

    // Each alert has a case where it fires and one where it must not.
    let text = std::fs::read_to_string(unit_tests())?;
    let suite: Value = serde_yaml::from_str(&text)?;
    let cases: Vec<&Value> = suite["tests"]
        .as_sequence()
        .context("the unit tests have tests")?
        .iter()
        .flat_map(|test| test["alert_rule_test"].as_sequence().into_iter().flatten())
        .collect();
    for name in &names {
        let of_alert = || cases.iter().filter(|case| case["alertname"].as_str() == Some(name.as_str()));
        let firing = of_alert().any(|case| case["exp_alerts"].as_sequence().is_some_and(|a| !a.is_empty()));
        let quiet = of_alert().any(|case| case["exp_alerts"].as_sequence().is_some_and(|a| a.is_empty()));
        ensure!(firing && quiet, "{name} needs a unit test where it fires and one where it does not");
    }
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

#[tokio::test]
async fn without_leader_election_the_rules_drop_the_leader_alerts_and_the_leader_join() -> Result<()> {
    let cluster = TestCluster::get()?;
    let rule = rendered_rule(&cluster, NAMESPACE, &["leaderElection.enabled=false", "replicaCount=1"])?;
    let alerts = alerting_rules(&rule)?;
    let names: Vec<&str> = alerts.iter().filter_map(|a| a["alert"].as_str()).collect();
    ensure!(
        names
            == [
                "ExampleOperatorReconcileErrors",
                "ExampleOperatorWorkqueueDepthHigh",
                "ExampleOperatorWorkqueueLatencyHigh",
                "ExampleOperatorCacheNotSynced"
            ],
        "{names:?}"
    );
    // The only replica exposes no leader_election_master_status: a join on it would never match.
    for alert in &alerts {
        let expr = alert["expr"].as_str().unwrap_or_default();
        ensure!(!expr.contains("leader_election_master_status"), "{expr}");
    }
    let dir = scratch("alerts-single")?;
    std::fs::write(dir.join("single.rules.yaml"), rules_file(&rule)?)?;
    let checked = promtool(&dir, &["check", "rules", "single.rules.yaml"])?;
    ensure!(checked.contains("SUCCESS: 4 rules found"), "{checked}");
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

#[tokio::test]
async fn the_prometheus_rule_and_service_monitor_pass_server_side_validation() -> Result<()> {
    let cluster = TestCluster::get()?;
    let client = cluster.admin_client().await?;
    require_monitoring_crds(&client).await?;
    let namespace = TestNamespace::create(&client, "alerts").await?;
    let chart = chart_dir().display().to_string();
    let rendered = succeeded(helm(
        &cluster,
        &[
            "template",
            RELEASE,
            &chart,
            "--namespace",
            &namespace.name,
            "--set",
            "prometheusRule.enabled=true",
            "--set",
            "prometheusRule.labels.release=monitoring",
            "--set",
            "serviceMonitor.enabled=true",
            "--show-only",
            "templates/prometheusrule.yaml",
            "--show-only",
            "templates/servicemonitor.yaml",
        ],
    )?)?;
    let applied = cluster.kubectl_with_input(
        &["apply", "--server-side", "--dry-run=server", "-o", "name", "-f", "-"],
        Some(&rendered),
    )?;
    let (stdout, stderr) =
        (String::from_utf8_lossy(&applied.stdout).into_owned(), String::from_utf8_lossy(&applied.stderr).into_owned());
    ensure!(applied.status.success(), "server-side validation failed:\n{stderr}");
    ensure!(!stderr.to_lowercase().contains("warning"), "{stderr}");
    for object in [
        "prometheusrule.monitoring.coreos.com/ops-example-operator",
        "servicemonitor.monitoring.coreos.com/ops-example-operator",
    ] {
        ensure!(stdout.lines().any(|line| line == object), "{object} was not validated:\n{stdout}");
    }

    // The CRD's schema is enforced: a `for` that is not a Prometheus duration is refused.
    let mut broken = rendered_rule(&cluster, &namespace.name, &[])?;
    let first = &mut broken["spec"]["groups"][0]["rules"][0];
    first["for"] = Value::from("a while");
    let refused = cluster.kubectl_with_input(
        &["apply", "--server-side", "--dry-run=server", "-f", "-"],
        Some(&serde_yaml::to_string(&broken)?),
    )?;
    let stderr = String::from_utf8_lossy(&refused.stderr).into_owned();
    ensure!(!refused.status.success() && stderr.contains("spec.groups[0].rules[0].for"), "{stderr}");
    namespace.delete().await
}
