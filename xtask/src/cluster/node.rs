//! One real node for the local cluster, like kind's: containerd and runc (Debian packages), the
//! CNI bridge plugin, kubelet, kube-proxy and kube-scheduler (built from the pinned module).
//!
//! Every Pod and Service address stays on this machine: Pods live on a bridge of their own, IP
//! forwarding is left as the machine has it, the Service and Pod ranges get blackhole routes (a
//! packet kube-proxy has not rewritten goes nowhere), and a chain of ours in FORWARD drops
//! anything between those ranges and the rest of the world. `teardown` removes every process,
//! sandbox, mount, interface, route and iptables rule this module created.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use super::pki::{self, Pki};
use super::process::{self, ProcessRecord};

/// The node's name, as `kubectl get nodes` shows it.
pub const NODE_NAME: &str = "example-operator-node";
/// The Pods' bridge; its address is the node's and the API server's address for Pods.
pub const BRIDGE: &str = "eo-br0";
/// The node's address on the bridge: where Pods reach the API server (through the
/// `kubernetes` Service) and where the kubelet registers.
pub const NODE_IP: &str = "10.244.0.1";
/// Pod addresses (the bridge's subnet).
pub const POD_CIDR: &str = "10.244.0.0/24";
/// Everything the Pod range could grow into: blackholed beyond the bridge's subnet.
pub const POD_SUPERNET: &str = "10.244.0.0/16";
/// Service addresses (the API server's --service-cluster-ip-range).
pub const SERVICE_CIDR: &str = "10.0.0.0/24";
/// The `kubernetes` Service's address, which the API server's certificate must name.
pub const KUBERNETES_SERVICE_IP: &str = "10.0.0.1";
/// The sandbox image built from the pause.c that ships in the Kubernetes module.
pub const PAUSE_IMAGE: &str = "example-operator.local/pause:3.10";
/// Where containerd's registry requests go (as its proxy): a closed port on loopback, so an image
/// that is not loaded fails to pull instead of reaching out.
pub const NO_REGISTRY: &str = "http://127.0.0.1:9";
/// Our iptables chain in the filter table (jumped to from FORWARD).
const CHAIN: &str = "EXAMPLE-OPERATOR-NODE";
/// The CNI plugins Debian installs.
const CNI_BIN_DIR: &str = "/usr/lib/cni";

/// The node's client identities (the API server's Node authorizer and the default RBAC bindings
/// grant them what they need).
pub const KUBELET: pki::Identity =
    pki::Identity { user: "system:node:example-operator-node", groups: &["system:nodes"], file: "kubelet" };
pub const KUBE_PROXY: pki::Identity = pki::Identity { user: "system:kube-proxy", groups: &[], file: "kube-proxy" };
pub const SCHEDULER: pki::Identity = pki::Identity { user: "system:kube-scheduler", groups: &[], file: "scheduler" };

