//! Command line and environment. NSM's webhook configures the init container
//! through `NSM_*` variables; each is also a flag. clap reads raw strings and
//! [`Config::from_cli`] validates them, so every bad value is one line and
//! exit 64 (clap's own usage errors stay exit 2).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use nsm_api::authorize::{ClientPolicyArgs, Policies};
use nsm_api::duration::{self, DurationError};
use nsm_api::env;
use nsm_api::nsurl::{NsUrl, NsUrlError};
use nsm_api::tls::{IdentityArgs, Source, SourceError};

pub const DEFAULT_CONNECT_TO: &str = "unix:///var/lib/networkservicemesh/nsm.io.sock";

const EXIT_CODES: &str = "\
Exit codes:
  0   every network service is up (and validated with --validate)
  1   the manager refused a request (gRPC status code and message printed)
  2   usage error (unknown flag, missing flag value)
  3   the manager was unreachable (or never answered) until NSM_REQUEST_TIMEOUT
  4   timed out waiting for an interface or its addresses in this netns
  5   --validate: the redirect check failed
  64  bad configuration (one line says which value and why)

Output: one stdout line per service on success,
  nsc-init: kernel://mesh-proxy/nsm-1 up: nsm-1 198.18.0.1/32 -> 198.18.0.0/32
otherwise one stderr line `nsc-init: <url>: <reason>`.";

/// NSM client init container: requests every network service in
/// NSM_NETWORK_SERVICES for this pod's network namespace, waits until each
/// interface is up with its addresses, then exits (or, with --watch, keeps the
/// connections refreshed until SIGTERM and closes them).
#[derive(Debug, Parser)]
#[command(name = "nsc-init", version, after_help = EXIT_CODES)]
pub struct Cli {
    /// Only check the configuration (environment and flags) and exit: 0 if it is valid, the configuration error's code if not.
    #[arg(long)]
    pub check_config: bool,

    /// Comma-separated network service URLs, as the NSM webhook sets them:
    /// `<mechanism>://<service>[@domain][/<iface>][?label=value&…]`, e.g.
    /// `kernel://mesh-proxy/nsm-1`. Only the kernel mechanism is supported.
    #[arg(long, env = "NSM_NETWORK_SERVICES", value_name = "URLS")]
    pub network_services: Option<String>,

    /// Client name: path segment 0's name, and connection ids `<name>-<i>`
    /// for the i-th URL (stable, so a restarted init container refreshes
    /// instead of duplicating its connections).
    #[arg(long, env = "NSM_NAME", default_value = "nsc-init")]
    pub name: String,

    /// Network service manager: `unix:///path` (fds pass beside the gRPC
    /// messages) or `tcp://host:port` (no fd passing).
    #[arg(long, env = "NSM_CONNECT_TO", default_value = DEFAULT_CONNECT_TO, value_name = "URL")]
    pub connect_to: String,

