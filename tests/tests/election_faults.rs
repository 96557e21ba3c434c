//! Leadership under injected faults, proven from the API server's audit log: whatever happens to
//! a replica's network, clock or process, two replicas never write as leader at once, and
//! nothing is lost. Faults are real: a loopback proxy per replica delays, black-holes or resets
//! its traffic; libfaketime skews a replica's wall clock; processes are killed.
//!
//! The scenarios run one at a time: their bounds are timing bounds, and parallel load on two
//! cores would blur them.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use e2e_tests::fault_proxy::{Fault, FaultProxy};
use e2e_tests::{Fixture, OperatorProcess, TEST_LEASE, eventually};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{Api, PostParams};
use nix::sys::signal::Signal;
use tokio::sync::Mutex;

static ONE_AT_A_TIME: Mutex<()> = Mutex::const_new(());

/// The lease duration in TEST_LEASE.
const LEASE: Duration = Duration::from_secs(4);
/// The retry period in TEST_LEASE, and its jitter factor.
const RETRY_WITH_JITTER: Duration = Duration::from_millis(600);

/// A replica whose controllers and election each reach the API server through a proxy of
/// their own, so a test can fault one without the other.
struct ProxiedReplica {
    process: OperatorProcess,
    api: FaultProxy,
    election: FaultProxy,
}

async fn proxied(
    f: &Fixture,
    identity: &str,
    lease: &str,
    args: &[&str],
    env: &[(&str, &str)],
) -> Result<ProxiedReplica> {
    let upstream = f.cluster.api_server_address().await?;
    let api = FaultProxy::start(upstream).await?;
    let election = FaultProxy::start(upstream).await?;
    let api_kubeconfig = f.cluster.admin_kubeconfig_via(api.port)?;
    let election_kubeconfig = f.cluster.admin_kubeconfig_via(election.port)?;
    let election_arg = election_kubeconfig.display().to_string();
    let mut all: Vec<&str> = vec!["--leader-election-kubeconfig", &election_arg];
    all.extend_from_slice(args);
    let process = OperatorProcess::spawn(&api_kubeconfig, identity, lease, f.ns(), &all, env)?;
    Ok(ProxiedReplica { process, api, election })
}

/// Waits until exactly one of `replicas` leads `lease` (its gauge says so and the Lease names
/// it); returns its index.
async fn the_leader(f: &Fixture, lease: &str, replicas: &[&OperatorProcess], timeout: Duration) -> Result<usize> {
    eventually(timeout, "exactly one replica to lead", || async {
        let mut leading = Vec::new();
        for (index, replica) in replicas.iter().enumerate() {
            if replica.master_status(lease).await.unwrap_or(0.0) == 1.0 {
                leading.push(index);
            }
        }
        let holder = f.lease_holder(lease).await?;
        Ok(match leading.as_slice() {
            [one] if holder.as_deref() == Some(replicas[*one].identity.as_str()) => Some(*one),
            _ => None,
        })
    })
    .await
}

/// A replica's `controller_runtime_active_workers` for MyResources.
async fn active_workers(replica: &OperatorProcess) -> Result<f64> {
    let metrics = replica.metrics().await?;
    Ok(e2e_tests::sample(&metrics, "controller_runtime_active_workers{controller=\"myresource\"}").unwrap_or(0.0))
}

