//! The redirect spec: which traffic of a namespace goes through the mesh
//! proxy. Field names and defaults mirror istio's sidecar options (istio-cni
//! plugin defaults); the spec travels as JSON (NSM `extra_context`) or YAML
//! (files), so it carries a `version` and rejects unknown fields.

use std::collections::BTreeSet;
use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::ser::{SerializeSeq, Serializer};
use serde::{Deserialize, Serialize};

/// The spec version this build reads and writes. A spec without `version`
/// is read as this version; any other value is rejected, so an endpoint and a
/// forwarder of different builds never silently disagree on field meaning.
pub const SPEC_VERSION: u32 = 1;

/// Mark the proxy's own hairpin traffic gets in TPROXY mode (istio's
/// `OutboundMark`); it must differ from `tproxyMark` and the bypass mark.
pub const OUTBOUND_MARK: u32 = 1338;

/// How inbound traffic reaches the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// NAT REDIRECT to `inboundPort` (the proxy reads `SO_ORIGINAL_DST`).
    #[default]
    #[serde(alias = "REDIRECT")]
    Redirect,
    /// TPROXY to `inboundPort` plus an `ip rule fwmark … lookup <table>` and a
    /// local default route: the proxy sees the original addresses on an
    /// `IP_TRANSPARENT` socket. Outbound capture stays NAT REDIRECT.
    #[serde(alias = "TPROXY")]
    Tproxy,
}

/// A TCP/UDP port, 1-65535.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct Port(pub u16);

/// A packet mark and mask (`0x539/0xfff`); a packet matches when
/// `mark & mask == value`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Mark {
    pub value: u32,
    pub mask: u32,
}

/// `"*"` (everything) or an explicit list (possibly empty = nothing).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection<T> {
    All,
    List(Vec<T>),
}

pub type PortSelection = Selection<Port>;
pub type CidrSelection = Selection<IpNet>;

/// The redirect spec (version 1). Unset fields take istio's defaults.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct RedirectSpec {
    /// Spec format version, [`SPEC_VERSION`].
    pub version: u32,
    pub mode: Mode,
    /// Where outbound TCP is redirected (istio `-p`, 15001).
    pub outbound_port: Port,
    /// Where inbound TCP is redirected (istio `-z`, 15006).
    pub inbound_port: Port,
    /// Sockets owned by these uids are the proxy's: never redirected
    /// (istio `-u`, 1337).
    pub proxy_uids: Vec<u32>,
    /// Same by group (istio `-g`, 1337).
    pub proxy_gids: Vec<u32>,
    /// Packets carrying this socket mark are the proxy's (ambient-style
    /// `SO_MARK` bypass, e.g. `0x539/0xfff`); unset by default.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bypass_mark: Option<Mark>,
    /// Outbound destinations to capture (istio `-i`, `*`).
    #[serde(with = "cidr_selection")]
    pub include_outbound_cidrs: CidrSelection,
    /// Outbound destinations never captured, checked before the includes
    /// (istio `-x`; `*` is an error).
    #[serde(with = "cidr_list")]
    pub exclude_outbound_cidrs: Vec<IpNet>,
    /// Inbound ports to capture (istio `-b`, `*`).
    #[serde(with = "port_selection")]
    pub include_inbound_ports: PortSelection,
    /// Inbound ports never captured when `includeInboundPorts` is `*`
    /// (istio `-d`; 15008 is istio's tunnel port, which istio always skips).
    #[serde(with = "port_list")]
    pub exclude_inbound_ports: Vec<Port>,
    /// Outbound ports captured whatever the destination (istio `-q`).
    #[serde(with = "port_list")]
    pub include_outbound_ports: Vec<Port>,
    /// Outbound ports (TCP and UDP) never captured (istio `-o`).
    #[serde(with = "port_list")]
    pub exclude_outbound_ports: Vec<Port>,
    /// Traffic in or out of these interfaces is never captured (istio `-c`).
    pub exclude_interfaces: Vec<String>,
    /// When non-empty, inbound capture applies only to traffic arriving on
    /// these interfaces (and the proxy's loopback hairpin only when `lo` is
    /// listed): an endpoint that proxies what its clients send over their
    /// own links. Not serialised when empty, so a spec that does not use it
    /// still reads in builds that predate it.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub include_interfaces: Vec<String>,
    /// Redirect DNS (UDP and TCP port 53) to `dnsPort`, with istio's
    /// conntrack-zone split so UDP replies cannot bypass the NAT.
    #[serde(rename = "captureDns", alias = "captureDNS")]
    pub capture_dns: bool,
    pub dns_port: Port,
    /// Also capture IPv6 (ip6tables / `ip6` rules); off by default as in
    /// istio, where it follows the pod's addresses.
    pub ipv6: bool,
    /// Drop packets conntrack marks INVALID (istio `INVALID_DROP`).
    pub drop_invalid: bool,
    /// TPROXY only: mark of diverted packets (istio `-t`, 1337); a number
    /// or a string such as `"0x539"`.
    #[serde(deserialize_with = "de_plain_mark")]
    pub tproxy_mark: u32,
    /// TPROXY only: route table with the local default route (istio `-r`, 133).
    pub tproxy_route_table: u32,
}

