//! `proxy.process`: the proxy the endpoint starts and keeps running itself
//! in placement proxy (one shared by every connection), instead of one
//! started beside it by hand. The mechanism (spawn, readiness, restarts,
//! drain) is [`forwarder_plugin::proxy`]; this is its configuration, the
//! `{{name}}` template of its arguments, and their checks.

use std::collections::BTreeMap;
use std::time::Duration;

use forwarder_plugin::proxy::{ProcessSpec, Readiness};
use serde::Deserialize;

use super::config::ProxyConfig;

const MAX_ARGS: usize = 64;
const MAX_ARG_LEN: usize = 4096;
const MAX_ENV: usize = 64;
const MIN_START: Duration = Duration::from_millis(100);
const MAX_TIMEOUT: Duration = Duration::from_secs(300);

/// How the proxy is run (`proxy.process`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ProcessConfig {
    /// Program and arguments; `{{proxyPort}}` and `{{dnsPort}}` are
    /// replaced by `proxy.port` and `proxy.dnsPort`.
    pub command: Vec<String>,
    /// Its whole environment (nothing of the endpoint's is passed on).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// The uid it runs as (e.g. istio's 1337).
    #[serde(default)]
    pub user: Option<u32>,
    /// The gid it runs as (default: `user`'s number).
    #[serde(default)]
    pub group: Option<u32>,
    /// When it is ready: a TCP port that accepts (default `proxy.port`) or
    /// an HTTP path answering 200 on a port (Envoy's `/ready`).
    #[serde(default)]
    pub ready: ReadyConfig,
    /// Go duration from start to ready (default `10s`).
    #[serde(default = "default_start")]
    pub start_timeout: String,
    /// Go duration from SIGTERM to SIGKILL when it is stopped (default `5s`).
    #[serde(default = "default_drain")]
    pub drain_timeout: String,
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

/// Replaces each `{{name}}` in `text` from `values`; an unknown or
/// unclosed one is an error naming it.
fn render(text: &str, values: &BTreeMap<&str, String>) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = text;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find("}}")
            .ok_or_else(|| format!("{text:?}: \"{{{{\" is never closed"))?;
        let name = after[..end].trim();
        let value = values.get(name).ok_or_else(|| {
            format!(
                "{text:?}: unknown template field {{{{{name}}}}} (known: {})",
                values.keys().copied().collect::<Vec<_>>().join(", ")
            )
        })?;
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
    /// What to run for the proxy `proxy` describes; every check of the
    /// configuration happens here (at load, so a bad one is exit 64).
    pub fn spec(&self, proxy: &ProxyConfig) -> Result<ProcessSpec, String> {
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
        if let Some(bad) = self
            .command
            .iter()
            .chain(self.env.keys())
            .chain(self.env.values())
            .find(|a| a.contains('\0'))
        {
            return Err(format!("{bad:?} contains a NUL byte"));
        }
        let values: BTreeMap<&str, String> = [
            ("proxyPort", proxy.port.0.to_string()),
            ("dnsPort", proxy.dns_port.0.to_string()),
        ]
        .into();
        let argv = self
            .command
            .iter()
            .map(|a| render(a, &values))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("command: {e}"))?;
        let env = self
            .env
            .iter()
            .map(|(k, v)| Ok((k.clone(), render(v, &values)?)))
            .collect::<Result<BTreeMap<_, _>, String>>()
            .map_err(|e| format!("env: {e}"))?;
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
            (None, None) => Readiness::Tcp(proxy.port.0),
        };
        Ok(ProcessSpec {
            argv,
            env,
            uid: self.user,
            gid: self.group.or(self.user),
            ready,
            start_timeout: duration("startTimeout", &self.start_timeout, MIN_START)?,
            drain_timeout: duration("drainTimeout", &self.drain_timeout, Duration::ZERO)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> ProcessConfig {
        serde_norway::from_str(yaml).unwrap()
    }

    #[test]
    fn the_template_fills_the_proxys_ports_and_refuses_what_it_does_not_know() {
        let c = parse(
            "command: [haproxy, -f, /etc/h.cfg, '-p{{proxyPort}}']\nenv: {DNS: '{{ dnsPort }}'}\nuser: 1337\n",
        );
        let s = c.spec(&ProxyConfig::default()).unwrap();
        assert_eq!(s.argv, ["haproxy", "-f", "/etc/h.cfg", "-p15001"]);
        assert_eq!(s.env["DNS"], "15053");
        assert_eq!((s.uid, s.gid), (Some(1337), Some(1337)));
        assert_eq!(s.ready, Readiness::Tcp(15001));
        assert_eq!(s.start_timeout, Duration::from_secs(10));

        let e = parse("command: [envoy, '--id={{connectionId}}']")
            .spec(&ProxyConfig::default())
            .unwrap_err();
        assert!(e.contains("unknown template field {{connectionId}}"), "{e}");
        assert!(e.contains("known: dnsPort, proxyPort"), "{e}");
        let e = parse("command: [envoy, '{{proxyPort']")
            .spec(&ProxyConfig::default())
            .unwrap_err();
        assert!(e.contains("never closed"), "{e}");
    }

    #[test]
    fn readiness_and_timeouts_are_checked() {
        let p = ProxyConfig::default();
        let s = parse("command: [envoy]\nready: {httpGet: {port: 15021, path: /ready}}\n")
            .spec(&p)
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
        ] {
            let e = parse(yaml).spec(&p).unwrap_err();
            assert!(e.contains(want), "{yaml}: {e}");
        }
    }

    #[test]
    fn the_function_config_refuses_a_bad_process_at_load() {
        use super::super::config::{FunctionConfig, FunctionConfigError};
        let bad = |yaml: &str| match FunctionConfig::parse(yaml) {
            Err(FunctionConfigError::Invalid { key, why }) => format!("{key}: {why}"),
            other => panic!("{yaml}: {other:?}"),
        };
        let e = bad("version: 1\nproxy: {process: {command: [envoy, '{{podName}}']}}");
        assert!(
            e.starts_with("proxy.process: command:") && e.contains("podName"),
            "{e}"
        );
        let e = bad("version: 1\nplacement: sidecar\nproxy: {process: {command: [envoy]}}");
        assert!(e.contains("not built yet"), "{e}");
        assert!(FunctionConfig::parse("version: 1\nproxy: {process: {command: [envoy]}}").is_ok());
    }
}
