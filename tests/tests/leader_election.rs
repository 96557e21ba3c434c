//! Leader election between operator replicas running as real processes against the local
//! control plane. Each test has its own namespace and Lease, and its replicas manage only it.

use std::time::Duration;

use anyhow::{Result, bail, ensure};
use e2e_tests::{Fixture, OperatorProcess, TEST_LEASE, eventually, http_get, operator_binary};
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, Patch, PatchParams};
use nix::sys::signal::Signal;
use serde_json::json;

/// Replica `identity` electing on the test's Lease with `timing` and `extra` arguments.
fn replica(f: &Fixture, identity: &str, timing: &[&str], extra: &[&str]) -> Result<OperatorProcess> {
    let args: Vec<&str> = timing.iter().chain(extra).copied().collect();
    f.replica(identity, LEASE, &args)
}

/// Waits until exactly one of `replicas` reports leading `lease` and holds it; returns its index.
async fn single_leader_of(f: &Fixture, lease: &str, replicas: &[&OperatorProcess], timeout: Duration) -> Result<usize> {
    eventually(timeout, "exactly one replica to lead", || async {
        let mut leading = Vec::new();
        for (index, replica) in replicas.iter().enumerate() {
            if replica.master_status(lease).await? == 1.0 {
                leading.push(index);
            }
        }
        if leading.len() > 1 {
            bail!("{} replicas report leading at once", leading.len());
        }
        let holder = f.lease_holder(lease).await?;
        Ok(leading.first().copied().filter(|i| holder.as_deref() == Some(replicas[*i].identity.as_str())))
    })
    .await
}

const LEASE: &str = "leader";

async fn single_leader(f: &Fixture, replicas: &[&OperatorProcess], timeout: Duration) -> Result<usize> {
    single_leader_of(f, LEASE, replicas, timeout).await
}

#[tokio::test]
async fn of_two_replicas_exactly_one_leads_and_only_it_reconciles() -> Result<()> {
    let f = Fixture::new("le-two").await?;
    let a = replica(&f, "replica-a", &TEST_LEASE, &[])?;
    let b = replica(&f, "replica-b", &TEST_LEASE, &[])?;
    let leader = single_leader(&f, &[&a, &b], Duration::from_secs(30)).await?;
    let (leader, standby) = if leader == 0 { (&a, &b) } else { (&b, &a) };

    f.create("converges", "hello").await?;
    f.wait_ready("converges", Duration::from_secs(30)).await?;
    ensure!(leader.reconciles().await? >= 1.0, "the leader reconciled");
    ensure!(standby.reconciles().await? == 0.0, "the standby reconciled:\n{}", standby.metrics().await?);
    ensure!(standby.master_status(LEASE).await? == 0.0);

    // Both are live and ready; a standby is ready too.
    for replica in [leader, standby] {
        let (code, body) = http_get(replica.probe_port, "/readyz?verbose").await?;
        ensure!(code == 200 && body.contains("[+]ping ok") && body.contains("[+]leader-election ok"), "{code} {body}");
        ensure!(body.ends_with("readyz check passed\n"), "{body}");
        ensure!(http_get(replica.probe_port, "/healthz").await? == (200, "ok".to_owned()));
        let (code, body) = http_get(replica.probe_port, "/healthz?verbose").await?;
        ensure!(code == 200 && body.contains("healthz check passed"), "{body}");
    }
    Ok(())
}

#[tokio::test]
async fn when_the_leader_is_killed_the_standby_takes_over_and_converges_new_objects() -> Result<()> {
    let f = Fixture::new("le-kill").await?;
    let mut a = replica(&f, "replica-a", &TEST_LEASE, &[])?;
    let mut b = replica(&f, "replica-b", &TEST_LEASE, &[])?;
    let leader = single_leader(&f, &[&a, &b], Duration::from_secs(30)).await?;
    let (leader, standby) = if leader == 0 { (&mut a, &mut b) } else { (&mut b, &mut a) };

    leader.signal(Signal::SIGKILL)?;
    leader.wait(Duration::from_secs(10)).await?;
    f.create("created-after-kill", "hello").await?;
    // Lease duration (4 s) plus a few retry periods, with room for a loaded machine.
    eventually(Duration::from_secs(15), "the standby to take over", || async {
        Ok((standby.master_status(LEASE).await? == 1.0).then_some(()))
    })
    .await?;
    ensure!(f.lease_holder(LEASE).await?.as_deref() == Some(standby.identity.as_str()));
    f.wait_ready("created-after-kill", Duration::from_secs(30)).await?;
    Ok(())
}

