//! The mesh-proxy function's configuration file: YAML, `version: 1`,
//! unknown keys refused, every key optional (defaults below). Read from
//! `NSM_CONFIG` / `--config`; without a file the defaults apply.
//!
//! ```yaml
//! version: 1
//! placement: proxy            # proxy | sidecar
//! capture:                    # placement proxy: what the client sends to the proxy
//!   method: auto              # auto | rules | policies
//!   cidrs: [0.0.0.0/0, "::/0"]
//!   excludeCidrs: []
//!   ports: []                 # TCP destination ports (empty: all; policies: 1-32767)
//!   dns: false
//! proxy:                      # placement proxy: the proxy beside the NSE
//!   port: 15001
//!   dnsPort: 15053
//!   mode: redirect            # redirect | tproxy
//!   tproxyMark: 1337
//!   tproxyRouteTable: 133
//! rules:
//!   backend: nft              # nft | iptables
//!   owner: mesh_proxy_nse
//! sidecar: {}                 # placement sidecar: a redirect spec for the client
//! sidecarProxy: haproxy       # placement sidecar: the node agent's proxy to start in the client
//! ```

use std::path::Path;

use forwarder_plugin::hop::BackendName;
use forwarder_plugin::rules::{Owner, Plan};
use ipnet::IpNet;
use nsm_api::contract::capture::{MAX_CIDRS, MAX_EXCLUDE_CIDRS, MAX_PORTS};
use nsm_api::contract::redirect::{Mode, Port, Selection};
use nsm_api::contract::{PortRange, RedirectSpec};
use serde::de::{self, Deserializer};
use serde::{Deserialize, Serialize};

/// The config format version this build reads.
pub const CONFIG_VERSION: u32 = 1;

/// Where the proxy runs, and so who gets rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Placement {
    /// The proxy runs with the NSE, in the NSE's netns: the client routes
    /// the capture CIDRs to the endpoint, whose own rules hand what
    /// arrives on the connection's interface to the proxy.
    #[default]
    Proxy,
    /// The client has its own proxy: the NSE returns a redirect spec for
    /// the client's netns, which the forwarder applies there.
    Sidecar,
}

impl std::str::FromStr for Placement {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "proxy" => Ok(Placement::Proxy),
            "sidecar" => Ok(Placement::Sidecar),
            _ => Err(format!("{s:?} is not a placement: use proxy or sidecar")),
        }
    }
}

impl std::fmt::Display for Placement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Placement::Proxy => "proxy",
            Placement::Sidecar => "sidecar",
        })
    }
}

/// How the client's side captures what goes to the endpoint (placement proxy).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// `rules` when the forwarder announces it applies them
    /// (`forwarder-plugin serve` does), else `policies`.
    #[default]
    Auto,
    /// Exact capture by the forwarder's rules in the client's namespace:
    /// TCP the client starts, marked and routed to the endpoint; replies
    /// to connections it accepted keep its own routes.
    Rules,
    /// What any NSM forwarder installs: `ip_context.policies` (TCP to the
    /// capture ports in a table of their own). Cannot tell replies of
    /// inbound TCP apart (see nse/README.md).
    Policies,
}

impl std::fmt::Display for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Method::Auto => "auto",
            Method::Rules => "rules",
            Method::Policies => "policies",
        })
    }
}

/// What a client in placement proxy sends to the endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct CaptureConfig {
    pub method: Method,
    /// Destinations captured (a prefix only for connections with an
    /// address of its family).
    #[serde(deserialize_with = "de_cidrs")]
    pub cidrs: Vec<IpNet>,
    /// Destinations never captured: e.g. the cluster's node, pod and
    /// service CIDRs when in-cluster traffic should not meet the proxy.
    #[serde(deserialize_with = "de_cidrs")]
    pub exclude_cidrs: Vec<IpNet>,
    /// TCP destination ports captured; empty: every port (method policies:
    /// [`POLICY_DEFAULT_PORTS`]).
    pub ports: Vec<PortRange>,
    /// Also the client's DNS (UDP and TCP port 53), to `proxy.dnsPort`.
    pub dns: bool,
}

