//! Per-connection overrides from `connection.labels` — the query of the
//! client's network service URL, e.g.
//! `kernel://mesh-proxy/nsm-1?proxy-placement=sidecar&proxy-exclude-outbound-ports=22`.
//!
//! Every label starting with [`PREFIX`] is ours and must be one of the
//! names below with a valid value; other labels (NSM adds `podName`,
//! `nodeName`, …) are ignored. List values are separated by `,`, `;` or
//! spaces: `NSM_NETWORK_SERVICES` is itself a comma-separated list of
//! URLs, so inside it write `22;2222` or `22+2222` (`+` decodes to a
//! space in a URL query).
//!
//! istio's pod annotations for the same options are read too, under their
//! names ([`ISTIO_ALIASES`], e.g. `traffic.sidecar.istio.io/excludeOutboundPorts`),
//! so a pod's istio annotations can be passed on as they are; any other
//! `traffic.sidecar.istio.io/` label is refused (its option is not per
//! connection here).

use std::collections::HashMap;

use ipnet::IpNet;
use nsm_api::contract::redirect::Port;

use super::config::{Placement, parse_cidr};

/// Labels with this prefix are this function's.
pub const PREFIX: &str = "proxy-";
/// `proxy` or `sidecar`: overrides the configured placement.
pub const PLACEMENT: &str = "proxy-placement";
/// CIDRs the client's traffic to which bypasses the proxy.
pub const EXCLUDE_OUTBOUND_CIDRS: &str = "proxy-exclude-outbound-cidrs";
/// Ports (TCP and UDP) the client's traffic to which bypasses the proxy (sidecar only).
pub const EXCLUDE_OUTBOUND_PORTS: &str = "proxy-exclude-outbound-ports";
/// Ports of the client whose inbound traffic bypasses the proxy (sidecar only).
pub const EXCLUDE_INBOUND_PORTS: &str = "proxy-exclude-inbound-ports";

/// istio's annotations (istio-cni reads them from the pod) and the label
/// each one is.
pub const ISTIO_ALIASES: [(&str, &str); 3] = [
    (
        "traffic.sidecar.istio.io/excludeOutboundIPRanges",
        EXCLUDE_OUTBOUND_CIDRS,
    ),
    (
        "traffic.sidecar.istio.io/excludeOutboundPorts",
        EXCLUDE_OUTBOUND_PORTS,
    ),
    (
        "traffic.sidecar.istio.io/excludeInboundPorts",
        EXCLUDE_INBOUND_PORTS,
    ),
];
/// Labels with this prefix are istio annotations: ours if in [`ISTIO_ALIASES`].
pub const ISTIO_PREFIX: &str = "traffic.sidecar.istio.io/";

/// Every label this function reads.
pub const ALL: [&str; 4] = [
    PLACEMENT,
    EXCLUDE_OUTBOUND_CIDRS,
    EXCLUDE_OUTBOUND_PORTS,
    EXCLUDE_INBOUND_PORTS,
];

/// What a connection's labels ask for; empty when it has none of ours.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Overrides {
    pub placement: Option<Placement>,
    pub exclude_outbound_cidrs: Vec<IpNet>,
    pub exclude_outbound_ports: Vec<Port>,
    pub exclude_inbound_ports: Vec<Port>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("label {label:?}: {why}")]
pub struct LabelError {
    pub label: String,
    pub why: String,
}

fn items(value: &str) -> impl Iterator<Item = &str> {
    value
        .split(|c: char| c == ',' || c == ';' || c.is_whitespace())
        .filter(|s| !s.is_empty())
}

/// `*` ("all") makes no sense in an exclusion: excluding everything is
/// asking for no proxy, which is a placement, not a label.
fn no_star(value: &str) -> Result<(), String> {
    if items(value).any(|s| s == "*") {
        return Err("\"*\" would exclude everything: leave the connection out of the mesh-proxy service instead".into());
    }
    Ok(())
}

