//! Secure metrics against the local API server with real ServiceAccount tokens: `/metrics` is
//! HTTPS and answers 401 without a valid token, 403 to a ServiceAccount the chart's
//! metrics-reader ClusterRole is not bound to, and 200 to one it is; probes need no token, on a
//! shared port too; a mounted certificate is served and replaced when its files change.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use e2e_tests::{Fixture, eventually, helm, stdout_of, succeeded};
use operator::check::{Answer, Request, get};

fn chart() -> String {
    e2e_tests::chart_dir().display().to_string()
}

/// A token of ServiceAccount `name` (created if missing) from the TokenRequest API.
fn token_of(f: &Fixture, name: &str) -> Result<String> {
    let created = f.cluster.kubectl(&["create", "serviceaccount", name, "-n", f.ns()])?;
    ensure!(
        created.status.success() || String::from_utf8_lossy(&created.stderr).contains("already exists"),
        "creating ServiceAccount {name}: {}",
        String::from_utf8_lossy(&created.stderr)
    );
    Ok(stdout_of(&f.cluster.kubectl(&["create", "token", name, "-n", f.ns(), "--duration=1h"])?)?.trim().to_owned())
}

/// Applies the chart's secure-metrics RBAC for release `release` and returns the name of its
/// metrics-reader ClusterRole. The caller deletes the cluster-scoped objects.
fn apply_the_charts_metrics_rbac(f: &Fixture, release: &str) -> Result<String> {
    let rendered = succeeded(helm(
        &f.cluster,
        &["template", release, &chart(), "--namespace", f.ns(), "--show-only", "templates/metrics-rbac.yaml"],
    )?)?;
    succeeded(f.cluster.kubectl_with_input(&["apply", "-f", "-"], Some(&rendered))?)?;
    Ok(format!("{release}-example-operator-metrics-reader"))
}

/// A token of ServiceAccount `reader`, bound to the chart's metrics-reader ClusterRole for
/// release `release` (the binding carries the release label, so [`remove_cluster_objects`]
/// removes it).
fn a_metrics_reader(f: &Fixture, release: &str) -> Result<String> {
    let reader_role = apply_the_charts_metrics_rbac(f, release)?;
    let reader = token_of(f, "reader")?;
    let binding = format!("{release}-reader");
    let account = format!("{}:reader", f.ns());
    succeeded(f.cluster.kubectl(&[
        "create",
        "clusterrolebinding",
        &binding,
        "--clusterrole",
        &reader_role,
        "--serviceaccount",
        &account,
    ])?)?;
    let _ =
        f.cluster.kubectl(&["label", "clusterrolebinding", &binding, &format!("app.kubernetes.io/instance={release}")]);
    Ok(reader)
}

fn remove_cluster_objects(f: &Fixture, release: &str) {
    for kind in ["clusterrolebinding", "clusterrole"] {
        let _ = f.cluster.kubectl(&["delete", kind, "-l", &format!("app.kubernetes.io/instance={release}")]);
    }
}

fn insecure(token: Option<&str>) -> Request {
    Request { token: token.map(str::to_owned), insecure_skip_tls_verify: true, ..Request::default() }
}

async fn answer(url: &str, request: &Request) -> Result<Answer> {
    get(url, request).await.with_context(|| format!("GET {url}"))
}

