//! `forwarder-plugin serve` configuration: NSM's environment names, each
//! also a `--flag` (the flag wins). Every value is read as text and checked
//! here, so a bad one gives one line naming the variable, the flag and what
//! is wrong (exit code 64).

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use crate::hop::BackendName;
use nsm_api::authorize::{Policies, ServerPolicyArgs};
use nsm_api::env::parse_log_level;
use nsm_api::tls::{IdentityArgs, Source, SourceError};

/// `sysexits.h` EX_USAGE: the configuration is wrong.
pub const EXIT_CONFIG: u8 = 64;

pub const DEFAULT_LISTEN_ON: &str = "unix:///var/lib/forwarder-plugin/forwarder.sock";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/forwarder-plugin";

/// Longest unix socket path (`sun_path` is 108 bytes with the NUL).
const MAX_UNIX_PATH: usize = 107;

#[derive(Args, Debug, Clone)]
#[command(
    about = "Serve networkservice.NetworkService as an NSM forwarder hop: veth between the client's and the endpoint's namespaces",
    long_about = "Serve networkservice.NetworkService as a Network Service Mesh forwarder (API v1.15). \
A client (nsc-init, or nsmgr in a cluster) requests a LOCAL/KERNEL connection and passes its network \
namespace fd over the unix socket; the hop forwards the Request to the next hop (the endpoint or \
nsmgr) on a fresh connection, receives the endpoint's namespace fd, and plumbs a veth pair between \
the two namespaces with the endpoint's addresses and routes, plus the client-side redirect rules \
the endpoint asks for in extra_context \"mesh-proxy.v1/client-redirect\".\n\nEvery NSM_* option is \
also read from that environment variable; the flag wins. Invalid configuration exits with 64."
)]
pub struct ServeArgs {
    /// Only check the configuration (environment, flags and the files they name) and exit: 0 if it is valid, 64 with the reason if not.
    #[arg(long, conflicts_with = "probe")]
    pub check_config: bool,

    /// Check the health of the forwarder running at NSM_LISTEN_ON (grpc.health.v1, with this container's identity) and exit: 0 if it is SERVING, 1 with the reason if not. For a Kubernetes exec probe.
    #[arg(long)]
    pub probe: bool,

    /// Name of this hop: its path-segment name and token subject.
    #[arg(long, env = "NSM_NAME", default_value = "forwarder-plugin")]
    pub name: String,

    /// Where to serve: unix:///absolute/path (fd passing needs a unix socket).
    #[arg(long, env = "NSM_LISTEN_ON", default_value = DEFAULT_LISTEN_ON)]
    pub listen_on: String,

    /// The next hop: nsmgr (as NSM's forwarders have it), or the endpoint in a lab: unix:///absolute/path. Required.
    #[arg(long, env = "NSM_CONNECT_TO", value_name = "URL")]
    pub connect_to: Option<String>,

    /// The service this forwarder registers under with NSM_CONNECT_TO's registry (nsmgr finds forwarders by it); registration is skipped when the next hop serves no registry.
    #[arg(long, env = "NSM_SERVICE_NAME", default_value = "forwarder")]
    pub service_name: String,

    /// Labels registered with the forwarder, as k1:v1,k2:v2 (NSM's forwarders: p2p:true).
    #[arg(long, env = "NSM_LABELS", default_value = "p2p:true")]
    pub labels: String,

