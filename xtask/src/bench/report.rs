//! The rounds reduced to figures: for each, the median over the rounds with its min–max, the goal
//! of the issue and whether the median meets it (and by how much it misses). Ratios are taken
//! within a round first, so drift of the machine between rounds cancels.

use super::convergence::{
    ConvergencePhase, DEFAULT_CONCURRENCY, LIMIT_CONCURRENCIES, OPERATOR_CONCURRENCIES, PhaseResult,
};
use super::{CHART_MEMORY_LIMIT_MIB, DEFAULT_ROUNDS, Options, Round};

/// The `p` quantile (0–1) of `sorted`, nearest rank.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

/// The median of `values` (the mean of the middle two for an even count).
fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

/// What a figure should be.
#[derive(Clone, Copy, Debug, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Goal {
    AtLeast(f64),
    AtMost(f64),
}

impl Goal {
    fn met(self, value: f64) -> bool {
        match self {
            Self::AtLeast(goal) => value >= goal,
            Self::AtMost(goal) => value <= goal,
        }
    }

    fn describe(self) -> String {
        match self {
            Self::AtLeast(goal) => format!("≥ {}", number(goal)),
            Self::AtMost(goal) => format!("≤ {}", number(goal)),
        }
    }

    /// "met", or how far the median is from the goal.
    fn verdict(self, value: f64) -> String {
        if self.met(value) {
            return "met".to_owned();
        }
        let goal = match self {
            Self::AtLeast(goal) | Self::AtMost(goal) => goal,
        };
        let off = (value - goal).abs();
        if goal == 0.0 {
            format!("**missed** by {}", number(off))
        } else {
            format!("**missed** by {} ({:.0} %)", number(off), off / goal.abs() * 100.0)
        }
    }
}

fn number(value: f64) -> String {
    if value == value.trunc() && value.abs() < 1e6 { format!("{value:.0}") } else { format!("{value:.2}") }
}

/// One reported figure: every round's value and their median and spread.
#[derive(Debug, serde::Serialize)]
pub struct Figure {
    pub name: String,
    pub unit: &'static str,
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub goal: Option<Goal>,
    pub met: Option<bool>,
    pub rounds: Vec<f64>,
}

impl Figure {
    fn new(name: impl Into<String>, unit: &'static str, rounds: Vec<f64>, goal: Option<Goal>) -> Self {
        let median = median(&rounds);
        let min = rounds.iter().copied().fold(f64::INFINITY, f64::min);
        let max = rounds.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        Self { name: name.into(), unit, median, min, max, goal, met: goal.map(|g| g.met(median)), rounds }
    }
}

/// `value` of `phase` in every round that ran it and measured it.
fn per_round(rounds: &[Round], phase: ConvergencePhase, value: impl Fn(&PhaseResult) -> Option<f64>) -> Vec<f64> {
    let name = phase.name();
    rounds.iter().filter_map(|r| value(r.phases.iter().find(|p| p.phase == name)?)).collect()
}

/// The machine the run was made on.
#[derive(Debug, serde::Serialize)]
pub struct Machine {
    pub cpu_model: String,
    pub cores: usize,
    pub memory_gib: f64,
}

impl Machine {
    fn describe() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name")?.split_once(':').map(|(_, m)| m.trim().to_owned()))
            .unwrap_or_else(|| "unknown CPU".to_owned());
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let kib: f64 = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:")?.split_whitespace().next()?.parse().ok())
            .unwrap_or(0.0);
        Self { cpu_model, cores, memory_gib: kib / 1024.0 / 1024.0 }
    }
}

/// What `results.json` holds and the table shows.
#[derive(Debug, serde::Serialize)]
pub struct Report {
    pub machine: Machine,
    pub objects: usize,
    pub rounds_run: usize,
    pub fanout_namespaces: usize,
    /// The operator concurrency with the fastest median convergence.
    pub best_operator_concurrency: usize,
    pub figures: Vec<Figure>,
    pub rounds: Vec<Round>,
}

