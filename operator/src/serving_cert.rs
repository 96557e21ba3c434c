//! The secure metrics server's TLS certificate: a mounted `tls.crt`/`tls.key` pair (a
//! kubernetes.io/tls Secret) re-read whenever its content changes, since cert-manager and the
//! kubelet rotate Secrets in place; or a self-signed pair made at start. Never writes a file.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

/// The certificate file in a mounted kubernetes.io/tls Secret.
pub const CERT_FILE: &str = "tls.crt";
/// The private key file in a mounted kubernetes.io/tls Secret.
pub const KEY_FILE: &str = "tls.key";

/// How often a mounted pair is checked for a change (the kubelet refreshes Secret volumes about
/// once a minute, so this adds little to a rotation).
pub const RELOAD_INTERVAL: Duration = Duration::from_secs(5);

/// The certificate the metrics server presents; swapped in place when the files change.
#[derive(Debug)]
pub struct ServingCert {
    current: RwLock<Loaded>,
    dir: Option<PathBuf>,
}

#[derive(Debug, Clone)]
struct Loaded {
    key: Arc<CertifiedKey>,
    /// SHA-256 of the certificate and key files as read; a change means a reload.
    digest: [u8; 32],
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl ServingCert {
    /// A fresh self-signed certificate for `names` (DNS names or IP addresses).
    pub fn self_signed(names: Vec<String>) -> Result<Self> {
        let generated = rcgen::generate_simple_self_signed(names).context("making a self-signed certificate")?;
        let key = PrivateKeyDer::try_from(generated.signing_key.serialize_der())
            .map_err(|error| anyhow::anyhow!("encoding the self-signed key: {error}"))?;
        let certified = CertifiedKey::from_der(vec![generated.cert.der().clone()], key, &provider())
            .context("loading the self-signed certificate")?;
        Ok(Self { current: RwLock::new(Loaded { key: Arc::new(certified), digest: [0; 32] }), dir: None })
    }

    /// The pair in `dir`; fails, naming the file, when it is missing or unusable.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let loaded = load(dir)?;
        Ok(Self { current: RwLock::new(loaded), dir: Some(dir.to_owned()) })
    }

    /// SHA-256 of the DER certificate presented now (what a client sees as the fingerprint).
    pub fn fingerprint(&self) -> Option<[u8; 32]> {
        let current = self.current.read().ok()?;
        let leaf = current.key.cert.first()?;
        Some(Sha256::digest(leaf.as_ref()).into())
    }

    /// Re-reads a mounted pair every `interval` until `stop`; a pair that fails to load is
    /// logged and the previous one kept. Does nothing for a self-signed certificate.
    pub fn keep_fresh(self: Arc<Self>, interval: Duration, stop: CancellationToken) {
        let Some(dir) = self.dir.clone() else { return };
        tokio::spawn(async move {
            let mut last_error = None;
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(interval) => {}
                }
                let read = tokio::task::spawn_blocking({
                    let dir = dir.clone();
                    move || read_pair(&dir)
                })
                .await;
                let unchanged = match (&read, self.current.read()) {
                    (Ok(Ok((_, _, digest))), Ok(current)) => current.digest == *digest,
                    _ => false,
                };
                if unchanged {
                    last_error = None;
                    continue;
                }
                match read.map_err(anyhow::Error::from).and_then(|pair| parse_pair(&dir, pair?)) {
                    Ok(loaded) => {
                        if let Ok(mut current) = self.current.write() {
                            *current = loaded;
                        }
                        last_error = None;
                        tracing::info!(dir = %dir.display(), "reloaded the metrics certificate");
                    }
                    Err(error) => {
                        let message = format!("{error:#}");
                        // Logged once per distinct failure: a half-written rotation settles quickly.
                        if last_error.as_ref() != Some(&message) {
                            tracing::warn!(error = %message, "keeping the previous metrics certificate");
                            last_error = Some(message);
                        }
                    }
                }
            }
        });
    }

    /// A TLS server configuration presenting this certificate (HTTP/1.1, TLS 1.2 and 1.3).
    pub fn server_config(self: Arc<Self>) -> Result<rustls::ServerConfig> {
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .context("choosing TLS versions")?
            .with_no_client_auth()
            .with_cert_resolver(self);
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(config)
    }
}

