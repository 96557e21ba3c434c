//! Fault injection against the local control plane: the API server restarted under load, etcd
//! compacted so watches get 410 Gone and relist, the leader killed under load, and the garbage
//! collector down while owners are deleted. Each ends with every object converged, nothing
//! duplicated, and never two replicas leading at once. These tests stop shared components, so
//! they run one at a time (and cargo runs test files one after another).
//!
//! `cargo xtask test --long` runs them with 2,000 objects instead of 100.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Result, ensure};
use crd_types::{MyResource, MyResourceSpec, Phase};
use e2e_tests::{Fixture, OperatorProcess, TEST_LEASE, cluster_component, eventually};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::Client;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;
use tokio::sync::Mutex;

static ONE_AT_A_TIME: Mutex<()> = Mutex::const_new(());

/// Election timing long enough to ride out an API server restart (about 20 s here).
const RIDE_OUT_RESTARTS: [&str; 7] =
    ["--lease-duration", "30s", "--renew-deadline", "20s", "--retry-period", "1s", "--reenter-election-on-loss=true"];

fn objects() -> usize {
    if std::env::var_os("EXAMPLE_OPERATOR_LONG_FAULTS").is_some() { 2000 } else { 100 }
}

async fn create_many(resources: &Api<MyResource>, count: usize, message: &str) -> Result<()> {
    futures::stream::iter(0..count)
        .map(|i| {
            let resources = resources.clone();
            let resource =
                MyResource::new(&format!("load-{i:05}"), MyResourceSpec { message: format!("{message} {i}") });
            async move { resources.create(&PostParams::default(), &resource).await.map(|_| ()) }
        })
        .buffer_unordered(16)
        .try_collect::<Vec<()>>()
        .await?;
    Ok(())
}

/// Every resource Ready for its generation, exactly one managed ConfigMap per resource, each
/// holding `message i`.
async fn all_converged(client: &Client, ns: &str, count: usize, message: &str, timeout: Duration) -> Result<()> {
    let resources: Api<MyResource> = Api::namespaced(client.clone(), ns);
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    eventually(timeout, &format!("{count} resources converged on {message:?}"), || async {
        let listed = resources.list(&ListParams::default()).await?.items;
        let ready = listed
            .iter()
            .filter(|r| {
                let status = r.status.as_ref();
                status.and_then(|s| s.phase) == Some(Phase::Ready)
                    && status.and_then(|s| s.observed_generation) == r.metadata.generation
            })
            .count();
        let managed = config_maps
            .list(&ListParams::default().labels("app.kubernetes.io/managed-by=example-operator"))
            .await?
            .items;
        let right = managed
            .iter()
            .filter(|cm| {
                let name = cm.metadata.name.as_deref().unwrap_or_default();
                let index = name.trim_start_matches("load-").trim_end_matches("-configmap").parse::<usize>().ok();
                let message_now = cm.data.as_ref().and_then(|d| d.get("message"));
                index.is_some_and(|i| message_now == Some(&format!("{message} {i}")))
            })
            .count();
        ensure!(managed.len() <= count, "{} managed ConfigMaps for {count} resources: duplicated", managed.len());
        Ok((listed.len() == count && ready == count && right == count).then_some(()))
    })
    .await
}

async fn update_all(resources: &Api<MyResource>, count: usize, message: &str) -> Result<()> {
    futures::stream::iter(0..count)
        .map(|i| {
            let resources = resources.clone();
            let patch = json!({"spec": {"message": format!("{message} {i}")}});
            async move {
                resources
                    .patch(&format!("load-{i:05}"), &PatchParams::default(), &Patch::Merge(patch))
                    .await
                    .map(|_| ())
            }
        })
        .buffer_unordered(16)
        .try_collect::<Vec<()>>()
        .await?;
    Ok(())
}

