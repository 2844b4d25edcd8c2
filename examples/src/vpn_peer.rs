//! The far end of the vpn function, for the demo and the chain tests: a
//! namespace linked to the endpoint's by an underlay veth, running
//! `wg-peer` (the same userspace WireGuard) and a server behind it, with
//! nft counters on its underlay link that tell WireGuard UDP from anything
//! in clear.
//!
//! ```text
//!  endpoint ns ── wgu-nse 198.18.230.1/30 ⇄ wgu-peer 198.18.230.2/30 ── peer ns
//!   nsm-wg0 198.18.231.1  ═══ WireGuard UDP :51820 ═══  wg-peer0 198.19.230.1
//!                                                        hello-server :8080
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use forwarder_plugin::wireguard;

use crate::namespace::{Namespace, NamespaceError};
use crate::process::{self, Process, ProcessError};

#[derive(Debug, thiserror::Error)]
pub enum VpnPeerError {
    #[error(transparent)]
    Namespace(#[from] NamespaceError),
    #[error(transparent)]
    Process(#[from] ProcessError),
    #[error("{0}")]
    Io(String),
}

/// The endpoint's tunnel address.
pub const NSE_TUNNEL_IP: &str = "198.18.231.1";
/// The server behind the peer (the peer's tunnel address).
pub const BEHIND: &str = "198.19.230.1:8080";
pub const ALLOWED: &str = "198.19.230.0/24";
const PEER_UNDERLAY: &str = "198.18.230.2";
const PORT: u16 = 51820;

pub fn behind() -> SocketAddr {
    BEHIND.parse().expect("literal")
}

/// Both ends' keys, the endpoint's in a file the vpn function reads.
pub struct VpnKeys {
    pub nse_key_file: PathBuf,
    peer_key_file: PathBuf,
    nse_public: String,
    peer_public: String,
}

impl VpnKeys {
    /// Fresh keys, written under `dir`.
    pub fn generate(dir: &Path) -> std::io::Result<VpnKeys> {
        let (nse, peer) = (
            wireguard::generate_private_key()?,
            wireguard::generate_private_key()?,
        );
        let keys = VpnKeys {
            nse_key_file: dir.join("vpn-nse.key"),
            peer_key_file: dir.join("vpn-peer.key"),
            nse_public: wireguard::encode_key(&wireguard::public_key(&nse)),
            peer_public: wireguard::encode_key(&wireguard::public_key(&peer)),
        };
        std::fs::write(&keys.nse_key_file, wireguard::encode_key(&nse))?;
        std::fs::write(&keys.peer_key_file, wireguard::encode_key(&peer))?;
        Ok(keys)
    }

    /// The vpn function instance for `NSM_CONFIG` version 2 (indented as
    /// an entry of `functions:`).
    pub fn function_yaml(&self, name: &str) -> String {
        format!(
            "  {name}:\n    type: vpn\n    privateKeyFile: {}\n    address: [{NSE_TUNNEL_IP}/32]\n    peer:\n      publicKey: {}\n      endpoint: {PEER_UNDERLAY}:{PORT}\n      allowedIps: [{ALLOWED}]\n",
            self.nse_key_file.display(),
            self.peer_public
        )
    }
}

/// The running peer; its namespace and processes go when dropped.
pub struct VpnPeer {
    // Processes first: they stop before their namespace goes.
    server: Process,
    wg: Process,
    pub ns: Namespace,
}

impl VpnPeer {
    /// Links a new peer namespace to `nse_ns` and starts the peer and its
    /// server; returns once the endpoint's side of the underlay has its
    /// IPv6 link-local address (so a snapshot taken after does not see it
    /// appear later).
    pub fn start(nse_ns: &Namespace, keys: &VpnKeys, dir: &Path) -> Result<VpnPeer, VpnPeerError> {
        let ns = Namespace::create("mp-wgpeer")?;
        nse_ns.ip(&format!(
            "link add wgu-nse type veth peer name wgu-peer netns {}",
            ns.name()
        ))?;
        nse_ns.ip("addr add 198.18.230.1/30 dev wgu-nse")?;
        nse_ns.ip("link set wgu-nse up")?;
        ns.ip(&format!("addr add {PEER_UNDERLAY}/30 dev wgu-peer"))?;
        ns.ip("link set wgu-peer up")?;
        ns.ip("link set lo up")?;
        let rules = dir.join("vpn-peer-counters.nft");
        std::fs::write(
            &rules,
            format!(
                "table inet wgcount {{\n chain under {{\n  type filter hook prerouting priority -300;\n  iifname \"wgu-peer\" udp dport {PORT} counter comment \"wireguard\"\n  iifname \"wgu-peer\" ip daddr {} counter comment \"clear\"\n }}\n}}\n",
                behind().ip()
            ),
        )
        .map_err(|e| VpnPeerError::Io(format!("{}: {e}", rules.display())))?;
        ns.exec(&["nft", "-f", &rules.display().to_string()])?;
        let mut cmd = ns.command(process::bin("wg-peer"));
        cmd.args(["--interface", "wg-peer0"])
            .args(["--address", &format!("{}/32", behind().ip())])
            .args([
                "--private-key-file",
                &keys.peer_key_file.display().to_string(),
            ])
            .args(["--peer-public-key", &keys.nse_public])
            .args(["--allowed-ip", &format!("{NSE_TUNNEL_IP}/32")])
            .args(["--listen-port", &PORT.to_string()]);
        let mut wg = Process::spawn("wg-peer", &mut cmd, &dir.join("wg-peer.log"))?;
        wg.wait_until("wg-peer up", Duration::from_secs(10), |p| {
            p.log().contains(" up,").then_some(())
        })?;
        let mut cmd = ns.command(process::bin("hello-server"));
        cmd.args(["--listen", BEHIND]);
        let mut server = Process::spawn(
            "server behind the peer",
            &mut cmd,
            &dir.join("behind-server.log"),
        )?;
        crate::proxy::wait_listening(&mut server, behind().port(), Duration::from_secs(10))?;
        for _ in 0..100 {
            if nse_ns
                .ip("-6 route show table local dev wgu-nse")?
                .contains("local fe80")
            {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(VpnPeer { server, wg, ns })
    }

    /// Packets counted on the peer's underlay: (WireGuard UDP to its port,
    /// anything addressed to the server behind it in clear).
    pub fn counters(&self) -> Result<(u64, u64), VpnPeerError> {
        let listed = self.ns.exec(&["nft", "list", "table", "inet", "wgcount"])?;
        let packets = |tag: &str| -> Result<u64, VpnPeerError> {
            listed
                .lines()
                .find(|l| l.contains(&format!("comment \"{tag}\"")))
                .and_then(|l| l.split("packets ").nth(1))
                .and_then(|r| r.split_whitespace().next())
                .and_then(|n| n.parse().ok())
                .ok_or_else(|| VpnPeerError::Io(format!("no {tag} counter in:\n{listed}")))
        };
        Ok((packets("wireguard")?, packets("clear")?))
    }

    /// The peer's and its server's last log lines.
    pub fn logs(&self) -> String {
        format!(
            "\n--- wg-peer: {}\n--- server behind the peer: {}",
            self.wg.tail(),
            self.server.tail()
        )
    }
}
