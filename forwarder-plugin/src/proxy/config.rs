//! How a proxy is run, as configured: the endpoint's shared proxy
//! (`proxy.process` in the mesh-proxy function's config) and the node
//! agent's named definitions for proxies injected per connection
//! (`forwarder-plugin serve --proxies FILE`). Arguments and environment
//! are `{{field}}` templates; which fields exist depends on who renders
//! them, and an unknown one is refused when the file is loaded.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use super::{ProcessSpec, Readiness};

const MAX_ARGS: usize = 64;
const MAX_ARG_LEN: usize = 4096;
const MAX_ENV: usize = 64;
/// Longest value a field renders to (labels come from the Request).
const MAX_VALUE: usize = 1024;
static EMPTY: String = String::new();
const MIN_START: Duration = Duration::from_millis(100);
const MAX_TIMEOUT: Duration = Duration::from_secs(300);
/// Named definitions in one proxies file.
pub const MAX_PROXIES: usize = 16;
/// Longest proxy name (a DNS label).
pub const MAX_NAME: usize = 63;
/// Largest proxies file read.
const MAX_FILE: u64 = 1 << 20;
/// The proxies file format this build reads.
pub const PROXIES_VERSION: u32 = 1;

/// How a proxy is run.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ProcessConfig {
    /// Program and arguments, each a `{{field}}` template.
    pub command: Vec<String>,
    /// Its whole environment (nothing of ours is passed on), values templated.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// The uid it runs as (e.g. istio's 1337).
    #[serde(default)]
    pub user: Option<u32>,
    /// The gid it runs as (default: `user`'s number).
    #[serde(default)]
    pub group: Option<u32>,
    /// When it is ready: a TCP port that accepts (default: the proxy's
    /// port) or an HTTP path answering 200 on a port (Envoy's `/ready`).
    #[serde(default)]
    pub ready: ReadyConfig,
    /// Go duration from start to ready (default `10s`).
    #[serde(default = "default_start")]
    pub start_timeout: String,
    /// Go duration from the stop signal to SIGKILL when it is stopped
    /// (default `5s`).
    #[serde(default = "default_drain")]
    pub drain_timeout: String,
    /// The signal that asks it to stop and finish what it serves (default
    /// `SIGTERM`; HAProxy's graceful stop is `SIGUSR1`).
    #[serde(default)]
    pub stop_signal: Option<String>,
    /// Resource limits: open files (an rlimit); memory, CPU and processes
    /// (cgroup v2, where the kernel allows it).
    #[serde(default)]
    pub limits: super::limits::LimitsConfig,
}

/// The signals a proxy may be asked to stop with.
const STOP_SIGNALS: [(&str, nix::sys::signal::Signal); 6] = [
    ("SIGTERM", nix::sys::signal::Signal::SIGTERM),
    ("SIGINT", nix::sys::signal::Signal::SIGINT),
    ("SIGQUIT", nix::sys::signal::Signal::SIGQUIT),
    ("SIGHUP", nix::sys::signal::Signal::SIGHUP),
    ("SIGUSR1", nix::sys::signal::Signal::SIGUSR1),
    ("SIGUSR2", nix::sys::signal::Signal::SIGUSR2),
];

fn stop_signal(name: Option<&str>) -> Result<nix::sys::signal::Signal, String> {
    let Some(name) = name else {
        return Ok(nix::sys::signal::Signal::SIGTERM);
    };
    let upper = name.trim().to_ascii_uppercase();
    let full = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    STOP_SIGNALS
        .iter()
        .find(|(n, _)| *n == full)
        .map(|(_, s)| *s)
        .ok_or_else(|| {
            format!(
                "stopSignal: {name:?} is not one of {}",
                STOP_SIGNALS.map(|(n, _)| n).join(", ")
            )
        })
}

fn default_start() -> String {
    "10s".into()
}

