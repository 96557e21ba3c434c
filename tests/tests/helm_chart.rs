//! The Helm chart, installed for real into the local control plane with the helm built from its
//! Go module: lint, server-side validation of every manifest, install / upgrade / uninstall (the
//! RBAC, as the chart's Pods use it, is tested on the node: `node.rs`). The tests of this file share the CRDs'
//! ownership, so they run one at a time.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use crd_types::{MyResource, MyResourceSpec};
use e2e_tests::{
    TestCluster, TestNamespace, eventually, helm, install_crds, require_monitoring_crds, stdout_of, succeeded,
};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Container, Namespace};
use k8s_openapi::api::rbac::v1::{ClusterRole, Role};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
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
    // The `helm test` Pod runs as the test's own ServiceAccount, which a dry run does not create.
    let accounts: Api<k8s_openapi::api::core::v1::ServiceAccount> = Api::namespaced(client.clone(), &namespace.name);
    for name in ["default", "render-example-operator-test"] {
        if accounts.get_opt(name).await?.is_none() {
            let account = serde_json::from_value(json!({"metadata": {"name": name}}))?;
            match accounts.create(&PostParams::default(), &account).await {
                Ok(_) => {}
                Err(kube::Error::Api(status)) if status.code == 409 => {}
                Err(error) => return Err(error.into()),
            }
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
            "--set",
            "dashboards.enabled=true",
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
        "ConfigMap",
        "ValidatingAdmissionPolicy",
        "ValidatingAdmissionPolicyBinding",
        "Pod",
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
    let spec = deployment.spec;
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
    let upgraded = deployments.get("ops-example-operator").await?.spec;
    ensure!(upgraded.replicas == Some(3));
    let args =
        upgraded.template.spec.and_then(|p| p.containers.first().and_then(|c| c.args.clone())).unwrap_or_default();
    ensure!(args.contains(&"--log-format=text".to_owned()), "{args:?}");

    // Leader election off: the upgrade replaces the live RollingUpdate (with the API server's
    // defaults filled in) by Recreate, so two Pods never run side by side.
    succeeded(helm(
        &cluster,
        &[
            "upgrade",
            "ops",
            &chart_path(),
            "--namespace",
            ns,
            "--set",
            "replicaCount=1",
            "--set",
            "leaderElection.enabled=false",
        ],
    )?)?;
    let strategy = deployments.get("ops-example-operator").await?.spec.strategy.context("a strategy")?;
    ensure!(strategy.type_.as_deref() == Some("Recreate") && strategy.rolling_update.is_none(), "{strategy:?}");

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
        (
            vec![
                "--set",
                "leaderElection.enabled=false",
                "--set",
                "replicaCount=1",
                "--set",
                "strategy.type=RollingUpdate",
            ],
            "leaderElection.enabled=false with strategy.type=RollingUpdate: an update would run the old and the new Pod side by side",
        ),
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

/// Without leader election an upgrade never runs two Pods at once; the opt-in FlowSchema puts
/// the release's Lease requests, and only those, into the built-in `leader-election` level.
#[tokio::test]
async fn terms_never_overlap_by_configuration_and_lease_requests_can_get_their_own_priority_level() -> Result<()> {
    let cluster = TestCluster::get()?;
    let alone = rendered_deployment(&cluster, &["--set", "leaderElection.enabled=false", "--set", "replicaCount=1"])?;
    let strategy = alone.spec.strategy.and_then(|s| s.type_);
    ensure!(strategy.as_deref() == Some("Recreate"), "{strategy:?}");
    let elected = rendered_deployment(&cluster, &[])?;
    ensure!(elected.spec.strategy.is_none(), "leader election on keeps Kubernetes' default strategy");

    let none = succeeded(render(&cluster, "flow", &["--namespace", "flow-ns"])?)?;
    ensure!(of_kind(&documents(&none), "FlowSchema").is_empty(), "the FlowSchema is opt-in");
    let rendered = succeeded(render(
        &cluster,
        "flow",
        &["--namespace", "flow-ns", "--set", "leaderElection.flowSchema.enabled=true", "--skip-tests"],
    )?)?;
    let documents = documents(&rendered);
    let schema = *of_kind(&documents, "FlowSchema").first().context("a FlowSchema")?;
    ensure!(schema["spec"]["priorityLevelConfiguration"]["name"] == "leader-election", "{schema:?}");
    let rule = &schema["spec"]["rules"][0];
    ensure!(rule["subjects"][0]["serviceAccount"]["name"] == "flow-example-operator", "{rule:?}");
    ensure!(rule["subjects"][0]["serviceAccount"]["namespace"] == "flow-ns", "{rule:?}");
    ensure!(rule["resourceRules"][0]["resources"][0] == "leases", "only the Lease requests: {rule:?}");
    ensure!(rule["resourceRules"][0]["namespaces"][0] == "flow-ns", "{rule:?}");
    let flow_schema = serde_yaml::to_string(schema)?;
    accepted_by_the_api_server(&cluster, &flow_schema)
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

/// The rendered manifests, one YAML document each.
fn documents(rendered: &str) -> Vec<serde_yaml::Value> {
    rendered
        .split("\n---")
        .filter_map(|doc| serde_yaml::from_str::<serde_yaml::Value>(doc).ok())
        .filter(|doc| !doc.is_null())
        .collect()
}

/// The documents of `kind`.
fn of_kind<'a>(documents: &'a [serde_yaml::Value], kind: &str) -> Vec<&'a serde_yaml::Value> {
    documents.iter().filter(|doc| doc["kind"] == kind).collect()
}

/// The Deployment the chart renders with `args`.
fn rendered_deployment(cluster: &TestCluster, args: &[&str]) -> Result<Deployment> {
    let rendered = succeeded(render(cluster, "shape", args)?)?;
    let documents = documents(&rendered);
    let deployment = of_kind(&documents, "Deployment").into_iter().next().context("a Deployment")?;
    Ok(serde_yaml::from_value(deployment.clone())?)
}

/// The operator container and the Pod spec of a Deployment.
fn pod_of(deployment: &Deployment) -> Result<(k8s_openapi::api::core::v1::PodSpec, Container)> {
    let pod = deployment.spec.template.spec.clone().context("a pod spec")?;
    let container = pod.containers.first().cloned().context("a container")?;
    Ok((pod, container))
}

/// `kubectl apply --server-side --dry-run=server` of rendered manifests: the API server
/// validates every field (and admission runs) without storing anything. Render with
/// `--skip-tests`: the `helm test` Pod's ServiceAccount would not exist in a dry run.
fn accepted_by_the_api_server(cluster: &TestCluster, rendered: &str) -> Result<()> {
    let output = cluster.kubectl_with_input(
        &["apply", "--server-side", "--force-conflicts", "--dry-run=server", "-f", "-"],
        Some(rendered),
    )?;
    ensure!(output.status.success(), "server-side validation failed:\n{}", String::from_utf8_lossy(&output.stderr));
    Ok(())
}

/// The error of a `helm template` that must fail.
fn rejected(output: std::process::Output) -> Result<String> {
    ensure!(!output.status.success(), "helm accepted it: {}", String::from_utf8_lossy(&output.stdout));
    Ok(String::from_utf8_lossy(&output.stderr).into_owned())
}

#[tokio::test]
async fn extra_args_env_and_volumes_reach_the_operator_container() -> Result<()> {
    let cluster = TestCluster::get()?;
    let client = cluster.admin_client().await?;
    let namespace = TestNamespace::create(&client, "chart-extras").await?;
    let values = std::env::temp_dir().join(format!("extras-{}.yaml", namespace.name));
    std::fs::write(
        &values,
        r#"extraArgs: ["--reconcile-timeout=2m", "--api-request-timeout=45s"]
extraEnv:
  - name: FROM_VALUE
    value: "plain: text"
  - name: NODE_NAME
    valueFrom:
      fieldRef:
        fieldPath: spec.nodeName
  - name: FROM_SECRET
    valueFrom:
      secretKeyRef:
        name: operator-extras
        key: token
        optional: true
volumes:
  - name: scratch
    emptyDir: {}
volumeMounts:
  - name: scratch
    mountPath: /tmp
"#,
    )?;
    let values = values.display().to_string();
    let args = ["--namespace", namespace.name.as_str(), "-f", values.as_str()];
    let deployment = rendered_deployment(&cluster, &args)?;
    let (pod, container) = pod_of(&deployment)?;
    let container_args = container.args.clone().unwrap_or_default();
    ensure!(
        container_args.ends_with(&["--reconcile-timeout=2m".to_owned(), "--api-request-timeout=45s".to_owned()]),
        "extraArgs come last, after the chart's own: {container_args:?}"
    );
    let env = container.env.clone().unwrap_or_default();
    let named = |name: &str| env.iter().find(|e| e.name == name).cloned();
    ensure!(named("POD_NAME").is_some(), "the chart's own variables stay: {env:?}");
    ensure!(named("FROM_VALUE").and_then(|e| e.value) == Some("plain: text".into()), "{env:?}");
    let node = named("NODE_NAME").and_then(|e| e.value_from).and_then(|v| v.field_ref).map(|f| f.field_path);
    ensure!(node == Some("spec.nodeName".into()), "{env:?}");
    let secret = named("FROM_SECRET").and_then(|e| e.value_from).and_then(|v| v.secret_key_ref);
    ensure!(secret.is_some_and(|s| s.name == "operator-extras" && s.key == "token"), "{env:?}");
    let volumes = pod.volumes.unwrap_or_default();
    ensure!(volumes.iter().any(|v| v.name == "scratch" && v.empty_dir.is_some()), "{volumes:?}");
    let mounts = container.volume_mounts.unwrap_or_default();
    ensure!(mounts.iter().any(|m| m.name == "scratch" && m.mount_path == "/tmp"), "{mounts:?}");
    let mut dry_run = args.to_vec();
    dry_run.push("--skip-tests");
    accepted_by_the_api_server(&cluster, &succeeded(render(&cluster, "extras", &dry_run)?)?)?;

    // Wrong shapes fail at install time, naming the value.
    let stderr = rejected(render(&cluster, "extras", &["--set", "extraArgs=--one-string"])?)?;
    ensure!(stderr.contains("/extraArgs") && stderr.contains("want array"), "{stderr}");
    let stderr = rejected(render(&cluster, "extras", &["--set", "extraEnv[0].value=no-name"])?)?;
    ensure!(stderr.contains("/extraEnv/0") && stderr.contains("name"), "{stderr}");
    let stderr = rejected(render(&cluster, "extras", &["--set", "volumeMounts[0].name=scratch"])?)?;
    ensure!(stderr.contains("/volumeMounts/0") && stderr.contains("mountPath"), "{stderr}");
    namespace.delete().await
}

#[tokio::test]
async fn image_security_contexts_probes_strategy_and_spread_are_configurable_with_safe_defaults() -> Result<()> {
    let cluster = TestCluster::get()?;
    let client = cluster.admin_client().await?;
    let digest = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    // Defaults: the appVersion tag, the restricted contexts, the three probes on the operator's
    // endpoints, 10 old ReplicaSets, and replicas spread softly across nodes.
    let deployment = rendered_deployment(&cluster, &[])?;
    let (pod, container) = pod_of(&deployment)?;
    ensure!(container.image.as_deref() == Some("example-operator:0.1.0"), "{:?}", container.image);
    let probe_path = |probe: &Option<k8s_openapi::api::core::v1::Probe>| {
        probe.as_ref().and_then(|p| p.http_get.as_ref()).map(|g| (g.path.clone().unwrap_or_default(), g.port.clone()))
    };
    let probes = IntOrString::String("probes".into());
    ensure!(probe_path(&container.startup_probe) == Some(("/healthz".into(), probes.clone())));
    ensure!(probe_path(&container.liveness_probe) == Some(("/healthz".into(), probes.clone())));
    ensure!(probe_path(&container.readiness_probe) == Some(("/readyz".into(), probes.clone())));
    let security = container.security_context.clone().context("container securityContext")?;
    ensure!(security.read_only_root_filesystem == Some(true) && security.allow_privilege_escalation == Some(false));
    let pod_security = pod.security_context.clone().context("pod securityContext")?;
    ensure!(pod_security.run_as_user == Some(65532) && pod_security.run_as_non_root == Some(true));
    let spec = deployment.spec.clone();
    ensure!(spec.revision_history_limit == Some(10) && spec.strategy.is_none());
    let spread = pod.topology_spread_constraints.clone().unwrap_or_default();
    ensure!(
        spread.len() == 1
            && spread[0].topology_key == "kubernetes.io/hostname"
            && spread[0].when_unsatisfiable == "ScheduleAnyway"
            && spread[0].label_selector.as_ref().and_then(|s| s.match_labels.as_ref()).is_some_and(|labels| {
                labels.get("app.kubernetes.io/instance").map(String::as_str) == Some("shape")
            }),
        "a soft spread of this release's Pods across nodes: {spread:?}"
    );

    // Everything set: the digest wins over the tag and the registry is put in front (the
    // `helm test` Pod runs the same image); contexts and probes as given; a probe set to null
    // is gone; a changed probe field keeps the endpoint; the user's spread replaces the default.
    let namespace = TestNamespace::create(&client, "chart-shape").await?;
    let values = std::env::temp_dir().join(format!("shape-{}.yaml", namespace.name));
    std::fs::write(
        &values,
        format!(
            r#"global:
  imageRegistry: registry.example/
image:
  tag: "9.9.9"
  digest: {digest}
podSecurityContext:
  runAsNonRoot: true
  runAsUser: 1000
  runAsGroup: 1000
  fsGroup: 1000
  seccompProfile:
    type: RuntimeDefault
securityContext:
  runAsUser: 1000
startupProbe: null
livenessProbe:
  periodSeconds: 20
readinessProbe:
  failureThreshold: 6
strategy:
  type: RollingUpdate
  rollingUpdate:
    maxSurge: 1
    maxUnavailable: 0
revisionHistoryLimit: 3
topologySpreadConstraints:
  - maxSkew: 1
    topologyKey: topology.kubernetes.io/zone
    whenUnsatisfiable: DoNotSchedule
    labelSelector:
      matchLabels:
        app.kubernetes.io/name: example-operator
"#
        ),
    )?;
    let values = values.display().to_string();
    let args = ["--namespace", namespace.name.as_str(), "-f", values.as_str()];
    let rendered = succeeded(render(&cluster, "shape", &args)?)?;
    let documents = documents(&rendered);
    let expected = format!("registry.example/example-operator@{digest}");
    let deployment: Deployment =
        serde_yaml::from_value(of_kind(&documents, "Deployment").first().copied().context("a Deployment")?.clone())?;
    let (pod, container) = pod_of(&deployment)?;
    ensure!(container.image.as_deref() == Some(expected.as_str()), "{:?}", container.image);
    let test_pod: k8s_openapi::api::core::v1::Pod =
        serde_yaml::from_value(of_kind(&documents, "Pod").first().copied().context("the helm test Pod")?.clone())?;
    let test_image = test_pod.spec.and_then(|s| s.containers.first().and_then(|c| c.image.clone()));
    ensure!(test_image.as_deref() == Some(expected.as_str()), "{test_image:?}");
    ensure!(pod.security_context.and_then(|s| s.fs_group) == Some(1000));
    let security = container.security_context.context("container securityContext")?;
    ensure!(
        security.run_as_user == Some(1000) && security.read_only_root_filesystem == Some(true),
        "a field set, the restricted defaults kept: {security:?}"
    );
    ensure!(container.startup_probe.is_none(), "startupProbe: null removes it");
    let liveness = container.liveness_probe.clone().context("livenessProbe")?;
    ensure!(liveness.period_seconds == Some(20) && probe_path(&container.liveness_probe).is_some());
    ensure!(container.readiness_probe.and_then(|p| p.failure_threshold) == Some(6));
    let spec = deployment.spec;
    ensure!(spec.revision_history_limit == Some(3));
    let rolling = spec.strategy.and_then(|s| s.rolling_update).context("a rolling update")?;
    ensure!(rolling.max_unavailable == Some(IntOrString::Int(0)));
    let spread = pod.topology_spread_constraints.unwrap_or_default();
    ensure!(spread.len() == 1 && spread[0].topology_key == "topology.kubernetes.io/zone", "{spread:?}");
    let mut dry_run = args.to_vec();
    dry_run.push("--skip-tests");
    accepted_by_the_api_server(&cluster, &succeeded(render(&cluster, "shape", &dry_run)?)?)?;

    // The default spread can be turned off; a digest must look like one.
    let unspread = rendered_deployment(&cluster, &["--set", "spreadAcrossNodes=false"])?;
    ensure!(pod_of(&unspread)?.0.topology_spread_constraints.is_none());
    let stderr = rejected(render(&cluster, "shape", &["--set", "image.digest=latest"])?)?;
    ensure!(stderr.contains("/image/digest"), "{stderr}");
    let stderr = rejected(render(&cluster, "shape", &["--set", "livenessProbe.periodSeconds=often"])?)?;
    ensure!(stderr.contains("/livenessProbe/periodSeconds"), "{stderr}");
    namespace.delete().await
}

#[tokio::test]
async fn namespaced_mode_grants_roles_in_the_watched_namespace_and_only_what_broadcasts_need_cluster_wide() -> Result<()>
{
    let cluster = TestCluster::get()?;
    let client = cluster.admin_client().await?;
    let home = TestNamespace::create(&client, "chart-ns-home").await?;
    let watched = TestNamespace::create(&client, "chart-ns-watched").await?;
    let kinds_and_names = |documents: &[serde_yaml::Value]| -> Vec<(String, String, String)> {
        documents
            .iter()
            .map(|d| {
                let text = |v: &serde_yaml::Value| v.as_str().unwrap_or_default().to_owned();
                (text(&d["kind"]), text(&d["metadata"]["namespace"]), text(&d["metadata"]["name"]))
            })
            .collect()
    };
    // Secure metrics needs cluster-wide TokenReviews and SubjectAccessReviews (its own ClusterRole).
    let base = [
        "--namespace",
        home.name.as_str(),
        "--set",
        "crds.install=false",
        "--set",
        "metrics.secure=false",
        "--skip-tests",
    ];
    let watch = format!("watchNamespace={}", watched.name);

    // MyResources only: a Role and RoleBinding in the watched namespace, nothing cluster-wide.
    let mut args = base.to_vec();
    args.extend(["--set", &watch, "--set", "controllers.enabled={myresource}"]);
    let rendered = succeeded(render(&cluster, "scoped", &args)?)?;
    let documents = documents(&rendered);
    let objects = kinds_and_names(&documents);
    ensure!(
        !objects.iter().any(|(kind, _, _)| kind.starts_with("Cluster")),
        "no ClusterRole or ClusterRoleBinding (user roles included): {objects:?}"
    );
    for kind in ["Role", "RoleBinding"] {
        ensure!(
            objects.contains(&(kind.to_owned(), watched.name.clone(), "scoped-example-operator".to_owned())),
            "a {kind} in the watched namespace: {objects:?}"
        );
    }
    let role = of_kind(&documents, "Role")
        .into_iter()
        .find(|d| d["metadata"]["namespace"] == watched.name.as_str())
        .context("the watched namespace's Role")?;
    let role: Role = serde_yaml::from_value(role.clone())?;
    let resources: Vec<String> =
        role.rules.iter().flatten().flat_map(|r| r.resources.clone().unwrap_or_default()).collect();
    ensure!(
        resources == ["myresources", "myresources/status", "myresources/finalizers", "configmaps", "events"],
        "what the MyResource controller touches: {resources:?}"
    );
    let deployment: Deployment =
        serde_yaml::from_value(of_kind(&documents, "Deployment").first().copied().context("a Deployment")?.clone())?;
    let container_args = pod_of(&deployment)?.1.args.unwrap_or_default();
    ensure!(container_args.contains(&format!("--watch-namespace={}", watched.name)), "{container_args:?}");
    accepted_by_the_api_server(&cluster, &rendered)?;

    // With MessageBroadcasts (cluster-scoped) too: one ClusterRole with the broadcasts, their
    // status and the watched namespace by name; ConfigMaps stay namespaced; events about
    // broadcasts go to `default`.
    let mut args = base.to_vec();
    args.extend(["--set", &watch]);
    let rendered = succeeded(render(&cluster, "scoped", &args)?)?;
    let documents = self::documents(&rendered);
    let cluster_roles = of_kind(&documents, "ClusterRole");
    ensure!(cluster_roles.len() == 1, "one ClusterRole: {:?}", kinds_and_names(&documents));
    let cluster_role: ClusterRole = serde_yaml::from_value(cluster_roles[0].clone())?;
    ensure!(cluster_role.metadata.name.as_deref() == Some("scoped-example-operator-messagebroadcasts"));
    let rules = cluster_role.rules.unwrap_or_default();
    let cluster_wide: Vec<String> = rules.iter().flat_map(|r| r.resources.clone().unwrap_or_default()).collect();
    ensure!(
        cluster_wide == ["messagebroadcasts", "messagebroadcasts/status", "messagebroadcasts/finalizers", "namespaces"],
        "{cluster_wide:?}"
    );
    let namespaces = rules.iter().find(|r| r.resources == Some(vec!["namespaces".into()])).context("namespaces")?;
    ensure!(
        namespaces.resource_names == Some(vec![watched.name.clone()]),
        "only the watched namespace: {namespaces:?}"
    );
    let objects = kinds_and_names(&documents);
    ensure!(
        objects.contains(&("Role".into(), "default".into(), "scoped-example-operator-broadcast-events".into())),
        "{objects:?}"
    );
    ensure!(objects.iter().filter(|(kind, _, _)| kind == "ClusterRoleBinding").count() == 1, "{objects:?}");
    accepted_by_the_api_server(&cluster, &rendered)?;

    // A namespace name that is not one fails at install time.
    let stderr = rejected(render(&cluster, "scoped", &["--set", "watchNamespace=Not_A_Namespace"])?)?;
    ensure!(stderr.contains("/watchNamespace"), "{stderr}");
    watched.delete().await?;
    home.delete().await
}

/// `kubectl` as `user` (the administrator impersonates it).
fn kubectl_as(cluster: &TestCluster, user: &str, args: &[&str]) -> Result<std::process::Output> {
    let mut all = vec!["--as", user];
    all.extend_from_slice(args);
    cluster.kubectl(&all)
}

/// `kubectl auth can-i` as `user`: the API server's answer.
fn can(cluster: &TestCluster, user: &str, args: &[&str]) -> Result<bool> {
    let mut all = vec!["auth", "can-i"];
    all.extend_from_slice(args);
    let output = kubectl_as(cluster, user, &all)?;
    Ok(String::from_utf8_lossy(&output.stdout).trim() == "yes")
}

#[tokio::test]
async fn users_get_myresource_access_through_view_edit_and_admin_and_messagebroadcast_write_only_on_purpose()
-> Result<()> {
    let cluster = TestCluster::get()?;
    let client = cluster.admin_client().await?;
    install_crds(&client).await?;
    let namespace = TestNamespace::create(&client, "chart-users").await?;
    let ns = namespace.name.as_str();
    // ClusterRoles are cluster-wide: the release (and so their names) is this test's own.
    let release = format!("users-{}", &ns[ns.len() - 6..]);
    let fullname = format!("{release}-example-operator");
    succeeded(helm(
        &cluster,
        &[
            "install",
            &release,
            &chart_path(),
            "--namespace",
            ns,
            "--set",
            "crds.install=false",
            "--set",
            "replicaCount=0",
        ],
    )?)?;
    let user = |role: &str| format!("{ns}-{role}");
    let (editor, viewer, admin, cluster_editor, cluster_viewer, broadcaster) = (
        user("editor"),
        user("viewer"),
        user("admin"),
        user("cluster-editor"),
        user("cluster-viewer"),
        user("broadcaster"),
    );
    let cluster_bindings = [
        (format!("{ns}-cluster-editor"), "edit".to_owned(), cluster_editor.clone()),
        (format!("{ns}-cluster-viewer"), "view".to_owned(), cluster_viewer.clone()),
        (format!("{ns}-broadcaster"), format!("{fullname}-messagebroadcast-editor"), broadcaster.clone()),
        // The chart's broadcast policy admits only authors who may write ConfigMaps everywhere
        // (admission_policies.rs shows one who may not refused).
        (format!("{ns}-broadcaster-everywhere"), "edit".to_owned(), broadcaster.clone()),
    ];
    let outcome = async {
        for (role, name) in [("edit", &editor), ("view", &viewer), ("admin", &admin)] {
            let binding = format!("{role}-binding");
            let user = format!("--user={name}");
            stdout_of(&cluster.kubectl(&["create", "rolebinding", &binding, &format!("--clusterrole={role}"), &user, "-n", ns])?)?;
        }
        for (binding, role, name) in &cluster_bindings {
            let role = format!("--clusterrole={role}");
            stdout_of(&cluster.kubectl(&["create", "clusterrolebinding", binding, &role, &format!("--user={name}")])?)?;
        }
        let my_resource = format!(
            "apiVersion: example.com/v1\nkind: MyResource\nmetadata:\n  name: by-a-user\n  namespace: {ns}\nspec:\n  message: hi\n"
        );
        let broadcast = format!(
            "apiVersion: example.com/v1\nkind: MessageBroadcast\nmetadata:\n  name: {ns}\nspec:\n  message: hi\n  namespaceSelector:\n    matchLabels:\n      none: none\n"
        );
        // The aggregation controller copies the rules into the built-in roles within seconds.
        eventually(Duration::from_secs(30), "edit, admin and cluster-wide edit to write MyResources", || async {
            Ok((can(&cluster, &editor, &["create", "myresources.example.com", "-n", ns])?
                && can(&cluster, &admin, &["deletecollection", "myresources.example.com", "-n", ns])?
                && can(&cluster, &cluster_editor, &["patch", "myresources.example.com", "-n", "default"])?
                && can(&cluster, &viewer, &["list", "myresources.example.com", "-n", ns])?
                && can(&cluster, &cluster_viewer, &["watch", "messagebroadcasts.example.com"])?)
            .then_some(()))
        })
        .await?;
        // A real create, as the namespace's editor (the API server stores nothing: dry run).
        let output = cluster.kubectl_with_input(
            &["--as", &editor, "create", "--dry-run=server", "-f", "-"],
            Some(&my_resource),
        )?;
        ensure!(output.status.success(), "the editor creates a MyResource: {}", String::from_utf8_lossy(&output.stderr));
        ensure!(can(&cluster, &viewer, &["get", "myresources.example.com", "--subresource=status", "-n", ns])?, "status is readable");
        ensure!(!can(&cluster, &viewer, &["create", "myresources.example.com", "-n", ns])?, "view does not write");
        ensure!(!can(&cluster, &editor, &["patch", "myresources.example.com", "--subresource=status", "-n", ns])?, "the operator writes status");
        ensure!(!can(&cluster, &editor, &["create", "myresources.example.com", "-n", "default"])?, "only in its namespace");
        // No edit or admin binding, namespaced or cluster-wide, writes MessageBroadcasts.
        for name in [&editor, &admin, &cluster_editor, &cluster_viewer] {
            let output = cluster.kubectl_with_input(&["--as", name, "create", "--dry-run=server", "-f", "-"], Some(&broadcast))?;
            let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
            ensure!(!output.status.success() && stderr.contains("forbidden"), "{name} created a MessageBroadcast: {stderr}");
        }
        // The separate role, bound cluster-wide on purpose, does (its holder may write ConfigMaps
        // everywhere, as the broadcast policy asks; the binding takes a moment to count).
        eventually(Duration::from_secs(30), "the broadcaster to create a MessageBroadcast", || async {
            let output = cluster
                .kubectl_with_input(&["--as", &broadcaster, "create", "--dry-run=server", "-f", "-"], Some(&broadcast))?;
            ensure!(output.status.success(), "the broadcaster: {}", String::from_utf8_lossy(&output.stderr));
            Ok(Some(()))
        })
        .await?;

        // The access came from the release: uninstalled, it is gone.
        succeeded(helm(&cluster, &["uninstall", &release, "--namespace", ns])?)?;
        eventually(Duration::from_secs(30), "the editor to lose MyResource write with the release", || async {
            Ok((!can(&cluster, &editor, &["create", "myresources.example.com", "-n", ns])?).then_some(()))
        })
        .await
    }
    .await;
    for (binding, _, _) in &cluster_bindings {
        let _ = cluster.kubectl(&["delete", "clusterrolebinding", binding, "--ignore-not-found"]);
    }
    let _ = helm(&cluster, &["uninstall", &release, "--namespace", ns]);
    outcome?;
    namespace.delete().await
}

#[test]
fn chart_metadata_lists_both_kinds_and_the_samples_as_examples() -> Result<()> {
    let chart_yaml: serde_yaml::Value = serde_yaml::from_str(&std::fs::read_to_string(chart().join("Chart.yaml"))?)?;
    let annotation = |name: &str| -> Result<Vec<serde_yaml::Value>> {
        let text = chart_yaml["annotations"][name].as_str().context(format!("annotation {name}"))?;
        Ok(serde_yaml::from_str(text)?)
    };
    // Every CRD the chart installs, with its kind, version and the description its schema has.
    let listed = annotation("artifacthub.io/crds")?;
    let crds = crd_types::crds();
    ensure!(listed.len() == crds.len(), "{listed:?}");
    for crd in &crds {
        let name = crd.metadata.name.clone().unwrap_or_default();
        let entry = listed.iter().find(|e| e["name"] == name.as_str()).context(format!("{name} is listed"))?;
        let version = crd.spec.versions.first().context("a version")?;
        let description = version
            .schema
            .as_ref()
            .and_then(|s| s.open_api_v3_schema.as_ref())
            .and_then(|s| s.description.clone())
            .unwrap_or_default();
        ensure!(
            entry["kind"] == crd.spec.names.kind.as_str() && entry["version"] == version.name.as_str(),
            "{entry:?}"
        );
        ensure!(entry["description"] == description.as_str(), "{name}: {entry:?} against {description:?}");
    }
    // The examples are the samples' custom resources, unchanged.
    let examples = annotation("artifacthub.io/crdsExamples")?;
    let mut samples = Vec::new();
    for file in ["myresource.yaml", "messagebroadcast.yaml"] {
        let text = std::fs::read_to_string(chart().join("samples").join(file))?;
        samples.extend(documents(&text).into_iter().filter(|d| d["apiVersion"] == "example.com/v1"));
    }
    ensure!(examples == samples, "crdsExamples {examples:?} differ from samples/ {samples:?}");
    ensure!(chart_yaml["annotations"]["artifacthub.io/operator"] == "true");
    ensure!(
        chart_yaml.get("home").is_none() && chart_yaml.get("sources").is_none(),
        "no address the project does not have"
    );
    Ok(())
}

/// The documents of `kind` named `name`.
fn named<'a>(documents: &'a [serde_yaml::Value], kind: &str, name: &str) -> Option<&'a serde_yaml::Value> {
    documents.iter().find(|doc| doc["kind"] == kind && doc["metadata"]["name"] == name)
}

