//! `cargo xtask`: the project's developer commands.
//!
//! - `crdgen [--check]`: CRD YAML from the Rust types.
//! - `chart-docs [--check]`: the chart's README from Chart.yaml and values.yaml.
//! - `cluster up | down | status | env`: the local control plane of real Kubernetes binaries.
//! - `demo`: the main job: control plane, CRDs, operator, samples.
//! - `bench`: the benchmarks, as medians of interleaved rounds on a private control plane.
//! - `test`: every test, end-to-end ones included, against that control plane.

mod bench;
mod chart_docs;
mod cluster;
mod crdgen;
mod demo;
mod image;
mod packages;
mod test;

use xtask::harness;

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
    /// Write the chart's README from Chart.yaml and the `# --` comments of values.yaml.
    ChartDocs {
        /// Do not write; fail when the committed README differs from what the chart generates.
        #[arg(long)]
        check: bool,
    },
    /// Manage the local control plane (etcd, kube-apiserver, kube-controller-manager).
    Cluster {
        #[command(subcommand)]
        action: ClusterAction,
    },
    /// The main job: local control plane (or the cluster in KUBECONFIG), CRDs, two operator
    /// replicas with leader election, the samples converging; runs until Ctrl-C.
    Demo {
        /// Exit (cleaning up) once the samples converged instead of waiting for Ctrl-C.
        #[arg(long)]
        once: bool,
    },
    /// Run the benchmarks on a private control plane (started and stopped by the run): interleaved
    /// rounds, medians with min–max; prints a table and writes target/bench/results.json.
    Bench {
        /// MyResources to converge (SPEC: 1,000 by default, 10,000 for the large run).
        #[arg(long, default_value_t = bench::DEFAULT_OBJECTS)]
        objects: usize,
        /// Interleaved rounds; every figure is their median (the table says when fewer than 5).
        #[arg(long, default_value_t = bench::DEFAULT_ROUNDS)]
        rounds: usize,
        /// Namespaces of the 64 KiB broadcast fan-out (reduce only for a smoke run).
        #[arg(long, default_value_t = bench::FANOUT_NAMESPACES)]
        fanout_namespaces: usize,
    },
    /// Build the operator's OCI image without Docker, write it to target/image/, load it into
    /// the local node, and print its reference for the chart's image.repository and image.tag.
    Image {
        /// Use the dev build (quick to build, large) instead of the release build.
        #[arg(long)]
        debug: bool,
    },
    /// Run every test: unit tests and end-to-end tests against the local control plane.
    /// Reuses a running local control plane, or starts one and stops it afterwards.
    Test {
        /// Run the fault-injection tests at full size (2,000 objects instead of 100).
        #[arg(long)]
        long: bool,
        /// Start the local cluster without its node (the tests that need Pods then fail).
        #[arg(long)]
        no_node: bool,
        /// Run against this Kubernetes minor instead: its own private control plane, no node; with
        /// no test arguments, the supported-versions subset (`--test supported_kubernetes`).
        /// Without this flag and without test arguments, the run ends with that subset against
        /// the oldest supported minor.
        #[arg(long, value_name = "MINOR")]
        kubernetes: Option<String>,
        /// Arguments passed to `cargo test` (e.g. `-p e2e-tests -- crd`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        cargo_test_args: Vec<String>,
    },
}

#[derive(Subcommand)]
enum ClusterAction {
    /// Build the binaries if needed and start the control plane and its node; install the
    /// Prometheus Operator's ServiceMonitor and PrometheusRule CRDs (all that is done when
    /// already running).
    Up {
        /// Skip the node (containerd, kubelet, kube-proxy, kube-scheduler): a control plane only,
        /// enough for everything but Pods.
        #[arg(long)]
        no_node: bool,
        /// The Kubernetes minor to build and run: the default, or the oldest supported one
        /// (built without a node, so it implies --no-node).
        #[arg(long, value_name = "MINOR", default_value = cluster::binaries::DEFAULT_KUBERNETES)]
        kubernetes: String,
    },
    /// Stop the recorded processes and delete the cluster folder.
    Down,
    /// Show each process and the API server's readiness; fails when anything is down.
    Status,
    /// Print `export` lines for a shell: `eval "$(cargo xtask cluster env)"`.
    Env,
    /// Stop one component (etcd, kube-apiserver, kube-controller-manager), for fault injection.
    Stop { component: String },
    /// Start a stopped component again with its recorded arguments and wait until it serves.
    Start { component: String },
    /// Compact etcd's history to its current revision (watches resuming from older
    /// resourceVersions then get 410 Gone).
    Compact,
}

