//! The wire contract between the mesh-proxy endpoint and a forwarder that
//! does client-side work for it, carried in `connection.context.extra_context`
//! beside NSM's own fields: keys versioned in their names (a later format
//! gets a new key; old hops ignore it instead of misreading it), and the
//! specs they carry — [`redirect::RedirectSpec`] (istio-style redirect rules
//! for a sidecar) and [`capture::CaptureSpec`] (capture by intent). The
//! endpoint writes them, the hop applies them; both read them from here.

pub mod capture;
pub mod redirect;

use crate::connection::Connection;

pub use capture::{CaptureError, CaptureSpec, PortRange};
pub use redirect::{RedirectSpec, SPEC_VERSION, SpecError};

/// Every `extra_context` key of the contract starts so.
pub const CONTRACT_PREFIX: &str = "mesh-proxy.";

/// The endpoint's redirect spec (JSON, version 1) for the CLIENT's namespace.
pub const CLIENT_REDIRECT_KEY: &str = "mesh-proxy.v1/client-redirect";

/// The endpoint's capture spec (JSON, version 1) for the CLIENT's namespace.
pub const CLIENT_CAPTURE_KEY: &str = "mesh-proxy.v1/client-capture";

/// The name of a proxy the hop is to start in the CLIENT's namespace (one
/// of those it announces in [`FORWARDER_PROXIES_KEY`]), beside the rules of
/// [`CLIENT_REDIRECT_KEY`] that send the client's traffic to it. A name,
/// never a command: what runs is the node agent's own definition.
pub const CLIENT_PROXY_KEY: &str = "mesh-proxy.v1/client-proxy";

/// The key by which a hop tells the endpoint (through nsmgr) which
/// client-side work it does: a comma-separated list of features. A
/// forwarder that does not set it (NSM's own) applies none of our keys, so
/// an endpoint can fall back to what NSM can express, or refuse.
pub const FORWARDER_FEATURES_KEY: &str = "mesh-proxy.v1/forwarder-features";
/// Feature: applies [`CLIENT_REDIRECT_KEY`] specs.
pub const FEATURE_CLIENT_REDIRECT: &str = "client-redirect";
/// Feature: applies [`CLIENT_CAPTURE_KEY`] specs.
pub const FEATURE_CLIENT_CAPTURE: &str = "client-capture";

/// Feature: starts the proxies named by [`CLIENT_PROXY_KEY`].
pub const FEATURE_CLIENT_PROXY: &str = "client-proxy";
/// The names of the proxies a hop with [`FEATURE_CLIENT_PROXY`] can start,
/// comma-separated.
pub const FORWARDER_PROXIES_KEY: &str = "mesh-proxy.v1/forwarder-proxies";

/// Prepares a Request for the next hop: removes every key of the contract
/// the caller sent (only an endpoint's answer may ask for client-side work,
/// and only this hop may say what it does), then announces this hop's
/// features.
pub fn announce_features(conn: &mut Connection) {
    announce(conn, "");
}

/// [`announce_features`] by a hop that can also start the proxies named
/// in `proxies` (comma-separated; empty: none) in a client's namespace.
pub fn announce(conn: &mut Connection, proxies: &str) {
    let ctx = conn.context.get_or_insert_default();
    ctx.extra_context
        .retain(|k, _| !k.starts_with(CONTRACT_PREFIX));
    let mut features = format!("{FEATURE_CLIENT_REDIRECT},{FEATURE_CLIENT_CAPTURE}");
    if !proxies.is_empty() {
        features.push_str(&format!(",{FEATURE_CLIENT_PROXY}"));
        ctx.extra_context
            .insert(FORWARDER_PROXIES_KEY.to_owned(), proxies.to_owned());
    }
    ctx.extra_context
        .insert(FORWARDER_FEATURES_KEY.to_owned(), features);
}

/// The proxies the hop of this Request announces it can start.
pub fn announced_proxies(conn: &Connection) -> Vec<&str> {
    if !has_feature(conn, FEATURE_CLIENT_PROXY) {
        return Vec::new();
    }
    conn.context
        .as_ref()
        .and_then(|c| c.extra_context.get(FORWARDER_PROXIES_KEY))
        .map(|v| {
            v.split(',')
                .map(str::trim)
                .filter(|n| !n.is_empty())
                .collect()
        })
        .unwrap_or_default()
}

/// Whether the Request's `extra_context` announces `feature`.
pub fn has_feature(conn: &Connection, feature: &str) -> bool {
    conn.context
        .as_ref()
        .and_then(|c| c.extra_context.get(FORWARDER_FEATURES_KEY))
        .is_some_and(|v| v.split(',').any(|f| f.trim() == feature))
}
