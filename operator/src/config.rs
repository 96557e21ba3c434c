//! Command line and environment of the operator, validated before anything starts.
//!
//! Flags share names and defaults with kubebuilder operators where a counterpart exists
//! (`--metrics-bind-address`, `--health-probe-bind-address`, `--leader-elect`, `--kubeconfig`).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};

/// Log line format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log pipelines.
    Json,
}

/// Raw command line; [`Cli::validate`] turns it into a [`Config`].
#[derive(Debug, Parser)]
#[command(name = "example-operator", version, about = "Kubernetes operator for MyResource and MessageBroadcast")]
pub struct Cli {
    /// Without a subcommand, the operator runs.
    #[command(subcommand)]
    pub command: Option<Command>,

    /// Path to a kubeconfig; without it, the in-cluster configuration (or ~/.kube/config) is used.
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,

    /// Kubeconfig for the Lease alone (controller-runtime's LeaderElectionConfig): another
    /// identity, cluster or network path for the election. Defaults to --kubeconfig. The election
    /// always has connections of its own, so slow controller traffic never delays a renewal.
    #[arg(long, env = "LEADER_ELECTION_KUBECONFIG")]
    pub leader_election_kubeconfig: Option<PathBuf>,

    /// Elect a leader among replicas with a coordination.k8s.io/v1 Lease; only the leader reconciles.
    #[arg(long, env = "LEADER_ELECT", default_value_t = true, action = clap::ArgAction::Set)]
    pub leader_elect: bool,

    /// Name of the Lease used for leader election.
    #[arg(long, env = "LEADER_ELECTION_ID", default_value = "example-operator-leader")]
    pub leader_election_id: String,

    /// Namespace of the Lease. Defaults to POD_NAMESPACE, then the in-cluster namespace, then the
    /// kubeconfig's namespace.
    #[arg(long, env = "POD_NAMESPACE")]
    pub leader_election_namespace: Option<String>,

    /// Identity of this replica in the Lease and its User-Agent. Defaults to POD_NAME, else hostname
    /// plus a random suffix (with leader election) or `standalone` (without).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,

    /// How long a Lease stays valid without renewal; standbys wait this long before taking over.
    #[arg(long, env = "LEASE_DURATION", default_value = "15s", value_parser = humantime::parse_duration)]
    pub lease_duration: Duration,

    /// How long the leader keeps trying to renew before it stops leading.
    #[arg(long, env = "RENEW_DEADLINE", default_value = "10s", value_parser = humantime::parse_duration)]
    pub renew_deadline: Duration,

    /// Interval between election attempts and renewals.
    #[arg(long, env = "RETRY_PERIOD", default_value = "2s", value_parser = humantime::parse_duration)]
    pub retry_period: Duration,

    /// After losing the lease, stop the controllers and campaign again instead of exiting
    /// non-zero (the default, as client-go does).
    #[arg(long, env = "REENTER_ELECTION_ON_LOSS", default_value_t = false, action = clap::ArgAction::Set)]
    pub reenter_election_on_loss: bool,

    /// Controllers to run, comma separated (default: every registered controller).
    #[arg(long, env = "CONTROLLERS", value_delimiter = ',', value_parser = parse_controller)]
    pub controllers: Vec<String>,

    /// Reconciles running at once per controller, as NAME=N, comma separated or repeated, e.g.
    /// `myresource=8,messagebroadcast=2`; unnamed controllers keep their default.
    #[arg(long, env = "CONCURRENCY", value_delimiter = ',', value_parser = parse_concurrency)]
    pub concurrency: Vec<(String, u16)>,

    /// Alias of `--concurrency myresource=N` (earlier releases' flag).
    #[arg(long, env = "MYRESOURCE_CONCURRENCY", value_parser = clap::value_parser!(u16).range(1..))]
    pub myresource_concurrency: Option<u16>,

    /// Alias of `--concurrency messagebroadcast=N` (earlier releases' flag).
    #[arg(long, env = "MESSAGEBROADCAST_CONCURRENCY", value_parser = clap::value_parser!(u16).range(1..))]
    pub messagebroadcast_concurrency: Option<u16>,

