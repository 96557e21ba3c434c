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

/// Runs `cargo test --workspace` (or the packages asked for) against the local control plane,
/// starting it first when none is running and stopping it afterwards if this call started it.
pub fn run(root: &Path, long: bool, with_node: bool, cargo_test_args: &[String]) -> Result<()> {
    let (state, started) = cluster::up(root, with_node)?;
    eprintln!("running tests against {} (Kubernetes {})", state.server, state.kubernetes_version);
    // The end-to-end tests run the operator binary as separate processes, and use this very
    // xtask to stop and start control-plane components.
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let mut command = Command::new(&cargo);
    let operator_binary = crate::build_operator(root)?;
    // With a node, the chart's Pods run the dev build's image (quick to build; the demo and
    // README use the release build).
    if let Some(socket) = &state.containerd_socket {
        let reference = crate::image::run(root, true)?;
        command
            .env("EXAMPLE_OPERATOR_IMAGE", &reference)
            .env("EXAMPLE_OPERATOR_IMAGE_ARCHIVE", crate::image::archive_path(root))
            .env("EXAMPLE_OPERATOR_CONTAINERD_SOCKET", socket);
    }
    // Not current_exe(): the workspace build just replaced this very binary on disk.
    let xtask_binary = crate::target_dir(root).join("debug/xtask");
    if long {
        command.env("EXAMPLE_OPERATOR_LONG_FAULTS", "1");
    }
    let status = command
        .current_dir(root)
        .arg("test")
        .args(workspace_unless_narrowed(cargo_test_args))
        .arg("--no-fail-fast")
        .args(cargo_test_args)
        .env(CLUSTER_DIR_ENV, &state.dir)
        .env("EXAMPLE_OPERATOR_BIN", &operator_binary)
        .env("EXAMPLE_OPERATOR_XTASK", &xtask_binary)
        .env("EXAMPLE_OPERATOR_RESTRICTED_KUBECONFIG", &state.restricted_kubeconfig)
        // Anything that falls back to KUBECONFIG reaches the test cluster, never a real one.
        .env("KUBECONFIG", &state.admin_kubeconfig)
        .env("PATH", state.path_with_tools()?)
        // Test failures are anyhow errors that say what went wrong; their backtraces are noise.
        .env("RUST_LIB_BACKTRACE", "0")
        .status()
        .context("running cargo test")?;
    // Tests may stop and start components (new PIDs): judge the cluster as recorded now.
    let state = cluster::ClusterState::load(root)?.unwrap_or(state);
    let crashed = state.crashed();
    if started {
        state.stop(root)?;
    }
    if !crashed.is_empty() {
        bail!("the local control plane crashed during the tests:\n{}", crashed.join("\n"));
    }
    if !status.success() {
        bail!("tests failed ({status})");
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
