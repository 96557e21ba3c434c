//! `example-operator check`: what `helm test` runs, in the operator's own image (nothing else
//! can be pulled): GETs each URL and succeeds only when every one answers 200 and, for
//! `--require`, exposes the named metric. Plain HTTP, or HTTPS with a bearer token for secure
//! metrics. Also the small HTTP(S) client the end-to-end tests use on the operator.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Arguments of `check`.
#[derive(Clone, Debug, clap::Args)]
pub struct CheckArgs {
    /// A URL to GET (`http://HOST:PORT/PATH` or `https://…`); repeat for several.
    #[arg(long = "url", required = true)]
    pub urls: Vec<String>,
    /// A metric name that some answer must contain, e.g. `leader_election_master_status`.
    #[arg(long = "require")]
    pub required_metrics: Vec<String>,
    /// How long to keep trying before failing.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// Send the token in this file as `Authorization: Bearer …` (e.g. the Pod's ServiceAccount token).
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// Trust HTTPS servers whose certificate this PEM file signed.
    #[arg(long)]
    pub ca_file: Option<PathBuf>,
    /// Accept any HTTPS certificate (a self-signed one made by the operator at start).
    #[arg(long, default_value_t = false)]
    pub insecure_skip_tls_verify: bool,
}

/// How to reach one URL.
#[derive(Clone, Debug, Default)]
pub struct Request {
    /// Sent as `Authorization: Bearer …`.
    pub token: Option<String>,
    /// PEM certificates to trust for HTTPS.
    pub ca_pem: Option<Vec<u8>>,
    /// Accept any HTTPS certificate.
    pub insecure_skip_tls_verify: bool,
}

/// What a server answered.
#[derive(Clone, Debug)]
pub struct Answer {
    pub code: u16,
    pub body: String,
    /// The DER certificate an HTTPS server presented.
    pub certificate: Option<Vec<u8>>,
}

/// A URL taken apart.
#[derive(Debug, PartialEq, Eq)]
struct Target {
    https: bool,
    address: String,
    host: String,
    path: String,
}

/// Splits `http(s)://host:port/path`.
fn split_url(url: &str) -> Result<Target> {
    let (https, rest) = match (url.strip_prefix("http://"), url.strip_prefix("https://")) {
        (Some(rest), _) => (false, rest),
        (_, Some(rest)) => (true, rest),
        _ => bail!("{url:?} is not an http:// or https:// URL"),
    };
    let (address, path) = match rest.split_once('/') {
        Some((address, path)) => (address.to_owned(), format!("/{path}")),
        None => (rest.to_owned(), "/".to_owned()),
    };
    let (host, port) = address.rsplit_once(':').with_context(|| format!("{url:?} names no port"))?;
    ensure!(port.parse::<u16>().is_ok(), "{url:?} names no port");
    let host = host.trim_start_matches('[').trim_end_matches(']').to_owned();
    Ok(Target { https, address, host, path })
}

/// Accepts any certificate: for `--insecure-skip-tls-verify` only. Signatures are still checked
/// so the handshake is a real one.
#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn tls_client(request: &Request) -> Result<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .context("choosing TLS versions")?;
    let config = match (&request.ca_pem, request.insecure_skip_tls_verify) {
        (_, true) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
            .with_no_client_auth(),
        (Some(pem), false) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(pem) {
                roots.add(cert.context("reading the CA file")?).context("trusting the CA file")?;
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        (None, false) => bail!("an https:// URL needs --ca-file or --insecure-skip-tls-verify"),
    };
    Ok(config)
}

/// GETs `url` once over HTTP/1.0.
pub async fn get(url: &str, request: &Request) -> Result<Answer> {
    let target = split_url(url)?;
    let stream = tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(&target.address))
        .await
        .context("connecting timed out")??;
    if !target.https {
        return exchange(stream, &target, request, None).await;
    }
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls_client(request)?));
    let name =
        ServerName::try_from(target.host.clone()).with_context(|| format!("{:?} is no host name", target.host))?;
    let stream = tokio::time::timeout(Duration::from_secs(5), connector.connect(name, stream))
        .await
        .context("TLS handshake timed out")?
        .context("TLS handshake")?;
    let certificate = stream.get_ref().1.peer_certificates().and_then(|chain| chain.first()).map(|c| c.to_vec());
    exchange(stream, &target, request, certificate).await
}

async fn exchange(
    mut stream: impl AsyncRead + AsyncWrite + Unpin,
    target: &Target,
    request: &Request,
    certificate: Option<Vec<u8>>,
) -> Result<Answer> {
    let authorization = request.token.as_ref().map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    let head = format!("GET {} HTTP/1.0\r\nHost: {}\r\n{authorization}\r\n", target.path, target.address);
    stream.write_all(head.as_bytes()).await?;
    let mut response = Vec::new();
    // A TLS server may end without close_notify after HTTP/1.0; what was read is the answer.
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut response)).await?;
    if let Err(error) = read {
        ensure!(error.kind() == std::io::ErrorKind::UnexpectedEof && !response.is_empty(), error);
    }
    let response = String::from_utf8_lossy(&response);
    let (head, body) = response.split_once("\r\n\r\n").context("not an HTTP response")?;
    let code = head.split_whitespace().nth(1).context("no status code")?.parse()?;
    Ok(Answer { code, body: body.to_owned(), certificate })
}

impl CheckArgs {
    fn request(&self) -> Result<Request> {
        let token = match &self.token_file {
            Some(path) => Some(
                std::fs::read_to_string(path)
                    .with_context(|| format!("reading --token-file {}", path.display()))?
                    .trim()
                    .to_owned(),
            ),
            None => None,
        };
        let ca_pem = match &self.ca_file {
            Some(path) => Some(std::fs::read(path).with_context(|| format!("reading --ca-file {}", path.display()))?),
            None => None,
        };
        Ok(Request { token, ca_pem, insecure_skip_tls_verify: self.insecure_skip_tls_verify })
    }
}

async fn check_once(args: &CheckArgs) -> Result<()> {
    let request = args.request()?;
    let mut bodies = String::new();
    for url in &args.urls {
        let Answer { code, body, .. } = get(url, &request).await.with_context(|| format!("GET {url}"))?;
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
        let target = split_url("http://10.0.0.7:8080/metrics")?;
        assert_eq!((target.https, target.address.as_str(), target.path.as_str()), (false, "10.0.0.7:8080", "/metrics"));
        let target = split_url("https://svc:8081")?;
        assert_eq!((target.https, target.host.as_str(), target.path.as_str()), (true, "svc", "/"));
        assert!(split_url("ftp://svc:8080/").is_err());
        assert!(split_url("http://svc/metrics").is_err());
        Ok(())
    }

    #[test]
    fn https_needs_a_ca_or_an_explicit_skip() {
        let error = tls_client(&Request::default()).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(error.contains("--insecure-skip-tls-verify"), "{error}");
        assert!(tls_client(&Request { insecure_skip_tls_verify: true, ..Request::default() }).is_ok());
    }
}
