//! What the developer commands need from the machine, checked or installed by the command itself.
//!
//! Debian packages are installed with `apt-get` (as root; otherwise the command says what to run),
//! with one line naming them and none of apt's output unless it fails. What cannot be installed
//! that way (Go, disk space) is checked before any long build, with one line that says what to do.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};

/// A Debian package a command needs, and what for (shown in the line that installs it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Package {
    /// The Debian package name.
    pub name: &'static str,
    /// What the command uses it for.
    pub purpose: &'static str,
}

/// The node's container runtime, network plugins and packet filter (`cluster up`).
pub const NODE: &[Package] = &[
    Package { name: "containerd", purpose: "the node's container runtime" },
    Package { name: "runc", purpose: "the node's container runtime" },
    Package { name: "containernetworking-plugins", purpose: "the node's Pod network" },
    Package { name: "iptables", purpose: "the node's Service routing" },
    Package { name: "conntrack", purpose: "the node's Service routing" },
];

/// A real Prometheus server and promtool (the demo, the metrics and alert tests).
pub const PROMETHEUS: &[Package] = &[Package { name: "prometheus", purpose: "a Prometheus server and promtool" }];

/// libfaketime (the clock-skew tests) and skopeo (the image test).
pub const TEST_TOOLS: &[Package] = &[
    Package { name: "faketime", purpose: "libfaketime for the clock-skew tests" },
    Package { name: "skopeo", purpose: "reading the operator's image archive" },
];

/// Every package `cargo xtask test` installs before it builds anything.
pub fn for_tests(with_node: bool) -> Vec<Package> {
    let node: &[Package] = if with_node { NODE } else { &[] };
    [node, PROMETHEUS, TEST_TOOLS].concat()
}

/// True when dpkg has `name` installed.
fn installed(name: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", name])
        .output()
        .is_ok_and(|output| String::from_utf8_lossy(&output.stdout).contains("install ok installed"))
}

/// True when this process runs as root (`id -u` prints 0).
fn running_as_root() -> bool {
    Command::new("id").arg("-u").output().is_ok_and(|output| String::from_utf8_lossy(&output.stdout).trim() == "0")
}

/// The one line that says what is installed and why.
fn install_line(missing: &[Package]) -> String {
    let mut purposes: Vec<&str> = missing.iter().map(|p| p.purpose).collect();
    purposes.dedup();
    let names: Vec<&str> = missing.iter().map(|p| p.name).collect();
    format!("installing Debian packages {} ({})", names.join(" "), purposes.join("; "))
}

/// Installs whichever of `packages` is missing. Prints one line when it installs anything, apt's
/// output only when apt fails; fails with the command to run when not root.
pub fn ensure(packages: &[Package]) -> Result<()> {
    let mut missing: Vec<Package> = packages.iter().copied().filter(|p| !installed(p.name)).collect();
    missing.dedup_by_key(|p| p.name);
    if missing.is_empty() {
        return Ok(());
    }
    let names: Vec<&str> = missing.iter().map(|p| p.name).collect();
    if !running_as_root() {
        bail!(
            "Debian packages {} are missing and only root can install them: run `sudo apt-get install {}`, or this command as root",
            names.join(" "),
            names.join(" ")
        );
    }
    eprintln!("{}", install_line(&missing));
    apt(&["update"])?;
    let mut args = vec!["install", "-y", "--no-install-recommends"];
    args.extend(&names);
    apt(&args)
}

/// Runs apt-get quietly; its whole output becomes the error when it fails.
fn apt(args: &[&str]) -> Result<()> {
    let output = Command::new("apt-get")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .args(["-q", "-o", "Dpkg::Use-Pty=0"])
        .args(args)
        .output()
        .context("running apt-get (is this a Debian machine?)")?;
    if !output.status.success() {
        bail!(
            "apt-get {} failed ({}):\n{}{}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

/// The Go toolchain the wrapper modules in `xtask/go/` declare (`go 1.26.0` → (1, 26)).
pub const GO_NEEDED: (u32, u32) = (1, 26);

/// `(major, minor)` of `go version` output such as `go version go1.26.8 linux/amd64`.
fn go_version(output: &str) -> Option<(u32, u32)> {
    let version = output.split_whitespace().find_map(|word| word.strip_prefix("go1."))?;
    let minor = version.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()?;
    Some((1, minor))
}

/// Fails with what to do when Go is missing or older than the wrapper modules need.
pub fn check_go() -> Result<()> {
    let (major, minor) = GO_NEEDED;
    let found = Command::new("go").arg("version").output();
    let version = match &found {
        Ok(output) if output.status.success() => go_version(&String::from_utf8_lossy(&output.stdout)),
        _ => bail!("Go {major}.{minor} or newer is needed to build the local cluster and none is on PATH: install Go"),
    };
    match version {
        Some(found) if found >= GO_NEEDED => Ok(()),
        other => bail!(
            "Go {major}.{minor} or newer is needed to build the local cluster, found {}: install a newer Go",
            other.map(|(a, b)| format!("{a}.{b}")).unwrap_or_else(|| "an unknown version".to_owned())
        ),
    }
}

/// Free bytes on the file system holding `path` (or its nearest existing parent).
fn free_bytes(path: &Path) -> Result<u64> {
    let existing = path.ancestors().find(|p| p.exists()).context("no existing folder above the path")?;
    let output = Command::new("df").args(["--output=avail", "-B1"]).arg(existing).output().context("running df")?;
    let text = String::from_utf8_lossy(&output.stdout);
    text.lines().nth(1).and_then(|line| line.trim().parse().ok()).with_context(|| format!("df printed {text:?}"))
}

/// Fails when the file system of `path` has less than `needed_gib` GiB free, saying what for.
pub fn check_disk(path: &Path, needed_gib: u64, what: &str) -> Result<()> {
    let free = free_bytes(path)?;
    let needed = needed_gib << 30;
    if free < needed {
        bail!(
            "{what} needs about {needed_gib} GiB free under {}, and {:.1} GiB are: free some space first",
            path.display(),
            free as f64 / f64::from(1u32 << 30)
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_versions_are_read_from_go_version_output() {
        assert_eq!(go_version("go version go1.26.8 linux/amd64"), Some((1, 26)));
        assert_eq!(go_version("go version go1.27rc1 linux/amd64"), Some((1, 27)));
        assert_eq!(go_version("go version devel linux/amd64"), None);
    }

    #[test]
    fn the_install_line_names_each_package_and_purpose_once() {
        let line = install_line(NODE);
        assert_eq!(line.matches("the node's container runtime").count(), 1);
        assert!(line.starts_with("installing Debian packages containerd runc containernetworking-plugins"));
    }

    #[test]
    fn the_tests_install_every_package_the_suite_uses() {
        let names: Vec<&str> = for_tests(true).iter().map(|p| p.name).collect();
        for needed in ["containerd", "prometheus", "faketime", "skopeo"] {
            assert!(names.contains(&needed), "{needed} missing from {names:?}");
        }
        assert!(!for_tests(false).iter().any(|p| p.name == "containerd"));
    }
}
