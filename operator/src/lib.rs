//! The example-operator process: configuration, leader election, HTTP endpoints, telemetry, and
//! the wiring that runs the controllers of the `reconcilers` crate only while this replica leads.

pub mod check;
pub mod client;
pub mod config;
pub mod election;
pub mod health;
pub mod http;
pub mod metrics_auth;
pub mod serving_cert;
pub mod telemetry;

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result};
use tokio_util::sync::CancellationToken;

use config::Config;
use election::{Elector, LeaderMetrics};
use health::Health;

/// Exit code after losing leadership, as client-go operators exit non-zero then.
pub const EXIT_LOST_LEADERSHIP: u8 = 1;

/// Exit code when the controllers stopped on their own while this replica led.
pub const EXIT_CONTROLLERS_FAILED: u8 = 3;

/// The namespace a pod runs in, from its service-account mount.
const IN_CLUSTER_NAMESPACE_FILE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/namespace";

/// Resolves once SIGTERM or SIGINT arrives.
async fn termination_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::error!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("received SIGINT"),
        () = terminate => tracing::info!("received SIGTERM"),
    }
}

/// Runs the operator until a signal (exit 0) or a loss of leadership (exit 1 unless configured
/// to campaign again).
pub async fn run(config: Config) -> Result<ExitCode> {
    let metrics = reconcilers::Metrics::new()?;
    let registry = metrics.registry().clone();
    registry.register(Box::new(prometheus::process_collector::ProcessCollector::for_self()))?;
    let stale_after = config.election.as_ref().map(|e| e.lease_duration + e.retry_period * 2);
    let health = Arc::new(Health::new(stale_after));
    let identity = config.identity.clone();
    let kube_config = client::kube_config(config.kubeconfig.as_deref()).await?;
    let kubeconfig_namespace = kube_config.default_namespace.clone();
    // With leader election, every write of the controllers ends with the term it belongs to.
    let term = config.election.as_ref().map(|_| Arc::new(election::TermDeadline::default()));
    let client = client::build(kube_config, &identity, config.api_request_timeout, term.clone(), &metrics)?;

    let stop_serving = CancellationToken::new();
    let servers = serve_http(&config, registry.clone(), health.clone(), &client, &stop_serving).await?;

    let shutdown = CancellationToken::new();
    tokio::spawn({
        let shutdown = shutdown.clone();
        async move {
            termination_signal().await;
            shutdown.cancel();
        }
    });

    // Caches run on every replica from the start (a warm standby); controllers only while leading.
    let stop_caches = CancellationToken::new();
    let (caches, watching) =
        reconcilers::Caches::new(client.clone(), config.controllers.clone(), metrics.clone(), stop_caches.clone());
    let watching = tokio::spawn(watching);
    health.watch_caches(caches.unsynced());

    let code = match config.election.clone() {
        None => {
            tracing::info!("leader election disabled; starting controllers");
            health.set_leading(true);
            let code =
                run_without_election(caches.controllers(shutdown.clone()), &shutdown, config.shutdown_timeout).await;
            caches.end_term().await;
            code
        }
        Some(election) => {
            let namespace = election
                .lease_namespace
                .clone()
                .or_else(|| std::fs::read_to_string(IN_CLUSTER_NAMESPACE_FILE).ok().map(|ns| ns.trim().to_owned()))
                .unwrap_or(kubeconfig_namespace);
            let leader_metrics = LeaderMetrics::register(&registry)?;
            // The election has connections of its own: slow controller traffic never delays a renewal.
            let election_config =
                client::kube_config(config.election_kubeconfig.as_deref().or(config.kubeconfig.as_deref())).await?;
            let election_client = client::build(election_config, &identity, election.request_timeout, None, &metrics)?;
            let elector = Elector::new(election_client, &namespace, election.clone(), leader_metrics, health.clone())
                .with_term_deadline(term.unwrap_or_default());
            lead_while_elected(&elector, &caches, &config, &shutdown, election.reenter_on_loss).await
        }
    };
    stop_caches.cancel();
    let _ = watching.await;
    stop_serving.cancel();
    for server in servers {
        let _ = server.await;
    }
    Ok(code)
}