impl Default for RedirectSpec {
    fn default() -> Self {
        RedirectSpec {
            version: SPEC_VERSION,
            mode: Mode::Redirect,
            outbound_port: Port(15001),
            inbound_port: Port(15006),
            proxy_uids: vec![1337],
            proxy_gids: vec![1337],
            bypass_mark: None,
            include_outbound_cidrs: Selection::All,
            exclude_outbound_cidrs: Vec::new(),
            include_inbound_ports: Selection::All,
            exclude_inbound_ports: [15008, 15020, 15021, 15090].map(Port).to_vec(),
            include_outbound_ports: Vec::new(),
            exclude_outbound_ports: vec![Port(15020)],
            exclude_interfaces: Vec::new(),
            include_interfaces: Vec::new(),
            capture_dns: false,
            dns_port: Port(15053),
            ipv6: false,
            drop_invalid: false,
            tproxy_mark: 1337,
            tproxy_route_table: 133,
        }
    }
}

/// Why a spec was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    /// Syntax, unknown field, wrong type or an out-of-range value (the message
    /// names the field or position).
    #[error("{0}")]
    Parse(String),
    #[error("unsupported spec version {found} (this build reads version {SPEC_VERSION})")]
    Version { found: u32 },
    #[error("{field}: port 0 is not a port (1-65535)")]
    ZeroPort { field: &'static str },
    #[error("{a} and {b} are both {port}: the proxy needs a distinct port for each")]
    PortClash {
        a: &'static str,
        b: &'static str,
        port: u16,
    },
    #[error(
        "no way to tell the proxy's own traffic from the application's: set proxyUids, \
         proxyGids or bypassMark, or the proxy's connections would loop back into it"
    )]
    NoProxyIdentity,
    #[error("{field}: {value} is not a usable id (4294967295 means 'no id' to the kernel)")]
    BadId { field: &'static str, value: u32 },
    #[error("{field}: {why}")]
    Mark { field: &'static str, why: String },
    #[error("tproxyRouteTable: {0} is reserved (0 unspec, 253 default, 254 main, 255 local)")]
    RouteTable(u32),
    #[error("{field}: {cidr} is an IPv6 prefix but ipv6 is false")]
    Ipv6Disabled { field: &'static str, cidr: IpNet },
    #[error("{field}: {why}")]
    Interface { field: &'static str, why: String },
}

impl RedirectSpec {
    /// Parses JSON (text starting with `{`) or YAML, then validates.
    pub fn parse(text: &str) -> Result<RedirectSpec, SpecError> {
        if text.trim_start().starts_with('{') {
            Self::from_json(text)
        } else {
            Self::from_yaml(text)
        }
    }

    pub fn from_json(text: &str) -> Result<RedirectSpec, SpecError> {
        let spec: RedirectSpec =
            serde_json::from_str(text).map_err(|e| SpecError::Parse(e.to_string()))?;
        spec.validate()?;
        Ok(spec)
    }

    pub fn from_yaml(text: &str) -> Result<RedirectSpec, SpecError> {
        // An empty document means "all defaults".
        let spec: RedirectSpec = if text.trim().is_empty() {
            RedirectSpec::default()
        } else {
            serde_norway::from_str(text).map_err(|e| SpecError::Parse(e.to_string()))?
        };
        spec.validate()?;
        Ok(spec)
    }

    /// Compact JSON, the form that travels in NSM `extra_context`.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a spec always serialises")
    }

    /// Checks everything serde cannot: value ranges of values built in code,
    /// and combinations that cannot work. Called by every constructor above
    /// and by forwarder-plugin's `Plan::new`, so nothing invalid reaches a kernel.
    pub fn validate(&self) -> Result<(), SpecError> {
        if self.version != SPEC_VERSION {
            return Err(SpecError::Version {
                found: self.version,
            });
        }
        let single = [
            ("outboundPort", self.outbound_port),
            ("inboundPort", self.inbound_port),
            ("dnsPort", self.dns_port),
        ];
        for (field, port) in single {
            if port.0 == 0 {
                return Err(SpecError::ZeroPort { field });
            }
        }
        let lists: [(&'static str, &[Port]); 4] = [
            ("excludeInboundPorts", &self.exclude_inbound_ports),
            ("includeOutboundPorts", &self.include_outbound_ports),
            ("excludeOutboundPorts", &self.exclude_outbound_ports),
            (
                "includeInboundPorts",
                match &self.include_inbound_ports {
                    Selection::All => &[],
                    Selection::List(l) => l,
                },
            ),
        ];
        for (field, list) in lists {
            if list.iter().any(|p| p.0 == 0) {
                return Err(SpecError::ZeroPort { field });
            }
        }
        if self.outbound_port == self.inbound_port {
            return Err(SpecError::PortClash {
                a: "outboundPort",
                b: "inboundPort",
                port: self.outbound_port.0,
            });
        }
        if self.capture_dns {
            for (other, port) in [
                ("outboundPort", self.outbound_port),
                ("inboundPort", self.inbound_port),
            ] {
                if port == self.dns_port {
                    return Err(SpecError::PortClash {
                        a: "dnsPort",
                        b: other,
                        port: port.0,
                    });
                }
            }
        }
        if self.proxy_uids.is_empty() && self.proxy_gids.is_empty() && self.bypass_mark.is_none() {
            return Err(SpecError::NoProxyIdentity);
        }
        for (field, ids) in [
            ("proxyUids", &self.proxy_uids),
            ("proxyGids", &self.proxy_gids),
        ] {
            if let Some(&value) = ids.iter().find(|&&v| v == u32::MAX) {
                return Err(SpecError::BadId { field, value });
            }
        }
        self.validate_marks()?;
        self.validate_cidrs()?;
        for (field, names) in [
            ("excludeInterfaces", &self.exclude_interfaces),
            ("includeInterfaces", &self.include_interfaces),
        ] {
            for name in names {
                validate_interface(name).map_err(|why| SpecError::Interface { field, why })?;
            }
        }
        Ok(())
    }

    fn validate_marks(&self) -> Result<(), SpecError> {
        if let Some(m) = self.bypass_mark {
            let bad = |why: String| SpecError::Mark {
                field: "bypassMark",
                why,
            };
            if m.mask == 0 || m.value == 0 {
                return Err(bad(format!(
                    "{m} matches unmarked packets too: value and mask must be non-zero"
                )));
            }
            if m.value & !m.mask != 0 {
                return Err(bad(format!(
                    "{m} can never match: the value has bits outside the mask"
                )));
            }
        }
        if self.mode != Mode::Tproxy {
            return Ok(());
        }
        let tproxy = |why: String| SpecError::Mark {
            field: "tproxyMark",
            why,
        };
        if self.tproxy_mark == 0 {
            return Err(tproxy("0 cannot mark diverted packets".into()));
        }
        if self.tproxy_mark == OUTBOUND_MARK {
            return Err(tproxy(format!(
                "{OUTBOUND_MARK} is the mark of the proxy's own hairpin traffic"
            )));
        }
        if let Some(m) = self.bypass_mark {
            for taken in [self.tproxy_mark, OUTBOUND_MARK] {
                if taken & m.mask == m.value {
                    return Err(tproxy(format!(
                        "packets marked {taken:#x} would also match bypassMark {m}"
                    )));
                }
            }
        }
        if matches!(self.tproxy_route_table, 0 | 253..=255) {
            return Err(SpecError::RouteTable(self.tproxy_route_table));
        }
        Ok(())
    }

    fn validate_cidrs(&self) -> Result<(), SpecError> {
        if self.ipv6 {
            return Ok(());
        }
        let include = match &self.include_outbound_cidrs {
            Selection::All => &[][..],
            Selection::List(l) => l,
        };
        for (field, list) in [
            ("includeOutboundCidrs", include),
            ("excludeOutboundCidrs", &self.exclude_outbound_cidrs[..]),
        ] {
            if let Some(cidr) = list.iter().find(|c| matches!(c, IpNet::V6(_))) {
                return Err(SpecError::Ipv6Disabled { field, cidr: *cidr });
            }
        }
        Ok(())
    }

    /// A copy with lists sorted or de-duplicated where order carries no
    /// meaning and prefixes truncated to their network address (as iptables
    /// does), so equal intents produce equal rules.
    pub fn normalized(&self) -> RedirectSpec {
        fn dedup<T: Ord + Clone>(v: &[T]) -> Vec<T> {
            let mut seen = BTreeSet::new();
            v.iter()
                .filter(|x| seen.insert((*x).clone()))
                .cloned()
                .collect()
        }
        let nets = |v: &[IpNet]| dedup(&v.iter().map(|n| n.trunc()).collect::<Vec<_>>());
        let mut s = self.clone();
        s.proxy_uids = dedup(&s.proxy_uids);
        s.proxy_gids = dedup(&s.proxy_gids);
        s.exclude_outbound_cidrs = nets(&s.exclude_outbound_cidrs);
        if let Selection::List(l) = &s.include_outbound_cidrs {
            s.include_outbound_cidrs = Selection::List(nets(l));
        }
        if let Selection::List(l) = &s.include_inbound_ports {
            s.include_inbound_ports = Selection::List(dedup(l));
        }
        s.exclude_inbound_ports = dedup(&s.exclude_inbound_ports);
        s.include_outbound_ports = dedup(&s.include_outbound_ports);
        s.exclude_outbound_ports = dedup(&s.exclude_outbound_ports);
        s.exclude_interfaces = dedup(&s.exclude_interfaces);
        // One capture rule per interface: sorted, so the same set of
        // interfaces always gives the same rules whatever order it came in.
        s.include_interfaces = s
            .include_interfaces
            .iter()
            .cloned()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        s
    }
}

/// Interface names end up in nft and iptables-restore text: besides the
/// kernel's rules (≤15 bytes, no '/', ':', whitespace or control characters)
/// we refuse anything that would need quoting there, and iptables' `+`
/// wildcard (istio#58781 was an injection through this field).
pub fn validate_interface(name: &str) -> Result<(), String> {
    crate::mechanism::validate_interface_name(name).map_err(|e| e.to_string())?;
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '@')))
    {
        return Err(format!(
            "interface name {name:?} contains {c:?}: only ASCII letters, digits, '.', '_', '-' and '@' are accepted"
        ));
    }
    Ok(())
}

