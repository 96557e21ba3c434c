//! The MyResource controller against the local control plane, asserting what `kubectl` shows.
//! Each test runs its own controllers watching only its own namespace.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use crd_types::{ConditionStatus, MyResource, MyResourceSpec, Phase};
use e2e_tests::webhook::{Verdict, Webhook};
use e2e_tests::{Fixture, RunningControllers, TestCluster, eventually, stdout_of};
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::api::events::v1::Event;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;

const CONVERGE: Duration = Duration::from_secs(30);

async fn create(resources: &Api<MyResource>, name: &str, message: &str) -> Result<MyResource> {
    let resource = MyResource::new(name, MyResourceSpec { message: message.to_owned() });
    Ok(resources.create(&PostParams::default(), &resource).await?)
}

/// Waits until the resource reports `phase` for its current generation and returns it.
async fn wait_for_phase(resources: &Api<MyResource>, name: &str, phase: Phase) -> Result<MyResource> {
    eventually(CONVERGE, &format!("MyResource {name} to be {phase:?}"), || async {
        let resource = resources.get(name).await?;
        let status = resource.status.clone().unwrap_or_default();
        let current = status.observed_generation == resource.metadata.generation;
        Ok((status.phase == Some(phase) && current).then_some(resource))
    })
    .await
}

/// Waits until the ConfigMap holds `message`.
async fn wait_for_message(config_maps: &Api<ConfigMap>, name: &str, message: &str) -> Result<ConfigMap> {
    eventually(CONVERGE, &format!("ConfigMap {name} to hold {message:?}"), || async {
        let config_map = config_maps.get_opt(name).await?;
        Ok(config_map.filter(|cm| cm.data.as_ref().and_then(|d| d.get("message")).map(String::as_str) == Some(message)))
    })
    .await
}

#[tokio::test]
async fn creating_a_my_resource_creates_its_config_map_and_reports_ready() -> Result<()> {
    let f = Fixture::new("mr-create").await?;
    let controllers = RunningControllers::start_in(&f.cluster, &f.namespace.name).await?;
    let created = create(&f.resources, "hello", "Hello, World!").await?;

    let resource = wait_for_phase(&f.resources, "hello", Phase::Ready).await?;
    let status = resource.status.context("status")?;
    ensure!(status.config_map_name.as_deref() == Some("hello-configmap"), "{status:?}");
    ensure!(status.observed_generation == resource.metadata.generation);
    let ready = status.conditions.iter().find(|c| c.type_ == "Ready").context("a Ready condition")?;
    ensure!(ready.status == ConditionStatus::True && ready.reason == "ConfigMapSynced", "{ready:?}");

    let config_map = wait_for_message(&f.config_maps, "hello-configmap", "Hello, World!").await?;
    let owner = config_map.owner_references().first().context("an ownerReference")?;
    ensure!(owner.kind == "MyResource" && owner.name == "hello", "{owner:?}");
    ensure!(Some(&owner.uid) == created.metadata.uid.as_ref() && owner.controller == Some(true));
    ensure!(config_map.labels().get("app.kubernetes.io/managed-by").map(String::as_str) == Some("example-operator"));

    // kubectl shows the same.
    let row = stdout_of(&f.cluster.kubectl(&["get", "mr", "hello", "-n", &f.namespace.name, "--no-headers"])?)?;
    ensure!(row.contains("Ready") && row.contains("hello-configmap"), "kubectl get mr: {row}");
    let waited =
        f.cluster.kubectl(&["wait", "-n", &f.namespace.name, "--for=condition=Ready", "mr/hello", "--timeout=10s"])?;
    stdout_of(&waited)?;

    // A Normal event tells what happened.
    let events: Api<Event> = Api::namespaced(f.client.clone(), &f.namespace.name);
    eventually(CONVERGE, "a Normal ConfigMapCreated event", || async {
        let list = events.list(&ListParams::default()).await?;
        Ok(list
            .items
            .iter()
            .any(|e| e.reason.as_deref() == Some("ConfigMapCreated") && e.type_.as_deref() == Some("Normal"))
            .then_some(()))
    })
    .await?;

    controllers.stop().await?;
    f.namespace.delete().await
}

