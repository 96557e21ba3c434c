//! `cargo xtask demo`: the main job on a fresh machine. Brings up the local control plane (or uses
//! the cluster in KUBECONFIG when set) and installs the CRDs.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::{cluster, crdgen};

pub fn run(root: &Path) -> Result<()> {
    let kubeconfig = match std::env::var_os("KUBECONFIG") {
        Some(path) if !path.is_empty() => {
            eprintln!("using the cluster in KUBECONFIG={}", path.to_string_lossy());
            std::path::PathBuf::from(path)
        }
        _ => {
            let (state, started) = cluster::up(root)?;
            let verb = if started { "started" } else { "reusing" };
            eprintln!("{verb} the local control plane at {} (Kubernetes {})", state.server, state.kubernetes_version);
            state.admin_kubeconfig
        }
    };
    let status = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .args(["apply", "--server-side", "-f"])
        .arg(crdgen::crd_dir(root))
        .status()
        .context("running kubectl")?;
    if !status.success() {
        bail!("installing the CRDs failed ({status})");
    }
    let status = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .args([
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd/myresources.example.com",
            "crd/messagebroadcasts.example.com",
        ])
        .status()?;
    if !status.success() {
        bail!("the CRDs did not become Established ({status})");
    }
    eprintln!("CRDs installed. Point a shell at the cluster with: eval \"$(cargo xtask cluster env)\"");
    Ok(())
}