/// Starts the metrics and probe servers the configuration asks for. Secure metrics are HTTPS with
/// token authentication; probes sharing their port are served over the same TLS but need no token.
async fn serve_http(
    config: &Config,
    registry: prometheus::Registry,
    health: Arc<Health>,
    client: &kube::Client,
    stop_serving: &CancellationToken,
) -> Result<Vec<tokio::task::JoinHandle<()>>> {
    let tls = match &config.metrics_security {
        None => None,
        Some(security) => {
            let cert = match &security.cert_dir {
                Some(dir) => serving_cert::ServingCert::from_dir(dir).context("loading --metrics-cert-dir")?,
                None => {
                    let mut names = vec!["localhost".to_owned()];
                    names.extend(std::env::var("POD_NAME").ok().filter(|name| !name.is_empty()));
                    serving_cert::ServingCert::self_signed(names)?
                }
            };
            let cert = Arc::new(cert);
            cert.clone().keep_fresh(serving_cert::RELOAD_INTERVAL, stop_serving.clone());
            Some(cert.server_config()?)
        }
    };
    let metrics_router = || match &tls {
        None => http::metrics_router(registry.clone()),
        Some(_) => {
            let audience = config.metrics_security.as_ref().and_then(|s| s.token_audience.clone());
            let auth = Arc::new(metrics_auth::MetricsAuth::new(client.clone(), audience));
            http::secure_metrics_router(registry.clone(), auth)
        }
    };
    let serve_metrics = |address, router, flag: &'static str| {
        let (tls, stop) = (tls.clone(), stop_serving.clone());
        async move {
            match tls {
                Some(tls) => http::serve_tls(address, router, tls, stop).await,
                None => http::serve(address, router, stop).await,
            }
            .context(flag)
        }
    };
    let mut servers = Vec::new();
    match (config.metrics_address, config.probe_address) {
        (Some(metrics_address), Some(probe_address)) if metrics_address == probe_address => {
            let router = metrics_router().merge(http::probe_router(health));
            servers.push(serve_metrics(metrics_address, router, "binding the HTTP address").await?);
        }
        (metrics_address, probe_address) => {
            if let Some(address) = metrics_address {
                servers.push(serve_metrics(address, metrics_router(), "binding --metrics-bind-address").await?);
            }
            if let Some(address) = probe_address {
                let router = http::probe_router(health);
                servers.push(
                    http::serve(address, router, stop_serving.clone())
                        .await
                        .context("binding --health-probe-bind-address")?,
                );
            }
        }
    }
    Ok(servers)
}

/// Runs `controllers` (which stop on `shutdown`) without leader election, then drains them for
/// at most `shutdown_timeout` and aborts what is left. Controllers that stop on their own exit
/// non-zero.
async fn run_without_election(
    controllers: impl std::future::Future<Output = ()> + Send + 'static,
    shutdown: &CancellationToken,
    shutdown_timeout: std::time::Duration,
) -> ExitCode {
    let mut controllers = tokio::spawn(controllers);
    tokio::select! {
        _ = &mut controllers => {
            if shutdown.is_cancelled() {
                return ExitCode::SUCCESS;
            }
            tracing::error!("the controllers stopped on their own");
            return ExitCode::from(EXIT_CONTROLLERS_FAILED);
        }
        () = shutdown.cancelled() => {}
    }
    if tokio::time::timeout(shutdown_timeout, &mut controllers).await.is_err() {
        tracing::warn!(timeout = ?shutdown_timeout, "controllers did not stop in time; aborting them");
        controllers.abort();
        let _ = controllers.await;
    }
    ExitCode::SUCCESS
}

/// How one term of leadership ended.
#[derive(Debug, PartialEq, Eq)]
enum TermEnd {
    /// Shutdown was requested; the controllers drained while the lease was renewed throughout.
    Shutdown,
    /// Shutdown was requested and the controllers did not drain within the shutdown timeout:
    /// they were aborted while the lease was still renewed.
    DrainAborted,
    /// The lease could not be renewed or another replica holds it; the controllers were aborted.
    Lost,
    /// The controllers stopped on their own while this replica led.
    ControllersEnded,
}