#[tokio::test]
async fn spec_updates_reach_the_config_map_and_observed_generation_follows() -> Result<()> {
    let f = Fixture::new("mr-update").await?;
    let controllers = RunningControllers::start_in(&f.cluster, &f.namespace.name).await?;
    create(&f.resources, "greeting", "first").await?;
    wait_for_phase(&f.resources, "greeting", Phase::Ready).await?;

    // A merge patch, as `kubectl patch --type merge` sends.
    let patched = f
        .resources
        .patch("greeting", &PatchParams::default(), &Patch::Merge(json!({"spec": {"message": "second"}})))
        .await?;
    wait_for_message(&f.config_maps, "greeting-configmap", "second").await?;
    let resource = wait_for_phase(&f.resources, "greeting", Phase::Ready).await?;
    ensure!(resource.status.and_then(|s| s.observed_generation) == patched.metadata.generation);

    // A JSON patch through kubectl.
    let output = f.cluster.kubectl(&[
        "patch",
        "mr",
        "greeting",
        "-n",
        &f.namespace.name,
        "--type",
        "json",
        "-p",
        r#"[{"op":"replace","path":"/spec/message","value":"third"}]"#,
    ])?;
    stdout_of(&output)?;
    wait_for_message(&f.config_maps, "greeting-configmap", "third").await?;
    let resource = wait_for_phase(&f.resources, "greeting", Phase::Ready).await?;
    ensure!(resource.metadata.generation == Some(3), "two spec changes: {:?}", resource.metadata.generation);

    controllers.stop().await?;
    f.namespace.delete().await
}

#[tokio::test]
async fn a_config_map_edited_or_deleted_by_hand_is_restored() -> Result<()> {
    let f = Fixture::new("mr-drift").await?;
    let controllers = RunningControllers::start_in(&f.cluster, &f.namespace.name).await?;
    create(&f.resources, "drift", "the truth").await?;
    wait_for_message(&f.config_maps, "drift-configmap", "the truth").await?;

    // Our key is restored; a key someone else added is theirs and stays.
    let edit = json!({"data": {"message": "tampered", "extra": "added by hand"}});
    f.config_maps.patch("drift-configmap", &PatchParams::default(), &Patch::Merge(edit)).await?;
    let restored = wait_for_message(&f.config_maps, "drift-configmap", "the truth").await?;
    let extra = restored.data.as_ref().and_then(|d| d.get("extra")).map(String::as_str);
    ensure!(extra == Some("added by hand"), "a key added by hand stays: {:?}", restored.data);
    // A change to that key alone is no reason to write.
    let version = restored.metadata.resource_version.clone();
    let edit = json!({"data": {"extra": "changed by hand"}});
    let changed = f.config_maps.patch("drift-configmap", &PatchParams::default(), &Patch::Merge(edit)).await?;
    tokio::time::sleep(Duration::from_secs(2)).await; // a window for a write that must not come
    let after = f.config_maps.get("drift-configmap").await?;
    ensure!(
        after.metadata.resource_version == changed.metadata.resource_version
            && version != after.metadata.resource_version,
        "the operator wrote after a change to another writer's key"
    );

    let before = f.config_maps.get("drift-configmap").await?.metadata.uid;
    f.config_maps.delete("drift-configmap", &DeleteParams::default()).await?;
    let recreated = eventually(CONVERGE, "the ConfigMap to be recreated", || async {
        let config_map = f.config_maps.get_opt("drift-configmap").await?;
        Ok(config_map.filter(|cm| cm.metadata.uid != before))
    })
    .await?;
    ensure!(recreated.data.and_then(|d| d.get("message").cloned()).as_deref() == Some("the truth"));

    // Removing our label hides it from the operator's cache; it is still found and repaired.
    let unlabel = json!({"metadata": {"labels": {"app.kubernetes.io/managed-by": null}}});
    f.config_maps.patch("drift-configmap", &PatchParams::default(), &Patch::Merge(unlabel)).await?;
    eventually(CONVERGE, "the managed-by label to be restored", || async {
        let config_map = f.config_maps.get("drift-configmap").await?;
        Ok(config_map.labels().contains_key("app.kubernetes.io/managed-by").then_some(()))
    })
    .await?;

    controllers.stop().await?;
    f.namespace.delete().await
}

