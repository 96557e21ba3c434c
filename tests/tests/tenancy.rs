//! What a tenant can and cannot do to the operator and through it (SPEC §9), tried as the tenant:
//! impersonated users with only the rights a real tenant has. The chart's admission policies are
//! tested in `admission_policies.rs`; here is what the operator itself does, which holds with the
//! policies switched off.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use crd_types::{MessageBroadcast, MessageBroadcastSpec, MyResource, MyResourceSpec, Phase};
use e2e_tests::{Fixture, ReadyPod, RunningControllers, TestNamespace, eventually, sample, stdout_of, succeeded};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use k8s_openapi::api::rbac::v1::RoleBinding;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement, OwnerReference};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use operator::check::{Request, get};
use reconcilers::tenancy::Tenancy;
use serde_json::json;

const CONVERGE: Duration = Duration::from_secs(60);

/// Every test here runs operators that manage the whole cluster: one at a time, so none
/// reconciles another's objects.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
const MANAGED_BY: &str = "app.kubernetes.io/managed-by";

/// A user with Kubernetes' `edit` role in `namespace` alone, as a namespace's developers have.
async fn namespace_editor(f: &Fixture, namespace: &str) -> Result<Client> {
    let user = format!("{namespace}-editor");
    let binding: RoleBinding = serde_json::from_value(json!({
        "metadata": {"name": "editor", "namespace": namespace},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "edit"},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}],
    }))?;
    Api::<RoleBinding>::namespaced(f.client.clone(), namespace).create(&PostParams::default(), &binding).await?;
    f.cluster.impersonated_client(&user, &["system:authenticated".to_owned()]).await
}

/// About 1 MB: `keys` keys of 250 characters with empty values, labelled as the operator's.
fn large_config_map(name: &str, keys: usize, owner: Option<OwnerReference>) -> Result<ConfigMap> {
    let data: BTreeMap<String, String> = (0..keys).map(|i| (format!("{i:0>250}"), String::new())).collect();
    Ok(serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {MANAGED_BY: "example-operator"}, "ownerReferences": owner.map(|o| vec![o])},
        "data": data,
    }))?)
}

fn controller_reference(name: &str, uid: &str) -> OwnerReference {
    OwnerReference {
        api_version: "example.com/v1".into(),
        kind: "MyResource".into(),
        name: name.into(),
        uid: uid.into(),
        controller: Some(true),
        block_owner_deletion: None,
    }
}

/// The chart's Ready Pods of `release`.
async fn ready_pods(f: &Fixture, release: &str) -> Result<Vec<ReadyPod>> {
    e2e_tests::ready_pods(&f.client, f.ns(), release).await
}

/// Each Ready Pod's resident memory in bytes (`process_resident_memory_bytes`), by name.
async fn resident_memory(f: &Fixture, release: &str, reader: &Request) -> Result<BTreeMap<String, f64>> {
    let mut memory = BTreeMap::new();
    for ReadyPod { name, ip, .. } in ready_pods(f, release).await? {
        let answer = get(&format!("https://{ip}:8080/metrics"), reader).await?;
        ensure!(answer.code == 200, "{name}'s /metrics answered {}: {}", answer.code, answer.body);
        let bytes = sample(&answer.body, "process_resident_memory_bytes").context("process_resident_memory_bytes")?;
        memory.insert(name, bytes);
    }
    Ok(memory)
}

const MIB: f64 = 1024.0 * 1024.0;

/// The chart's memory limit of the operator container (values.yaml).
const MEMORY_LIMIT: f64 = 256.0 * MIB;