fn default_drain() -> String {
    "5s".into()
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ReadyConfig {
    pub tcp_port: Option<u16>,
    pub http_get: Option<HttpGet>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpGet {
    pub port: u16,
    pub path: String,
}

/// The rendered values a template field may take.
pub type Values = BTreeMap<String, String>;

/// Replaces each `{{name}}` in `text` from `values`; an unknown or
/// unclosed one is an error naming it. Where `values` has
/// [`fields::LABELS`], `{{labels.<key>}}` is the connection's label `key`,
/// empty when it has none.
pub fn render(text: &str, values: &Values) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = text;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find("}}")
            .ok_or_else(|| format!("{text:?}: \"{{{{\" is never closed"))?;
        let name = after[..end].trim();
        let label = name
            .strip_prefix(fields::LABEL_PREFIX)
            .filter(|k| !k.is_empty() && values.contains_key(fields::LABELS));
        let value = values.get(name).or(label.map(|_| &EMPTY)).ok_or_else(|| {
            format!(
                "{text:?}: unknown template field {{{{{name}}}}} (known: {})",
                values
                    .keys()
                    .map(String::as_str)
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })?;
        if value.len() > MAX_VALUE {
            return Err(format!(
                "{text:?}: {{{{{name}}}}} is longer than {MAX_VALUE} bytes"
            ));
        }
        out.push_str(value);
        rest = &after[end + 2..];
    }
    out.push_str(rest);
    Ok(out)
}

fn duration(key: &str, text: &str, min: Duration) -> Result<Duration, String> {
    let d = nsm_api::duration::parse(text).map_err(|e| format!("{key}: {e}"))?;
    if d < min || d > MAX_TIMEOUT {
        return Err(format!(
            "{key}: {text:?} is outside {min:?}..{MAX_TIMEOUT:?}"
        ));
    }
    Ok(d)
}

impl ProcessConfig {
    /// What to run, with every `{{field}}` taken from `values`;
    /// `proxy_port` is the readiness port when none is configured. Every
    /// check of the configuration happens here.
    pub fn spec(&self, values: &Values, proxy_port: u16) -> Result<ProcessSpec, String> {
        if self.command.is_empty() || self.command[0].trim().is_empty() {
            return Err("command: give the program and its arguments".into());
        }
        if self.command.len() > MAX_ARGS || self.command.iter().any(|a| a.len() > MAX_ARG_LEN) {
            return Err(format!(
                "command: at most {MAX_ARGS} arguments of at most {MAX_ARG_LEN} bytes"
            ));
        }
        if self.env.len() > MAX_ENV {
            return Err(format!("env: at most {MAX_ENV} variables"));
        }
        let argv = self
            .command
            .iter()
            .map(|a| render(a, values))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("command: {e}"))?;
        let env = self
            .env
            .iter()
            .map(|(k, v)| Ok((k.clone(), render(v, values)?)))
            .collect::<Result<BTreeMap<_, _>, String>>()
            .map_err(|e| format!("env: {e}"))?;
        if let Some(bad) = argv
            .iter()
            .chain(env.keys())
            .chain(env.values())
            .find(|a| a.contains('\0'))
        {
            return Err(format!("{bad:?} contains a NUL byte"));
        }
        let ready = match (&self.ready.tcp_port, &self.ready.http_get) {
            (Some(_), Some(_)) => {
                return Err("ready: tcpPort or httpGet, not both".into());
            }
            (Some(p), None) => Readiness::Tcp(*p),
            (None, Some(h)) if h.path.starts_with('/') && !h.path.contains(char::is_whitespace) => {
                Readiness::Http {
                    port: h.port,
                    path: h.path.clone(),
                }
            }
            (None, Some(h)) => {
                return Err(format!(
                    "ready.httpGet.path: {:?} is not an absolute path",
                    h.path
                ));
            }
            (None, None) => Readiness::Tcp(proxy_port),
        };
        Ok(ProcessSpec {
            argv,
            env,
            uid: self.user,
            gid: self.group.or(self.user),
            ready,
            start_timeout: duration("startTimeout", &self.start_timeout, MIN_START)?,
            drain_timeout: duration("drainTimeout", &self.drain_timeout, Duration::ZERO)?,
            stop_signal: stop_signal(self.stop_signal.as_deref())?,
            limits: self.limits.check()?,
        })
    }

    /// Checks the configuration for a renderer that knows `fields`
    /// (rendered with placeholder values).
    pub fn check(&self, fields: &[&str]) -> Result<(), String> {
        let values = fields
            .iter()
            .map(|f| ((*f).to_owned(), "1".to_owned()))
            .collect();
        self.spec(&values, 1).map(|_| ())
    }
}

/// The fields a proxy injected into a client's namespace is rendered with.
pub mod fields {
    /// The connection's id at the hop.
    pub const CONNECTION_ID: &str = "connectionId";
    /// The client's NSM interface (e.g. `nsm-1`).
    pub const INTERFACE: &str = "interface";
    /// The redirect spec's outbound port (where captured outbound TCP goes).
    pub const PROXY_PORT: &str = "proxyPort";
    /// The redirect spec's inbound port.
    pub const INBOUND_PORT: &str = "inboundPort";
    /// The redirect spec's DNS port.
    pub const DNS_PORT: &str = "dnsPort";
    /// The client's first address on the interface, without its prefix.
    pub const CLIENT_IP: &str = "clientIp";
    /// The definition's name.
    pub const NAME: &str = "name";
    /// Present among the values: `{{labels.<key>}}` is the connection's
    /// label `key` (NSM's `podName`, `nodeName`, the nsurl's query).
    pub const LABELS: &str = "labels.*";
    pub const LABEL_PREFIX: &str = "labels.";
    pub const ALL: [&str; 8] = [
        CONNECTION_ID,
        INTERFACE,
        PROXY_PORT,
        INBOUND_PORT,
        DNS_PORT,
        CLIENT_IP,
        NAME,
        LABELS,
    ];
}

