//! Configuration by NSM's environment names, each also a `--flag`.
//!
//! Every value is read as text and checked here, so a bad value gives one
//! line naming the variable, the flag and what is wrong (exit code 64).

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use ipnet::IpNet;
use nsm_api::authorize::{Policies, ServerPolicyArgs};
use nsm_api::duration;
use nsm_api::env::{parse_bool, parse_labels, parse_log_level};
use nsm_api::tls::{IdentityArgs, Source, SourceError};

use crate::functions::config::FunctionsConfig;
use crate::ipam::{Policy, parse_groups};

/// `sysexits.h` EX_USAGE: the configuration is wrong.
pub const EXIT_CONFIG: u8 = 64;

pub const DEFAULT_LISTEN_ON: &str = "unix:///tmp/mesh-proxy-nse/listen.on.sock";
/// Where the endpoint records its live connections by default (`NSM_STATE_DIR`).
pub const DEFAULT_STATE_DIR: &str = "/var/lib/mesh-proxy-nse";

/// Longest unix socket path (`sun_path` is 108 bytes with the NUL).
const MAX_UNIX_PATH: usize = 107;

#[derive(Debug, Clone, Parser)]
#[command(
    name = "mesh-proxy-nse",
    version,
    about = "Network Service Mesh endpoint that puts a service-mesh proxy in a client's traffic path",
    long_about = "Network Service Mesh endpoint (NSM API v1.15) that puts a service-mesh proxy in a \
client's traffic path. Serves networkservice.NetworkService, connection.MonitorConnection and \
grpc.health.v1.Health; hands out KERNEL interfaces in its own network namespace (fd passed over \
the unix socket) with point-to-point addresses.\n\nEvery option is also read from the NSM \
environment variable shown with it; the flag wins over the variable."
)]
pub struct Args {
    /// Only check the configuration (environment, flags and the files they name: NSM_CONFIG, keys, policies) and exit: 0 if it is valid, 64 with the reason if not.
    #[arg(long, conflicts_with = "probe")]
    pub check_config: bool,

    /// Check the health of the endpoint running at NSM_LISTEN_ON (grpc.health.v1, with this container's identity) and exit: 0 if it is SERVING, 1 with the reason if not. For a Kubernetes exec probe, as NSM's pods run grpc-health-probe.
    #[arg(long)]
    pub probe: bool,

