//! The Helm chart, installed for real into the local control plane with the helm built from its
//! Go module: lint, server-side validation of every manifest, install / upgrade / uninstall, and
//! the operator running with exactly the chart's RBAC. The tests of this file share the CRDs'
//! ownership, so they run one at a time.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use crd_types::{MessageBroadcast, MessageBroadcastSpec, MyResource, MyResourceSpec, Phase};
use e2e_tests::{
    OperatorProcess, TEST_LEASE, TestCluster, TestNamespace, client_for, eventually, helm, install_crds, stdout_of,
    succeeded,
};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::rbac::v1::ClusterRole;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
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

    // A namespace that enforces the restricted Pod Security Standard and warns on workloads.
    let namespace = TestNamespace::create(&client, "chart-render").await?;
    let labels = json!({"metadata": {"labels": {
        "pod-security.kubernetes.io/enforce": "restricted",
        "pod-security.kubernetes.io/warn": "restricted",
    }}});
    Api::<Namespace>::all(client.clone())
        .patch(&namespace.name, &PatchParams::default(), &Patch::Merge(labels))
        .await?;
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
    ] {
        ensure!(rendered.contains(&format!("kind: {kind}\n")), "{kind} is rendered");
    }
    let output = cluster.kubectl_with_input(
        &["apply", "--server-side", "--force-conflicts", "--dry-run=server", "-f", "-"],
        Some(&rendered),
    )?;
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    ensure!(output.status.success(), "server-side validation failed:\n{stderr}");
    ensure!(!stderr.contains("PodSecurity"), "the pod template violates the restricted standard:\n{stderr}");

    // The optional ServiceMonitor renders (its CRD belongs to the Prometheus Operator, absent here).
    let monitored =
        succeeded(helm(&cluster, &["template", "render", &chart_path(), "--set", "serviceMonitor.enabled=true"])?)?;
    ensure!(monitored.contains("kind: ServiceMonitor") && monitored.contains("port: metrics"));
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
    .await?;
    broadcasts.delete(ns, &Default::default()).await?;
    Ok(())
}

async fn service_account_kubeconfig(cluster: &TestCluster, ns: &str) -> Result<PathBuf> {
    let token =
        stdout_of(&cluster.kubectl(&["create", "token", "ops-example-operator", "-n", ns, "--duration=1h"])?)?;
    cluster.kubeconfig_with_token("ops-example-operator", token.trim()).await
}

#[tokio::test]
async fn the_operator_runs_with_exactly_the_charts_rbac_and_each_rule_is_needed() -> Result<()> {
    let _serial = ONE_AT_A_TIME.lock().await;
    let cluster = TestCluster::get()?;
    let admin = cluster.admin_client().await?;
    install_crds(&admin).await?;
    let namespace = TestNamespace::create(&admin, "chart-rbac").await?;
    let ns = namespace.name.clone();
    succeeded(helm(
        &cluster,
        &[
            "install",
            "ops",
            &chart_path(),
            "--namespace",
            &ns,
            "--set",
            "crds.install=false",
            "--set",
            "replicaCount=0",
        ],
    )?)?;
    let kubeconfig = service_account_kubeconfig(&cluster, &ns).await?;
    let lease = "ops-example-operator-leader";

    // As the chart's ServiceAccount (token from the TokenRequest API), cluster-wide.
    let operator = OperatorProcess::spawn_cluster_wide(&kubeconfig, "sa-operator", lease, &ns, &TEST_LEASE, &[])?;
    eventually(Duration::from_secs(30), "the ServiceAccount to lead", || async {
        Ok((operator.master_status(lease).await? == 1.0).then_some(()))
    })
    .await?;
    let other = TestNamespace::create(&admin, "chart-rbac-other").await?;
    exercise_every_permission(&admin, &ns, &other.name, Duration::from_secs(30))
        .await
        .map_err(|e| e.context(format!("with the chart's full RBAC; operator log:\n{}", operator.log_text())))?;
    // The chart's Role lets it keep the Lease: renewals (conditional updates) go through, well
    // past the 3 s renew deadline.
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> = Api::namespaced(admin.clone(), &ns);
    let renewed = |lease: &k8s_openapi::api::coordination::v1::Lease| {
        lease.spec.as_ref().and_then(|s| s.renew_time.clone()).map(|t| t.0)
    };
    let first = renewed(&leases.get(lease).await?);
    eventually(Duration::from_secs(10), "the ServiceAccount to renew its lease twice more", || async {
        let now = renewed(&leases.get(lease).await?);
        Ok((now > first.map(|t| t + std::time::Duration::from_secs(1))).then_some(()))
    })
    .await
    .map_err(|e| e.context(operator.log_text()))?;
    ensure!(operator.master_status(lease).await? == 1.0, "still leading:\n{}", operator.log_text());
    operator.stop().await?;

    // It cannot read Secrets.
    let as_operator = client_for(&kubeconfig).await?;
    let denied = Api::<Secret>::all(as_operator.clone()).list(&ListParams::default()).await;
    ensure!(matches!(&denied, Err(kube::Error::Api(s)) if s.code == 403), "listing Secrets: {denied:?}");
    let denied = Api::<Secret>::namespaced(as_operator, &ns).get_opt("anything").await;
    ensure!(matches!(&denied, Err(kube::Error::Api(s)) if s.code == 403), "reading a Secret: {denied:?}");

    // Each ClusterRole rule is needed: without it, some permission-dependent outcome never happens.
    let roles: Api<ClusterRole> = Api::all(admin.clone());
    let full = roles.get("ops-example-operator").await?;
    let rules = full.rules.clone().unwrap_or_default();
    for (index, rule) in rules.iter().enumerate() {
        let mut reduced = rules.clone();
        reduced.remove(index);
        roles.patch("ops-example-operator", &PatchParams::default(), &Patch::Merge(json!({"rules": reduced}))).await?;
        let scratch = TestNamespace::create(&admin, "chart-rbac-cut").await?;
        let scratch_other = TestNamespace::create(&admin, "chart-rbac-cut-other").await?;
        let kubeconfig = service_account_kubeconfig(&cluster, &ns).await?;
        let operator =
            OperatorProcess::spawn_cluster_wide(&kubeconfig, &format!("cut-{index}"), lease, &ns, &TEST_LEASE, &[])?;
        let outcome =
            exercise_every_permission(&admin, &scratch.name, &scratch_other.name, Duration::from_secs(8)).await;
        operator.stop().await?;
        let _ = Api::<MessageBroadcast>::all(admin.clone()).delete(&scratch.name, &Default::default()).await;
        ensure!(
            outcome.is_err(),
            "removing rule {index} ({:?} {:?} {:?}) changed nothing",
            rule.api_groups,
            rule.resources,
            rule.verbs
        );
        scratch.delete().await?;
        scratch_other.delete().await?;
    }
    roles.patch("ops-example-operator", &PatchParams::default(), &Patch::Merge(json!({"rules": rules}))).await?;
    succeeded(helm(&cluster, &["uninstall", "ops", "--namespace", &ns])?)?;
    other.delete().await?;
    namespace.delete().await
}
