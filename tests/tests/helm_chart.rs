//! The Helm chart, installed for real into the local control plane with the helm built from its
//! Go module: lint, server-side validation of every manifest, install / upgrade / uninstall (the
//! RBAC, as the chart's Pods use it, is tested on the node: `node.rs`). The tests of this file share the CRDs'
//! ownership, so they run one at a time.

use std::path::PathBuf;

use anyhow::{Context, Result, ensure};
use crd_types::{MyResource, MyResourceSpec};
use e2e_tests::{TestCluster, TestNamespace, helm, install_crds, require_monitoring_crds, stdout_of, succeeded};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::api::rbac::v1::ClusterRole;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;
use tokio::sync::Mutex;

static ONE_AT_A_TIME: Mutex<()> = Mutex::const_new(());

fn chart() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../charts/example-operator")
}

fn chart_path() -> String {
    chart().display().to_string()
}

#[tokio::test]
async fn the_chart_lints_clean_and_every_manifest_passes_server_side_validation() -> Result<()> {
    let _serial = ONE_AT_A_TIME.lock().await;
    let cluster = TestCluster::get()?;
    let client = cluster.admin_client().await?;
    let lint = succeeded(helm(&cluster, &["lint", "--strict", &chart_path()])?)?;
    ensure!(lint.contains("0 chart(s) failed") && !lint.contains("[WARNING]") && !lint.contains("[ERROR]"), "{lint}");
    // The API server takes the generated CRDs without a warning (no unknown formats).
    let crds = chart().join("files/crds").display().to_string();
    let applied = cluster.kubectl(&["apply", "--server-side", "--force-conflicts", "--dry-run=server", "-f", &crds])?;
    let warnings = String::from_utf8_lossy(&applied.stderr).into_owned();
    ensure!(applied.status.success() && !warnings.to_lowercase().contains("warning"), "applying the CRDs: {warnings}");

    // A namespace that enforces the restricted Pod Security Standard and warns on workloads.
    let namespace = TestNamespace::create(&client, "chart-render").await?;
    let labels = json!({"metadata": {"labels": {
        "pod-security.kubernetes.io/enforce": "restricted",
        "pod-security.kubernetes.io/warn": "restricted",
    }}});
    Api::<Namespace>::all(client.clone())
        .patch(&namespace.name, &PatchParams::default(), &Patch::Merge(labels))
        .await?;
    // Admission looks up the Pods' ServiceAccount. kube-controller-manager creates `default` in
    // every namespace when the node runs; without it (`--no-node`), the test creates it.
    let accounts: Api<k8s_openapi::api::core::v1::ServiceAccount> = Api::namespaced(client.clone(), &namespace.name);
    if accounts.get_opt("default").await?.is_none() {
        let account = serde_json::from_value(json!({"metadata": {"name": "default"}}))?;
        match accounts.create(&PostParams::default(), &account).await {
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.code == 409 => {}
            Err(error) => return Err(error.into()),
        }
    }
    let rendered = succeeded(helm(
        &cluster,
        &[
            "template",
            "render",
            &chart_path(),
            "--namespace",
            &namespace.name,
            "--set",
            "networkPolicy.enabled=true",
            "--set",
            "opentelemetry.endpoint=http://collector:4318",
            // Their CRDs come from the Prometheus Operator; `cargo xtask cluster up` installs them.
            "--set",
            "serviceMonitor.enabled=true",
            "--set",
            "prometheusRule.enabled=true",
        ],
    )?)?;
    for kind in [
        "Deployment",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
        "Service",
        "PodDisruptionBudget",
        "NetworkPolicy",
        "CustomResourceDefinition",
        "ServiceMonitor",
        "PrometheusRule",
    ] {
        ensure!(rendered.contains(&format!("kind: {kind}\n")), "{kind} is rendered");
    }
    require_monitoring_crds(&client).await?;
    let output = cluster.kubectl_with_input(
        &["apply", "--server-side", "--force-conflicts", "--dry-run=server", "-f", "-"],
        Some(&rendered),
    )?;
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    ensure!(output.status.success(), "server-side validation failed:\n{stderr}");
    ensure!(!stderr.contains("PodSecurity"), "the pod template violates the restricted standard:\n{stderr}");
    namespace.delete().await
}

#[tokio::test]
async fn values_of_the_wrong_type_are_rejected_with_a_readable_error() -> Result<()> {
    let _serial = ONE_AT_A_TIME.lock().await;
    let cluster = TestCluster::get()?;
    let client = cluster.admin_client().await?;
    let namespace = TestNamespace::create(&client, "chart-bad-values").await?;
    let values = std::env::temp_dir().join(format!("bad-values-{:06x}.yaml", rand::random::<u32>() & 0xff_ffff));
    std::fs::write(&values, "replicaCount: two\nlogging:\n  format: yaml\n")?;
    let output = helm(
        &cluster,
        &["install", "bad", &chart_path(), "--namespace", &namespace.name, "-f", &values.display().to_string()],
    )?;
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    ensure!(!output.status.success(), "helm accepted bad values");
    ensure!(stderr.contains("values don't meet the specifications of the schema"), "{stderr}");
    ensure!(stderr.contains("/replicaCount") && stderr.contains("got string, want integer"), "{stderr}");
    ensure!(stderr.contains("/logging/format"), "{stderr}");
    let releases = succeeded(helm(&cluster, &["list", "--namespace", &namespace.name, "-q"])?)?;
    ensure!(releases.trim().is_empty(), "nothing was installed: {releases}");
    namespace.delete().await
}

