//! `example-operator check`: what `helm test` runs, in the operator's own image (nothing else
//! can be pulled): GETs each URL and succeeds only when every one answers 200 and, for
//! `--require`, exposes the named metric. Plain HTTP, as the operator serves it.

use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Arguments of `check`.
#[derive(Clone, Debug, clap::Args)]
pub struct CheckArgs {
    /// A URL to GET (`http://HOST:PORT/PATH`); repeat for several.
    #[arg(long = "url", required = true)]
    pub urls: Vec<String>,
    /// A metric name that some answer must contain, e.g. `leader_election_master_status`.
    #[arg(long = "require")]
    pub required_metrics: Vec<String>,
    /// How long to keep trying before failing.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

/// Splits `http://host:port/path` into the address and the path.
fn split_url(url: &str) -> Result<(String, String)> {
    let rest = url.strip_prefix("http://").with_context(|| format!("{url:?} is not an http:// URL"))?;
    let (address, path) = match rest.split_once('/') {
        Some((address, path)) => (address.to_owned(), format!("/{path}")),
        None => (rest.to_owned(), "/".to_owned()),
    };
    ensure!(address.contains(':'), "{url:?} names no port");
    Ok((address, path))
}

async fn get(url: &str) -> Result<(u16, String)> {
    let (address, path) = split_url(url)?;
    let mut stream = tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(&address))
        .await
        .context("connecting timed out")??;
    stream.write_all(format!("GET {path} HTTP/1.0\r\nHost: {address}\r\n\r\n").as_bytes()).await?;
    let mut response = String::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_string(&mut response)).await??;
    let (head, body) = response.split_once("\r\n\r\n").context("not an HTTP response")?;
    let code = head.split_whitespace().nth(1).context("no status code")?.parse()?;
    Ok((code, body.to_owned()))
}

async fn check_once(args: &CheckArgs) -> Result<()> {
    let mut bodies = String::new();
    for url in &args.urls {
        let (code, body) = get(url).await.with_context(|| format!("GET {url}"))?;
        ensure!(code == 200, "GET {url} answered {code}: {}", body.trim());
        println!("GET {url}: 200");
        bodies.push_str(&body);
    }
    for metric in &args.required_metrics {
        let exposed = bodies.lines().any(|line| {
            line.strip_prefix(metric.as_str()).is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        });
        ensure!(exposed, "no answer exposes the metric {metric}");
        println!("metric {metric}: exposed");
    }
    Ok(())
}

/// Runs the check, retrying until it passes or `timeout` ends.
pub async fn run(args: CheckArgs) -> Result<()> {
    let deadline = tokio::time::Instant::now() + args.timeout;
    loop {
        match check_once(&args).await {
            Ok(()) => return Ok(()),
            Err(error) if tokio::time::Instant::now() >= deadline => bail!("{error:#}"),
            Err(error) => eprintln!("not yet: {error:#}"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_split_into_address_and_path() -> Result<()> {
        assert_eq!(split_url("http://10.0.0.7:8080/metrics")?, ("10.0.0.7:8080".into(), "/metrics".into()));
        assert_eq!(split_url("http://svc:8081")?, ("svc:8081".into(), "/".into()));
        assert!(split_url("https://svc:8080/").is_err());
        assert!(split_url("http://svc/metrics").is_err());
        Ok(())
    }
}