fn ports(value: &str) -> Result<Vec<Port>, String> {
    no_star(value)?;
    items(value)
        .map(|s| match s.parse::<u16>() {
            Ok(p) if p != 0 => Ok(Port(p)),
            _ => Err(format!("{s:?} is not a port (1-65535)")),
        })
        .collect()
}

impl Overrides {
    /// Reads and checks our labels. The first bad one (by name) is reported.
    pub fn from_labels(labels: &HashMap<String, String>) -> Result<Overrides, LabelError> {
        let mut ours: Vec<(&String, &String)> = labels
            .iter()
            .filter(|(k, _)| k.starts_with(PREFIX) || k.starts_with(ISTIO_PREFIX))
            .collect();
        ours.sort();
        let mut o = Overrides::default();
        let mut seen: HashMap<&str, &str> = HashMap::new();
        for (label, value) in ours {
            let bad = |why: String| LabelError {
                label: label.clone(),
                why,
            };
            let name = match ISTIO_ALIASES.iter().find(|(a, _)| a == label) {
                Some((_, ours)) => *ours,
                None if label.starts_with(ISTIO_PREFIX) => {
                    return Err(bad(format!(
                        "this istio annotation is not a per-connection option here (supported: {})",
                        ISTIO_ALIASES.map(|(a, _)| a).join(", ")
                    )));
                }
                None => label.as_str(),
            };
            if let Some(other) = seen.insert(name, label) {
                return Err(bad(format!(
                    "is {other:?} under another name: set one of them"
                )));
            }
            let res = match name {
                PLACEMENT => value.parse().map(|p| o.placement = Some(p)),
                EXCLUDE_OUTBOUND_CIDRS => no_star(value).and_then(|()| {
                    items(value)
                        .map(parse_cidr)
                        .collect::<Result<_, _>>()
                        .map(|v| o.exclude_outbound_cidrs = v)
                }),
                EXCLUDE_OUTBOUND_PORTS => ports(value).map(|v| o.exclude_outbound_ports = v),
                EXCLUDE_INBOUND_PORTS => ports(value).map(|v| o.exclude_inbound_ports = v),
                _ => Err(format!(
                    "unknown {PREFIX}* label (known: {})",
                    ALL.join(", ")
                )),
            };
            res.map_err(bad)?;
        }
        Ok(o)
    }