/// (a) SIGTERM while a reconcile is stuck longer than the lease: the leader keeps renewing
/// through the drain, gives its write up at the end of the term it was sent in, and does not
/// release the Lease while that write may still be on the wire (it is: the proxy holds it 5 s);
/// the standby takes over once the Lease expires and writes nothing before.
#[tokio::test]
async fn sigterm_during_a_reconcile_stuck_longer_than_the_lease_never_makes_two_writers() -> Result<()> {
    let _serial = ONE_AT_A_TIME.lock().await;
    let f = Fixture::new("ef-drain").await?;
    let lease = "drain-leader";
    let args: Vec<&str> = TEST_LEASE.iter().copied().chain(["--shutdown-timeout", "45s"]).collect();
    let mut a = proxied(&f, "drain-a", lease, &args, &[]).await?;
    let mut b = proxied(&f, "drain-b", lease, &args, &[]).await?;
    let leader = the_leader(&f, lease, &[&a.process, &b.process], Duration::from_secs(30)).await?;
    let (leader, standby) = if leader == 0 { (&mut a, &mut b) } else { (&mut b, &mut a) };
    f.create("before", "made before the fault").await?;
    f.wait_ready("before", Duration::from_secs(30)).await?;

    // Every byte between the leader's controllers and the API server now takes 5 s each way:
    // its next reconcile needs about 20 s, five lease durations.
    leader.api.set(Fault::Delay(Duration::from_secs(5)));
    f.create("stuck", "reconciled during the drain").await?;
    eventually(Duration::from_secs(30), "the leader's reconcile of `stuck` to be in flight", || async {
        Ok((active_workers(&leader.process).await? >= 1.0).then_some(()))
    })
    .await?;
    let terminated = Instant::now();
    leader.process.signal(Signal::SIGTERM)?;
    let code = leader.process.wait(Duration::from_secs(60)).await?;
    let drained = terminated.elapsed();
    ensure!(code == Some(0), "SIGTERM exits 0, got {code:?}:\n{}", leader.process.log_text());
    let log = leader.process.log_text();
    ensure!(log.contains("gave up the write at the renew deadline of the leadership"), "{log}");
    ensure!(log.contains("not releasing the lease: a write of this term was given up"), "{log}");
    ensure!(drained < Duration::from_secs(45), "the drain ended with the given-up write: {drained:?}");

    eventually(LEASE * 3, "the standby to lead once the Lease expired", || async {
        Ok((standby.process.master_status(lease).await? == 1.0).then_some(()))
    })
    .await?;
    f.create("after", "made after the hand-over").await?;
    for name in ["before", "stuck", "after"] {
        f.wait_ready(name, Duration::from_secs(30)).await?;
    }
    let report = f.one_writer_at_a_time(lease, &[&leader.process.identity, &standby.process.identity], true)?;
    let leader_writes = report.writes_of(&leader.process.identity);
    ensure!(leader_writes >= 2, "the leader's writes are in the audit log: {report:?}");
    ensure!(report.writes_of(&standby.process.identity) >= 1, "the standby wrote after the hand-over: {report:?}");
    // Not released: the standby's takeover came a lease duration after the leader's last renewal.
    let takeover = report
        .holders
        .iter()
        .position(|(_, holder)| *holder == standby.process.identity)
        .context("the standby's takeover is in the audit log")?;
    let (last_renewal, _) = report.holders[..takeover]
        .iter()
        .rev()
        .find(|(_, holder)| *holder == leader.process.identity)
        .context("the leader's renewals are in the audit log")?;
    let gap = report.holders[takeover].0.duration_since(*last_renewal).as_secs_f64();
    ensure!(gap >= LEASE.as_secs_f64() - 0.1, "the standby took over {gap:.2} s after the last renewal");
    Ok(())
}

/// Writes Lease `name` as held by a replica that is gone, with a 1 s duration: expired for
/// anyone who watches it for a second.
async fn abandoned_lease(f: &Fixture, name: &str) -> Result<()> {
    let leases: Api<Lease> = Api::namespaced(f.client.clone(), f.ns());
    let now = MicroTime(k8s_openapi::jiff::Timestamp::now());
    let lease: Lease = serde_json::from_value(serde_json::json!({
        "metadata": {"name": name},
        "spec": {"holderIdentity": "departed", "leaseDurationSeconds": 1, "leaseTransitions": 7,
                 "acquireTime": now, "renewTime": now},
    }))?;
    leases.create(&PostParams::default(), &lease).await?;
    Ok(())
}