impl fmt::Display for Port {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl fmt::Display for Mark {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}/{:#x}", self.value, self.mask)
    }
}

fn parse_u32(s: &str) -> Option<u32> {
    let s = s.trim();
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16).ok(),
        None => s.parse().ok(),
    }
}

impl std::str::FromStr for Mark {
    type Err = String;
    /// `1337`, `0x539` or `0x539/0xfff` (mask defaults to all bits).
    fn from_str(s: &str) -> Result<Self, String> {
        let bad =
            || format!("{s:?} is not a mark (expected VALUE or VALUE/MASK, e.g. 0x539/0xfff)");
        let (v, m) = match s.split_once('/') {
            Some((v, m)) => (v, Some(m)),
            None => (s, None),
        };
        let value = parse_u32(v).ok_or_else(bad)?;
        let mask = match m {
            Some(m) => parse_u32(m).ok_or_else(bad)?,
            None => u32::MAX,
        };
        Ok(Mark { value, mask })
    }
}

impl Serialize for Mark {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for Mark {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Mark;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a mark: a number or \"VALUE/MASK\" such as \"0x539/0xfff\"")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Mark, E> {
                let value = u32::try_from(v)
                    .map_err(|_| E::custom(format!("mark {v} does not fit in 32 bits")))?;
                Ok(Mark {
                    value,
                    mask: u32::MAX,
                })
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Mark, E> {
                u64::try_from(v)
                    .map_err(|_| E::custom(format!("mark {v} is negative")))
                    .and_then(|v| self.visit_u64(v))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Mark, E> {
                v.parse().map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// A whole-word mark: like [`Mark`] but without a mask.
fn de_plain_mark<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    let m = Mark::deserialize(d)?;
    if m.mask != u32::MAX {
        return Err(de::Error::custom(format!("{m}: this mark takes no mask")));
    }
    Ok(m.value)
}

fn port_from_i128<E: de::Error>(v: i128) -> Result<Port, E> {
    match u16::try_from(v) {
        Ok(p) if p != 0 => Ok(Port(p)),
        _ => Err(E::custom(format!("port {v} out of range (1-65535)"))),
    }
}

fn port_from_str<E: de::Error>(s: &str) -> Result<Port, E> {
    let t = s.trim();
    if t == "*" {
        return Err(E::custom(
            "\"*\" (all) is only allowed in includeInboundPorts",
        ));
    }
    match t.parse::<i128>() {
        Ok(v) => port_from_i128(v),
        Err(_) => Err(E::custom(format!("{s:?} is not a port number"))),
    }
}

impl<'de> Deserialize<'de> for Port {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Port;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a port number 1-65535")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Port, E> {
                port_from_i128(v.into())
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Port, E> {
                port_from_i128(v.into())
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Port, E> {
                port_from_str(v)
            }
        }
        d.deserialize_any(V)
    }
}

fn cidr_from_str<E: de::Error>(s: &str) -> Result<IpNet, E> {
    let t = s.trim();
    if t == "*" {
        return Err(E::custom(
            "\"*\" (all) is only allowed in includeOutboundCidrs",
        ));
    }
    if let Ok(net) = t.parse::<IpNet>() {
        return Ok(net);
    }
    // A bare address means that one host.
    t.parse::<IpAddr>()
        .map(IpNet::from)
        .map_err(|_| E::custom(format!("{s:?} is not a CIDR (e.g. 10.0.0.0/8 or fd00::/8)")))
}

/// An element of a list field: what the field's items parse from.
trait Item: Sized {
    const WHAT: &'static str;
    fn from_str<E: de::Error>(s: &str) -> Result<Self, E>;
    fn from_int<E: de::Error>(v: i128) -> Result<Self, E>;
    fn ser<S: SerializeSeq>(&self, seq: &mut S) -> Result<(), S::Error>;
}

impl Item for Port {
    const WHAT: &'static str = "ports";
    fn from_str<E: de::Error>(s: &str) -> Result<Self, E> {
        port_from_str(s)
    }
    fn from_int<E: de::Error>(v: i128) -> Result<Self, E> {
        port_from_i128(v)
    }
    fn ser<S: SerializeSeq>(&self, seq: &mut S) -> Result<(), S::Error> {
        seq.serialize_element(&self.0)
    }
}

impl Item for IpNet {
    const WHAT: &'static str = "CIDRs";
    fn from_str<E: de::Error>(s: &str) -> Result<Self, E> {
        cidr_from_str(s)
    }
    fn from_int<E: de::Error>(v: i128) -> Result<Self, E> {
        Err(E::custom(format!(
            "{v} is not a CIDR (write it as a string)"
        )))
    }
    fn ser<S: SerializeSeq>(&self, seq: &mut S) -> Result<(), S::Error> {
        seq.serialize_element(&self.to_string())
    }
}

/// Accepts a list (`[80, "443"]`), a comma-separated string (`"80,443"`, as
/// in istio annotations), a single number, or — where allowed — `"*"`.
struct ListVisitor<T> {
    allow_all: bool,
    _t: std::marker::PhantomData<T>,
}

impl<'de, T: Item> Visitor<'de> for ListVisitor<T> {
    type Value = Selection<T>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.allow_all {
            write!(f, "\"*\" or a list of {}", T::WHAT)
        } else {
            write!(f, "a list of {}", T::WHAT)
        }
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        let elements: Vec<&str> = v
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect();
        if elements.contains(&"*") {
            return self.all();
        }
        elements
            .into_iter()
            .map(T::from_str)
            .collect::<Result<_, _>>()
            .map(Selection::List)
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
        T::from_int(v.into()).map(|x| Selection::List(vec![x]))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
        T::from_int(v.into()).map(|x| Selection::List(vec![x]))
    }
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Selection::List(Vec::new()))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut out = Vec::new();
        let mut star = false;
        while let Some(el) = seq.next_element::<ItemOf<T>>()? {
            match el.0 {
                Some(x) => out.push(x),
                None => star = true,
            }
        }
        if star {
            return self.all();
        }
        Ok(Selection::List(out))
    }
}