    /// Unregister on SIGTERM (else the registry expires the registration).
    #[arg(
        long,
        env = "NSM_UNREGISTER_ITSELF",
        value_name = "BOOL",
        default_value = "false",
        num_args = 0..=1,
        default_missing_value = "true"
    )]
    pub unregister_itself: String,

    /// Older name of --connect-to, still read; both set must agree.
    #[arg(long, env = "NSM_NEXT_HOP", value_name = "URL")]
    pub next_hop: Option<String>,

    /// Timeout for dialing the next hop (Go duration: 750ms, 1s).
    #[arg(long, env = "NSM_DIAL_TIMEOUT", default_value = "750ms")]
    pub dial_timeout: String,

    /// Longest a Request may take, next hop included, when the caller sets no shorter deadline.
    #[arg(long, env = "NSM_REQUEST_TIMEOUT", default_value = "15s")]
    pub request_timeout: String,

    /// Lifetime of the tokens this hop issues (Go duration).
    #[arg(long, env = "NSM_MAX_TOKEN_LIFETIME", default_value = "10m")]
    pub max_token_lifetime: String,

    /// NSM's identity settings (SPIFFE Workload API, SVID files, or insecure).
    #[command(flatten)]
    pub identity: IdentityArgs,

    #[command(flatten)]
    pub policies: ServerPolicyArgs,

    #[command(flatten)]
    pub telemetry: nsm_api::telemetry::TelemetryArgs,

    /// Log level: TRACE, DEBUG, INFO, WARN, ERROR (FATAL and PANIC mean ERROR).
    #[arg(long, env = "NSM_LOG_LEVEL", default_value = "INFO")]
    pub log_level: String,

    /// Log lines as text or json (one object per line); SIGUSR1 switches to TRACE, SIGUSR2 back.
    #[arg(long, env = "NSM_LOG_FORMAT", default_value = "text")]
    pub log_format: String,

    /// Where to serve Prometheus metrics (`GET /metrics`), host:port; empty: not served.
    #[arg(long, env = "NSM_METRICS_LISTEN_ON", default_value = "")]
    pub metrics_listen_on: String,

    /// Backend for the client-side redirect rules: nft or iptables.
    #[arg(long, default_value = "nft")]
    pub backend: String,

    /// The state directory (one file per connection): what a restarted hop undoes.
    #[arg(long, default_value = DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,

    /// On SIGTERM/SIGINT, undo every plumbed connection (and Close it downstream) instead of leaving the dataplane for the next start to adopt.
    #[arg(long)]
    pub cleanup_on_exit: bool,

    /// A YAML file of named proxies (version 1, `proxies: {NAME: {command, env, user, group, ready, startTimeout, drainTimeout}}`) this node agent starts inside a client's namespace when an endpoint names one (placement sidecar with an injected proxy); empty: none. Template fields: {{connectionId}}, {{interface}}, {{proxyPort}}, {{inboundPort}}, {{dnsPort}}, {{clientIp}}, {{name}}.
    #[arg(
        long,
        env = "NSM_PROXIES_FILE",
        value_name = "FILE",
        default_value = ""
    )]
    pub proxies: String,

    /// Group (name or number) of the unix socket, which is 0660 in a directory others cannot write to; empty: the process's group.
    #[arg(
        long,
        env = "NSM_SOCKET_GROUP",
        value_name = "GROUP",
        default_value = ""
    )]
    pub socket_group: String,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub name: String,
    pub listen_on: PathBuf,
    pub next_hop: PathBuf,
    pub dial_timeout: Duration,
    pub request_timeout: Duration,
    pub max_token_lifetime: Duration,
    pub log_level: tracing::Level,
    pub log_format: nsm_api::logging::LogFormat,
    /// `NSM_METRICS_LISTEN_ON`, `None` when empty.
    pub metrics_listen_on: Option<std::net::SocketAddr>,
    pub backend: BackendName,
    pub state_dir: PathBuf,
    pub cleanup_on_exit: bool,
    /// Group of the unix socket; `None`: the process's.
    pub socket_group: Option<u32>,
    /// Where our SVID comes from; `Source::Insecure` only when asked.
    pub identity: Source,
    /// `TELEMETRY=true`: where spans go.
    pub telemetry: Option<nsm_api::telemetry::TelemetryConfig>,
    /// What the forwarder registers as (`NSM_SERVICE_NAME`, `NSM_LABELS`).
    pub service_name: String,
    pub labels: std::collections::BTreeMap<String, String>,
    pub unregister_itself: bool,
    /// NSM's policies checked on every caller's path (`NSM_SERVER_POLICIES`).
    pub server_policies: Policies,
    /// The proxies it may start in clients' namespaces (`NSM_PROXIES_FILE`),
    /// and the file, re-read when it changes.
    pub proxies: Option<crate::proxy::ProxyDefinitions>,
    pub proxies_file: Option<PathBuf>,
}

impl ServeConfig {
    pub fn listen_on_url(&self) -> String {
        format!("unix://{}", self.listen_on.display())
    }

