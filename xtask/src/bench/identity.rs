//! The one identity every benchmarked client runs as: the ServiceAccount the control plane's audit
//! policy records in full ([`cluster::BENCH_SERVICE_ACCOUNT`]), bound to cluster-admin. Sharing it
//! puts the operator, the peer and the bare client in the same API Priority and Fairness flow
//! schema; each still sends a User-Agent of its own, which is how the audit log tells them apart.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use http::HeaderValue;
use http::header::USER_AGENT;
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use k8s_openapi::api::rbac::v1::ClusterRoleBinding;
use kube::Client;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;

use crate::cluster::{self, ClusterState};

/// A token lives this long: longer than the longest run (10,000 objects, five rounds).
const TOKEN_SECONDS: i64 = 24 * 3600;

/// The User-Agent of a benchmarked client: `program`, and `label` in parentheses as the operator
/// writes its identity, so [`crate::bench::audit::Tally`] finds every client by its label.
pub fn user_agent(program: &str, label: &str) -> String {
    format!("{program} ({label})")
}

/// Creates the ServiceAccount, binds it to cluster-admin, and writes a kubeconfig with a token
/// for it next to the cluster's other kubeconfigs. Returns the kubeconfig's path.
pub async fn ensure(admin: &Client, state: &ClusterState) -> Result<PathBuf> {
    let (namespace, name) = cluster::BENCH_SERVICE_ACCOUNT;
    let apply = PatchParams::apply("example-operator-bench").force();
    let ns: Namespace =
        serde_json::from_value(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}}))?;
    Api::<Namespace>::all(admin.clone()).patch(namespace, &apply, &Patch::Apply(&ns)).await?;
    let accounts: Api<ServiceAccount> = Api::namespaced(admin.clone(), namespace);
    let account: ServiceAccount = serde_json::from_value(
        json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name, "namespace": namespace}}),
    )?;
    accounts.patch(name, &apply, &Patch::Apply(&account)).await?;
    let binding: ClusterRoleBinding = serde_json::from_value(json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
        "metadata": {"name": "example-operator-bench"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "cluster-admin"},
        "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": namespace}],
    }))?;
    Api::<ClusterRoleBinding>::all(admin.clone())
        .patch("example-operator-bench", &apply, &Patch::Apply(&binding))
        .await?;
    let request = TokenRequest {
        spec: Some(TokenRequestSpec { expiration_seconds: Some(TOKEN_SECONDS), ..TokenRequestSpec::default() }),
        ..TokenRequest::default()
    };
    let token = accounts
        .create_token_request(name, &Default::default(), &request)
        .await
        .context("requesting a token for the benchmark ServiceAccount")?
        .status
        .and_then(|status| status.token)
        .context("the TokenRequest came back without a token")?;
    write_kubeconfig(&state.admin_kubeconfig, &state.dir.join("bench.kubeconfig"), &token)
}

/// A copy of the admin kubeconfig's cluster with `token` as the user.
fn write_kubeconfig(admin: &Path, path: &Path, token: &str) -> Result<PathBuf> {
    let text = std::fs::read_to_string(admin).with_context(|| format!("reading {}", admin.display()))?;
    let admin: serde_yaml::Value = serde_yaml::from_str(&text)?;
    let cluster = admin["clusters"][0]["cluster"].clone();
    let config = json!({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "local", "cluster": cluster}],
        "users": [{"name": "bench", "user": {"token": token}}],
        "contexts": [{"name": "bench", "context": {"cluster": "local", "user": "bench", "namespace": "default"}}],
        "current-context": "bench",
    });
    std::fs::write(path, serde_yaml::to_string(&config)?).with_context(|| format!("writing {}", path.display()))?;
    Ok(path.to_path_buf())
}

/// A client as the benchmark identity, sending `user_agent`.
pub async fn client(kubeconfig: &Path, user_agent: &str) -> Result<Client> {
    let kubeconfig = kube::config::Kubeconfig::read_from(kubeconfig)?;
    let mut config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await?;
    config.headers.retain(|(name, _)| name != USER_AGENT);
    config.headers.push((USER_AGENT, HeaderValue::from_str(user_agent)?));
    Ok(Client::try_from(config)?)
}
