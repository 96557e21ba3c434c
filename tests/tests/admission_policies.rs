//! The chart's two ValidatingAdmissionPolicies against the real API server, tried as an attacker
//! would: impersonated users who hold the chart's MessageBroadcast editor role, and the operator's
//! impersonated ServiceAccount (its token stolen). Each test applies one release's policies and
//! RBAC as `helm template` renders them (no operator runs: admission is what is tested), in
//! namespaces of its own, and waits (bounded) until the policies are in force before it checks
//! anything, so an admitted request proves the policy let it through.
//!
//! The broadcast policy matches every MessageBroadcast in the cluster, so another release's copy
//! of it (from another test) may be the one that answers: refusals of the author check are
//! recognised by any policy of the chart's name, and each release reserves a ConfigMap name of
//! its own so that its policy alone is seen refusing it.

use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use crd_types::{MessageBroadcast, MyResource, MyResourceSpec};
use e2e_tests::{TestCluster, TestNamespace, eventually, helm, install_crds, succeeded};
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::api::rbac::v1::{ClusterRoleBinding, Role, RoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::core::Status;
use kube::{Client, Config, Resource, ResourceExt};
use serde_json::json;

/// How long a new policy, binding or RBAC rule may take to count.
const IN_FORCE: Duration = Duration::from_secs(30);

/// The chart's reserved ConfigMap names default to the operator's own (values.yaml).
use reconcilers::tenancy::DEFAULT_RESERVED_CONFIG_MAP_NAMES as RESERVED;

const MANAGED_BY: &str = "app.kubernetes.io/managed-by";

/// One release's admission policies, the operator's ClusterRole and the MessageBroadcast editor
/// role, applied as rendered. Its cluster-scoped objects (and the bindings a test adds) carry the
/// release's instance label and are deleted when this is dropped, with its namespaces.
struct Policies {
    cluster: TestCluster,
    admin: Client,
    release: String,
    /// The release's namespace (where the operator's ServiceAccount would live).
    home: TestNamespace,
    /// A tenant's namespace.
    tenant: TestNamespace,
    /// A namespace the release protects through `tenancy.protectedNamespaces`.
    protected: TestNamespace,
    /// A reserved ConfigMap name only this release's broadcast policy refuses.
    own_reserved: String,
}

impl Policies {
    async fn install(prefix: &str) -> Result<Self> {
        let cluster = TestCluster::get()?;
        let admin = cluster.admin_client().await?;
        install_crds(&admin).await?;
        let home = TestNamespace::create(&admin, &format!("{prefix}-home")).await?;
        let tenant = TestNamespace::create(&admin, &format!("{prefix}-tenant")).await?;
        let protected = TestNamespace::create(&admin, &format!("{prefix}-protected")).await?;
        let suffix = &home.name[home.name.len() - 6..];
        let release = format!("adm-{suffix}");
        let own_reserved = format!("reserved-{suffix}");
        let policies = Self { cluster, admin, release, home, tenant, protected, own_reserved };

        let reserved = format!("tenancy.reservedConfigMapNames={{{},{}}}", RESERVED.join(","), policies.own_reserved);
        let protected = format!("tenancy.protectedNamespaces={{{}}}", policies.protected.name);
        let chart = e2e_tests::chart_dir().display().to_string();
        let rendered = succeeded(helm(
            &policies.cluster,
            &[
                "template",
                &policies.release,
                &chart,
                "--namespace",
                &policies.home.name,
                "--show-only",
                "templates/broadcast-policy.yaml",
                "--show-only",
                "templates/operator-policy.yaml",
                "--show-only",
                "templates/clusterrole.yaml",
                "--show-only",
                "templates/user-roles.yaml",
                // Only the MessageBroadcast editor role: nothing joins the built-in roles.
                "--set",
                "rbac.aggregateToDefaultRoles=false",
                "--set",
                &reserved,
                "--set",
                &protected,
            ],
        )?)?;
        for kind in ["ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"] {
            ensure!(rendered.matches(&format!("kind: {kind}\n")).count() == 2, "two of {kind}:\n{rendered}");
        }
        succeeded(policies.cluster.kubectl_with_input(&["apply", "-f", "-"], Some(&rendered))?)?;
        Ok(policies)
    }

    fn fullname(&self) -> String {
        format!("{}-example-operator", self.release)
    }

    fn broadcast_policy(&self) -> String {
        format!("{}-broadcast-authors", self.fullname())
    }

    fn operator_policy(&self) -> String {
        format!("{}-operator-configmaps", self.fullname())
    }

    /// The user name the API server gives the operator's ServiceAccount.
    fn operator_user(&self) -> String {
        format!("system:serviceaccount:{}:{}", self.home.name, self.fullname())
    }

    /// A client for `user` in `groups`, impersonated by the administrator.
    async fn client_as(&self, user: &str, groups: &[String]) -> Result<Client> {
        let kubeconfig = kube::config::Kubeconfig::read_from(&self.cluster.admin_kubeconfig)?;
        let mut config = Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await?;
        config.auth_info.impersonate = Some(user.to_owned());
        config.auth_info.impersonate_groups = (!groups.is_empty()).then(|| groups.to_vec());
        Ok(Client::try_from(config)?)
    }

    /// The operator's ServiceAccount, with the groups the API server gives a ServiceAccount token.
    async fn as_operator(&self) -> Result<Client> {
        let groups = [
            "system:serviceaccounts".to_owned(),
            format!("system:serviceaccounts:{}", self.home.name),
            "system:authenticated".to_owned(),
        ];
        self.client_as(&self.operator_user(), &groups).await
    }

    /// A user of this test (unique name), authenticated.
    async fn as_user(&self, user: &str) -> Result<Client> {
        self.client_as(user, &["system:authenticated".to_owned()]).await
    }

    /// A user name unique to this test.
    fn user(&self, role: &str) -> String {
        format!("{}-{role}", self.home.name)
    }

    /// Binds ClusterRole `role` to `user` cluster-wide (labelled as the release's, so it goes too).
    async fn bind(&self, role: &str, user: &str) -> Result<()> {
        let binding: ClusterRoleBinding = serde_json::from_value(json!({
            "metadata": {"name": format!("{user}-{role}"), "labels": {"app.kubernetes.io/instance": self.release}},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}],
        }))?;
        Api::<ClusterRoleBinding>::all(self.admin.clone()).create(&PostParams::default(), &binding).await?;
        Ok(())
    }

    /// A ClusterRole (labelled as the release's) that creates ConfigMaps in every namespace.
    async fn config_map_creator_role(&self) -> Result<String> {
        let name = format!("{}-configmap-creator", self.release);
        let role: k8s_openapi::api::rbac::v1::ClusterRole = serde_json::from_value(json!({
            "metadata": {"name": name, "labels": {"app.kubernetes.io/instance": self.release}},
            "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["create"]}],
        }))?;
        Api::<k8s_openapi::api::rbac::v1::ClusterRole>::all(self.admin.clone())
            .create(&PostParams::default(), &role)
            .await?;
        Ok(name)
    }

    /// Waits until this release's broadcast policy refuses its own reserved name.
    async fn broadcast_policy_in_force(&self) -> Result<()> {
        let broadcasts: Api<MessageBroadcast> = Api::all(self.admin.clone());
        let probe = broadcast(&format!("{}-probe", self.release), Some(&self.own_reserved))?;
        let policy = self.broadcast_policy();
        eventually(IN_FORCE, &format!("policy {policy} to be in force"), || async {
            match broadcasts.create(&dry_run(), &probe).await {
                Err(kube::Error::Api(status)) if status.message.contains(&format!("'{policy}'")) => Ok(Some(())),
                other => bail!("not refused by {policy} yet: {other:?}"),
            }
        })
        .await
    }

    /// Waits until this release's operator policy refuses the operator's ServiceAccount an
    /// unlabelled ConfigMap (which also waits for the operator's ClusterRole to count: without
    /// it the refusal would be RBAC's).
    async fn operator_policy_in_force(&self) -> Result<()> {
        let config_maps: Api<ConfigMap> = Api::namespaced(self.as_operator().await?, &self.tenant.name);
        let probe = config_map("probe", false, None)?;
        let policy = self.operator_policy();
        eventually(IN_FORCE, &format!("policy {policy} to be in force"), || async {
            match config_maps.create(&dry_run(), &probe).await {
                Err(kube::Error::Api(status)) if status.message.contains(&format!("'{policy}'")) => Ok(Some(())),
                other => bail!("not refused by {policy} yet: {other:?}"),
            }
        })
        .await
    }

    /// A MyResource in `namespace` (created as the administrator), to own ConfigMaps.
    async fn owner(&self, namespace: &str, name: &str) -> Result<MyResource> {
        let resources: Api<MyResource> = Api::namespaced(self.admin.clone(), namespace);
        let resource = MyResource::new(name, MyResourceSpec { message: "owner".into() });
        Ok(resources.create(&PostParams::default(), &resource).await?)
    }
}

