//! A real Prometheus server (Debian's `prometheus` package) for the tests and the demo: started
//! with a configuration, queried over its HTTP API, stopped when dropped.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, ensure};

use crate::harness::{free_port, http_get};

/// A tool of Debian's `prometheus` package (`prometheus`, `promtool`).
pub fn tool(name: &str) -> Result<PathBuf> {
    let path = std::path::Path::new("/usr/bin").join(name);
    ensure!(path.is_file(), "{name} is missing: install Debian's prometheus package (`apt-get install prometheus`)");
    Ok(path)
}

/// A running Prometheus server on loopback.
pub struct PrometheusServer {
    pub port: u16,
    dir: PathBuf,
    _process: tokio::process::Child,
}

impl PrometheusServer {
    /// Starts Prometheus with `config` (prometheus.yml) and its data in a folder of its own.
    pub fn start(config: &str) -> Result<Self> {
        let prometheus = tool("prometheus")?;
        let dir =
            std::env::temp_dir().join(format!("example-operator-prometheus-{:06x}", rand::random::<u32>() & 0xff_ffff));
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("prometheus.yml"), config)?;
        let port = free_port()?;
        let process = tokio::process::Command::new(&prometheus)
            .arg(format!("--config.file={}", dir.join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(std::fs::File::create(dir.join("prometheus.log"))?)
            .stderr(std::fs::File::create(dir.join("prometheus.err.log"))?)
            .kill_on_drop(true)
            .spawn()
            .context("starting prometheus")?;
        Ok(Self { port, dir, _process: process })
    }

    /// The series an instant query returns now (the `data.result` array).
    pub async fn query(&self, query: &str) -> Result<Vec<serde_json::Value>> {
        let encoded: String = query
            .bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
                _ => format!("%{b:02X}"),
            })
            .collect();
        let (code, body) = http_get(self.port, &format!("/api/v1/query?query={encoded}")).await?;
        ensure!(code == 200, "Prometheus answered {code}: {body}");
        let value: serde_json::Value = serde_json::from_str(&body)?;
        Ok(value["data"]["result"].as_array().cloned().unwrap_or_default())
    }

    /// Polls `query` until `accept` takes its series, within `timeout`.
    pub async fn eventually<T>(
        &self,
        timeout: Duration,
        query: &str,
        accept: impl Fn(&[serde_json::Value]) -> Option<T>,
    ) -> Result<T> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut last_error = None;
        loop {
            match self.query(query).await {
                Ok(series) => {
                    if let Some(accepted) = accept(&series) {
                        return Ok(accepted);
                    }
                }
                Err(error) => last_error = Some(error),
            }
            if tokio::time::Instant::now() > deadline {
                let cause = last_error.map(|e| format!(" (last error: {e:#})")).unwrap_or_default();
                anyhow::bail!(
                    "Prometheus did not answer {query} as expected within {timeout:?}{cause}\n{}",
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// The server's log, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.err.log")).unwrap_or_default()
    }
}

impl Drop for PrometheusServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The value of a series in a query answer.
pub fn value(series: &serde_json::Value) -> Option<f64> {
    series["value"][1].as_str()?.parse().ok()
}