    /// Name of this endpoint: its path-segment name and token subject.
    #[arg(
        long,
        env = "NSM_NAME",
        value_name = "NAME",
        default_value = "mesh-proxy-nse"
    )]
    pub name: String,

    /// Where to serve: unix:///absolute/path (fd passing, what NSM forwarders need) or tcp://host:port.
    #[arg(long, env = "NSM_LISTEN_ON", value_name = "URL", default_value = DEFAULT_LISTEN_ON)]
    pub listen_on: String,

    /// The NSM manager to register with (unix:///… or tcp://…), e.g. unix:///var/lib/networkservicemesh/nsm.io.sock; empty: do not register.
    #[arg(long, env = "NSM_CONNECT_TO", value_name = "URL", default_value = "")]
    pub connect_to: String,

    /// Register each of NSM_SERVICE_NAMES with its payload before the endpoint (registry-k8s then overwrites the NetworkService's matches: false for service chains).
    #[arg(
        long,
        env = "NSM_REGISTER_SERVICE",
        value_name = "BOOL",
        default_value = "true",
        num_args = 0..=1,
        default_missing_value = "true"
    )]
    pub register_service: String,

    /// Unregister the endpoint on SIGTERM (else the registry expires it).
    #[arg(
        long,
        env = "NSM_UNREGISTER_ITSELF",
        value_name = "BOOL",
        default_value = "false",
        num_args = 0..=1,
        default_missing_value = "true"
    )]
    pub unregister_itself: String,

    /// Network services this endpoint provides, comma-separated.
    #[arg(
        long,
        env = "NSM_SERVICE_NAMES",
        value_name = "NAMES",
        default_value = "mesh-proxy"
    )]
    pub service_names: String,

    /// Labels of this endpoint, as k1:v1,k2:v2.
    #[arg(long, env = "NSM_LABELS", value_name = "LABELS", default_value = "")]
    pub labels: String,

    /// Address pools: CIDRs and [bracketed, groups], e.g. "[198.18.0.0/16], [fd00::/64]"; each group gives every connection one point-to-point pair.
    #[arg(
        long,
        env = "NSM_CIDR_PREFIX",
        value_name = "CIDRS",
        default_value = "169.254.0.0/16"
    )]
    pub cidr_prefix: String,

    /// What to do with addresses a client presents: polite (keep them) or strict (drop those not free in our pools).
    #[arg(
        long,
        env = "NSM_IPAM_POLICY",
        value_name = "POLICY",
        default_value = "polite"
    )]
    pub ipam_policy: String,

    /// Lifetime of the tokens this endpoint issues (Go duration: 10m, 1h30m, 500ms).
    #[arg(
        long,
        env = "NSM_MAX_TOKEN_LIFETIME",
        value_name = "DURATION",
        default_value = "10m"
    )]
    pub max_token_lifetime: String,

    /// Payload of the network services: IP or ETHERNET.
    #[arg(
        long,
        env = "NSM_PAYLOAD",
        value_name = "PAYLOAD",
        default_value = "IP"
    )]
    pub payload: String,

    /// Log level: TRACE, DEBUG, INFO, WARN, ERROR (FATAL and PANIC mean ERROR).
    #[arg(
        long,
        env = "NSM_LOG_LEVEL",
        value_name = "LEVEL",
        default_value = "INFO"
    )]
    pub log_level: String,

    /// Log lines as text or json (one object per line); SIGUSR1 switches to TRACE, SIGUSR2 back.
    #[arg(
        long,
        env = "NSM_LOG_FORMAT",
        value_name = "FORMAT",
        default_value = "text"
    )]
    pub log_format: String,

    /// The network functions' YAML file: version 1, mesh-proxy alone (placement, proxy port, capture CIDRs, sidecar spec), or version 2, named functions (mesh-proxy, firewall) and chains of them; see nse/README.md. Empty: mesh-proxy's defaults.
    #[arg(long, env = "NSM_CONFIG", value_name = "FILE", default_value = "")]
    pub config: String,

    /// Where to serve Prometheus metrics (`GET /metrics`), host:port; empty: not served.
    #[arg(
        long,
        env = "NSM_METRICS_LISTEN_ON",
        value_name = "ADDR",
        default_value = ""
    )]
    pub metrics_listen_on: String,

    /// Where the endpoint records what its table holds per connection, so that a restart adopts it instead of deleting it (their traffic never bypasses the proxy); one file per network namespace; empty: record nothing (a restart removes the table until clients refresh).
    #[arg(long, env = "NSM_STATE_DIR", value_name = "DIR", default_value = DEFAULT_STATE_DIR)]
    pub state_dir: String,

    /// Group (name or number) of the unix socket, which is 0660 in a directory others cannot write to; empty: the process's group.
    #[arg(
        long,
        env = "NSM_SOCKET_GROUP",
        value_name = "GROUP",
        default_value = ""
    )]
    pub socket_group: String,

    /// NSM's identity settings (SPIFFE Workload API, SVID files, or insecure).
    #[command(flatten)]
    pub identity: IdentityArgs,

    #[command(flatten)]
    pub policies: ServerPolicyArgs,

    #[command(flatten)]
    pub telemetry: nsm_api::telemetry::TelemetryArgs,
}

/// Where the gRPC server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenOn {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

impl ListenOn {
    /// Where a client of ours dials it.
    pub fn target(&self) -> nsm_api::transport::Target {
        match self {
            ListenOn::Unix(p) => nsm_api::transport::Target::Unix(p.clone()),
            ListenOn::Tcp(a) => nsm_api::transport::Target::Tcp(a.to_string()),
        }
    }
}