impl Drop for Policies {
    fn drop(&mut self) {
        let label = format!("app.kubernetes.io/instance={}", self.release);
        let kinds = "validatingadmissionpolicybindings,validatingadmissionpolicies,clusterrolebindings,clusterroles";
        let _ = self.cluster.kubectl(&["delete", kinds, "-l", &label, "--ignore-not-found", "--wait=false"]);
        let _ =
            self.cluster.kubectl(&["delete", "messagebroadcasts", "-l", &label, "--ignore-not-found", "--wait=false"]);
    }
}

fn dry_run() -> PostParams {
    PostParams { dry_run: true, ..PostParams::default() }
}

/// A MessageBroadcast selecting no namespace (so no operator anywhere writes a copy).
fn broadcast(name: &str, config_map_name: Option<&str>) -> Result<MessageBroadcast> {
    let mut spec = json!({"message": "hello", "namespaceSelector": {"matchLabels": {"e2e.example.com/none": "none"}}});
    if let Some(config_map_name) = config_map_name {
        spec["configMapName"] = json!(config_map_name);
    }
    Ok(serde_json::from_value(json!({
        "apiVersion": "example.com/v1", "kind": "MessageBroadcast",
        "metadata": {"name": name},
        "spec": spec,
    }))?)
}

/// A ConfigMap `name`, with the operator's label when `labelled`, owned by `owner` when given.
fn config_map(name: &str, labelled: bool, owner: Option<OwnerReference>) -> Result<ConfigMap> {
    let mut metadata = json!({"name": name});
    if labelled {
        metadata["labels"] = json!({MANAGED_BY: "example-operator"});
    }
    if let Some(owner) = owner {
        metadata["ownerReferences"] = json!([owner]);
    }
    Ok(serde_json::from_value(json!({"metadata": metadata, "data": {"message": "hello"}}))?)
}

