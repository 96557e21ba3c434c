//! `cargo xtask demo`: the main job on a fresh machine. Brings up the local control plane (or
//! uses the cluster in KUBECONFIG), installs the CRDs, starts two operator replicas with leader
//! election, applies the samples, shows them converge, and runs until Ctrl-C (or, with
//! `--once`, until they converged), then cleans up what it started.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use crd_types::{MessageBroadcast, MyResource, Phase};
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::Api;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::{cluster, crdgen};

/// Namespace of the replicas' Lease.
const SYSTEM_NAMESPACE: &str = "example-operator-system";
const LEASE: &str = "example-operator-leader";

fn kubectl(kubeconfig: &Path, args: &[&str]) -> Result<String> {
    let output =
        Command::new("kubectl").arg("--kubeconfig").arg(kubeconfig).args(args).output().context("running kubectl")?;
    if !output.status.success() {
        bail!("kubectl {} failed: {}", args.join(" "), String::from_utf8_lossy(&output.stderr));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// A running operator replica.
struct Replica {
    child: Child,
    identity: String,
}

impl Replica {
    fn start(binary: &Path, kubeconfig: &Path, index: usize, log_dir: &Path) -> Result<Self> {
        let identity = format!("example-operator-demo-{index}");
        let log = std::fs::File::create(log_dir.join(format!("{identity}.log")))?;
        let metrics = format!("127.0.0.1:{}", 18080 + index * 10);
        let probes = format!("127.0.0.1:{}", 18081 + index * 10);
        let child = Command::new(binary)
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .args(["--metrics-bind-address", &metrics, "--health-probe-bind-address", &probes])
            .env("POD_NAME", &identity)
            .env("POD_NAMESPACE", SYSTEM_NAMESPACE)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting the operator")?;
        eprintln!("started replica {identity} (metrics on http://{metrics}/metrics, probes on http://{probes}/readyz)");
        Ok(Self { child, identity })
    }

    /// SIGTERM and wait: the leader stops its controllers and releases the lease.
    fn stop(mut self) -> Result<()> {
        if self.child.try_wait()?.is_none() {
            let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM);
        }
        let status = self.child.wait()?;
        eprintln!("replica {} exited ({status})", self.identity);
        Ok(())
    }
}

/// Runs the demo. With `once`, returns after showing convergence instead of waiting for Ctrl-C.
pub fn run(root: &Path, once: bool) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let (kubeconfig, started_cluster) = match std::env::var_os("KUBECONFIG").filter(|k| !k.is_empty()) {
        Some(path) => {
            eprintln!("using the cluster in KUBECONFIG={}", path.to_string_lossy());
            (PathBuf::from(path), None)
        }
        None => {
            let (state, started) = cluster::up(root, false)?;
            let verb = if started { "started" } else { "reusing" };
            eprintln!("{verb} the local control plane at {} (Kubernetes {})", state.server, state.kubernetes_version);
            (state.admin_kubeconfig.clone(), started.then_some(state))
        }
    };

    let result = (|| -> Result<()> {
        let crds = crdgen::crd_dir(root);
        kubectl(&kubeconfig, &["apply", "--server-side", "-f", &crds.display().to_string()])?;
        kubectl(
            &kubeconfig,
            &[
                "wait",
                "--for=condition=Established",
                "--timeout=60s",
                "crd/myresources.example.com",
                "crd/messagebroadcasts.example.com",
            ],
        )?;
        eprintln!("CRDs installed");
        let namespace =
            kubectl(&kubeconfig, &["create", "namespace", SYSTEM_NAMESPACE, "--dry-run=client", "-o", "yaml"])?;
        apply_stdin(&kubeconfig, &namespace)?;

        let binary = crate::build_operator(root)?;
        let log_dir = root.join("target/demo");
        std::fs::create_dir_all(&log_dir)?;
        let replicas = vec![
            Replica::start(&binary, &kubeconfig, 0, &log_dir)?,
            Replica::start(&binary, &kubeconfig, 1, &log_dir)?,
        ];
        let shown = runtime.block_on(show_convergence(root, &kubeconfig));
        if shown.is_ok() && !once {
            eprintln!("\nrunning; replica logs are in {}. Press Ctrl-C to stop.", log_dir.display());
            runtime.block_on(tokio::signal::ctrl_c())?;
            eprintln!();
        }
        for replica in replicas {
            replica.stop()?;
        }
        shown
    })();
    if let Some(state) = started_cluster {
        state.stop(root)?;
        eprintln!("stopped the local control plane");
    }
    result
}

fn apply_stdin(kubeconfig: &Path, manifest: &str) -> Result<()> {
    use std::io::Write;
    let mut child = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(["apply", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()?;
    child.stdin.take().context("kubectl stdin")?.write_all(manifest.as_bytes())?;
    if !child.wait()?.success() {
        bail!("kubectl apply failed");
    }
    Ok(())
}

/// Applies the samples, waits until they converge, and prints what `kubectl` shows.
async fn show_convergence(root: &Path, kubeconfig: &Path) -> Result<()> {
    let samples = root.join("charts/example-operator/samples");
    kubectl(kubeconfig, &["apply", "-f", &samples.display().to_string()])?;
    eprintln!("applied the samples in {}", samples.display());
    let client = crate::harness::client_for(kubeconfig).await?;
    let leases: Api<Lease> = Api::namespaced(client.clone(), SYSTEM_NAMESPACE);
    let resources: Api<MyResource> = Api::namespaced(client.clone(), "default");
    let broadcasts: Api<MessageBroadcast> = Api::all(client);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let leader =
            leases.get_opt(LEASE).await?.and_then(|l| l.spec).and_then(|s| s.holder_identity).filter(|h| !h.is_empty());
        let resource_ready =
            resources.get_opt("example").await?.and_then(|r| r.status).and_then(|s| s.phase) == Some(Phase::Ready);
        let broadcast = broadcasts.get_opt("greeting").await?.and_then(|b| b.status);
        let broadcast_ready =
            broadcast.is_some_and(|s| s.ready_namespaces >= 2 && s.ready_namespaces == s.matched_namespaces);
        if let (Some(leader), true, true) = (&leader, resource_ready, broadcast_ready) {
            println!("\nleader: {leader}\n");
            break;
        }
        if Instant::now() > deadline {
            bail!("the samples did not converge within 120s (leader: {leader:?}); see the replica logs in target/demo");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    for args in [
        vec!["get", "lease", "-n", SYSTEM_NAMESPACE, LEASE],
        vec!["get", "myresources", "-A"],
        vec!["get", "messagebroadcasts"],
        vec!["get", "configmaps", "-A", "-l", "app.kubernetes.io/managed-by=example-operator"],
        vec!["get", "configmap", "example-configmap", "-n", "default", "-o", "jsonpath={.data.message}"],
    ] {
        println!("$ kubectl {}\n{}\n", args.join(" "), kubectl(kubeconfig, &args)?.trim_end());
    }
    Ok(())
}
