//! The operator's image as `cargo xtask image` writes it: an archive that standard tools read
//! (Debian's skopeo inspects it as a docker-archive), loaded into the node's containerd, and
//! runnable as a user would run it: as UID 65532, on a read-only root filesystem, with CA
//! certificates. (The chart's Pods run it on the node in `node.rs`.)

use anyhow::{Context, Result, ensure};
use e2e_tests::TestCluster;

fn archive() -> Result<std::path::PathBuf> {
    let path = std::env::var_os("EXAMPLE_OPERATOR_IMAGE_ARCHIVE").context(
        "EXAMPLE_OPERATOR_IMAGE_ARCHIVE is not set: run the tests with `cargo xtask test`, which builds the image",
    )?;
    Ok(path.into())
}

#[test]
fn skopeo_reads_the_archive_and_containerd_holds_the_image() -> Result<()> {
    let archive = archive()?;
    let skopeo = std::path::Path::new("/usr/bin/skopeo");
    ensure!(skopeo.is_file(), "skopeo is missing: install Debian's skopeo package");
    let output = std::process::Command::new(skopeo)
        .args(["inspect", "--config"])
        .arg(format!("docker-archive:{}", archive.display()))
        .output()?;
    ensure!(output.status.success(), "skopeo inspect failed: {}", String::from_utf8_lossy(&output.stderr));
    let config: serde_json::Value = serde_json::from_slice(&output.stdout)?;
    ensure!(config["config"]["User"] == "65532:65532", "{config}");
    ensure!(config["config"]["Entrypoint"] == serde_json::json!(["/example-operator"]), "{config}");
    ensure!(config["architecture"] == "amd64" && config["os"] == "linux", "{config}");

    // The archive carries the reference the chart is given: skopeo finds the image by it.
    let reference = std::env::var("EXAMPLE_OPERATOR_IMAGE").context("EXAMPLE_OPERATOR_IMAGE is not set")?;
    let output = std::process::Command::new(skopeo)
        .args(["inspect"])
        .arg(format!("docker-archive:{}:{reference}", archive.display()))
        .output()?;
    ensure!(output.status.success(), "skopeo finds no {reference}: {}", String::from_utf8_lossy(&output.stderr));
    let manifest: serde_json::Value = serde_json::from_slice(&output.stdout)?;
    ensure!(manifest["Layers"].as_array().is_some_and(|l| l.len() == 1), "{manifest}");
    let missing = std::process::Command::new(skopeo)
        .args(["inspect"])
        .arg(format!("docker-archive:{}:example-operator.local/other:0", archive.display()))
        .output()?;
    ensure!(!missing.status.success(), "skopeo must not find a reference the archive lacks");

    // Loaded into the node's containerd, under the reference the chart is given.
    let cluster = TestCluster::get()?;
    let socket = std::env::var("EXAMPLE_OPERATOR_CONTAINERD_SOCKET")
        .context("EXAMPLE_OPERATOR_CONTAINERD_SOCKET is not set: the local cluster runs without its node")?;
    let images = std::process::Command::new("ctr")
        .args(["--address", &socket, "-n", "k8s.io", "images", "list", "-q"])
        .output()?;
    let listed = String::from_utf8_lossy(&images.stdout);
    ensure!(listed.lines().any(|l| l == reference), "containerd of {} lists {listed}", cluster.dir.display());
    Ok(())
}