/// A proxies file (`forwarder-plugin serve --proxies`): the proxies the
/// node agent may start in a client's namespace, by name. An endpoint
/// only names one; the command never travels in a Request.
///
/// ```yaml
/// version: 1
/// proxies:
///   haproxy:
///     command: [haproxy, -db, -f, /etc/mesh-proxy/haproxy.cfg]
///     user: 1337
///     ready: {tcpPort: 15001}
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyDefinitions {
    pub version: u32,
    pub proxies: BTreeMap<String, ProcessConfig>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProxiesFileError {
    #[error("cannot read {path}: {why}")]
    Read { path: String, why: String },
    #[error("{path}: {why}")]
    Invalid { path: String, why: String },
}

/// Whether `name` can name a proxy: a DNS label.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

impl ProxyDefinitions {
    /// Reads and checks `path` (at most 1 MiB is read).
    pub fn load(path: &Path) -> Result<ProxyDefinitions, ProxiesFileError> {
        use std::io::Read;
        let shown = path.display().to_string();
        let read = |why: std::io::Error| ProxiesFileError::Read {
            path: shown.clone(),
            why: why.to_string(),
        };
        let mut text = String::new();
        std::fs::File::open(path)
            .map_err(read)?
            .take(MAX_FILE + 1)
            .read_to_string(&mut text)
            .map_err(read)?;
        if text.len() as u64 > MAX_FILE {
            return Err(ProxiesFileError::Invalid {
                path: shown,
                why: format!("larger than {MAX_FILE} bytes"),
            });
        }
        Self::parse(&text).map_err(|why| ProxiesFileError::Invalid { path: shown, why })
    }

    pub fn parse(text: &str) -> Result<ProxyDefinitions, String> {
        let defs: ProxyDefinitions = serde_norway::from_str(text).map_err(|e| e.to_string())?;
        if defs.version != PROXIES_VERSION {
            return Err(format!(
                "version: {} is not a proxies file version this build reads ({PROXIES_VERSION})",
                defs.version
            ));
        }
        if defs.proxies.len() > MAX_PROXIES {
            return Err(format!("proxies: at most {MAX_PROXIES}"));
        }
        for (name, p) in &defs.proxies {
            if !valid_name(name) {
                return Err(format!(
                    "proxies: {name:?} is not a name (lowercase letters, digits and '-', at most {MAX_NAME})"
                ));
            }
            p.check(&fields::ALL)
                .map_err(|e| format!("proxies.{name}: {e}"))?;
        }
        Ok(defs)
    }

    pub fn get(&self, name: &str) -> Option<&ProcessConfig> {
        self.proxies.get(name)
    }

    /// The names, comma-separated (what the hop announces).
    pub fn names(&self) -> String {
        self.proxies.keys().cloned().collect::<Vec<_>>().join(",")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> ProcessConfig {
        serde_norway::from_str(yaml).unwrap()
    }

    fn values(v: &[(&str, &str)]) -> Values {
        v.iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn ports() -> Values {
        values(&[("proxyPort", "15001"), ("dnsPort", "15053")])
    }

    #[test]
    fn the_template_fills_known_fields_and_refuses_what_it_does_not_know() {
        let c = parse(
            "command: [haproxy, -f, /etc/h.cfg, '-p{{proxyPort}}']\nenv: {DNS: '{{ dnsPort }}'}\nuser: 1337\n",
        );
        let s = c.spec(&ports(), 15001).unwrap();
        assert_eq!(s.argv, ["haproxy", "-f", "/etc/h.cfg", "-p15001"]);
        assert_eq!(s.env["DNS"], "15053");
        assert_eq!((s.uid, s.gid), (Some(1337), Some(1337)));
        assert_eq!(s.ready, Readiness::Tcp(15001));
        assert_eq!(s.start_timeout, Duration::from_secs(10));
        assert_eq!(s.stop_signal, nix::sys::signal::Signal::SIGTERM);
        let graceful = parse("command: [haproxy]\nstopSignal: usr1\n");
        assert_eq!(
            graceful.spec(&ports(), 1).unwrap().stop_signal,
            nix::sys::signal::Signal::SIGUSR1
        );

        let e = parse("command: [envoy, '--id={{connectionId}}']")
            .spec(&ports(), 1)
            .unwrap_err();
        assert!(e.contains("unknown template field {{connectionId}}"), "{e}");
        assert!(e.contains("known: dnsPort, proxyPort"), "{e}");
        let e = parse("command: [envoy, '{{proxyPort']")
            .spec(&ports(), 1)
            .unwrap_err();
        assert!(e.contains("never closed"), "{e}");
        assert!(
            parse("command: [envoy, '--id={{connectionId}}']")
                .check(&fields::ALL)
                .is_ok()
        );
    }

    #[test]
    fn readiness_and_timeouts_are_checked() {
        let s = parse("command: [envoy]\nready: {httpGet: {port: 15021, path: /ready}}\n")
            .spec(&ports(), 1)
            .unwrap();
        assert_eq!(
            s.ready,
            Readiness::Http {
                port: 15021,
                path: "/ready".into()
            }
        );
        for (yaml, want) in [
            ("command: []", "command:"),
            (
                "command: [x]\nready: {tcpPort: 1, httpGet: {port: 2, path: /}}",
                "not both",
            ),
            (
                "command: [x]\nready: {httpGet: {port: 2, path: ready}}",
                "absolute path",
            ),
            ("command: [x]\nstartTimeout: 1ms", "startTimeout"),
            ("command: [x]\ndrainTimeout: 1h", "drainTimeout"),
            ("command: [x]\nstartTimeout: soon", "startTimeout"),
            ("command: [x]\nstopSignal: SIGKILL", "stopSignal"),
        ] {
            let e = parse(yaml).spec(&ports(), 1).unwrap_err();
            assert!(e.contains(want), "{yaml}: {e}");
        }
    }

    #[test]
    fn a_rendered_value_with_a_nul_byte_is_refused() {
        let e = parse("command: [envoy, '--id={{connectionId}}']")
            .spec(&values(&[("connectionId", "a\0b")]), 1)
            .unwrap_err();
        assert!(e.contains("NUL"), "{e}");
    }

    #[test]
    fn labels_render_where_the_renderer_offers_them_and_are_bounded() {
        let c = parse("command: [envoy, '--service-node={{labels.podName}}', '{{labels.zone}}']");
        // The endpoint's shared proxy has no connection, so no labels.
        let e = c.check(&["proxyPort"]).unwrap_err();
        assert!(
            e.contains("unknown template field {{labels.podName}}"),
            "{e}"
        );
        c.check(&fields::ALL).unwrap();
        let with = |pod: &str| values(&[(fields::LABELS, ""), ("labels.podName", pod)]);
        let s = c.spec(&with("web-1"), 1).unwrap();
        assert_eq!(
            s.argv,
            ["envoy", "--service-node=web-1", ""],
            "an absent label is empty"
        );
        let e = c.spec(&with(&"x".repeat(MAX_VALUE + 1)), 1).unwrap_err();
        assert!(e.contains("longer than"), "{e}");
        assert!(
            parse("command: ['{{labels.}}']")
                .check(&fields::ALL)
                .is_err()
        );
    }

    #[test]
    fn a_proxies_file_names_checked_definitions() {
        let d = ProxyDefinitions::parse(
            "version: 1\nproxies:\n  haproxy: {command: [haproxy, -f, '/etc/{{name}}.cfg'], user: 1337}\n  envoy: {command: [envoy, '--service-node={{connectionId}}']}\n",
        )
        .unwrap();
        assert_eq!(d.names(), "envoy,haproxy");
        assert_eq!(d.get("haproxy").unwrap().user, Some(1337));
        for (yaml, want) in [
            ("version: 2\nproxies: {}", "version"),
            (
                "version: 1\nproxies: {Bad_Name: {command: [x]}}",
                "not a name",
            ),
            (
                "version: 1\nproxies: {p: {command: ['{{podName}}']}}",
                "proxies.p: command:",
            ),
            ("version: 1\nproxies: {p: {command: [x], usr: 1}}", "usr"),
            ("version: 1\nproxis: {}", "proxis"),
        ] {
            let e = ProxyDefinitions::parse(yaml).unwrap_err();
            assert!(e.contains(want), "{yaml}: {e}");
        }
        let many: String = (0..=MAX_PROXIES)
            .map(|i| format!("  p{i}: {{command: [x]}}\n"))
            .collect();
        let e = ProxyDefinitions::parse(&format!("version: 1\nproxies:\n{many}")).unwrap_err();
        assert!(e.contains("at most"), "{e}");
    }

    #[test]
    fn names_are_dns_labels() {
        assert!(valid_name("haproxy") && valid_name("envoy-1-28"));
        for bad in ["", "-a", "a-", "A", "a_b", "a.b", &"x".repeat(64)] {
            assert!(!valid_name(bad), "{bad:?}");
        }
    }
}
