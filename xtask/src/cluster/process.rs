//! Starting, checking and stopping the control-plane processes. A process is always addressed by
//! the PID recorded when it was started, and only while that PID still runs the recorded binary,
//! so a reused PID is never signalled.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

/// A started process, as recorded in the cluster state.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ProcessRecord {
    pub name: String,
    pub pid: u32,
    pub binary: PathBuf,
    /// The arguments it was started with, so it can be started again the same way.
    #[serde(default)]
    pub args: Vec<String>,
    /// Environment variables set for it, likewise.
    #[serde(default)]
    pub env: Vec<(String, String)>,
    pub log: PathBuf,
}

/// Starts `binary` detached from this process group (so Ctrl-C in the terminal that ran `up`
/// does not reach it), with its output in `<log_dir>/<name>.log`.
pub fn spawn(name: &str, binary: &Path, args: &[String], log_dir: &Path) -> Result<ProcessRecord> {
    spawn_with_env(name, binary, args, &[], log_dir)
}

/// Like [`spawn`], with environment variables `env` added.
pub fn spawn_with_env(
    name: &str,
    binary: &Path,
    args: &[String],
    env: &[(String, String)],
    log_dir: &Path,
) -> Result<ProcessRecord> {
    let log = log_dir.join(format!("{name}.log"));
    // Appending keeps the history of a component that is stopped and started again.
    let out =
        File::options().create(true).append(true).open(&log).with_context(|| format!("opening {}", log.display()))?;
    let child = Command::new(binary)
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    Ok(ProcessRecord {
        name: name.to_owned(),
        pid: child.id(),
        binary: binary.to_path_buf(),
        args: args.to_vec(),
        env: env.to_vec(),
        log,
    })
}

impl ProcessRecord {
    /// True while the recorded PID runs the recorded binary (a zombie or a reused PID does not).
    pub fn is_running(&self) -> bool {
        let exe = std::fs::read_link(format!("/proc/{}/exe", self.pid));
        let expected = std::fs::canonicalize(&self.binary).unwrap_or_else(|_| self.binary.clone());
        matches!(exe, Ok(path) if path == expected)
    }

    /// The last `lines` lines of the process's log.
    pub fn log_tail(&self, lines: usize) -> String {
        let mut text = String::new();
        if let Ok(mut file) = File::open(&self.log) {
            let len = file.metadata().map(|m| m.len()).unwrap_or(0);
            let _ = file.seek(SeekFrom::Start(len.saturating_sub(64 * 1024)));
            let _ = file.read_to_string(&mut text);
        }
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// A report of a process that is no longer running, with the end of its log.
    pub fn crash_report(&self) -> String {
        format!(
            "{} (pid {}) is not running; last lines of {}:\n{}",
            self.name,
            self.pid,
            self.log.display(),
            self.log_tail(25)
        )
    }

    /// SIGTERM, then SIGKILL after `grace`; returns once the process is gone.
    pub fn stop(&self, grace: Duration) {
        if !self.is_running() {
            return;
        }
        let pid = Pid::from_raw(self.pid as i32);
        let _ = kill(pid, Signal::SIGTERM);
        let deadline = Instant::now() + grace;
        while self.is_running() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        if self.is_running() {
            let _ = kill(pid, Signal::SIGKILL);
            let deadline = Instant::now() + Duration::from_secs(5);
            while self.is_running() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

pub use crate::harness::free_port;