#[tokio::test]
async fn metrics_answer_only_callers_the_api_server_allows_and_probes_stay_open() -> Result<()> {
    let f = Fixture::new("secure-metrics").await?;
    let release = f.ns().to_owned();
    let result = async {
        let reader = a_metrics_reader(&f, &release)?;
        let stranger = token_of(&f, "stranger")?;

        // Metrics and probes share the port here (the harder case for keeping probes open).
        let operator = f.replica("secure", "secure-leader", &["--metrics-secure"])?;
        let base = format!("https://127.0.0.1:{}", operator.metrics_port);
        let metrics = format!("{base}/metrics");

        let anonymous = answer(&metrics, &insecure(None)).await?;
        ensure!(anonymous.code == 401, "no token: {} {}", anonymous.code, anonymous.body);
        let forged = answer(&metrics, &insecure(Some("not-a-token"))).await?;
        ensure!(forged.code == 401, "an invalid token: {} {}", forged.code, forged.body);
        let refused = answer(&metrics, &insecure(Some(&stranger))).await?;
        ensure!(refused.code == 403, "without the metrics-reader role: {} {}", refused.code, refused.body);
        ensure!(refused.body == "Forbidden\n", "the refusal says nothing more: {}", refused.body);
        eventually(Duration::from_secs(5), "the log to say why", || async {
            Ok(operator.log_text().contains("may not get /metrics").then_some(()))
        })
        .await?;

        let allowed = answer(&metrics, &insecure(Some(&reader))).await?;
        ensure!(allowed.code == 200, "with the metrics-reader role: {} {}", allowed.code, allowed.body);
        ensure!(
            allowed.body.contains("controller_runtime_reconcile_total{controller=\"myresource\",result=\"success\"} 0"),
            "the answer is the metrics text:\n{}",
            allowed.body
        );
        ensure!(allowed.certificate.is_some(), "the answer came over TLS");

        for probe in ["/healthz", "/readyz"] {
            let probed = answer(&format!("{base}{probe}"), &insecure(None)).await?;
            ensure!(probed.code == 200, "{probe} without a token: {} {}", probed.code, probed.body);
        }
        // Nothing is served in the clear on the secure port.
        let plain = get(&format!("http://127.0.0.1:{}/metrics", operator.metrics_port), &Request::default()).await;
        ensure!(plain.map(|a| a.code != 200).unwrap_or(true), "plain HTTP must not get metrics");
        Ok(())
    }
    .await;
    remove_cluster_objects(&f, &release);
    result
}

#[tokio::test]
async fn the_charts_metrics_auth_role_is_exactly_what_checking_a_caller_needs() -> Result<()> {
    use k8s_openapi::api::rbac::v1::ClusterRole;
    use kube::api::{Api, Patch, PatchParams};
    let f = Fixture::new("metrics-auth").await?;
    let release = f.ns().to_owned();
    let result = async {
        // The release's ServiceAccount, which the chart lets check callers, serves a reader.
        let reader = a_metrics_reader(&f, &release)?;
        let account = format!("{release}-example-operator");
        let token = token_of(&f, &account)?;
        let kubeconfig = f.cluster.kubeconfig_with_token(&account, &token).await?;
        let operator = e2e_tests::OperatorProcess::spawn(
            &kubeconfig,
            "metrics-auth",
            "metrics-auth-leader",
            f.ns(),
            &["--leader-elect=false", "--metrics-secure"],
            &[],
        )?;
        let metrics = format!("https://127.0.0.1:{}/metrics", operator.metrics_port);
        let allowed = answer(&metrics, &insecure(Some(&reader))).await?;
        ensure!(allowed.code == 200, "with the chart's RBAC: {} {}", allowed.code, allowed.body);

        let roles: Api<ClusterRole> = Api::all(f.client.clone());
        let role = format!("{release}-example-operator-metrics-auth");
        let rules = roles.get(&role).await?.rules.unwrap_or_default();
        ensure!(rules.len() == 2, "TokenReview and SubjectAccessReview: {rules:?}");
        for index in 0..rules.len() {
            let mut fewer = rules.clone();
            let removed = fewer.remove(index);
            roles.patch(&role, &PatchParams::default(), &Patch::Merge(serde_json::json!({"rules": fewer}))).await?;
            // A fresh token each time: answers are remembered per token.
            let fresh = token_of(&f, "reader")?;
            eventually(Duration::from_secs(20), &format!("a refusal without {:?}", removed.resources), || async {
                Ok(answer(&metrics, &insecure(Some(&fresh))).await.ok().filter(|a| a.code == 503).map(|_| ()))
            })
            .await?;
            roles.patch(&role, &PatchParams::default(), &Patch::Merge(serde_json::json!({"rules": rules}))).await?;
        }
        ensure!(operator.log_text().contains("cannot check a metrics caller"), "the failure is logged");
        Ok(())
    }
    .await;
    remove_cluster_objects(&f, &release);
    result
}

