//! What every supported Kubernetes minor must do (README "Supported Kubernetes versions"): the
//! CRDs apply without warnings, a MyResource and a MessageBroadcast converge, and of two replicas
//! exactly one leads. `cargo xtask test` runs this file against the default minor with the rest
//! of the suite, then alone against the oldest supported minor on a control plane of its own
//! (`cargo xtask test --kubernetes 1.33` runs just that).

use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use crd_types::{MessageBroadcast, MessageBroadcastSpec};
use e2e_tests::{Fixture, OperatorProcess, TEST_LEASE, crd_files, eventually, install_crds};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};

const LEASE: &str = "leader";
const CONVERGE: Duration = Duration::from_secs(60);

/// Waits until exactly one of `replicas` reports leading and the Lease names it.
async fn single_leader(f: &Fixture, replicas: &[&OperatorProcess]) -> Result<String> {
    eventually(CONVERGE, "exactly one replica to lead", || async {
        let mut leading = Vec::new();
        for replica in replicas {
            if replica.master_status(LEASE).await? == 1.0 {
                leading.push(replica.identity.clone());
            }
        }
        if leading.len() > 1 {
            bail!("{} replicas report leading at once: {leading:?}", leading.len());
        }
        let holder = f.lease_holder(LEASE).await?;
        Ok(leading.pop().filter(|leader| holder.as_deref() == Some(leader.as_str())))
    })
    .await
}

#[tokio::test]
async fn the_crds_apply_without_warnings_and_both_kinds_converge_under_one_leader() -> Result<()> {
    let f = Fixture::new("supported").await?;
    let version = f.client.apiserver_version().await?;
    eprintln!("against Kubernetes {}", version.git_version);

    // As a user would install them; a warning (a deprecated field, an unknown format) fails.
    let mut apply = vec!["apply", "--server-side", "--force-conflicts", "--field-manager=supported-kubernetes"];
    let files: Vec<String> = crd_files()?.iter().map(|p| p.display().to_string()).collect();
    for file in &files {
        apply.extend(["-f", file.as_str()]);
    }
    let output = f.cluster.kubectl(&apply)?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    ensure!(output.status.success(), "kubectl apply of the CRDs failed: {stderr}");
    ensure!(
        stderr.trim().is_empty(),
        "kubectl apply of the CRDs printed warnings on {}:\n{stderr}",
        version.git_version
    );
    install_crds(&f.client).await?;

    let a = f.replica("supported-a", LEASE, &TEST_LEASE)?;
    let b = f.replica("supported-b", LEASE, &TEST_LEASE)?;
    let leader = single_leader(&f, &[&a, &b]).await?;

    f.create("converges", "hello from every supported minor").await?;
    f.wait_ready("converges", CONVERGE).await?;
    let config_map = f.config_maps.get("converges-configmap").await?;
    let message = config_map.data.unwrap_or_default().remove("message");
    ensure!(message.as_deref() == Some("hello from every supported minor"), "the ConfigMap holds {message:?}");

    // A broadcast selecting the test's namespace by a label of its own.
    let key = "example-operator.test/supported";
    let label = serde_json::json!({"metadata": {"labels": {key: f.ns()}}});
    Api::<Namespace>::all(f.client.clone()).patch(f.ns(), &PatchParams::default(), &Patch::Merge(label)).await?;
    let name = f.ns().to_owned();
    let broadcast = MessageBroadcast::new(
        &name,
        MessageBroadcastSpec {
            message: "broadcast to every supported minor".to_owned(),
            namespace_selector: LabelSelector {
                match_labels: Some([(key.to_owned(), f.ns().to_owned())].into()),
                match_expressions: None,
            },
            config_map_name: None,
        },
    );
    let broadcasts: Api<MessageBroadcast> = Api::all(f.client.clone());
    broadcasts.create(&PostParams::default(), &broadcast).await?;
    let converged = eventually(CONVERGE, "the broadcast to report 1/1", || async {
        let broadcast = broadcasts.get(&name).await?;
        let status = broadcast.status.clone().unwrap_or_default();
        let current = status.observed_generation == broadcast.metadata.generation;
        Ok((current && status.matched_namespaces == 1 && status.ready_namespaces == 1).then_some(()))
    })
    .await;
    let copy = Api::<ConfigMap>::namespaced(f.client.clone(), f.ns()).get_opt(&name).await;
    broadcasts.delete(&name, &DeleteParams::default()).await?;
    converged?;
    let copy = copy?.context("the broadcast's copy exists")?;
    let message = copy.data.unwrap_or_default().remove("message");
    ensure!(message.as_deref() == Some("broadcast to every supported minor"), "the copy holds {message:?}");

    // Still one leader, the same one, and the API server saw no write from the standby.
    ensure!(single_leader(&f, &[&a, &b]).await? == leader, "leadership moved without a fault");
    let report = f.one_writer_at_a_time(LEASE, &["supported-a", "supported-b"], true)?;
    ensure!(report.writes_of(&leader) > 0, "the audit log holds no write of the leader {leader}");
    Ok(())
}
