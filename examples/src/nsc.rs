//! Running `nsc-init` in a client namespace — once (init container) or with
//! `--watch` (sidecar) — and reading its result line:
//! `nsc-init: <url> up: <iface> <src addrs> -> <dst addrs>`.

use std::net::IpAddr;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::namespace::Namespace;
use crate::process::{self, Process, ProcessError};

/// nsc-init's exit codes (nsc-init/README.md).
pub mod exit {
    pub const OK: i32 = 0;
    pub const REFUSED: i32 = 1;
    pub const USAGE: i32 = 2;
    pub const UNREACHABLE: i32 = 3;
    pub const INTERFACE_TIMEOUT: i32 = 4;
    pub const VALIDATE: i32 = 5;
    pub const CONFIG: i32 = 64;
}

/// The demo's network service: the mesh-proxy service, interface `nsm-1`.
pub const DEFAULT_SERVICE: &str = "kernel://mesh-proxy/nsm-1";

#[derive(Debug, thiserror::Error)]
pub enum NscError {
    #[error("cannot run nsc-init in {ns}: {source}")]
    Spawn {
        ns: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Process(#[from] ProcessError),
    #[error("nsc-init in {ns} printed no `up` line: {stdout:?}")]
    NoUpLine { ns: String, stdout: String },
}

/// How to run nsc-init; every field maps to one of its variables.
#[derive(Debug, Clone)]
pub struct NscOptions {
    /// `NSM_NETWORK_SERVICES`.
    pub services: String,
    /// `NSM_NAME` (connection ids are `<name>-<i>`).
    pub name: String,
    /// `NSM_CONNECT_TO`.
    pub connect_to: String,
    /// `NSM_REQUEST_TIMEOUT`.
    pub request_timeout: String,
    /// `NSM_MAX_TOKEN_LIFETIME`; short values make `--watch` refresh often.
    pub token_lifetime: Option<String>,
    pub log_level: String,
    /// More variables (e.g. `NSC_VALIDATE`).
    pub env: Vec<(String, String)>,
    /// The identity variables: `NSM_INSECURE=true` unless given SVID files
    /// ([`crate::lab::Lab::nsc_options`] gives them in a secure lab).
    pub identity: Vec<(String, String)>,
}

impl NscOptions {
    pub fn new(connect_to: &str, name: &str) -> Self {
        NscOptions {
            services: DEFAULT_SERVICE.to_owned(),
            name: name.to_owned(),
            connect_to: connect_to.to_owned(),
            request_timeout: "15s".to_owned(),
            token_lifetime: None,
            log_level: "INFO".to_owned(),
            env: Vec::new(),
            identity: vec![("NSM_INSECURE".to_owned(), "true".to_owned())],
        }
    }

    /// The nsc-init command in `ns`, environment cleared but for `PATH`.
    pub fn command(&self, ns: &Namespace, watch: bool) -> Command {
        let mut cmd = ns.command(process::bin("nsc-init"));
        cmd.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("NSM_NETWORK_SERVICES", &self.services)
            .env("NSM_NAME", &self.name)
            .env("NSM_CONNECT_TO", &self.connect_to)
            .env("NSM_REQUEST_TIMEOUT", &self.request_timeout)
            .env("NSM_LOG_LEVEL", &self.log_level)
            .envs(self.identity.iter().map(|(k, v)| (k, v)));
        if let Some(l) = &self.token_lifetime {
            cmd.env("NSM_MAX_TOKEN_LIFETIME", l);
        }
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        if watch {
            cmd.arg("--watch");
        }
        cmd
    }
}

/// What an `up` line says about one service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Up {
    pub url: String,
    pub iface: String,
    /// The client's addresses (`src_ip_addrs`), with prefix.
    pub src: Vec<String>,
    /// The endpoint side's addresses (`dst_ip_addrs`), with prefix.
    pub dst: Vec<String>,
}

impl Up {
    /// Parses `nsc-init: <url> up: <iface> <src,…> -> <dst,…>`.
    pub fn parse(line: &str) -> Option<Up> {
        let rest = line.trim().strip_prefix("nsc-init: ")?;
        let (url, rest) = rest.split_once(" up: ")?;
        let mut it = rest.split_whitespace();
        let iface = it.next()?.to_owned();
        let words: Vec<&str> = it.collect();
        let arrow = words.iter().position(|w| *w == "->");
        let split = |ws: &[&str]| -> Vec<String> {
            ws.iter()
                .flat_map(|w| w.split(','))
                // nsc-init writes "-" for no addresses.
                .filter(|s| !s.is_empty() && *s != "-")
                .map(str::to_owned)
                .collect()
        };
        let (src, dst) = match arrow {
            Some(i) => (split(&words[..i]), split(&words[i + 1..])),
            None => (split(&words), Vec::new()),
        };
        Some(Up {
            url: url.to_owned(),
            iface,
            src,
            dst,
        })
    }

