//! The operator's HTTP endpoints over axum: `/metrics` in the Prometheus text format, and the
//! `/healthz` and `/readyz` probes with named checks in the Kubernetes style
//! (`[+]ping ok` lines with `?verbose`), over plain HTTP or TLS. Serves only reads; the one call
//! it makes to the cluster is to check a secure-metrics caller (`metrics_auth`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus::{Encoder, Registry, TextEncoder};
use tokio_util::sync::CancellationToken;

use crate::health::{CheckResult, Health};

/// Routes for `/metrics`.
pub fn metrics_router(registry: Registry) -> Router {
    Router::new().route("/metrics", get(metrics)).with_state(registry)
}

/// `/metrics` for callers the API server authenticates and authorizes.
pub fn secure_metrics_router(registry: Registry, auth: Arc<crate::metrics_auth::MetricsAuth>) -> Router {
    metrics_router(registry)
        .route_layer(axum::middleware::from_fn_with_state(auth, crate::metrics_auth::require_authorized))
}

/// Routes for `/healthz` and `/readyz`.
pub fn probe_router(health: Arc<Health>) -> Router {
    Router::new().route("/healthz", get(healthz)).route("/readyz", get(readyz)).with_state(health)
}

async fn metrics(State(registry): State<Registry>) -> Response {
    let encoder = TextEncoder::new();
    let mut body = Vec::new();
    match encoder.encode(&registry.gather(), &mut body) {
        Ok(()) => ([(header::CONTENT_TYPE, encoder.format_type().to_owned())], body).into_response(),
        Err(error) => {
            (StatusCode::INTERNAL_SERVER_ERROR, format!("encoding metrics failed: {error}\n")).into_response()
        }
    }
}

#[derive(serde::Deserialize)]
struct ProbeQuery {
    verbose: Option<String>,
}

async fn healthz(State(health): State<Arc<Health>>, Query(query): Query<ProbeQuery>) -> Response {
    probe_response("healthz", &health.liveness(), query.verbose.is_some())
}

async fn readyz(State(health): State<Arc<Health>>, Query(query): Query<ProbeQuery>) -> Response {
    probe_response("readyz", &health.readiness(), query.verbose.is_some())
}

/// Renders checks as the Kubernetes API server does: `ok` when all pass (every check listed with
/// `?verbose`), and every check listed with 500 when any fails.
pub fn probe_body(probe: &str, checks: &[CheckResult], verbose: bool) -> (StatusCode, String) {
    let failed = checks.iter().any(|c| c.failure.is_some());
    if !failed && !verbose {
        return (StatusCode::OK, "ok".to_owned());
    }
    let mut body = String::new();
    for check in checks {
        match &check.failure {
            None => body.push_str(&format!("[+]{} ok\n", check.name)),
            Some(reason) => body.push_str(&format!("[-]{} failed: {reason}\n", check.name)),
        }
    }
    if failed {
        body.push_str(&format!("{probe} check failed\n"));
        (StatusCode::INTERNAL_SERVER_ERROR, body)
    } else {
        body.push_str(&format!("{probe} check passed\n"));
        (StatusCode::OK, body)
    }
}

fn probe_response(probe: &str, checks: &[CheckResult], verbose: bool) -> Response {
    let (code, body) = probe_body(probe, checks, verbose);
    (code, [(header::CONTENT_TYPE, "text/plain; charset=utf-8")], body).into_response()
}

/// How long a client may take to finish the TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a client may take to send a request's headers (hyper's header read timeout); a
/// client that stops half-way is disconnected.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// After shutdown, how long open connections may take to finish the request they are serving
/// before they are closed, whatever their clients do.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Connections one server keeps open at once; beyond them a new connection is closed at once
/// (idle ones are closed by the handshake and header read timeouts anyway).
pub const MAX_CONNECTIONS: usize = 4096;

/// The most a request's head may take (request line and headers; hyper's read buffer): a
/// bearer token is at most 8 KiB.
const MAX_HEADER_BYTES: usize = 16 * 1024;

