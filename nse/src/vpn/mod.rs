//! The vpn network function: a WireGuard tunnel from the endpoint to one
//! configured peer. Packets the endpoint's netns routes to the peer's
//! allowed IPs — the proxy's upstream connections, traffic forwarded from
//! clients — leave encrypted as WireGuard UDP to the peer; what the peer
//! sends back from its allowed IPs comes out of the tunnel interface.
//!
//! The tunnel is the endpoint's (up at start, down at exit) and its routes
//! are in the endpoint's main table, so it is last in any chain it is in:
//! it is where packets leave. In userspace (boringtun on a TUN interface,
//! `forwarder_plugin::wireguard`): kernels without the wireguard module,
//! as the test kernels here, have no other way.
//!
//! ```yaml
//! type: vpn
//! interface: nsm-wg0
//! privateKeyFile: /etc/wireguard/private.key   # base64, as `wg genkey` prints
//! listenPort: 51820
//! address: [10.99.0.1/32]                      # the endpoint's tunnel address
//! implementation: userspace                    # auto | userspace
//! peer:
//!   publicKey: "base64…"                       # or publicKeyFile
//!   endpoint: 198.18.200.2:51820
//!   allowedIps: [198.19.200.0/24]
//!   persistentKeepalive: 25                    # seconds; omitted: none
//! ```

pub mod config;

use async_trait::async_trait;
use forwarder_plugin::wireguard::{self, Tunnel, TunnelSpec};
use nsm_api::connection::Connection;
use std::sync::Mutex;

use crate::chain::functions::{Claim, FunctionError, NetworkFunction};
use config::VpnConfig;

/// The function type's name in configurations.
pub const TYPE: &str = "vpn";

pub struct Vpn {
    name: String,
    config: VpnConfig,
    /// `None` once released.
    tunnel: Mutex<Option<Tunnel>>,
}

/// What a vpn configured so owns: its interface, its UDP port, the routes
/// to the peer's allowed IPs.
pub fn claims(config: &VpnConfig) -> Vec<Claim> {
    let mut c = vec![
        Claim::Interface(config.spec.interface.clone()),
        Claim::UdpPort(config.spec.listen_port),
    ];
    c.extend(
        config
            .spec
            .peer
            .allowed_ips
            .iter()
            .map(|n| Claim::Route(n.to_string())),
    );
    c
}

impl Vpn {
    /// Brings the tunnel up in the endpoint's netns.
    pub async fn start(name: &str, config: VpnConfig) -> Result<Vpn, wireguard::WgError> {
        let spec: &TunnelSpec = &config.spec;
        let tunnel = wireguard::start(spec).await?;
        tracing::info!(
            function = name,
            interface = %spec.interface,
            listen_port = tunnel.local_port,
            peer = %wireguard::encode_key(&spec.peer.public_key),
            peer_endpoint = ?spec.peer.endpoint,
            allowed_ips = ?spec.peer.allowed_ips,
            "vpn function: WireGuard tunnel up (userspace)"
        );
        Ok(Vpn {
            name: name.to_owned(),
            config,
            tunnel: Mutex::new(Some(tunnel)),
        })
    }
}

#[async_trait]
impl NetworkFunction for Vpn {
    fn name(&self) -> &str {
        &self.name
    }

    fn claims(&self) -> Vec<Claim> {
        claims(&self.config)
    }

    /// The tunnel and its routes serve every connection whose chain ends
    /// here: nothing to add per connection.
    async fn apply(&self, conn: &mut Connection) -> Result<(), FunctionError> {
        if self
            .tunnel
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_none()
        {
            return Err(FunctionError::Failed {
                function: self.name.clone(),
                reason: "the tunnel is down (the endpoint is stopping)".into(),
            });
        }
        tracing::debug!(id = %conn.id, function = %self.name, "vpn applied");
        Ok(())
    }

    async fn undo(&self, _: &Connection) -> Result<(), FunctionError> {
        Ok(())
    }

    /// At exit: the tunnel goes, its interface and routes with it.
    fn release(&self) {
        self.tunnel.lock().unwrap_or_else(|p| p.into_inner()).take();
    }
}