/// A string field of a rendered document, or an error naming it.
fn text<'a>(value: &'a serde_yaml::Value, what: &str) -> Result<&'a str> {
    value.as_str().with_context(|| format!("{what} is a string: {value:?}"))
}

/// The validation expressions of a rendered ValidatingAdmissionPolicy.
fn validations(policy: &serde_yaml::Value) -> Vec<String> {
    policy["spec"]["validations"]
        .as_sequence()
        .into_iter()
        .flatten()
        .filter_map(|v| v["expression"].as_str().map(str::to_owned))
        .collect()
}

/// The chart's reserved ConfigMap names default to the operator's own (values.yaml).
use reconcilers::tenancy::DEFAULT_RESERVED_CONFIG_MAP_NAMES as RESERVED;

#[tokio::test]
async fn both_admission_policies_are_rendered_by_default_and_follow_their_values() -> Result<()> {
    let cluster = TestCluster::get()?;
    let base = ["--namespace", "tenancy-ns", "--skip-tests"];
    let with = |extra: &[&str]| -> Result<Vec<serde_yaml::Value>> {
        let mut args = base.to_vec();
        args.extend_from_slice(extra);
        Ok(documents(&succeeded(render(&cluster, "tenancy", &args)?)?))
    };
    let authors = "tenancy-example-operator-broadcast-authors";
    let writes = "tenancy-example-operator-operator-configmaps";

    // The broadcast policy: MessageBroadcast creates and spec changes (not /status), an
    // authorizer check without a namespace (cluster-wide), the reserved names; enforced (Deny).
    let defaults = with(&[])?;
    let policy = named(&defaults, "ValidatingAdmissionPolicy", authors).context("the broadcast policy")?;
    let rule = &policy["spec"]["matchConstraints"]["resourceRules"][0];
    ensure!(
        rule["apiGroups"] == serde_yaml::to_value(["example.com"])?
            && rule["resources"] == serde_yaml::to_value(["messagebroadcasts"])?
            && rule["operations"] == serde_yaml::to_value(["CREATE", "UPDATE"])?,
        "{rule:?}"
    );
    ensure!(
        text(&policy["spec"]["matchConditions"][0]["expression"], "the match condition")?
            == "request.operation == 'CREATE' || oldObject.spec != object.spec",
        "{policy:?}"
    );
    let checks = validations(policy);
    ensure!(checks[0] == "authorizer.group('').resource('configmaps').check('create').allowed()", "{checks:?}");
    ensure!(policy["spec"]["validations"][0]["reason"] == "Forbidden", "{policy:?}");
    let quoted: Vec<String> = RESERVED.iter().map(|name| format!("'{name}'")).collect();
    ensure!(checks[1] == format!("!(variables.configMapName in [{}])", quoted.join(", ")), "{checks:?}");
    let message = text(&policy["spec"]["validations"][1]["messageExpression"], "the reserved-name message")?;
    ensure!(message.contains("tenancy.reservedConfigMapNames"), "the message names the value: {message}");
    let binding = named(&defaults, "ValidatingAdmissionPolicyBinding", authors).context("its binding")?;
    ensure!(
        binding["spec"]["policyName"] == authors
            && binding["spec"]["validationActions"] == serde_yaml::to_value(["Deny"])?,
        "{binding:?}"
    );

    // The operator policy: ConfigMap writes of the release's ServiceAccount only, never in the
    // system namespaces; enforced.
    let policy = named(&defaults, "ValidatingAdmissionPolicy", writes).context("the operator policy")?;
    let rule = &policy["spec"]["matchConstraints"]["resourceRules"][0];
    ensure!(
        rule["apiGroups"] == serde_yaml::to_value([""])?
            && rule["resources"] == serde_yaml::to_value(["configmaps"])?
            && rule["operations"] == serde_yaml::to_value(["CREATE", "UPDATE", "DELETE"])?,
        "{rule:?}"
    );
    ensure!(
        text(&policy["spec"]["matchConditions"][0]["expression"], "the match condition")?
            == "request.userInfo.username == 'system:serviceaccount:tenancy-ns:tenancy-example-operator'",
        "{policy:?}"
    );
    let checks = validations(policy);
    ensure!(
        checks[0].ends_with("!(request.namespace in ['kube-system', 'kube-public', 'kube-node-lease', 'tenancy-ns'])"),
        "the system namespaces and the release's: {checks:?}"
    );
    let binding = named(&defaults, "ValidatingAdmissionPolicyBinding", writes).context("its binding")?;
    ensure!(binding["spec"]["validationActions"] == serde_yaml::to_value(["Deny"])?, "{binding:?}");
    // The API server compiles every expression (a dry run stores nothing).
    let policies: Vec<String> = defaults
        .iter()
        .filter(|d| d["kind"].as_str().is_some_and(|k| k.starts_with("ValidatingAdmissionPolicy")))
        .map(serde_yaml::to_string)
        .collect::<Result<_, _>>()?;
    accepted_by_the_api_server(&cluster, &policies.join("---\n"))?;

    // Values reach them: more protected namespaces, other reserved names, another ServiceAccount.
    let changed = with(&[
        "--set",
        "tenancy.protectedNamespaces={team-x,kube-system}",
        "--set",
        "tenancy.reservedConfigMapNames={only-this}",
        "--set",
        "serviceAccount.name=custom",
    ])?;
    let policy = named(&changed, "ValidatingAdmissionPolicy", writes).context("the operator policy")?;
    let checks = validations(policy);
    ensure!(
        checks[0].ends_with("['kube-system', 'kube-public', 'kube-node-lease', 'tenancy-ns', 'team-x'])"),
        "{checks:?}"
    );
    ensure!(
        policy["spec"]["matchConditions"][0]["expression"]
            == "request.userInfo.username == 'system:serviceaccount:tenancy-ns:custom'",
        "{policy:?}"
    );
    let policy = named(&changed, "ValidatingAdmissionPolicy", authors).context("the broadcast policy")?;
    ensure!(validations(policy)[1] == "!(variables.configMapName in ['only-this'])", "{policy:?}");

    // Namespaced mode: the release writes copies only into the watched namespace, so that is
    // where the author must be able to create ConfigMaps.
    let scoped = with(&["--set", "watchNamespace=team-a"])?;
    let policy = named(&scoped, "ValidatingAdmissionPolicy", authors).context("the namespaced broadcast policy")?;
    ensure!(
        validations(policy)[0]
            == "authorizer.group('').resource('configmaps').namespace('team-a').check('create').allowed()",
        "{policy:?}"
    );
    let policy = named(&scoped, "ValidatingAdmissionPolicy", writes).context("the operator policy stays")?;
    ensure!(validations(policy)[0].contains("'tenancy-ns'"), "the release's namespace is protected: {policy:?}");
    // Unless namespaced mode manages it, as the operator decides too.
    let own = with(&["--set", "watchNamespace=tenancy-ns"])?;
    let policy = named(&own, "ValidatingAdmissionPolicy", writes).context("the operator policy")?;
    ensure!(
        validations(policy)[0].ends_with("!(request.namespace in ['kube-system', 'kube-public', 'kube-node-lease'])"),
        "{policy:?}"
    );

    // Without the broadcast controller there is no broadcast policy; each can be switched off.
    let only_my_resources = with(&["--set", "controllers.enabled={myresource}"])?;
    ensure!(named(&only_my_resources, "ValidatingAdmissionPolicy", authors).is_none());
    ensure!(named(&only_my_resources, "ValidatingAdmissionPolicy", writes).is_some());
    let off =
        with(&["--set", "tenancy.broadcastPolicy.enabled=false", "--set", "tenancy.operatorPolicy.enabled=false"])?;
    ensure!(
        of_kind(&off, "ValidatingAdmissionPolicy").is_empty()
            && of_kind(&off, "ValidatingAdmissionPolicyBinding").is_empty(),
        "switched off"
    );

    // Bad values fail at install time, naming the value.
    for (args, path) in [
        (vec!["--set", "tenancy.broadcastPolicy.enabled=maybe"], "/tenancy/broadcastPolicy/enabled"),
        (vec!["--set", "tenancy.protectedNamespaces={Not_A_Namespace}"], "/tenancy/protectedNamespaces/0"),
        (vec!["--set", "tenancy.reservedConfigMapNames={no spaces}"], "/tenancy/reservedConfigMapNames/0"),
        (vec!["--set", "tenancy.reservedConfigMapNames={it's}"], "/tenancy/reservedConfigMapNames/0"),
        (vec!["--set", "tenancy.operatorPolicy.enable=true"], "/tenancy/operatorPolicy"),
    ] {
        let stderr = rejected(render(&cluster, "tenancy", &args)?)?;
        ensure!(stderr.contains(path), "{args:?}: {stderr}");
    }
    Ok(())
}