/// Binds `address` now (so a taken port fails start-up) and serves `router` over plain HTTP until
/// `shutdown`; the task ends at most [`SHUTDOWN_GRACE`] after it.
pub async fn serve(
    address: SocketAddr,
    router: Router,
    shutdown: CancellationToken,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(address).await?;
    tracing::info!(address = %listener.local_addr()?, "serving HTTP");
    Ok(tokio::spawn(accept_connections(listener, router, None, shutdown)))
}

/// Binds `address` now and serves `router` over TLS until `shutdown`; the task ends at most
/// [`SHUTDOWN_GRACE`] after it.
pub async fn serve_tls(
    address: SocketAddr,
    router: Router,
    tls: rustls::ServerConfig,
    shutdown: CancellationToken,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(address).await?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    tracing::info!(address = %listener.local_addr()?, "serving HTTPS");
    Ok(tokio::spawn(accept_connections(listener, router, Some(acceptor), shutdown)))
}

/// Accepts connections until `shutdown`, each served on a task of its own (so a slow client
/// never holds up another, a kubelet probe), then waits for them: each gets [`SHUTDOWN_GRACE`]
/// to finish its request and is closed after that.
async fn accept_connections(
    listener: tokio::net::TcpListener,
    router: Router,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shutdown: CancellationToken,
) {
    let connections = tokio_util::task::TaskTracker::new();
    let open = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, peer) = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: wait instead of spinning.
                    tracing::warn!(%error, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = open.clone().try_acquire_owned() else {
            tracing::debug!(%peer, "closed a connection over the limit of {MAX_CONNECTIONS}");
            continue;
        };
        let (tls, router, shutdown) = (tls.clone(), router.clone(), shutdown.clone());
        connections.spawn(async move {
            let _slot = slot;
            let Some(acceptor) = tls else {
                return serve_connection(stream, router, peer, shutdown).await;
            };
            let handshake = tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream));
            let stream = tokio::select! {
                () = shutdown.cancelled() => return,
                handshake = handshake => match handshake {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(error)) => return tracing::debug!(%peer, %error, "TLS handshake failed"),
                    Err(_) => return tracing::debug!(%peer, "TLS handshake timed out"),
                },
            };
            serve_connection(stream, router, peer, shutdown).await;
        });
    }
    drop(listener);
    connections.close();
    connections.wait().await;
}

/// Serves HTTP/1.1 on one connection until the client closes it, or until `shutdown` plus
/// [`SHUTDOWN_GRACE`] at most.
async fn serve_connection<S>(stream: S, router: Router, peer: SocketAddr, shutdown: CancellationToken)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper_util::service::TowerToHyperService::new(router);
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_HEADER_BYTES)
        .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
    tokio::pin!(connection);
    tokio::select! {
        served = connection.as_mut() => if let Err(error) = served {
            tracing::debug!(%peer, %error, "HTTP connection ended with an error");
        },
        () = shutdown.cancelled() => {
            connection.as_mut().graceful_shutdown();
            if tokio::time::timeout(SHUTDOWN_GRACE, connection).await.is_err() {
                tracing::debug!(%peer, "closed a connection still open after the shutdown grace period");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(name: &'static str, failure: Option<&str>) -> CheckResult {
        CheckResult { name, failure: failure.map(str::to_owned) }
    }

    #[test]
    fn passing_probes_say_ok_or_list_checks_when_verbose() {
        let checks = [check("ping", None), check("leader-election", None)];
        assert_eq!(probe_body("readyz", &checks, false), (StatusCode::OK, "ok".to_owned()));
        let (code, body) = probe_body("readyz", &checks, true);
        assert_eq!(code, StatusCode::OK);
        assert_eq!(body, "[+]ping ok\n[+]leader-election ok\nreadyz check passed\n");
    }

    #[test]
    fn a_failing_check_is_named_with_500() {
        let checks = [check("ping", None), check("leader-election", Some("election loop silent for 40s"))];
        let (code, body) = probe_body("healthz", &checks, false);
        assert_eq!(code, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(body, "[+]ping ok\n[-]leader-election failed: election loop silent for 40s\nhealthz check failed\n");
    }
}