    /// Manage only this namespace instead of the whole cluster.
    #[arg(long, env = "WATCH_NAMESPACE")]
    pub watch_namespace: Option<String>,

    /// Address of /metrics, e.g. `:8080` or `127.0.0.1:8080`; `0` disables it.
    #[arg(long, env = "METRICS_BIND_ADDRESS", default_value = ":8080")]
    pub metrics_bind_address: String,

    /// Address of /healthz and /readyz; `0` disables them. May equal the metrics address.
    #[arg(long, env = "HEALTH_PROBE_BIND_ADDRESS", default_value = ":8081")]
    pub health_probe_bind_address: String,

    /// Serve /metrics over HTTPS to callers whose bearer token the API server authenticates
    /// (TokenReview) and authorizes for `get` on the `/metrics` URL (SubjectAccessReview).
    /// Probes stay open, even on a shared port.
    #[arg(long, env = "METRICS_SECURE", default_value_t = false, num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub metrics_secure: bool,

    /// Folder holding the metrics server's `tls.crt` and `tls.key` (a mounted kubernetes.io/tls
    /// Secret); re-read when they change. Without it a self-signed certificate is made at start.
    #[arg(long, env = "METRICS_CERT_DIR")]
    pub metrics_cert_dir: Option<PathBuf>,

    /// With --metrics-secure: accept only bearer tokens issued for this audience (the TokenReview
    /// asks for it and the answer must name it), e.g. a projected ServiceAccount token made for
    /// the operator alone. Empty accepts tokens for the API server's own audiences.
    #[arg(long, env = "METRICS_TOKEN_AUDIENCE")]
    pub metrics_token_audience: Option<String>,

    /// Namespaces that never receive a ConfigMap from the operator, besides kube-system,
    /// kube-public, kube-node-lease and the operator's own (POD_NAMESPACE); comma separated. A
    /// MessageBroadcast skips them (removing copies it had there); a MyResource in one is Failed.
    #[arg(long, env = "PROTECTED_NAMESPACES", value_delimiter = ',')]
    pub protected_namespaces: Vec<String>,

    /// ConfigMap names the operator never writes (a resource asking for one is Failed), comma
    /// separated; replaces the default list. Names other components publish in many namespaces.
    #[arg(
        long,
        env = "RESERVED_CONFIGMAP_NAMES",
        value_delimiter = ',',
        default_values_t = reconcilers::tenancy::DEFAULT_RESERVED_CONFIG_MAP_NAMES.map(String::from)
    )]
    pub reserved_configmap_names: Vec<String>,

    /// The most bytes one MessageBroadcast may write in total: its message's UTF-8 bytes times the
    /// namespaces it matches. Past it the broadcast is Failed; copies already written stay.
    #[arg(long, env = "BROADCAST_MAX_BYTES", default_value_t = reconcilers::tenancy::DEFAULT_BROADCAST_MAX_BYTES)]
    pub broadcast_max_bytes: u64,

    /// The namespace this replica runs in, from POD_NAMESPACE (the downward API): protected
    /// unless it is the --watch-namespace.
    #[arg(skip = std::env::var("POD_NAMESPACE").ok())]
    pub own_namespace: Option<String>,

    /// Log format.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Log filter, e.g. `info` or `info,reconcilers=debug` (RUST_LOG syntax).
    #[arg(long, env = "LOG_LEVEL", default_value = "info")]
    pub log_level: String,

    /// How long in-flight reconciles may take to finish on SIGTERM before the lease is released.
    /// The lease is renewed throughout.
    #[arg(long, env = "SHUTDOWN_TIMEOUT", default_value = "20s", value_parser = humantime::parse_duration)]
    pub shutdown_timeout: Duration,

    /// How long an API request other than a watch may wait for its response (and then for each
    /// piece of its body) before it fails; a half-open connection then fails instead of hanging.
    #[arg(long, env = "API_REQUEST_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub api_request_timeout: Duration,

    /// How long one reconcile may run before it is cancelled and retried with backoff.
    #[arg(long, env = "RECONCILE_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration)]
    pub reconcile_timeout: Duration,

    /// How often every cached object is reconciled again without an event (controller-runtime's
    /// SyncPeriod, jittered ±10%); `0s` never. An in-sync object costs no write.
    #[arg(long, env = "SYNC_PERIOD", default_value = "10h", value_parser = humantime::parse_duration)]
    pub sync_period: Duration,
}

