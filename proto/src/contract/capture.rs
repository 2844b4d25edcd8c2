//! The capture spec: what a client namespace sends to an endpoint whose
//! proxy serves it (policy: the endpoint decides it), as it travels in
//! `extra_context` [`super::CLIENT_CAPTURE_KEY`] to the forwarder, which
//! turns it into rules (forwarder-plugin's `Plan::capture`). Versioned;
//! unknown fields are refused; every list has a bound.

use std::fmt;

use ipnet::IpNet;
use serde::de::{self, Deserializer};
use serde::{Deserialize, Serialize, Serializer};

/// The capture spec version this build reads and writes.
pub const CAPTURE_VERSION: u32 = 1;
/// Most destination CIDRs a spec may list.
pub const MAX_CIDRS: usize = 256;
/// Most excluded CIDRs a spec may list (one rule each).
pub const MAX_EXCLUDE_CIDRS: usize = 1024;
/// Most port ranges a spec may list.
pub const MAX_PORTS: usize = 64;

/// A destination port range `lo-hi` (`lo == hi`: one port), as NSM's
/// `PolicyRoute` ports are written: `"80"`, `"8000-8999"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortRange {
    pub lo: u16,
    pub hi: u16,
}

impl PortRange {
    pub fn single(port: u16) -> PortRange {
        PortRange { lo: port, hi: port }
    }

    pub fn contains(&self, port: u16) -> bool {
        (self.lo..=self.hi).contains(&port)
    }
}

impl std::str::FromStr for PortRange {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let port = |p: &str| match p.trim().parse::<u16>() {
            Ok(n) if n != 0 => Ok(n),
            _ => Err(format!(
                "{s:?} is not a port or port range (1-65535, e.g. 80 or 8000-8999)"
            )),
        };
        let (lo, hi) = match t.split_once('-') {
            Some((a, b)) => (port(a)?, port(b)?),
            None => {
                let p = port(t)?;
                (p, p)
            }
        };
        if lo > hi {
            return Err(format!("{s:?}: the range ends before it starts"));
        }
        Ok(PortRange { lo, hi })
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.lo == self.hi {
            write!(f, "{}", self.lo)
        } else {
            write!(f, "{}-{}", self.lo, self.hi)
        }
    }
}

impl Serialize for PortRange {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for PortRange {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Num(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Num(n) => u16::try_from(n)
                .ok()
                .filter(|&p| p != 0)
                .map(PortRange::single)
                .ok_or_else(|| de::Error::custom(format!("port {n} out of range (1-65535)"))),
            Raw::Text(t) => t.parse().map_err(de::Error::custom),
        }
    }
}

/// What a client sends to the endpoint (version 1). Travels as JSON in the
/// connection's `extra_context` (`mesh-proxy.v1/client-capture`); unknown
/// fields are refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct CaptureSpec {
    pub version: u32,
    /// Destinations captured; `0.0.0.0/0`, `::/0`: every address of the
    /// family. Only families the connection has an address of are captured.
    pub cidrs: Vec<IpNet>,
    /// Destinations never captured (checked first).
    pub exclude_cidrs: Vec<IpNet>,
    /// TCP destination ports captured; empty: every port.
    pub ports: Vec<PortRange>,
    /// Also DNS the client sends (UDP and TCP port 53), whatever `ports` says.
    pub dns: bool,
}

impl Default for CaptureSpec {
    fn default() -> Self {
        CaptureSpec {
            version: CAPTURE_VERSION,
            cidrs: vec![
                "0.0.0.0/0".parse().expect("literal"),
                "::/0".parse().expect("literal"),
            ],
            exclude_cidrs: Vec::new(),
            ports: Vec::new(),
            dns: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CaptureError {
    #[error("{0}")]
    Parse(String),
    #[error("unsupported capture spec version {0} (this build reads version {CAPTURE_VERSION})")]
    Version(u32),
    #[error("{field}: {why}")]
    Invalid { field: &'static str, why: String },
}

impl CaptureSpec {
    pub fn from_json(text: &str) -> Result<CaptureSpec, CaptureError> {
        let spec: CaptureSpec =
            serde_json::from_str(text).map_err(|e| CaptureError::Parse(e.to_string()))?;
        spec.validate()?;
        Ok(spec)
    }

    /// Compact JSON, the form that travels in NSM `extra_context`.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a capture spec always serialises")
    }

    pub fn validate(&self) -> Result<(), CaptureError> {
        if self.version != CAPTURE_VERSION {
            return Err(CaptureError::Version(self.version));
        }
        let bad = |field, why: String| Err(CaptureError::Invalid { field, why });
        for (field, list, max) in [
            ("cidrs", &self.cidrs, MAX_CIDRS),
            ("excludeCidrs", &self.exclude_cidrs, MAX_EXCLUDE_CIDRS),
        ] {
            if list.len() > max {
                return bad(field, format!("{} entries, at most {max}", list.len()));
            }
            if let Some(n) = list.iter().find(|n| **n != n.trunc()) {
                return bad(field, format!("{n} has host bits set ({})", n.trunc()));
            }
        }
        if self.ports.len() > MAX_PORTS {
            return bad(
                "ports",
                format!("{} entries, at most {MAX_PORTS}", self.ports.len()),
            );
        }
        if let Some(r) = self.ports.iter().find(|r| r.lo == 0 || r.lo > r.hi) {
            return bad("ports", format!("{}-{} is not a port range", r.lo, r.hi));
        }
        Ok(())
    }

    /// Whether some TCP port of `ports` (or every port) is captured.
    pub fn tcp_port_captured(&self, port: u16) -> bool {
        self.ports.is_empty() || self.ports.iter().any(|r| r.contains(port))
    }
}
