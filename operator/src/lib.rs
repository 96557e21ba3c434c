//! The example-operator process: configuration, leader election, HTTP endpoints, telemetry, and
//! the wiring that runs the controllers of the `reconcilers` crate only while this replica leads.

pub mod config;
pub mod election;
pub mod health;
pub mod http;
pub mod telemetry;

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result};
use kube::Client;
use tokio_util::sync::CancellationToken;

use config::Config;
use election::{Elector, LeaderMetrics, LeadershipEnd};
use health::Health;

/// Exit code after losing leadership, as client-go operators exit non-zero then.
pub const EXIT_LOST_LEADERSHIP: u8 = 1;

/// The namespace a pod runs in, from its service-account mount.
const IN_CLUSTER_NAMESPACE_FILE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/namespace";

/// A Kubernetes client for `config`, counting its requests in `rest_client_requests_total`.
async fn client(config: &Config, metrics: &reconcilers::Metrics) -> Result<(Client, String)> {
    let kube_config = match &config.kubeconfig {
        Some(path) => {
            let kubeconfig = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await?
        }
        None => kube::Config::infer().await.context("no kubeconfig and no in-cluster configuration")?,
    };
    let namespace = kube_config.default_namespace.clone();
    let host = kube_config.cluster_url.host().unwrap_or_default().to_owned();
    let client =
        kube::client::ClientBuilder::try_from(kube_config)?.with_layer(&metrics.rest_client_layer(host)).build();
    Ok((client, namespace))
}

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
    let (client, kubeconfig_namespace) = client(&config, &metrics).await?;

    let stop_serving = CancellationToken::new();
    let mut servers = Vec::new();
    match (config.metrics_address, config.probe_address) {
        (Some(metrics_address), Some(probe_address)) if metrics_address == probe_address => {
            let router = http::metrics_router(registry.clone()).merge(http::probe_router(health.clone()));
            servers.push(
                http::serve(metrics_address, router, stop_serving.clone()).await.context("binding the HTTP address")?,
            );
        }
        (metrics_address, probe_address) => {
            if let Some(address) = metrics_address {
                let router = http::metrics_router(registry.clone());
                servers.push(
                    http::serve(address, router, stop_serving.clone())
                        .await
                        .context("binding --metrics-bind-address")?,
                );
            }
            if let Some(address) = probe_address {
                let router = http::probe_router(health.clone());
                servers.push(
                    http::serve(address, router, stop_serving.clone())
                        .await
                        .context("binding --health-probe-bind-address")?,
                );
            }
        }
    }

    let shutdown = CancellationToken::new();
    tokio::spawn({
        let shutdown = shutdown.clone();
        async move {
            termination_signal().await;
            shutdown.cancel();
        }
    });

    let code = match config.election.clone() {
        None => {
            tracing::info!("leader election disabled; starting controllers");
            health.set_leading(true);
            reconcilers::run(client, config.controllers.clone(), metrics.clone(), shutdown.clone()).await;
            ExitCode::SUCCESS
        }
        Some(election) => {
            let namespace = election
                .lease_namespace
                .clone()
                .or_else(|| std::fs::read_to_string(IN_CLUSTER_NAMESPACE_FILE).ok().map(|ns| ns.trim().to_owned()))
                .unwrap_or(kubeconfig_namespace);
            let leader_metrics = LeaderMetrics::register(&registry)?;
            let elector = Elector::new(client.clone(), &namespace, election.clone(), leader_metrics, health.clone());
            lead_while_elected(&elector, &client, &config, &metrics, &shutdown, election.reenter_on_loss).await
        }
    };
    stop_serving.cancel();
    for server in servers {
        let _ = server.await;
    }
    Ok(code)
}

/// The election loop: campaign, run the controllers while leading, stop them the moment
/// leadership is in doubt.
async fn lead_while_elected(
    elector: &Elector,
    client: &Client,
    config: &Config,
    metrics: &reconcilers::Metrics,
    shutdown: &CancellationToken,
    reenter_on_loss: bool,
) -> ExitCode {
    loop {
        let Some(acquired_at) = elector.acquire(shutdown).await else {
            return ExitCode::SUCCESS;
        };
        let stop_controllers = CancellationToken::new();
        let controllers = tokio::spawn(reconcilers::run(
            client.clone(),
            config.controllers.clone(),
            metrics.clone(),
            stop_controllers.clone(),
        ));
        match elector.hold(acquired_at, shutdown).await {
            LeadershipEnd::Shutdown => {
                // Let in-flight reconciles finish, then release the lease for a fast hand-over.
                stop_controllers.cancel();
                let abort = controllers.abort_handle();
                if tokio::time::timeout(config.shutdown_timeout, controllers).await.is_err() {
                    tracing::warn!(timeout = ?config.shutdown_timeout, "controllers did not stop in time; aborting them");
                    abort.abort();
                }
                elector.step_down().await;
                return ExitCode::SUCCESS;
            }
            LeadershipEnd::Lost(_) => {
                // No more writes: abort at once, dropping in-flight reconciles.
                controllers.abort();
                stop_controllers.cancel();
                let _ = controllers.await;
                elector.mark_not_leading();
                if !reenter_on_loss {
                    return ExitCode::from(EXIT_LOST_LEADERSHIP);
                }
                tracing::info!("campaigning again after losing the lease");
            }
        }
    }
}
