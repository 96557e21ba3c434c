//! What the cluster commands, the benchmarks and the end-to-end tests all need to reach the
//! local control plane and the operator's endpoints, written once: the cluster-folder variable,
//! kubeconfig clients, plain HTTP GETs on loopback, and reading Prometheus samples.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};

/// Names the folder of the running local control plane (set by `cargo xtask test` and by
/// `eval "$(cargo xtask cluster env)"`); the tests read their kubeconfigs there.
pub const CLUSTER_DIR_ENV: &str = "EXAMPLE_OPERATOR_CLUSTER_DIR";

/// The API server's audit log in the cluster folder: one JSON event per write request.
pub const AUDIT_LOG: &str = "audit.log";

/// A client for the identity in `kubeconfig`.
pub async fn client_for(kubeconfig: &Path) -> Result<kube::Client> {
    let kubeconfig = kube::config::Kubeconfig::read_from(kubeconfig)
        .with_context(|| format!("reading kubeconfig {}", kubeconfig.display()))?;
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await?;
    Ok(kube::Client::try_from(config)?)
}

/// A port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("binding a free port on 127.0.0.1")?;
    Ok(listener.local_addr()?.port())
}

/// GETs `path` from `127.0.0.1:port` over plain HTTP/1.0; returns the status code and body.
pub async fn http_get(port: u16, path: &str) -> Result<(u16, String)> {
    http_get_at(std::net::SocketAddr::from(([127, 0, 0, 1], port)), path).await
}

/// GETs `path` from `address` (e.g. a Pod's) over plain HTTP/1.0; returns the status code and body.
pub async fn http_get_at(address: std::net::SocketAddr, path: &str) -> Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let connect = tokio::net::TcpStream::connect(address);
    let mut stream = tokio::time::timeout(Duration::from_secs(5), connect).await.context("connecting")??;
    stream.write_all(format!("GET {path} HTTP/1.0\r\nHost: {address}\r\n\r\n").as_bytes()).await?;
    let mut response = String::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_string(&mut response)).await??;
    let (head, body) = response.split_once("\r\n\r\n").context("an HTTP response")?;
    let code = head.split_whitespace().nth(1).context("a status code")?.parse()?;
    Ok((code, body.to_owned()))
}

/// The value of the sample `series` (name with labels exactly as exposed, e.g.
/// `leader_election_master_status{name="x"}`) in a Prometheus text exposition.
pub fn sample(exposition: &str, series: &str) -> Option<f64> {
    exposition.lines().find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Sum of every sample of metric `name` whose line contains `filter` (e.g.
/// `controller="myresource"`; empty for all).
pub fn sum_samples(exposition: &str, name: &str, filter: &str) -> f64 {
    exposition
        .lines()
        .filter(|l| (l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} "))) && l.contains(filter))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .fold(0.0, |sum, value| sum + value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_are_read_by_series_and_summed_by_label() {
        let text = "# HELP x y\nx{a=\"1\",c=\"m\"} 2\nx{a=\"2\",c=\"m\"} 3\nx{a=\"3\",c=\"n\"} 5\nxy 7\nz 1.5\n";
        assert_eq!(sample(text, "x{a=\"2\",c=\"m\"}"), Some(3.0));
        assert_eq!(sample(text, "z"), Some(1.5));
        assert_eq!(sample(text, "x"), None);
        assert_eq!(sum_samples(text, "x", "c=\"m\""), 5.0);
        assert_eq!(sum_samples(text, "x", ""), 10.0);
    }
}
