//! Builds the control-plane binaries from the pinned Go wrapper modules in `xtask/go/` and caches
//! them outside the work tree, keyed by version and by the exact module pins, so only the first
//! build is slow.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

/// A Go wrapper module and the binaries built from it.
struct GoModule {
    /// Folder relative to `xtask/go/`.
    dir: &'static str,
    /// The pinned module whose version names the build.
    pinned: &'static str,
    /// `(binary name, Go package)` pairs.
    binaries: &'static [(&'static str, &'static str)],
    /// Source files of the module's own (not just pins) that key the build too.
    sources: &'static [&'static str],
}

/// The Kubernetes minor the local cluster runs unless told otherwise (`xtask/go/kubernetes`).
pub const DEFAULT_KUBERNETES: &str = "1.37";
/// The oldest Kubernetes minor this project supports and tests (`xtask/go/kubernetes-1.33`): the
/// oldest k8s-openapi 0.29 (kube 5) has types for. README "Supported Kubernetes versions".
pub const OLDEST_KUBERNETES: &str = "1.33";

/// The default minor: control plane, node and kubectl.
const KUBERNETES: GoModule = GoModule {
    dir: "kubernetes",
    pinned: "k8s.io/kubernetes",
    binaries: &[
        ("kube-apiserver", "k8s.io/kubernetes/cmd/kube-apiserver"),
        ("kube-controller-manager", "k8s.io/kubernetes/cmd/kube-controller-manager"),
        ("kubelet", "k8s.io/kubernetes/cmd/kubelet"),
        ("kube-proxy", "k8s.io/kubernetes/cmd/kube-proxy"),
        ("kube-scheduler", "k8s.io/kubernetes/cmd/kube-scheduler"),
        ("kubectl", "k8s.io/kubernetes/cmd/kubectl"),
    ],
    sources: &[],
};

/// The oldest supported minor: control plane and kubectl (no node: the chart's Pods are tested
/// on the default minor).
const KUBERNETES_OLDEST: GoModule = GoModule {
    dir: "kubernetes-1.33",
    pinned: "k8s.io/kubernetes",
    binaries: &[
        ("kube-apiserver", "k8s.io/kubernetes/cmd/kube-apiserver"),
        ("kube-controller-manager", "k8s.io/kubernetes/cmd/kube-controller-manager"),
        ("kubectl", "k8s.io/kubernetes/cmd/kubectl"),
    ],
    sources: &[],
};

/// The wrapper module of a Kubernetes minor (`1.37`, `1.33`).
fn kubernetes_module(minor: &str) -> Result<&'static GoModule> {
    match minor {
        DEFAULT_KUBERNETES => Ok(&KUBERNETES),
        OLDEST_KUBERNETES => Ok(&KUBERNETES_OLDEST),
        other => bail!(
            "Kubernetes {other} is not built here: the supported minors are {OLDEST_KUBERNETES} (the oldest) \
             and {DEFAULT_KUBERNETES} (the default)"
        ),
    }
}

/// True when `minor` has a node (kubelet, kube-proxy, kube-scheduler) built for it.
pub fn has_node(minor: &str) -> bool {
    minor == DEFAULT_KUBERNETES
}

const ETCD: GoModule = GoModule {
    dir: "etcd",
    pinned: "go.etcd.io/etcd/server/v3",
    binaries: &[("etcd", "go.etcd.io/etcd/server/v3")],
    sources: &[],
};

/// The controller-runtime peer of the benchmarks (`xtask/bench/peer`).
const PEER: GoModule = GoModule {
    dir: "../bench/peer",
    pinned: "sigs.k8s.io/controller-runtime",
    binaries: &[("peer", "example-operator/bench/peer")],
    sources: &["main.go"],
};

const HELM: GoModule = GoModule {
    dir: "helm",
    pinned: "helm.sh/helm/v3",
    binaries: &[("helm", "helm.sh/helm/v3/cmd/helm")],
    sources: &[],
};

