//! `cargo xtask test`: the one command that runs every test, end-to-end ones included.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::cluster::{self, CLUSTER_DIR_ENV};

/// `--workspace`, unless the arguments name packages (`-p`, `--package`): cargo would otherwise
/// ignore them and run every test.
fn workspace_unless_narrowed(cargo_test_args: &[String]) -> Option<&'static str> {
    let narrowed = cargo_test_args
        .iter()
        .take_while(|arg| *arg != "--")
        .any(|arg| arg.starts_with("-p") || arg == "--package" || arg.starts_with("--package="));
    (!narrowed).then_some("--workspace")
}

/// What `cargo xtask test` was asked to run.
pub struct Options {
    /// Fault-injection tests at full size.
    pub long: bool,
    /// Start the local cluster with its node.
    pub with_node: bool,
    /// A Kubernetes minor to run against instead of the default one.
    pub kubernetes: Option<String>,
    /// Arguments for `cargo test`.
    pub cargo_test_args: Vec<String>,
}

/// The end-to-end tests the oldest supported Kubernetes minor runs (README "Supported Kubernetes
/// versions").
const SUPPORTED_KUBERNETES_TESTS: &[&str] = &["-p", "e2e-tests", "--test", "supported_kubernetes"];

/// Free space a cold workspace build needs in the target folder (a debug build of every target
/// and the release operator come to about 8 GiB here).
const TARGET_DISK_GIB: u64 = 12;

/// Runs every test (or the ones asked for) against the local control plane, starting it first
/// when none is running and stopping it afterwards if this call started it. A whole run (no test
/// arguments) ends with the supported-versions subset against the oldest supported minor.
pub fn run(root: &Path, options: &Options) -> Result<()> {
    // Everything the suite needs from Debian, up front, whatever the filters: a test that finds
    // its tool missing halfway through a long run helps nobody.
    crate::packages::ensure(&crate::packages::for_tests(options.with_node))?;
    if !crate::target_dir(root).join("debug/example-operator").is_file() {
        crate::packages::check_disk(&crate::target_dir(root), TARGET_DISK_GIB, "building the workspace")?;
    }
    if let Some(minor) = &options.kubernetes {
        let args: Vec<String> = if options.cargo_test_args.is_empty() {
            SUPPORTED_KUBERNETES_TESTS.iter().map(|a| (*a).to_owned()).collect()
        } else {
            options.cargo_test_args.clone()
        };
        return run_on_private_cluster(root, minor, &args);
    }
    let (state, started) = cluster::up(root, options.with_node, cluster::binaries::DEFAULT_KUBERNETES)?;
    eprintln!("running tests against {} (Kubernetes {})", state.server, state.kubernetes_version);
    let run = || -> Result<std::process::ExitStatus> {
        let operator_binary = crate::build_operator(root)?;
        let mut command = cargo_test(root, &state, &operator_binary, &options.cargo_test_args);
        // With a node, the chart's Pods run the dev build's image (quick to build; the demo and
        // README use the release build).
        if let Some(socket) = &state.containerd_socket {
            let reference = crate::image::run(root, true)?;
            command
                .env("EXAMPLE_OPERATOR_IMAGE", &reference)
                .env("EXAMPLE_OPERATOR_IMAGE_ARCHIVE", crate::image::archive_path(root))
                .env("EXAMPLE_OPERATOR_CONTAINERD_SOCKET", socket);
        }
        if options.long {
            command.env("EXAMPLE_OPERATOR_LONG_FAULTS", "1");
        }
        command.status().context("running cargo test")
    };
    let status = match run() {
        Ok(status) => status,
        Err(error) => {
            // A build that fails leaves no cluster behind that this call started.
            if started {
                let _ = state.stop(root);
            }
            return Err(error);
        }
    };
    // Tests may stop and start components (new PIDs): judge the cluster as recorded now.
    let state = cluster::ClusterState::load(root)?.unwrap_or(state);
    let crashed = state.crashed();
    if started {
        state.stop(root)?;
    }
    if !crashed.is_empty() {
        bail!("the local control plane crashed during the tests:\n{}", crashed.join("\n"));
    }
    // The oldest supported minor runs its subset after a whole run, whatever the result above
    // (both results are reported).
    let oldest = if options.cargo_test_args.is_empty() {
        let args: Vec<String> = SUPPORTED_KUBERNETES_TESTS.iter().map(|a| (*a).to_owned()).collect();
        run_on_private_cluster(root, cluster::binaries::OLDEST_KUBERNETES, &args)
    } else {
        Ok(())
    };
    if !status.success() {
        bail!("tests failed ({status}){}", oldest.err().map(|e| format!("; {e:#}")).unwrap_or_default());
    }
    oldest
}