#[tokio::test]
async fn deleting_a_my_resource_lets_the_garbage_collector_remove_its_config_map() -> Result<()> {
    let f = Fixture::new("mr-delete").await?;
    let controllers = RunningControllers::start_in(&f.cluster, &f.namespace.name).await?;
    create(&f.resources, "short-lived", "bye").await?;
    wait_for_message(&f.config_maps, "short-lived-configmap", "bye").await?;

    f.resources.delete("short-lived", &DeleteParams::default()).await?;
    eventually(CONVERGE, "the ConfigMap to be garbage collected", || async {
        Ok(f.config_maps.get_opt("short-lived-configmap").await?.is_none().then_some(()))
    })
    .await?;
    controllers.stop().await?;
    f.namespace.delete().await
}

#[tokio::test]
async fn a_foreign_config_map_is_never_overwritten() -> Result<()> {
    let f = Fixture::new("mr-foreign").await?;
    let foreign: ConfigMap = serde_json::from_value(json!({
        "metadata": {"name": "taken-configmap"},
        "data": {"message": "not yours"}
    }))?;
    let foreign = f.config_maps.create(&PostParams::default(), &foreign).await?;
    let controllers = RunningControllers::start_in(&f.cluster, &f.namespace.name).await?;
    // Every result series exists from the start, at zero (as controller-runtime does).
    let text = eventually(CONVERGE, "the controller's metrics to be registered", || async {
        let text = controllers.metrics.text()?;
        Ok(text.contains("controller_runtime_reconcile_total").then_some(text))
    })
    .await?;
    for series in [
        "controller_runtime_reconcile_total{controller=\"myresource\",result=\"error\"} 0",
        "controller_runtime_reconcile_total{controller=\"myresource\",result=\"requeue\"} 0",
        "controller_runtime_terminal_reconcile_errors_total{controller=\"myresource\"} 0",
        "controller_runtime_reconcile_panics_total{controller=\"myresource\"} 0",
    ] {
        ensure!(text.contains(series), "{series} missing:\n{text}");
    }
    create(&f.resources, "taken", "mine").await?;

    let resource = wait_for_phase(&f.resources, "taken", Phase::Failed).await?;
    let status = resource.status.context("status")?;
    let ready = status.conditions.first().context("a Ready condition")?;
    ensure!(ready.status == ConditionStatus::False && ready.reason == "ConfigMapConflict", "{ready:?}");
    ensure!(ready.message.contains("taken-configmap") && ready.message.contains("not owned"), "{}", ready.message);
    ensure!(status.config_map_name.is_none(), "status does not claim the foreign ConfigMap");
    let terminal = controllers.metrics.terminal_reconcile_errors_total.with_label_values(&["myresource"]).get();
    ensure!(terminal >= 1, "the conflict is counted as a terminal error: {terminal}");

    let events: Api<Event> = Api::namespaced(f.client.clone(), &f.namespace.name);
    eventually(CONVERGE, "a Warning event on the MyResource", || async {
        let list = events.list(&ListParams::default()).await?;
        let warned = list.items.iter().any(|e| {
            e.type_.as_deref() == Some("Warning")
                && e.reason.as_deref() == Some("ConfigMapConflict")
                && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("taken")
        });
        Ok(warned.then_some(()))
    })
    .await?;

    let after = f.config_maps.get("taken-configmap").await?;
    ensure!(after.metadata.resource_version == foreign.metadata.resource_version, "the foreign ConfigMap was modified");
    ensure!(after.data == Some(BTreeMap::from([("message".to_owned(), "not yours".to_owned())])));

    // Once the foreign ConfigMap is gone, a spec change lets the resource take the name.
    f.config_maps.delete("taken-configmap", &DeleteParams::default()).await?;
    f.resources
        .patch("taken", &PatchParams::default(), &Patch::Merge(json!({"spec": {"message": "mine now"}})))
        .await?;
    wait_for_message(&f.config_maps, "taken-configmap", "mine now").await?;
    wait_for_phase(&f.resources, "taken", Phase::Ready).await?;
    controllers.stop().await?;
    f.namespace.delete().await
}

