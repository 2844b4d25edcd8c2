//! Starting the mesh proxy in a namespace: HAProxy from Debian's packages,
//! or our own [`crate::transparent_proxy`]. Either listens on istio's
//! capture ports (15001 outbound, 15006 inbound), connects to each
//! connection's original destination, runs as uid/gid 1337 (so the redirect
//! rules let its own connections through) and logs
//! `proxy: <client> -> <destination>` per connection.

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use crate::namespace::Namespace;
use crate::process::{self, Process, ProcessError, WorkDir};
use crate::transparent_proxy::{DEFAULT_PORTS, PROXY_UID};

const READY_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyKind {
    Haproxy,
    /// `transparent-proxy` from this crate.
    Builtin,
}

impl ProxyKind {
    /// HAProxy when it is installed, else ours.
    pub fn auto() -> ProxyKind {
        if haproxy_path().is_some() {
            ProxyKind::Haproxy
        } else {
            ProxyKind::Builtin
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            ProxyKind::Haproxy => "haproxy",
            ProxyKind::Builtin => "builtin",
        }
    }
}

impl FromStr for ProxyKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "haproxy" => Ok(ProxyKind::Haproxy),
            "builtin" => Ok(ProxyKind::Builtin),
            "auto" => Ok(ProxyKind::auto()),
            _ => Err(format!("{s:?}: use haproxy, builtin or auto")),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProxyStartError {
    #[error(
        "haproxy is not installed (bash tests/install-deps.sh installs it; or use --proxy builtin)"
    )]
    NoHaproxy,
    #[error("cannot write the haproxy configuration {path}: {source}")]
    Config {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Process(#[from] ProcessError),
}

/// The `haproxy` binary, from PATH or /usr/sbin.
pub fn haproxy_path() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|d| d.join("haproxy"))
        .find(|p| p.is_file())
}

/// HAProxy as a transparent proxy: in TCP mode a server at `0.0.0.0:0`
/// means "the connection's destination", which HAProxy reads with
/// `SO_ORIGINAL_DST` for NAT-redirected connections.
pub fn haproxy_config(ports: &[u16], uid: u32) -> String {
    let binds: String = ports.iter().map(|p| format!("    bind :{p}\n")).collect();
    format!(
        "global
    log stdout format raw local0 info
    uid {uid}
    gid {uid}
    maxconn 4096

defaults
    mode tcp
    log global
    # one line as soon as the server connection is up, like transparent-proxy's
    option logasap
    log-format \"proxy: %ci:%cp -> %si:%sp\"
    timeout connect 5s
    timeout client 30s
    timeout server 30s

frontend capture
{binds}    default_backend original_destination

backend original_destination
    server original 0.0.0.0:0
"
    )
}

/// Starts the proxy in `ns` and waits until it listens on every capture
/// port. `label` names its files in `dir` (`<label>.log`, `<label>.cfg`).
pub fn start(
    kind: ProxyKind,
    ns: &Namespace,
    dir: &WorkDir,
    label: &str,
) -> Result<Process, ProxyStartError> {
    let log = dir.join(&format!("{label}.log"));
    let mut proc = match kind {
        ProxyKind::Haproxy => {
            let haproxy = haproxy_path().ok_or(ProxyStartError::NoHaproxy)?;
            let cfg = dir.join(&format!("{label}.cfg"));
            std::fs::write(&cfg, haproxy_config(&DEFAULT_PORTS, PROXY_UID)).map_err(|source| {
                ProxyStartError::Config {
                    path: cfg.clone(),
                    source,
                }
            })?;
            // -db: foreground, no master process; it drops to uid 1337 itself.
            let mut cmd = ns.command(haproxy);
            cmd.arg("-db").arg("-f").arg(&cfg);
            Process::spawn("haproxy", &mut cmd, &log)?
        }
        ProxyKind::Builtin => {
            let mut cmd = ns.command(process::bin("transparent-proxy"));
            cmd.args([
                "--uid",
                &PROXY_UID.to_string(),
                "--gid",
                &PROXY_UID.to_string(),
            ]);
            for p in DEFAULT_PORTS {
                cmd.args(["--port", &p.to_string()]);
            }
            Process::spawn("transparent-proxy", &mut cmd, &log)?
        }
    };
    for port in DEFAULT_PORTS {
        wait_listening(&mut proc, port, READY_TIMEOUT)?;
    }
    Ok(proc)
}

/// Waits until `proc`'s namespace has a TCP socket listening on `port`
/// (read from `/proc/<pid>/net/tcp{,6}`: connecting to check would itself
/// be a connection the proxy has to handle).
pub fn wait_listening(
    proc: &mut Process,
    port: u16,
    timeout: Duration,
) -> Result<(), ProcessError> {
    let what = format!("listener on port {port}");
    proc.wait_until(&what, timeout, |p| listening(p.pid(), port).then_some(()))
}

/// Whether the netns of process `pid` has a TCP listener on `port`.
pub fn listening(pid: u32, port: u16) -> bool {
    ["tcp", "tcp6"].iter().any(|f| {
        std::fs::read_to_string(format!("/proc/{pid}/net/{f}"))
            .unwrap_or_default()
            .lines()
            .skip(1)
            .any(|l| {
                let mut cols = l.split_whitespace();
                let local = cols.nth(1).unwrap_or("");
                let state = cols.nth(1).unwrap_or("");
                // state 0A = LISTEN; the local port is hex after the colon.
                state == "0A"
                    && local
                        .rsplit_once(':')
                        .and_then(|(_, p)| u16::from_str_radix(p, 16).ok())
                        == Some(port)
            })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn haproxy_config_binds_every_port_and_drops_to_the_proxy_uid() {
        let c = haproxy_config(&[15001, 15006], 1337);
        assert!(
            c.contains("bind :15001\n") && c.contains("bind :15006\n"),
            "{c}"
        );
        assert!(c.contains("uid 1337") && c.contains("gid 1337"), "{c}");
        assert!(c.contains("server original 0.0.0.0:0"), "{c}");
    }

    #[test]
    fn listening_sees_our_own_listener() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        assert!(listening(std::process::id(), port));
        drop(l);
        assert!(!listening(std::process::id(), port));
    }
}
