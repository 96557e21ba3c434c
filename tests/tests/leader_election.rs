//! Leader election between operator replicas running as real processes against the local
//! control plane. Each test has its own namespace and Lease, and its replicas manage only it.

use std::time::Duration;

use anyhow::{Result, bail, ensure};
use crd_types::{MyResource, MyResourceSpec, Phase};
use e2e_tests::{
    OperatorProcess, TEST_LEASE, TestCluster, TestNamespace, eventually, http_get, install_crds, operator_binary,
};
use k8s_openapi::api::coordination::v1::Lease;
use kube::Client;
use kube::api::{Api, Patch, PatchParams, PostParams};
use nix::sys::signal::Signal;
use serde_json::json;

struct Fixture {
    cluster: TestCluster,
    client: Client,
    namespace: TestNamespace,
    lease: String,
}

async fn fixture(prefix: &str) -> Result<Fixture> {
    let cluster = TestCluster::get()?;
    let client = cluster.admin_client().await?;
    install_crds(&client).await?;
    let namespace = TestNamespace::create(&client, prefix).await?;
    let lease = format!("{prefix}-leader");
    Ok(Fixture { cluster, client, namespace, lease })
}

impl Fixture {
    fn replica(&self, identity: &str, timing: &[&str], extra: &[&str]) -> Result<OperatorProcess> {
        self.replica_on(&self.lease, identity, timing, extra)
    }

    fn replica_on(&self, lease: &str, identity: &str, timing: &[&str], extra: &[&str]) -> Result<OperatorProcess> {
        let args: Vec<&str> = timing.iter().chain(extra).copied().collect();
        OperatorProcess::spawn(&self.cluster.admin_kubeconfig, identity, lease, &self.namespace.name, &args, &[])
    }

    async fn holder(&self, lease: &str) -> Result<Option<String>> {
        let leases: Api<Lease> = Api::namespaced(self.client.clone(), &self.namespace.name);
        Ok(leases.get_opt(lease).await?.and_then(|l| l.spec).and_then(|s| s.holder_identity))
    }

    async fn create(&self, name: &str) -> Result<()> {
        let resources: Api<MyResource> = Api::namespaced(self.client.clone(), &self.namespace.name);
        let resource = MyResource::new(name, MyResourceSpec { message: format!("hello from {name}") });
        resources.create(&PostParams::default(), &resource).await?;
        Ok(())
    }

    async fn wait_ready(&self, name: &str, timeout: Duration) -> Result<()> {
        let resources: Api<MyResource> = Api::namespaced(self.client.clone(), &self.namespace.name);
        eventually(timeout, &format!("MyResource {name} to be Ready"), || async {
            let resource = resources.get(name).await?;
            Ok((resource.status.and_then(|s| s.phase) == Some(Phase::Ready)).then_some(()))
        })
        .await
    }
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
        let holder = f.holder(lease).await?;
        Ok(leading.first().copied().filter(|i| holder.as_deref() == Some(replicas[*i].identity.as_str())))
    })
    .await
}

async fn single_leader(f: &Fixture, replicas: &[&OperatorProcess], timeout: Duration) -> Result<usize> {
    single_leader_of(f, &f.lease, replicas, timeout).await
}

#[tokio::test]
async fn of_two_replicas_exactly_one_leads_and_only_it_reconciles() -> Result<()> {
    let f = fixture("le-two").await?;
    let a = f.replica("replica-a", &TEST_LEASE, &[])?;
    let b = f.replica("replica-b", &TEST_LEASE, &[])?;
    let leader = single_leader(&f, &[&a, &b], Duration::from_secs(30)).await?;
    let (leader, standby) = if leader == 0 { (&a, &b) } else { (&b, &a) };

    f.create("converges").await?;
    f.wait_ready("converges", Duration::from_secs(30)).await?;
    ensure!(leader.reconciles().await? >= 1.0, "the leader reconciled");
    ensure!(standby.reconciles().await? == 0.0, "the standby reconciled:\n{}", standby.metrics().await?);
    ensure!(standby.master_status(&f.lease).await? == 0.0);

    // Both are live and ready; a standby is ready too.
    for replica in [leader, standby] {
        let (code, body) = http_get(replica.probe_port, "/readyz?verbose").await?;
        ensure!(code == 200 && body.contains("[+]ping ok") && body.contains("[+]leader-election ok"), "{code} {body}");
        ensure!(body.ends_with("readyz check passed\n"), "{body}");
        ensure!(http_get(replica.probe_port, "/healthz").await? == (200, "ok".to_owned()));
        let (code, body) = http_get(replica.probe_port, "/healthz?verbose").await?;
        ensure!(code == 200 && body.contains("healthz check passed"), "{body}");
    }
    f.namespace.delete().await
}

#[tokio::test]
async fn when_the_leader_is_killed_the_standby_takes_over_and_converges_new_objects() -> Result<()> {
    let f = fixture("le-kill").await?;
    let mut a = f.replica("replica-a", &TEST_LEASE, &[])?;
    let mut b = f.replica("replica-b", &TEST_LEASE, &[])?;
    let leader = single_leader(&f, &[&a, &b], Duration::from_secs(30)).await?;
    let (leader, standby) = if leader == 0 { (&mut a, &mut b) } else { (&mut b, &mut a) };

    leader.signal(Signal::SIGKILL)?;
    leader.wait(Duration::from_secs(10)).await?;
    f.create("created-after-kill").await?;
    // Lease duration (4 s) plus a few retry periods, with room for a loaded machine.
    eventually(Duration::from_secs(15), "the standby to take over", || async {
        Ok((standby.master_status(&f.lease).await? == 1.0).then_some(()))
    })
    .await?;
    ensure!(f.holder(&f.lease).await?.as_deref() == Some(standby.identity.as_str()));
    f.wait_ready("created-after-kill", Duration::from_secs(30)).await?;
    f.namespace.delete().await
}

