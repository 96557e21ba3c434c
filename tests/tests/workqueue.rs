//! The work queue's metrics, end to end: one worker, its reconcile held back by API traffic that
//! a loopback proxy delays, and objects created meanwhile waiting in the queue, as
//! `workqueue_depth` and the in-progress gauges of the operator's /metrics show.

use std::time::Duration;

use anyhow::{Result, ensure};
use e2e_tests::fault_proxy::{Fault, FaultProxy};
use e2e_tests::{Fixture, OperatorProcess, TEST_LEASE, eventually, sample};

const WAITING: usize = 5;

/// A `workqueue_*` sample of the MyResource controller.
fn queue_sample(metrics: &str, name: &str) -> f64 {
    sample(metrics, &format!("{name}{{controller=\"myresource\",name=\"myresource\"}}")).unwrap_or(f64::NAN)
}

#[tokio::test]
async fn with_one_worker_held_back_workqueue_depth_counts_exactly_the_objects_waiting() -> Result<()> {
    let f = Fixture::new("workqueue").await?;
    let proxy = FaultProxy::start(f.cluster.api_server_address().await?).await?;
    let via_proxy = f.cluster.admin_kubeconfig_via(proxy.port)?;
    let election = f.cluster.admin_kubeconfig.display().to_string();
    let mut args = vec!["--leader-election-kubeconfig", election.as_str(), "--concurrency", "myresource=1"];
    args.extend(TEST_LEASE);
    let operator = OperatorProcess::spawn(&via_proxy, "workqueue", "workqueue-leader", f.ns(), &args, &[])?;
    eventually(Duration::from_secs(30), "the replica to lead", || async {
        Ok((operator.master_status("workqueue-leader").await? == 1.0).then_some(()))
    })
    .await?;
    let metrics = operator.metrics().await?;
    for series in [
        "workqueue_depth",
        "workqueue_adds_total",
        "workqueue_retries_total",
        "workqueue_unfinished_work_seconds",
        "workqueue_longest_running_processor_seconds",
        "workqueue_queue_duration_seconds_count",
        "workqueue_work_duration_seconds_count",
    ] {
        ensure!(queue_sample(&metrics, series) == 0.0, "{series} is exposed at 0 from the start:\n{metrics}");
    }

    // Every byte between the controllers and the API server now takes 2 s each way: the
    // reconcile of `held` (a create and a status write) takes about 8 s.
    proxy.set(Fault::Delay(Duration::from_secs(2)));
    f.create("held", "reconciled slowly").await?;
    eventually(Duration::from_secs(30), "the reconcile of `held` to be in flight", || async {
        let metrics = operator.metrics().await?;
        Ok((sample(&metrics, "controller_runtime_active_workers{controller=\"myresource\"}") == Some(1.0))
            .then_some(()))
    })
    .await?;
    for index in 0..WAITING {
        f.create(&format!("waiting-{index}"), "queued behind `held`").await?;
    }
    // The in-progress gauges are refreshed every 500 ms (as client-go's are): a key taken a moment
    // ago (`held` again, after its own status event) may still read 0, so the snapshot is the
    // first one where the waiting objects are queued and the held work shows.
    let snapshot = eventually(Duration::from_secs(20), "the waiting objects queued behind held work", || async {
        let metrics = operator.metrics().await?;
        let held = queue_sample(&metrics, "workqueue_longest_running_processor_seconds") > 0.0
            && queue_sample(&metrics, "workqueue_unfinished_work_seconds") > 0.0
            && sample(&metrics, "controller_runtime_active_workers{controller=\"myresource\"}") == Some(1.0);
        Ok((held && queue_sample(&metrics, "workqueue_depth") == WAITING as f64).then_some(metrics))
    })
    .await
    .map_err(|e| e.context(operator.log_text()))?;
    ensure!(queue_sample(&snapshot, "workqueue_adds_total") >= (WAITING + 1) as f64, "{snapshot}");

    // The fault ends: everything converges and the queue empties.
    proxy.set(Fault::None);
    for name in std::iter::once("held".to_owned()).chain((0..WAITING).map(|i| format!("waiting-{i}"))) {
        f.wait_ready(&name, Duration::from_secs(60)).await?;
    }
    let drained = eventually(Duration::from_secs(20), "the queue to drain", || async {
        let metrics = operator.metrics().await?;
        let idle = queue_sample(&metrics, "workqueue_depth") == 0.0
            && queue_sample(&metrics, "workqueue_longest_running_processor_seconds") == 0.0;
        Ok(idle.then_some(metrics))
    })
    .await?;
    let adds = queue_sample(&drained, "workqueue_adds_total");
    ensure!(adds >= (WAITING + 1) as f64, "every object was added: {adds}");
    let worked = queue_sample(&drained, "workqueue_work_duration_seconds_count");
    ensure!(worked >= (WAITING + 1) as f64, "every object was worked on: {worked}");
    Ok(())
}
