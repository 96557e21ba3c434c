//! OCI images without Docker: a docker-archive tarball (what `docker load`, `podman load` and
//! `ctr images import` accept) of one layer, written from files in memory.

use std::collections::BTreeSet;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};

/// A file of the image's single layer; `path` is relative to `/`.
pub struct LayerFile<'a> {
    pub path: &'a str,
    pub mode: u32,
    pub contents: &'a [u8],
}

/// What the image runs, and as whom.
pub struct ImageConfig {
    pub entrypoint: Vec<String>,
    /// `UID:GID`.
    pub user: String,
    pub env: Vec<String>,
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

fn header(path: &str, mode: u32, size: u64, kind: tar::EntryType) -> Result<tar::Header> {
    let mut header = tar::Header::new_gnu();
    header.set_path(path)?;
    header.set_mode(mode);
    header.set_size(size);
    header.set_uid(0);
    header.set_gid(0);
    // A fixed time: the same files give the same layer digest.
    header.set_mtime(0);
    header.set_entry_type(kind);
    header.set_cksum();
    Ok(header)
}

/// The layer tarball: every parent folder, then every file, owned by root.
pub fn layer(files: &[LayerFile<'_>]) -> Result<Vec<u8>> {
    let mut folders = BTreeSet::new();
    for file in files {
        let mut parent = std::path::Path::new(file.path).parent();
        while let Some(folder) = parent.filter(|p| !p.as_os_str().is_empty()) {
            folders.insert(format!("{}/", folder.display()));
            parent = folder.parent();
        }
    }
    let mut builder = tar::Builder::new(Vec::new());
    for folder in &folders {
        builder.append(&header(folder, 0o755, 0, tar::EntryType::Directory)?, std::io::empty())?;
    }
    for file in files {
        let size = file.contents.len() as u64;
        builder.append(&header(file.path, file.mode, size, tar::EntryType::Regular)?, file.contents)?;
    }
    Ok(builder.into_inner()?)
}

/// A docker-archive tarball of one image `reference` (`repository:tag`) with one layer.
pub fn docker_archive(reference: &str, files: &[LayerFile<'_>], config: &ImageConfig) -> Result<Vec<u8>> {
    let layer = layer(files)?;
    let layer_digest = sha256_hex(&layer);
    let image_config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "created": "1970-01-01T00:00:00Z",
        "config": {
            "User": config.user,
            "Entrypoint": config.entrypoint,
            "Env": config.env,
            "WorkingDir": "/",
        },
        "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{layer_digest}")]},
        "history": [{"created": "1970-01-01T00:00:00Z", "created_by": "cargo xtask image"}],
    });
    let config_bytes = serde_json::to_vec(&image_config)?;
    let config_name = format!("{}.json", sha256_hex(&config_bytes));
    let layer_name = format!("{layer_digest}/layer.tar");
    let manifest = serde_json::json!([{"Config": config_name, "RepoTags": [reference], "Layers": [layer_name]}]);
    let manifest_bytes = serde_json::to_vec(&manifest)?;
    let mut archive = tar::Builder::new(Vec::new());
    archive.append(&header(&format!("{layer_digest}/"), 0o755, 0, tar::EntryType::Directory)?, std::io::empty())?;
    archive.append(&header(&layer_name, 0o644, layer.len() as u64, tar::EntryType::Regular)?, layer.as_slice())?;
    archive.append(
        &header(&config_name, 0o644, config_bytes.len() as u64, tar::EntryType::Regular)?,
        config_bytes.as_slice(),
    )?;
    archive.append(
        &header("manifest.json", 0o644, manifest_bytes.len() as u64, tar::EntryType::Regular)?,
        manifest_bytes.as_slice(),
    )?;
    Ok(archive.into_inner()?)
}

/// The repository of the operator's image, as the chart's `image.repository` takes it. `.local`
/// marks it as never pulled: the node has it loaded.
pub const REPOSITORY: &str = "example-operator.local/example-operator";

/// Where the image's user lives: distroless's `nonroot`, as operator/Dockerfile's base has it.
const PASSWD: &str = "root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n";
const GROUP: &str = "root:x:0:\nnonroot:x:65532:\n";
/// Debian's CA bundle (package ca-certificates), for clusters whose API server has a public CA.
const CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// The shared libraries a dynamically linked `binary` loads, from `ldd`: (path in the image,
/// path on this machine).
fn shared_libraries(binary: &Path) -> Result<Vec<(String, PathBuf)>> {
    let output = std::process::Command::new("ldd").arg(binary).output().context("running ldd")?;
    anyhow::ensure!(output.status.success(), "ldd {} failed", binary.display());
    let mut libraries = Vec::new();
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)"
        let path = match line.split_once("=>") {
            Some((_, target)) => target.split_whitespace().next(),
            None => line.split_whitespace().next().filter(|p| p.starts_with('/')),
        };
        if let Some(path) = path.filter(|p| p.starts_with('/')) {
            libraries.push((path.trim_start_matches('/').to_owned(), std::fs::canonicalize(path)?));
        }
    }
    Ok(libraries)
}

