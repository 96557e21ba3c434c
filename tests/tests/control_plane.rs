//! The local control plane is a real Kubernetes: versioned, RBAC-enforcing, garbage-collecting,
//! and serving the generated CRDs the way `kubectl` users expect.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use e2e_tests::{RESTRICTED_USER, TestCluster, TestNamespace, eventually, install_crds, stdout_of};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use serde_json::json;

const TUTORIAL_MANIFEST: &str = "\
apiVersion: example.com/v1
kind: MyResource
metadata:
  name: example
spec:
  message: Hello, World!
";

#[tokio::test]
async fn api_server_reports_the_pinned_kubernetes_version() -> Result<()> {
    let cluster = TestCluster::get()?;
    let version = cluster.admin_client().await?.apiserver_version().await?;
    ensure!(version.git_version.starts_with("v1."), "gitVersion is stamped, got {}", version.git_version);
    ensure!(version.git_version != "v0.0.0-master+$Format:%H$", "gitVersion is stamped");
    ensure!(version.major == "1" && !version.minor.is_empty(), "major/minor are stamped: {version:?}");
    Ok(())
}

#[tokio::test]
async fn generated_crds_install_and_become_established() -> Result<()> {
    let cluster = TestCluster::get()?;
    let names = install_crds(&cluster.admin_client().await?).await?;
    ensure!(names == ["messagebroadcasts.example.com", "myresources.example.com"], "installed {names:?}");
    let output = stdout_of(&cluster.kubectl(&["api-resources", "--api-group=example.com", "--no-headers"])?)?;
    ensure!(output.contains("myresources") && output.contains("mr "), "kubectl api-resources: {output}");
    ensure!(output.contains("messagebroadcasts") && output.contains("mb "), "kubectl api-resources: {output}");
    Ok(())
}

#[tokio::test]
async fn kubectl_get_mr_lists_the_tutorial_resource_with_printer_columns() -> Result<()> {
    let cluster = TestCluster::get()?;
    let client = cluster.admin_client().await?;
    install_crds(&client).await?;
    let namespace = TestNamespace::create(&client, "get-mr").await?;
    let ns = namespace.name.as_str();

    stdout_of(&cluster.kubectl_with_input(&["apply", "-n", ns, "-f", "-"], Some(TUTORIAL_MANIFEST))?)?;
    let table = stdout_of(&cluster.kubectl(&["get", "mr", "-n", ns])?)?;
    let mut lines = table.lines();
    let header: Vec<&str> = lines.next().context("a header line")?.split_whitespace().collect();
    ensure!(header == ["NAME", "PHASE", "CONFIGMAP", "AGE"], "kubectl get mr header: {header:?}");
    let row = lines.next().context("a row for the resource")?;
    ensure!(row.starts_with("example "), "kubectl get mr row: {row}");

    let message =
        stdout_of(&cluster.kubectl(&["get", "myresource", "example", "-n", ns, "-o", "jsonpath={.spec.message}"])?)?;
    ensure!(message == "Hello, World!", "spec.message round-trips: {message:?}");
    namespace.delete().await
}

#[tokio::test]
async fn kubectl_explain_shows_the_field_descriptions() -> Result<()> {
    let cluster = TestCluster::get()?;
    install_crds(&cluster.admin_client().await?).await?;
    // Discovery of a freshly established CRD can lag a moment behind in kubectl's view.
    let explained = eventually(Duration::from_secs(30), "kubectl explain to know MyResource", || async {
        let output = cluster.kubectl(&["explain", "myresource.spec.message"])?;
        Ok(output.status.success().then(|| String::from_utf8_lossy(&output.stdout).into_owned()))
    })
    .await?;
    ensure!(explained.contains("The message to publish"), "kubectl explain: {explained}");
    ensure!(explained.contains("<name>-configmap"), "kubectl explain: {explained}");
    let status = stdout_of(&cluster.kubectl(&["explain", "mr.status"])?)?;
    ensure!(status.contains("configMapName") && status.contains("observedGeneration"), "{status}");
    Ok(())
}

/// Applies `manifest` and returns kubectl's error output; fails if the API server accepted it.
fn rejected(cluster: &TestCluster, ns: &str, manifest: &str) -> Result<String> {
    let output = cluster.kubectl_with_input(&["apply", "-n", ns, "-f", "-"], Some(manifest))?;
    ensure!(!output.status.success(), "the API server accepted an invalid MyResource:\n{manifest}");
    Ok(String::from_utf8_lossy(&output.stderr).into_owned())
}