#[tokio::test]
async fn the_operator_gets_its_tenancy_and_token_audience_flags_from_values() -> Result<()> {
    let cluster = TestCluster::get()?;
    let args_of = |extra: &[&str]| -> Result<Vec<String>> {
        Ok(pod_of(&rendered_deployment(&cluster, extra)?)?.1.args.unwrap_or_default())
    };
    let defaults = args_of(&[])?;
    ensure!(defaults.contains(&format!("--reserved-configmap-names={}", RESERVED.join(","))), "{defaults:?}");
    ensure!(defaults.contains(&"--broadcast-max-bytes=16777216".to_owned()), "a plain integer: {defaults:?}");
    ensure!(
        !defaults.iter().any(|a| a.starts_with("--protected-namespaces") || a.starts_with("--metrics-token-audience")),
        "only when set: {defaults:?}"
    );
    let set = args_of(&[
        "--set",
        "tenancy.protectedNamespaces={team-a,team-b}",
        "--set",
        "tenancy.reservedConfigMapNames={settings,ca.bundle}",
        "--set",
        "tenancy.broadcastMaxBytes=1048576",
        "--set",
        "metrics.tokenAudience=metrics.example.com",
    ])?;
    for expected in [
        "--protected-namespaces=team-a,team-b",
        "--reserved-configmap-names=settings,ca.bundle",
        "--broadcast-max-bytes=1048576",
        "--metrics-token-audience=metrics.example.com",
    ] {
        ensure!(set.contains(&expected.to_owned()), "{expected} in {set:?}");
    }
    for (args, path) in [
        (vec!["--set", "tenancy.broadcastMaxBytes=0"], "/tenancy/broadcastMaxBytes"),
        (vec!["--set-string", "tenancy.broadcastMaxBytes=16Mi"], "/tenancy/broadcastMaxBytes"),
        (vec!["--set", "tenancy.broadcastMaxBytes=1.5"], "/tenancy/broadcastMaxBytes"),
        (vec!["--set", "metrics.tokenAudience=5"], "/metrics/tokenAudience"),
        (vec!["--set", "metrics.tokenAudience=a b"], "/metrics/tokenAudience"),
    ] {
        let stderr = rejected(render(&cluster, "flags", &args)?)?;
        ensure!(stderr.contains(path), "{args:?}: {stderr}");
    }
    Ok(())
}