#[tokio::test]
async fn install_upgrade_and_uninstall_keep_the_crds_and_custom_resources() -> Result<()> {
    let _serial = ONE_AT_A_TIME.lock().await;
    let cluster = TestCluster::get()?;
    let client = cluster.admin_client().await?;
    install_crds(&client).await?;
    let namespace = TestNamespace::create(&client, "chart-install").await?;
    let ns = namespace.name.as_str();
    // Other tests applied the CRDs already; the release adopts them.
    succeeded(helm(&cluster, &["install", "ops", &chart_path(), "--namespace", ns, "--take-ownership"])?)?;

    let deployments: Api<Deployment> = Api::namespaced(client.clone(), ns);
    let deployment = deployments.get("ops-example-operator").await?;
    let spec = deployment.spec.context("deployment spec")?;
    ensure!(spec.replicas == Some(2), "two replicas by default");
    let pod = spec.template.spec.context("pod spec")?;
    let container = pod.containers.first().context("a container")?;
    let args = container.args.clone().unwrap_or_default();
    ensure!(args.contains(&"--leader-elect=true".to_owned()), "{args:?}");
    let env: Vec<String> = container.env.iter().flatten().map(|e| e.name.clone()).collect();
    ensure!(env.contains(&"POD_NAME".to_owned()) && env.contains(&"POD_NAMESPACE".to_owned()), "{env:?}");
    let security = container.security_context.clone().context("container securityContext")?;
    ensure!(security.read_only_root_filesystem == Some(true) && security.allow_privilege_escalation == Some(false));
    ensure!(security.capabilities.and_then(|c| c.drop) == Some(vec!["ALL".to_owned()]));
    ensure!(pod.security_context.and_then(|s| s.run_as_non_root) == Some(true));
    ensure!(
        container.liveness_probe.as_ref().and_then(|p| p.http_get.as_ref()).map(|g| g.path.clone())
            == Some(Some("/healthz".into()))
    );
    ensure!(
        container.readiness_probe.as_ref().and_then(|p| p.http_get.as_ref()).map(|g| g.path.clone())
            == Some(Some("/readyz".into()))
    );
    for args in [
        vec!["get", "serviceaccount", "ops-example-operator", "-n", ns],
        vec!["get", "clusterrole", "ops-example-operator"],
        vec!["get", "clusterrolebinding", "ops-example-operator"],
        vec!["get", "role", "ops-example-operator-leader-election", "-n", ns],
        vec!["get", "rolebinding", "ops-example-operator-leader-election", "-n", ns],
        vec!["get", "service", "ops-example-operator-metrics", "-n", ns],
        vec!["get", "poddisruptionbudget", "ops-example-operator", "-n", ns],
    ] {
        stdout_of(&cluster.kubectl(&args)?)?;
    }
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let crd = crds.get("myresources.example.com").await?;
    ensure!(
        crd.annotations().get("meta.helm.sh/release-name").map(String::as_str) == Some("ops"),
        "the release owns the CRDs"
    );
    let resources: Api<MyResource> = Api::namespaced(client.clone(), ns);
    resources
        .create(&PostParams::default(), &MyResource::new("survivor", MyResourceSpec { message: "still here".into() }))
        .await?;

    succeeded(helm(
        &cluster,
        &[
            "upgrade",
            "ops",
            &chart_path(),
            "--namespace",
            ns,
            "--set",
            "replicaCount=3",
            "--set",
            "logging.format=text",
        ],
    )?)?;
    let upgraded = deployments.get("ops-example-operator").await?.spec.context("deployment spec")?;
    ensure!(upgraded.replicas == Some(3));
    let args =
        upgraded.template.spec.and_then(|p| p.containers.first().and_then(|c| c.args.clone())).unwrap_or_default();
    ensure!(args.contains(&"--log-format=text".to_owned()), "{args:?}");

    succeeded(helm(&cluster, &["uninstall", "ops", "--namespace", ns])?)?;
    ensure!(deployments.get_opt("ops-example-operator").await?.is_none(), "the workload is removed");
    ensure!(Api::<ClusterRole>::all(client.clone()).get_opt("ops-example-operator").await?.is_none());
    ensure!(crds.get_opt("myresources.example.com").await?.is_some(), "the CRDs are kept");
    ensure!(resources.get_opt("survivor").await?.is_some(), "custom resources are kept");
    namespace.delete().await
}