/// SPEC §9: "anyone who can write a ConfigMap can fill every replica's memory" no more. A
/// namespace editor creates 60 ConfigMaps of about 1 MB each (3,900 keys of 250 characters),
/// labelled as the operator's: a third without an owner, a third under a forged controller
/// reference (a MyResource that does not exist), a third under the real uid of the tenant's own
/// MyResource (admitted, but cached as one digest). Both replicas (leader and standby, which
/// caches too) stay within their limit without a restart, their memory grows by a few MiB where
/// it grew by 105 MiB before, and a replica restarted over them (a relist of every ConfigMap,
/// paged) comes up Ready within its limit.
#[tokio::test]
async fn a_tenants_large_labelled_config_maps_leave_every_replica_within_its_memory_limit() -> Result<()> {
    let _one = ONE_AT_A_TIME.lock().await;
    let f = Fixture::new("tenant-memory").await?;
    let release = "tenancy";
    let chart = e2e_tests::chart_dir().display().to_string();
    let mut args = vec!["install", release, chart.as_str(), "--namespace", f.ns()];
    let mut values = e2e_tests::chart_image_values()?;
    values.extend(["crds.install=false".to_owned(), "tenancy.broadcastPolicy.enabled=false".to_owned()]);
    for value in &values {
        args.extend(["--set", value.as_str()]);
    }
    succeeded(e2e_tests::helm(&f.cluster, &args)?)?;
    let uninstall = uninstall_on_drop(&f, release);

    // A reader of the secure /metrics, bound to the release's metrics-reader role.
    stdout_of(&f.cluster.kubectl(&["create", "serviceaccount", "reader", "-n", f.ns()])?)?;
    let binding = format!("{}-reader", f.ns());
    stdout_of(&f.cluster.kubectl(&[
        "create",
        "clusterrolebinding",
        &binding,
        &format!("--clusterrole={release}-example-operator-metrics-reader"),
        &format!("--serviceaccount={}:reader", f.ns()),
    ])?)?;
    let token = stdout_of(&f.cluster.kubectl(&["create", "token", "reader", "-n", f.ns(), "--duration=1h"])?)?;
    let reader = Request { token: Some(token.trim().to_owned()), insecure_skip_tls_verify: true, ..Request::default() };

    let tenant = TestNamespace::create(&f.client, "tenant").await?;
    let as_tenant = namespace_editor(&f, &tenant.name).await?;
    let resources: Api<MyResource> = Api::namespaced(as_tenant.clone(), &tenant.name);
    let ready = |name: &'static str| {
        let resources = resources.clone();
        async move {
            eventually(Duration::from_secs(120), &format!("MyResource {name} Ready"), || async {
                let resource = resources.get(name).await?;
                Ok((resource.status.as_ref().and_then(|s| s.phase) == Some(Phase::Ready)).then_some(resource))
            })
            .await
        }
    };
    let own = MyResource::new("own", MyResourceSpec { message: "mine".into() });
    resources.create(&PostParams::default(), &own).await?;
    let own = ready("own").await?;
    eventually(Duration::from_secs(60), "two Ready replicas", || async {
        Ok((ready_pods(&f, release).await?.len() == 2).then_some(()))
    })
    .await?;
    let before = resident_memory(&f, release, &reader).await?;

    let config_maps: Api<ConfigMap> = Api::namespaced(as_tenant.clone(), &tenant.name);
    let uid = own.uid().context("a uid")?;
    let creates = (0..60).map(|i| {
        let config_maps = config_maps.clone();
        let owner = match i % 3 {
            0 => None,
            1 => Some(controller_reference("missing", "00000000-0000-0000-0000-000000000000")),
            _ => Some(controller_reference("own", &uid)),
        };
        async move {
            let config_map = large_config_map(&format!("filler-{i:02}"), 3_900, owner)?;
            let size = serde_json::to_vec(&config_map)?.len();
            ensure!(size > 950_000, "{size} bytes");
            config_maps.create(&PostParams::default(), &config_map).await?;
            anyhow::Ok(())
        }
    });
    futures::stream::iter(creates).buffer_unordered(4).collect::<Vec<_>>().await.into_iter().collect::<Result<()>>()?;
    // A resource created after them converges only once the operator's ConfigMap watch has
    // delivered every one of them (a watch delivers in order).
    resources.create(&PostParams::default(), &MyResource::new("after", MyResourceSpec { message: "x".into() })).await?;
    ready("after").await?;

    let after = resident_memory(&f, release, &reader).await?;
    for (pod, bytes) in &after {
        let grown = bytes - before.get(pod).copied().unwrap_or_default();
        println!("{pod}: {:.1} MiB, grew {:.1} MiB", bytes / MIB, grown / MIB);
        ensure!(*bytes < MEMORY_LIMIT / 2.0, "{pod} holds {:.1} MiB", bytes / MIB);
        ensure!(grown < 32.0 * MIB, "{pod} grew {:.1} MiB with 60 MB of a tenant's ConfigMaps", grown / MIB);
    }
    let pods = ready_pods(&f, release).await?;
    ensure!(pods.len() == 2 && pods.iter().all(|pod| pod.restarts == 0), "{pods:?}");

    // The standby, restarted over them, lists every labelled ConfigMap again.
    let leader = f.lease_holder(&format!("{release}-example-operator-leader")).await?;
    let standby = pods.iter().map(|pod| pod.name.clone()).find(|name| Some(name) != leader.as_ref());
    let deleted = standby.context("a standby Pod")?;
    Api::<Pod>::namespaced(f.client.clone(), f.ns()).delete(&deleted, &DeleteParams::default()).await?;
    let replaced = eventually(Duration::from_secs(120), "a replacement Ready over the ConfigMaps", || async {
        let pods = ready_pods(&f, release).await?;
        Ok((pods.len() == 2 && pods.iter().all(|pod| pod.name != deleted)).then_some(pods))
    })
    .await?;
    let memory = resident_memory(&f, release, &reader).await?;
    for ReadyPod { name, restarts, .. } in &replaced {
        let bytes = memory.get(name).copied().unwrap_or_default();
        println!("after the restart, {name}: {:.1} MiB", bytes / MIB);
        ensure!(*restarts == 0 && bytes < MEMORY_LIMIT / 2.0, "{name}: {:.1} MiB, {restarts} restarts", bytes / MIB);
    }
    let _ = f.cluster.kubectl(&["delete", "clusterrolebinding", &binding]);
    drop(uninstall);
    tenant.delete().await
}