#[tokio::test]
async fn on_sigterm_the_leader_releases_the_lease_and_the_standby_leads_at_once() -> Result<()> {
    let f = fixture("le-term").await?;
    // A long lease: a standby can only lead within seconds if the lease was released.
    let timing = ["--lease-duration", "20s", "--renew-deadline", "10s", "--retry-period", "500ms"];
    let mut a = f.replica("replica-a", &timing, &[])?;
    let mut b = f.replica("replica-b", &timing, &[])?;
    let leader = single_leader(&f, &[&a, &b], Duration::from_secs(30)).await?;
    let (leader, standby) = if leader == 0 { (&mut a, &mut b) } else { (&mut b, &mut a) };

    leader.signal(Signal::SIGTERM)?;
    let code = leader.wait(Duration::from_secs(30)).await?;
    ensure!(code == Some(0), "SIGTERM exits 0, got {code:?}:\n{}", leader.log_text());
    ensure!(leader.log_text().contains("released the lease"), "{}", leader.log_text());
    eventually(Duration::from_secs(8), "the standby to lead well before the 20 s lease would expire", || async {
        Ok((standby.master_status(&f.lease).await? == 1.0).then_some(()))
    })
    .await?;
    f.create("after-handover").await?;
    f.wait_ready("after-handover", Duration::from_secs(30)).await?;
    f.namespace.delete().await
}

#[tokio::test]
async fn three_candidates_started_together_never_lead_at_once() -> Result<()> {
    let f = fixture("le-race").await?;
    f.create("contested").await?;
    for round in 0..4 {
        let lease = format!("{}-{round}", f.lease);
        let replicas: Vec<OperatorProcess> = (0..3)
            .map(|i| f.replica_on(&lease, &format!("round{round}-{i}"), &TEST_LEASE, &[]))
            .collect::<Result<_>>()?;
        let refs: Vec<&OperatorProcess> = replicas.iter().collect();
        let leader = single_leader_of(&f, &lease, &refs, Duration::from_secs(30)).await?;
        // Give the others every chance to (wrongly) start: several retry periods.
        eventually(Duration::from_secs(30), "the leader to reconcile", || async {
            Ok((replicas[leader].reconciles().await? >= 1.0).then_some(()))
        })
        .await?;
        for (index, replica) in replicas.iter().enumerate().filter(|(i, _)| *i != leader) {
            ensure!(replica.master_status(&lease).await? == 0.0, "round {round}: replica {index} also leads");
            ensure!(replica.reconciles().await? == 0.0, "round {round}: replica {index} reconciled while not leading");
        }
    }
    f.namespace.delete().await
}

#[tokio::test]
async fn a_leader_that_sees_another_holder_stops_and_exits_non_zero() -> Result<()> {
    let f = fixture("le-lost").await?;
    let mut a = f.replica("replica-a", &TEST_LEASE, &[])?;
    single_leader(&f, &[&a], Duration::from_secs(30)).await?;

    // Another holder takes the lease (as a racing candidate's write would).
    let leases: Api<Lease> = Api::namespaced(f.client.clone(), &f.namespace.name);
    let now = format!("{:.6}", k8s_openapi::jiff::Timestamp::now()); // MicroTime: exactly 6 digits
    let takeover = json!({"spec": {"holderIdentity": "intruder", "renewTime": now, "acquireTime": now, "leaseDurationSeconds": 60}});
    leases.patch(&f.lease, &PatchParams::default(), &Patch::Merge(takeover)).await?;
    let code = a.wait(Duration::from_secs(15)).await?;
    ensure!(code == Some(1), "losing the lease exits 1, got {code:?}:\n{}", a.log_text());
    ensure!(a.log_text().contains("stopped leading"), "{}", a.log_text());

    // Told to re-enter the election, a replica that loses keeps running as a candidate.
    let b = f.replica("replica-b", &TEST_LEASE, &["--reenter-election-on-loss=true"])?;
    let free = json!({"spec": {"holderIdentity": "", "leaseDurationSeconds": 1}});
    leases.patch(&f.lease, &PatchParams::default(), &Patch::Merge(free)).await?;
    single_leader(&f, &[&b], Duration::from_secs(30)).await?;
    let now = format!("{:.6}", k8s_openapi::jiff::Timestamp::now()); // MicroTime: exactly 6 digits
    let takeover = json!({"spec": {"holderIdentity": "intruder", "renewTime": now, "acquireTime": now, "leaseDurationSeconds": 3}});
    leases.patch(&f.lease, &PatchParams::default(), &Patch::Merge(takeover)).await?;
    eventually(Duration::from_secs(15), "the replica to step back to standby", || async {
        Ok((b.master_status(&f.lease).await? == 0.0).then_some(()))
    })
    .await?;
    // When the intruder's lease expires, it leads again.
    single_leader(&f, &[&b], Duration::from_secs(30)).await?;
    f.namespace.delete().await
}

#[tokio::test]
async fn invalid_flag_combinations_fail_with_a_clear_message() -> Result<()> {
    let run = |args: &[&str]| -> Result<(Option<i32>, String)> {
        let output = std::process::Command::new(operator_binary()?).args(args).output()?;
        Ok((output.status.code(), String::from_utf8_lossy(&output.stderr).into_owned()))
    };
    let (code, stderr) = run(&["--lease-duration", "5s", "--renew-deadline", "6s"])?;
    ensure!(code == Some(2), "exit code {code:?}");
    ensure!(stderr.contains("--lease-duration (5s) must be greater than --renew-deadline (6s)"), "{stderr}");
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