impl fmt::Display for ListenOn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenOn::Unix(p) => write!(f, "unix://{}", p.display()),
            ListenOn::Tcp(a) => write!(f, "tcp://{a}"),
        }
    }
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// `--check-config`: stop after checking.
    pub check_only: bool,
    /// `--probe`: check the running endpoint's health instead of serving.
    pub probe_only: bool,
    pub name: String,
    pub listen_on: ListenOn,
    /// Registry URL (`NSM_CONNECT_TO`); `None`: do not register.
    pub connect_to: Option<String>,
    /// `NSM_REGISTER_SERVICE`.
    pub register_service: bool,
    /// `NSM_UNREGISTER_ITSELF`.
    pub unregister_itself: bool,
    pub service_names: Vec<String>,
    pub labels: BTreeMap<String, String>,
    pub cidr_groups: Vec<Vec<IpNet>>,
    pub ipam_policy: Policy,
    pub max_token_lifetime: Duration,
    pub payload: String,
    pub log_level: tracing::Level,
    pub log_format: nsm_api::logging::LogFormat,
    /// Where our SVID comes from; `Source::Insecure` only when asked.
    pub identity: Source,
    /// `TELEMETRY=true`: where spans go.
    pub telemetry: Option<nsm_api::telemetry::TelemetryConfig>,
    /// NSM's policies checked on every caller's path (`NSM_SERVER_POLICIES`).
    pub server_policies: Policies,
    /// The network functions and their chains (`NSM_CONFIG`); without a
    /// file, mesh-proxy with its defaults.
    pub functions: FunctionsConfig,
    /// The file `functions` was read from (`None`: the defaults), read
    /// again while running for proxy upgrades.
    pub config_file: Option<PathBuf>,
    /// `NSM_STATE_DIR` (absolute), `None` when empty.
    pub state_dir: Option<PathBuf>,
    /// `NSM_METRICS_LISTEN_ON`, `None` when empty.
    pub metrics_listen_on: Option<SocketAddr>,
    /// Group of the unix socket (`NSM_SOCKET_GROUP`); `None`: the process's.
    pub socket_group: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid configuration: {env} (--{flag}): {reason}")]
    Invalid {
        env: &'static str,
        flag: &'static str,
        reason: String,
    },
    #[error("invalid configuration: {0}")]
    Usage(String),
    #[error("invalid configuration: {0}")]
    Identity(#[from] SourceError),
}

fn invalid(env: &'static str, flag: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        env,
        flag,
        reason: reason.into(),
    }
}

fn first_control(s: &str) -> Option<char> {
    s.chars().find(|c| c.is_control())
}

fn parse_listen_on(s: &str) -> Result<ListenOn, String> {
    if let Some(path) = s.strip_prefix("unix://") {
        if !path.starts_with('/') {
            return Err(format!(
                "{s:?}: a unix URL needs an absolute path, e.g. unix:///tmp/nse/listen.on.sock"
            ));
        }
        if path.len() > MAX_UNIX_PATH {
            return Err(format!(
                "{s:?}: unix socket paths are limited to {MAX_UNIX_PATH} bytes"
            ));
        }
        if path.ends_with('/') || first_control(path).is_some() {
            return Err(format!("{s:?} is not a socket file path"));
        }
        return Ok(ListenOn::Unix(PathBuf::from(path)));
    }
    if let Some(addr) = s.strip_prefix("tcp://") {
        if let Some(port) = addr.strip_prefix(':') {
            let port: u16 = port.parse().map_err(|_| format!("{s:?}: bad port"))?;
            return Ok(ListenOn::Tcp(SocketAddr::new(
                IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                port,
            )));
        }
        if let Some(port) = addr.strip_prefix("localhost:") {
            let port: u16 = port.parse().map_err(|_| format!("{s:?}: bad port"))?;
            return Ok(ListenOn::Tcp(SocketAddr::new(
                IpAddr::V4(Ipv4Addr::LOCALHOST),
                port,
            )));
        }
        return addr.parse().map(ListenOn::Tcp).map_err(|_| {
            format!(
                "{s:?}: expected tcp://<ip>:<port>, e.g. tcp://127.0.0.1:5001 or tcp://[::1]:5001"
            )
        });
    }
    Err(format!("{s:?}: expected unix:///path or tcp://host:port"))
}

fn parse_connect_to(s: &str) -> Result<Option<String>, String> {
    let s = s.trim();
    if s.is_empty() {
        return Ok(None);
    }
    let ok = match (s.strip_prefix("unix://"), s.strip_prefix("tcp://")) {
        (Some(p), _) => p.starts_with('/') && p.len() > 1,
        (_, Some(hp)) => hp
            .rsplit_once(':')
            .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok()),
        _ => false,
    };
    if !ok || first_control(s).is_some() || s.contains(char::is_whitespace) {
        return Err(format!(
            "{s:?}: expected unix:///path or tcp://host:port (or empty: do not register)"
        ));
    }
    Ok(Some(s.to_owned()))
}

fn parse_name(s: &str) -> Result<String, String> {
    if s.is_empty() {
        return Err("is empty".into());
    }
    if s.contains(|c: char| c.is_control() || c.is_whitespace()) {
        return Err(format!("{s:?} contains whitespace or a control character"));
    }
    Ok(s.to_owned())
}