/// Method policies without `ports`: below Linux's ephemeral range
/// (32768-60999), so replies to peers that connect from it (kubelet,
/// other pods) are not captured.
pub const POLICY_DEFAULT_PORTS: PortRange = PortRange { lo: 1, hi: 32767 };

impl Default for CaptureConfig {
    /// What the capture spec defaults to: everything of each family, all ports.
    fn default() -> Self {
        let spec = forwarder_plugin::rules::CaptureSpec::default();
        CaptureConfig {
            method: Method::Auto,
            cidrs: spec.cidrs,
            exclude_cidrs: spec.exclude_cidrs,
            ports: spec.ports,
            dns: spec.dns,
        }
    }
}

/// The proxy beside the NSE (placement `proxy`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct ProxyConfig {
    /// Where the proxy listens in the NSE's netns (any transparent proxy:
    /// it finds the original destination with `SO_ORIGINAL_DST`, or as its
    /// local address in TPROXY mode).
    pub port: Port,
    /// Where captured DNS goes (`capture.dns`): a DNS proxy in the NSE's
    /// netns (istio's agent listens on 15053).
    pub dns_port: Port,
    /// `redirect` (NAT) or `tproxy` (the listener needs `IP_TRANSPARENT`).
    pub mode: Mode,
    /// TPROXY only: mark of diverted packets.
    pub tproxy_mark: u32,
    /// TPROXY only: table of the local default route.
    pub tproxy_route_table: u32,
    /// The proxy the endpoint runs and keeps running itself (placement
    /// proxy: one for every connection); without it, one started beside
    /// the endpoint by other means.
    pub process: Option<super::process::ProcessConfig>,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        let spec = RedirectSpec::default();
        ProxyConfig {
            port: Port(15001),
            dns_port: spec.dns_port,
            mode: Mode::Redirect,
            tproxy_mark: spec.tproxy_mark,
            tproxy_route_table: spec.tproxy_route_table,
            process: None,
        }
    }
}

/// How the NSE's own rules are installed.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct RulesConfig {
    pub backend: BackendName,
    /// Name of the nft table (`inet <owner>`) / iptables chains (`<OWNER>_*`).
    #[serde(deserialize_with = "de_owner")]
    pub owner: Owner,
}

impl Default for RulesConfig {
    fn default() -> Self {
        RulesConfig {
            backend: BackendName::Nft,
            owner: Owner::new(DEFAULT_OWNER).expect("valid owner literal"),
        }
    }
}

/// The table the function owns in the NSE's netns.
pub const DEFAULT_OWNER: &str = "mesh_proxy_nse";

/// The whole file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct FunctionConfig {
    pub version: u32,
    /// Default placement; a connection may ask for the other one
    /// (`proxy-placement` label).
    pub placement: Placement,
    /// Placement proxy: what the client sends to the endpoint.
    pub capture: CaptureConfig,
    /// The old name of `capture.cidrs` (read, never written).
    #[serde(default, deserialize_with = "de_some_cidrs")]
    capture_cidrs: Option<Vec<IpNet>>,
    pub proxy: ProxyConfig,
    pub rules: RulesConfig,
    /// Placement sidecar: the redirect spec for the client's netns
    /// (default: istio's sidecar defaults).
    pub sidecar: RedirectSpec,
    /// Placement sidecar: the name of a proxy definition of the node agent
    /// (`forwarder-plugin serve --proxies`) that it starts in each client's
    /// namespace before the Request returns; unset: a proxy already in the
    /// pod serves the redirect.
    pub sidecar_proxy: Option<String>,
}

impl Default for FunctionConfig {
    fn default() -> Self {
        FunctionConfig {
            version: CONFIG_VERSION,
            placement: Placement::Proxy,
            capture: CaptureConfig::default(),
            capture_cidrs: None,
            proxy: ProxyConfig::default(),
            rules: RulesConfig::default(),
            sidecar: RedirectSpec::default(),
            sidecar_proxy: None,
        }
    }
}