/// controller-gen, which writes the Prometheus Operator's CRDs from its Go types (`monitoring.rs`).
const CONTROLLER_GEN: GoModule = GoModule {
    dir: "monitoring",
    pinned: "sigs.k8s.io/controller-tools",
    binaries: &[("controller-gen", "sigs.k8s.io/controller-tools/cmd/controller-gen")],
    sources: &[],
};

/// Paths of every binary the local control plane and the tests use.
#[derive(Clone, Debug)]
pub struct Binaries {
    pub kube_apiserver: PathBuf,
    pub kube_controller_manager: PathBuf,
    /// The node's components; `None` for a minor built without them.
    pub node: Option<NodeBinaries>,
    pub etcd: PathBuf,
    pub helm: PathBuf,
    /// Kubernetes version the API server reports, e.g. `v1.37.2`.
    pub kubernetes_version: String,
}

/// The node's components of one Kubernetes build.
#[derive(Clone, Debug)]
pub struct NodeBinaries {
    pub kubelet: PathBuf,
    pub kube_proxy: PathBuf,
    pub kube_scheduler: PathBuf,
}

impl Binaries {
    /// Folders holding the binaries, for a PATH.
    pub fn dirs(&self) -> Vec<PathBuf> {
        let mut dirs: Vec<PathBuf> = [&self.kube_apiserver, &self.etcd, &self.helm]
            .iter()
            .filter_map(|p| p.parent().map(Path::to_path_buf))
            .collect();
        dirs.dedup();
        dirs
    }
}

/// Where built binaries are kept: `$EXAMPLE_OPERATOR_CACHE_DIR`, else the XDG cache folder.
pub fn cache_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("EXAMPLE_OPERATOR_CACHE_DIR") {
        return Ok(PathBuf::from(dir));
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME") {
        return Ok(PathBuf::from(dir).join("example-operator"));
    }
    let home =
        std::env::var_os("HOME").context("neither EXAMPLE_OPERATOR_CACHE_DIR, XDG_CACHE_HOME nor HOME is set")?;
    Ok(PathBuf::from(home).join(".cache/example-operator"))
}

/// Returns the cached binaries of Kubernetes `minor` (see [`DEFAULT_KUBERNETES`]), building
/// whichever are missing.
pub fn ensure(root: &Path, minor: &str) -> Result<Binaries> {
    let go_dir = root.join("xtask/go");
    let cache = cache_dir()?.join("bin");
    let module = kubernetes_module(minor)?;
    let kubernetes = build_module(&go_dir, &cache, module, kubernetes_ldflags)?;
    let etcd = build_module(&go_dir, &cache, &ETCD, |_, _| Ok(String::from("-s -w")))?;
    let helm = build_module(&go_dir, &cache, &HELM, helm_ldflags)?;
    let node = has_node(minor).then(|| NodeBinaries {
        kubelet: kubernetes.0.join("kubelet"),
        kube_proxy: kubernetes.0.join("kube-proxy"),
        kube_scheduler: kubernetes.0.join("kube-scheduler"),
    });
    Ok(Binaries {
        kube_apiserver: kubernetes.0.join("kube-apiserver"),
        kube_controller_manager: kubernetes.0.join("kube-controller-manager"),
        node,
        etcd: etcd.0.join("etcd"),
        helm: helm.0.join("helm"),
        kubernetes_version: kubernetes.1,
    })
}

/// Returns the cached controller-runtime peer binary, building it if missing.
pub fn ensure_peer(root: &Path) -> Result<PathBuf> {
    let (dir, _) =
        build_module(&root.join("xtask/go"), &cache_dir()?.join("bin"), &PEER, |_, _| Ok(String::from("-s -w")))?;
    Ok(dir.join("peer"))
}

/// Returns the cached controller-gen binary, building it if missing.
pub fn ensure_controller_gen(root: &Path) -> Result<PathBuf> {
    let (dir, _) = build_module(&root.join("xtask/go"), &cache_dir()?.join("bin"), &CONTROLLER_GEN, |_, _| {
        Ok(String::from("-s -w"))
    })?;
    Ok(dir.join("controller-gen"))
}