    /// The client's first address without its prefix length.
    pub fn src_ip(&self) -> Option<IpAddr> {
        ip_of(self.src.first()?)
    }

    /// The endpoint side's first address without its prefix length.
    pub fn dst_ip(&self) -> Option<IpAddr> {
        ip_of(self.dst.first()?)
    }
}

fn ip_of(cidr: &str) -> Option<IpAddr> {
    cidr.split('/').next()?.parse().ok()
}

/// A finished nsc-init run.
#[derive(Debug, Clone)]
pub struct NscRun {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl NscRun {
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// Every `up` line.
    pub fn ups(&self) -> Vec<Up> {
        self.stdout.lines().filter_map(Up::parse).collect()
    }

    /// The last line of stderr (nsc-init's one-line reason on failure).
    pub fn reason(&self) -> &str {
        self.stderr
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("")
    }
}

/// Runs nsc-init to completion in `ns` (the init-container way).
pub fn run(ns: &Namespace, opts: &NscOptions) -> Result<NscRun, NscError> {
    let start = Instant::now();
    let out = opts
        .command(ns, false)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| NscError::Spawn {
            ns: ns.name().to_owned(),
            source,
        })?;
    Ok(NscRun {
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        elapsed: start.elapsed(),
    })
}

/// nsc-init `--watch` in `ns`, logging to `log`, once its `up` line is out.
pub fn watch(
    ns: &Namespace,
    opts: &NscOptions,
    log: &std::path::Path,
    timeout: Duration,
) -> Result<(Process, Up), NscError> {
    let mut proc = Process::spawn("nsc-init --watch", &mut opts.command(ns, true), log)?;
    let line = proc.wait_for_line("an `up` line", timeout, |l| Up::parse(l).is_some())?;
    let up = Up::parse(&line).ok_or_else(|| NscError::NoUpLine {
        ns: ns.name().to_owned(),
        stdout: line.clone(),
    })?;
    Ok((proc, up))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_readme_up_line() {
        let up = Up::parse(
            "nsc-init: kernel://mesh-proxy/nsm-1 up: nsm-1 198.18.0.1/32 -> 198.18.0.0/32",
        )
        .unwrap();
        assert_eq!(up.url, "kernel://mesh-proxy/nsm-1");
        assert_eq!(up.iface, "nsm-1");
        assert_eq!(up.src, ["198.18.0.1/32"]);
        assert_eq!(up.dst, ["198.18.0.0/32"]);
        assert_eq!(up.src_ip(), Some("198.18.0.1".parse().unwrap()));
        assert_eq!(up.dst_ip(), Some("198.18.0.0".parse().unwrap()));
        let two =
            Up::parse("nsc-init: kernel://x up: nsm-1 198.18.0.1/32,fd00::1/128 -> 198.18.0.0/32")
                .unwrap();
        assert_eq!(two.src, ["198.18.0.1/32", "fd00::1/128"]);
        let none = Up::parse("nsc-init: kernel://x up: nsm-1 - -> -").unwrap();
        assert!(none.src.is_empty() && none.dst.is_empty());
        assert!(Up::parse("nsc-init: kernel://x: refused").is_none());
    }
}