/// `helm template` of the chart with `args`.
fn render(cluster: &TestCluster, release: &str, args: &[&str]) -> Result<std::process::Output> {
    let chart = chart_path();
    let mut all = vec!["template", release, chart.as_str()];
    all.extend_from_slice(args);
    helm(cluster, &all)
}

#[tokio::test]
async fn values_that_cannot_work_together_fail_with_what_to_change() -> Result<()> {
    let cluster = TestCluster::get()?;
    for (args, expected) in [
        (vec!["--set", "leaderElection.enabled=false"], "leaderElection.enabled=false with replicaCount=2"),
        (
            vec!["--set", "leaderElection.leaseDuration=4s", "--set", "leaderElection.renewDeadline=3s"],
            "renewDeadline (3s) + retryPeriod (2s) must be less than leaseDuration (4s)",
        ),
        (
            vec!["--set", "leaderElection.renewDeadline=2s"],
            "renewDeadline (2s) must be more than 1.2 × retryPeriod (2s)",
        ),
        (vec!["--set", "leaderElection.leaseDuration=1500ms"], "must be a whole number of seconds"),
        (vec!["--set", "metrics.port=8081"], "metrics.port and probePort are both 8081"),
    ] {
        let output = render(&cluster, "guarded", &args)?;
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        ensure!(!output.status.success() && stderr.contains(expected), "{args:?}: {stderr}");
    }
    // One replica without election is fine, and so are fractional deadlines and retries.
    for args in [
        vec!["--set", "leaderElection.enabled=false", "--set", "replicaCount=1"],
        vec![
            "--set",
            "leaderElection.leaseDuration=4s",
            "--set",
            "leaderElection.renewDeadline=3s",
            "--set",
            "leaderElection.retryPeriod=500ms",
        ],
    ] {
        succeeded(render(&cluster, "fine", &args)?)?;
    }
    Ok(())
}

#[tokio::test]
async fn the_chart_works_as_a_subchart_with_long_names_and_values_that_need_quoting() -> Result<()> {
    let cluster = TestCluster::get()?;
    // A parent chart passes `global`.
    succeeded(render(&cluster, "sub", &["--set", "global.imageRegistry=registry.example"])?)?;
    // Release names up to Helm's 53 characters keep the metrics Service a valid DNS label.
    let long = "a-release-name-of-fifty-three-characters-for-the-test";
    ensure!(long.len() == 53);
    let rendered = succeeded(render(&cluster, long, &[])?)?;
    let documents: Vec<serde_yaml::Value> = rendered
        .split("\n---")
        .filter_map(|doc| serde_yaml::from_str::<serde_yaml::Value>(doc).ok())
        .filter(|doc| !doc.is_null())
        .collect();
    let service = documents.iter().find(|d| d["kind"] == "Service").context("a Service")?;
    let name = service["metadata"]["name"].as_str().context("its name")?;
    ensure!(name.len() <= 63 && name.ends_with("-metrics"), "{name} ({} characters)", name.len());
    // A log filter with `: ` stays one argument.
    let rendered =
        succeeded(render(&cluster, "quoted", &["--set-string", "logging.level=example_operator=debug: x"])?)?;
    let documents: Vec<serde_yaml::Value> =
        rendered.split("\n---").filter_map(|doc| serde_yaml::from_str::<serde_yaml::Value>(doc).ok()).collect();
    let deployment = documents.iter().find(|d| d["kind"] == "Deployment").context("a Deployment")?;
    let args = &deployment["spec"]["template"]["spec"]["containers"][0]["args"];
    let args: Vec<String> = serde_yaml::from_value(args.clone())?;
    ensure!(args.contains(&"--log-level=example_operator=debug: x".to_owned()), "{args:?}");
    Ok(())
}

#[tokio::test]
async fn notes_paste_cleanly_and_say_only_what_applies() -> Result<()> {
    let cluster = TestCluster::get()?;
    let notes = |args: &[&str]| -> Result<String> {
        let chart = chart_path();
        let mut all = vec![
            "install",
            "notes",
            chart.as_str(),
            "--dry-run=client",
            "--namespace",
            "notes",
            "--set",
            "crds.install=false",
        ];
        all.extend_from_slice(args);
        let output = succeeded(helm(&cluster, &all)?)?;
        Ok(output.split("NOTES:").nth(1).unwrap_or_default().to_owned())
    };
    let default = notes(&[])?;
    // The heredoc's closing delimiter starts its line, so the pasted block ends.
    ensure!(default.contains("<<'YAML'\n") && default.contains("\nYAML\n"), "{default}");
    ensure!(default.contains("not published\nin any registry"), "the default image is explained: {default}");
    ensure!(default.contains("kubectl get lease"), "{default}");
    let single = notes(&["--set", "leaderElection.enabled=false", "--set", "replicaCount=1"])?;
    ensure!(!single.to_lowercase().contains("lease"), "no Lease without leader election: {single}");
    let built = notes(&["--set", "image.repository=registry.example/example-operator"])?;
    ensure!(!built.contains("not published"), "{built}");
    Ok(())
}