/// Uninstalls the release when dropped (a failed test leaves no cluster-wide objects behind).
fn uninstall_on_drop<'a>(f: &'a Fixture, release: &'a str) -> impl Drop + 'a {
    struct Uninstall<'a>(&'a Fixture, &'a str);
    impl Drop for Uninstall<'_> {
        fn drop(&mut self) {
            let _ = e2e_tests::helm(&self.0.cluster, &["uninstall", self.1, "--namespace", self.0.ns(), "--wait"]);
        }
    }
    Uninstall(f, release)
}

/// A broadcast selecting namespaces by name.
fn broadcast(name: &str, config_map_name: &str, message: &str, namespaces: &[&str]) -> MessageBroadcast {
    let selector = LabelSelector {
        match_expressions: Some(vec![LabelSelectorRequirement {
            key: "kubernetes.io/metadata.name".into(),
            operator: "In".into(),
            values: Some(namespaces.iter().map(|&ns| ns.to_owned()).collect()),
        }]),
        match_labels: None,
    };
    MessageBroadcast::new(
        name,
        MessageBroadcastSpec {
            message: message.into(),
            namespace_selector: selector,
            config_map_name: Some(config_map_name.into()),
        },
    )
}

/// The Ready condition's reason and message once the broadcast's status describes its spec.
async fn settled(api: &Api<MessageBroadcast>, name: &str, reason: &str) -> Result<String> {
    eventually(CONVERGE, &format!("broadcast {name} to say {reason}"), || async {
        let broadcast = api.get(name).await?;
        let status = broadcast.status.unwrap_or_default();
        let ready = status.conditions.into_iter().find(|c| c.type_ == "Ready");
        let current = status.observed_generation == broadcast.metadata.generation;
        Ok(ready.filter(|ready| current && ready.reason == reason).map(|ready| ready.message))
    })
    .await
}