impl<T: Item> ListVisitor<T> {
    /// A `"*"` anywhere in the list: everything, as istio reads its
    /// annotations (`"10.0.0.0/8,*"` is `"*"`), where the field allows it.
    fn all<E: de::Error>(&self) -> Result<Selection<T>, E> {
        if self.allow_all {
            Ok(Selection::All)
        } else {
            Err(E::custom(format!(
                "\"*\" (all) is not allowed here: list the {} instead",
                T::WHAT
            )))
        }
    }
}

/// An element of a list: an item, or `None` for `"*"`.
struct ItemOf<T>(Option<T>);

impl<'de, T: Item> Deserialize<'de> for ItemOf<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(std::marker::PhantomData<T>);
        impl<T: Item> Visitor<'_> for V<T> {
            type Value = ItemOf<T>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "one of the {}", T::WHAT)
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                if v.trim() == "*" {
                    return Ok(ItemOf(None));
                }
                T::from_str(v).map(|x| ItemOf(Some(x)))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
                T::from_int(v.into()).map(|x| ItemOf(Some(x)))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
                T::from_int(v.into()).map(|x| ItemOf(Some(x)))
            }
        }
        d.deserialize_any(V(std::marker::PhantomData))
    }
}

fn de_selection<'de, D: Deserializer<'de>, T: Item>(
    d: D,
    allow_all: bool,
) -> Result<Selection<T>, D::Error> {
    d.deserialize_any(ListVisitor {
        allow_all,
        _t: std::marker::PhantomData,
    })
}