fn parse_service_names(s: &str) -> Result<Vec<String>, String> {
    let names: Vec<&str> = s.split(',').map(str::trim).collect();
    if names.iter().any(|n| n.is_empty()) {
        return Err(format!("{s:?} has an empty service name"));
    }
    names.into_iter().map(parse_name).collect()
}

fn parse_payload(s: &str) -> Result<String, String> {
    let up = s.trim().to_ascii_uppercase();
    match up.as_str() {
        nsm_api::payload::IP | nsm_api::payload::ETHERNET => Ok(up),
        _ => Err(format!("{s:?} is not a payload: use IP or ETHERNET")),
    }
}

/// The functions file, or mesh-proxy's defaults when the path is empty.
fn parse_function_config(path: &str) -> Result<FunctionsConfig, String> {
    if path.trim().is_empty() {
        return Ok(FunctionsConfig::default());
    }
    FunctionsConfig::load(std::path::Path::new(path)).map_err(|e| format!("{path}: {e}"))
}

impl Config {
    /// Parses the process's arguments and environment.
    pub fn from_env_and_args() -> Result<Config, ConfigError> {
        Self::parse_from(std::env::args_os())
    }

    /// Parses `args` (argv[0] first) with the environment as fallback.
    /// `--help`/`--version` print and exit the process, as clap does.
    pub fn parse_from<I, T>(args: I) -> Result<Config, ConfigError>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let args = match Args::try_parse_from(args) {
            Ok(a) => a,
            Err(e) if !e.use_stderr() => e.exit(), // --help, --version: stdout, exit 0
            Err(e) => {
                let text = e.to_string();
                let line = text
                    .lines()
                    .next()
                    .unwrap_or("")
                    .trim_start_matches("error: ");
                return Err(ConfigError::Usage(line.to_owned()));
            }
        };
        Self::try_from(args)
    }
}

impl TryFrom<Args> for Config {
    type Error = ConfigError;