/// The version of `module` that a wrapper's go.mod requires.
pub(super) fn required_version(go_mod: &str, module: &str) -> Option<String> {
    go_mod.lines().find_map(|line| {
        let mut words = line.trim().trim_start_matches("require").split_whitespace();
        (words.next() == Some(module)).then(|| words.next().map(str::to_owned)).flatten()
    })
}

/// `(major, minor)` of a `vX.Y.Z` version.
fn major_minor(version: &str) -> Option<(String, String)> {
    let mut parts = version.trim_start_matches('v').split('.');
    Some((parts.next()?.to_owned(), parts.next()?.to_owned()))
}

/// Stamps the version into `/version` and `kubectl version` output; without it they say v0.0.0.
fn kubernetes_ldflags(_go_mod: &str, version: &str) -> Result<String> {
    let (major, minor) = major_minor(version).context("k8s.io/kubernetes version is not vX.Y.Z")?;
    let pkg = "k8s.io/component-base/version";
    Ok(format!(
        "-s -w -X {pkg}.gitVersion={version} -X {pkg}.gitMajor={major} -X {pkg}.gitMinor={minor} -X {pkg}.gitTreeState=clean"
    ))
}

/// Stamps helm's own version and the Kubernetes version it assumes when not talking to a
/// cluster (`helm template`, `helm lint`), taken from the client-go it is built with.
fn helm_ldflags(go_mod: &str, version: &str) -> Result<String> {
    let client_go = required_version(go_mod, "k8s.io/client-go").context("helm's go.mod lacks k8s.io/client-go")?;
    let (_, minor) = major_minor(&client_go).context("client-go version is not v0.Y.Z")?;
    Ok(format!(
        "-s -w -X helm.sh/helm/v3/internal/version.version={version} \
         -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor={minor} \
         -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor={minor}"
    ))
}

/// FNV-1a: a stable fingerprint of the module pins, so editing go.mod or go.sum rebuilds.
pub(super) fn fingerprint(parts: &[&str]) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in parts.iter().flat_map(|p| p.bytes().chain([0])) {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{hash:016x}")
}

/// Free space a first build needs beside the binary cache: Go's module and build caches of one
/// Kubernetes release come to about 6 GiB here, with room to spare.
const BUILD_DISK_GIB: u64 = 10;

/// Checks, before a long build, what a build cannot install itself: Go and disk space.
fn preflight(cache: &Path) -> Result<()> {
    crate::packages::check_go()?;
    crate::packages::check_disk(cache, BUILD_DISK_GIB, "building the local cluster from Go modules")
}