/// A controller reference to `resource` with `blockOwnerDeletion: true` (as controller-runtime's
/// controller references have it: foreground deletion then waits for the dependent).
fn controller_of(resource: &MyResource) -> Result<OwnerReference> {
    let owner = resource.controller_owner_ref(&()).context("the owner has a uid")?;
    Ok(OwnerReference { block_owner_deletion: Some(true), ..owner })
}

/// A controller reference to a `kind` of the operator's that need not exist (for requests that
/// are refused, or dry runs: nothing is stored for the garbage collector to act on).
fn made_up_controller(kind: &str) -> OwnerReference {
    OwnerReference {
        api_version: "example.com/v1".into(),
        kind: kind.into(),
        name: "made-up".into(),
        uid: "00000000-0000-0000-0000-000000000000".into(),
        controller: Some(true),
        block_owner_deletion: None,
    }
}

/// The API's refusal of `result`, or an error saying what got through.
fn refusal<T: std::fmt::Debug>(result: kube::Result<T>, what: &str) -> Result<Status> {
    match result {
        Err(kube::Error::Api(status)) => Ok(*status),
        other => bail!("{what} was not refused: {other:?}"),
    }
}

/// Fails unless `status` is policy `policy`'s denial with HTTP `code` and `message`.
fn refused_by(status: &Status, code: u16, policy: &str, message: &str) -> Result<()> {
    let expected = format!("ValidatingAdmissionPolicy '{policy}' with binding '{policy}' denied request: {message}");
    ensure!(status.code == code, "HTTP {} instead of {code}: {status:?}", status.code);
    ensure!(status.message.contains(&expected), "expected «{expected}» in {:?}", status.message);
    Ok(())
}

