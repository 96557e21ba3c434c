//! The local control plane's own certificate authority, serving certificate, client identities
//! and service-account signing key, and the kubeconfigs that use them.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};

/// A client identity: the API server takes the user from the certificate's CN and the groups
/// from its O entries (https://kubernetes.io/docs/reference/access-authn-authz/authentication/#x509-client-certificates).
pub struct Identity {
    pub user: &'static str,
    pub groups: &'static [&'static str],
    /// File stem of the certificate, key and kubeconfig.
    pub file: &'static str,
}

/// Cluster administrator (system:masters bypasses authorization).
pub const ADMIN: Identity = Identity { user: "example-operator-admin", groups: &["system:masters"], file: "admin" };

/// kube-controller-manager; it runs every controller under its own identity.
pub const CONTROLLER_MANAGER: Identity =
    Identity { user: "system:kube-controller-manager", groups: &["system:masters"], file: "controller-manager" };

/// Stands for the operator's ServiceAccount: authenticated, with no rights until RBAC grants them.
pub const RESTRICTED: Identity =
    Identity { user: "example-operator", groups: &["example-operator"], file: "restricted" };

/// File paths of the generated material.
pub struct Pki {
    pub ca_cert: PathBuf,
    pub serving_cert: PathBuf,
    pub serving_key: PathBuf,
    pub service_account_key: PathBuf,
    pub service_account_public_key: PathBuf,
    dir: PathBuf,
}

impl Pki {
    /// Certificate and key of a client identity.
    pub fn client_files(&self, identity: &Identity) -> (PathBuf, PathBuf) {
        (self.dir.join(format!("{}.crt", identity.file)), self.dir.join(format!("{}.key", identity.file)))
    }
}

fn write(path: &Path, contents: &str) -> Result<()> {
    std::fs::write(path, contents).with_context(|| format!("writing {}", path.display()))
}

/// Generates a CA, a serving certificate for 127.0.0.1 and the addresses Pods use, one client certificate per identity and
/// the service-account signing key into `dir`.
pub fn generate(dir: &Path, identities: &[&Identity]) -> Result<Pki> {
    std::fs::create_dir_all(dir)?;
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.distinguished_name.push(DnType::CommonName, "example-operator local control plane CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages =
        vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, ca_key);

    let pki = Pki {
        ca_cert: dir.join("ca.crt"),
        serving_cert: dir.join("apiserver.crt"),
        serving_key: dir.join("apiserver.key"),
        service_account_key: dir.join("service-account.key"),
        service_account_public_key: dir.join("service-account.pub"),
        dir: dir.to_path_buf(),
    };
    write(&pki.ca_cert, &ca_cert.pem())?;

    let serving_key = KeyPair::generate()?;
    let mut serving = CertificateParams::new(vec![
        "127.0.0.1".to_owned(),
        "localhost".to_owned(),
        "kubernetes".to_owned(),
        "kubernetes.default".to_owned(),
        "kubernetes.default.svc".to_owned(),
        "kubernetes.default.svc.cluster.local".to_owned(),
        // Where Pods reach the API server: the `kubernetes` Service and the node's bridge address.
        super::node::KUBERNETES_SERVICE_IP.to_owned(),
        super::node::NODE_IP.to_owned(),
    ])?;
    serving.distinguished_name.push(DnType::CommonName, "kube-apiserver");
    serving.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    write(&pki.serving_cert, &serving.signed_by(&serving_key, &issuer)?.pem())?;
    write(&pki.serving_key, &serving_key.serialize_pem())?;

    for identity in identities {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, identity.user);
        for group in identity.groups {
            params.distinguished_name.push(DnType::OrganizationName, *group);
        }
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let (cert_path, key_path) = pki.client_files(identity);
        write(&cert_path, &params.signed_by(&key, &issuer)?.pem())?;
        write(&key_path, &key.serialize_pem())?;
    }

    // The API server signs service-account tokens with this key and verifies them with its
    // public half.
    let service_account_key = KeyPair::generate()?;
    write(&pki.service_account_key, &service_account_key.serialize_pem())?;
    write(&pki.service_account_public_key, &service_account_key.public_key_pem())?;
    Ok(pki)
}

/// Writes a kubeconfig for `identity` against `server` and returns its path.
pub fn write_kubeconfig(pki: &Pki, identity: &Identity, server: &str, dir: &Path) -> Result<PathBuf> {
    let (cert, key) = pki.client_files(identity);
    let config = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "example-operator-local", "cluster": {
            "server": server,
            "certificate-authority": pki.ca_cert,
        }}],
        "users": [{"name": identity.user, "user": {
            "client-certificate": cert,
            "client-key": key,
        }}],
        "contexts": [{"name": identity.file, "context": {
            "cluster": "example-operator-local",
            "user": identity.user,
            "namespace": "default",
        }}],
        "current-context": identity.file,
    });
    let path = dir.join(format!("{}.kubeconfig", identity.file));
    write(&path, &serde_yaml::to_string(&config)?)?;
    Ok(path)
}