/// `cargo test` against `state`, with everything the end-to-end tests read from the environment.
fn cargo_test(root: &Path, state: &cluster::ClusterState, operator_binary: &Path, args: &[String]) -> Command {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    // Not current_exe(): the workspace build just replaced this very binary on disk.
    let xtask_binary = crate::target_dir(root).join("debug/xtask");
    let mut command = Command::new(cargo);
    command
        .current_dir(root)
        .arg("test")
        .args(workspace_unless_narrowed(args))
        .arg("--no-fail-fast")
        .args(args)
        .env(CLUSTER_DIR_ENV, &state.dir)
        // The end-to-end tests run the operator binary as separate processes, and use this very
        // xtask to stop and start control-plane components.
        .env("EXAMPLE_OPERATOR_BIN", operator_binary)
        .env("EXAMPLE_OPERATOR_XTASK", &xtask_binary)
        .env("EXAMPLE_OPERATOR_RESTRICTED_KUBECONFIG", &state.restricted_kubeconfig)
        // Anything that falls back to KUBECONFIG reaches the test cluster, never a real one.
        .env("KUBECONFIG", &state.admin_kubeconfig)
        // The cluster's own kubectl and helm first.
        .env("PATH", state.path_with_tools().unwrap_or_default())
        // Test failures are anyhow errors that say what went wrong; their backtraces are noise.
        .env("RUST_LIB_BACKTRACE", "0");
    command
}

/// Runs `args` against a private control plane of Kubernetes `minor` (no node), stopped after.
fn run_on_private_cluster(root: &Path, minor: &str, args: &[String]) -> Result<()> {
    let state = cluster::start_private(root, minor)?;
    eprintln!("running {} against {} (Kubernetes {})", args.join(" "), state.server, state.kubernetes_version);
    let result = crate::build_operator(root).and_then(|operator_binary| {
        cargo_test(root, &state, &operator_binary, args).status().context("running cargo test")
    });
    let crashed = state.crashed();
    let stopped = state.stop_private();
    let status = result?;
    stopped?;
    if !crashed.is_empty() {
        bail!("the Kubernetes {minor} control plane crashed during the tests:\n{}", crashed.join("\n"));
    }
    if !status.success() {
        bail!("tests against Kubernetes {minor} failed ({status})");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::workspace_unless_narrowed;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|a| (*a).to_owned()).collect()
    }

    #[test]
    fn packages_asked_for_narrow_the_run() {
        assert_eq!(workspace_unless_narrowed(&args(&[])), Some("--workspace"));
        assert_eq!(workspace_unless_narrowed(&args(&["--test", "leader"])), Some("--workspace"));
        assert_eq!(workspace_unless_narrowed(&args(&["-p", "xtask"])), None);
        assert_eq!(workspace_unless_narrowed(&args(&["-pxtask"])), None);
        assert_eq!(workspace_unless_narrowed(&args(&["--package=e2e-tests"])), None);
        // After `--`, arguments belong to the test binaries.
        assert_eq!(workspace_unless_narrowed(&args(&["--", "-p"])), Some("--workspace"));
    }
}
