//! A controller whose caches cannot sync must not stop another controller: the operator runs
//! with `--watch-namespace` and RBAC for that namespace only, so the cluster-scoped caches of the
//! MessageBroadcast controller (namespaces, broadcasts) are forbidden. MyResources keep
//! converging and drift is repaired even after more ConfigMap events than a subscriber may leave
//! unread; `/readyz` names the caches that cannot sync, and the log carries the API error.

use std::time::Duration;

use anyhow::{Result, ensure};
use e2e_tests::{Fixture, OperatorProcess, RESTRICTED_USER, eventually, http_get};
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;

/// More ConfigMap events than a subscriber's buffer (1,024) holds.
const EVENTS: usize = 1100;

/// What the MyResource controller needs, in the fixture's namespace only.
async fn grant_namespace_only(f: &Fixture) -> Result<()> {
    let role: Role = serde_json::from_value(json!({
        "metadata": {"name": "operator-here-only"},
        "rules": [
            {"apiGroups": ["example.com"], "resources": ["myresources"], "verbs": ["get", "list", "watch"]},
            {"apiGroups": ["example.com"], "resources": ["myresources/status"], "verbs": ["patch"]},
            // blockOwnerDeletion on the ConfigMap's ownerReference (OwnerReferencesPermissionEnforcement).
            {"apiGroups": ["example.com"], "resources": ["myresources/finalizers"], "verbs": ["update"]},
            {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list", "watch", "create", "patch", "delete"]},
            {"apiGroups": ["events.k8s.io"], "resources": ["events"], "verbs": ["create", "patch"]},
        ],
    }))?;
    Api::<Role>::namespaced(f.client.clone(), f.ns()).create(&PostParams::default(), &role).await?;
    let binding: RoleBinding = serde_json::from_value(json!({
        "metadata": {"name": "operator-here-only"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "operator-here-only"},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": RESTRICTED_USER}],
    }))?;
    Api::<RoleBinding>::namespaced(f.client.clone(), f.ns()).create(&PostParams::default(), &binding).await?;
    Ok(())
}

#[tokio::test]
async fn an_unsynced_controller_never_blocks_another_and_readyz_names_its_caches() -> Result<()> {
    let f = Fixture::new("stuck-caches").await?;
    grant_namespace_only(&f).await?;
    let operator = OperatorProcess::spawn(
        &f.cluster.restricted_kubeconfig,
        "stuck-caches",
        "stuck-caches-leader",
        f.ns(),
        &["--leader-elect=false"],
        &[],
    )?;
    f.create("served", "despite the broadcasts").await?;
    f.wait_ready("served", Duration::from_secs(30)).await.map_err(|e| e.context(operator.log_text()))?;

    // /readyz on the (only, hence leading) replica names the caches that cannot sync.
    let body = eventually(Duration::from_secs(30), "/readyz to name the unsynced caches", || async {
        let (code, body) = http_get(operator.probe_port, "/readyz?verbose").await?;
        Ok((code != 200 && body.contains("namespaces") && body.contains("messagebroadcasts")).then_some(body))
    })
    .await?;
    ensure!(body.contains("[-]caches"), "{body}");
    ensure!(body.contains("forbidden"), "the API error is named: {body}");
    ensure!(!body.contains("configmaps:") && !body.contains("myresources:"), "synced caches are not named: {body}");
    let log = operator.log_text();
    ensure!(log.contains("cache cannot sync") && log.contains("forbidden"), "the log names the API error:\n{log}");

    // A managed ConfigMap no controller owns changes many times: the MessageBroadcast
    // controller, waiting for its caches, reads none of these events.
    let filler: ConfigMap = serde_json::from_value(json!({
        "metadata": {"name": "filler", "labels": {"app.kubernetes.io/managed-by": "example-operator"}},
    }))?;
    f.config_maps.create(&PostParams::default(), &filler).await?;
    for round in 0..EVENTS {
        let change = json!({"data": {"round": round.to_string()}});
        f.config_maps.patch("filler", &PatchParams::default(), &Patch::Merge(change)).await?;
    }
    // Drift repair of the MyResource's ConfigMap still happens.
    let tamper = json!({"data": {"message": "tampered"}});
    f.config_maps.patch("served-configmap", &PatchParams::default(), &Patch::Merge(tamper)).await?;
    eventually(Duration::from_secs(30), "the drift to be repaired", || async {
        let config_map = f.config_maps.get("served-configmap").await?;
        let message = config_map.data.and_then(|d| d.get("message").cloned());
        Ok((message.as_deref() == Some("despite the broadcasts")).then_some(()))
    })
    .await
    .map_err(|e| e.context(operator.log_text()))?;
    Ok(())
}
