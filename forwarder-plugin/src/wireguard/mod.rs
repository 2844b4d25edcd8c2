//! A WireGuard tunnel to one peer, in userspace: a TUN interface in the
//! calling thread's netns and a UDP socket, with the Noise protocol from
//! boringtun (for kernels without the wireguard module, as the test
//! kernels here). Packets the kernel routes to the interface leave as
//! WireGuard UDP to the peer; what the peer sends is decrypted and handed
//! to the kernel only if its inner source is one of the peer's allowed IPs
//! (WireGuard's cryptokey routing).
//!
//! ```text
//!  kernel route → TUN → encapsulate → UDP → peer
//!  peer → UDP → decapsulate → allowed-IPs check → TUN → kernel
//! ```

mod tun;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use base64::Engine;
use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};
use ipnet::IpNet;
use tokio::net::UdpSocket;

use crate::link::{AddrOptions, LinkError, Links, RouteSpec};
use crate::netns::{Netns, NetnsError};
pub use tun::Tun;

#[derive(Debug, thiserror::Error)]
pub enum WgError {
    #[error("{what}: not a WireGuard key (32 bytes, base64): {why}")]
    Key { what: String, why: String },
    #[error("the TUN interface {name}: {source}")]
    Tun {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("UDP port {port}: {source}")]
    Udp {
        port: u16,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("interface {name}: {source}")]
    Link {
        name: String,
        #[source]
        source: LinkError,
    },
}

/// A key as `wg` writes it: 32 bytes in base64.
pub fn parse_key(what: &str, text: &str) -> Result<[u8; 32], WgError> {
    let bad = |why: String| WgError::Key {
        what: what.to_owned(),
        why,
    };
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .map_err(|e| bad(e.to_string()))?;
    bytes
        .try_into()
        .map_err(|b: Vec<u8>| bad(format!("{} bytes", b.len())))
}

pub fn encode_key(key: &[u8; 32]) -> String {
    base64::engine::general_purpose::STANDARD.encode(key)
}

/// The public key of `private`.
pub fn public_key(private: &[u8; 32]) -> [u8; 32] {
    PublicKey::from(&StaticSecret::from(*private)).to_bytes()
}

/// A fresh private key from the kernel's random source.
pub fn generate_private_key() -> std::io::Result<[u8; 32]> {
    let mut k = [0u8; 32];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut k)?;
    // Clamped as X25519 wants it (and as `wg genkey` prints it).
    k[0] &= 248;
    k[31] &= 127;
    k[31] |= 64;
    Ok(k)
}

/// The one peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerSpec {
    pub public_key: [u8; 32],
    /// Where to send; `None`: learnt from the peer's first valid packet.
    pub endpoint: Option<SocketAddr>,
    /// Inner addresses the peer may send from, and that are routed to it.
    pub allowed_ips: Vec<IpNet>,
    pub persistent_keepalive: Option<u16>,
}

/// A private key; never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct PrivateKey(pub [u8; 32]);

impl std::fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PrivateKey(<redacted>)")
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunnelSpec {
    pub interface: String,
    pub private_key: PrivateKey,
    pub listen_port: u16,
    /// The interface's own addresses.
    pub addresses: Vec<IpNet>,
    pub peer: PeerSpec,
}

/// What the tunnel counted.
#[derive(Debug, Default)]
pub struct Counters {
    /// Packets sent into the tunnel / received out of it (inner packets).
    pub tx_packets: AtomicU64,
    pub rx_packets: AtomicU64,
    /// Inner packets from the peer with a source outside its allowed IPs.
    pub rx_refused: AtomicU64,
    /// UDP datagrams sent / received (handshakes and keepalives included).
    pub udp_tx: AtomicU64,
    pub udp_rx: AtomicU64,
}

/// A running tunnel; dropping it stops it and the interface goes.
pub struct Tunnel {
    task: tokio::task::JoinHandle<()>,
    pub counters: Arc<Counters>,
    pub local_port: u16,
}

impl Drop for Tunnel {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Room for any packet the interface's MTU allows, plus WireGuard's overhead.
const BUF: usize = 65_535 + 32;
/// WireGuard's overhead below a 1500-byte underlay: 1420 like `wg-quick`.
const MTU: u32 = 1420;

/// Brings the tunnel up in the calling thread's netns: the TUN interface
/// with its addresses, up, with a route per allowed IP, and the UDP socket.
pub async fn start(spec: &TunnelSpec) -> Result<Tunnel, WgError> {
    let tun = Tun::create(&spec.interface).map_err(|source| WgError::Tun {
        name: spec.interface.clone(),
        source,
    })?;
    let bind: SocketAddr = match spec.peer.endpoint {
        Some(SocketAddr::V6(_)) => (std::net::Ipv6Addr::UNSPECIFIED, spec.listen_port).into(),
        _ => (std::net::Ipv4Addr::UNSPECIFIED, spec.listen_port).into(),
    };
    let udp = UdpSocket::bind(bind).await.map_err(|source| WgError::Udp {
        port: spec.listen_port,
        source,
    })?;
    let local_port = udp
        .local_addr()
        .map(|a| a.port())
        .unwrap_or(spec.listen_port);
    configure(spec).await?;
    let tunn = Tunn::new(
        StaticSecret::from(spec.private_key.0),
        PublicKey::from(spec.peer.public_key),
        None,
        spec.peer.persistent_keepalive,
        rand_index(),
        None,
    );
    let counters = Arc::new(Counters::default());
    let task = tokio::spawn(run(
        tun,
        udp,
        tunn,
        spec.peer.clone(),
        counters.clone(),
        spec.interface.clone(),
    ));
    Ok(Tunnel {
        task,
        counters,
        local_port,
    })
}

fn rand_index() -> u32 {
    let mut b = [0u8; 4];
    let _ = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b));
    u32::from_ne_bytes(b) >> 8
}