/// Fails unless `status` is a broadcast policy's (this release's or another's of the chart)
/// denial with HTTP `code` and `message`.
fn refused_by_a_broadcast_policy(status: &Status, code: u16, message: &str) -> Result<()> {
    ensure!(status.code == code, "HTTP {} instead of {code}: {status:?}", status.code);
    let policy = status
        .message
        .split("ValidatingAdmissionPolicy '")
        .nth(1)
        .and_then(|rest| rest.split('\'').next())
        .with_context(|| format!("a policy's denial: {:?}", status.message))?;
    ensure!(policy.ends_with("-example-operator-broadcast-authors"), "denied by {policy}: {:?}", status.message);
    ensure!(
        status.message.contains(&format!("denied request: {message}")),
        "expected «{message}» in {:?}",
        status.message
    );
    Ok(())
}

#[tokio::test]
async fn a_broadcast_editor_without_config_map_rights_can_neither_create_nor_retarget_a_broadcast() -> Result<()> {
    let p = Policies::install("adm-author").await?;
    p.broadcast_policy_in_force().await?;
    let author = p.user("author");
    p.bind(&format!("{}-messagebroadcast-editor", p.fullname()), &author).await?;
    let as_author: Api<MessageBroadcast> = Api::all(p.as_user(&author).await?);
    let refused = format!(
        "user {author} may not create ConfigMaps in every namespace: a MessageBroadcast writes a ConfigMap into \
         every namespace it selects, so only a user who may create ConfigMaps in all of them may create a \
         broadcast or change its spec"
    );

    // RBAC lets the editor write broadcasts (it reads them at once); the policy refuses.
    let name = format!("{}-by-author", p.release);
    eventually(IN_FORCE, "the editor role to count", || async { Ok(as_author.get_opt(&name).await.ok()) }).await?;
    let status =
        refusal(as_author.create(&PostParams::default(), &broadcast(&name, None)?).await, "the author's create")?;
    refused_by_a_broadcast_policy(&status, 403, &refused)?;
    ensure!(status.reason == "Forbidden", "{status:?}");
    let broadcasts: Api<MessageBroadcast> = Api::all(p.admin.clone());
    ensure!(broadcasts.get_opt(&name).await?.is_none(), "nothing was stored");

    // A broadcast someone entitled created: its spec cannot be changed by the editor, whatever
    // the change (every namespace selected, another message or name), but metadata can (not
    // matched, like the garbage collector's updates).
    let existing = format!("{}-existing", p.release);
    let mut entitled = broadcast(&existing, None)?;
    entitled.labels_mut().insert("app.kubernetes.io/instance".into(), p.release.clone());
    broadcasts.create(&PostParams::default(), &entitled).await?;
    for change in [
        json!({"spec": {"namespaceSelector": {"matchLabels": null}}}),
        json!({"spec": {"message": "changed"}}),
        json!({"spec": {"configMapName": "elsewhere"}}),
    ] {
        let status = refusal(
            as_author.patch(&existing, &PatchParams::default(), &Patch::Merge(&change)).await,
            &format!("the author's change {change}"),
        )?;
        refused_by_a_broadcast_policy(&status, 403, &refused)?;
    }
    let stored = broadcasts.get(&existing).await?;
    ensure!(
        stored.spec.message == "hello" && stored.spec.config_map_name.is_none(),
        "the spec is unchanged: {:?}",
        stored.spec
    );
    let annotated = json!({"metadata": {"annotations": {"e2e.example.com/note": "metadata only"}}});
    as_author.patch(&existing, &PatchParams::default(), &Patch::Merge(&annotated)).await?;
    Ok(())
}