    /// Timeout of one dial to the manager (Go duration: 500ms, 5s, 1m30s).
    #[arg(
        long,
        env = "NSM_DIAL_TIMEOUT",
        default_value = "5s",
        value_name = "DURATION"
    )]
    pub dial_timeout: String,

    /// Total time per service for the request, retries included; also the
    /// time allowed for the interfaces (and --validate) afterwards.
    #[arg(
        long,
        env = "NSM_REQUEST_TIMEOUT",
        default_value = "15s",
        value_name = "DURATION"
    )]
    pub request_timeout: String,

    /// Lifetime of our tokens (segment 0 `expires`, `nsm-client-token-expires`).
    /// Must be longer than NSM_REQUEST_TIMEOUT: hops close a connection at
    /// its token's expiry minus the request timeout.
    #[arg(
        long,
        env = "NSM_MAX_TOKEN_LIFETIME",
        default_value = "10m",
        value_name = "DURATION"
    )]
    pub max_token_lifetime: String,

    /// Extra connection labels `k:v,k:v`. A URL's own query labels win over
    /// these; `podName`/`nodeName`/`clusterName` are added from POD_NAME /
    /// NODE_NAME / CLUSTER_NAME when set and not given here.
    #[arg(long, env = "NSM_LABELS", value_name = "K:V,…")]
    pub labels: Option<String>,

    /// Log level: TRACE, DEBUG, INFO, WARN or ERROR (FATAL/PANIC mean ERROR).
    #[arg(
        long,
        env = "NSM_LOG_LEVEL",
        default_value = "INFO",
        value_name = "LEVEL"
    )]
    pub log_level: String,

    /// Log lines as text or json (one object per line); SIGUSR1 switches to TRACE, SIGUSR2 back.
    #[arg(
        long,
        env = "NSM_LOG_FORMAT",
        default_value = "text",
        value_name = "FORMAT"
    )]
    pub log_format: String,

    /// NSM's identity settings (SPIFFE Workload API, SVID files, or insecure).
    #[command(flatten)]
    pub identity: IdentityArgs,

    #[command(flatten)]
    pub policies: ClientPolicyArgs,

    #[command(flatten)]
    pub telemetry: nsm_api::telemetry::TelemetryArgs,

    /// After the interfaces are up, check that traffic is redirected: open a
    /// TCP connection to --validate-probe from this netns (and, with
    /// --validate-expect, require the first bytes read to start with that
    /// text), retrying until --validate-timeout. Fails with exit 5.
    #[arg(long, env = "NSC_VALIDATE", value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub validate: Option<String>,

    /// Address the --validate check connects to (`ip:port`); required with --validate.
    #[arg(long, env = "NSC_VALIDATE_PROBE", value_name = "IP:PORT")]
    pub validate_probe: Option<String>,

    /// Text the probe's response must start with (nothing is sent first).
    #[arg(long, env = "NSC_VALIDATE_EXPECT", value_name = "TEXT")]
    pub validate_expect: Option<String>,

    /// Total time for the --validate check, retries included.
    #[arg(
        long,
        env = "NSC_VALIDATE_TIMEOUT",
        default_value = "5s",
        value_name = "DURATION"
    )]
    pub validate_timeout: String,

    /// Sidecar mode (like cmd-nsc): after the services are up, refresh every
    /// connection before it expires, heal failures by re-requesting, and
    /// Close them all on SIGTERM/SIGINT, then exit 0.
    #[arg(long, env = "NSC_WATCH", value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub watch: Option<String>,
}

/// Where the manager listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectTo {
    Unix(PathBuf),
    /// `host:port`, dialled as plain HTTP/2 (no fd passing).
    Tcp(String),
}

impl std::fmt::Display for ConnectTo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnectTo::Unix(p) => write!(f, "unix://{}", p.display()),
            ConnectTo::Tcp(a) => write!(f, "tcp://{a}"),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Validate {
    pub probe: SocketAddr,
    pub expect: Option<String>,
    pub timeout: Duration,
}

/// Validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub services: Vec<NsUrl>,
    pub name: String,
    pub connect_to: ConnectTo,
    pub dial_timeout: Duration,
    pub request_timeout: Duration,
    pub max_token_lifetime: Duration,
    /// NSM_LABELS plus the client-info labels; URL labels are merged per request.
    pub labels: BTreeMap<String, String>,
    pub log_level: tracing::Level,
    pub log_format: nsm_api::logging::LogFormat,
    pub validate: Option<Validate>,
    pub watch: bool,
    /// Where our SVID comes from; `Source::Insecure` only when asked.
    pub identity: Source,
    /// `TELEMETRY=true`: where spans go.
    pub telemetry: Option<nsm_api::telemetry::TelemetryConfig>,
    /// NSM's policies over the path the manager returns (`NSM_CLIENT_POLICIES`).
    pub client_policies: Policies,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    Telemetry(#[from] nsm_api::telemetry::TelemetryError),
    #[error("NSM_NETWORK_SERVICES is empty: give at least one URL, e.g. kernel://mesh-proxy/nsm-1")]
    NoServices,
    #[error("NSM_NETWORK_SERVICES: {0}")]
    Url(#[from] NsUrlError),
    #[error("NSM_NETWORK_SERVICES: {url}: mechanism {mechanism} is not supported (only kernel://)")]
    Mechanism { url: String, mechanism: String },
    #[error("NSM_NETWORK_SERVICES: interface name {name:?} is used by {first} and {second}")]
    DuplicateInterface {
        name: String,
        first: String,
        second: String,
    },
    #[error("NSM_NAME must not be empty or contain whitespace/control characters (got {0:?})")]
    Name(String),
    #[error("NSM_CONNECT_TO {0:?}: expected unix:///absolute/path or tcp://host:port")]
    ConnectTo(String),
    #[error("{var}: {source}")]
    Duration {
        var: &'static str,
        #[source]
        source: DurationError,
    },
    #[error("{var} must be greater than zero")]
    ZeroDuration { var: &'static str },
    #[error(
        "NSM_MAX_TOKEN_LIFETIME {lifetime} must be longer than NSM_REQUEST_TIMEOUT {timeout}: \
         every hop closes a connection at its token's expiry minus the request timeout, \
         so the connection would be closed as soon as it is up"
    )]
    TokenLifetime { lifetime: String, timeout: String },
    #[error("NSM_LABELS {0:?}: expected k:v,k:v with non-empty keys")]
    Labels(String),
    #[error("NSM_LOG_LEVEL {0:?}: expected TRACE, DEBUG, INFO, WARN or ERROR")]
    LogLevel(String),
    #[error("NSM_LOG_FORMAT: {0}")]
    LogFormat(String),
    #[error("{var} {value:?}: expected true or false")]
    Bool { var: &'static str, value: String },
    #[error("{0}")]
    Identity(#[from] SourceError),
    #[error("NSM_CLIENT_POLICIES: {0}")]
    Policies(String),
    #[error("NSC_VALIDATE needs NSC_VALIDATE_PROBE (--validate-probe ip:port)")]
    NoProbe,
    #[error("NSC_VALIDATE_PROBE {0:?}: expected ip:port, e.g. 198.18.0.9:80 or [fd00::9]:80")]
    Probe(String),
}

/// Go's `strconv.ParseBool`; unset is false.
fn parse_bool(var: &'static str, value: Option<&str>) -> Result<bool, ConfigError> {
    value.map_or(Ok(false), |v| {
        env::parse_bool(v).map_err(|_| ConfigError::Bool {
            var,
            value: v.trim().to_owned(),
        })
    })
}

/// `k:v,k:v` (envconfig's map syntax).
pub fn parse_labels(value: &str) -> Result<BTreeMap<String, String>, ConfigError> {
    env::parse_labels(value).map_err(|_| ConfigError::Labels(value.to_owned()))
}

fn parse_log_level(value: &str) -> Result<tracing::Level, ConfigError> {
    env::parse_log_level(value).map_err(|_| ConfigError::LogLevel(value.to_owned()))
}

fn parse_duration(var: &'static str, value: &str) -> Result<Duration, ConfigError> {
    let d = duration::parse(value).map_err(|source| ConfigError::Duration { var, source })?;
    if d.is_zero() {
        return Err(ConfigError::ZeroDuration { var });
    }
    Ok(d)
}

fn parse_connect_to(value: &str) -> Result<ConnectTo, ConfigError> {
    let bad = || ConfigError::ConnectTo(value.to_owned());
    if let Some(path) = value.strip_prefix("unix://") {
        if !path.starts_with('/') || path.len() < 2 {
            return Err(bad());
        }
        return Ok(ConnectTo::Unix(PathBuf::from(path)));
    }
    if let Some(addr) = value.strip_prefix("tcp://") {
        let addr = addr.trim_end_matches('/');
        let (host, port) = addr.rsplit_once(':').ok_or_else(bad)?;
        if host.is_empty() || host.contains('/') || port.parse::<u16>().is_err() {
            return Err(bad());
        }
        return Ok(ConnectTo::Tcp(addr.to_owned()));
    }
    Err(bad())
}

impl Config {
    /// Validates `cli`; `env` looks up the client-info variables (POD_NAME …).
    pub fn from_cli(
        cli: &Cli,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let identity = cli.identity.source()?;
        let services = NsUrl::parse_list(cli.network_services.as_deref().unwrap_or(""))?;
        if services.is_empty() {
            return Err(ConfigError::NoServices);
        }
        for u in &services {
            if u.mechanism != nsm_api::mechanism::KERNEL {
                return Err(ConfigError::Mechanism {
                    url: u.to_string(),
                    mechanism: u.mechanism.clone(),
                });
            }
        }
        for (i, a) in services.iter().enumerate() {
            let Some(name) = &a.interface else { continue };
            if let Some(b) = services[i + 1..]
                .iter()
                .find(|b| b.interface.as_ref() == Some(name))
            {
                return Err(ConfigError::DuplicateInterface {
                    name: name.clone(),
                    first: a.to_string(),
                    second: b.to_string(),
                });
            }
        }
        let name = cli.name.trim();
        if name.is_empty() || name.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(ConfigError::Name(cli.name.clone()));
        }
        let mut labels = parse_labels(cli.labels.as_deref().unwrap_or(""))?;
        env::add_client_info(&mut labels, env);
        let validate = if parse_bool("NSC_VALIDATE", cli.validate.as_deref())? {
            let probe = cli.validate_probe.as_deref().ok_or(ConfigError::NoProbe)?;
            Some(Validate {
                probe: probe
                    .trim()
                    .parse()
                    .map_err(|_| ConfigError::Probe(probe.to_owned()))?,
                expect: cli.validate_expect.clone().filter(|e| !e.is_empty()),
                timeout: parse_duration("NSC_VALIDATE_TIMEOUT", &cli.validate_timeout)?,
            })
        } else {
            None
        };
        let request_timeout = parse_duration("NSM_REQUEST_TIMEOUT", &cli.request_timeout)?;
        let max_token_lifetime = parse_duration("NSM_MAX_TOKEN_LIFETIME", &cli.max_token_lifetime)?;
        // sdk's timeout element closes at `expires - request timeout`.
        if max_token_lifetime <= request_timeout {
            return Err(ConfigError::TokenLifetime {
                lifetime: cli.max_token_lifetime.trim().to_owned(),
                timeout: cli.request_timeout.trim().to_owned(),
            });
        }
        Ok(Config {
            services,
            name: name.to_owned(),
            connect_to: parse_connect_to(cli.connect_to.trim())?,
            dial_timeout: parse_duration("NSM_DIAL_TIMEOUT", &cli.dial_timeout)?,
            request_timeout,
            max_token_lifetime,
            labels,
            log_level: parse_log_level(&cli.log_level)?,
            log_format: cli.log_format.parse().map_err(ConfigError::LogFormat)?,
            validate,
            watch: parse_bool("NSC_WATCH", cli.watch.as_deref())?,
            identity,
            telemetry: cli.telemetry.config()?,
            client_policies: cli
                .policies
                .policies()
                .map_err(|e| ConfigError::Policies(e.to_string()))?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cli(args: &[&str]) -> Cli {
        let mut argv = vec!["nsc-init"];
        argv.extend_from_slice(args);
        Cli::try_parse_from(argv).unwrap()
    }

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn config(args: &[&str]) -> Result<Config, ConfigError> {
        Config::from_cli(&cli(args), no_env)
    }

    const OK: [&str; 4] = [
        "--insecure",
        "--network-services",
        "kernel://mesh-proxy/nsm-1?app=web",
        "--labels=team:a,tier:b",
    ];

    #[test]
    fn defaults_match_nsm() {
        let c = config(&OK).unwrap();
        assert_eq!(c.name, "nsc-init");
        assert_eq!(
            c.connect_to,
            ConnectTo::Unix("/var/lib/networkservicemesh/nsm.io.sock".into())
        );
        assert_eq!(c.dial_timeout, Duration::from_secs(5));
        assert_eq!(c.request_timeout, Duration::from_secs(15));
        assert_eq!(c.max_token_lifetime, Duration::from_secs(600));
        assert_eq!(c.log_level, tracing::Level::INFO);
        assert_eq!(c.services.len(), 1);
        assert_eq!(c.services[0].labels["app"], "web");
        assert_eq!(c.labels["team"], "a");
        assert_eq!(c.labels["tier"], "b");
        assert!(!c.watch);
        assert!(c.validate.is_none());
    }

    #[test]
    fn flags_and_go_values() {
        let mut args = OK.to_vec();
        args.extend([
            "--connect-to=tcp://127.0.0.1:5001",
            "--request-timeout=1m30s",
            "--dial-timeout=500ms",
            "--log-level=debug",
            "--watch",
            "--validate=T",
            "--validate-probe=198.18.0.9:80",
            "--validate-expect=HTTP/1.",
        ]);
        let c = config(&args).unwrap();
        assert_eq!(c.connect_to, ConnectTo::Tcp("127.0.0.1:5001".into()));
        assert_eq!(c.request_timeout, Duration::from_secs(90));
        assert_eq!(c.dial_timeout, Duration::from_millis(500));
        assert_eq!(c.log_level, tracing::Level::DEBUG);
        assert!(c.watch);
        let v = c.validate.unwrap();
        assert_eq!(v.probe, "198.18.0.9:80".parse().unwrap());
        assert_eq!(v.expect.as_deref(), Some("HTTP/1."));
    }

    #[test]
    fn client_info_labels_fill_gaps_only() {
        let env = |k: &str| match k {
            "POD_NAME" => Some("web-0".to_owned()),
            "NODE_NAME" => Some("node-a".to_owned()),
            _ => None,
        };
        let args = [
            "--insecure",
            "--network-services=kernel://mesh-proxy/nsm-1",
            "--labels=nodeName:explicit",
        ];
        let c = Config::from_cli(&cli(&args), env).unwrap();
        assert_eq!(c.labels["podName"], "web-0");
        assert_eq!(c.labels["nodeName"], "explicit");
        assert!(!c.labels.contains_key("clusterName"));
    }

    #[test]
    fn every_bad_value_is_a_config_error() {
        let cases: &[(&[&str], &str)] = &[
            (&["--insecure"], "NSM_NETWORK_SERVICES is empty"),
            (&["--insecure", "--network-services= , "], "is empty"),
            (
                &["--insecure", "--network-services=mesh-proxy"],
                "NSM_NETWORK_SERVICES",
            ),
            (
                &["--insecure", "--network-services=memif://svc/x"],
                "not supported",
            ),
            (
                &[
                    "--insecure",
                    "--network-services=kernel://a/nsm-1,kernel://b/nsm-1",
                ],
                "used by",
            ),
            (
                &["--network-services=kernel://a/x"],
                "no identity: set SPIFFE_ENDPOINT_SOCKET",
            ),
            (
                &["--insecure=false", "--network-services=kernel://a/x"],
                "no identity",
            ),
            (
                &["--insecure=yes", "--network-services=kernel://a/x"],
                "NSM_INSECURE (--insecure): \"yes\"",
            ),
            (
                &["--svid-cert-file=/c.pem", "--network-services=kernel://a/x"],
                "NSM_SVID_KEY_FILE, NSM_TRUST_BUNDLE_FILE must be set with NSM_SVID_CERT_FILE",
            ),
            (
                &[
                    "--insecure",
                    "--network-services=kernel://a/x",
                    "--request-timeout=15",
                ],
                "NSM_REQUEST_TIMEOUT",
            ),
            (
                &[
                    "--insecure",
                    "--network-services=kernel://a/x",
                    "--dial-timeout=0s",
                ],
                "NSM_DIAL_TIMEOUT must be greater than zero",
            ),
            (
                &[
                    "--insecure",
                    "--network-services=kernel://a/x",
                    "--connect-to=/var/x.sock",
                ],
                "NSM_CONNECT_TO",
            ),
            (
                &[
                    "--insecure",
                    "--network-services=kernel://a/x",
                    "--connect-to=tcp://host",
                ],
                "NSM_CONNECT_TO",
            ),
            (
                &[
                    "--insecure",
                    "--network-services=kernel://a/x",
                    "--labels=novalue",
                ],
                "NSM_LABELS",
            ),
            (
                &[
                    "--insecure",
                    "--network-services=kernel://a/x",
                    "--log-level=loud",
                ],
                "NSM_LOG_LEVEL",
            ),
            (
                &[
                    "--insecure",
                    "--network-services=kernel://a/x",
                    "--validate",
                ],
                "NSC_VALIDATE_PROBE",
            ),
            (
                &[
                    "--insecure",
                    "--network-services=kernel://a/x",
                    "--validate",
                    "--validate-probe=198.18.0.9",
                ],
                "ip:port",
            ),
            (
                &["--insecure", "--network-services=kernel://a/x", "--name= "],
                "NSM_NAME",
            ),
            (
                &[
                    "--insecure",
                    "--network-services=kernel://a/x",
                    "--max-token-lifetime=3s",
                ],
                "NSM_MAX_TOKEN_LIFETIME 3s must be longer than NSM_REQUEST_TIMEOUT 15s",
            ),
            (
                &[
                    "--insecure",
                    "--network-services=kernel://a/x",
                    "--max-token-lifetime=1m",
                    "--request-timeout=60s",
                ],
                "NSM_MAX_TOKEN_LIFETIME 1m must be longer than NSM_REQUEST_TIMEOUT 60s",
            ),
        ];
        for (args, want) in cases {
            let err = config(args).expect_err(&format!("{args:?} accepted"));
            let msg = err.to_string();
            assert!(msg.contains(want), "{args:?}: {msg:?} lacks {want:?}");
            assert!(!msg.contains('\n'), "{args:?}: multi-line {msg:?}");
        }
    }

    #[test]
    fn labels_syntax() {
        let l = parse_labels("a:1, b:x:y ,,").unwrap();
        assert_eq!(l["a"], "1");
        assert_eq!(l["b"], "x:y");
        assert!(parse_labels(":v").is_err());
        assert!(parse_labels("k=v").is_err());
    }
}