    /// The labels set here that only mean something in placement sidecar.
    pub fn sidecar_only(&self) -> Vec<&'static str> {
        let mut v = Vec::new();
        if !self.exclude_outbound_ports.is_empty() {
            v.push(EXCLUDE_OUTBOUND_PORTS);
        }
        if !self.exclude_inbound_ports.is_empty() {
            v.push(EXCLUDE_INBOUND_PORTS);
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn no_labels_of_ours_no_overrides() {
        let o = Overrides::from_labels(&labels(&[("podName", "a"), ("app", "proxy-x")])).unwrap();
        assert_eq!(o, Overrides::default());
    }

    #[test]
    fn every_label_and_every_separator() {
        let o = Overrides::from_labels(&labels(&[
            (PLACEMENT, "sidecar"),
            (EXCLUDE_OUTBOUND_CIDRS, "198.19.0.0/16;fd00::1 10.1.2.3/8"),
            (EXCLUDE_OUTBOUND_PORTS, "22,2222"),
            (EXCLUDE_INBOUND_PORTS, " 8080 + 9090"),
        ]))
        .unwrap_err();
        // "+" is a separator only as a decoded URL query (a space): literally it is not a port.
        assert_eq!(o.label, EXCLUDE_INBOUND_PORTS);
        let o = Overrides::from_labels(&labels(&[
            (PLACEMENT, "sidecar"),
            (EXCLUDE_OUTBOUND_CIDRS, "198.19.0.0/16;fd00::1 10.1.2.3/8"),
            (EXCLUDE_OUTBOUND_PORTS, "22,2222"),
            (EXCLUDE_INBOUND_PORTS, " 8080  9090"),
        ]))
        .unwrap();
        assert_eq!(o.placement, Some(Placement::Sidecar));
        let cidrs: Vec<String> = o
            .exclude_outbound_cidrs
            .iter()
            .map(|c| c.to_string())
            .collect();
        assert_eq!(cidrs, ["198.19.0.0/16", "fd00::1/128", "10.0.0.0/8"]);
        assert_eq!(o.exclude_outbound_ports, [Port(22), Port(2222)]);
        assert_eq!(o.exclude_inbound_ports, [Port(8080), Port(9090)]);
        assert_eq!(
            o.sidecar_only(),
            [EXCLUDE_OUTBOUND_PORTS, EXCLUDE_INBOUND_PORTS]
        );
        // An empty value asks for nothing.
        let o = Overrides::from_labels(&labels(&[(EXCLUDE_OUTBOUND_PORTS, "")])).unwrap();
        assert!(o.exclude_outbound_ports.is_empty());
    }

    #[test]
    fn the_nsurl_query_form_reads_as_expected() {
        let url: nsm_api::nsurl::NsUrl =
            "kernel://mesh-proxy/nsm-1?proxy-placement=sidecar&proxy-exclude-outbound-ports=22+2222"
                .parse()
                .unwrap();
        let o = Overrides::from_labels(&url.labels.into_iter().collect()).unwrap();
        assert_eq!(o.placement, Some(Placement::Sidecar));
        assert_eq!(o.exclude_outbound_ports, [Port(22), Port(2222)]);
    }

    #[test]
    fn istio_annotation_names_are_the_same_options() {
        let o = Overrides::from_labels(&labels(&[
            ("traffic.sidecar.istio.io/excludeOutboundPorts", "22,2222"),
            (
                "traffic.sidecar.istio.io/excludeOutboundIPRanges",
                "10.0.0.0/8",
            ),
            ("traffic.sidecar.istio.io/excludeInboundPorts", "15020"),
        ]))
        .unwrap();
        assert_eq!(o.exclude_outbound_ports, [Port(22), Port(2222)]);
        assert_eq!(
            o.exclude_outbound_cidrs,
            ["10.0.0.0/8".parse::<IpNet>().unwrap()]
        );
        assert_eq!(o.exclude_inbound_ports, [Port(15020)]);
        for (pairs, label, want) in [
            (
                &[("traffic.sidecar.istio.io/includeOutboundIPRanges", "*")][..],
                "traffic.sidecar.istio.io/includeOutboundIPRanges",
                "not a per-connection option here",
            ),
            (
                &[
                    ("traffic.sidecar.istio.io/excludeOutboundPorts", "22"),
                    (EXCLUDE_OUTBOUND_PORTS, "23"),
                ][..],
                "traffic.sidecar.istio.io/excludeOutboundPorts",
                "under another name",
            ),
            (
                &[(
                    "traffic.sidecar.istio.io/excludeOutboundIPRanges",
                    "10.0.0.0/8,*",
                )][..],
                "traffic.sidecar.istio.io/excludeOutboundIPRanges",
                "would exclude everything",
            ),
        ] {
            let e = Overrides::from_labels(&labels(pairs)).unwrap_err();
            assert_eq!(e.label, label, "{e}");
            assert!(e.why.contains(want), "{e}");
        }
    }

    #[test]
    fn bad_values_and_unknown_labels_name_the_label() {
        for (label, value, want) in [
            (PLACEMENT, "inline", "\"inline\" is not a placement"),
            (
                EXCLUDE_OUTBOUND_CIDRS,
                "10.0.0.0/33",
                "\"10.0.0.0/33\" is not a CIDR",
            ),
            (EXCLUDE_OUTBOUND_PORTS, "22,0", "\"0\" is not a port"),
            (EXCLUDE_INBOUND_PORTS, "http", "\"http\" is not a port"),
            ("proxy-mode", "tproxy", "unknown proxy-* label"),
        ] {
            let e = Overrides::from_labels(&labels(&[(label, value), ("app", "x")])).unwrap_err();
            assert_eq!(e.label, label);
            let text = e.to_string();
            assert!(text.starts_with(&format!("label {label:?}: ")), "{text}");
            assert!(text.contains(want), "{text}");
        }
    }
}