/// The election loop: campaign, run the controllers while leading, stop them the moment
/// leadership is in doubt.
async fn lead_while_elected(
    elector: &Elector,
    caches: &reconcilers::Caches,
    config: &Config,
    shutdown: &CancellationToken,
    reenter_on_loss: bool,
) -> ExitCode {
    loop {
        if !elector.acquire(shutdown).await {
            return ExitCode::SUCCESS;
        }
        let stop_controllers = CancellationToken::new();
        let controllers = tokio::spawn(caches.controllers(stop_controllers.clone()));
        let end = lead(elector, controllers, stop_controllers, shutdown, config.shutdown_timeout).await;
        // Nothing the term started outlives it: its background writes (events) end here, before
        // any release.
        caches.end_term().await;
        match end {
            // After an aborted drain the release refuses when a write of the aborted reconciles
            // was in flight (its bytes may still reach the API server): a successor then waits
            // out the lease.
            TermEnd::Shutdown | TermEnd::DrainAborted => {
                elector.release().await;
                return ExitCode::SUCCESS;
            }
            TermEnd::ControllersEnded => {
                elector.release().await;
                return ExitCode::from(EXIT_CONTROLLERS_FAILED);
            }
            TermEnd::Lost => {
                elector.mark_not_leading();
                if !reenter_on_loss || shutdown.is_cancelled() {
                    return ExitCode::from(EXIT_LOST_LEADERSHIP);
                }
                tracing::info!("campaigning again after losing the lease");
            }
        }
    }
}