#[tokio::test]
async fn a_broadcast_author_who_may_create_config_maps_everywhere_is_admitted() -> Result<()> {
    let p = Policies::install("adm-entitled").await?;
    p.broadcast_policy_in_force().await?;
    let author = p.user("entitled");
    p.bind(&format!("{}-messagebroadcast-editor", p.fullname()), &author).await?;
    p.bind(&p.config_map_creator_role().await?, &author).await?;
    let as_author: Api<MessageBroadcast> = Api::all(p.as_user(&author).await?);
    let name = format!("{}-entitled", p.release);
    let mut entitled = broadcast(&name, None)?;
    entitled.labels_mut().insert("app.kubernetes.io/instance".into(), p.release.clone());
    // The two bindings take a moment to count; until then the refusal is RBAC's or the policy's.
    eventually(IN_FORCE, "the author to be admitted", || async {
        Ok(as_author.create(&dry_run(), &entitled).await.ok().map(|_| ()))
    })
    .await?;
    as_author.create(&PostParams::default(), &entitled).await?;
    let change = json!({"spec": {"message": "changed", "namespaceSelector": {"matchLabels": {"e2e.example.com/other": "none"}}}});
    let changed = as_author.patch(&name, &PatchParams::default(), &Patch::Merge(&change)).await?;
    ensure!(changed.spec.message == "changed", "{:?}", changed.spec);
    Ok(())
}

#[tokio::test]
async fn reserved_config_map_names_are_refused_even_for_the_cluster_administrator() -> Result<()> {
    let p = Policies::install("adm-reserved").await?;
    p.broadcast_policy_in_force().await?;
    let broadcasts: Api<MessageBroadcast> = Api::all(p.admin.clone());
    let message = |name: &str| {
        format!(
            "configMapName {name} is reserved (chart value tenancy.reservedConfigMapNames): other components \
             publish or read ConfigMaps of that name"
        )
    };
    // The name this release added: refused by its own policy (HTTP 422, Invalid).
    let name = format!("{}-squatter", p.release);
    let status = refusal(
        broadcasts.create(&PostParams::default(), &broadcast(&name, Some(&p.own_reserved))?).await,
        "a broadcast with the release's reserved name",
    )?;
    refused_by(&status, 422, &p.broadcast_policy(), &message(&p.own_reserved))?;
    ensure!(status.reason == "Invalid", "{status:?}");
    // The defaults, named by configMapName or by the broadcast's own name (the default).
    for reserved in ["coredns", "kube-root-ca.crt", "aws-auth"] {
        let status = refusal(
            broadcasts.create(&PostParams::default(), &broadcast(&name, Some(reserved))?).await,
            &format!("configMapName {reserved}"),
        )?;
        refused_by_a_broadcast_policy(&status, 422, &message(reserved))?;
    }
    let status = refusal(
        broadcasts.create(&PostParams::default(), &broadcast("cluster-info", None)?).await,
        "a broadcast named cluster-info",
    )?;
    refused_by_a_broadcast_policy(&status, 422, &message("cluster-info"))?;
    // An explicit `configMapName: null` is no way around it: the CRD takes no null in the spec
    // (the API server drops it), so the name is the broadcast's own.
    let null_name = json!({
        "apiVersion": "example.com/v1", "kind": "MessageBroadcast",
        "metadata": {"name": "cluster-info"},
        "spec": {"message": "x", "namespaceSelector": {}, "configMapName": null},
    });
    let created = p.cluster.kubectl_with_input(&["create", "-f", "-"], Some(&null_name.to_string()))?;
    let said = String::from_utf8_lossy(&created.stderr);
    ensure!(!created.status.success() && said.contains(&message("cluster-info")), "configMapName: null: {said}");
    ensure!(broadcasts.get_opt(&name).await?.is_none() && broadcasts.get_opt("cluster-info").await?.is_none());

    // An existing broadcast cannot be renamed onto one either.
    let mut allowed = broadcast(&name, Some("harmless"))?;
    allowed.labels_mut().insert("app.kubernetes.io/instance".into(), p.release.clone());
    broadcasts.create(&PostParams::default(), &allowed).await?;
    let status = refusal(
        broadcasts
            .patch(&name, &PatchParams::default(), &Patch::Merge(json!({"spec": {"configMapName": p.own_reserved}})))
            .await,
        "renaming onto a reserved name",
    )?;
    refused_by(&status, 422, &p.broadcast_policy(), &message(&p.own_reserved))?;
    ensure!(broadcasts.get(&name).await?.spec.config_map_name.as_deref() == Some("harmless"));
    Ok(())
}

