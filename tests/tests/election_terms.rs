//! The edges of a leadership term against the local control plane, proven from the API server's
//! audit log: a Lease deleted by hand (a common way to "unstick" an election) never yields two
//! leaders and never interrupts a healthy leader's term.

use std::time::Duration;

use anyhow::{Result, bail, ensure};
use e2e_tests::{Fixture, OperatorProcess, TEST_LEASE, eventually};
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, DeleteParams};

const LEASE: &str = "leader";
/// The test lease duration (TEST_LEASE: 4 s).
const LEASE_DURATION: Duration = Duration::from_secs(4);

/// Waits until `replica` reports leading and the Lease names it.
async fn leads(f: &Fixture, replica: &OperatorProcess, timeout: Duration) -> Result<()> {
    eventually(timeout, &format!("{} to lead", replica.identity), || async {
        let holder = f.lease_holder(LEASE).await?;
        Ok((replica.master_status(LEASE).await? == 1.0 && holder.as_deref() == Some(replica.identity.as_str()))
            .then_some(()))
    })
    .await
}

async fn delete_lease(f: &Fixture) -> Result<()> {
    Api::<Lease>::namespaced(f.client.clone(), f.ns()).delete(LEASE, &DeleteParams::default()).await?;
    Ok(())
}

/// Fails when more than one of `replicas` reports leading.
async fn at_most_one_leads(replicas: &[&OperatorProcess]) -> Result<()> {
    let mut leading = Vec::new();
    for replica in replicas {
        if replica.master_status(LEASE).await? == 1.0 {
            leading.push(replica.identity.as_str());
        }
    }
    if leading.len() > 1 {
        bail!("two replicas report leading at once: {leading:?}");
    }
    Ok(())
}

/// The Lease holders the API server accepted since the test began, from its audit log.
fn holders(f: &Fixture, replicas: &[&str]) -> Result<Vec<String>> {
    let report = f.one_writer_at_a_time(LEASE, replicas, true)?;
    Ok(report.holders.into_iter().map(|(_, holder)| holder).collect())
}

#[tokio::test]
async fn a_lease_deleted_under_a_leader_and_a_standby_never_yields_two_leaders() -> Result<()> {
    let f = Fixture::new("term-delete").await?;
    let mut a = f.replica("replica-a", LEASE, &TEST_LEASE)?;
    leads(&f, &a, Duration::from_secs(30)).await?;
    let b = f.replica("replica-b", LEASE, &TEST_LEASE)?;
    for round in 0..8 {
        f.create(&format!("before-{round}"), "written across deletions").await?;
        delete_lease(&f).await?;
        // Sample both replicas while the Lease is gone and until the leader re-created it.
        eventually(Duration::from_secs(10), "the leader to re-create its Lease", || async {
            at_most_one_leads(&[&a, &b]).await?;
            Ok((f.lease_holder(LEASE).await?.as_deref() == Some("replica-a")).then_some(()))
        })
        .await?;
        ensure!(a.master_status(LEASE).await? == 1.0, "round {round}: the leader stopped leading");
    }
    // Longer than a lease duration after the last deletion: still the same leader, alive.
    tokio::time::sleep(LEASE_DURATION + Duration::from_secs(1)).await;
    at_most_one_leads(&[&a, &b]).await?;
    leads(&f, &a, Duration::from_secs(5)).await?;
    ensure!(a.wait(Duration::from_millis(10)).await.is_err(), "the leader exited:\n{}", a.log_text());
    for round in 0..8 {
        f.wait_ready(&format!("before-{round}"), Duration::from_secs(30)).await?;
    }
    let holders = holders(&f, &["replica-a", "replica-b"])?;
    ensure!(holders.iter().all(|h| h == "replica-a"), "the Lease named another holder: {holders:?}");
    ensure!(b.reconciles().await? == 0.0, "the standby reconciled");
    Ok(())
}

#[tokio::test]
async fn a_lone_leader_recreates_its_deleted_lease_and_keeps_leading() -> Result<()> {
    let f = Fixture::new("term-lone").await?;
    let mut a = f.replica("replica-a", LEASE, &TEST_LEASE)?;
    leads(&f, &a, Duration::from_secs(30)).await?;
    for round in 0..3 {
        delete_lease(&f).await?;
        leads(&f, &a, Duration::from_secs(5)).await?;
        f.create(&format!("after-{round}"), "still converging").await?;
        f.wait_ready(&format!("after-{round}"), Duration::from_secs(30)).await?;
    }
    ensure!(a.wait(Duration::from_millis(10)).await.is_err(), "the leader exited:\n{}", a.log_text());
    let holders = holders(&f, &["replica-a"])?;
    ensure!(holders.iter().all(|h| h == "replica-a"), "{holders:?}");
    Ok(())
}

#[tokio::test]
async fn a_candidate_started_just_after_a_deletion_does_not_take_the_lease() -> Result<()> {
    let f = Fixture::new("term-late").await?;
    let a = f.replica("replica-a", LEASE, &TEST_LEASE)?;
    leads(&f, &a, Duration::from_secs(30)).await?;
    delete_lease(&f).await?;
    // Started with no record to see: it must not create the Lease while the leader lives.
    let b = f.replica("replica-b", LEASE, &TEST_LEASE)?;
    let until = tokio::time::Instant::now() + LEASE_DURATION * 2;
    while tokio::time::Instant::now() < until {
        at_most_one_leads(&[&a, &b]).await?;
        ensure!(b.master_status(LEASE).await? == 0.0, "the late candidate leads");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    leads(&f, &a, Duration::from_secs(5)).await?;
    f.create("converges", "under the first leader").await?;
    f.wait_ready("converges", Duration::from_secs(30)).await?;
    let holders = holders(&f, &["replica-a", "replica-b"])?;
    ensure!(holders.iter().all(|h| h == "replica-a"), "{holders:?}");
    ensure!(b.reconciles().await? == 0.0, "the late candidate reconciled");
    Ok(())
}

/// A client that sent half a request, and another that sent nothing, do not keep the process
/// alive after SIGTERM: with and without leader election it exits 0 within the chart's default
/// termination grace period (30 s) minus a margin, while both still hold their connections.
#[tokio::test]
async fn sigterm_with_stalled_http_clients_exits_zero_within_the_grace_period() -> Result<()> {
    use tokio::io::AsyncWriteExt;
    let f = Fixture::new("term-stalled").await?;
    for election in [true, false] {
        let mut args: Vec<&str> = TEST_LEASE.to_vec();
        if !election {
            args = vec!["--leader-elect=false", "--shutdown-timeout", "5s"];
        }
        let mut replica = f.replica(if election { "stalled-leader" } else { "stalled-standalone" }, LEASE, &args)?;
        if election {
            leads(&f, &replica, Duration::from_secs(30)).await?;
        }
        let address = ("127.0.0.1", replica.probe_port);
        let mut half_sent = tokio::net::TcpStream::connect(address).await?;
        half_sent.write_all(b"GET /healthz HTTP/1.1\r\nHost: operator\r\nX-Stalled: ").await?;
        let silent = tokio::net::TcpStream::connect(address).await?;
        replica.signal(nix::sys::signal::Signal::SIGTERM)?;
        let code = replica.wait(Duration::from_secs(20)).await;
        ensure!(
            matches!(code, Ok(Some(0))),
            "election {election}: the replica did not exit 0 within 20 s of SIGTERM ({code:?}):\n{}",
            replica.log_text()
        );
        drop((half_sent, silent));
    }
    Ok(())
}