/// One term of leadership: renews the lease while `controllers` run, through the shutdown drain
/// too, and aborts them the moment the lease cannot be renewed. Returns once the controllers
/// have completely stopped and renewing has stopped between two attempts, so the caller may
/// release the lease.
async fn lead(
    elector: &Elector,
    mut controllers: tokio::task::JoinHandle<()>,
    stop_controllers: CancellationToken,
    shutdown: &CancellationToken,
    shutdown_timeout: std::time::Duration,
) -> TermEnd {
    let stop_renewing = CancellationToken::new();
    let renewing = elector.keep_renewing(&stop_renewing);
    let mut renewing = std::pin::pin!(renewing);
    let mut drain_deadline: Option<tokio::time::Instant> = None;
    let end = loop {
        let drain_timeout = async {
            match drain_deadline {
                Some(deadline) => tokio::time::sleep_until(deadline).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            lost = &mut renewing => {
                // No more writes: drop in-flight reconciles at once.
                controllers.abort();
                stop_controllers.cancel();
                let _ = (&mut controllers).await;
                if let Err(reason) = lost {
                    tracing::error!(%reason, "aborted the controllers");
                }
                return TermEnd::Lost;
            }
            () = shutdown.cancelled(), if drain_deadline.is_none() => {
                tracing::info!(timeout = ?shutdown_timeout, "stopping the controllers; renewing the lease until they have stopped");
                stop_controllers.cancel();
                drain_deadline = Some(tokio::time::Instant::now() + shutdown_timeout);
            }
            () = drain_timeout => {
                tracing::warn!(timeout = ?shutdown_timeout, "controllers did not stop in time; aborting them");
                controllers.abort();
                let _ = (&mut controllers).await;
                break TermEnd::DrainAborted;
            }
            ended = &mut controllers => {
                if drain_deadline.is_some() {
                    break TermEnd::Shutdown;
                }
                match ended {
                    Err(error) if error.is_panic() => tracing::error!("the controllers panicked while leading; stepping down"),
                    _ => tracing::error!("the controllers stopped on their own while leading; stepping down"),
                }
                break TermEnd::ControllersEnded;
            }
        }
    };
    // Stop renewing between two attempts (never in the middle of one), so the release that
    // follows carries the resourceVersion of our own last write.
    stop_renewing.cancel();
    match renewing.await {
        Ok(()) => end,
        Err(reason) => {
            tracing::error!(%reason, "lost the lease while stopping");
            TermEnd::Lost
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use tokio_util::sync::CancellationToken;

    use super::*;
    use crate::election::fake::{FakeLeases, elector, holder_in};

    fn writes(fake: &Arc<Mutex<FakeLeases>>) -> usize {
        fake.lock().map(|f| f.writes.len()).unwrap_or_default()
    }

    #[tokio::test(start_paused = true)]
    async fn controllers_that_stop_on_their_own_make_the_leader_step_down() -> anyhow::Result<()> {
        for ending in [false, true] {
            let fake = Arc::new(Mutex::new(FakeLeases::default()));
            let a = elector(&fake, "a")?;
            assert!(a.acquire(&CancellationToken::new()).await);
            let controllers = tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(2)).await;
                assert!(!ending, "a reconcile panicked");
            });
            let shutdown = CancellationToken::new();
            let end = lead(&a, controllers, CancellationToken::new(), &shutdown, Duration::from_secs(20)).await;
            assert_eq!(end, TermEnd::ControllersEnded);
            a.release().await;
            assert_eq!(holder_in(&fake), "", "released for a standby to take over at once");
        }
        Ok(())
    }

    #[tokio::test(start_paused = true)]
    async fn the_lease_is_renewed_through_the_shutdown_drain_then_released() -> anyhow::Result<()> {
        let fake = Arc::new(Mutex::new(FakeLeases::default()));
        let a = elector(&fake, "a")?;
        assert!(a.acquire(&CancellationToken::new()).await);
        let stop = CancellationToken::new();
        // A reconcile stuck for 10 s, longer than the 4 s lease, finishing once stopped.
        let controllers = tokio::spawn({
            let stop = stop.clone();
            async move {
                stop.cancelled().await;
                tokio::time::sleep(Duration::from_secs(10)).await;
            }
        });
        let shutdown = CancellationToken::new();
        shutdown.cancel();
        let before = writes(&fake);
        let started = tokio::time::Instant::now();
        assert_eq!(lead(&a, controllers, stop, &shutdown, Duration::from_secs(20)).await, TermEnd::Shutdown);
        assert!(started.elapsed() >= Duration::from_secs(10), "waited for the drain");
        assert!(writes(&fake) - before >= 18, "renewed every 0.5 s during the drain: {}", writes(&fake) - before);
        assert_eq!(holder_in(&fake), "a", "still held until released");
        a.release().await;
        assert_eq!(holder_in(&fake), "");
        Ok(())
    }

    /// Without leader election the drain obeys the shutdown timeout too.
    #[tokio::test(start_paused = true)]
    async fn without_election_a_drain_longer_than_the_shutdown_timeout_is_aborted() {
        let shutdown = CancellationToken::new();
        let stuck = std::future::pending::<()>();
        let stopping = {
            let shutdown = shutdown.clone();
            tokio::spawn(async move { run_without_election(stuck, &shutdown, Duration::from_secs(5)).await })
        };
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(!stopping.is_finished(), "runs until shutdown");
        let started = tokio::time::Instant::now();
        shutdown.cancel();
        let code = stopping.await.map(|code| code == ExitCode::SUCCESS);
        assert_eq!(code.ok(), Some(true));
        assert_eq!(started.elapsed(), Duration::from_secs(5), "aborted at the shutdown timeout");
    }

    #[tokio::test(start_paused = true)]
    async fn a_drain_longer_than_the_shutdown_timeout_is_aborted() -> anyhow::Result<()> {
        let fake = Arc::new(Mutex::new(FakeLeases::default()));
        let a = elector(&fake, "a")?;
        assert!(a.acquire(&CancellationToken::new()).await);
        let controllers = tokio::spawn(std::future::pending::<()>());
        let shutdown = CancellationToken::new();
        shutdown.cancel();
        let started = tokio::time::Instant::now();
        let end = lead(&a, controllers, CancellationToken::new(), &shutdown, Duration::from_secs(5)).await;
        assert_eq!(end, TermEnd::DrainAborted, "an aborted drain is told apart: its lease is not released");
        assert!(started.elapsed() < Duration::from_secs(6), "aborted at the shutdown timeout");
        Ok(())
    }

    #[tokio::test(start_paused = true)]
    async fn a_leader_that_cannot_renew_aborts_its_controllers_even_while_draining() -> anyhow::Result<()> {
        let fake = Arc::new(Mutex::new(FakeLeases::default()));
        let a = elector(&fake, "a")?;
        assert!(a.acquire(&CancellationToken::new()).await);
        let controllers = tokio::spawn(std::future::pending::<()>());
        let abort = controllers.abort_handle();
        let shutdown = CancellationToken::new();
        shutdown.cancel();
        if let Ok(mut fake) = fake.lock() {
            fake.silent = true;
        }
        let started = tokio::time::Instant::now();
        let end = lead(&a, controllers, CancellationToken::new(), &shutdown, Duration::from_secs(20)).await;
        assert_eq!(end, TermEnd::Lost);
        assert!(abort.is_finished(), "the controllers were aborted");
        assert!(started.elapsed() <= Duration::from_secs(3), "within the renew deadline, not the 20 s drain");
        Ok(())
    }
}