#[tokio::test]
async fn the_operators_token_cannot_create_change_delete_or_take_over_a_foreign_config_map() -> Result<()> {
    let p = Policies::install("adm-foreign").await?;
    p.operator_policy_in_force().await?;
    let policy = p.operator_policy();
    let owner = controller_of(&p.owner(&p.tenant.name, "owner").await?)?;
    let admins: Api<ConfigMap> = Api::namespaced(p.admin.clone(), &p.tenant.name);
    let stolen: Api<ConfigMap> = Api::namespaced(p.as_operator().await?, &p.tenant.name);
    let create_message = "the operator may create only ConfigMaps labelled app.kubernetes.io/managed-by=example-operator \
                          with a controller ownerReference to a MyResource or MessageBroadcast (example.com/v1)";
    let update_message = "the operator may change only ConfigMaps that already have its controller ownerReference (to a \
                          MyResource or MessageBroadcast), and must keep that reference and its label \
                          app.kubernetes.io/managed-by=example-operator";
    let delete_message = "the operator may delete only ConfigMaps with its controller ownerReference (to a MyResource or MessageBroadcast)";

    // Creates without the label, without the reference, or with a reference that is not a
    // controller's.
    let mut not_controller = owner.clone();
    not_controller.controller = Some(false);
    for (name, candidate) in [
        ("unlabelled", config_map("unlabelled", false, Some(owner.clone()))?),
        ("unowned", config_map("unowned", true, None)?),
        ("not-controlled", config_map("not-controlled", true, Some(not_controller))?),
    ] {
        let status = refusal(stolen.create(&PostParams::default(), &candidate).await, &format!("creating {name}"))?;
        refused_by(&status, 403, &policy, create_message)?;
        ensure!(admins.get_opt(name).await?.is_none(), "{name} was not stored");
    }

    // Someone else's ConfigMap: not patched, not deleted, not taken over by adding the label and
    // a controller reference in one patch.
    admins.create(&PostParams::default(), &config_map("foreign", false, None)?).await?;
    let status = refusal(
        stolen
            .patch("foreign", &PatchParams::default(), &Patch::Merge(json!({"data": {"message": "rewritten"}})))
            .await,
        "patching the foreign ConfigMap",
    )?;
    refused_by(&status, 403, &policy, update_message)?;
    let takeover = json!({"metadata": {"labels": {MANAGED_BY: "example-operator"}, "ownerReferences": [owner]}});
    let status =
        refusal(stolen.patch("foreign", &PatchParams::default(), &Patch::Merge(&takeover)).await, "taking it over")?;
    refused_by(&status, 403, &policy, update_message)?;
    let status = refusal(stolen.delete("foreign", &DeleteParams::default()).await, "deleting it")?;
    refused_by(&status, 403, &policy, delete_message)?;
    let foreign = admins.get("foreign").await?;
    ensure!(
        foreign.data.and_then(|d| d.get("message").cloned()).as_deref() == Some("hello")
            && foreign.metadata.owner_references.is_none()
            && foreign.metadata.labels.is_none(),
        "the foreign ConfigMap is as its owner left it"
    );

    // A foreign ConfigMap that merely wears the label is still foreign.
    admins.create(&PostParams::default(), &config_map("labelled-by-someone", true, None)?).await?;
    let status = refusal(
        stolen
            .patch("labelled-by-someone", &PatchParams::default(), &Patch::Merge(json!({"data": {"message": "x"}})))
            .await,
        "patching a labelled foreign ConfigMap",
    )?;
    refused_by(&status, 403, &policy, update_message)?;
    let status = refusal(stolen.delete("labelled-by-someone", &DeleteParams::default()).await, "deleting it")?;
    refused_by(&status, 403, &policy, delete_message)?;
    Ok(())
}