/// Subcommands besides running the operator.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Check a running operator's HTTP endpoints (what the chart's `helm test` runs).
    Check(crate::check::CheckArgs),
}

/// Timing and identity of the leader election.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ElectionConfig {
    pub lease_name: String,
    /// Resolved at start-up when not given.
    pub lease_namespace: Option<String>,
    pub identity: String,
    /// A whole number of seconds (the Lease counts in seconds).
    pub lease_duration: Duration,
    pub renew_deadline: Duration,
    pub retry_period: Duration,
    /// Bound on each election request: below the renew deadline, so one hung request never
    /// uses up the time a leader has to renew.
    pub request_timeout: Duration,
    pub reenter_on_loss: bool,
}

/// The longest any single election request may take.
const MAX_ELECTION_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// The bound on each election request for a renew deadline: half of it, at most 5 s, so a
/// leader gets at least two tries, and a release fits in the chart's 10 s of shutdown headroom.
pub fn election_request_timeout(renew_deadline: Duration) -> Duration {
    (renew_deadline / 2).min(MAX_ELECTION_REQUEST_TIMEOUT)
}

/// The name of a replica without leader election and without `--identity`.
pub const STANDALONE_IDENTITY: &str = "standalone";

/// The validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// This replica's name in its User-Agent: the election identity, else `--identity`, else
    /// [`STANDALONE_IDENTITY`].
    pub identity: String,
    pub kubeconfig: Option<PathBuf>,
    /// The Lease's own kubeconfig; `None` uses `kubeconfig`.
    pub election_kubeconfig: Option<PathBuf>,
    /// Bound on every API request that is not a watch.
    pub api_request_timeout: Duration,
    /// `None` when leader election is off: this replica reconciles at once.
    pub election: Option<ElectionConfig>,
    pub controllers: reconcilers::Settings,
    pub metrics_address: Option<SocketAddr>,
    pub probe_address: Option<SocketAddr>,
    /// `Some` when /metrics is served over HTTPS with authentication and authorization.
    pub metrics_security: Option<MetricsSecurity>,
    pub log_format: LogFormat,
    pub log_level: String,
    pub shutdown_timeout: Duration,
}

/// How secure metrics get their certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetricsSecurity {
    /// `tls.crt` and `tls.key` in this folder; `None` makes a self-signed certificate.
    pub cert_dir: Option<PathBuf>,
    /// The audience a caller's token must be issued for; `None` takes the API server's own.
    pub token_audience: Option<String>,
}