/// SPEC §9, as the issue measured it: a broadcast aimed at kube-system under a name nobody has
/// taken there writes nothing there; a broadcast never deletes or strips what an administrator
/// wrote (a ConfigMap of the name that was there first, keys added to a copy); a reserved name is
/// Failed without a write; past the byte cap a broadcast is Failed and its copies stay as they
/// were. The chart's policies are not installed here: this is the operator's own line.
#[tokio::test]
async fn a_broadcast_writes_nothing_where_it_may_not_and_never_removes_what_others_wrote() -> Result<()> {
    let _one = ONE_AT_A_TIME.lock().await;
    let f = Fixture::new("tenant-broadcast").await?;
    let other = TestNamespace::create(&f.client, "tenant-other").await?;
    let tenancy = Tenancy { broadcast_max_bytes: 4_000, ..Tenancy::default() };
    let settings = reconcilers::Settings { tenancy: std::sync::Arc::new(tenancy), ..Default::default() };
    let controllers = RunningControllers::start(&f.cluster.admin_kubeconfig, settings).await?;
    let api: Api<MessageBroadcast> = Api::all(f.client.clone());
    let suffix = &f.ns()[f.ns().len() - 6..];
    let name = format!("coredns-custom-{suffix}");

    // The administrator's ConfigMap of that name in kube-system and in `other`, there first.
    let admins = |namespace: &str| Api::<ConfigMap>::namespaced(f.client.clone(), namespace);
    let theirs: ConfigMap = serde_json::from_value(json!({"metadata": {"name": name}, "data": {"Corefile": "admin"}}))?;
    for namespace in ["kube-system", other.name.as_str()] {
        admins(namespace).create(&PostParams::default(), &theirs).await?;
    }
    let targets = [f.ns(), other.name.as_str(), "kube-system", "kube-public"];
    api.create(&PostParams::default(), &broadcast(&name, &name, "hello", &targets)).await?;
    let said = settled(&api, &name, "ConfigMapConflict").await?;
    ensure!(said.contains(&other.name) && !said.contains("kube-system"), "{said}");
    let copy = admins(f.ns()).get(&name).await?;
    ensure!(copy.data.as_ref().and_then(|d| d.get("message")).map(String::as_str) == Some("hello"));
    ensure!(admins("kube-public").get_opt(&name).await?.is_none(), "a copy in kube-public");

    // The administrator adds a key to the copy with kubectl apply; a later repair keeps it.
    let applied = json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": name, "namespace": f.ns()},
        "data": {"message": "hello", "admin-key": "kept"},
    });
    succeeded(f.cluster.kubectl_with_input(&["apply", "-f", "-"], Some(&applied.to_string()))?)?;
    let message = json!({"spec": {"message": "hello again"}});
    api.patch(&name, &PatchParams::default(), &Patch::Merge(&message)).await?;
    let repaired = eventually(CONVERGE, "the copy to hold the new message", || async {
        let copy = admins(f.ns()).get(&name).await?;
        let data = copy.data.clone().unwrap_or_default();
        Ok((data.get("message").map(String::as_str) == Some("hello again")).then_some(data))
    })
    .await?;
    ensure!(
        repaired.get("admin-key").map(String::as_str) == Some("kept"),
        "the administrator's key went: {repaired:?}"
    );

    // Past the cap (2,100 bytes × 2 matched namespaces, the protected ones not counted): Failed,
    // and the copy keeps its message.
    let large = json!({"spec": {"message": "y".repeat(2_100)}});
    api.patch(&name, &PatchParams::default(), &Patch::Merge(&large)).await?;
    let said = settled(&api, &name, "BroadcastTooLarge").await?;
    ensure!(said.contains("more than the limit of 4000 bytes"), "{said}");
    let copy = admins(f.ns()).get(&name).await?;
    ensure!(copy.data.as_ref().and_then(|d| d.get("message")).map(String::as_str) == Some("hello again"));

    // Deleting the broadcast removes its copy and nothing of the administrator's.
    api.delete(&name, &DeleteParams::foreground()).await?;
    eventually(CONVERGE, "the broadcast and its copy to go", || async {
        let gone = api.get_opt(&name).await?.is_none() && admins(f.ns()).get_opt(&name).await?.is_none();
        Ok(gone.then_some(()))
    })
    .await?;
    for namespace in ["kube-system", other.name.as_str()] {
        let kept = admins(namespace).get(&name).await?;
        let data = kept.data.unwrap_or_default();
        ensure!(data.get("Corefile").map(String::as_str) == Some("admin"), "{namespace}: {data:?}");
        ensure!(kept.metadata.owner_references.is_none(), "{namespace}: the operator took it over");
        admins(namespace).delete(&name, &DeleteParams::default()).await?;
    }

    // A reserved name: Failed, and kube-root-ca.crt (kube-controller-manager's) untouched.
    let reserved = format!("reserved-{suffix}");
    api.create(&PostParams::default(), &broadcast(&reserved, "kube-root-ca.crt", "x", &[f.ns()])).await?;
    let said = settled(&api, &reserved, "ReservedConfigMapName").await?;
    ensure!(said.contains("kube-root-ca.crt"), "{said}");
    let root = admins(f.ns()).get("kube-root-ca.crt").await?;
    ensure!(root.metadata.owner_references.is_none() && !root.labels().contains_key(MANAGED_BY), "{root:?}");
    api.delete(&reserved, &DeleteParams::default()).await?;
    controllers.stop().await?;
    other.delete().await?;
    f.namespace.delete().await
}

