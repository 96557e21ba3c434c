//! The API server goes away for several seconds and comes back: the operator survives, holds
//! (or cleanly re-acquires) its lease, and everything converges afterwards. This file holds one
//! test because it stops the shared API server; cargo runs test files one after another.

use std::time::Duration;

use anyhow::{Result, ensure};
use crd_types::{MyResource, MyResourceSpec, Phase};
use e2e_tests::{OperatorProcess, TestCluster, TestNamespace, cluster_component, eventually, install_crds};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, DeleteParams, PostParams};

#[tokio::test]
async fn the_operator_survives_an_api_server_restart_and_converges_afterwards() -> Result<()> {
    let cluster = TestCluster::get()?;
    let client = cluster.admin_client().await?;
    install_crds(&client).await?;
    let namespace = TestNamespace::create(&client, "apiserver-restart").await?;
    let ns = namespace.name.clone();
    let timing = ["--lease-duration", "30s", "--renew-deadline", "20s", "--retry-period", "1s"];
    let args: Vec<&str> = timing.iter().copied().chain(["--reenter-election-on-loss=true"]).collect();
    let mut operator =
        OperatorProcess::spawn(&cluster.admin_kubeconfig, "survivor", "restart-leader", &ns, &args, &[])?;
    // A fresh Lease is created one lease duration (30 s) after the first look.
    eventually(Duration::from_secs(60), "the replica to lead", || async {
        Ok((operator.master_status("restart-leader").await? == 1.0).then_some(()))
    })
    .await?;
    let resources: Api<MyResource> = Api::namespaced(client.clone(), &ns);
    let before = MyResource::new("before", MyResourceSpec { message: "made before the outage".into() });
    resources.create(&PostParams::default(), &before).await?;
    eventually(Duration::from_secs(30), "the first resource to be Ready", || async {
        Ok((resources.get("before").await?.status.and_then(|s| s.phase) == Some(Phase::Ready)).then_some(()))
    })
    .await?;

    cluster_component("stop", "kube-apiserver")?;
    // The outage itself is what is being tested: keep the API server away for a while.
    tokio::time::sleep(Duration::from_secs(5)).await;
    ensure!(
        operator.wait(Duration::from_millis(10)).await.is_err(),
        "the operator exited during the outage:\n{}",
        operator.log_text()
    );
    cluster_component("start", "kube-apiserver")?;

    // Watches resume: a deleted ConfigMap is restored and a new resource converges.
    let client = cluster.admin_client().await?;
    let resources: Api<MyResource> = Api::namespaced(client.clone(), &ns);
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    config_maps.delete("before-configmap", &DeleteParams::default()).await?;
    let after = MyResource::new("after", MyResourceSpec { message: "made after the outage".into() });
    resources.create(&PostParams::default(), &after).await?;
    eventually(Duration::from_secs(60), "both resources converged after the restart", || async {
        let restored = config_maps.get_opt("before-configmap").await?.is_some();
        let ready = resources.get("after").await?.status.and_then(|s| s.phase) == Some(Phase::Ready);
        Ok((restored && ready).then_some(()))
    })
    .await?;
    ensure!(operator.wait(Duration::from_millis(10)).await.is_err(), "the operator is still running");
    ensure!(operator.master_status("restart-leader").await? == 1.0, "and leads");
    namespace.delete().await
}