/// A configuration that cannot work, with the reason.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The election timings contradict each other.
    #[error("invalid leader election timing: {0}")]
    Timing(String),
    /// A bind address is not `0`, `:PORT` or `HOST:PORT`.
    #[error("invalid {flag} {value:?}: expected `0` (disabled), `:PORT` or `HOST:PORT`")]
    Address { flag: &'static str, value: String },
    /// No controller selected.
    #[error("--controllers selects no controller")]
    NoControllers,
    /// A timeout of zero.
    #[error("{0} must be greater than zero")]
    ZeroTimeout(&'static str),
    /// A certificate folder for plain-HTTP metrics.
    #[error("--metrics-cert-dir is set but --metrics-secure is not: plain-HTTP metrics use no certificate")]
    CertWithoutSecure,
}

/// A registered controller's name.
fn parse_controller(name: &str) -> Result<String, String> {
    match reconcilers::registry::find(name.trim()) {
        Some(registration) => Ok(registration.name.to_owned()),
        None => Err(format!(
            "unknown controller {name:?}; known controllers: {}",
            reconcilers::registry::names().join(", ")
        )),
    }
}

/// `NAME=N`: a registered controller and a concurrency of at least 1.
fn parse_concurrency(value: &str) -> Result<(String, u16), String> {
    let (name, count) = value.split_once('=').ok_or_else(|| format!("expected NAME=N, got {value:?}"))?;
    let count: u16 = count.trim().parse().map_err(|_| format!("{count:?} is not a whole number from 1 to 65535"))?;
    if count == 0 {
        return Err(format!("the concurrency of {name} must be at least 1"));
    }
    Ok((parse_controller(name)?, count))
}

/// Parses a Go-style bind address: `0` disables, `:8080` listens on every interface.
pub fn parse_bind_address(flag: &'static str, value: &str) -> Result<Option<SocketAddr>, ConfigError> {
    let invalid = || ConfigError::Address { flag, value: value.to_owned() };
    match value.trim() {
        "0" | "" => Ok(None),
        port if port.starts_with(':') => {
            port[1..].parse::<u16>().map(|p| Some(SocketAddr::from(([0, 0, 0, 0], p)))).map_err(|_| invalid())
        }
        address => address.parse::<SocketAddr>().map(Some).map_err(|_| invalid()),
    }
}

/// Checks the election timings: the Lease counts whole seconds (at least one); a leader must
/// give up (renew deadline) and notice it (one more retry period) before anyone may take over
/// (lease duration); and, as client-go requires, renew deadline > 1.2 × retry period (the jitter
/// factor of retries).
pub fn validate_timing(
    lease_duration: Duration,
    renew_deadline: Duration,
    retry_period: Duration,
) -> Result<(), ConfigError> {
    let show = |d: Duration| humantime::format_duration(d).to_string();
    if retry_period.is_zero() {
        return Err(ConfigError::Timing("--retry-period must be greater than zero".into()));
    }
    if lease_duration.subsec_nanos() != 0 || lease_duration < Duration::from_secs(1) {
        return Err(ConfigError::Timing(format!(
            "--lease-duration ({}) must be a whole number of seconds, at least 1s: the Lease stores it in seconds",
            show(lease_duration)
        )));
    }
    if renew_deadline + retry_period >= lease_duration {
        return Err(ConfigError::Timing(format!(
            "--renew-deadline ({}) + --retry-period ({}) must be less than --lease-duration ({}), so a leader that cannot renew stops before another replica may take over",
            show(renew_deadline),
            show(retry_period),
            show(lease_duration)
        )));
    }
    if renew_deadline <= retry_period.mul_f64(1.2) {
        return Err(ConfigError::Timing(format!(
            "--renew-deadline ({}) must be greater than 1.2 × --retry-period ({})",
            show(renew_deadline),
            show(retry_period)
        )));
    }
    Ok(())
}

/// This replica's default identity: the hostname plus a random suffix, as client-go does.
fn default_identity() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "example-operator".to_owned());
    format!("{host}_{:08x}", rand::random::<u32>())
}

