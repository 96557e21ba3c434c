//! The MessageBroadcast controller against the local control plane. It is cluster-wide by nature,
//! so the tests of this file run one at a time (cargo runs test files one after another, and a
//! lock serialises the tests inside this one).

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use crd_types::{ConditionStatus, MessageBroadcast, MessageBroadcastSpec};
use e2e_tests::webhook::{Verdict, Webhook};
use e2e_tests::{RunningControllers, TestCluster, TestNamespace, eventually, install_crds};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use reconcilers::Settings;
use serde_json::json;
use tokio::sync::Mutex;

static ONE_AT_A_TIME: Mutex<()> = Mutex::const_new(());
const CONVERGE: Duration = Duration::from_secs(60);

async fn start_broadcast_controller(cluster: &TestCluster) -> Result<RunningControllers> {
    let settings = Settings::only(reconcilers::message_broadcast::CONTROLLER);
    RunningControllers::start(&cluster.admin_kubeconfig, settings).await
}

fn unique(prefix: &str) -> String {
    format!("{prefix}-{:06x}", rand::random::<u32>() & 0xff_ffff)
}

async fn label_namespace(client: &Client, namespace: &str, key: &str, value: Option<&str>) -> Result<()> {
    let patch = json!({"metadata": {"labels": {key: value}}});
    Api::<Namespace>::all(client.clone()).patch(namespace, &PatchParams::default(), &Patch::Merge(patch)).await?;
    Ok(())
}

async fn create_broadcast(client: &Client, name: &str, selector: LabelSelector, config_map: &str) -> Result<()> {
    let broadcast = MessageBroadcast::new(
        name,
        MessageBroadcastSpec {
            message: format!("broadcast {name}"),
            namespace_selector: selector,
            config_map_name: Some(config_map.to_owned()),
        },
    );
    Api::<MessageBroadcast>::all(client.clone()).create(&PostParams::default(), &broadcast).await?;
    Ok(())
}

/// Namespaces that hold a ConfigMap `name` owned by a MessageBroadcast.
async fn namespaces_with_copy(client: &Client, name: &str) -> Result<BTreeSet<String>> {
    let all: Api<ConfigMap> = Api::all(client.clone());
    let list = all.list(&ListParams::default().fields(&format!("metadata.name={name}"))).await?;
    Ok(list
        .items
        .iter()
        .filter(|cm| cm.owner_references().iter().any(|o| o.kind == "MessageBroadcast"))
        .filter_map(|cm| cm.namespace())
        .collect())
}

/// Waits until the broadcast's status reports `matched` / `ready` for its current generation.
async fn wait_for_counts(client: &Client, name: &str, matched: u32, ready: u32) -> Result<MessageBroadcast> {
    let api: Api<MessageBroadcast> = Api::all(client.clone());
    eventually(CONVERGE, &format!("broadcast {name} to report {ready}/{matched}"), || async {
        let broadcast = api.get(name).await?;
        let status = broadcast.status.clone().unwrap_or_default();
        let current = status.observed_generation == broadcast.metadata.generation;
        Ok((current && status.matched_namespaces == matched && status.ready_namespaces == ready).then_some(broadcast))
    })
    .await
}

/// Deletes the broadcast and waits until the garbage collector removed every copy.
async fn delete_and_wait_for_copies_to_go(client: &Client, name: &str) -> Result<()> {
    Api::<MessageBroadcast>::all(client.clone()).delete(name, &DeleteParams::default()).await?;
    eventually(CONVERGE, "every copy to be garbage collected", || async {
        Ok(namespaces_with_copy(client, name).await?.is_empty().then_some(()))
    })
    .await
}

fn selector(key: &str, value: &str) -> LabelSelector {
    LabelSelector { match_labels: Some([(key.to_owned(), value.to_owned())].into()), match_expressions: None }
}

/// What every test here starts with: its turn (the tests run one at a time), the cluster, an
/// admin client with the CRDs installed, and a label `key` with a value unique to the test: the
/// namespaces labelled with it are the test's audience.
struct Fixture {
    _turn: tokio::sync::MutexGuard<'static, ()>,
    cluster: TestCluster,
    client: Client,
    key: &'static str,
    audience: String,
}

