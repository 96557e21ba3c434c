//! The edges of a leadership term against the local control plane, proven from the API server's
//! audit log: a Lease deleted by hand (a common way to "unstick" an election) never yields two
//! leaders and never interrupts a healthy leader's term.
//! Every test names its replicas uniquely: the audit proof tells writers apart by identity.

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
    let mut a = f.replica("deleted-a", LEASE, &TEST_LEASE)?;
    leads(&f, &a, Duration::from_secs(30)).await?;
    let b = f.replica("deleted-b", LEASE, &TEST_LEASE)?;
    for round in 0..8 {
        f.create(&format!("before-{round}"), "written across deletions").await?;
        delete_lease(&f).await?;
        // Sample both replicas while the Lease is gone and until the leader re-created it.
        eventually(Duration::from_secs(10), "the leader to re-create its Lease", || async {
            at_most_one_leads(&[&a, &b]).await?;
            Ok((f.lease_holder(LEASE).await?.as_deref() == Some("deleted-a")).then_some(()))
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
    let holders = holders(&f, &["deleted-a", "deleted-b"])?;
    ensure!(holders.iter().all(|h| h == "deleted-a"), "the Lease named another holder: {holders:?}");
    ensure!(b.reconciles().await? == 0.0, "the standby reconciled");
    Ok(())
}

#[tokio::test]
async fn a_lone_leader_recreates_its_deleted_lease_and_keeps_leading() -> Result<()> {
    let f = Fixture::new("term-lone").await?;
    let mut a = f.replica("lone-a", LEASE, &TEST_LEASE)?;
    leads(&f, &a, Duration::from_secs(30)).await?;
    for round in 0..3 {
        delete_lease(&f).await?;
        leads(&f, &a, Duration::from_secs(5)).await?;
        f.create(&format!("after-{round}"), "still converging").await?;
        f.wait_ready(&format!("after-{round}"), Duration::from_secs(30)).await?;
    }
    ensure!(a.wait(Duration::from_millis(10)).await.is_err(), "the leader exited:\n{}", a.log_text());
    let holders = holders(&f, &["lone-a"])?;
    ensure!(holders.iter().all(|h| h == "lone-a"), "{holders:?}");
    Ok(())
}

#[tokio::test]
async fn a_candidate_started_just_after_a_deletion_does_not_take_the_lease() -> Result<()> {
    use nix::sys::signal::Signal;
    let f = Fixture::new("term-late").await?;
    // A lease of 8 s (renew deadline 6 s), so the leader can be held still for a few seconds.
    let timing = ["--lease-duration", "8s", "--renew-deadline", "6s", "--retry-period", "1s"];
    let a = f.replica("late-a", LEASE, &timing)?;
    leads(&f, &a, Duration::from_secs(30)).await?;
    // The leader, held still (well within its renew deadline), cannot re-create the Lease before
    // the candidate started after the deletion has looked and found none.
    a.signal(Signal::SIGSTOP)?;
    let held = async {
        delete_lease(&f).await?;
        let b = f.replica("late-b", LEASE, &timing)?;
        eventually(Duration::from_secs(3), "the candidate to find no Lease", || async {
            Ok(b.log_text().contains("the lease is gone; waiting out").then_some(()))
        })
        .await?;
        Ok::<_, anyhow::Error>(b)
    }
    .await;
    a.signal(Signal::SIGCONT)?;
    let b = held?;
    // It must not create the Lease while the leader lives: past its own wait of a lease duration.
    let until = tokio::time::Instant::now() + Duration::from_secs(10);
    while tokio::time::Instant::now() < until {
        at_most_one_leads(&[&a, &b]).await?;
        ensure!(b.master_status(LEASE).await? == 0.0, "the late candidate leads");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    leads(&f, &a, Duration::from_secs(5)).await?;
    f.create("converges", "under the first leader").await?;
    f.wait_ready("converges", Duration::from_secs(30)).await?;
    let holders = holders(&f, &["late-a", "late-b"])?;
    ensure!(holders.iter().all(|h| h == "late-a"), "{holders:?}");
    ensure!(b.reconciles().await? == 0.0, "the late candidate reconciled");
    Ok(())
}

/// A client that sent half a request, and another that sent nothing, do not keep the process
/// alive after SIGTERM: with and without leader election (idle controllers) it exits 0 within
/// 8 s, the servers' 5 s grace and a margin, while both still hold their connections.
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
        // The servers close what is open 5 s after the term ended, before the 10 s header read
        // timeout would have.
        let code = replica.wait(Duration::from_secs(8)).await;
        ensure!(
            matches!(code, Ok(Some(0))),
            "election {election}: the replica did not exit 0 within 8 s of SIGTERM ({code:?}):\n{}",
            replica.log_text()
        );
        drop((half_sent, silent));
    }
    Ok(())
}

/// SIGTERM while the leader's reconciles and events are slowed on their way to the API server
/// (2 s each way, through a proxy) and the drain (0.5 s) runs out: the drain is aborted, the
/// Lease is not released, so the standby takes over only after it expires, by which time
/// everything the old leader had on the wire has arrived. The audit log shows no write of the old
/// leader after the new one's first, events included, and every change converges. (A lease of
/// 8 s, renew deadline 6 s: a write's bound, the renew deadline after the last renewal, leaves
/// room for the 4 s round trip.)
#[tokio::test]
async fn sigterm_with_writes_in_flight_past_the_drain_never_yields_two_writers() -> Result<()> {
    use e2e_tests::fault_proxy::{Fault, FaultProxy};
    let f = Fixture::new("term-inflight").await?;
    let proxy = FaultProxy::start(f.cluster.api_server_address().await?).await?;
    let via_proxy = f.cluster.admin_kubeconfig_via(proxy.port)?;
    let direct = f.cluster.admin_kubeconfig.display().to_string();
    let timing = ["--lease-duration", "8s", "--renew-deadline", "6s", "--retry-period", "1s"];
    let mut args: Vec<&str> = timing.to_vec();
    args.extend(["--leader-election-kubeconfig", direct.as_str(), "--shutdown-timeout", "500ms"]);
    args.extend(["--concurrency", "myresource=16"]);
    let mut a = OperatorProcess::spawn(&via_proxy, "inflight-a", LEASE, f.ns(), &args, &[])?;
    leads(&f, &a, Duration::from_secs(30)).await?;
    let b = f.replica("inflight-b", LEASE, &timing)?;
    let names: Vec<String> = (0..10).map(|i| format!("inflight-{i}")).collect();
    for name in &names {
        f.create(name, "first").await?;
    }
    for name in &names {
        f.wait_ready(name, Duration::from_secs(30)).await?;
    }

    let delay = Duration::from_secs(2);
    proxy.set(Fault::Delay(delay));
    let patch = serde_json::json!({"spec": {"message": "second"}});
    for name in &names {
        f.resources.patch(name, &kube::api::PatchParams::default(), &kube::api::Patch::Merge(&patch)).await?;
    }
    // A reconcile of the change writes the ConfigMap (it lands `delay` after it was sent), waits
    // `delay` for the answer, then sends its status write (an apply that nothing but the term
    // can fence). SIGTERM lands while those status writes are on the wire, and the drain (0.5 s)
    // ends before they arrive.
    eventually(Duration::from_secs(20), "the first ConfigMap to hold the change", || async {
        for name in &names {
            let config_map = f.config_maps.get_opt(&format!("{name}-configmap")).await?;
            if config_map.and_then(|c| c.data).and_then(|mut d| d.remove("message")).as_deref() == Some("second") {
                return Ok(Some(()));
            }
        }
        Ok(None)
    })
    .await?;
    tokio::time::sleep(delay + Duration::from_millis(500)).await;
    a.signal(nix::sys::signal::Signal::SIGTERM)?;
    let code = a.wait(Duration::from_secs(20)).await?;
    ensure!(code == Some(0), "the old leader exited {code:?}:\n{}", a.log_text());
    ensure!(a.log_text().contains("not releasing the lease: a write of this term was given up"), "{}", a.log_text());

    leads(&f, &b, Duration::from_secs(30)).await?;
    for name in &names {
        eventually(Duration::from_secs(60), &format!("{name} to hold the change"), || async {
            let config_map = f.config_maps.get_opt(&format!("{name}-configmap")).await?;
            let message = config_map.and_then(|c| c.data).and_then(|mut d| d.remove("message"));
            Ok((message.as_deref() == Some("second")).then_some(()))
        })
        .await?;
        f.wait_ready(name, Duration::from_secs(30)).await?;
    }
    // Everything the proxy still held has arrived by now.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let report = f.one_writer_at_a_time(LEASE, &["inflight-a", "inflight-b"], true)?;
    ensure!(report.writes_of("inflight-b") > 0, "the new leader wrote nothing: {report:?}");
    Ok(())
}

/// The operator's own requests throttled hard by API Priority and Fairness (a priority level of
/// one share that rejects what does not fit), with the chart's opt-in FlowSchema putting its
/// Lease requests into the built-in `leader-election` level: the leader keeps its Lease through
/// a burst of 100 objects, every object converges, the API server counts the rejections, and
/// the operator's `rest_client_requests_total` shows them as 429.
#[tokio::test]
async fn a_throttled_leader_keeps_its_lease_through_the_charts_flow_schema() -> Result<()> {
    use k8s_openapi::api::core::v1::ServiceAccount;
    let f = Fixture::new("term-throttled").await?;
    let account = "throttled";
    let tight = format!("e2e-tight-{}", f.ns());
    let accounts: Api<ServiceAccount> = Api::namespaced(f.client.clone(), f.ns());
    accounts
        .create(&Default::default(), &serde_json::from_value(serde_json::json!({"metadata": {"name": account}}))?)
        .await?;
    let cluster_wide = serde_json::json!([
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
         "metadata": {"name": tight},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "cluster-admin"},
         "subjects": [{"kind": "ServiceAccount", "name": account, "namespace": f.ns()}]},
        {"apiVersion": "flowcontrol.apiserver.k8s.io/v1", "kind": "PriorityLevelConfiguration",
         "metadata": {"name": tight},
         "spec": {"type": "Limited", "limited": {"nominalConcurrencyShares": 1, "lendablePercent": 0,
                  "limitResponse": {"type": "Reject"}}}},
        {"apiVersion": "flowcontrol.apiserver.k8s.io/v1", "kind": "FlowSchema",
         "metadata": {"name": tight},
         "spec": {"priorityLevelConfiguration": {"name": tight}, "matchingPrecedence": 1000,
                  "distinguisherMethod": {"type": "ByUser"},
                  "rules": [{"subjects": [{"kind": "ServiceAccount", "serviceAccount": {"name": account, "namespace": f.ns()}}],
                             "resourceRules": [{"verbs": ["*"], "apiGroups": ["*"], "resources": ["*"],
                                                "clusterScope": true, "namespaces": ["*"]}]}]}},
    ]);
    let manifests: Vec<String> =
        cluster_wide.as_array().into_iter().flatten().map(serde_yaml::to_string).collect::<Result<_, _>>()?;
    let result = async {
        let output = f.cluster.kubectl_with_input(&["apply", "-f", "-"], Some(&manifests.join("---\n")))?;
        ensure!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        // The chart's own FlowSchema for the release's Lease requests, as `helm template` renders it.
        let rendered = e2e_tests::succeeded(e2e_tests::helm(
            &f.cluster,
            &[
                "template",
                "throttled",
                &e2e_tests::chart_dir().display().to_string(),
                "--namespace",
                f.ns(),
                "--show-only",
                "templates/flowschema.yaml",
                "--set",
                "leaderElection.flowSchema.enabled=true",
                "--set",
                "serviceAccount.create=false",
                "--set",
                &format!("serviceAccount.name={account}"),
            ],
        )?)?;
        let output = f.cluster.kubectl_with_input(&["apply", "-f", "-"], Some(&rendered))?;
        ensure!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        let schema = "throttled-example-operator-leader-election";

        let token = f.cluster.kubectl(&["create", "token", account, "-n", f.ns(), "--duration=1h"])?;
        ensure!(token.status.success(), "{}", String::from_utf8_lossy(&token.stderr));
        let kubeconfig =
            f.cluster.kubeconfig_with_token(account, String::from_utf8_lossy(&token.stdout).trim()).await?;
        let mut args: Vec<&str> = TEST_LEASE.to_vec();
        args.extend(["--concurrency", "myresource=16"]);
        let a = OperatorProcess::spawn(&kubeconfig, "throttled-a", LEASE, f.ns(), &args, &[])?;
        leads(&f, &a, Duration::from_secs(30)).await?;
        let b = OperatorProcess::spawn(&kubeconfig, "throttled-b", LEASE, f.ns(), &args, &[])?;
        // More of the account's traffic keeps the tight level's few seats taken, so the
        // operator's own requests are rejected whatever this machine's speed, until it has seen
        // a 429 (bounded); its Lease requests go through the chart's FlowSchema meanwhile.
        let crowd = e2e_tests::client_for(&kubeconfig).await?;
        let crowding = tokio::spawn(async move {
            let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(crowd);
            let params = kube::api::ListParams::default();
            loop {
                let lists = (0..32).map(|_| namespaces.list(&params));
                futures::future::join_all(lists).await;
            }
        });
        for i in 0..100 {
            f.create(&format!("burst-{i:03}"), "under throttling").await?;
        }
        let seen = eventually(Duration::from_secs(60), "a 429 in the operator's metrics", || async {
            let metrics = a.metrics().await?;
            let throttled = e2e_tests::sum_samples(&metrics, "rest_client_requests_total", "code=\"429\"");
            Ok((throttled > 0.0).then_some(()))
        })
        .await;
        crowding.abort();
        seen?;
        for i in 0..100 {
            f.wait_ready(&format!("burst-{i:03}"), Duration::from_secs(120)).await?;
        }
        let metrics = a.metrics().await?;
        let transitions = e2e_tests::sample(&metrics, "example_operator_leader_transitions_total");
        ensure!(transitions == Some(1.0), "the leader lost its Lease under throttling: {transitions:?}");
        leads(&f, &a, Duration::from_secs(5)).await?;
        ensure!(b.reconciles().await? == 0.0, "the standby reconciled");
        let throttled = e2e_tests::sum_samples(&metrics, "rest_client_requests_total", "code=\"429\"");
        ensure!(throttled > 0.0, "no 429 in the operator's rest_client_requests_total:\n{metrics}");

        // The API server's own account: it rejected the operator's requests in the tight level
        // and served its Lease requests through the chart's FlowSchema in `leader-election`.
        let server = f.client.request_text(http::Request::get("/metrics").body(Vec::new())?).await?;
        let rejected = e2e_tests::sum_samples(
            &server,
            "apiserver_flowcontrol_rejected_requests_total",
            &format!("priority_level=\"{tight}\""),
        );
        ensure!(rejected > 0.0, "the tight priority level rejected nothing");
        let elected = server
            .lines()
            .filter(|line| line.starts_with("apiserver_flowcontrol_dispatched_requests_total{"))
            .filter(|line| line.contains(&format!("flow_schema=\"{schema}\"")))
            .filter(|line| line.contains("priority_level=\"leader-election\""))
            .filter_map(|line| line.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum::<f64>();
        ensure!(elected > 0.0, "no Lease request went through the chart's FlowSchema");
        let lease_rejected = e2e_tests::sum_samples(
            &server,
            "apiserver_flowcontrol_rejected_requests_total",
            &format!("flow_schema=\"{schema}\""),
        );
        ensure!(lease_rejected == 0.0, "{lease_rejected} Lease requests were rejected");
        let report = f.one_writer_at_a_time(LEASE, &["throttled-a", "throttled-b"], true)?;
        ensure!(report.writes_of("throttled-a") >= 200, "{report:?}");
        Ok(())
    }
    .await;
    for kind in ["clusterrolebinding", "prioritylevelconfiguration", "flowschema"] {
        let _ = f.cluster.kubectl(&["delete", kind, &tight, "--ignore-not-found"]);
    }
    let _ = f.cluster.kubectl(&[
        "delete",
        "flowschema",
        "throttled-example-operator-leader-election",
        "--ignore-not-found",
    ]);
    result
}