#[tokio::test]
async fn on_sigterm_the_leader_releases_the_lease_and_the_standby_leads_at_once() -> Result<()> {
    let f = Fixture::new("le-term").await?;
    // A long lease: a standby can only lead within seconds if the lease was released.
    let timing = ["--lease-duration", "20s", "--renew-deadline", "10s", "--retry-period", "500ms"];
    let mut a = replica(&f, "replica-a", &timing, &[])?;
    let mut b = replica(&f, "replica-b", &timing, &[])?;
    // A fresh Lease is created one lease duration (20 s) after the first candidate looked.
    let leader = single_leader(&f, &[&a, &b], Duration::from_secs(60)).await?;
    let (leader, standby) = if leader == 0 { (&mut a, &mut b) } else { (&mut b, &mut a) };

    leader.signal(Signal::SIGTERM)?;
    let code = leader.wait(Duration::from_secs(30)).await?;
    ensure!(code == Some(0), "SIGTERM exits 0, got {code:?}:\n{}", leader.log_text());
    ensure!(leader.log_text().contains("released the lease"), "{}", leader.log_text());
    eventually(Duration::from_secs(8), "the standby to lead well before the 20 s lease would expire", || async {
        Ok((standby.master_status(LEASE).await? == 1.0).then_some(()))
    })
    .await?;
    f.create("after-handover", "hello").await?;
    f.wait_ready("after-handover", Duration::from_secs(30)).await?;
    Ok(())
}

#[tokio::test]
async fn a_leader_that_sees_another_holder_stops_and_exits_non_zero() -> Result<()> {
    let f = Fixture::new("le-lost").await?;
    let mut a = replica(&f, "replica-a", &TEST_LEASE, &[])?;
    single_leader(&f, &[&a], Duration::from_secs(30)).await?;

    // Another holder takes the lease (as a racing candidate's write would).
    let leases: Api<Lease> = Api::namespaced(f.client.clone(), &f.namespace.name);
    let now = format!("{:.6}", k8s_openapi::jiff::Timestamp::now()); // MicroTime: exactly 6 digits
    let takeover = json!({"spec": {"holderIdentity": "intruder", "renewTime": now, "acquireTime": now, "leaseDurationSeconds": 60}});
    leases.patch(LEASE, &PatchParams::default(), &Patch::Merge(takeover)).await?;
    let code = a.wait(Duration::from_secs(15)).await?;
    ensure!(code == Some(1), "losing the lease exits 1, got {code:?}:\n{}", a.log_text());
    ensure!(a.log_text().contains("stopped leading"), "{}", a.log_text());

    // Told to re-enter the election, a replica that loses keeps running as a candidate.
    let b = replica(&f, "replica-b", &TEST_LEASE, &["--reenter-election-on-loss=true"])?;
    let free = json!({"spec": {"holderIdentity": "", "leaseDurationSeconds": 1}});
    leases.patch(LEASE, &PatchParams::default(), &Patch::Merge(free)).await?;
    single_leader(&f, &[&b], Duration::from_secs(30)).await?;
    let now = format!("{:.6}", k8s_openapi::jiff::Timestamp::now()); // MicroTime: exactly 6 digits
    let takeover = json!({"spec": {"holderIdentity": "intruder", "renewTime": now, "acquireTime": now, "leaseDurationSeconds": 3}});
    leases.patch(LEASE, &PatchParams::default(), &Patch::Merge(takeover)).await?;
    eventually(Duration::from_secs(15), "the replica to step back to standby", || async {
        Ok((b.master_status(LEASE).await? == 0.0).then_some(()))
    })
    .await?;
    // When the intruder's lease expires, it leads again.
    single_leader(&f, &[&b], Duration::from_secs(30)).await?;
    Ok(())
}

#[tokio::test]
async fn invalid_flag_combinations_fail_with_a_clear_message() -> Result<()> {
    let run = |args: &[&str]| -> Result<(Option<i32>, String)> {
        let output = std::process::Command::new(operator_binary()?).args(args).output()?;
        Ok((output.status.code(), String::from_utf8_lossy(&output.stderr).into_owned()))
    };
    let (code, stderr) = run(&["--controllers", "myresource,unknown"])?;
    ensure!(code == Some(2) && stderr.contains("unknown controller \"unknown\""), "{code:?} {stderr}");
    let (code, stderr) = run(&["--metrics-bind-address", "everywhere"])?;
    ensure!(code == Some(2) && stderr.contains("--metrics-bind-address"), "{code:?} {stderr}");
    let (code, stdout) = {
        let output = std::process::Command::new(operator_binary()?).arg("--help").output()?;
        (output.status.code(), String::from_utf8_lossy(&output.stdout).into_owned())
    };
    ensure!(code == Some(0) && stdout.contains("--health-probe-bind-address"), "{stdout}");
    Ok(())
}