impl Report {
    pub fn new(options: &Options, rounds: Vec<Round>) -> Self {
        let objects = options.objects as f64;
        let seconds = |phase: ConvergencePhase| per_round(&rounds, phase, |p| Some(p.seconds));
        let per_object = |phase: ConvergencePhase, writes: bool| {
            per_round(&rounds, phase, |p| Some(if writes { p.writes } else { p.requests } as f64 / objects))
        };
        let rss = |phase: ConvergencePhase| per_round(&rounds, phase, |p| p.peak_rss_mib);
        let ratio = |a: &[f64], b: &[f64]| -> Vec<f64> { a.iter().zip(b).map(|(a, b)| a / b).collect() };
        // The limit of a round: its fastest bare-client concurrency.
        let limit: Vec<f64> = (0..rounds.len())
            .map(|i| {
                LIMIT_CONCURRENCIES
                    .iter()
                    .filter_map(|c| seconds(ConvergencePhase::Limit(*c)).get(i).copied())
                    .fold(f64::INFINITY, f64::min)
            })
            .collect();
        let best_operator_concurrency = OPERATOR_CONCURRENCIES
            .iter()
            .copied()
            .min_by(|a, b| {
                median(&seconds(ConvergencePhase::Operator(*a)))
                    .total_cmp(&median(&seconds(ConvergencePhase::Operator(*b))))
            })
            .unwrap_or(DEFAULT_CONCURRENCY);
        let operator_default = seconds(ConvergencePhase::Operator(DEFAULT_CONCURRENCY));
        let operator_best = seconds(ConvergencePhase::Operator(best_operator_concurrency));
        let peer = seconds(ConvergencePhase::Peer);
        let of_rounds = |f: &dyn Fn(&Round) -> f64| -> Vec<f64> { rounds.iter().map(f).collect() };

        let mut figures = vec![
            Figure::new(
                "converge_vs_peer (peer / operator, both concurrency 4)",
                "×",
                ratio(&peer, &operator_default),
                Some(Goal::AtLeast(1.5)),
            ),
            Figure::new(
                format!("converge_vs_limit at the operator's best setting (concurrency {best_operator_concurrency})"),
                "×",
                ratio(&limit, &operator_best),
                Some(Goal::AtLeast(0.8)),
            ),
            Figure::new(
                "converge_vs_limit at the operator's default (concurrency 4)",
                "×",
                ratio(&limit, &operator_default),
                Some(Goal::AtLeast(0.8)),
            ),
            Figure::new(
                "rss_vs_peer (operator / peer peak RSS)",
                "×",
                ratio(&rss(ConvergencePhase::Operator(DEFAULT_CONCURRENCY)), &rss(ConvergencePhase::Peer)),
                Some(Goal::AtMost(0.5)),
            ),
            Figure::new(
                "writes on a full resync of an in-sync namespace",
                "",
                of_rounds(&|r| r.resync_writes as f64),
                Some(Goal::AtMost(0.0)),
            ),
            Figure::new(
                format!("failover over {} objects, leader SIGTERM → standby reconciles", options.objects),
                "s",
                of_rounds(&|r| r.failover_sigterm_s),
                Some(Goal::AtMost(1.0)),
            ),
            Figure::new(
                format!(
                    "failover over {} objects, leader SIGKILL → standby reconciles (Lease 15 s + retry 2 s + 1 s)",
                    options.objects
                ),
                "s",
                of_rounds(&|r| r.failover_sigkill_s),
                Some(Goal::AtMost(18.0)),
            ),
            Figure::new(
                "restart: change after the initial list → ConfigMap, p99",
                "ms",
                of_rounds(&|r| r.restart.p99_ms),
                Some(Goal::AtMost(1000.0)),
            ),
            Figure::new(
                "restart: change after the initial list → ConfigMap, p50",
                "ms",
                of_rounds(&|r| r.restart.p50_ms),
                None,
            ),
            Figure::new(
                format!(
                    "fan-out of 64 KiB to {} namespaces: operator peak RSS (chart limit)",
                    options.fanout_namespaces
                ),
                "MiB",
                of_rounds(&|r| r.fanout_peak_rss_mib),
                Some(Goal::AtMost(CHART_MEMORY_LIMIT_MIB)),
            ),
            Figure::new(
                format!("fan-out of 64 KiB to {} namespaces: time to every copy", options.fanout_namespaces),
                "s",
                of_rounds(&|r| r.fanout_s),
                None,
            ),
            Figure::new("limit (best bare-client concurrency)", "s", limit.clone(), None),
        ];
        for phase in ConvergencePhase::all() {
            figures.push(Figure::new(format!("convergence, {}", phase.name()), "s", seconds(phase), None));
        }
        for phase in [
            ConvergencePhase::Operator(DEFAULT_CONCURRENCY),
            ConvergencePhase::Peer,
            ConvergencePhase::Limit(DEFAULT_CONCURRENCY),
        ] {
            figures.push(Figure::new(
                format!("requests per object (audit log), {}", phase.name()),
                "",
                per_object(phase, false),
                None,
            ));
            figures.push(Figure::new(
                format!("writes per object (audit log), {}", phase.name()),
                "",
                per_object(phase, true),
                None,
            ));
        }
        for phase in [ConvergencePhase::Operator(DEFAULT_CONCURRENCY), ConvergencePhase::Peer] {
            figures.push(Figure::new(format!("peak RSS converging, {}", phase.name()), "MiB", rss(phase), None));
        }
        // Where the machine's time went: CPU per object of the reconciler and the API server, and
        // how busy the cores were (a phase at ~100 % is bound by CPU, not by round trips).
        for phase in [
            ConvergencePhase::Operator(DEFAULT_CONCURRENCY),
            ConvergencePhase::Peer,
            ConvergencePhase::Limit(DEFAULT_CONCURRENCY),
        ] {
            let name = phase.name();
            let cpu = |f: &dyn Fn(&super::cpu::CpuTime) -> Option<f64>| per_round(&rounds, phase, |p| f(&p.cpu));
            let per_object_ms = |s: f64| s / objects * 1000.0;
            let machine = cpu(&|c| Some(per_object_ms(c.machine_s)));
            figures.push(Figure::new(format!("machine CPU per object, {name}"), "ms", machine, None));
            let apiserver = cpu(&|c| Some(per_object_ms(c.apiserver_s)));
            figures.push(Figure::new(format!("API server CPU per object, {name}"), "ms", apiserver, None));
            let reconciler = cpu(&|c| c.reconciler_s.map(per_object_ms));
            if !reconciler.is_empty() {
                figures.push(Figure::new(format!("reconciler CPU per object, {name}"), "ms", reconciler, None));
            }
            let busy = cpu(&|c| Some(c.machine_busy * 100.0));
            figures.push(Figure::new(format!("machine busy, {name}"), "%", busy, None));
        }
        // Where the operator's time went: per reconcile, and how busy its workers were.
        for concurrency in OPERATOR_CONCURRENCIES {
            let phase = ConvergencePhase::Operator(concurrency);
            let name = phase.name();
            let time = |f: &dyn Fn(&super::convergence::OperatorTime) -> f64| {
                per_round(&rounds, phase, |p| p.operator_time.as_ref().map(f))
            };
            figures.push(Figure::new(format!("mean reconcile, {name}"), "ms", time(&|t| t.mean_reconcile_ms), None));
            figures.push(Figure::new(format!("mean queue wait, {name}"), "ms", time(&|t| t.mean_queue_wait_ms), None));
            figures.push(Figure::new(format!("workers busy, {name}"), "%", time(&|t| t.workers_busy * 100.0), None));
        }
        Self {
            machine: Machine::describe(),
            objects: options.objects,
            rounds_run: rounds.len(),
            fanout_namespaces: options.fanout_namespaces,
            best_operator_concurrency,
            figures,
            rounds,
        }
    }