#[tokio::test]
async fn the_operators_token_cannot_write_in_protected_namespaces() -> Result<()> {
    let p = Policies::install("adm-protected").await?;
    p.operator_policy_in_force().await?;
    let policy = p.operator_policy();
    let protected_message = |namespace: &str| {
        format!(
            "the operator may not create or change ConfigMaps in protected namespace {namespace} (kube-system, \
             kube-public, kube-node-lease, its own and chart value tenancy.protectedNamespaces)"
        )
    };
    let as_operator = p.as_operator().await?;
    // Dry runs, whose admission is the real one: a policy that failed would still store nothing
    // in kube-system.
    let dry_patch = PatchParams { dry_run: true, ..PatchParams::default() };
    let shaped_right = |name: &str| config_map(name, true, Some(made_up_controller("MyResource")));

    // The system namespaces, the release's own, and one the release's values add.
    for namespace in ["kube-system", "kube-public", "kube-node-lease", p.home.name.as_str(), p.protected.name.as_str()]
    {
        let in_namespace: Api<ConfigMap> = Api::namespaced(as_operator.clone(), namespace);
        let name = format!("{}-squatter", p.release);
        let status =
            refusal(in_namespace.create(&dry_run(), &shaped_right(&name)?).await, &format!("a create in {namespace}"))?;
        refused_by(&status, 403, &policy, &protected_message(namespace))?;
    }

    // An administrator's ConfigMap in kube-system: no patch (the namespace is protected), no
    // delete (it is not the operator's).
    let system: Api<ConfigMap> = Api::namespaced(p.admin.clone(), "kube-system");
    let name = format!("{}-admins", p.release);
    let mut admins = config_map(&name, false, None)?;
    admins.labels_mut().insert("app.kubernetes.io/instance".into(), p.release.clone());
    system.create(&PostParams::default(), &admins).await?;
    let outcome = async {
        let stolen: Api<ConfigMap> = Api::namespaced(as_operator.clone(), "kube-system");
        let status = refusal(
            stolen.patch(&name, &dry_patch, &Patch::Merge(json!({"data": {"message": "rewritten"}}))).await,
            "patching in kube-system",
        )?;
        refused_by(&status, 403, &policy, &protected_message("kube-system"))?;
        let status =
            refusal(stolen.delete(&name, &DeleteParams { dry_run: true, ..Default::default() }).await, "deleting it")?;
        refused_by(
            &status,
            403,
            &policy,
            "the operator may delete only ConfigMaps with its controller ownerReference (to a MyResource or MessageBroadcast)",
        )
    }
    .await;
    system.delete(&name, &DeleteParams::default()).await?;
    outcome?;

    // Its own copies in a protected namespace (left from before an upgrade) can still be removed.
    let owner = controller_of(&p.owner(&p.protected.name, "left-over").await?)?;
    Api::<ConfigMap>::namespaced(p.admin.clone(), &p.protected.name)
        .create(&PostParams::default(), &config_map("left-over-copy", true, Some(owner))?)
        .await?;
    Api::<ConfigMap>::namespaced(as_operator.clone(), &p.protected.name)
        .delete("left-over-copy", &DeleteParams { dry_run: true, ..Default::default() })
        .await
        .context("deleting its own ConfigMap in a protected namespace")?;
    Ok(())
}