/// (b) Three candidates race for an expired Lease, 20 times, while two of them have every Lease
/// request delayed well past the old confirm wait: conditional writes let exactly one win.
#[tokio::test]
async fn three_candidates_racing_with_delayed_lease_writes_never_lead_at_once() -> Result<()> {
    let _serial = ONE_AT_A_TIME.lock().await;
    let f = Fixture::new("ef-race").await?;
    let delay = Duration::from_millis(400);
    for round in 0..20 {
        let lease = format!("race-{round}");
        abandoned_lease(&f, &lease).await?;
        let mut candidates = Vec::new();
        for index in 0..3 {
            let candidate = proxied(&f, &format!("race{round}-{index}"), &lease, &TEST_LEASE, &[]).await?;
            if index > 0 {
                candidate.election.set(Fault::Delay(delay));
            }
            candidates.push(candidate);
        }
        let processes: Vec<&OperatorProcess> = candidates.iter().map(|c| &c.process).collect();
        let winner = the_leader(&f, &lease, &processes, Duration::from_secs(30)).await?;
        let name = format!("round-{round}");
        f.create(&name, "raced for").await?;
        f.wait_ready(&name, Duration::from_secs(30)).await?;
        for (index, candidate) in processes.iter().enumerate().filter(|(i, _)| *i != winner) {
            ensure!(candidate.master_status(&lease).await? == 0.0, "round {round}: candidate {index} also leads");
            ensure!(candidate.reconciles().await? == 0.0, "round {round}: candidate {index} reconciled");
        }
        let identities: Vec<&str> = processes.iter().map(|p| p.identity.as_str()).collect();
        let report = f.one_writer_at_a_time(&lease, &identities, true)?;
        let winner_id = identities[winner];
        ensure!(report.writes_of(winner_id) >= 1, "round {round}: the winner's writes are recorded: {report:?}");
        let lease_wins = report.holders.iter().filter(|(_, holder)| identities.contains(&holder.as_str()));
        let holders: std::collections::BTreeSet<&str> = lease_wins.map(|(_, holder)| holder.as_str()).collect();
        ensure!(holders.len() == 1, "round {round}: the API server accepted Lease takeovers by {holders:?}");
    }
    Ok(())
}

/// (c) The leader is cut off from the API server (everything it sends is dropped) while the
/// standby still reaches it: the leader stops writing before the standby's first write, and
/// exits 1.
#[tokio::test]
async fn a_leader_cut_off_from_the_api_server_stops_before_the_standby_writes() -> Result<()> {
    let _serial = ONE_AT_A_TIME.lock().await;
    let f = Fixture::new("ef-cut").await?;
    let lease = "cut-leader";
    let mut a = proxied(&f, "cut-a", lease, &TEST_LEASE, &[]).await?;
    let mut b = proxied(&f, "cut-b", lease, &TEST_LEASE, &[]).await?;
    let leader = the_leader(&f, lease, &[&a.process, &b.process], Duration::from_secs(30)).await?;
    let (leader, standby) = if leader == 0 { (&mut a, &mut b) } else { (&mut b, &mut a) };
    f.create("before", "made before the cut").await?;
    f.wait_ready("before", Duration::from_secs(30)).await?;

    leader.api.set(Fault::BlackHole);
    leader.election.set(Fault::BlackHole);
    let cut = Instant::now();
    f.create("during", "made while the leader is cut off").await?;
    let code = leader.process.wait(Duration::from_secs(20)).await?;
    let stopped = cut.elapsed();
    ensure!(code == Some(1), "a leader that cannot renew exits 1, got {code:?}:\n{}", leader.process.log_text());
    ensure!(stopped < LEASE, "it stopped within the renew deadline, after {stopped:?}");
    eventually(Duration::from_secs(15), "the standby to take over", || async {
        Ok((standby.process.master_status(lease).await? == 1.0).then_some(()))
    })
    .await?;
    f.wait_ready("during", Duration::from_secs(30)).await?;
    let report = f.one_writer_at_a_time(lease, &[&leader.process.identity, &standby.process.identity], true)?;
    ensure!(report.writes_of(&standby.process.identity) >= 1, "{report:?}");
    Ok(())
}

/// The wall-clock offset of a replica's log, from the timestamp of its first JSON log line.
fn log_clock_offset(replica: &OperatorProcess, started: k8s_openapi::jiff::Timestamp) -> Result<i64> {
    let text = replica.log_text();
    let first = text.lines().find_map(|line| serde_json::from_str::<serde_json::Value>(line).ok());
    let stamp: k8s_openapi::jiff::Timestamp =
        first.as_ref().and_then(|l| l["timestamp"].as_str()).context("a JSON log line with a timestamp")?.parse()?;
    Ok(stamp.as_second() - started.as_second())
}

/// libfaketime, from Debian's `faketime` package.
const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