/// A MyResource in a protected namespace is Failed and gets no ConfigMap.
#[tokio::test]
async fn a_my_resource_in_a_protected_namespace_is_failed_without_a_write() -> Result<()> {
    let _one = ONE_AT_A_TIME.lock().await;
    let f = Fixture::new("tenant-protected").await?;
    let mut tenancy = Tenancy::default();
    tenancy.protected_namespaces.insert(f.ns().to_owned());
    let settings = reconcilers::Settings {
        watch_namespace: Some(f.ns().to_owned()),
        tenancy: std::sync::Arc::new(tenancy),
        ..Default::default()
    };
    let controllers = RunningControllers::start(&f.cluster.admin_kubeconfig, settings).await?;
    f.create("shielded", "x").await?;
    let status = eventually(CONVERGE, "the resource to be Failed", || async {
        let status = f.resources.get("shielded").await?.status.unwrap_or_default();
        Ok((status.phase == Some(Phase::Failed)).then_some(status))
    })
    .await?;
    let ready = status.conditions.first().context("a Ready condition")?;
    ensure!(ready.reason == "NamespaceProtected", "{ready:?}");
    ensure!(f.config_maps.get_opt("shielded-configmap").await?.is_none(), "a ConfigMap in a protected namespace");
    controllers.stop().await?;
    f.namespace.delete().await
}

/// An owned ConfigMap whose controller reference someone re-points at another MyResource, or
/// removes, is no longer the first one's: that one says so (ConfigMapConflict) within seconds,
/// not at the next resync, as the ConfigMap's former owner hears of the change.
#[tokio::test]
async fn an_owned_config_map_taken_from_its_owner_is_reported_by_that_owner_at_once() -> Result<()> {
    let _one = ONE_AT_A_TIME.lock().await;
    let f = Fixture::new("tenant-repoint").await?;
    let controllers = RunningControllers::start_in(&f.cluster, f.ns()).await?;
    for name in ["first", "second", "third"] {
        f.create(name, name).await?;
        f.wait_ready(name, CONVERGE).await?;
    }
    let second = f.resources.get("second").await?;
    let uid = second.uid().context("a uid")?;
    let repoint = json!({"metadata": {"ownerReferences": [controller_reference("second", &uid)]}});
    f.config_maps.patch("first-configmap", &PatchParams::default(), &Patch::Merge(&repoint)).await?;
    let removed = json!({"metadata": {"ownerReferences": null}});
    f.config_maps.patch("third-configmap", &PatchParams::default(), &Patch::Merge(&removed)).await?;
    for name in ["first", "third"] {
        eventually(Duration::from_secs(20), &format!("{name} to report the conflict"), || async {
            let status = f.resources.get(name).await?.status.unwrap_or_default();
            let reason = status.conditions.first().map(|ready| ready.reason.clone());
            Ok((reason.as_deref() == Some("ConfigMapConflict")).then_some(()))
        })
        .await?;
    }
    controllers.stop().await?;
    f.namespace.delete().await
}