    /// Writes the report as JSON to `path`, creating its folder.
    pub fn write(&self, path: &std::path::Path) -> anyhow::Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(path, serde_json::to_string_pretty(self)?)?;
        Ok(())
    }

    pub fn print(&self) {
        let m = &self.machine;
        println!(
            "\nexample-operator benchmarks: {} MyResources, {} rounds, on {} ({} cores, {:.1} GiB)",
            self.objects, self.rounds_run, m.cpu_model, m.cores, m.memory_gib
        );
        if self.rounds_run < DEFAULT_ROUNDS {
            println!("\nNote: {} rounds, fewer than the {DEFAULT_ROUNDS} the method asks for.", self.rounds_run);
        }
        println!("\n| figure | median | min–max | goal | verdict |");
        println!("| --- | --- | --- | --- | --- |");
        for f in &self.figures {
            let unit = if f.unit.is_empty() { String::new() } else { format!(" {}", f.unit) };
            let goal = f.goal.map(|g| format!("{}{unit}", g.describe())).unwrap_or_default();
            let verdict = f.goal.map(|g| g.verdict(f.median)).unwrap_or_default();
            println!(
                "| {} | {}{unit} | {}–{} | {goal} | {verdict} |",
                f.name,
                number(f.median),
                number(f.min),
                number(f.max)
            );
        }
        let missed: Vec<&str> = self.figures.iter().filter(|f| f.met == Some(false)).map(|f| f.name.as_str()).collect();
        if !missed.is_empty() {
            println!("\n{} goal(s) missed; say why beside the table: {}", missed.len(), missed.join("; "));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_and_verdicts_read_as_a_reader_expects() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(Goal::AtLeast(1.5).verdict(1.6), "met");
        assert_eq!(Goal::AtLeast(1.5).verdict(1.2), "**missed** by 0.30 (20 %)");
        assert_eq!(Goal::AtMost(0.0).verdict(3.0), "**missed** by 3");
        assert_eq!(percentile(&[1.0, 2.0, 3.0, 4.0, 5.0], 0.99), 5.0);
    }
}