fn run(program: &str, args: &[&str]) -> Result<String> {
    let output = Command::new(program).args(args).output().with_context(|| format!("running {program}"))?;
    if !output.status.success() {
        bail!("{program} {} failed: {}", args.join(" "), String::from_utf8_lossy(&output.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Runs a command whose failure only means there was nothing to undo.
fn run_quietly(program: &str, args: &[&str]) {
    let _ = Command::new(program).args(args).output();
}

/// Creates the Pods' bridge with the node's address, the blackhole routes and our FORWARD
/// chain. Idempotent.
pub fn network_up() -> Result<()> {
    if run("ip", &["link", "show", BRIDGE]).is_err() {
        run("ip", &["link", "add", BRIDGE, "type", "bridge"])?;
    }
    let addresses = run("ip", &["-o", "addr", "show", "dev", BRIDGE])?;
    if !addresses.contains(&format!("{NODE_IP}/24")) {
        run("ip", &["addr", "add", &format!("{NODE_IP}/24"), "dev", BRIDGE])?;
    }
    run("ip", &["link", "set", BRIDGE, "up"])?;
    for range in [SERVICE_CIDR, POD_SUPERNET] {
        run("ip", &["route", "replace", "blackhole", range])?;
    }
    // Bridged Pod traffic must pass iptables, or Service rewriting misses Pod-to-Pod traffic.
    run_quietly("modprobe", &["br_netfilter"]);
    if Path::new("/proc/sys/net/bridge/bridge-nf-call-iptables").exists() {
        std::fs::write("/proc/sys/net/bridge/bridge-nf-call-iptables", "1")
            .context("enabling bridge-nf-call-iptables")?;
    }
    if run("iptables", &["-w", "-n", "-L", CHAIN]).is_err() {
        run("iptables", &["-w", "-N", CHAIN])?;
    }
    run("iptables", &["-w", "-F", CHAIN])?;
    // Nothing from the Pod range leaves it, and nothing from outside enters it, except through
    // this machine's own stack (the host reaches Pods on the bridge without forwarding).
    run("iptables", &["-w", "-A", CHAIN, "-s", POD_SUPERNET, "!", "-d", POD_SUPERNET, "-j", "DROP"])?;
    run("iptables", &["-w", "-A", CHAIN, "!", "-s", POD_SUPERNET, "-d", POD_SUPERNET, "-j", "DROP"])?;
    if run("iptables", &["-w", "-C", "FORWARD", "-j", CHAIN]).is_err() {
        run("iptables", &["-w", "-I", "FORWARD", "1", "-j", CHAIN])?;
    }
    Ok(())
}

/// Removes the bridge, the routes, our chain and the chains the kubelet and kube-proxy leave
/// behind (they do not remove them when they stop).
pub fn network_down() {
    run_quietly("ip", &["link", "del", BRIDGE]);
    for range in [SERVICE_CIDR, POD_SUPERNET] {
        run_quietly("ip", &["route", "del", "blackhole", range]);
    }
    for iptables in ["iptables", "ip6tables"] {
        run_quietly(iptables, &["-w", "-D", "FORWARD", "-j", CHAIN]);
        run_quietly(iptables, &["-w", "-F", CHAIN]);
        run_quietly(iptables, &["-w", "-X", CHAIN]);
        for table in ["filter", "nat", "mangle"] {
            let Ok(rules) = run(iptables, &["-w", "-t", table, "-S"]) else { continue };
            // Jumps into KUBE-* chains first, then the chains themselves.
            for rule in rules.lines().filter(|r| r.starts_with("-A ") && r.contains("-j KUBE-")) {
                let parent = rule.split_whitespace().nth(1).unwrap_or_default();
                if parent.starts_with("KUBE-") {
                    continue;
                }
                let words = split_rule(rule);
                let mut args = vec!["-w", "-t", table, "-D"];
                args.extend(words.iter().skip(1).map(String::as_str));
                run_quietly(iptables, &args);
            }
            for chain in rules.lines().filter_map(|r| r.strip_prefix("-N ")).filter(|c| c.starts_with("KUBE-")) {
                run_quietly(iptables, &["-w", "-t", table, "-F", chain]);
            }
            for chain in rules.lines().filter_map(|r| r.strip_prefix("-N ")).filter(|c| c.starts_with("KUBE-")) {
                run_quietly(iptables, &["-w", "-t", table, "-X", chain]);
            }
        }
    }
}

/// Splits an `iptables -S` rule into arguments, keeping quoted comments whole.
fn split_rule(rule: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut quoted = false;
    for c in rule.chars() {
        match c {
            '"' => quoted = !quoted,
            ' ' if !quoted => {
                if !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                }
            }
            c => word.push(c),
        }
    }
    if !word.is_empty() {
        words.push(word);
    }
    words
}

/// What is left of the node on this machine: for `cluster down` to prove it removed everything.
pub fn leftovers(dir: &Path) -> Vec<String> {
    let mut left = Vec::new();
    if run("ip", &["link", "show", BRIDGE]).is_ok() {
        left.push(format!("network interface {BRIDGE}"));
    }
    if let Ok(links) = run("ip", &["-o", "link", "show"]) {
        left.extend(
            links.lines().filter(|l| l.contains(&format!("master {BRIDGE}"))).map(|l| format!("interface {l}")),
        );
    }
    if let Ok(routes) = run("ip", &["route", "show"]) {
        left.extend(
            routes
                .lines()
                .filter(|r| r.contains(SERVICE_CIDR) || r.contains(POD_SUPERNET) || r.contains(POD_CIDR))
                .map(|r| format!("route {r}")),
        );
    }
    for iptables in ["iptables", "ip6tables"] {
        for table in ["filter", "nat", "mangle"] {
            if let Ok(rules) = run(iptables, &["-w", "-t", table, "-S"]) {
                left.extend(
                    rules
                        .lines()
                        .filter(|r| r.contains("KUBE-") || r.contains(CHAIN))
                        .map(|r| format!("{iptables} -t {table} {r}")),
                );
            }
        }
    }
    if let Ok(mounts) = std::fs::read_to_string("/proc/mounts") {
        let dir = dir.display().to_string();
        left.extend(mounts.lines().filter(|m| m.contains(&dir)).map(|m| format!("mount {m}")));
    }
    left
}

/// Files the node's processes read, written into the cluster folder.
pub struct NodeFiles {
    pub containerd_config: PathBuf,
    pub containerd_socket: PathBuf,
    pub kubelet_config: PathBuf,
    pub kubelet_root: PathBuf,
}

/// Writes containerd's, the CNI's and the kubelet's configuration under `dir`.
pub fn write_configs(dir: &Path, pki: &Pki) -> Result<NodeFiles> {
    let node = dir.join("node");
    let cni = node.join("cni");
    std::fs::create_dir_all(&cni)?;
    let containerd_socket = node.join("containerd.sock");
    let containerd_config = node.join("containerd.toml");
    // restrict_oom_score_adj: this machine's root may not lower oom_score_adj, which the CRI asks
    // for sandboxes; without it runc fails with "can't get final child's PID from pipe".
    let config = format!(
        r#"version = 2
root = "{root}"
state = "{state}"
[grpc]
  address = "{socket}"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{CNI_BIN_DIR}"
    conf_dir = "{cni}"
"#,
        root = node.join("containerd-root").display(),
        state = node.join("containerd-state").display(),
        socket = containerd_socket.display(),
        cni = cni.display(),
    );
    std::fs::write(&containerd_config, config)?;
    let conflist = serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "example-operator",
        "plugins": [{
            "type": "bridge",
            "bridge": BRIDGE,
            "isGateway": true,
            "ipMasq": false,
            "hairpinMode": true,
            "ipam": {
                "type": "host-local",
                "ranges": [[{"subnet": POD_CIDR, "gateway": NODE_IP}]],
                "routes": [{"dst": "0.0.0.0/0"}],
                "dataDir": node.join("cni-ipam"),
            },
        }, {"type": "portmap", "capabilities": {"portMappings": true}}],
    });
    std::fs::write(cni.join("10-example-operator.conflist"), serde_json::to_string_pretty(&conflist)?)?;

    let kubelet_root = node.join("kubelet");
    std::fs::create_dir_all(&kubelet_root)?;
    let kubelet_config = node.join("kubelet.yaml");
    let kubelet = serde_json::json!({
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        // This machine has cgroup v1 controllers (a hybrid layout); kubelet 1.37 refuses v1 unless told.
        "failCgroupV1": false,
        "cgroupDriver": "cgroupfs",
        "failSwapOn": false,
        "containerRuntimeEndpoint": format!("unix://{}", containerd_socket.display()),
        "address": NODE_IP,
        "port": process::free_port()?,
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": process::free_port()?,
        "authentication": {
            "anonymous": {"enabled": false},
            "webhook": {"enabled": true},
            "x509": {"clientCAFile": pki.ca_cert},
        },
        "authorization": {"mode": "Webhook"},
        "clusterDomain": "cluster.local",
        "resolvConf": "",
        "serializeImagePulls": false,
        "enforceNodeAllocatable": [],
        "cgroupsPerQOS": false,
        "imageGCHighThresholdPercent": 100,
        "evictionHard": {"memory.available": "100Mi", "nodefs.available": "1%", "imagefs.available": "1%"},
        "rotateCertificates": false,
        "registerNode": true,
    });
    std::fs::write(&kubelet_config, serde_yaml::to_string(&kubelet)?)?;
    Ok(NodeFiles { containerd_config, containerd_socket, kubelet_config, kubelet_root })
}

/// Builds the pause image (pause.c ships in the Kubernetes module) into `out` as a docker-archive
/// tarball, unless present.
pub fn pause_image(version: &str, out: &Path) -> Result<()> {
    if out.is_file() {
        return Ok(());
    }
    let module_cache = run("go", &["env", "GOMODCACHE"])?;
    let source =
        PathBuf::from(module_cache.trim()).join(format!("k8s.io/kubernetes@{version}/build/pause/linux/pause.c"));
    if !source.is_file() {
        // The module is downloaded by the first build of the control plane.
        bail!("{} is missing: build the control plane first", source.display());
    }
    let scratch = out.with_extension("partial");
    std::fs::create_dir_all(&scratch)?;
    let binary = scratch.join("pause");
    run(
        "cc",
        &[
            "-static",
            "-Os",
            "-DVERSION=v3.10-example-operator",
            "-o",
            &binary.display().to_string(),
            &source.display().to_string(),
        ],
    )?;
    run("strip", &[&binary.display().to_string()])?;
    let pause = std::fs::read(&binary)?;
    let archive = crate::image::docker_archive(
        PAUSE_IMAGE,
        &[crate::image::LayerFile { path: "pause", mode: 0o755, contents: &pause }],
        &crate::image::ImageConfig { entrypoint: vec!["/pause".into()], user: "65535:65535".into(), env: vec![] },
    )?;
    std::fs::write(out, archive)?;
    std::fs::remove_dir_all(&scratch)?;
    Ok(())
}

/// Imports a docker-archive tarball into the node's containerd, in the namespace the CRI uses.
pub fn import_image(socket: &Path, archive: &Path) -> Result<()> {
    run(
        "ctr",
        &[
            "--address",
            &socket.display().to_string(),
            "-n",
            "k8s.io",
            "images",
            "import",
            "--no-unpack",
            &archive.display().to_string(),
        ],
    )?;
    Ok(())
}

/// Removes every Pod sandbox and container of the node (the shims keep them running after
/// containerd stops), then unmounts what is left under the node's folder.
pub fn remove_sandboxes(socket: &Path, dir: &Path) {
    let address = socket.display().to_string();
    if socket.exists()
        && let Ok(tasks) = run("ctr", &["--address", &address, "-n", "k8s.io", "tasks", "list", "-q"])
    {
        for task in tasks.lines().filter(|t| !t.trim().is_empty()) {
            run_quietly("ctr", &["--address", &address, "-n", "k8s.io", "tasks", "kill", "-s", "SIGKILL", task]);
        }
        std::thread::sleep(Duration::from_millis(500));
        for task in tasks.lines().filter(|t| !t.trim().is_empty()) {
            run_quietly("ctr", &["--address", &address, "-n", "k8s.io", "tasks", "delete", "-f", task]);
            run_quietly("ctr", &["--address", &address, "-n", "k8s.io", "containers", "delete", task]);
        }
    }
    unmount_under(dir);
}

/// Unmounts everything mounted below `dir`, deepest first.
pub fn unmount_under(dir: &Path) {
    let prefix = dir.display().to_string();
    for _ in 0..3 {
        let Ok(mounts) = std::fs::read_to_string("/proc/mounts") else { return };
        let mut points: Vec<String> = mounts
            .lines()
            .filter_map(|m| m.split_whitespace().nth(1))
            .filter(|p| p.starts_with(&prefix))
            .map(str::to_owned)
            .collect();
        if points.is_empty() {
            return;
        }
        points.sort_by_key(|p| std::cmp::Reverse(p.len()));
        for point in points {
            run_quietly("umount", &["-l", &point]);
        }
    }
}

/// kubelet's command line.
pub fn kubelet_args(files: &NodeFiles, kubeconfig: &Path) -> Vec<String> {
    vec![
        format!("--config={}", files.kubelet_config.display()),
        format!("--kubeconfig={}", kubeconfig.display()),
        format!("--root-dir={}", files.kubelet_root.display()),
        format!("--cert-dir={}", files.kubelet_root.join("pki").display()),
        format!("--hostname-override={NODE_NAME}"),
        format!("--node-ip={NODE_IP}"),
        "--v=1".to_owned(),
    ]
}

/// kube-proxy's command line: iptables mode, no conntrack tuning (sysctls this machine may
/// refuse), metrics and health on loopback.
pub fn kube_proxy_args(kubeconfig: &Path) -> Result<Vec<String>> {
    Ok(vec![
        format!("--kubeconfig={}", kubeconfig.display()),
        format!("--hostname-override={NODE_NAME}"),
        "--proxy-mode=iptables".to_owned(),
        format!("--cluster-cidr={POD_SUPERNET}"),
        "--conntrack-max-per-core=0".to_owned(),
        "--conntrack-tcp-timeout-established=0".to_owned(),
        "--conntrack-tcp-timeout-close-wait=0".to_owned(),
        format!("--metrics-bind-address=127.0.0.1:{}", process::free_port()?),
        format!("--healthz-bind-address=127.0.0.1:{}", process::free_port()?),
    ])
}

/// kube-scheduler's command line.
pub fn scheduler_args(kubeconfig: &Path) -> Result<Vec<String>> {
    Ok(vec![
        format!("--kubeconfig={}", kubeconfig.display()),
        format!("--authentication-kubeconfig={}", kubeconfig.display()),
        format!("--authorization-kubeconfig={}", kubeconfig.display()),
        "--leader-elect=false".to_owned(),
        "--bind-address=127.0.0.1".to_owned(),
        format!("--secure-port={}", process::free_port()?),
    ])
}

/// Stops the node's processes (kubelet first, so it does not restart what is removed next),
/// removes the Pods' sandboxes, then stops containerd.
pub fn stop(processes: &[ProcessRecord], socket: &Path, dir: &Path) {
    for name in ["kube-scheduler", "kube-proxy", "kubelet"] {
        if let Some(process) = processes.iter().find(|p| p.name == name) {
            process.stop(Duration::from_secs(10));
        }
    }
    remove_sandboxes(socket, dir);
    if let Some(containerd) = processes.iter().find(|p| p.name == "containerd") {
        containerd.stop(Duration::from_secs(10));
    }
    // Shims outlive containerd: stop those that belong to this node's containerd.
    if let Ok(entries) = std::fs::read_dir("/proc") {
        let address = socket.display().to_string();
        for entry in entries.flatten() {
            let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline);
            if cmdline.contains("containerd-shim")
                && cmdline.contains(&address)
                && let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>()
            {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
            }
        }
    }
    unmount_under(dir);
    network_down();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iptables_rules_split_like_a_shell_would() {
        let rule = r#"-A INPUT -m comment --comment "kubernetes load balancer firewall" -j KUBE-PROXY-FIREWALL"#;
        let words = split_rule(rule);
        assert_eq!(
            words,
            [
                "-A",
                "INPUT",
                "-m",
                "comment",
                "--comment",
                "kubernetes load balancer firewall",
                "-j",
                "KUBE-PROXY-FIREWALL"
            ]
        );
    }
}