/// Samples every replica's leader gauge until stopped; reports the most that led at once.
struct LeaderSampler {
    most: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl LeaderSampler {
    fn start(ports: Vec<u16>, lease: String) -> Self {
        let most = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn({
            let (most, stop) = (most.clone(), stop.clone());
            async move {
                let series = format!("leader_election_master_status{{name=\"{lease}\"}}");
                while !stop.load(Ordering::Relaxed) {
                    let mut leading = 0;
                    for port in &ports {
                        if let Ok((200, body)) = e2e_tests::http_get(*port, "/metrics").await
                            && e2e_tests::sample(&body, &series) == Some(1.0)
                        {
                            leading += 1;
                        }
                    }
                    most.fetch_max(leading, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        });
        Self { most, stop, task }
    }

    async fn finish(self) -> usize {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.task.await;
        self.most.load(Ordering::Relaxed)
    }
}

#[tokio::test]
async fn an_api_server_restart_under_load_loses_nothing() -> Result<()> {
    let _serial = ONE_AT_A_TIME.lock().await;
    let f = Fixture::new("fault-apiserver").await?;
    let ns = f.ns().to_owned();
    let timing = RIDE_OUT_RESTARTS;
    let a = OperatorProcess::spawn(&f.cluster.admin_kubeconfig, "load-a", "fault-leader", &ns, &timing, &[])?;
    let b = OperatorProcess::spawn(&f.cluster.admin_kubeconfig, "load-b", "fault-leader", &ns, &timing, &[])?;
    let sampler = LeaderSampler::start(vec![a.metrics_port, b.metrics_port], "fault-leader".into());
    // A fresh Lease is created one lease duration (30 s) after the first look: lead first, so
    // the restart lands while the leader works.
    eventually(Duration::from_secs(60), "a leader", || async {
        Ok((a.master_status("fault-leader").await? + b.master_status("fault-leader").await? == 1.0).then_some(()))
    })
    .await?;
    let count = objects();
    create_many(&f.resources, count, "first").await?;

    // Restart while the operator is still working through the new objects.
    cluster_component("stop", "kube-apiserver")?;
    tokio::time::sleep(Duration::from_secs(3)).await; // the outage itself
    cluster_component("start", "kube-apiserver")?;
    let client = f.cluster.admin_client().await?;
    let resources: Api<MyResource> = Api::namespaced(client.clone(), &ns);
    update_all(&resources, count, "second").await?;
    all_converged(&client, &ns, count, "second", Duration::from_secs(180)).await?;
    let most = sampler.finish().await;
    ensure!(most <= 1, "{most} replicas led at once");
    // What the API server recorded: never two writers, across the restart too.
    let report = f.one_writer_at_a_time("fault-leader", &["load-a", "load-b"], false)?;
    ensure!(report.writes_of("load-a") + report.writes_of("load-b") >= count, "{report:?}");
    Ok(())
}

#[tokio::test]
async fn etcd_compaction_makes_watches_relist_and_everything_converges() -> Result<()> {
    let _serial = ONE_AT_A_TIME.lock().await;
    let f = Fixture::new("fault-compaction").await?;
    let ns = f.ns().to_owned();
    let operator = OperatorProcess::spawn(
        &f.cluster.admin_kubeconfig,
        "compacted",
        "compaction-leader",
        &ns,
        &RIDE_OUT_RESTARTS,
        &[],
    )?;
    let count = objects();
    create_many(&f.resources, count, "first").await?;
    all_converged(&f.client, &ns, count, "first", Duration::from_secs(180)).await?;
    let inits = |metrics: &str| {
        e2e_tests::sample(metrics, "example_operator_watch_events_total{resource=\"myresources\",type=\"INIT\"}")
            .unwrap_or(0.0)
    };
    let before = inits(&operator.metrics().await?);

    // History the watches would resume from is compacted away, and the API server's watch cache
    // is emptied by a restart: resuming watches get 410 Gone.
    update_all(&f.resources, count, "second").await?;
    // Once the operator has written all it will write, one more unrelated write moves etcd past
    // the last MyResource event, so the compaction surely removes the revision the watch holds.
    all_converged(&f.client, &ns, count, "second", Duration::from_secs(180)).await?;
    let scratch: ConfigMap = serde_json::from_value(json!({"metadata": {"name": "revision-bump"}}))?;
    Api::<ConfigMap>::namespaced(f.client.clone(), &ns).create(&PostParams::default(), &scratch).await?;
    cluster_component("compact", "")?;
    cluster_component("stop", "kube-apiserver")?;
    cluster_component("start", "kube-apiserver")?;
    let client = f.cluster.admin_client().await?;
    update_all(&Api::namespaced(client.clone(), &ns), count, "third").await?;
    all_converged(&client, &ns, count, "third", Duration::from_secs(180)).await?;
    let after = eventually(Duration::from_secs(60), "the MyResource watch to relist", || async {
        let now = inits(&operator.metrics().await?);
        Ok((now > before).then_some(now))
    })
    .await?;
    ensure!(after > before, "relists: {before} → {after}");
    Ok(())
}

#[tokio::test]
async fn killing_the_leader_under_load_loses_and_duplicates_nothing() -> Result<()> {
    let _serial = ONE_AT_A_TIME.lock().await;
    let f = Fixture::new("fault-kill").await?;
    let ns = f.ns().to_owned();
    let mut a = OperatorProcess::spawn(&f.cluster.admin_kubeconfig, "kill-a", "kill-leader", &ns, &TEST_LEASE, &[])?;
    let b = OperatorProcess::spawn(&f.cluster.admin_kubeconfig, "kill-b", "kill-leader", &ns, &TEST_LEASE, &[])?;
    let sampler = LeaderSampler::start(vec![a.metrics_port, b.metrics_port], "kill-leader".into());
    let leader_is_a = eventually(Duration::from_secs(30), "a leader", || async {
        let a_leads = a.master_status("kill-leader").await? == 1.0;
        let b_leads = b.master_status("kill-leader").await? == 1.0;
        Ok((a_leads || b_leads).then_some(a_leads))
    })
    .await?;
    let count = objects();
    create_many(&f.resources, count, "first").await?;
    if leader_is_a {
        a.signal(nix::sys::signal::Signal::SIGKILL)?;
        a.wait(Duration::from_secs(10)).await?;
    } else {
        drop(b);
    }
    update_all(&f.resources, count, "second").await?;
    all_converged(&f.client, &ns, count, "second", Duration::from_secs(180)).await?;
    let most = sampler.finish().await;
    ensure!(most <= 1, "{most} replicas led at once");
    let report = f.one_writer_at_a_time("kill-leader", &["kill-a", "kill-b"], true)?;
    ensure!(report.writes_of("kill-a") + report.writes_of("kill-b") >= count, "{report:?}");
    Ok(())
}

#[tokio::test]
async fn the_garbage_collector_catches_up_after_an_outage() -> Result<()> {
    let _serial = ONE_AT_A_TIME.lock().await;
    let f = Fixture::new("fault-gc").await?;
    let ns = f.ns().to_owned();
    let _operator = OperatorProcess::spawn(&f.cluster.admin_kubeconfig, "gc", "gc-leader", &ns, &TEST_LEASE, &[])?;
    let count = objects();
    create_many(&f.resources, count, "first").await?;
    all_converged(&f.client, &ns, count, "first", Duration::from_secs(180)).await?;

    cluster_component("stop", "kube-controller-manager")?;
    f.resources.delete_collection(&DeleteParams::default(), &ListParams::default()).await?;
    let config_maps: Api<ConfigMap> = Api::namespaced(f.client.clone(), &ns);
    let managed = ListParams::default().labels("app.kubernetes.io/managed-by=example-operator");
    eventually(Duration::from_secs(30), "the owners to be gone", || async {
        Ok(f.resources.list(&ListParams::default()).await?.items.is_empty().then_some(()))
    })
    .await?;
    let orphans = config_maps.list(&managed).await?.items.len();
    ensure!(orphans == count, "without the garbage collector the ConfigMaps stay ({orphans} of {count})");

    cluster_component("start", "kube-controller-manager")?;
    // The garbage collector rebuilds its graph after the restart, then deletes each orphan.
    let catch_up = Duration::from_secs(120 + count as u64 / 5);
    eventually(catch_up, "the garbage collector to delete every ConfigMap", || async {
        Ok(config_maps.list(&managed).await?.items.is_empty().then_some(()))
    })
    .await?;
    Ok(())
}