/// Builds every binary of `module` into `cache/<dir>-<version>-<fingerprint>/` unless present.
/// Returns that folder and the pinned version.
fn build_module(
    go_dir: &Path,
    cache: &Path,
    module: &GoModule,
    ldflags: impl Fn(&str, &str) -> Result<String>,
) -> Result<(PathBuf, String)> {
    let module_dir = go_dir.join(module.dir);
    let go_mod = std::fs::read_to_string(module_dir.join("go.mod"))
        .with_context(|| format!("reading {}/go.mod", module_dir.display()))?;
    let go_sum = std::fs::read_to_string(module_dir.join("go.sum")).unwrap_or_default();
    let version = required_version(&go_mod, module.pinned)
        .with_context(|| format!("{}/go.mod does not require {}", module_dir.display(), module.pinned))?;
    let flags = ldflags(&go_mod, &version)?;
    let name = module.dir.rsplit('/').next().unwrap_or(module.dir);
    let mut keyed = vec![go_mod.clone(), go_sum, flags.clone()];
    for source in module.sources {
        let path = module_dir.join(source);
        keyed.push(std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?);
    }
    let keyed: Vec<&str> = keyed.iter().map(String::as_str).collect();
    let target = cache.join(format!("{name}-{version}-{}", fingerprint(&keyed)));
    if module.binaries.iter().all(|(name, _)| target.join(name).is_file()) {
        return Ok((target, version));
    }
    // Build into a scratch folder and rename it into place, so an interrupted build never
    // leaves a half-written binary in the cache.
    preflight(cache)?;
    let partial = target.with_extension(format!("partial-{}", std::process::id()));
    std::fs::create_dir_all(&partial).with_context(|| format!("creating {}", partial.display()))?;
    for (name, package) in module.binaries {
        eprintln!("building {name} {version} from Go modules (the first build takes several minutes)");
        // Go's own output (a line per module downloaded) only when the build fails.
        let output = Command::new("go")
            .current_dir(&module_dir)
            .env("CGO_ENABLED", "0")
            .args(["build", "-trimpath", "-ldflags", &flags, "-o"])
            .arg(partial.join(name))
            .arg(package)
            .output()
            .context("running `go build` (is Go installed?)")?;
        if !output.status.success() {
            bail!(
                "`go build {package}` in {} failed with {}:\n{}{}",
                module_dir.display(),
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
    }
    if target.exists() {
        std::fs::remove_dir_all(&target)?;
    }
    std::fs::rename(&partial, &target).with_context(|| format!("moving build into {}", target.display()))?;
    Ok((target, version))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_required_versions_from_single_lines_and_blocks() {
        let go_mod =
            "module x\n\nrequire k8s.io/kubernetes v1.37.2\n\nrequire (\n\tk8s.io/client-go v0.37.0 // indirect\n)\n";
        assert_eq!(required_version(go_mod, "k8s.io/kubernetes").as_deref(), Some("v1.37.2"));
        assert_eq!(required_version(go_mod, "k8s.io/client-go").as_deref(), Some("v0.37.0"));
        assert_eq!(required_version(go_mod, "k8s.io/api"), None);
    }

    #[test]
    fn kubernetes_builds_are_version_stamped() -> Result<()> {
        let flags = kubernetes_ldflags("", "v1.37.2")?;
        assert!(flags.contains("k8s.io/component-base/version.gitVersion=v1.37.2"));
        assert!(flags.contains("gitMinor=37"));
        Ok(())
    }

    /// The chart claims exactly the Kubernetes range the tests run: from the oldest minor built
    /// here (`cargo xtask test` runs the supported-versions subset against it) upwards.
    #[test]
    fn the_chart_claims_the_oldest_minor_that_is_tested() -> Result<()> {
        let chart = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/example-operator/Chart.yaml"),
        )?;
        let claimed = chart.lines().find_map(|line| line.strip_prefix("kubeVersion: ")).context("no kubeVersion")?;
        assert_eq!(claimed, format!("\">={OLDEST_KUBERNETES}.0-0\""));
        assert!(kubernetes_module(OLDEST_KUBERNETES).is_ok() && kubernetes_module(DEFAULT_KUBERNETES).is_ok());
        assert!(kubernetes_module("1.30").is_err());
        Ok(())
    }

    /// Each wrapper module pins the minor it is named for.
    #[test]
    fn each_wrapper_module_pins_its_minor() -> Result<()> {
        let go = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("go");
        for minor in [DEFAULT_KUBERNETES, OLDEST_KUBERNETES] {
            let module = kubernetes_module(minor)?;
            let go_mod = std::fs::read_to_string(go.join(module.dir).join("go.mod"))?;
            let version = required_version(&go_mod, module.pinned).context("no k8s.io/kubernetes pin")?;
            assert!(version.starts_with(&format!("v{minor}.")), "{} pins {version}", module.dir);
        }
        Ok(())
    }

    #[test]
    fn fingerprint_changes_with_any_pin() {
        assert_ne!(fingerprint(&["a", "b"]), fingerprint(&["a", "c"]));
        assert_ne!(fingerprint(&["ab", ""]), fingerprint(&["a", "b"]));
        assert_eq!(fingerprint(&["a", "b"]), fingerprint(&["a", "b"]));
    }
}