impl Fixture {
    async fn new(key: &'static str, prefix: &str) -> Result<Self> {
        let turn = ONE_AT_A_TIME.lock().await;
        let cluster = TestCluster::get()?;
        let client = cluster.admin_client().await?;
        install_crds(&client).await?;
        Ok(Self { _turn: turn, cluster, client, key, audience: unique(prefix) })
    }

    /// A fresh namespace, labelled into the audience.
    async fn selected_namespace(&self, prefix: &str) -> Result<TestNamespace> {
        let namespace = TestNamespace::create(&self.client, prefix).await?;
        self.select(&namespace.name, true).await?;
        Ok(namespace)
    }

    /// Labels `namespace` into the audience, or removes the label.
    async fn select(&self, namespace: &str, selected: bool) -> Result<()> {
        label_namespace(&self.client, namespace, self.key, selected.then_some(self.audience.as_str())).await
    }

    /// The selector of the audience.
    fn selector(&self) -> LabelSelector {
        selector(self.key, &self.audience)
    }

    /// Creates a broadcast to the audience, named `unique(prefix)` like its ConfigMap.
    async fn broadcast(&self, prefix: &str) -> Result<String> {
        let name = unique(prefix);
        create_broadcast(&self.client, &name, self.selector(), &name).await?;
        Ok(name)
    }

    async fn start_controllers(&self) -> Result<RunningControllers> {
        start_broadcast_controller(&self.cluster).await
    }
}

#[tokio::test]
async fn copies_follow_the_selector_and_leave_with_the_broadcast() -> Result<()> {
    let f = Fixture::new("e2e.example.com/audience", "team").await?;
    let client = f.client.clone();
    let first = f.selected_namespace("mb-a").await?;
    let second = f.selected_namespace("mb-b").await?;
    let outsider = TestNamespace::create(&client, "mb-out").await?;
    let controllers = f.start_controllers().await?;

    let name = f.broadcast("notice").await?;
    let broadcast = wait_for_counts(&client, &name, 2, 2).await?;
    let ready = broadcast.status.and_then(|s| s.conditions.into_iter().next()).context("Ready condition")?;
    ensure!(ready.status == ConditionStatus::True && ready.reason == "CopiesSynced", "{ready:?}");
    let holders = namespaces_with_copy(&client, &name).await?;
    ensure!(holders == BTreeSet::from([first.name.clone(), second.name.clone()]), "copies in {holders:?}");
    let copy = Api::<ConfigMap>::namespaced(client.clone(), &first.name).get(&name).await?;
    ensure!(copy.data.and_then(|d| d.get("message").cloned()) == Some(format!("broadcast {name}")));

    // A namespace created (here: labelled) into the selector gets its copy.
    f.select(&outsider.name, true).await?;
    wait_for_counts(&client, &name, 3, 3).await?;
    ensure!(namespaces_with_copy(&client, &name).await?.contains(&outsider.name));

    // Relabelled out of the selector: its copy is removed.
    f.select(&first.name, false).await?;
    wait_for_counts(&client, &name, 2, 2).await?;
    eventually(CONVERGE, "the copy to leave the relabelled namespace", || async {
        Ok((!namespaces_with_copy(&client, &name).await?.contains(&first.name)).then_some(()))
    })
    .await?;

    // A brand-new namespace that matches gets a copy.
    let late = f.selected_namespace("mb-late").await?;
    wait_for_counts(&client, &name, 3, 3).await?;

    // Restarted controllers over an in-sync cluster write nothing.
    controllers.stop().await?;
    let restarted = f.start_controllers().await?;
    eventually(CONVERGE, "the restarted controller to reconcile", || async {
        Ok((restarted.metrics.reconciles("messagebroadcast") >= 1).then_some(()))
    })
    .await?;
    ensure!(restarted.metrics.write_requests() == 0, "writes after restart: {}", restarted.metrics.request_summary());

    // Deleting the broadcast removes every copy (garbage collector, cluster-scoped owner).
    delete_and_wait_for_copies_to_go(&client, &name).await?;
    restarted.stop().await?;
    for namespace in [first, second, outsider, late] {
        namespace.delete().await?;
    }
    Ok(())
}