#[tokio::test]
async fn a_name_too_long_for_its_config_map_fails_once_without_a_hot_loop() -> Result<()> {
    let f = Fixture::new("mr-long").await?;
    let controllers = RunningControllers::start_in(&f.cluster, &f.namespace.name).await?;
    // 250 characters is a valid MyResource name; "-configmap" makes it 260, over the 253 limit.
    let name = "a".repeat(250);
    create(&f.resources, &name, "too long").await?;

    let resource = wait_for_phase(&f.resources, &name, Phase::Failed).await?;
    let ready = resource.status.and_then(|s| s.conditions.into_iter().next()).context("a Ready condition")?;
    ensure!(ready.reason == "InvalidConfigMapName", "{ready:?}");
    ensure!(ready.message.contains("longer than 253"), "{}", ready.message);

    let settled = controllers.metrics.reconciles("myresource");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    tokio::time::sleep_until(deadline).await; // observing a quiet period is the point here
    let later = controllers.metrics.reconciles("myresource");
    ensure!(settled <= 3, "failing took {settled} reconciles");
    ensure!(later == settled, "{} more reconciles in 5s: a hot loop", later - settled);
    controllers.stop().await?;
    f.namespace.delete().await
}

#[tokio::test]
async fn restarting_the_controllers_over_an_in_sync_namespace_writes_nothing() -> Result<()> {
    let f = Fixture::new("mr-restart").await?;
    let first = RunningControllers::start_in(&f.cluster, &f.namespace.name).await?;
    for i in 0..10 {
        create(&f.resources, &format!("steady-{i}"), &format!("message {i}")).await?;
    }
    for i in 0..10 {
        wait_for_phase(&f.resources, &format!("steady-{i}"), Phase::Ready).await?;
    }
    first.stop().await?;

    let second = RunningControllers::start_in(&f.cluster, &f.namespace.name).await?;
    eventually(CONVERGE, "the restarted controllers to reconcile all 10", || async {
        Ok((second.metrics.reconciles("myresource") >= 10).then_some(()))
    })
    .await?;
    ensure!(second.metrics.requests_with_method("GET") > 0, "the request counter sees the list/watch calls");
    ensure!(
        second.metrics.write_requests() == 0,
        "writes while everything was in sync: {}",
        second.metrics.request_summary()
    );
    second.stop().await?;
    f.namespace.delete().await
}

#[tokio::test]
async fn two_hundred_my_resources_created_at_once_all_converge() -> Result<()> {
    let f = Fixture::new("mr-many").await?;
    let controllers = RunningControllers::start_in(&f.cluster, &f.namespace.name).await?;
    let creates = (0..200).map(|i| {
        let resources = f.resources.clone();
        async move { create(&resources, &format!("bulk-{i:03}"), &format!("message {i}")).await }
    });
    futures::future::try_join_all(creates).await?;

    eventually(Duration::from_secs(120), "200 MyResources Ready with their ConfigMaps", || async {
        let resources = f.resources.list(&ListParams::default()).await?;
        let ready =
            resources.items.iter().filter(|r| r.status.as_ref().and_then(|s| s.phase) == Some(Phase::Ready)).count();
        let config_maps =
            f.config_maps.list(&ListParams::default().labels("app.kubernetes.io/managed-by=example-operator")).await?;
        Ok((ready == 200 && config_maps.items.len() == 200).then_some(()))
    })
    .await?;
    let config_maps = f.config_maps.list(&ListParams::default()).await?;
    for config_map in config_maps.items.iter().filter(|cm| cm.name_any().starts_with("bulk-")) {
        let index = config_map.name_any().trim_start_matches("bulk-").trim_end_matches("-configmap").parse::<u32>()?;
        let message = config_map.data.as_ref().and_then(|d| d.get("message"));
        ensure!(message == Some(&format!("message {index}")), "{} holds {message:?}", config_map.name_any());
    }
    controllers.stop().await?;
    f.namespace.delete().await
}

/// Applies a Role named `operator` in `namespace` granting the restricted user `rules`, bound to it.
fn grant(cluster: &TestCluster, namespace: &str, rules: serde_json::Value) -> Result<()> {
    let role = json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
        "metadata": {"name": "operator", "namespace": namespace},
        "rules": rules,
    });
    let binding = json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": {"name": "operator", "namespace": namespace},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "operator"},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": e2e_tests::RESTRICTED_USER}],
    });
    stdout_of(&cluster.kubectl_with_input(&["apply", "-f", "-"], Some(&role.to_string()))?)?;
    stdout_of(&cluster.kubectl_with_input(&["apply", "-f", "-"], Some(&binding.to_string()))?)?;
    Ok(())
}