/// A configuration that cannot be used; the message names the key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FunctionConfigError {
    #[error("cannot read {path}: {why}")]
    Read { path: String, why: String },
    /// Syntax, unknown key, wrong type (serde names the key path).
    #[error("{0}")]
    Parse(String),
    #[error("version: unsupported config version {0} (this build reads version {CONFIG_VERSION})")]
    Version(u32),
    #[error("{key}: {why}")]
    Invalid { key: &'static str, why: String },
}

impl FunctionConfig {
    /// Reads and validates the file at `path`.
    pub fn load(path: &Path) -> Result<FunctionConfig, FunctionConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| FunctionConfigError::Read {
            path: path.display().to_string(),
            why: e.to_string(),
        })?;
        Self::parse(&text)
    }

    /// Parses and validates YAML (JSON is YAML too); an empty document
    /// means all defaults.
    pub fn parse(text: &str) -> Result<FunctionConfig, FunctionConfigError> {
        let mut cfg: FunctionConfig = if text.trim().is_empty() {
            FunctionConfig::default()
        } else {
            serde_norway::from_str(text)
                .map_err(|e| FunctionConfigError::Parse(one_line(&e.to_string())))?
        };
        if let Some(old) = cfg.capture_cidrs.take() {
            if cfg.capture.cidrs != CaptureConfig::default().cidrs {
                return Err(FunctionConfigError::Invalid {
                    key: "captureCidrs",
                    why: "is the old name of capture.cidrs: set one of them".into(),
                });
            }
            cfg.capture.cidrs = old;
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks what serde cannot: the version and that both rule sets this
    /// configuration can produce are valid.
    pub fn validate(&self) -> Result<(), FunctionConfigError> {
        if self.version != CONFIG_VERSION {
            return Err(FunctionConfigError::Version(self.version));
        }
        let invalid = |key, e: forwarder_plugin::rules::SpecError| FunctionConfigError::Invalid {
            key,
            why: e.to_string(),
        };
        let c = &self.capture;
        for (key, len, max) in [
            ("capture.cidrs", c.cidrs.len(), MAX_CIDRS),
            (
                "capture.excludeCidrs",
                c.exclude_cidrs.len(),
                MAX_EXCLUDE_CIDRS,
            ),
            ("capture.ports", c.ports.len(), MAX_PORTS),
        ] {
            if len > max {
                return Err(FunctionConfigError::Invalid {
                    key,
                    why: format!("{len} entries, at most {max}"),
                });
            }
        }
        if c.dns && self.proxy.port == self.proxy.dns_port {
            return Err(FunctionConfigError::Invalid {
                key: "proxy.dnsPort",
                why: format!("{} is the proxy's port", self.proxy.dns_port),
            });
        }
        if let Some(p) = &self.proxy.process {
            let why = match self.placement {
                Placement::Proxy => super::process::spec(p, &self.proxy)
                    .err()
                    .or_else(|| self.upgrade_slot_error(p)),
                Placement::Sidecar => Some(
                    "runs the shared proxy of placement proxy; for placement sidecar name \
                     the node agent's proxy to start in each client in sidecarProxy"
                        .into(),
                ),
            };
            if let Some(why) = why {
                return Err(FunctionConfigError::Invalid {
                    key: "proxy.process",
                    why,
                });
            }
        }
        self.own_plan(["nsm0".to_owned()], true)
            .map_err(|e| invalid("proxy", e))?;
        Plan::new(&self.sidecar).map_err(|e| invalid("sidecar", e))?;
        if let Some(name) = &self.sidecar_proxy
            && !forwarder_plugin::proxy::config::valid_name(name)
        {
            return Err(FunctionConfigError::Invalid {
                key: "sidecarProxy",
                why: format!(
                    "{name:?} is not a proxy name (lowercase letters, digits and '-', at most {})",
                    forwarder_plugin::proxy::config::MAX_NAME
                ),
            });
        }
        Ok(())
    }

    /// The rules of the NSE's own netns with the connections' `interfaces`
    /// as the members of its interface set ([`Self::own_spec`]), guarded
    /// (what arrives there for another host and is not TCP is refused) and,
    /// with `capture.dns`, DNS arriving there sent to `proxy.dnsPort`: the
    /// same rules for any members, none included.
    /// Why the process could not move to the other ports an upgrade uses
    /// ([`super::shared::slot_ports`]), if it could not.
    fn upgrade_slot_error(&self, p: &super::process::ProcessConfig) -> Option<String> {
        let shift = forwarder_plugin::proxy::UPGRADE_PORT_SHIFT;
        let Some(ports) = super::shared::slot_ports(&self.proxy, true) else {
            return Some(format!(
                "an upgrade moves the proxy to proxy.port and proxy.dnsPort + {shift}, which do not fit: choose lower ports"
            ));
        };
        let moved = FunctionConfig {
            proxy: ports,
            ..self.clone()
        };
        super::process::spec(p, &moved.proxy)
            .and_then(|_| {
                moved
                    .own_plan(["nsm0".to_owned()], true)
                    .map_err(|e| e.to_string())
            })
            .err()
            .map(|e| format!("on the ports an upgrade moves it to (+{shift}): {e}"))
    }

    pub fn own_plan(
        &self,
        interfaces: impl IntoIterator<Item = String>,
        ipv6: bool,
    ) -> Result<Plan, forwarder_plugin::rules::SpecError> {
        let dns = self.capture.dns.then_some(self.proxy.dns_port.0);
        Ok(Plan::for_interfaces(&self.own_spec(ipv6), interfaces)?.with_endpoint_guard(dns))
    }

    /// The redirect spec of the NSE's own netns, for capture restricted to
    /// the connections' interfaces ([`Plan::for_interfaces`]): inbound
    /// capture of everything arriving there to `proxy.port`, nothing else —
    /// no outbound capture, so the proxy's upstream connections leave
    /// directly (the OUTPUT hook gets no chain).
    pub fn own_spec(&self, ipv6: bool) -> RedirectSpec {
        let port = self.proxy.port;
        RedirectSpec {
            mode: self.proxy.mode,
            inbound_port: port,
            // Never used (nothing is captured outbound), but it must differ.
            outbound_port: Port(if port.0 == u16::MAX {
                port.0 - 1
            } else {
                port.0 + 1
            }),
            include_inbound_ports: Selection::All,
            exclude_inbound_ports: Vec::new(),
            include_outbound_cidrs: Selection::List(Vec::new()),
            exclude_outbound_cidrs: Vec::new(),
            include_outbound_ports: Vec::new(),
            exclude_outbound_ports: Vec::new(),
            exclude_interfaces: Vec::new(),
            capture_dns: false,
            ipv6,
            tproxy_mark: self.proxy.tproxy_mark,
            tproxy_route_table: self.proxy.tproxy_route_table,
            // Proxy uid/gid 1337 as in istio; with no OUTPUT chain and no
            // capture on lo they select nothing here.
            ..RedirectSpec::default()
        }
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn de_owner<'de, D: Deserializer<'de>>(d: D) -> Result<Owner, D::Error> {
    let s = String::deserialize(d)?;
    Owner::new(&s).map_err(de::Error::custom)
}

/// A CIDR, or a bare address meaning that one host; host bits are dropped.
pub fn parse_cidr(s: &str) -> Result<IpNet, String> {
    let t = s.trim();
    t.parse::<IpNet>()
        .map(|n| n.trunc())
        .or_else(|_| t.parse::<std::net::IpAddr>().map(IpNet::from))
        .map_err(|_| format!("{s:?} is not a CIDR (e.g. 0.0.0.0/0 or fd00::/8)"))
}

/// One list item, parsed as it is read so the error names its index.
struct CidrItem(IpNet);

impl<'de> Deserialize<'de> for CidrItem {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        parse_cidr(&s).map(CidrItem).map_err(de::Error::custom)
    }
}

fn de_some_cidrs<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<IpNet>>, D::Error> {
    de_cidrs(d).map(Some)
}

fn de_cidrs<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<IpNet>, D::Error> {
    Ok(Vec::<CidrItem>::deserialize(d)?
        .into_iter()
        .map(|c| c.0)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        FunctionConfig::parse(text).unwrap_err().to_string()
    }

    #[test]
    fn defaults_without_a_file_or_with_an_empty_one() {
        for text in ["", "version: 1\n", "{}"] {
            assert_eq!(
                FunctionConfig::parse(text).unwrap(),
                FunctionConfig::default(),
                "{text:?}"
            );
        }
        let d = FunctionConfig::default();
        assert_eq!(d.placement, Placement::Proxy);
        assert_eq!(d.proxy.port, Port(15001));
        assert_eq!(d.proxy.mode, Mode::Redirect);
        assert_eq!(d.rules.backend, BackendName::Nft);
        assert_eq!(d.rules.owner.as_str(), "mesh_proxy_nse");
        let cidrs: Vec<String> = d.capture.cidrs.iter().map(|c| c.to_string()).collect();
        assert_eq!(cidrs, ["0.0.0.0/0", "::/0"]);
        assert_eq!(d.capture.method, Method::Auto);
        assert!(d.capture.exclude_cidrs.is_empty() && d.capture.ports.is_empty());
        assert!(!d.capture.dns);
        assert_eq!(d.proxy.dns_port, Port(15053));
        assert_eq!(d.sidecar, RedirectSpec::default());
    }

    #[test]
    fn every_key() {
        let c = FunctionConfig::parse(
            "version: 1\nplacement: sidecar\n\
             capture: {method: policies, cidrs: [198.19.0.0/16, 'fd00:1::5'], \
             excludeCidrs: [198.19.53.0/24], ports: [80, '8000-8999'], dns: true}\n\
             proxy: {port: 15100, dnsPort: 15153, mode: tproxy, tproxyMark: 0x111, tproxyRouteTable: 100}\n\
             rules: {backend: iptables, owner: mp}\n\
             sidecar: {outboundPort: 15101, excludeOutboundPorts: '22,2222'}\n",
        )
        .unwrap();
        assert_eq!(c.placement, Placement::Sidecar);
        assert_eq!(
            c.capture.cidrs,
            [
                "198.19.0.0/16".parse::<IpNet>().unwrap(),
                "fd00:1::5/128".parse().unwrap()
            ]
        );
        assert_eq!(c.capture.method, Method::Policies);
        assert_eq!(
            c.capture.exclude_cidrs,
            ["198.19.53.0/24".parse::<IpNet>().unwrap()]
        );
        let ports: Vec<String> = c.capture.ports.iter().map(|p| p.to_string()).collect();
        assert_eq!(ports, ["80", "8000-8999"]);
        assert!(c.capture.dns);
        assert_eq!(c.proxy.dns_port, Port(15153));
        assert_eq!(c.proxy.port, Port(15100));
        assert_eq!(c.proxy.mode, Mode::Tproxy);
        assert_eq!(
            (c.proxy.tproxy_mark, c.proxy.tproxy_route_table),
            (0x111, 100)
        );
        assert_eq!(c.rules.backend, BackendName::Iptables);
        assert_eq!(c.rules.owner.as_str(), "mp");
        assert_eq!(c.sidecar.outbound_port, Port(15101));
        assert_eq!(c.sidecar.exclude_outbound_ports, [Port(22), Port(2222)]);
    }

    #[test]
    fn errors_name_the_key_on_one_line() {
        for (text, want) in [
            ("version: 2\n", "version: unsupported config version 2"),
            ("placement: inline\n", "placement: unknown variant `inline`"),
            ("proxy:\n  prot: 1\n", "proxy: unknown field `prot`"),
            ("proxy: {port: 0}\n", "proxy.port: port 0 out of range"),
            (
                "proxy: {port: 70000}\n",
                "proxy.port: port 70000 out of range",
            ),
            (
                "captureCidrs: [10.0.0.0/33]\n",
                "captureCidrs: \"10.0.0.0/33\" is not a CIDR",
            ),
            (
                "capture: {excludeCidrs: [banana]}\n",
                "capture.excludeCidrs: \"banana\" is not a CIDR",
            ),
            (
                "capture: {method: iptables}\n",
                "capture.method: unknown variant `iptables`",
            ),
            ("capture: {ports: ['90-80']}\n", "ends before it starts"),
            (
                "capture: {cidrs: [10.0.0.0/8]}\ncaptureCidrs: [10.0.0.0/8]\n",
                "captureCidrs: is the old name of capture.cidrs",
            ),
            (
                "capture: {dns: true}\nproxy: {dnsPort: 15001}\n",
                "proxy.dnsPort: 15001 is the proxy's port",
            ),
            (
                "rules: {owner: Bad-Name}\n",
                "rules: invalid owner name \"Bad-Name\"",
            ),
            (
                "rules: {backend: pf}\n",
                "rules.backend: unknown variant `pf`",
            ),
            (
                "sidecar: {outboundPrt: 1}\n",
                "sidecar: unknown field `outboundPrt`",
            ),
            (
                "sidecar: {inboundPort: 15001}\n",
                "sidecar: outboundPort and inboundPort are both 15001",
            ),
            (
                "proxy: {mode: tproxy, tproxyMark: 1338}\n",
                "proxy: tproxyMark: 1338 is the mark of the proxy's own hairpin traffic",
            ),
            ("unknown: 1\n", "unknown field `unknown`"),
            ("[1, 2]\n", "invalid type: sequence"),
        ] {
            let e = err(text);
            assert!(e.contains(want), "{text:?}: {e}");
            assert!(!e.contains('\n'), "one line: {e}");
        }
    }

    #[test]
    fn the_deployed_config_map_is_valid() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../deploy/base/nse/nse-config.yaml"
        );
        let cm: serde_norway::Value =
            serde_norway::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let text = cm["data"]["config.yaml"]
            .as_str()
            .expect("data.config.yaml");
        let c = FunctionConfig::parse(text).unwrap_or_else(|e| panic!("{path}: {e}"));
        assert_eq!(c.placement, Placement::Proxy);
        assert_eq!(c.proxy.port, Port(15001));
    }

    #[test]
    fn the_old_capture_cidrs_key_still_reads() {
        let c = FunctionConfig::parse("captureCidrs: [198.19.0.0/16]\n").unwrap();
        let cidrs: Vec<String> = c.capture.cidrs.iter().map(|c| c.to_string()).collect();
        assert_eq!(cidrs, ["198.19.0.0/16"]);
    }

    #[test]
    fn own_plan_captures_only_inbound_on_the_interfaces() {
        let c = FunctionConfig::default();
        let s = c.own_spec(false);
        assert_eq!(s.inbound_port, Port(15001));
        assert_ne!(s.outbound_port, s.inbound_port);
        assert_eq!(s.include_outbound_cidrs, Selection::List(vec![]));
        assert_eq!(s.include_inbound_ports, Selection::All);
        assert!(s.exclude_inbound_ports.is_empty());
        let one = c.own_plan(["nsm-a".to_owned()], false).unwrap();
        let members: Vec<&String> = one.interfaces.iter().flatten().collect();
        assert_eq!(members, ["nsm-a"]);
        // The members never change the rules, not even when there are none.
        let none = c.own_plan([], false).unwrap();
        assert!(none.same_rules(&one));
        assert!(!none.same_rules(&c.own_plan([], true).unwrap()));
        let top = FunctionConfig {
            proxy: ProxyConfig {
                port: Port(u16::MAX),
                ..Default::default()
            },
            ..Default::default()
        };
        top.own_plan(["x".to_owned()], true).unwrap();
    }
}