/// Builds the operator binary and returns its path. Builds every target of the workspace, as
/// `cargo test --workspace` does, so both share one feature resolution and nothing is compiled
/// twice.
fn build_operator(root: &std::path::Path) -> Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let status = std::process::Command::new(cargo)
        .current_dir(root)
        .args(["build", "--workspace", "--all-targets"])
        .status()
        .context("running cargo build")?;
    anyhow::ensure!(status.success(), "building the operator failed ({status})");
    Ok(target_dir(root).join("debug/example-operator"))
}

/// Builds the release operator binary and returns its path.
fn build_release_operator(root: &std::path::Path) -> Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let status = std::process::Command::new(cargo)
        .current_dir(root)
        .args(["build", "--release", "--package", "operator", "--bin", "example-operator"])
        .status()
        .context("running cargo build --release")?;
    anyhow::ensure!(status.success(), "building the release operator failed ({status})");
    Ok(target_dir(root).join("release/example-operator"))
}

/// Cargo's target folder.
fn target_dir(root: &std::path::Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| root.join("target"))
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
        Command::ChartDocs { check } => chart_docs::run(&root, check),
        Command::Cluster { action } => match action {
            ClusterAction::Up { no_node, kubernetes } => {
                let with_node = !no_node && cluster::binaries::has_node(&kubernetes);
                if !no_node && !with_node {
                    eprintln!("Kubernetes {kubernetes} is built without a node: starting its control plane only");
                }
                let (state, started) = cluster::up(&root, with_node, &kubernetes)?;
                let verb = if started { "started" } else { "already running" };
                eprintln!("local control plane {verb}: {} (Kubernetes {})", state.server, state.kubernetes_version);
                eprintln!("point a shell at it with: eval \"$(cargo xtask cluster env)\"");
                Ok(())
            }
            ClusterAction::Down => cluster::down(&root),
            ClusterAction::Status => cluster::status(&root),
            ClusterAction::Stop { component } => cluster::stop_component(&root, &component),
            ClusterAction::Start { component } => cluster::start_component(&root, &component),
            ClusterAction::Compact => cluster::compact(&root),
            ClusterAction::Env => {
                let state = cluster::ClusterState::load(&root)?
                    .context("no local control plane is recorded; start one with `cargo xtask cluster up`")?;
                print!("{}", state.env_lines());
                Ok(())
            }
        },
        Command::Demo { once } => demo::run(&root, once),
        Command::Bench { objects, rounds, fanout_namespaces } => {
            bench::run(&root, &bench::Options { objects, rounds, fanout_namespaces })
        }
        Command::Image { debug } => {
            println!("{}", image::run(&root, debug)?);
            Ok(())
        }
        Command::Test { long, no_node, kubernetes, cargo_test_args } => {
            test::run(&root, &test::Options { long, with_node: !no_node, kubernetes, cargo_test_args })
        }
    }
}

#[cfg(test)]
mod tests {
    /// A plain `cargo update` can pull a second k8s-openapi; the workspace must link exactly one
    /// kube and one k8s-openapi.
    #[test]
    fn cargo_lock_holds_one_kube_and_one_k8s_openapi() -> anyhow::Result<()> {
        let lock = std::fs::read_to_string(super::workspace_root()?.join("Cargo.lock"))?;
        for name in ["kube", "kube-client", "kube-runtime", "k8s-openapi"] {
            let copies = lock.lines().filter(|line| *line == format!("name = \"{name}\"")).count();
            anyhow::ensure!(
                copies == 1,
                "Cargo.lock holds {copies} copies of {name}; pin one (e.g. `cargo update -p k8s-openapi@0.29.0 --precise 0.28.0`)"
            );
        }
        Ok(())
    }
}