#[tokio::test]
async fn the_operator_may_block_its_owners_deletion_where_owner_references_are_enforced() -> Result<()> {
    let cluster = TestCluster::get()?;
    let rendered = succeeded(render(&cluster, "owners", &["--namespace", "owners-ns", "--skip-tests"])?)?;
    let documents = documents(&rendered);
    let role: ClusterRole = serde_yaml::from_value(
        named(&documents, "ClusterRole", "owners-example-operator").context("the ClusterRole")?.clone(),
    )?;
    let finalizers = role
        .rules
        .unwrap_or_default()
        .into_iter()
        .find(|r| r.resources.as_ref().is_some_and(|r| r.iter().any(|r| r.ends_with("/finalizers"))))
        .context("a finalizers rule")?;
    ensure!(
        finalizers.resources == Some(vec!["myresources/finalizers".into(), "messagebroadcasts/finalizers".into()])
            && finalizers.verbs == ["update"]
            && finalizers.api_groups == Some(vec!["example.com".into()]),
        "update on both kinds' finalizers, nothing else: {finalizers:?}"
    );
    Ok(())
}

#[tokio::test]
async fn helm_test_runs_as_its_own_service_account_with_a_short_lived_token() -> Result<()> {
    let cluster = TestCluster::get()?;
    let hooks = |extra: &[&str]| -> Result<Vec<serde_yaml::Value>> {
        let mut args = vec!["--namespace", "probe-ns", "--show-only", "templates/tests/check.yaml"];
        args.extend_from_slice(extra);
        Ok(documents(&succeeded(render(&cluster, "probe", &args)?)?))
    };
    let test_pod = |documents: &[serde_yaml::Value]| -> Result<k8s_openapi::api::core::v1::Pod> {
        Ok(serde_yaml::from_value(of_kind(documents, "Pod").first().copied().context("the test Pod")?.clone())?)
    };
    let name = "probe-example-operator-test";

    // Secure metrics with the self-signed certificate: a ServiceAccount and a binding to the
    // metrics-reader role only, both test hooks made before the Pod and deleted after the test.
    let defaults = hooks(&[])?;
    for kind in ["ServiceAccount", "ClusterRoleBinding"] {
        let hook = named(&defaults, kind, name).with_context(|| format!("the test's {kind}"))?;
        let annotations = &hook["metadata"]["annotations"];
        ensure!(
            annotations["helm.sh/hook"] == "test"
                && annotations["helm.sh/hook-weight"] == "-1"
                && annotations["helm.sh/hook-delete-policy"] == "before-hook-creation,hook-succeeded",
            "{kind}: {annotations:?}"
        );
    }
    let binding = named(&defaults, "ClusterRoleBinding", name).context("the binding")?;
    ensure!(binding["roleRef"]["name"] == "probe-example-operator-metrics-reader", "{binding:?}");
    ensure!(
        binding["subjects"]
            == serde_yaml::to_value([json!({"kind": "ServiceAccount", "name": name, "namespace": "probe-ns"})])?,
        "{binding:?}"
    );
    let pod = test_pod(&defaults)?;
    ensure!(
        !pod.metadata.annotations.unwrap_or_default().contains_key("helm.sh/hook-weight"),
        "the Pod comes after (weight 0)"
    );
    let spec = pod.spec.context("a Pod spec")?;
    ensure!(spec.service_account_name.as_deref() == Some(name), "{:?}", spec.service_account_name);
    ensure!(spec.automount_service_account_token == Some(false), "only the projected token");
    let volume = spec.volumes.iter().flatten().find(|v| v.name == "credentials").context("the credentials volume")?;
    let sources = volume.projected.as_ref().and_then(|p| p.sources.clone()).unwrap_or_default();
    let token = sources.iter().find_map(|s| s.service_account_token.clone()).context("a projected token")?;
    ensure!(token.expiration_seconds == Some(600) && token.audience.is_none(), "{token:?}");
    let args = spec.containers.first().and_then(|c| c.args.clone()).unwrap_or_default();
    ensure!(args.contains(&"--insecure-skip-tls-verify".to_owned()), "no CA to verify against: {args:?}");
    ensure!(args.contains(&"--token-file=/var/run/secrets/example-operator-test/token".to_owned()), "{args:?}");
    ensure!(!args.iter().any(|a| a.starts_with("--ca-file")), "{args:?}");

    // The operator's ServiceAccount is bound to no metrics-reader role any more.
    let release = documents(&succeeded(render(&cluster, "probe", &["--namespace", "probe-ns", "--skip-tests"])?)?);
    let readers: Vec<&serde_yaml::Value> = of_kind(&release, "ClusterRoleBinding")
        .into_iter()
        .filter(|b| b["roleRef"]["name"] == "probe-example-operator-metrics-reader")
        .collect();
    ensure!(readers.is_empty(), "{readers:?}");

    // A certificate from a Secret is verified with its CA, by the Service's DNS name, and the
    // token carries the audience the operator requires.
    let verified =
        hooks(&["--set", "metrics.certSecret=metrics-tls", "--set", "metrics.tokenAudience=metrics.example.com"])?;
    let spec = test_pod(&verified)?.spec.context("a Pod spec")?;
    let args = spec.containers.first().and_then(|c| c.args.clone()).unwrap_or_default();
    ensure!(!args.contains(&"--insecure-skip-tls-verify".to_owned()), "{args:?}");
    ensure!(args.contains(&"--ca-file=/var/run/secrets/example-operator-test/ca.crt".to_owned()), "{args:?}");
    ensure!(
        args.contains(&"--url=https://probe-example-operator-metrics.probe-ns.svc:8080/metrics".to_owned()),
        "{args:?}"
    );
    let volume = spec.volumes.iter().flatten().find(|v| v.name == "credentials").context("the credentials volume")?;
    let sources = volume.projected.as_ref().and_then(|p| p.sources.clone()).unwrap_or_default();
    let token = sources.iter().find_map(|s| s.service_account_token.clone()).context("a projected token")?;
    ensure!(token.audience.as_deref() == Some("metrics.example.com"), "{token:?}");
    let ca = sources.iter().find_map(|s| s.secret.clone()).context("the Secret's CA")?;
    let items = ca.items.unwrap_or_default();
    ensure!(
        ca.name == "metrics-tls" && items.len() == 1 && items[0].key == "ca.crt" && items[0].path == "ca.crt",
        "only ca.crt, never the key: {items:?}"
    );

    // Plain metrics need no identity at all.
    let plain = hooks(&["--set", "metrics.secure=false"])?;
    ensure!(of_kind(&plain, "ServiceAccount").is_empty() && of_kind(&plain, "ClusterRoleBinding").is_empty());
    let spec = test_pod(&plain)?.spec.context("a Pod spec")?;
    ensure!(spec.service_account_name.is_none() && spec.volumes.is_none(), "{spec:?}");
    Ok(())
}