    pub fn next_hop_url(&self) -> String {
        format!("unix://{}", self.next_hop.display())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid configuration: {env} (--{flag}): {reason}")]
    Invalid {
        env: &'static str,
        flag: &'static str,
        reason: String,
    },
    #[error("invalid configuration: --{flag}: {reason}")]
    Flag { flag: &'static str, reason: String },
    #[error("invalid configuration: {0}")]
    Identity(#[from] SourceError),
}

fn invalid(env: &'static str, flag: &'static str) -> impl FnOnce(String) -> ConfigError {
    move |reason| ConfigError::Invalid { env, flag, reason }
}

/// `unix:///absolute/path` → the path.
fn parse_unix_url(s: &str, example: &str) -> Result<PathBuf, String> {
    let Some(path) = s.strip_prefix("unix://") else {
        return Err(format!(
            "{s:?}: expected unix:///absolute/path, e.g. {example} (fds only pass over unix sockets)"
        ));
    };
    if !path.starts_with('/') || path.len() < 2 {
        return Err(format!(
            "{s:?}: a unix URL needs an absolute path, e.g. {example}"
        ));
    }
    if path.len() > MAX_UNIX_PATH {
        return Err(format!(
            "{s:?}: unix socket paths are limited to {MAX_UNIX_PATH} bytes"
        ));
    }
    if path.ends_with('/') || path.contains(|c: char| c.is_control()) {
        return Err(format!("{s:?} is not a socket file path"));
    }
    Ok(PathBuf::from(path))
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

fn parse_positive_duration(s: &str) -> Result<Duration, String> {
    match nsm_api::duration::parse(s) {
        Ok(d) if d.is_zero() => Err(format!("{s:?} must be more than 0")),
        Ok(d) => Ok(d),
        Err(e) => Err(e.to_string()),
    }
}

fn parse_backend(s: &str) -> Result<BackendName, String> {
    match s.trim() {
        "nft" => Ok(BackendName::Nft),
        "iptables" => Ok(BackendName::Iptables),
        _ => Err(format!("{s:?} is not a backend: use nft or iptables")),
    }
}

impl TryFrom<ServeArgs> for ServeConfig {
    type Error = ConfigError;

    fn try_from(a: ServeArgs) -> Result<Self, Self::Error> {
        let identity = a.identity.source()?;
        let telemetry = a.telemetry.config().map_err(|e| ConfigError::Flag {
            flag: "telemetry",
            reason: e.to_string(),
        })?;
        let given = |v: &Option<String>| {
            v.as_deref()
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
        };
        let example = "unix:///var/lib/networkservicemesh/nsm.io.sock";
        let next_hop = match (given(&a.connect_to), given(&a.next_hop)) {
            (None, None) => {
                return Err(ConfigError::Invalid {
                    env: "NSM_CONNECT_TO",
                    flag: "connect-to",
                    reason: format!(
                        "is required: nsmgr's (or the endpoint's) socket, e.g. {example}"
                    ),
                });
            }
            (Some(c), Some(n)) if c != n => {
                return Err(ConfigError::Invalid {
                    env: "NSM_NEXT_HOP",
                    flag: "next-hop",
                    reason: format!(
                        "{n:?} is not NSM_CONNECT_TO {c:?}: NSM_NEXT_HOP is its older name; set one"
                    ),
                });
            }
            (Some(c), _) => {
                parse_unix_url(&c, example).map_err(invalid("NSM_CONNECT_TO", "connect-to"))?
            }
            (None, Some(n)) => {
                parse_unix_url(&n, example).map_err(invalid("NSM_NEXT_HOP", "next-hop"))?
            }
        };
        let proxies_file = match a.proxies.trim() {
            "" => None,
            path => Some(PathBuf::from(path)),
        };
        let proxies = match &proxies_file {
            None => None,
            Some(path) => Some(
                crate::proxy::ProxyDefinitions::load(path)
                    .map_err(|e| invalid("NSM_PROXIES_FILE", "proxies")(e.to_string()))?,
            ),
        };
        let cfg = ServeConfig {
            proxies,
            proxies_file,
            name: parse_name(&a.name).map_err(invalid("NSM_NAME", "name"))?,
            listen_on: parse_unix_url(&a.listen_on, DEFAULT_LISTEN_ON)
                .map_err(invalid("NSM_LISTEN_ON", "listen-on"))?,
            next_hop,
            dial_timeout: parse_positive_duration(&a.dial_timeout)
                .map_err(invalid("NSM_DIAL_TIMEOUT", "dial-timeout"))?,
            request_timeout: parse_positive_duration(&a.request_timeout)
                .map_err(invalid("NSM_REQUEST_TIMEOUT", "request-timeout"))?,
            max_token_lifetime: parse_positive_duration(&a.max_token_lifetime)
                .map_err(invalid("NSM_MAX_TOKEN_LIFETIME", "max-token-lifetime"))?,
            log_level: parse_log_level(&a.log_level)
                .map_err(invalid("NSM_LOG_LEVEL", "log-level"))?,
            log_format: a
                .log_format
                .parse()
                .map_err(invalid("NSM_LOG_FORMAT", "log-format"))?,
            metrics_listen_on: match a.metrics_listen_on.trim() {
                "" => None,
                addr => Some(addr.parse().map_err(|e| {
                    invalid("NSM_METRICS_LISTEN_ON", "metrics-listen-on")(format!(
                        "{addr:?}: {e} (expected host:port, e.g. 0.0.0.0:9091)"
                    ))
                })?),
            },
            backend: parse_backend(&a.backend).map_err(|reason| ConfigError::Flag {
                flag: "backend",
                reason,
            })?,
            state_dir: if a.state_dir.is_absolute() {
                a.state_dir
            } else {
                return Err(ConfigError::Flag {
                    flag: "state-dir",
                    reason: format!("{:?} is not an absolute path", a.state_dir),
                });
            },
            cleanup_on_exit: a.cleanup_on_exit,
            socket_group: match a.socket_group.trim() {
                "" => None,
                g => Some(
                    nsm_api::listen::parse_group(g)
                        .map_err(invalid("NSM_SOCKET_GROUP", "socket-group"))?,
                ),
            },
            identity,
            telemetry,
            service_name: parse_name(&a.service_name)
                .map_err(invalid("NSM_SERVICE_NAME", "service-name"))?,
            labels: nsm_api::env::parse_labels(&a.labels)
                .map_err(invalid("NSM_LABELS", "labels"))?,
            unregister_itself: nsm_api::env::parse_bool(&a.unregister_itself)
                .map_err(invalid("NSM_UNREGISTER_ITSELF", "unregister-itself"))?,
            server_policies: a
                .policies
                .policies()
                .map_err(|e| e.to_string())
                .map_err(invalid("NSM_SERVER_POLICIES", "server-policies"))?,
        };
        if cfg.listen_on == cfg.next_hop {
            return Err(ConfigError::Invalid {
                env: "NSM_CONNECT_TO",
                flag: "connect-to",
                reason: format!(
                    "{} is where this hop listens (NSM_LISTEN_ON): it would forward to itself",
                    cfg.next_hop_url()
                ),
            });
        }
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: ServeArgs,
    }

    /// `args` plus `--insecure` and a next hop unless `args` set them.
    fn parse(args: &[&str]) -> Result<ServeConfig, ConfigError> {
        let mut v = vec!["serve"];
        v.extend_from_slice(args);
        if !args.iter().any(|a| a.starts_with("--insecure")) {
            v.push("--insecure");
        }
        if !args.contains(&"--next-hop") && !args.contains(&"--connect-to") {
            v.extend(["--connect-to", "unix:///run/nse.sock"]);
        }
        ServeConfig::try_from(Cli::try_parse_from(v).unwrap().args)
    }

    #[test]
    fn defaults() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.name, "forwarder-plugin");
        assert_eq!(
            c.listen_on,
            PathBuf::from("/var/lib/forwarder-plugin/forwarder.sock")
        );
        assert_eq!(c.next_hop, PathBuf::from("/run/nse.sock"));
        assert_eq!(c.dial_timeout, Duration::from_millis(750));
        assert_eq!(c.request_timeout, Duration::from_secs(15));
        assert_eq!(c.max_token_lifetime, Duration::from_secs(600));
        assert_eq!(c.log_level, tracing::Level::INFO);
        assert_eq!(c.backend, BackendName::Nft);
        assert_eq!(c.state_dir, PathBuf::from(DEFAULT_STATE_DIR));
        assert!(!c.cleanup_on_exit);
        assert_eq!(c.proxies, None);
    }

    #[test]
    fn a_proxies_file_is_read_and_checked_at_start() {
        let dir = std::env::temp_dir().join(format!("fp-proxies-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("proxies.yaml");
        std::fs::write(
            &file,
            "version: 1\nproxies: {haproxy: {command: [haproxy], user: 1337}}\n",
        )
        .unwrap();
        let c = parse(&["--proxies", file.to_str().unwrap()]).unwrap();
        assert_eq!(c.proxies.unwrap().names(), "haproxy");
        std::fs::write(
            &file,
            "version: 1\nproxies: {haproxy: {command: ['{{pod}}']}}\n",
        )
        .unwrap();
        let e = parse(&["--proxies", file.to_str().unwrap()])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("NSM_PROXIES_FILE") && e.contains("unknown template field {{pod}}"),
            "{e}"
        );
        assert!(!e.contains('\n'), "one line: {e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn each_bad_value_names_its_variable_and_flag() {
        let cases: [(&[&str], &str); 11] = [
            (
                &["--listen-on", "tcp://127.0.0.1:5000"],
                "NSM_LISTEN_ON (--listen-on)",
            ),
            (&["--listen-on", "unix://relative"], "absolute path"),
            (
                &["--connect-to", "unix:///run/x/"],
                "NSM_CONNECT_TO (--connect-to)",
            ),
            (
                &["--dial-timeout", "750"],
                "NSM_DIAL_TIMEOUT (--dial-timeout)",
            ),
            (&["--request-timeout", "0"], "must be more than 0"),
            (&["--max-token-lifetime", "10d"], "NSM_MAX_TOKEN_LIFETIME"),
            (&["--log-level", "LOUD"], "NSM_LOG_LEVEL (--log-level)"),
            (&["--backend", "pf"], "--backend"),
            (&["--state-dir", "rel/dir"], "--state-dir"),
            (&["--name", "a b"], "NSM_NAME (--name)"),
            (
                &["--proxies", "/nonexistent/proxies.yaml"],
                "NSM_PROXIES_FILE (--proxies): cannot read /nonexistent/proxies.yaml",
            ),
        ];
        for (args, want) in cases {
            let e = parse(args).unwrap_err().to_string();
            assert!(e.contains(want), "{args:?}: {e}");
            assert!(!e.contains('\n'), "one line: {e}");
        }
    }

    #[test]
    fn next_hop_is_required_and_not_ourselves() {
        let e = ServeConfig::try_from(Cli::try_parse_from(["serve", "--insecure"]).unwrap().args)
            .unwrap_err();
        assert!(
            e.to_string()
                .contains("NSM_CONNECT_TO (--connect-to): is required"),
            "{e}"
        );
        // NSM_NEXT_HOP is the older name: read alone, refused when it disagrees.
        let c = parse(&["--next-hop", "unix:///run/a.sock"]).unwrap();
        assert_eq!(c.next_hop, PathBuf::from("/run/a.sock"));
        let e = parse(&[
            "--next-hop",
            "unix:///run/a.sock",
            "--connect-to",
            "unix:///run/b.sock",
        ])
        .unwrap_err();
        assert!(e.to_string().contains("older name"), "{e}");
        let e = parse(&["--listen-on", "unix:///run/nse.sock"]).unwrap_err();
        assert!(e.to_string().contains("forward to itself"), "{e}");
    }

    #[test]
    fn secure_unless_insecure_is_asked_for() {
        let e = parse(&["--insecure=false"]).unwrap_err();
        assert_eq!(e, ConfigError::Identity(SourceError::None));
        assert!(e.to_string().contains("SPIFFE_ENDPOINT_SOCKET"), "{e}");
        let e = parse(&["--insecure=maybe"]).unwrap_err();
        assert!(e.to_string().contains("NSM_INSECURE (--insecure)"), "{e}");
        assert!(parse(&["--insecure=t"]).is_ok());
    }
}