#[tokio::test]
async fn invalid_my_resources_are_rejected_with_the_schema_error() -> Result<()> {
    let cluster = TestCluster::get()?;
    let client = cluster.admin_client().await?;
    install_crds(&client).await?;
    let namespace = TestNamespace::create(&client, "invalid").await?;
    let ns = namespace.name.as_str();

    let empty = rejected(
        &cluster,
        ns,
        "apiVersion: example.com/v1\nkind: MyResource\nmetadata:\n  name: empty\nspec:\n  message: \"\"\n",
    )?;
    ensure!(empty.contains("spec.message") && empty.contains("at least 1 chars long"), "empty message: {empty}");

    let missing =
        rejected(&cluster, ns, "apiVersion: example.com/v1\nkind: MyResource\nmetadata:\n  name: missing\nspec: {}\n")?;
    ensure!(missing.contains("spec.message: Required value"), "missing message: {missing}");

    let long = format!(
        "apiVersion: example.com/v1\nkind: MyResource\nmetadata:\n  name: long\nspec:\n  message: {}\n",
        "x".repeat(crd_types::MAX_MESSAGE_LENGTH as usize + 1)
    );
    let too_long = rejected(&cluster, ns, &long)?;
    ensure!(too_long.contains("spec.message: Too long"), "too long: {too_long}");

    // Nothing was created by the rejected requests.
    let listed = stdout_of(&cluster.kubectl(&["get", "mr", "-n", ns, "-o", "name"])?)?;
    ensure!(listed.trim().is_empty(), "rejected resources must not exist: {listed}");
    namespace.delete().await
}

#[tokio::test]
async fn restricted_identity_is_denied_until_rbac_grants_it() -> Result<()> {
    let cluster = TestCluster::get()?;
    let admin = cluster.admin_client().await?;
    install_crds(&admin).await?;
    let namespace = TestNamespace::create(&admin, "rbac").await?;
    let ns = namespace.name.as_str();
    let restricted: Api<crd_types::MyResource> = Api::namespaced(cluster.restricted_client().await?, ns);

    let denied = restricted.list(&ListParams::default()).await;
    match denied {
        Err(kube::Error::Api(status)) if status.code == 403 => {
            ensure!(status.message.contains(RESTRICTED_USER), "denial names the user: {}", status.message);
        }
        other => anyhow::bail!("expected 403 Forbidden for the restricted user, got {other:?}"),
    }

    // The same identity is allowed once RBAC grants it: authentication works, authorization decides.
    let role = json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
        "metadata": {"name": "read-myresources", "namespace": ns},
        "rules": [{"apiGroups": ["example.com"], "resources": ["myresources"], "verbs": ["get", "list", "watch"]}]
    });
    let binding = json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": {"name": "read-myresources", "namespace": ns},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "read-myresources"},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": RESTRICTED_USER}]
    });
    stdout_of(&cluster.kubectl_with_input(&["apply", "-f", "-"], Some(&role.to_string()))?)?;
    stdout_of(&cluster.kubectl_with_input(&["apply", "-f", "-"], Some(&binding.to_string()))?)?;
    eventually(Duration::from_secs(30), "the RoleBinding to take effect", || async {
        Ok(restricted.list(&ListParams::default()).await.ok().map(|_| ()))
    })
    .await?;
    // Other namespaces stay out of reach.
    let elsewhere: Api<crd_types::MyResource> = Api::namespaced(cluster.restricted_client().await?, "default");
    ensure!(elsewhere.list(&ListParams::default()).await.is_err(), "the Role grants only its namespace");
    namespace.delete().await
}

#[tokio::test]
async fn garbage_collector_deletes_dependents_of_a_deleted_owner() -> Result<()> {
    let cluster = TestCluster::get()?;
    let client = cluster.admin_client().await?;
    let namespace = TestNamespace::create(&client, "gc").await?;
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), &namespace.name);

    let owner: ConfigMap = serde_json::from_value(json!({"metadata": {"name": "owner"}}))?;
    let owner = config_maps.create(&PostParams::default(), &owner).await?;
    let uid = owner.metadata.uid.context("the API server assigns a uid")?;
    let dependent: ConfigMap = serde_json::from_value(json!({
        "metadata": {"name": "dependent", "ownerReferences": [
            {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": uid, "controller": true}
        ]},
        "data": {"message": "owned"}
    }))?;
    config_maps.create(&PostParams::default(), &dependent).await?;

    config_maps.delete("owner", &DeleteParams::default()).await?;
    eventually(Duration::from_secs(60), "the garbage collector to delete the dependent", || async {
        Ok(config_maps.get_opt("dependent").await?.is_none().then_some(()))
    })
    .await?;
    namespace.delete().await
}