#[tokio::test]
async fn an_empty_selector_covers_every_active_namespace_but_the_protected_ones() -> Result<()> {
    let f = Fixture::new("e2e.example.com/unused", "everyone").await?;
    let client = f.client.clone();
    let controllers = f.start_controllers().await?;
    let name = unique("everyone");
    create_broadcast(&client, &name, LabelSelector::default(), &name).await?;

    let protected = reconcilers::tenancy::DEFAULT_PROTECTED_NAMESPACES.map(String::from);
    let namespaces: Api<Namespace> = Api::all(client.clone());
    eventually(CONVERGE, "a copy in every Active namespace but the protected ones", || async {
        let active: BTreeSet<String> = namespaces
            .list(&ListParams::default())
            .await?
            .items
            .iter()
            .filter(|ns| ns.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Active"))
            .map(|ns| ns.name_any())
            .filter(|ns| !protected.contains(ns))
            .collect();
        let holders = namespaces_with_copy(&client, &name).await?;
        let status = Api::<MessageBroadcast>::all(client.clone()).get(&name).await?.status.unwrap_or_default();
        let counted =
            status.matched_namespaces as usize == active.len() && status.ready_namespaces == status.matched_namespaces;
        let said = status.conditions.first().is_some_and(|ready| {
            ready.message.ends_with("protected namespaces receive no copy: kube-node-lease, kube-public, kube-system")
        });
        Ok((active.is_subset(&holders) && counted && said).then_some(holders))
    })
    .await
    .and_then(|holders| {
        let written: Vec<&String> = holders.iter().filter(|ns| protected.contains(ns)).collect();
        ensure!(written.is_empty(), "copies in protected namespaces: {written:?}");
        Ok(())
    })?;
    delete_and_wait_for_copies_to_go(&client, &name).await?;
    controllers.stop().await
}

#[tokio::test]
async fn a_foreign_config_map_is_reported_as_a_conflict_and_left_alone() -> Result<()> {
    let f = Fixture::new("e2e.example.com/audience", "team").await?;
    let client = f.client.clone();
    let free = f.selected_namespace("mb-free").await?;
    let taken = f.selected_namespace("mb-taken").await?;
    let name = unique("memo");
    let foreign: ConfigMap = serde_json::from_value(json!({"metadata": {"name": name}, "data": {"message": "local"}}))?;
    let foreign =
        Api::<ConfigMap>::namespaced(client.clone(), &taken.name).create(&PostParams::default(), &foreign).await?;
    let controllers = f.start_controllers().await?;

    create_broadcast(&client, &name, f.selector(), &name).await?;
    let broadcast = wait_for_counts(&client, &name, 2, 1).await?;
    let ready = broadcast.status.and_then(|s| s.conditions.into_iter().next()).context("Ready condition")?;
    ensure!(ready.status == ConditionStatus::False && ready.reason == "ConfigMapConflict", "{ready:?}");
    ensure!(ready.message.contains(&taken.name) && !ready.message.contains(&free.name), "{}", ready.message);
    let after = Api::<ConfigMap>::namespaced(client.clone(), &taken.name).get(&name).await?;
    ensure!(after.metadata.resource_version == foreign.metadata.resource_version, "the foreign ConfigMap was modified");

    Api::<MessageBroadcast>::all(client.clone()).delete(&name, &DeleteParams::default()).await?;
    controllers.stop().await?;
    free.delete().await?;
    taken.delete().await
}

/// The broadcast's Ready condition, for its current generation.
async fn wait_for_ready_reason(client: &Client, name: &str, reason: &str) -> Result<String> {
    let api: Api<MessageBroadcast> = Api::all(client.clone());
    eventually(CONVERGE, &format!("broadcast {name} to report {reason}"), || async {
        let broadcast = api.get(name).await?;
        let status = broadcast.status.clone().unwrap_or_default();
        let current = status.observed_generation == broadcast.metadata.generation;
        let condition = status.conditions.into_iter().find(|c| c.type_ == "Ready" && c.reason == reason);
        Ok(condition.filter(|_| current).map(|c| c.message))
    })
    .await
}

#[tokio::test]
async fn selector_and_name_changes_move_the_copies_and_bad_or_competing_broadcasts_say_why() -> Result<()> {
    // The fixture's audience is the red team.
    let f = Fixture::new("e2e.example.com/team", "red").await?;
    let (client, key, red, blue) = (f.client.clone(), f.key, f.audience.clone(), unique("blue"));
    let in_red = f.selected_namespace("mb-red").await?;
    let in_blue = TestNamespace::create(&client, "mb-blue").await?;
    label_namespace(&client, &in_blue.name, key, Some(&blue)).await?;
    let controllers = f.start_controllers().await?;
    let api: Api<MessageBroadcast> = Api::all(client.clone());

    // A selector change moves the copy from red to blue.
    let name = f.broadcast("moving").await?;
    wait_for_counts(&client, &name, 1, 1).await?;
    let change = json!({"spec": {"namespaceSelector": {"matchLabels": {key: &blue}}}});
    api.patch(&name, &PatchParams::default(), &Patch::Merge(change)).await?;
    wait_for_counts(&client, &name, 1, 1).await?;
    eventually(CONVERGE, "the copy to move to the blue namespace", || async {
        let holders = namespaces_with_copy(&client, &name).await?;
        Ok((holders == BTreeSet::from([in_blue.name.clone()])).then_some(()))
    })
    .await?;

    // A configMapName change replaces the copy under the new name.
    let renamed = format!("{name}-renamed");
    let change = json!({"spec": {"configMapName": &renamed}});
    api.patch(&name, &PatchParams::default(), &Patch::Merge(change)).await?;
    eventually(CONVERGE, "the copy to be renamed", || async {
        let old = namespaces_with_copy(&client, &name).await?;
        let new = namespaces_with_copy(&client, &renamed).await?;
        Ok((old.is_empty() && new == BTreeSet::from([in_blue.name.clone()])).then_some(()))
    })
    .await?;

    // A second broadcast wanting the same ConfigMap name in the same namespace does not take the
    // first one's copy: it reports the conflict.
    let rival = unique("rival");
    create_broadcast(&client, &rival, selector(key, &blue), &renamed).await?;
    let message = wait_for_ready_reason(&client, &rival, "ConfigMapConflict").await?;
    ensure!(message.contains(&in_blue.name), "the conflict names the namespace: {message}");
    let copy = Api::<ConfigMap>::namespaced(client.clone(), &in_blue.name).get(&renamed).await?;
    ensure!(copy.owner_references().iter().any(|o| o.name == name), "the first broadcast keeps its copy");

    // An invalid selector: Ready=False with the reason, and nothing copied.
    let invalid = unique("invalid");
    let bad = LabelSelector {
        match_labels: None,
        match_expressions: Some(vec![k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement {
            key: key.to_owned(),
            operator: "Resembles".to_owned(),
            values: Some(vec![red.clone()]),
        }]),
    };
    create_broadcast(&client, &invalid, bad, &invalid).await?;
    let message = wait_for_ready_reason(&client, &invalid, "InvalidSelector").await?;
    ensure!(message.contains("Resembles"), "the message says what is wrong: {message}");
    ensure!(namespaces_with_copy(&client, &invalid).await?.is_empty());

    for broadcast in [&rival, &invalid] {
        api.delete(broadcast, &DeleteParams::default()).await?;
    }
    delete_and_wait_for_copies_to_go(&client, &name).await?;
    controllers.stop().await?;
    in_red.delete().await?;
    in_blue.delete().await
}

/// `kubectl apply` (or `delete`) of the admission policy `manifest`.
fn kubectl_policy(cluster: &TestCluster, verb: &str, manifest: &str) -> Result<()> {
    let output = cluster.kubectl_with_input(&[verb, "-f", "-"], Some(manifest))?;
    ensure!(output.status.success(), "kubectl {verb}: {}", String::from_utf8_lossy(&output.stderr));
    Ok(())
}

/// An admission policy that denies deleting ConfigMaps labelled `e2e.example.com/hold=<hold>`
/// in `namespace`: it holds a copy in place while the test changes the world around it.
fn hold_policy(name: &str, namespace: &str, hold: &str) -> String {
    format!(
        r#"apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingAdmissionPolicy
metadata:
  name: {name}
spec:
  failurePolicy: Fail
  matchConstraints:
    resourceRules:
      - apiGroups: [""]
        apiVersions: ["v1"]
        operations: ["DELETE"]
        resources: ["configmaps"]
  validations:
    - expression: "!has(oldObject.metadata.labels) || !('e2e.example.com/hold' in oldObject.metadata.labels) || oldObject.metadata.labels['e2e.example.com/hold'] != '{hold}'"
      message: held by the test
---
apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingAdmissionPolicyBinding
metadata:
  name: {name}
spec:
  policyName: {name}
  validationActions: [Deny]
  matchResources:
    namespaceSelector:
      matchLabels:
        kubernetes.io/metadata.name: {namespace}
"#
    )
}

/// Removes the managed-by label from the copy `name`: it drops out of the operator's cache.
async fn unlabel(copies: &Api<ConfigMap>, name: &str) -> Result<()> {
    let unlabel = json!({"metadata": {"labels": {"app.kubernetes.io/managed-by": null}}});
    copies.patch(name, &PatchParams::default(), &Patch::Merge(unlabel)).await?;
    Ok(())
}

/// Waits until the unlabelled copy `name` is gone and the broadcast `name` counts no namespace.
async fn expect_unlabelled_copy_deleted(client: &Client, copies: &Api<ConfigMap>, name: &str) -> Result<()> {
    eventually(CONVERGE, "the unlabelled copy to be deleted", || async {
        Ok(copies.get_opt(name).await?.is_none().then_some(()))
    })
    .await?;
    wait_for_counts(client, name, 0, 0).await?;
    Ok(())
}

#[tokio::test]
async fn a_copy_that_lost_its_label_is_deleted_when_its_namespace_stops_matching() -> Result<()> {
    let f = Fixture::new("e2e.example.com/unlabelled", "gone").await?;
    let (cluster, client, audience) = (&f.cluster, f.client.clone(), &f.audience);
    let home = f.selected_namespace("mb-lost").await?;
    let controllers = f.start_controllers().await?;
    let name = f.broadcast("lost").await?;
    wait_for_counts(&client, &name, 1, 1).await?;

    // An admission policy holds the copy: the operator cannot delete it for now.
    let copies: Api<ConfigMap> = Api::namespaced(client.clone(), &home.name);
    let hold = json!({"metadata": {"labels": {"e2e.example.com/hold": audience}}});
    copies.patch(&name, &PatchParams::default(), &Patch::Merge(hold.clone())).await?;
    let decoy: ConfigMap = serde_json::from_value(json!({"metadata": {"name": "decoy"}}))?;
    copies.create(&PostParams::default(), &decoy).await?;
    copies.patch("decoy", &PatchParams::default(), &Patch::Merge(hold)).await?;
    let policy = hold_policy(&name, &home.name, audience);
    kubectl_policy(cluster, "apply", &policy)?;
    let dry_run = kube::api::DeleteParams { dry_run: true, ..Default::default() };
    eventually(CONVERGE, "the policy to hold ConfigMaps", || async {
        Ok(copies.delete("decoy", &dry_run).await.is_err().then_some(()))
    })
    .await?;

    // The namespace stops matching: deleting the copy is denied, and retried.
    f.select(&home.name, false).await?;
    let message = wait_for_ready_reason(&client, &name, "Reconciling").await?;
    ensure!(message.contains("held by the test"), "{message}");
    // The copy loses its managed-by label (it drops out of the operator's cache); then the
    // policy goes.
    unlabel(&copies, &name).await?;
    kubectl_policy(cluster, "delete", &policy)?;

    expect_unlabelled_copy_deleted(&client, &copies, &name).await?;
    Api::<MessageBroadcast>::all(client.clone()).delete(&name, &DeleteParams::default()).await?;
    controllers.stop().await?;
    home.delete().await
}

#[tokio::test]
async fn a_copy_that_lost_its_label_while_no_operator_ran_is_deleted_after_a_restart() -> Result<()> {
    let f = Fixture::new("e2e.example.com/restarted", "restart").await?;
    let client = f.client.clone();
    let home = f.selected_namespace("mb-restart").await?;
    let controllers = f.start_controllers().await?;
    let name = f.broadcast("restart").await?;
    wait_for_counts(&client, &name, 1, 1).await?;
    controllers.stop().await?;

    // With no operator running, the copy loses its managed-by label (a restarted operator's
    // cache never holds it) and its namespace stops matching.
    let copies: Api<ConfigMap> = Api::namespaced(client.clone(), &home.name);
    unlabel(&copies, &name).await?;
    f.select(&home.name, false).await?;

    let controllers = f.start_controllers().await?;
    expect_unlabelled_copy_deleted(&client, &copies, &name).await?;
    Api::<MessageBroadcast>::all(client.clone()).delete(&name, &DeleteParams::default()).await?;
    controllers.stop().await?;
    home.delete().await
}

/// An admission policy that denies creating ConfigMaps named `config_map` in the namespaces
/// labelled `key=value`, with a message that names the namespace.
fn deny_policy(name: &str, config_map: &str, key: &str, value: &str) -> String {
    format!(
        r#"apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingAdmissionPolicy
metadata:
  name: {name}
spec:
  failurePolicy: Fail
  matchConstraints:
    resourceRules:
      - apiGroups: [""]
        apiVersions: ["v1"]
        operations: ["CREATE"]
        resources: ["configmaps"]
  validations:
    - expression: "object.metadata.name != '{config_map}'"
      messageExpression: "'copies refused in ' + namespaceObject.metadata.name"
---
apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingAdmissionPolicyBinding
metadata:
  name: {name}
spec:
  policyName: {name}
  validationActions: [Deny]
  matchResources:
    namespaceSelector:
      matchLabels:
        {key}: "{value}"
"#
    )
}

/// How long the refusing webhook takes to answer for the namespace first by name.
const SLOW_ANSWER: Duration = Duration::from_millis(1500);

/// A webhook that refuses every create of a ConfigMap named `config_map` in the namespaces
/// labelled `key=value`, naming the namespace, and answers for `slow` only after
/// [`SLOW_ANSWER`]. So the namespace first by name fails last: a status that named whichever
/// failure came first would name another one.
async fn refusing_webhook(
    client: &Client,
    name: &str,
    config_map: &str,
    (key, value): (&str, &str),
    slow: &str,
) -> Result<Webhook> {
    let matching = json!({
        "rules": [{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"], "resources": ["configmaps"]}],
        "namespaceSelector": {"matchLabels": {key: value}},
        "matchConditions": [{"name": "copy", "expression": format!("object.metadata.name == '{config_map}'")}],
    });
    let slow = slow.to_owned();
    Webhook::start(client, name, matching, move |request| {
        let slow = slow.clone();
        async move {
            let namespace = request["namespace"].as_str().unwrap_or_default().to_owned();
            if namespace == slow {
                tokio::time::sleep(SLOW_ANSWER).await;
            }
            Verdict::Deny { code: 422, message: format!("copies refused in {namespace}") }
        }
    })
    .await
}

#[tokio::test]
async fn with_several_namespaces_failing_the_status_names_the_same_one_on_every_attempt() -> Result<()> {
    let f = Fixture::new("e2e.example.com/refusing", "refused").await?;
    let client = f.client.clone();
    let mut refusing = Vec::new();
    for _ in 0..3 {
        refusing.push(f.selected_namespace("mb-refuse").await?);
    }
    let first = refusing.iter().map(|ns| ns.name.clone()).min().context("a namespace")?;
    let name = unique("refused");
    let webhook = refusing_webhook(&client, &name, &name, (f.key, &f.audience), &first).await?;
    let probe = Api::<ConfigMap>::namespaced(client.clone(), &refusing[0].name);
    let dry_run = PostParams { dry_run: true, ..Default::default() };
    let attempt: ConfigMap = serde_json::from_value(json!({"metadata": {"name": &name}}))?;
    eventually(CONVERGE, "the webhook to refuse copies", || async {
        Ok(probe.create(&dry_run, &attempt).await.is_err().then_some(()))
    })
    .await?;

    let controllers = f.start_controllers().await?;
    create_broadcast(&client, &name, f.selector(), &name).await?;
    // Each attempt waits for the slow answer; retries back off 0.5, 1, 2 s: watch the condition
    // through four attempts.
    let api: Api<MessageBroadcast> = Api::all(client.clone());
    let mut messages = BTreeSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(11);
    while tokio::time::Instant::now() < deadline {
        let broadcast = api.get(&name).await?;
        let condition = broadcast.status.and_then(|s| s.conditions.into_iter().find(|c| c.type_ == "Ready"));
        if let Some(condition) = condition {
            messages.insert(condition.message);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let retries =
        controllers.metrics.workqueue_retries_total.with_label_values(&["messagebroadcast", "messagebroadcast"]).get();
    ensure!(retries >= 3, "the broadcast was retried: {retries}");
    ensure!(messages.len() == 1, "the status flipped between namespaces: {messages:?}");
    let message = messages.into_iter().next().unwrap_or_default();
    ensure!(message.contains(&format!("copies refused in {first}")), "the first namespace is named: {message}");
    ensure!(
        message.starts_with("the API server answered 422: ") && !message.contains("Status {"),
        "readable: {message}"
    );

    api.delete(&name, &DeleteParams::default()).await?;
    webhook.stop().await?;
    controllers.stop().await?;
    for namespace in refusing {
        namespace.delete().await?;
    }
    Ok(())
}

#[tokio::test]
async fn a_namespace_that_begins_terminating_while_the_cache_lags_is_not_a_failure() -> Result<()> {
    use e2e_tests::fault_proxy::{Fault, FaultProxy};
    let f = Fixture::new("e2e.example.com/ending", "ending").await?;
    let (cluster, client) = (&f.cluster, f.client.clone());
    let staying = f.selected_namespace("mb-stay").await?;
    let ending = f.selected_namespace("mb-ending").await?;
    // The ending namespace is held in Terminating by a finalizer the test owns.
    let anchor: ConfigMap = serde_json::from_value(json!({
        "metadata": {"name": "anchor", "finalizers": ["e2e.example.com/hold"]},
    }))?;
    let in_ending: Api<ConfigMap> = Api::namespaced(client.clone(), &ending.name);
    in_ending.create(&PostParams::default(), &anchor).await?;
    // Copies are refused in the ending namespace for now: the operator retries with backoff.
    let name = unique("ending");
    let deny = format!("{name}-deny");
    let ending_only = "kubernetes.io/metadata.name";
    let policy = deny_policy(&deny, &name, ending_only, &ending.name);
    kubectl_policy(cluster, "apply", &policy)?;
    let dry_run = PostParams { dry_run: true, ..Default::default() };
    let attempt: ConfigMap = serde_json::from_value(json!({"metadata": {"name": &name}}))?;
    eventually(CONVERGE, "the policy to refuse copies", || async {
        Ok(in_ending.create(&dry_run, &attempt).await.is_err().then_some(()))
    })
    .await?;

    // The operator reaches the API server through a proxy the test can slow down.
    let proxy = FaultProxy::start(cluster.api_server_address().await?).await?;
    let via_proxy = cluster.admin_kubeconfig_via(proxy.port)?;
    let args = ["--controllers", "messagebroadcast", "--leader-elect=false"];
    let operator = e2e_tests::OperatorProcess::spawn_cluster_wide(&via_proxy, &name, &name, &staying.name, &args, &[])?;
    create_broadcast(&client, &name, f.selector(), &name).await?;
    let refused =
        wait_for_ready_reason(&client, &name, "Reconciling").await.map_err(|e| e.context(operator.log_text()))?;
    ensure!(refused.contains("copies refused"), "{refused}");

    // Everything the operator sees now arrives 6 s late: its cache still shows the namespace
    // Active when its next retry writes there, after the namespace began terminating.
    proxy.set(Fault::Delay(Duration::from_secs(6)));
    Api::<Namespace>::all(client.clone()).delete(&ending.name, &DeleteParams::default()).await?;
    kubectl_policy(cluster, "delete", &policy)?;

    let api: Api<MessageBroadcast> = Api::all(client.clone());
    let mut messages = BTreeSet::new();
    let settled =
        eventually(Duration::from_secs(90), "the broadcast to be Ready with the staying namespace", || async {
            let broadcast = api.get(&name).await?;
            let status = broadcast.status.unwrap_or_default();
            let ready = status.conditions.iter().any(|c| c.type_ == "Ready" && c.status == ConditionStatus::True);
            Ok((ready && status.matched_namespaces == 1 && status.ready_namespaces == 1).then_some(status))
        });
    let watch = async {
        loop {
            if let Ok(broadcast) = api.get(&name).await {
                for condition in broadcast.status.into_iter().flat_map(|s| s.conditions) {
                    messages.insert(condition.message);
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let settled = tokio::select! {
        settled = settled => settled,
        () = watch => unreachable!("the watch loop never ends"),
    };
    settled.map_err(|e| e.context(operator.log_text()))?;
    let terminating: Vec<&String> = messages.iter().filter(|m| m.contains("terminated")).collect();
    ensure!(terminating.is_empty(), "a terminating namespace was reported as a failure: {terminating:?}");

    proxy.set(Fault::None);
    api.delete(&name, &DeleteParams::default()).await?;
    drop(operator);
    let release = json!({"metadata": {"finalizers": null}});
    in_ending.patch("anchor", &PatchParams::default(), &Patch::Merge(release)).await?;
    staying.delete().await?;
    ending.delete().await
}