#[tokio::test]
async fn forbidden_writes_are_retried_with_backoff_until_rbac_allows_them() -> Result<()> {
    let f = Fixture::new("mr-backoff").await?;
    let ns = f.namespace.name.clone();
    let read_only = json!([
        {"apiGroups": ["example.com"], "resources": ["myresources"], "verbs": ["get", "list", "watch"]},
        {"apiGroups": ["example.com"], "resources": ["myresources/status"], "verbs": ["patch"]},
        {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list", "watch"]},
        {"apiGroups": ["events.k8s.io"], "resources": ["events"], "verbs": ["create", "patch"]},
    ]);
    grant(&f.cluster, &ns, read_only.clone())?;
    let settings = reconcilers::Settings { watch_namespace: Some(ns.clone()), ..Default::default() };
    let controllers = RunningControllers::start(&f.cluster.restricted_kubeconfig, settings).await?;
    create(&f.resources, "patient", "eventually").await?;

    // The ConfigMap cannot be created: the failure is reported in status and retried.
    let resource = eventually(CONVERGE, "status to say why it is not Ready", || async {
        let resource = f.resources.get("patient").await?;
        let pending = resource.status.as_ref().is_some_and(|s| s.phase == Some(Phase::Pending));
        Ok(pending.then_some(resource))
    })
    .await?;
    let ready = resource.status.and_then(|s| s.conditions.into_iter().next()).context("a Ready condition")?;
    ensure!(ready.reason == "Reconciling" && ready.message.contains("forbidden"), "{ready:?}");
    let errors = || controllers.metrics.reconcile_errors_total.with_label_values(&["myresource"]).get();
    eventually(CONVERGE, "three failed attempts", || async { Ok((errors() >= 3).then_some(())) }).await?;
    // Watch a few seconds of retries: backoff from 0.5 s doubling allows about 4 more attempts
    // in 5 s, where a hot loop would make hundreds.
    let before = errors();
    tokio::time::sleep(Duration::from_secs(5)).await; // observing the retry rate is the point here
    let retried = errors() - before;
    ensure!((1..=5).contains(&retried), "{retried} failed reconciles in 5 s: retries are not backing off");
    ensure!(controllers.metrics.workqueue_retries_total.with_label_values(&["myresource", "myresource"]).get() >= 3);

    // Granting the missing verbs lets the next retry succeed.
    let mut full = read_only;
    if let Some(rules) = full.as_array_mut() {
        rules.push(json!({"apiGroups": [""], "resources": ["configmaps"], "verbs": ["create", "patch", "delete"]}));
        // blockOwnerDeletion on the ConfigMap's ownerReference (OwnerReferencesPermissionEnforcement).
        rules.push(json!({"apiGroups": ["example.com"], "resources": ["myresources/finalizers"], "verbs": ["update"]}));
    }
    grant(&f.cluster, &ns, full)?;
    eventually(Duration::from_secs(60), "the resource to become Ready after the grant", || async {
        let resource = f.resources.get("patient").await?;
        Ok((resource.status.and_then(|s| s.phase) == Some(Phase::Ready)).then_some(()))
    })
    .await?;
    wait_for_message(&f.config_maps, "patient-configmap", "eventually").await?;
    controllers.stop().await?;
    f.namespace.delete().await
}

/// Waits until the MyResource queue has taken at least one key beyond `adds_before` and is idle
/// again: every event up to now has been handled.
async fn queue_settled(controllers: &RunningControllers, adds_before: u64) -> Result<()> {
    let queue = controllers.metrics.queue_metrics("myresource");
    eventually(CONVERGE, "the MyResource queue to take the event and go idle", || async {
        let idle = queue.adds.get() > adds_before && queue.depth.get() == 0 && queue.longest_running.get() == 0.0;
        Ok(idle.then_some(()))
    })
    .await
}

/// `ConfigMapCreated` events about MyResource `name`.
async fn created_events(f: &Fixture, name: &str) -> Result<usize> {
    let events: Api<Event> = Api::namespaced(f.client.clone(), f.ns());
    let list = events.list(&ListParams::default()).await?;
    Ok(list
        .items
        .iter()
        .filter(|e| e.reason.as_deref() == Some("ConfigMapCreated"))
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
        .count())
}

/// A MyResource held by a finalizer of the test's own, so its deletion stays in progress.
async fn held(f: &Fixture, name: &str) -> Result<()> {
    let mut resource = MyResource::new(name, MyResourceSpec { message: "held".to_owned() });
    resource.metadata.finalizers = Some(vec!["e2e.example.com/hold".to_owned()]);
    f.resources.create(&PostParams::default(), &resource).await?;
    f.wait_ready(name, CONVERGE).await?;
    wait_for_message(&f.config_maps, &format!("{name}-configmap"), "held").await?;
    Ok(())
}

/// Waits until MyResource `name` is gone.
async fn wait_gone(f: &Fixture, name: &str) -> Result<()> {
    eventually(CONVERGE, &format!("MyResource {name} to go"), || async {
        Ok(f.resources.get_opt(name).await?.is_none().then_some(()))
    })
    .await
}

async fn release(f: &Fixture, name: &str) -> Result<()> {
    let patch = json!({"metadata": {"finalizers": null}});
    f.resources.patch(name, &PatchParams::default(), &Patch::Merge(patch)).await?;
    Ok(())
}

#[tokio::test]
async fn a_resource_in_foreground_deletion_is_not_reconciled_and_its_config_map_is_not_recreated() -> Result<()> {
    let f = Fixture::new("mr-foreground").await?;
    let controllers = RunningControllers::start_in(&f.cluster, f.ns()).await?;
    held(&f, "fg").await?;
    let adds_before = controllers.metrics.queue_metrics("myresource").adds.get();
    f.resources.delete("fg", &DeleteParams::foreground()).await?;
    // The garbage collector deletes the ConfigMap first (it blocks the owner's deletion); the
    // owner stays Terminating on the test's finalizer.
    eventually(CONVERGE, "the garbage collector to delete the ConfigMap", || async {
        Ok(f.config_maps.get_opt("fg-configmap").await?.is_none().then_some(()))
    })
    .await?;
    queue_settled(&controllers, adds_before).await?;
    ensure!(f.config_maps.get_opt("fg-configmap").await?.is_none(), "the operator recreated the ConfigMap");
    ensure!(created_events(&f, "fg").await? == 1, "one ConfigMapCreated event, for the first creation");
    ensure!(f.resources.get_opt("fg").await?.is_some_and(|r| r.metadata.deletion_timestamp.is_some()));
    release(&f, "fg").await?;
    wait_gone(&f, "fg").await?;
    controllers.stop().await
}

#[tokio::test]
async fn orphan_deletion_leaves_the_config_map_without_a_false_conflict_or_its_reference_restored() -> Result<()> {
    let f = Fixture::new("mr-orphan").await?;
    let controllers = RunningControllers::start_in(&f.cluster, f.ns()).await?;
    held(&f, "orphan").await?;
    let orphan = DeleteParams { propagation_policy: Some(kube::api::PropagationPolicy::Orphan), ..Default::default() };
    f.resources.delete("orphan", &orphan).await?;
    eventually(CONVERGE, "the garbage collector to strip the ownerReference", || async {
        let config_map = f.config_maps.get("orphan-configmap").await?;
        Ok(config_map.owner_references().is_empty().then_some(()))
    })
    .await?;
    // A spec change while it is being deleted: an event for it, after the reference is gone.
    let adds_before = controllers.metrics.queue_metrics("myresource").adds.get();
    let change = json!({"spec": {"message": "changed while deleting"}});
    f.resources.patch("orphan", &PatchParams::default(), &Patch::Merge(change)).await?;
    queue_settled(&controllers, adds_before).await?;
    let config_map = f.config_maps.get("orphan-configmap").await?;
    ensure!(
        config_map.owner_references().is_empty(),
        "the reference was put back: {:?}",
        config_map.owner_references()
    );
    let resource = f.resources.get("orphan").await?;
    let phase = resource.status.and_then(|s| s.phase);
    ensure!(phase == Some(Phase::Ready), "no false ConfigMapConflict while it is deleted: {phase:?}");
    release(&f, "orphan").await?;
    wait_gone(&f, "orphan").await?;
    ensure!(f.config_maps.get_opt("orphan-configmap").await?.is_some(), "the orphaned ConfigMap stays");
    controllers.stop().await
}

#[tokio::test]
async fn drift_repair_keeps_other_owners_references() -> Result<()> {
    let f = Fixture::new("mr-owners").await?;
    let controllers = RunningControllers::start_in(&f.cluster, f.ns()).await?;
    create(&f.resources, "shared", "mine").await?;
    wait_for_message(&f.config_maps, "shared-configmap", "mine").await?;
    // Another owner (a real object, so the garbage collector keeps the reference) is added next
    // to ours, and the data is tampered with.
    let other: ConfigMap = serde_json::from_value(json!({"metadata": {"name": "other-owner"}}))?;
    let other = f.config_maps.create(&PostParams::default(), &other).await?;
    let existing = f.config_maps.get("shared-configmap").await?;
    let mut owners = existing.owner_references().to_vec();
    owners.push(k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
        api_version: "v1".into(),
        kind: "ConfigMap".into(),
        name: "other-owner".into(),
        uid: other.uid().context("uid")?,
        ..Default::default()
    });
    let tamper = json!({"metadata": {"ownerReferences": owners}, "data": {"message": "tampered"}});
    f.config_maps.patch("shared-configmap", &PatchParams::default(), &Patch::Merge(tamper)).await?;
    let repaired = wait_for_message(&f.config_maps, "shared-configmap", "mine").await?;
    let kinds: Vec<(String, String)> =
        repaired.owner_references().iter().map(|o| (o.kind.clone(), o.name.clone())).collect();
    ensure!(
        kinds == [("MyResource".to_owned(), "shared".to_owned()), ("ConfigMap".to_owned(), "other-owner".to_owned())],
        "both owners after the repair: {kinds:?}"
    );
    controllers.stop().await
}