impl ResolvesServerCert for ServingCert {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current.read().ok().map(|current| current.key.clone())
    }
}

/// The raw files and their digest.
fn read_pair(dir: &Path) -> Result<(Vec<u8>, Vec<u8>, [u8; 32])> {
    let read = |name: &str| {
        let path = dir.join(name);
        std::fs::read(&path).with_context(|| format!("reading {}", path.display()))
    };
    let (cert, key) = (read(CERT_FILE)?, read(KEY_FILE)?);
    let digest = Sha256::new().chain_update(&cert).chain_update(&key).finalize().into();
    Ok((cert, key, digest))
}

fn parse_pair(dir: &Path, (cert, key, digest): (Vec<u8>, Vec<u8>, [u8; 32])) -> Result<Loaded> {
    let cert_path = dir.join(CERT_FILE);
    let key_path = dir.join(KEY_FILE);
    let chain = CertificateDer::pem_slice_iter(&cert)
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{} is not PEM", cert_path.display()))?;
    if chain.is_empty() {
        bail!("{} holds no certificate", cert_path.display());
    }
    let key = PrivateKeyDer::from_pem_slice(&key)
        .with_context(|| format!("{} holds no PEM private key", key_path.display()))?;
    let certified = CertifiedKey::from_der(chain, key, &provider())
        .with_context(|| format!("{} and {} do not make a usable pair", cert_path.display(), key_path.display()))?;
    Ok(Loaded { key: Arc::new(certified), digest })
}

fn load(dir: &Path) -> Result<Loaded> {
    parse_pair(dir, read_pair(dir)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_pair(dir: &Path, name: &str) -> Result<[u8; 32]> {
        let generated = rcgen::generate_simple_self_signed(vec![name.to_owned()])?;
        std::fs::write(dir.join(CERT_FILE), generated.cert.pem())?;
        std::fs::write(dir.join(KEY_FILE), generated.signing_key.serialize_pem())?;
        Ok(Sha256::digest(generated.cert.der().as_ref()).into())
    }

    fn temp_dir() -> Result<PathBuf> {
        let dir = std::env::temp_dir().join(format!("serving-cert-{:08x}", rand::random::<u32>()));
        std::fs::create_dir_all(&dir)?;
        Ok(dir)
    }

    #[tokio::test]
    async fn a_mounted_pair_is_presented_and_replaced_when_the_files_change() -> Result<()> {
        let dir = temp_dir()?;
        let first = write_pair(&dir, "first.example")?;
        let cert = Arc::new(ServingCert::from_dir(&dir)?);
        assert_eq!(cert.fingerprint(), Some(first));
        let stop = CancellationToken::new();
        cert.clone().keep_fresh(Duration::from_millis(20), stop.clone());

        // A half-written rotation (a key that does not match) keeps the working pair.
        let other = rcgen::generate_simple_self_signed(vec!["other.example".to_owned()])?;
        std::fs::write(dir.join(KEY_FILE), other.signing_key.serialize_pem())?;
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(cert.fingerprint(), Some(first), "a mismatched pair must not be served");

        let second = write_pair(&dir, "second.example")?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while cert.fingerprint() != Some(second) {
            assert!(tokio::time::Instant::now() < deadline, "the new pair was not picked up");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        stop.cancel();
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }

    #[test]
    fn a_missing_or_broken_pair_is_named() -> Result<()> {
        let dir = temp_dir()?;
        let error = ServingCert::from_dir(&dir).err().map(|e| format!("{e:#}")).unwrap_or_default();
        assert!(error.contains("tls.crt"), "{error}");
        std::fs::write(dir.join(CERT_FILE), "not a certificate")?;
        std::fs::write(dir.join(KEY_FILE), "not a key")?;
        let error = ServingCert::from_dir(&dir).err().map(|e| format!("{e:#}")).unwrap_or_default();
        assert!(error.contains("holds no certificate") || error.contains("not PEM"), "{error}");
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }

    #[test]
    fn a_self_signed_certificate_is_made_without_files() -> Result<()> {
        let cert = Arc::new(ServingCert::self_signed(vec!["localhost".to_owned()])?);
        assert!(cert.fingerprint().is_some());
        cert.server_config()?;
        Ok(())
    }
}