async fn configure(spec: &TunnelSpec) -> Result<(), WgError> {
    let name = &spec.interface;
    let link_err = |source| WgError::Link {
        name: name.clone(),
        source,
    };
    let links = Links::open(&Netns::current()?).map_err(link_err)?;
    let index = links
        .link(name)
        .await
        .map_err(link_err)?
        .ok_or_else(|| {
            link_err(LinkError::InvalidRequest(format!(
                "{name} vanished after creation"
            )))
        })?
        .index;
    links.set_mtu(index, MTU).await.map_err(link_err)?;
    for a in &spec.addresses {
        links
            .add_address(index, *a, AddrOptions { nodad: true })
            .await
            .map_err(link_err)?;
    }
    links.set_up(index).await.map_err(link_err)?;
    for net in &spec.peer.allowed_ips {
        links
            .add_route(index, &RouteSpec::direct(*net))
            .await
            .map_err(link_err)?;
    }
    Ok(())
}

fn allowed(peer: &PeerSpec, src: IpAddr) -> bool {
    peer.allowed_ips.iter().any(|n| n.contains(&src))
}

async fn run(
    tun: Tun,
    udp: UdpSocket,
    mut tunn: Tunn,
    mut peer: PeerSpec,
    c: Arc<Counters>,
    name: String,
) {
    let mut from_tun = vec![0u8; BUF];
    let mut from_udp = vec![0u8; BUF];
    let mut out = vec![0u8; BUF];
    let mut timers = tokio::time::interval(Duration::from_millis(250));
    let count = |a: &AtomicU64| a.fetch_add(1, Ordering::Relaxed);
    loop {
        tokio::select! {
            r = tun.recv(&mut from_tun) => {
                let n = match r {
                    Ok(n) => n,
                    Err(e) => {
                        tracing::error!(interface = %name, error = %e, "the TUN interface failed: the tunnel stops");
                        return;
                    }
                };
                match tunn.encapsulate(&from_tun[..n], &mut out) {
                    TunnResult::WriteToNetwork(p) => {
                        if let Some(to) = peer.endpoint && udp.send_to(p, to).await.is_ok() {
                            count(&c.udp_tx);
                        }
                        count(&c.tx_packets);
                    }
                    TunnResult::Err(e) => tracing::debug!(interface = %name, error = ?e, "cannot encapsulate"),
                    _ => {}
                }
            }
            r = udp.recv_from(&mut from_udp) => {
                let Ok((n, src)) = r else { continue };
                count(&c.udp_rx);
                let mut datagram = &from_udp[..n];
                loop {
                    match tunn.decapsulate(Some(src.ip()), datagram, &mut out) {
                        TunnResult::WriteToNetwork(p) => {
                            // A valid packet from the peer: it is where it says.
                            peer.endpoint = Some(src);
                            if udp.send_to(p, src).await.is_ok() {
                                count(&c.udp_tx);
                            }
                            // Queued packets follow on empty calls.
                            datagram = &[];
                            continue;
                        }
                        TunnResult::WriteToTunnelV4(p, from) => {
                            peer.endpoint = Some(src);
                            deliver(&tun, &peer, &c, p, from.into()).await;
                        }
                        TunnResult::WriteToTunnelV6(p, from) => {
                            peer.endpoint = Some(src);
                            deliver(&tun, &peer, &c, p, from.into()).await;
                        }
                        TunnResult::Err(e) => tracing::debug!(interface = %name, %src, error = ?e, "refused a datagram"),
                        TunnResult::Done => {}
                    }
                    break;
                }
            }
            _ = timers.tick() => {
                if let TunnResult::WriteToNetwork(p) = tunn.update_timers(&mut out)
                    && let Some(to) = peer.endpoint
                    && udp.send_to(p, to).await.is_ok()
                {
                    count(&c.udp_tx);
                }
            }
        }
    }
}

async fn deliver(tun: &Tun, peer: &PeerSpec, c: &Counters, packet: &[u8], from: IpAddr) {
    // An empty packet is a keepalive.
    if packet.is_empty() {
        return;
    }
    if !allowed(peer, from) {
        c.rx_refused.fetch_add(1, Ordering::Relaxed);
        return;
    }
    if tun.send(packet).await.is_ok() {
        c.rx_packets.fetch_add(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_bad_ones_say_why() {
        let k = generate_private_key().unwrap();
        assert_eq!(parse_key("k", &encode_key(&k)).unwrap(), k);
        assert_ne!(public_key(&k), k);
        let e = parse_key("privateKeyFile", "abc").unwrap_err().to_string();
        assert!(e.starts_with("privateKeyFile: not a WireGuard key"), "{e}");
        let e = parse_key("peer.publicKey", &encode_key(&[1; 32])[..40]).unwrap_err();
        assert!(e.to_string().contains("peer.publicKey"), "{e}");
    }
}