    fn try_from(a: Args) -> Result<Self, Self::Error> {
        let cfg = Config {
            check_only: a.check_config,
            probe_only: a.probe,
            name: parse_name(&a.name).map_err(|r| invalid("NSM_NAME", "name", r))?,
            listen_on: parse_listen_on(&a.listen_on)
                .map_err(|r| invalid("NSM_LISTEN_ON", "listen-on", r))?,
            metrics_listen_on: match a.metrics_listen_on.trim() {
                "" => None,
                addr => Some(addr.parse().map_err(|e| {
                    invalid(
                        "NSM_METRICS_LISTEN_ON",
                        "metrics-listen-on",
                        format!("{addr:?}: {e} (expected host:port, e.g. 0.0.0.0:9090)"),
                    )
                })?),
            },
            state_dir: match a.state_dir.trim() {
                "" => None,
                d if Path::new(d).is_absolute() => Some(PathBuf::from(d)),
                d => {
                    return Err(invalid(
                        "NSM_STATE_DIR",
                        "state-dir",
                        format!("{d:?} is not an absolute path"),
                    ));
                }
            },
            socket_group: match a.socket_group.trim() {
                "" => None,
                g => Some(
                    nsm_api::listen::parse_group(g)
                        .map_err(|r| invalid("NSM_SOCKET_GROUP", "socket-group", r))?,
                ),
            },
            connect_to: parse_connect_to(&a.connect_to)
                .map_err(|r| invalid("NSM_CONNECT_TO", "connect-to", r))?,
            register_service: parse_bool(&a.register_service)
                .map_err(|r| invalid("NSM_REGISTER_SERVICE", "register-service", r))?,
            unregister_itself: parse_bool(&a.unregister_itself)
                .map_err(|r| invalid("NSM_UNREGISTER_ITSELF", "unregister-itself", r))?,
            service_names: parse_service_names(&a.service_names)
                .map_err(|r| invalid("NSM_SERVICE_NAMES", "service-names", r))?,
            labels: parse_labels(&a.labels).map_err(|r| invalid("NSM_LABELS", "labels", r))?,
            cidr_groups: parse_groups(&a.cidr_prefix).map_err(|e| {
                invalid(
                    "NSM_CIDR_PREFIX",
                    "cidr-prefix",
                    format!("{:?} {e}", a.cidr_prefix),
                )
            })?,
            ipam_policy: a
                .ipam_policy
                .parse()
                .map_err(|r: String| invalid("NSM_IPAM_POLICY", "ipam-policy", r))?,
            max_token_lifetime: match duration::parse(&a.max_token_lifetime) {
                Ok(d) if d.is_zero() => {
                    return Err(invalid(
                        "NSM_MAX_TOKEN_LIFETIME",
                        "max-token-lifetime",
                        "must be more than 0",
                    ));
                }
                Ok(d) => d,
                Err(e) => {
                    return Err(invalid(
                        "NSM_MAX_TOKEN_LIFETIME",
                        "max-token-lifetime",
                        e.to_string(),
                    ));
                }
            },
            payload: parse_payload(&a.payload).map_err(|r| invalid("NSM_PAYLOAD", "payload", r))?,
            log_level: parse_log_level(&a.log_level)
                .map_err(|r| invalid("NSM_LOG_LEVEL", "log-level", r))?,
            log_format: a
                .log_format
                .parse()
                .map_err(|r: String| invalid("NSM_LOG_FORMAT", "log-format", r))?,
            identity: a.identity.source()?,
            telemetry: a
                .telemetry
                .config()
                .map_err(|e| ConfigError::Usage(e.to_string()))?,
            server_policies: a
                .policies
                .policies()
                .map_err(|e| invalid("NSM_SERVER_POLICIES", "server-policies", e.to_string()))?,
            functions: parse_function_config(&a.config)
                .map_err(|r| invalid("NSM_CONFIG", "config", r))?,
            config_file: Some(a.config.trim())
                .filter(|f| !f.is_empty())
                .map(PathBuf::from),
        };
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, ConfigError> {
        let mut v = vec!["mesh-proxy-nse", "--insecure"];
        v.extend_from_slice(args);
        Config::parse_from(v)
    }

    fn reason(args: &[&str]) -> String {
        parse(args).unwrap_err().to_string()
    }

    #[test]
    fn defaults() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.name, "mesh-proxy-nse");
        assert_eq!(
            c.listen_on,
            ListenOn::Unix("/tmp/mesh-proxy-nse/listen.on.sock".into())
        );
        assert_eq!(c.connect_to, None);
        assert_eq!(c.service_names, ["mesh-proxy"]);
        assert!(c.labels.is_empty());
        assert_eq!(
            c.cidr_groups,
            vec![vec!["169.254.0.0/16".parse::<IpNet>().unwrap()]]
        );
        assert_eq!(c.ipam_policy, Policy::Polite);
        assert_eq!(c.max_token_lifetime, Duration::from_secs(600));
        assert_eq!(c.payload, "IP");
        assert_eq!(c.log_level, tracing::Level::INFO);
    }

    #[test]
    fn every_option() {
        let c = parse(&[
            "--name=nse-a",
            "--listen-on=tcp://127.0.0.1:5001",
            "--connect-to=unix:///var/lib/networkservicemesh/nsm.io.sock",
            "--service-names=a, b",
            "--labels=app:gw,zone:z1",
            "--cidr-prefix=[198.18.0.0/24], [fd00::/120]",
            "--ipam-policy=strict",
            "--max-token-lifetime=1h30m",
            "--payload=ethernet",
            "--log-level=warning",
        ])
        .unwrap();
        assert_eq!(
            c.listen_on,
            ListenOn::Tcp("127.0.0.1:5001".parse().unwrap())
        );
        assert_eq!(
            c.connect_to.as_deref(),
            Some("unix:///var/lib/networkservicemesh/nsm.io.sock")
        );
        assert_eq!(c.service_names, ["a", "b"]);
        assert_eq!(c.labels["zone"], "z1");
        assert_eq!(c.cidr_groups.len(), 2);
        assert_eq!(c.ipam_policy, Policy::Strict);
        assert_eq!(c.max_token_lifetime, Duration::from_secs(5400));
        assert_eq!(c.payload, "ETHERNET");
        assert_eq!(c.log_level, tracing::Level::WARN);
    }

    #[test]
    fn secure_by_default_and_insecure_parsed_like_go() {
        assert_eq!(
            Config::parse_from(["mesh-proxy-nse"]).unwrap_err(),
            ConfigError::Identity(SourceError::None)
        );
        assert_eq!(
            Config::parse_from(["mesh-proxy-nse", "--insecure=false"]).unwrap_err(),
            ConfigError::Identity(SourceError::None)
        );
        let files = Config::parse_from([
            "mesh-proxy-nse",
            "--svid-cert-file=/svid.pem",
            "--svid-key-file=/svid.key",
            "--trust-bundle-file=/bundle.pem",
        ])
        .unwrap();
        assert!(matches!(files.identity, Source::Files(_)));
        assert!(Config::parse_from(["mesh-proxy-nse", "--insecure=true"]).is_ok());
        assert!(Config::parse_from(["mesh-proxy-nse", "--insecure", "1"]).is_ok());
        let e = Config::parse_from(["mesh-proxy-nse", "--insecure=yes"]).unwrap_err();
        assert!(
            e.to_string()
                .contains("NSM_INSECURE (--insecure): \"yes\" is not a boolean"),
            "{e}"
        );
    }

    #[test]
    fn bad_values_name_the_variable_and_the_problem() {
        let cases: [(&[&str], &str); 12] = [
            (
                &["--cidr-prefix=10.0.0.0/33"],
                "NSM_CIDR_PREFIX (--cidr-prefix): \"10.0.0.0/33\" has \"10.0.0.0/33\", which is not a CIDR",
            ),
            (
                &["--cidr-prefix=[198.18.0.0/24"],
                "NSM_CIDR_PREFIX (--cidr-prefix): \"[198.18.0.0/24\" has a group that is never closed",
            ),
            (
                &["--ipam-policy=rude"],
                "NSM_IPAM_POLICY (--ipam-policy): \"rude\" is not an IPAM policy",
            ),
            (
                &["--max-token-lifetime=10"],
                "NSM_MAX_TOKEN_LIFETIME (--max-token-lifetime): \"10 (missing unit)\"",
            ),
            (&["--max-token-lifetime=0"], "must be more than 0"),
            (
                &["--labels=app"],
                "NSM_LABELS (--labels): \"app\" is not key:value",
            ),
            (&["--labels=:x"], "has an empty key"),
            (
                &["--payload=L2"],
                "NSM_PAYLOAD (--payload): \"L2\" is not a payload",
            ),
            (
                &["--listen-on=unix://relative.sock"],
                "NSM_LISTEN_ON (--listen-on): \"unix://relative.sock\": a unix URL needs an absolute path",
            ),
            (
                &["--listen-on=http://x"],
                "expected unix:///path or tcp://host:port",
            ),
            (
                &["--log-level=loud"],
                "NSM_LOG_LEVEL (--log-level): \"loud\" is not a log level",
            ),
            (
                &["--service-names=a,,b"],
                "NSM_SERVICE_NAMES (--service-names): \"a,,b\" has an empty service name",
            ),
        ];
        for (args, want) in cases {
            let got = reason(args);
            assert!(got.contains(want), "{args:?}: {got}");
            assert!(!got.contains('\n'), "one line: {got}");
        }
    }

    #[test]
    fn unknown_flags_are_one_line_usage_errors() {
        let e = parse(&["--bogus"]).unwrap_err();
        assert!(
            matches!(&e, ConfigError::Usage(l) if l.contains("--bogus")),
            "{e}"
        );
    }

    #[test]
    fn function_config_from_a_file_or_defaults() {
        use crate::functions::config::Kind;
        use crate::mesh_proxy::config::Placement;
        assert_eq!(parse(&[]).unwrap().functions, FunctionsConfig::default());
        let path = std::env::temp_dir().join(format!("nse-config-{}.yaml", std::process::id()));
        std::fs::write(
            &path,
            "version: 1\nplacement: sidecar\nproxy: {port: 15100}\n",
        )
        .unwrap();
        let flag = format!("--config={}", path.display());
        let c = parse(&[&flag]).unwrap();
        let Kind::MeshProxy(m) = &c.functions.functions["mesh-proxy"] else {
            panic!("version 1 is mesh-proxy")
        };
        assert_eq!(m.placement, Placement::Sidecar);
        assert_eq!(m.proxy.port.0, 15100);
        std::fs::write(&path, "proxy:\n  mode: bridge\n").unwrap();
        let e = reason(&[&flag]);
        let _ = std::fs::remove_file(&path);
        assert!(
            e.contains(&format!(
                "NSM_CONFIG (--config): {}: proxy.mode: unknown variant `bridge`",
                path.display()
            )),
            "{e}"
        );
        assert!(!e.contains('\n'), "{e}");
    }

    #[test]
    fn labels_grammar() {
        assert_eq!(parse_labels("").unwrap().len(), 0);
        let l = parse_labels("a:1, b:x:y").unwrap();
        assert_eq!((l["a"].as_str(), l["b"].as_str()), ("1", "x:y"));
        assert!(parse_labels("a:1,a:2").is_err());
        assert!(parse_labels("a:\u{1}").is_err());
    }
}
