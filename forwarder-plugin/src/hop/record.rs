//! What the hop remembers about one plumbed connection: enough to undo it
//! after a restart without any descriptor (namespaces are found again by
//! inode) and to Close the next hop with the connection it last returned.

use serde::{Deserialize, Serialize};

use super::client_routing::Policy;
use super::redirect::BackendName;
use crate::link::VethPlan;
use crate::rules::{CaptureSpec, RedirectSpec};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HopRecord {
    /// The veth: end `a` in the client's namespace, end `b` in the endpoint's.
    pub plan: VethPlan,
    /// Client-side redirect rules, if the endpoint asked for any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rules: Option<RedirectSpec>,
    /// Client-side capture by intent, if the endpoint asked for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capture: Option<CaptureSpec>,
    /// The node agent's proxy started in the client's namespace for this
    /// connection (its definition's name), if the endpoint named one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy: Option<String>,
    /// The client proxy listens on the upgrade ports (the spec's + [`UPGRADE_PORT_SHIFT`])
    /// since its last upgrade: what the rules send traffic to. Flips with
    /// each upgrade; kept across refreshes (the endpoint does not know it).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub proxy_alt: bool,
    /// The connection's labels when it has a client proxy (its template's
    /// `{{labels.<key>}}`), as they were at its start: an adopted proxy is
    /// recognised by what it was rendered from.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub labels: std::collections::BTreeMap<String, String>,
    /// NSM policy routes the endpoint returned (`ip_context.policies`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policies: Vec<Policy>,
    /// The connection's slot in its client namespace (its mark and routing
    /// tables), when it has capture or policies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot: Option<u16>,
    /// The backend the rules were applied with (cleanup uses the same one,
    /// whatever `--backend` says after a restart).
    pub backend: BackendName,
    /// Owner of the rules: nft table `inet <owner>`, iptables chains `<OWNER>_*`.
    pub owner: String,
    /// `inode://dev/ino` of the client's network namespace.
    pub client_netns: String,
    /// `inode://dev/ino` of the endpoint's network namespace.
    pub endpoint_netns: String,
    /// The namespaces' cookies (`SO_NETNS_COOKIE`, never reused, unlike
    /// inode numbers): after a restart a namespace found by inode is taken
    /// for the recorded one only if its cookie matches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_cookie: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint_cookie: Option<u64>,
    #[serde(default)]
    pub session: Session,
}

pub use crate::proxy::UPGRADE_PORT_SHIFT;

/// `spec` with its proxy ports moved by [`UPGRADE_PORT_SHIFT`], if they fit.
pub fn shifted(spec: &RedirectSpec) -> Option<RedirectSpec> {
    let mut s = spec.clone();
    for port in [&mut s.outbound_port, &mut s.inbound_port, &mut s.dns_port] {
        port.0 = port.0.checked_add(UPGRADE_PORT_SHIFT)?;
    }
    Some(s)
}

impl HopRecord {
    /// The redirect rules as applied: the endpoint's spec, with the ports
    /// an upgraded client proxy listens on.
    pub fn applied_rules(&self) -> Option<RedirectSpec> {
        let spec = self.rules.as_ref()?;
        // An upgrade only happens where the shift fits; never fewer rules.
        Some(
            self.proxy_alt
                .then(|| shifted(spec))
                .flatten()
                .unwrap_or_else(|| spec.clone()),
        )
    }

    /// Whether `other` asks for the same kernel state (sessions and the
    /// namespaces' cookies, which only identify, may differ).
    pub fn same_dataplane(&self, other: &HopRecord) -> bool {
        self.plan == other.plan
            && self.rules == other.rules
            && self.capture == other.capture
            && self.proxy == other.proxy
            && self.policies == other.policies
            && self.slot == other.slot
            && self.backend == other.backend
            && self.owner == other.owner
            && self.client_netns == other.client_netns
            && self.endpoint_netns == other.endpoint_netns
    }
}

/// What the gRPC side keeps beside the dataplane.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    /// The next hop the connection went to (`unix:///…`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_hop: Option<String>,
    /// The connection as the next hop last returned it, protobuf-encoded in
    /// hex: what a Close after a restart sends downstream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downstream: Option<String>,
    /// Unix time (seconds) after which an unrefreshed connection is closed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_unix: Option<u64>,
    /// The caller's connection id (the path segment before ours): with the
    /// client's namespace, how a Request that comes again without our
    /// segment (a restarted init container) is recognised as this one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub caller_id: Option<String>,
    /// A Close could not undo everything: the next start tries again.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub closing: bool,
}