#[tokio::test]
async fn the_operators_token_manages_its_own_config_maps_with_block_owner_deletion() -> Result<()> {
    let p = Policies::install("adm-own").await?;
    p.operator_policy_in_force().await?;
    let policy = p.operator_policy();
    let owner = controller_of(&p.owner(&p.tenant.name, "owner").await?)?;
    ensure!(owner.block_owner_deletion == Some(true), "{owner:?}");
    let admins: Api<ConfigMap> = Api::namespaced(p.admin.clone(), &p.tenant.name);
    let own: Api<ConfigMap> = Api::namespaced(p.as_operator().await?, &p.tenant.name);
    let update_message = "the operator may change only ConfigMaps that already have its controller ownerReference (to a \
                          MyResource or MessageBroadcast), and must keep that reference and its label \
                          app.kubernetes.io/managed-by=example-operator";

    // Created with `blockOwnerDeletion: true`: OwnerReferencesPermissionEnforcement lets it
    // through only because the chart grants update on myresources/finalizers.
    let created = own.create(&PostParams::default(), &config_map("owned", true, Some(owner.clone()))?).await?;
    let stored = created.metadata.owner_references.unwrap_or_default();
    ensure!(stored.len() == 1 && stored[0].block_owner_deletion == Some(true), "{stored:?}");
    let patched =
        own.patch("owned", &PatchParams::default(), &Patch::Merge(json!({"data": {"message": "repaired"}}))).await?;
    ensure!(patched.data.and_then(|d| d.get("message").cloned()).as_deref() == Some("repaired"));

    // Someone removed the label: the operator may put it back (the stored ConfigMap is its own).
    admins
        .patch("owned", &PatchParams::default(), &Patch::Merge(json!({"metadata": {"labels": {MANAGED_BY: null}}})))
        .await?;
    let relabelled = own
        .patch(
            "owned",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {MANAGED_BY: "example-operator"}}})),
        )
        .await?;
    ensure!(relabelled.labels().get(MANAGED_BY).map(String::as_str) == Some("example-operator"));

    // It may not drop its label or its reference (which would make the ConfigMap look foreign).
    for (what, change) in [
        ("dropping the label", json!({"metadata": {"labels": {MANAGED_BY: null}}})),
        ("dropping the reference", json!({"metadata": {"ownerReferences": null}})),
    ] {
        let status = refusal(own.patch("owned", &PatchParams::default(), &Patch::Merge(&change)).await, what)?;
        refused_by(&status, 403, &policy, update_message)?;
    }

    own.delete("owned", &DeleteParams::default()).await?;
    eventually(IN_FORCE, "the owned ConfigMap to be gone", || async {
        Ok(admins.get_opt("owned").await?.is_none().then_some(()))
    })
    .await?;

    // The local API server enforces owner-reference permissions: a writer with ConfigMap create
    // but no update on the owner's finalizers cannot set blockOwnerDeletion.
    let writer = p.user("writer");
    let role: Role = serde_json::from_value(json!({
        "metadata": {"name": "configmap-writer"},
        "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["create"]}],
    }))?;
    Api::<Role>::namespaced(p.admin.clone(), &p.tenant.name).create(&PostParams::default(), &role).await?;
    let binding: RoleBinding = serde_json::from_value(json!({
        "metadata": {"name": "configmap-writer"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "configmap-writer"},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": writer}],
    }))?;
    Api::<RoleBinding>::namespaced(p.admin.clone(), &p.tenant.name).create(&PostParams::default(), &binding).await?;
    let as_writer: Api<ConfigMap> = Api::namespaced(p.as_user(&writer).await?, &p.tenant.name);
    eventually(IN_FORCE, "the writer's Role to count", || async {
        Ok(as_writer.create(&dry_run(), &config_map("plain", false, None)?).await.ok().map(|_| ()))
    })
    .await?;
    let status = refusal(
        as_writer.create(&PostParams::default(), &config_map("blocking", false, Some(owner))?).await,
        "blockOwnerDeletion without finalizers rights",
    )?;
    ensure!(
        status.code == 403
            && status.message.contains(
                "cannot set blockOwnerDeletion if an ownerReference refers to a resource you can't set finalizers on"
            ),
        "{status:?}"
    );
    Ok(())
}