impl Cli {
    /// Validates the command line into a [`Config`].
    pub fn validate(self) -> Result<Config, ConfigError> {
        let controllers: BTreeSet<String> = if self.controllers.is_empty() {
            reconcilers::registry::names().into_iter().map(str::to_owned).collect()
        } else {
            self.controllers.into_iter().collect()
        };
        if controllers.is_empty() {
            return Err(ConfigError::NoControllers);
        }
        // The old per-controller flags first, so `--concurrency` wins when both name one.
        let aliases = [
            (reconcilers::my_resource::CONTROLLER, self.myresource_concurrency),
            (reconcilers::message_broadcast::CONTROLLER, self.messagebroadcast_concurrency),
        ];
        let concurrency: BTreeMap<String, u16> = aliases
            .into_iter()
            .filter_map(|(name, count)| Some((name.to_owned(), count?)))
            .chain(self.concurrency)
            .collect();
        for (flag, timeout) in [
            ("--api-request-timeout", self.api_request_timeout),
            ("--reconcile-timeout", self.reconcile_timeout),
            ("--shutdown-timeout", self.shutdown_timeout),
        ] {
            if timeout.is_zero() {
                return Err(ConfigError::ZeroTimeout(flag));
            }
        }
        let identity = self.identity.filter(|id| !id.is_empty());
        let watch_namespace = self.watch_namespace.filter(|ns| !ns.is_empty());
        // In namespaced mode the namespace chosen to manage is managed, even the operator's own.
        let own_namespace = self.own_namespace.filter(|ns| !ns.is_empty() && Some(ns) != watch_namespace.as_ref());
        let tenancy = reconcilers::tenancy::Tenancy {
            protected_namespaces: reconcilers::tenancy::DEFAULT_PROTECTED_NAMESPACES
                .iter()
                .map(|&ns| ns.to_owned())
                .chain(own_namespace)
                .chain(self.protected_namespaces.into_iter().map(|ns| ns.trim().to_owned()))
                .filter(|ns| !ns.is_empty())
                .collect(),
            reserved_config_map_names: self
                .reserved_configmap_names
                .into_iter()
                .map(|name| name.trim().to_owned())
                .filter(|name| !name.is_empty())
                .collect(),
            broadcast_max_bytes: self.broadcast_max_bytes,
        };
        let election = if self.leader_elect {
            validate_timing(self.lease_duration, self.renew_deadline, self.retry_period)?;
            Some(ElectionConfig {
                lease_name: self.leader_election_id,
                lease_namespace: self.leader_election_namespace.filter(|ns| !ns.is_empty()),
                identity: identity.clone().unwrap_or_else(default_identity),
                lease_duration: self.lease_duration,
                renew_deadline: self.renew_deadline,
                retry_period: self.retry_period,
                request_timeout: election_request_timeout(self.renew_deadline),
                reenter_on_loss: self.reenter_election_on_loss,
            })
        } else {
            None
        };
        Ok(Config {
            identity: election
                .as_ref()
                .map(|e| e.identity.clone())
                .or(identity)
                .unwrap_or_else(|| STANDALONE_IDENTITY.to_owned()),
            kubeconfig: self.kubeconfig,
            election_kubeconfig: self.leader_election_kubeconfig,
            api_request_timeout: self.api_request_timeout,
            controllers: reconcilers::Settings {
                controllers,
                concurrency,
                instance: election.as_ref().map(|e| e.identity.clone()),
                watch_namespace,
                reconcile_timeout: self.reconcile_timeout,
                sync_period: Some(self.sync_period).filter(|period| !period.is_zero()),
                tenancy: std::sync::Arc::new(tenancy),
            },
            metrics_security: match (self.metrics_secure, self.metrics_cert_dir) {
                (true, cert_dir) => Some(MetricsSecurity {
                    cert_dir: cert_dir.filter(|d| !d.as_os_str().is_empty()),
                    token_audience: self.metrics_token_audience.filter(|aud| !aud.is_empty()),
                }),
                (false, None) => None,
                (false, Some(dir)) if dir.as_os_str().is_empty() => None,
                (false, Some(_)) => return Err(ConfigError::CertWithoutSecure),
            },
            metrics_address: parse_bind_address("--metrics-bind-address", &self.metrics_bind_address)?,
            probe_address: parse_bind_address("--health-probe-bind-address", &self.health_probe_bind_address)?,
            election,
            log_format: self.log_format,
            log_level: self.log_level,
            shutdown_timeout: self.shutdown_timeout,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, String> {
        let cli = Cli::try_parse_from(std::iter::once("example-operator").chain(args.iter().copied()))
            .map_err(|e| e.to_string())?;
        cli.validate().map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_match_client_go_and_kubebuilder() -> Result<(), String> {
        let config = parse(&["--identity", "pod-0"])?;
        let election = config.election.ok_or("election on by default")?;
        assert_eq!(election.lease_duration, Duration::from_secs(15));
        assert_eq!(election.renew_deadline, Duration::from_secs(10));
        assert_eq!(election.retry_period, Duration::from_secs(2));
        assert_eq!(election.identity, "pod-0");
        assert!(!election.reenter_on_loss);
        assert_eq!(config.metrics_address, Some(SocketAddr::from(([0, 0, 0, 0], 8080))));
        assert_eq!(config.probe_address, Some(SocketAddr::from(([0, 0, 0, 0], 8081))));
        assert_eq!(config.controllers.controllers.len(), 2);
        Ok(())
    }

    #[test]
    fn a_replica_without_leader_election_keeps_its_identity_in_its_user_agent() -> Result<(), String> {
        let elected = parse(&["--identity", "pod-0"])?;
        assert_eq!(elected.identity, "pod-0");
        let named = parse(&["--leader-elect=false", "--identity", "bench-r1"])?;
        assert_eq!((named.identity.as_str(), named.election.is_none()), ("bench-r1", true));
        let unnamed = parse(&["--leader-elect=false", "--identity", ""])?;
        assert_eq!(unnamed.identity, STANDALONE_IDENTITY);
        Ok(())
    }

    #[test]
    fn secure_metrics_take_a_certificate_folder_only_when_on() -> Result<(), String> {
        assert_eq!(parse(&[])?.metrics_security, None, "plain HTTP unless asked");
        assert_eq!(
            parse(&["--metrics-secure"])?.metrics_security,
            Some(MetricsSecurity { cert_dir: None, token_audience: None })
        );
        assert_eq!(parse(&["--metrics-secure=false"])?.metrics_security, None);
        let secured = parse(&["--metrics-secure=true", "--metrics-cert-dir", "/certs"])?.metrics_security;
        assert_eq!(secured, Some(MetricsSecurity { cert_dir: Some("/certs".into()), token_audience: None }));
        let error = parse(&["--metrics-cert-dir", "/certs"]).err().unwrap_or_default();
        assert!(error.contains("--metrics-secure is not"), "{error}");
        Ok(())
    }

    #[test]
    fn contradictory_timings_are_rejected_with_the_rule() {
        let error = parse(&["--lease-duration", "10s", "--renew-deadline", "10s"]).err().unwrap_or_default();
        assert!(
            error.contains("--renew-deadline (10s) + --retry-period (2s) must be less than --lease-duration (10s)"),
            "{error}"
        );
        let error = parse(&["--lease-duration", "11s", "--renew-deadline", "10s"]).err().unwrap_or_default();
        assert!(error.contains("must be less than --lease-duration (11s)"), "11s/10s/2s: {error}");
        let error = parse(&["--renew-deadline", "2s", "--retry-period", "2s"]).err().unwrap_or_default();
        assert!(error.contains("1.2 × --retry-period"), "{error}");
        assert!(parse(&["--leader-elect=false", "--renew-deadline", "20s"]).is_ok(), "timings unused without election");
    }

    #[test]
    fn lease_durations_the_lease_cannot_store_are_rejected() {
        for duration in ["1500ms", "900ms", "0s"] {
            let error = parse(&["--lease-duration", duration, "--renew-deadline", "300ms", "--retry-period", "100ms"])
                .err()
                .unwrap_or_default();
            assert!(error.contains("must be a whole number of seconds, at least 1s"), "{duration}: {error}");
        }
        let config = parse(&["--lease-duration", "4s", "--renew-deadline", "3s", "--retry-period", "500ms"]);
        assert!(config.is_ok(), "fractional deadlines and retries are fine: {config:?}");
    }

    #[test]
    fn election_requests_time_out_well_before_the_renew_deadline() -> Result<(), String> {
        let config = parse(&[])?;
        let election = config.election.ok_or("election on by default")?;
        assert_eq!(election.request_timeout, Duration::from_secs(5));
        assert_eq!(election_request_timeout(Duration::from_secs(3)), Duration::from_millis(1500));
        assert_eq!(election_request_timeout(Duration::from_secs(60)), Duration::from_secs(5));
        let error = parse(&["--reconcile-timeout", "0s"]).err().unwrap_or_default();
        assert!(error.contains("--reconcile-timeout must be greater than zero"), "{error}");
        Ok(())
    }

    #[test]
    fn bind_addresses_follow_the_go_conventions() {
        assert_eq!(parse_bind_address("f", "0").ok(), Some(None));
        assert_eq!(parse_bind_address("f", ":9090").ok(), Some(Some(SocketAddr::from(([0, 0, 0, 0], 9090)))));
        assert_eq!(parse_bind_address("f", "127.0.0.1:1").ok(), Some(Some(SocketAddr::from(([127, 0, 0, 1], 1)))));
        assert!(parse_bind_address("f", "localhost").is_err());
        assert!(parse_bind_address("f", ":http").is_err());
    }

    #[test]
    fn unknown_controllers_and_bad_durations_are_rejected() {
        let error = parse(&["--controllers", "myresource,nope"]).err().unwrap_or_default();
        assert!(error.contains("unknown controller \"nope\""), "{error}");
        let error = parse(&["--lease-duration", "soon"]).err().unwrap_or_default();
        assert!(error.contains("--lease-duration"), "{error}");
        let config = parse(&["--controllers", "messagebroadcast", "--leader-elect=false"]);
        assert_eq!(config.map(|c| c.controllers.controllers.len()).ok(), Some(1));
    }

    #[test]
    fn concurrency_is_a_map_by_controller_name_and_the_old_flags_are_aliases() -> Result<(), String> {
        let config = parse(&[])?;
        let of = |config: &Config, name: &str| {
            reconcilers::registry::find(name).map(|registration| config.controllers.concurrency_of(registration))
        };
        assert_eq!(of(&config, "myresource"), Some(4), "the registration's default");
        assert_eq!(of(&config, "messagebroadcast"), Some(2));
        let config = parse(&["--concurrency", "myresource=8,messagebroadcast=3"])?;
        assert_eq!((of(&config, "myresource"), of(&config, "messagebroadcast")), (Some(8), Some(3)));
        let config = parse(&["--myresource-concurrency", "6", "--messagebroadcast-concurrency", "5"])?;
        assert_eq!((of(&config, "myresource"), of(&config, "messagebroadcast")), (Some(6), Some(5)));
        let config = parse(&["--myresource-concurrency", "6", "--concurrency", "myresource=9"])?;
        assert_eq!(of(&config, "myresource"), Some(9), "the map wins over the alias");
        for (value, expected) in [
            ("nope=2", "unknown controller \"nope\""),
            ("myresource=0", "must be at least 1"),
            ("myresource", "expected NAME=N"),
            ("myresource=lots", "not a whole number"),
        ] {
            let error = parse(&["--concurrency", value]).err().unwrap_or_default();
            assert!(error.contains(expected), "{value}: {error}");
        }
        Ok(())
    }

    #[test]
    fn tenancy_flags_extend_the_protected_namespaces_and_replace_the_reserved_names() -> Result<(), String> {
        let mut cli = Cli::try_parse_from(["example-operator", "--identity", "pod-0"]).map_err(|e| e.to_string())?;
        cli.own_namespace = Some("operators".into());
        let defaults = cli.validate().map_err(|e| e.to_string())?;
        let tenancy = &defaults.controllers.tenancy;
        for namespace in ["kube-system", "kube-public", "kube-node-lease", "operators"] {
            assert!(tenancy.is_protected(namespace), "{namespace} is protected by default");
        }
        assert!(tenancy.reserved_config_map_names.contains("kube-root-ca.crt"));
        assert_eq!(tenancy.broadcast_max_bytes, 16 * 1024 * 1024);

        let set = parse(&[
            "--protected-namespaces=platform, security",
            "--reserved-configmap-names=only-this",
            "--broadcast-max-bytes=1024",
        ])?;
        let tenancy = &set.controllers.tenancy;
        assert!(
            tenancy.is_protected("platform") && tenancy.is_protected("security") && tenancy.is_protected("kube-system")
        );
        assert_eq!(tenancy.reserved_config_map_names, BTreeSet::from(["only-this".to_owned()]));
        assert_eq!(tenancy.broadcast_max_bytes, 1024);
        assert!(parse(&["--broadcast-max-bytes=lots"]).is_err());

        let mut namespaced =
            Cli::try_parse_from(["example-operator", "--watch-namespace", "operators"]).map_err(|e| e.to_string())?;
        namespaced.own_namespace = Some("operators".into());
        let namespaced = namespaced.validate().map_err(|e| e.to_string())?;
        assert!(!namespaced.controllers.tenancy.is_protected("operators"), "the namespace chosen to manage is managed");
        Ok(())
    }

    #[test]
    fn a_metrics_token_audience_applies_to_secure_metrics() -> Result<(), String> {
        let security = parse(&["--metrics-secure", "--metrics-token-audience=example-operator"])?.metrics_security;
        assert_eq!(security.and_then(|s| s.token_audience).as_deref(), Some("example-operator"));
        let security = parse(&["--metrics-secure", "--metrics-token-audience="])?.metrics_security;
        assert_eq!(security.and_then(|s| s.token_audience), None);
        Ok(())
    }
}
