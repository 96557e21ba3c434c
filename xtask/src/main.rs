//! `cargo xtask`: the project's developer commands.
//!
//! - `crdgen [--check]`: CRD YAML from the Rust types.
//! - `cluster up | down | status | env`: the local control plane of real Kubernetes binaries.
//! - `test`: every test, end-to-end ones included, against that control plane.

mod cluster;
mod crdgen;
mod test;

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Developer commands of example-operator")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write the CRD YAML generated from crd-types into the chart.
    Crdgen {
        /// Do not write; fail when the committed YAML differs from what the types generate.
        #[arg(long)]
        check: bool,
    },
    /// Manage the local control plane (etcd, kube-apiserver, kube-controller-manager).
    Cluster {
        #[command(subcommand)]
        action: ClusterAction,
    },
    /// Run every test: unit tests and end-to-end tests against the local control plane.
    /// Reuses a running local control plane, or starts one and stops it afterwards.
    Test {
        /// Arguments passed to `cargo test` (e.g. `-p e2e-tests -- crd`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        cargo_test_args: Vec<String>,
    },
}

#[derive(Subcommand)]
enum ClusterAction {
    /// Build the binaries if needed and start the control plane (no-op when already running).
    Up,
    /// Stop the recorded processes and delete the cluster folder.
    Down,
    /// Show each process and the API server's readiness; fails when anything is down.
    Status,
    /// Print `export` lines for a shell: `eval "$(cargo xtask cluster env)"`.
    Env,
}

/// The workspace root: the parent of this crate's folder.
fn workspace_root() -> Result<PathBuf> {
    let manifest_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest_dir.parent().map(PathBuf::from).context("xtask has no parent folder")
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let root = workspace_root()?;
    match cli.command {
        Command::Crdgen { check } => crdgen::run(&root, check),
        Command::Cluster { action } => match action {
            ClusterAction::Up => {
                let (state, started) = cluster::up(&root)?;
                let verb = if started { "started" } else { "already running" };
                eprintln!("local control plane {verb}: {} (Kubernetes {})", state.server, state.kubernetes_version);
                eprintln!("point a shell at it with: eval \"$(cargo xtask cluster env)\"");
                Ok(())
            }
            ClusterAction::Down => cluster::down(&root),
            ClusterAction::Status => cluster::status(&root),
            ClusterAction::Env => {
                let state = cluster::ClusterState::load(&root)?
                    .context("no local control plane is recorded; start one with `cargo xtask cluster up`")?;
                print!("{}", state.env_lines());
                Ok(())
            }
        },
        Command::Test { cargo_test_args } => test::run(&root, &cargo_test_args),
    }
}