#[tokio::test]
async fn a_repair_writes_nothing_over_a_config_map_that_changed_owner_since_it_was_read() -> Result<()> {
    let f = Fixture::new("mr-stale-repair").await?;
    let controllers = RunningControllers::start_in(&f.cluster, f.ns()).await?;
    create(&f.resources, "contested", "mine").await?;
    wait_for_message(&f.config_maps, "contested-configmap", "mine").await?;

    // A webhook holds the operator's writes to the ConfigMap (recognised by its field manager)
    // until the test lets them go; everyone else's pass at once, but for the test's probe, which
    // it refuses (so the test knows it is in place).
    let (held_tx, mut held) = tokio::sync::mpsc::unbounded_channel::<()>();
    let (release, released) = tokio::sync::watch::channel(false);
    let matching = json!({
        "rules": [{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["UPDATE"], "resources": ["configmaps"]}],
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": f.ns()}},
        "matchConditions": [{"name": "copy", "expression": "object.metadata.name == 'contested-configmap'"}],
    });
    let webhook = Webhook::start(&f.client, f.ns(), matching, move |request| {
        let (held_tx, mut released) = (held_tx.clone(), released.clone());
        async move {
            let manager = request["options"]["fieldManager"].as_str().unwrap_or_default().to_owned();
            if manager == reconcilers::owned_config_map::MANAGER {
                let _ = held_tx.send(());
                let _ = released.wait_for(|go| *go).await;
            }
            if manager == "e2e-probe" {
                return Verdict::Deny { code: 403, message: "the webhook is in place".into() };
            }
            Verdict::Allow
        }
    })
    .await?;
    let probe = json!({"metadata": {"annotations": {"e2e.example.com/probe": "1"}}});
    let dry_run = PatchParams { dry_run: true, field_manager: Some("e2e-probe".into()), ..Default::default() };
    let other: ConfigMap = serde_json::from_value(json!({"metadata": {"name": "new-owner"}}))?;
    let other = f.config_maps.create(&PostParams::default(), &other).await?;
    eventually(CONVERGE, "the webhook to be called", || async {
        let refused = f.config_maps.patch("contested-configmap", &dry_run, &Patch::Merge(&probe)).await.is_err();
        Ok(refused.then_some(()))
    })
    .await?;

    // The data drifts: the operator reads it and sends its repair, which the webhook holds.
    let tamper = json!({"data": {"message": "tampered"}});
    f.config_maps.patch("contested-configmap", &PatchParams::default(), &Patch::Merge(tamper)).await?;
    tokio::time::timeout(CONVERGE, held.recv()).await.context("the operator's repair never reached the webhook")?;
    // Meanwhile the ConfigMap gets another controller: it is no longer the operator's to repair.
    let taken = json!({"metadata": {"ownerReferences": [{
        "apiVersion": "v1", "kind": "ConfigMap", "name": "new-owner",
        "uid": other.uid().context("uid")?, "controller": true,
    }]}});
    f.config_maps.patch("contested-configmap", &PatchParams::default(), &Patch::Merge(taken)).await?;
    let _ = release.send(true);

    // The held repair was written against the version it read: refused, and the retry sees the
    // new owner and reports the conflict.
    let resource = wait_for_phase(&f.resources, "contested", Phase::Failed).await?;
    let ready = resource.status.and_then(|s| s.conditions.into_iter().next()).context("a Ready condition")?;
    ensure!(ready.reason == "ConfigMapConflict", "{ready:?}");
    let after = f.config_maps.get("contested-configmap").await?;
    let owners: Vec<&str> = after.owner_references().iter().map(|o| o.name.as_str()).collect();
    ensure!(owners == ["new-owner"], "the new owner keeps the ConfigMap: {owners:?}");
    let message = after.data.as_ref().and_then(|d| d.get("message")).map(String::as_str);
    ensure!(message == Some("tampered"), "nothing was written over it: {message:?}");
    webhook.stop().await?;
    controllers.stop().await?;
    f.namespace.delete().await
}

