//! The vpn function's configuration (see [`super`]); keys are read when
//! the configuration is, so a missing or malformed key stops the endpoint
//! at start.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use forwarder_plugin::wireguard::{self, PeerSpec, PrivateKey, TunnelSpec};
use ipnet::IpNet;
use serde::Deserialize;

use crate::mesh_proxy::config::parse_cidr;

pub const DEFAULT_INTERFACE: &str = "nsm-wg0";
pub const MAX_ALLOWED_IPS: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Implementation {
    /// Userspace (the kernel path is not built yet).
    #[default]
    Auto,
    Userspace,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct PeerFile {
    public_key: Option<String>,
    public_key_file: Option<PathBuf>,
    endpoint: SocketAddr,
    allowed_ips: Vec<String>,
    persistent_keepalive: Option<u16>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct VpnFile {
    #[serde(default)]
    interface: Option<String>,
    private_key_file: PathBuf,
    #[serde(default)]
    listen_port: Option<u16>,
    address: Vec<String>,
    #[serde(default)]
    implementation: Implementation,
    peer: PeerFile,
}

/// The checked configuration: the tunnel it brings up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VpnConfig {
    pub spec: TunnelSpec,
    pub implementation: Implementation,
}

fn read_key(what: &str, path: &Path) -> Result<[u8; 32], String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("{what}: cannot read {}: {e}", path.display()))?;
    wireguard::parse_key(&format!("{what} {}", path.display()), &text).map_err(|e| e.to_string())
}

fn cidrs(key: &str, list: &[String]) -> Result<Vec<IpNet>, String> {
    list.iter()
        .map(|s| parse_cidr(s).map_err(|e| format!("{key}: {e}")))
        .collect()
}

impl VpnFile {
    pub fn resolve(self) -> Result<VpnConfig, String> {
        let interface = self.interface.unwrap_or_else(|| DEFAULT_INTERFACE.into());
        if interface.is_empty()
            || interface.len() > 15
            || !interface
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        {
            return Err(format!("interface: {interface:?} is not an interface name"));
        }
        let private_key = read_key("privateKeyFile", &self.private_key_file)?;
        let public_key = match (&self.peer.public_key, &self.peer.public_key_file) {
            (Some(k), None) => {
                wireguard::parse_key("peer.publicKey", k).map_err(|e| e.to_string())?
            }
            (None, Some(p)) => read_key("peer.publicKeyFile", p)?,
            _ => return Err("peer: give one of publicKey and publicKeyFile".into()),
        };
        let address = cidrs("address", &self.address)?;
        if address.is_empty() {
            return Err("address: the tunnel needs an address of the endpoint".into());
        }
        let allowed_ips = cidrs("peer.allowedIps", &self.peer.allowed_ips)?;
        if allowed_ips.is_empty() || allowed_ips.len() > MAX_ALLOWED_IPS {
            return Err(format!(
                "peer.allowedIps: {} prefixes, 1 to {MAX_ALLOWED_IPS} are needed",
                allowed_ips.len()
            ));
        }
        if let Some(n) = allowed_ips.iter().find(|n| n.prefix_len() == 0) {
            return Err(format!(
                "peer.allowedIps: {n} would route the endpoint's own traffic (and the tunnel's) into the tunnel"
            ));
        }
        Ok(VpnConfig {
            spec: TunnelSpec {
                interface,
                private_key: PrivateKey(private_key),
                listen_port: self.listen_port.unwrap_or(51820),
                addresses: address,
                peer: PeerSpec {
                    public_key,
                    endpoint: Some(self.peer.endpoint),
                    allowed_ips,
                    persistent_keepalive: self.peer.persistent_keepalive,
                },
            },
            implementation: self.implementation,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<VpnConfig, String> {
        serde_norway::from_str::<VpnFile>(text)
            .map_err(|e| e.to_string())
            .and_then(VpnFile::resolve)
    }

    #[test]
    fn keys_are_read_and_checked_at_start() {
        let dir = std::env::temp_dir().join(format!("vpn-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let key = dir.join("private.key");
        let k = wireguard::generate_private_key().unwrap();
        std::fs::write(&key, wireguard::encode_key(&k)).unwrap();
        let peer = wireguard::encode_key(&wireguard::public_key(
            &wireguard::generate_private_key().unwrap(),
        ));
        let good = format!(
            "privateKeyFile: {}\naddress: [10.99.0.1/32]\npeer:\n  publicKey: {peer}\n  endpoint: 198.18.200.2:51820\n  allowedIps: [198.19.200.0/24]\n",
            key.display()
        );
        let c = parse(&good).unwrap();
        assert_eq!(c.spec.private_key, PrivateKey(k));
        assert_eq!(c.spec.interface, DEFAULT_INTERFACE);
        assert!(
            !format!("{c:?}").contains(&wireguard::encode_key(&k)),
            "the key is never printed"
        );
        for (text, want) in [
            (
                good.replace(key.to_str().unwrap(), "/nonexistent/key"),
                "privateKeyFile: cannot read /nonexistent/key",
            ),
            (
                good.replace(&peer, "short"),
                "peer.publicKey: not a WireGuard key",
            ),
            (
                good.replace("198.19.200.0/24", "0.0.0.0/0"),
                "would route the endpoint's own traffic",
            ),
            (
                good.replace("address: [10.99.0.1/32]", "address: []"),
                "address: the tunnel needs",
            ),
            (
                format!("{good}interface: 'a b'\n"),
                "is not an interface name",
            ),
            (format!("{good}mtu: 1400\n"), "unknown field `mtu`"),
            (
                format!("{good}implementation: kernel\n"),
                "unknown variant `kernel`",
            ),
        ] {
            let e = parse(&text).unwrap_err();
            assert!(e.contains(want), "{text}\n→ {e}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