/// Builds the operator's image from `binary`: the binary, the C libraries it links, CA
/// certificates and a passwd naming UID 65532; runs as 65532 and writes nothing, so a read-only
/// root filesystem works. Returns the reference (`repository:tag`, the tag naming the version
/// and the content) and the docker-archive tarball.
pub fn operator_image(binary: &Path) -> Result<(String, Vec<u8>)> {
    let operator = std::fs::read(binary).with_context(|| format!("reading {}", binary.display()))?;
    let libraries = shared_libraries(binary)?;
    let library_bytes: Vec<(String, Vec<u8>)> =
        libraries.iter().map(|(path, source)| Ok((path.clone(), std::fs::read(source)?))).collect::<Result<_>>()?;
    let ca_bundle =
        std::fs::read(CA_BUNDLE).with_context(|| format!("reading {CA_BUNDLE} (Debian's ca-certificates)"))?;
    let mut files = vec![
        LayerFile { path: "example-operator", mode: 0o755, contents: &operator },
        LayerFile { path: "etc/passwd", mode: 0o644, contents: PASSWD.as_bytes() },
        LayerFile { path: "etc/group", mode: 0o644, contents: GROUP.as_bytes() },
        LayerFile { path: "etc/ssl/certs/ca-certificates.crt", mode: 0o644, contents: &ca_bundle },
    ];
    files.extend(library_bytes.iter().map(|(path, bytes)| LayerFile { path, mode: 0o755, contents: bytes }));
    let config = ImageConfig {
        entrypoint: vec!["/example-operator".into()],
        user: "65532:65532".into(),
        env: vec!["SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt".into()],
    };
    // The tag names the content, so a rebuilt binary is a new image the node has not cached.
    let content = sha256_hex(&layer(&files)?);
    let reference = format!("{REPOSITORY}:{}-{}", env!("CARGO_PKG_VERSION"), &content[..12]);
    let archive = docker_archive(&reference, &files, &config)?;
    Ok((reference, archive))
}

/// `cargo xtask image`: builds the operator (release, or the dev build with `debug`), writes
/// its image to `target/image/example-operator.tar`, loads it into the local node when one runs,
/// and returns the reference.
pub fn run(root: &Path, debug: bool) -> Result<String> {
    let binary = if debug { crate::build_operator(root)? } else { crate::build_release_operator(root)? };
    let (reference, archive) = operator_image(&binary)?;
    let out = crate::target_dir(root).join("image");
    std::fs::create_dir_all(&out)?;
    let path = out.join("example-operator.tar");
    std::fs::write(&path, &archive).with_context(|| format!("writing {}", path.display()))?;
    eprintln!("wrote {} ({} MiB): `docker load -i` or `podman load -i` it", path.display(), archive.len() >> 20);
    match crate::cluster::ClusterState::load(root)?.and_then(|state| state.containerd_socket) {
        Some(socket) => {
            crate::cluster::node::import_image(&socket, &path)?;
            eprintln!("loaded {reference} into the local node");
        }
        None => eprintln!("no local node is running: the image was not loaded anywhere"),
    }
    Ok(reference)
}

/// The path of the image archive `run` writes.
pub fn archive_path(root: &Path) -> PathBuf {
    crate::target_dir(root).join("image/example-operator.tar")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_archive_names_its_config_and_layer_by_digest() -> Result<()> {
        let files = [LayerFile { path: "etc/ssl/certs/ca.crt", mode: 0o644, contents: b"pem" }];
        let config = ImageConfig { entrypoint: vec!["/x".into()], user: "65532:65532".into(), env: vec![] };
        let archive = docker_archive("example/x:1", &files, &config)?;
        let mut names = Vec::new();
        for entry in tar::Archive::new(archive.as_slice()).entries()? {
            names.push(entry?.path()?.display().to_string());
        }
        let layer_digest = sha256_hex(&layer(&files)?);
        assert!(names.contains(&format!("{layer_digest}/layer.tar")), "{names:?}");
        assert!(names.contains(&"manifest.json".to_owned()));
        assert_eq!(docker_archive("example/x:1", &files, &config)?, archive, "reproducible");
        let mut layer_names = Vec::new();
        for entry in tar::Archive::new(layer(&files)?.as_slice()).entries()? {
            layer_names.push(entry?.path()?.display().to_string());
        }
        assert_eq!(layer_names, ["etc/", "etc/ssl/", "etc/ssl/certs/", "etc/ssl/certs/ca.crt"]);
        Ok(())
    }
}