#[tokio::test]
async fn a_status_cleared_by_another_writer_is_restored_within_seconds() -> Result<()> {
    let f = Fixture::new("mr-status").await?;
    let controllers = RunningControllers::start_in(&f.cluster, f.ns()).await?;
    create(&f.resources, "cleared", "keep my status").await?;
    wait_for_phase(&f.resources, "cleared", Phase::Ready).await?;
    // What `kubectl edit --subresource=status` or a stale writer does: the status goes.
    let clear = json!({"status": null});
    // (The answer to the write shows it cleared; the operator may restore it before any read.)
    let cleared = f.resources.patch_status("cleared", &PatchParams::default(), &Patch::Merge(clear)).await?;
    ensure!(cleared.status.is_none(), "the status was cleared");
    let restored = eventually(Duration::from_secs(10), "the status to be restored", || async {
        let resource = f.resources.get("cleared").await?;
        Ok(resource.status.filter(|s| s.phase == Some(Phase::Ready)))
    })
    .await?;
    ensure!(restored.config_map_name.as_deref() == Some("cleared-configmap"), "{restored:?}");
    controllers.stop().await
}

#[tokio::test]
async fn a_periodic_resync_reconciles_everything_again_and_writes_nothing_when_in_sync() -> Result<()> {
    let f = Fixture::new("mr-resync").await?;
    let settings = reconcilers::Settings {
        watch_namespace: Some(f.ns().to_owned()),
        sync_period: Some(Duration::from_secs(1)),
        ..Default::default()
    };
    let controllers = RunningControllers::start(&f.cluster.admin_kubeconfig, settings).await?;
    for index in 0..3 {
        create(&f.resources, &format!("synced-{index}"), "in sync").await?;
    }
    for index in 0..3 {
        f.wait_ready(&format!("synced-{index}"), CONVERGE).await?;
    }
    // Let the writes of the first reconciles land (events are published in the background).
    let writes = eventually(CONVERGE, "the writes to settle", || async {
        let before = controllers.metrics.write_requests();
        let reconciles = controllers.metrics.reconciles("myresource");
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let steady =
            controllers.metrics.write_requests() == before && controllers.metrics.reconciles("myresource") > reconciles;
        Ok(steady.then_some(before))
    })
    .await?;
    let reconciles = controllers.metrics.reconciles("myresource");
    eventually(Duration::from_secs(10), "three more resyncs of every object", || async {
        Ok((controllers.metrics.reconciles("myresource") >= reconciles + 9).then_some(()))
    })
    .await?;
    ensure!(
        controllers.metrics.write_requests() == writes,
        "resyncs of an in-sync namespace wrote: {}",
        controllers.metrics.request_summary()
    );
    controllers.stop().await
}