/// (d) Standbys whose clocks run 40 s ahead and 40 s behind never take a healthy leader's
/// Lease, and when the leader dies one of them still takes over within lease duration + one
/// jittered retry period + 1 s.
#[tokio::test]
async fn skewed_standbys_never_take_a_live_lease_and_replace_a_dead_leader_in_time() -> Result<()> {
    let _serial = ONE_AT_A_TIME.lock().await;
    ensure!(std::path::Path::new(LIBFAKETIME).is_file(), "{LIBFAKETIME} is missing: install Debian's faketime package");
    let f = Fixture::new("ef-skew").await?;
    let lease = "skew-leader";
    let json: Vec<&str> = TEST_LEASE.iter().copied().chain(["--log-format", "json"]).collect();
    let mut leader = f.replica("skew-leader-0", lease, &json)?;
    the_leader(&f, lease, &[&leader], Duration::from_secs(30)).await?;

    let started = k8s_openapi::jiff::Timestamp::now();
    let mut standbys = Vec::new();
    for (identity, skew) in [("skew-ahead", "+40s"), ("skew-behind", "-40s")] {
        let env = [("LD_PRELOAD", LIBFAKETIME), ("FAKETIME", skew), ("FAKETIME_DONT_FAKE_MONOTONIC", "1")];
        standbys.push(OperatorProcess::spawn(&f.cluster.admin_kubeconfig, identity, lease, f.ns(), &json, &env)?);
    }
    for (standby, expected) in standbys.iter().zip([40, -40]) {
        let offset = log_clock_offset(standby, started)?;
        ensure!((offset - expected).abs() <= 5, "{}'s clock is off by {offset}s, not {expected}s", standby.identity);
    }

    // Three lease durations of a healthy leader: the Lease never changes hands.
    let watch_until = Instant::now() + LEASE * 3;
    while Instant::now() < watch_until {
        let holder = f.lease_holder(lease).await?;
        ensure!(holder.as_deref() == Some("skew-leader-0"), "a skewed standby took the lease: {holder:?}");
        for standby in &standbys {
            ensure!(standby.master_status(lease).await? == 0.0, "{} claims to lead", standby.identity);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    leader.signal(Signal::SIGKILL)?;
    let killed = Instant::now();
    leader.wait(Duration::from_secs(10)).await?;
    let bound = LEASE + RETRY_WITH_JITTER + Duration::from_secs(1);
    let successor = eventually(bound * 3, "a standby to take over", || async {
        let holder = f.lease_holder(lease).await?;
        Ok(holder.filter(|h| standbys.iter().any(|s| &s.identity == h)))
    })
    .await?;
    let took = killed.elapsed();
    ensure!(took <= bound, "{successor} took over {took:?} after the kill; the bound is {bound:?}");
    f.create("after-kill", "converged by a skewed replica").await?;
    f.wait_ready("after-kill", Duration::from_secs(30)).await?;
    let identities: Vec<&str> =
        std::iter::once("skew-leader-0").chain(standbys.iter().map(|s| s.identity.as_str())).collect();
    let report = f.one_writer_at_a_time(lease, &identities, true)?;
    ensure!(report.writes_of(&successor) >= 1, "{report:?}");
    Ok(())
}

/// (f) Timings that could let two replicas lead, or that the Lease cannot store, are refused
/// at start with the rule they break.
#[tokio::test]
async fn invalid_election_timings_are_refused_at_start() -> Result<()> {
    let refused = |args: &[&str]| -> Result<String> {
        let output = std::process::Command::new(e2e_tests::operator_binary()?).args(args).output()?;
        if output.status.code() != Some(2) {
            bail!("{args:?} exited {:?}", output.status.code());
        }
        Ok(String::from_utf8_lossy(&output.stderr).into_owned())
    };
    let stderr = refused(&["--lease-duration", "11s", "--renew-deadline", "10s", "--retry-period", "2s"])?;
    ensure!(
        stderr.contains("--renew-deadline (10s) + --retry-period (2s) must be less than --lease-duration (11s)"),
        "{stderr}"
    );
    let stderr = refused(&["--lease-duration", "1500ms", "--renew-deadline", "500ms", "--retry-period", "100ms"])?;
    ensure!(stderr.contains("--lease-duration (1s 500ms) must be a whole number of seconds"), "{stderr}");
    let stderr = refused(&["--renew-deadline", "2s", "--retry-period", "2s"])?;
    ensure!(stderr.contains("must be greater than 1.2 × --retry-period"), "{stderr}");
    Ok(())
}
