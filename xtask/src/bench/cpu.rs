//! CPU time per phase, from `/proc`: how much each process of interest used and how busy the whole
//! machine was. It tells a phase bound by CPU (the machine busy) from one bound by waiting (each
//! request's round trip) — the API server, etcd and the reconciler share the same cores.

use anyhow::{Context, Result};

/// CPU seconds used during one phase.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct CpuTime {
    /// The reconciling process (operator or peer); none for the bare client, which runs inside
    /// the benchmark.
    pub reconciler_s: Option<f64>,
    pub apiserver_s: f64,
    pub etcd_s: f64,
    /// The benchmark itself: its creates, its watch for Ready, and the bare client.
    pub bench_s: f64,
    /// Every process's CPU time together.
    pub machine_s: f64,
    /// `machine_s` / (cores × phase time).
    pub machine_busy: f64,
}

/// The counters at one instant.
#[derive(Clone, Debug)]
pub struct Sample {
    reconciler: Option<f64>,
    apiserver: f64,
    etcd: f64,
    bench: f64,
    /// (busy, total) seconds summed over the cores.
    machine: (f64, f64),
}

/// The processes whose CPU time is sampled.
#[derive(Clone, Copy, Debug)]
pub struct Watched {
    pub apiserver: u32,
    pub etcd: u32,
}

impl Watched {
    /// Samples the counters now; `reconciler` is the reconciling process, if it is not the bench.
    pub fn sample(&self, reconciler: Option<u32>) -> Result<Sample> {
        Ok(Sample {
            reconciler: reconciler.map(process_seconds).transpose()?,
            apiserver: process_seconds(self.apiserver)?,
            etcd: process_seconds(self.etcd)?,
            bench: process_seconds(std::process::id())?,
            machine: machine_seconds(&std::fs::read_to_string("/proc/stat")?)?,
        })
    }
}

impl Sample {
    /// What was used from `self` until `later`.
    pub fn until(&self, later: &Sample) -> CpuTime {
        let (busy, total) = (later.machine.0 - self.machine.0, later.machine.1 - self.machine.1);
        CpuTime {
            reconciler_s: self.reconciler.zip(later.reconciler).map(|(a, b)| b - a),
            apiserver_s: later.apiserver - self.apiserver,
            etcd_s: later.etcd - self.etcd,
            bench_s: later.bench - self.bench,
            machine_s: busy,
            machine_busy: if total > 0.0 { busy / total } else { 0.0 },
        }
    }
}

/// Clock ticks per second of the `/proc` counters (USER_HZ, 100 on Linux).
const TICKS_PER_SECOND: f64 = 100.0;

/// User + system CPU seconds of process `pid`, all its threads.
fn process_seconds(pid: u32) -> Result<f64> {
    let stat =
        std::fs::read_to_string(format!("/proc/{pid}/stat")).with_context(|| format!("reading /proc/{pid}/stat"))?;
    parse_process_stat(&stat).with_context(|| format!("parsing /proc/{pid}/stat"))
}

/// utime + stime from a `/proc/<pid>/stat` line (fields 14 and 15, counted after the command
/// name, which is in parentheses and may hold spaces).
fn parse_process_stat(stat: &str) -> Result<f64> {
    let after_name = stat.rsplit_once(')').context("no command name")?.1;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // After the name, field 3 (state) is index 0, so utime (14) and stime (15) are 11 and 12.
    let ticks = |i: usize| -> Result<f64> { Ok(fields.get(i).context("too few fields")?.parse::<f64>()?) };
    Ok((ticks(11)? + ticks(12)?) / TICKS_PER_SECOND)
}

/// (busy, total) CPU seconds of the machine from `/proc/stat`'s `cpu` line; idle and iowait are
/// not busy.
fn machine_seconds(stat: &str) -> Result<(f64, f64)> {
    let line = stat.lines().find(|l| l.starts_with("cpu ")).context("no cpu line in /proc/stat")?;
    let ticks: Vec<f64> = line.split_whitespace().skip(1).map(str::parse).collect::<Result<_, _>>()?;
    anyhow::ensure!(ticks.len() >= 5, "short cpu line in /proc/stat");
    // user nice system idle iowait irq softirq steal (guest time is already in user).
    let total: f64 = ticks.iter().take(8).sum();
    let idle = ticks[3] + ticks[4];
    Ok(((total - idle) / TICKS_PER_SECOND, total / TICKS_PER_SECOND))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn process_time_is_user_plus_system_even_with_spaces_in_the_name() -> Result<()> {
        let stat = "4242 (kube api) S 1 4242 4242 0 -1 4194560 1000 0 0 0 250 50 0 0 20 0 12 0 100 0 0";
        assert_eq!(parse_process_stat(stat)?, 3.0);
        Ok(())
    }

    #[test]
    fn the_machine_is_busy_except_when_idle_or_waiting_for_io() -> Result<()> {
        let stat = "cpu  600 0 200 1000 200 0 0 0 0 0\ncpu0 300 0 100 500 100 0 0 0 0 0\n";
        assert_eq!(machine_seconds(stat)?, (8.0, 20.0));
        let later = Sample { reconciler: Some(5.0), apiserver: 4.0, etcd: 2.0, bench: 1.0, machine: (18.0, 40.0) };
        let earlier = Sample { reconciler: Some(1.0), apiserver: 1.0, etcd: 1.0, bench: 0.5, machine: (8.0, 20.0) };
        let used = earlier.until(&later);
        assert_eq!(used.reconciler_s, Some(4.0));
        assert_eq!((used.machine_s, used.machine_busy), (10.0, 0.5));
        Ok(())
    }
}