/// Writes a certificate for 127.0.0.1 and its key into `dir`; returns the certificate (PEM, DER).
fn write_pair(dir: &Path) -> Result<(String, Vec<u8>)> {
    let generated = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()])?;
    // Written beside and renamed into place, as the kubelet swaps a Secret volume's files.
    for (name, content) in [("tls.key", generated.signing_key.serialize_pem()), ("tls.crt", generated.cert.pem())] {
        let staged = dir.join(format!(".{name}.new"));
        std::fs::write(&staged, content)?;
        std::fs::rename(&staged, dir.join(name))?;
    }
    Ok((generated.cert.pem(), generated.cert.der().to_vec()))
}

#[tokio::test]
async fn a_mounted_certificate_is_served_and_replaced_without_a_restart() -> Result<()> {
    let f = Fixture::new("metrics-cert").await?;
    let dir = std::env::temp_dir().join(format!("metrics-cert-{}", f.ns()));
    std::fs::create_dir_all(&dir)?;
    let (first_pem, first_der) = write_pair(&dir)?;
    // Separate ports, chosen here: the metrics port is HTTPS, the probe port stays plain HTTP.
    let (metrics_port, probe_port) = (xtask::harness::free_port()?, xtask::harness::free_port()?);
    let log = dir.join("operator.log");
    let _operator = tokio::process::Command::new(e2e_tests::operator_binary()?)
        .args(["--kubeconfig", &f.cluster.admin_kubeconfig.display().to_string()])
        .args(["--leader-elect=false", "--watch-namespace", f.ns()])
        .args(["--metrics-bind-address", &format!("127.0.0.1:{metrics_port}")])
        .args(["--health-probe-bind-address", &format!("127.0.0.1:{probe_port}")])
        .args(["--metrics-secure", "--metrics-cert-dir", &dir.display().to_string()])
        .stdout(std::fs::File::create(&log)?)
        .stderr(std::fs::File::create(dir.join("operator.err"))?)
        .kill_on_drop(true)
        .spawn()?;
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
    eventually(Duration::from_secs(30), "/readyz on the plain probe port", || async {
        Ok(xtask::harness::http_get(probe_port, "/readyz").await.ok().filter(|(code, _)| *code == 200).map(|_| ()))
    })
    .await
    .with_context(log_text)?;
    let metrics = format!("https://127.0.0.1:{metrics_port}/metrics");

    // Verified for real against the mounted certificate (its name is 127.0.0.1).
    let trusting = |pem: &str| Request { ca_pem: Some(pem.as_bytes().to_vec()), ..Request::default() };
    let first = answer(&metrics, &trusting(&first_pem)).await?;
    ensure!(first.certificate.as_deref() == Some(first_der.as_slice()), "the mounted certificate is served");
    ensure!(first.code == 401, "still no metrics without a token: {}", first.code);

    let (second_pem, second_der) = write_pair(&dir)?;
    eventually(Duration::from_secs(30), "the replaced certificate to be served", || async {
        Ok(get(&metrics, &trusting(&second_pem))
            .await
            .ok()
            .filter(|a| a.certificate.as_deref() == Some(second_der.as_slice()))
            .map(|_| ()))
    })
    .await?;
    ensure!(get(&metrics, &trusting(&first_pem)).await.is_err(), "the old certificate is no longer trusted");

    ensure!(log_text().contains("reloaded the metrics certificate"), "the reload is logged");
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

#[tokio::test]
async fn a_certificate_folder_without_a_pair_stops_the_start_with_the_file_named() -> Result<()> {
    let f = Fixture::new("metrics-nocert").await?;
    let empty = std::env::temp_dir().join(format!("metrics-nocert-{}", f.ns()));
    std::fs::create_dir_all(&empty)?;
    let output = tokio::process::Command::new(e2e_tests::operator_binary()?)
        .args(["--kubeconfig", &f.cluster.admin_kubeconfig.display().to_string()])
        .args(["--leader-elect=false", "--metrics-bind-address", "127.0.0.1:0", "--health-probe-bind-address", "0"])
        .args(["--metrics-secure", "--metrics-cert-dir", &empty.display().to_string()])
        .output()
        .await?;
    let stderr = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    ensure!(!output.status.success(), "the operator must not start without its certificate");
    ensure!(stderr.contains("tls.crt"), "the error names the missing file: {stderr}");
    std::fs::remove_dir_all(&empty)?;
    Ok(())
}

/// Tried as anyone who reaches the Pod: 1,000 idle connections and 10,000 requests with random
/// tokens (shaped like tokens, so each could cost a review) leave `/healthz`, the Lease and the
/// scraper's access intact: every random token is refused (401, or 503 once the reviews under
/// way reach their cap), never let in, and the scraper is answered 200 throughout. Tokens that
/// are oversized or not shaped like one cost no review at all.
#[tokio::test]
async fn idle_connections_and_random_tokens_leave_probes_the_lease_and_the_scraper_alone() -> Result<()> {
    use futures::StreamExt;
    let f = Fixture::new("metrics-flood").await?;
    let release = f.ns().to_owned();
    let result = async {
        let reader = a_metrics_reader(&f, &release)?;
        let mut args: Vec<&str> = e2e_tests::TEST_LEASE.to_vec();
        args.push("--metrics-secure");
        let mut operator = f.replica("flood", "flood-leader", &args)?;
        eventually(Duration::from_secs(30), "the replica to lead", || async {
            Ok((f.lease_holder("flood-leader").await?.as_deref() == Some("flood")).then_some(()))
        })
        .await?;
        let base = format!("https://127.0.0.1:{}", operator.metrics_port);
        let metrics = format!("{base}/metrics");
        let scraper = insecure(Some(&reader));
        ensure!(answer(&metrics, &scraper).await?.code == 200, "the scraper is let in before the flood");

        // Oversized tokens, or ones not shaped like a token, are refused without a review: the
        // operator's own request count does not move.
        let posts = |text: &str| e2e_tests::sum_samples(text, "rest_client_requests_total", "method=\"POST\"");
        let before = posts(&answer(&metrics, &scraper).await?.body);
        for junk in ["x".repeat(9 * 1024), "not a token at all".to_owned(), "quote\"d".to_owned()] {
            let refused = answer(&metrics, &insecure(Some(&junk))).await?;
            ensure!(refused.code == 401 && refused.body == "Unauthorized\n", "{} {}", refused.code, refused.body);
        }
        let after = posts(&answer(&metrics, &scraper).await?.body);
        ensure!(after == before, "malformed tokens cost {} reviews", after - before);

        // Metrics and probes share the port here: the harder case.
        let mut idle = Vec::new();
        for _ in 0..1000 {
            idle.push(tokio::net::TcpStream::connect(("127.0.0.1", operator.metrics_port)).await?);
        }
        let flood = futures::stream::iter(0..10_000)
            .map(|index| {
                let metrics = metrics.clone();
                async move {
                    let token = format!("random{index}.{:016x}", rand::random::<u64>());
                    answer(&metrics, &insecure(Some(&token))).await.map(|a| a.code)
                }
            })
            .buffer_unordered(32)
            .collect::<Vec<_>>();
        let watch = async {
            let mut checks = 0;
            loop {
                let probed = answer(&format!("{base}/healthz"), &insecure(None)).await?;
                ensure!(probed.code == 200, "/healthz during the flood: {} {}", probed.code, probed.body);
                let scraped = answer(&metrics, &scraper).await?;
                ensure!(scraped.code == 200, "the scraper during the flood: {} {}", scraped.code, scraped.body);
                checks += 1;
                tokio::time::sleep(Duration::from_millis(200)).await;
                if checks >= 10_000 {
                    return Ok::<_, anyhow::Error>(checks);
                }
            }
        };
        let codes = tokio::select! {
            codes = flood => codes,
            failed = watch => return Err(failed.err().unwrap_or_else(|| anyhow::anyhow!("the watch ended"))),
        };
        drop(idle);
        let mut refused = (0, 0);
        for code in codes {
            match code? {
                401 => refused.0 += 1,
                503 => refused.1 += 1,
                other => anyhow::bail!("a random token was answered {other}"),
            }
        }
        eprintln!("random tokens: {} answered 401, {} answered 503 (reviews at their cap)", refused.0, refused.1);
        ensure!(answer(&metrics, &scraper).await?.code == 200, "the scraper after the flood");
        ensure!(f.lease_holder("flood-leader").await?.as_deref() == Some("flood"), "the Lease moved");
        ensure!(
            operator.wait(Duration::from_millis(10)).await.is_err(),
            "the replica exited:\n{}",
            operator.log_text()
        );
        Ok(())
    }
    .await;
    remove_cluster_objects(&f, &release);
    result
}