fn ser_list<S: Serializer, T: Item>(items: &[T], s: S) -> Result<S::Ok, S::Error> {
    let mut seq = s.serialize_seq(Some(items.len()))?;
    for i in items {
        i.ser(&mut seq)?;
    }
    seq.end()
}

fn ser_selection<S: Serializer, T: Item>(sel: &Selection<T>, s: S) -> Result<S::Ok, S::Error> {
    match sel {
        Selection::All => s.serialize_str("*"),
        Selection::List(l) => ser_list(l, s),
    }
}

fn list_only<T>(sel: Selection<T>) -> Vec<T> {
    match sel {
        Selection::List(l) => l,
        Selection::All => unreachable!("ListVisitor refuses \"*\" when allow_all is false"),
    }
}

mod port_selection {
    use super::*;
    pub fn serialize<S: Serializer>(v: &PortSelection, s: S) -> Result<S::Ok, S::Error> {
        ser_selection(v, s)
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<PortSelection, D::Error> {
        de_selection(d, true)
    }
}

mod port_list {
    use super::*;
    pub fn serialize<S: Serializer>(v: &[Port], s: S) -> Result<S::Ok, S::Error> {
        ser_list(v, s)
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Port>, D::Error> {
        de_selection(d, false).map(list_only)
    }
}

mod cidr_selection {
    use super::*;
    pub fn serialize<S: Serializer>(v: &CidrSelection, s: S) -> Result<S::Ok, S::Error> {
        ser_selection(v, s)
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<CidrSelection, D::Error> {
        de_selection(d, true)
    }
}

mod cidr_list {
    use super::*;
    pub fn serialize<S: Serializer>(v: &[IpNet], s: S) -> Result<S::Ok, S::Error> {
        ser_list(v, s)
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<IpNet>, D::Error> {
        de_selection(d, false).map(list_only)
    }
}

#[cfg(test)]
#[path = "redirect_tests.rs"]
mod tests;
