//! A "pod" namespace joined by a veth pair to a "peer" namespace, identity
//! servers that answer with who they are and what they saw, and clients
//! that connect from inside a namespace as a given uid/gid or with a socket
//! mark. Shared by the redirect suites and any suite that needs traffic.
//!
//! ```text
//!   pod  198.18.0.2/24 fd00::2/64  ──veth──  198.18.0.1/24 fd00::1/64  peer
//!                                            lo: 198.19.1.1 198.19.2.1
//!                                                fd00:1::1 fd00:2::1
//! ```
//! The pod routes 198.19.0.0/16, fd00:1::/64 and fd00:2::/64 via the peer;
//! nothing leads out of the pair.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use forwarder_plugin::netns::Netns;
use nix::sys::socket::{
    self, AddressFamily, Backlog, SockFlag, SockType, SockaddrStorage, sockopt,
};
use nix::sys::time::{TimeVal, TimeValLike};

use crate::netns::TestNetns;

pub const POD_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
pub const PEER_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
pub const POD_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 2);
pub const PEER_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1);
/// Addresses on the peer's loopback, reached through the veth.
pub const FAR_V4: [Ipv4Addr; 2] = [Ipv4Addr::new(198, 19, 1, 1), Ipv4Addr::new(198, 19, 2, 1)];
pub const FAR_V6: [Ipv6Addr; 2] = [
    Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, 1),
    Ipv6Addr::new(0xfd00, 2, 0, 0, 0, 0, 0, 1),
];

const IO_TIMEOUT: Duration = Duration::from_secs(3);

/// The two namespaces and the veth between them; both removed on drop.
pub struct PodPeer {
    pub pod: TestNetns,
    pub peer: TestNetns,
    pub pod_ns: Netns,
    pub peer_ns: Netns,
    /// The pod end of the veth (the peer end is `peer_if`).
    pub pod_if: String,
    pub peer_if: String,
}

impl PodPeer {
    pub fn new() -> Self {
        let pod = TestNetns::new("pod");
        let peer = TestNetns::new("peer");
        let pod_if = crate::unique("vp");
        let peer_if = crate::unique("vq");
        // The peer end is created directly in the peer namespace.
        pod.exec_ok(&[
            "ip",
            "link",
            "add",
            &pod_if,
            "type",
            "veth",
            "peer",
            "name",
            &peer_if,
            "netns",
            peer.name(),
        ]);
        let (pv4, qv4) = (format!("{POD_V4}/24"), format!("{PEER_V4}/24"));
        let (pv6, qv6) = (format!("{POD_V6}/64"), format!("{PEER_V6}/64"));
        pod.exec_ok(&["ip", "addr", "add", &pv4, "dev", &pod_if]);
        pod.exec_ok(&["ip", "-6", "addr", "add", &pv6, "dev", &pod_if, "nodad"]);
        pod.exec_ok(&["ip", "link", "set", &pod_if, "up"]);
        peer.exec_ok(&["ip", "addr", "add", &qv4, "dev", &peer_if]);
        peer.exec_ok(&["ip", "-6", "addr", "add", &qv6, "dev", &peer_if, "nodad"]);
        peer.exec_ok(&["ip", "link", "set", &peer_if, "up"]);
        for a in FAR_V4 {
            peer.exec_ok(&["ip", "addr", "add", &format!("{a}/32"), "dev", "lo"]);
        }
        for a in FAR_V6 {
            peer.exec_ok(&["ip", "-6", "addr", "add", &format!("{a}/128"), "dev", "lo"]);
        }
        pod.exec_ok(&[
            "ip",
            "route",
            "add",
            "198.19.0.0/16",
            "via",
            &PEER_V4.to_string(),
        ]);
        for net in ["fd00:1::/64", "fd00:2::/64"] {
            pod.exec_ok(&["ip", "-6", "route", "add", net, "via", &PEER_V6.to_string()]);
        }
        let pod_ns = Netns::open(pod.name()).expect("open pod netns");
        let peer_ns = Netns::open(peer.name()).expect("open peer netns");
        PodPeer {
            pod,
            peer,
            pod_ns,
            peer_ns,
            pod_if,
            peer_if,
        }
    }
}

impl Default for PodPeer {
    fn default() -> Self {
        Self::new()
    }
}

/// What an identity server answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The server's label, e.g. `pod-out`, `peer`.
    pub label: String,
    /// The address the connection arrived at (its local address).
    pub local: SocketAddr,
    /// The client address the server saw.
    pub from: SocketAddr,
    /// `SO_ORIGINAL_DST` (NAT-redirected TCP connections only).
    pub orig: Option<SocketAddr>,
}

impl Reply {
    fn line(&self) -> String {
        format!(
            "{} local={} from={} orig={}\n",
            self.label,
            self.local,
            self.from,
            self.orig.map_or("-".to_owned(), |o| o.to_string())
        )
    }

    pub fn parse(text: &str) -> Option<Reply> {
        let mut it = text.split_whitespace();
        let label = it.next()?.to_owned();
        let mut field = |k: &str| it.next()?.strip_prefix(k).map(str::to_owned);
        let local = field("local=")?.parse().ok()?;
        let from = field("from=")?.parse().ok()?;
        let orig = match field("orig=")?.as_str() {
            "-" => None,
            o => Some(o.parse().ok()?),
        };
        Some(Reply {
            label,
            local,
            from,
            orig,
        })
    }
}

fn family(addr: &SocketAddr) -> AddressFamily {
    match addr {
        SocketAddr::V4(_) => AddressFamily::Inet,
        SocketAddr::V6(_) => AddressFamily::Inet6,
    }
}

fn new_socket(addr: &SocketAddr, ty: SockType) -> std::io::Result<OwnedFd> {
    Ok(socket::socket(
        family(addr),
        ty,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?)
}

fn original_dst(s: &TcpStream) -> Option<SocketAddr> {
    match s.local_addr().ok()? {
        SocketAddr::V4(_) => {
            let a = socket::getsockopt(s, sockopt::OriginalDst).ok()?;
            Some(SocketAddr::new(
                IpAddr::V4(Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr))),
                u16::from_be(a.sin_port),
            ))
        }
        SocketAddr::V6(_) => {
            let a = socket::getsockopt(s, sockopt::Ip6tOriginalDst).ok()?;
            Some(SocketAddr::new(
                IpAddr::V6(Ipv6Addr::from(a.sin6_addr.s6_addr)),
                u16::from_be(a.sin6_port),
            ))
        }
    }
}

/// A server thread answering every connection (or datagram) with a
/// [`Reply`] line; stopped and joined on drop.
pub struct IdentityServer {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    fd: Arc<OwnedFd>,
    thread: Option<JoinHandle<()>>,
}

impl IdentityServer {
    /// TCP on `addr` inside `ns` (IPv6 sockets are v6-only, so a v4 and a
    /// v6 server can share a port). `transparent`: `IP_TRANSPARENT`, as a
    /// TPROXY listener needs.
    pub fn tcp(ns: &Netns, addr: SocketAddr, label: &str, transparent: bool) -> Self {
        let fd = ns
            .run(|| -> std::io::Result<OwnedFd> {
                let fd = new_socket(&addr, SockType::Stream)?;
                socket::setsockopt(&fd, sockopt::ReuseAddr, &true)?;
                if addr.is_ipv6() {
                    socket::setsockopt(&fd, sockopt::Ipv6V6Only, &true)?;
                }
                if transparent {
                    socket::setsockopt(&fd, sockopt::IpTransparent, &true)?;
                }
                socket::bind(fd.as_raw_fd(), &SockaddrStorage::from(addr))?;
                socket::listen(&fd, Backlog::new(64).expect("backlog"))?;
                Ok(fd)
            })
            .expect("enter netns")
            .unwrap_or_else(|e| panic!("listen {label} on {addr}: {e}"));
        let fd = Arc::new(fd);
        let listener = TcpListener::from(fd.try_clone().expect("dup listener"));
        let stop = Arc::new(AtomicBool::new(false));
        let (label, stop2) = (label.to_owned(), stop.clone());
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stop2.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(mut s) = conn else { continue };
                let (Ok(local), Ok(from)) = (s.local_addr(), s.peer_addr()) else {
                    continue;
                };
                let reply = Reply {
                    label: label.clone(),
                    local,
                    from,
                    orig: original_dst(&s),
                };
                let _ = s.write_all(reply.line().as_bytes());
            }
        });
        IdentityServer {
            addr,
            stop,
            fd,
            thread: Some(thread),
        }
    }

    /// UDP on `addr` inside `ns`: answers each datagram.
    pub fn udp(ns: &Netns, addr: SocketAddr, label: &str) -> Self {
        Self::udp_owned(ns, addr, label, None)
    }

    /// Like [`IdentityServer::udp`], with the socket owned by `uid` (what
    /// owner matches see for its replies), e.g. a DNS proxy running as the
    /// proxy's uid. Bind it to the address redirected packets arrive at
    /// (127.0.0.1 / ::1 for locally generated traffic): a wildcard UDP socket
    /// would answer from another source and the NAT could not be undone.
    pub fn udp_owned(ns: &Netns, addr: SocketAddr, label: &str, uid: Option<u32>) -> Self {
        let fd = ns
            .run(|| -> std::io::Result<OwnedFd> {
                let fd = Client {
                    uid,
                    ..Default::default()
                }
                .owned_socket(&addr, SockType::Datagram)?;
                if addr.is_ipv6() {
                    socket::setsockopt(&fd, sockopt::Ipv6V6Only, &true)?;
                }
                socket::bind(fd.as_raw_fd(), &SockaddrStorage::from(addr))?;
                Ok(fd)
            })
            .expect("enter netns")
            .unwrap_or_else(|e| panic!("bind {label} on {addr}: {e}"));
        let fd = Arc::new(fd);
        let sock = UdpSocket::from(fd.try_clone().expect("dup socket"));
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .expect("timeout");
        let stop = Arc::new(AtomicBool::new(false));
        let (label, stop2) = (label.to_owned(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 512];
            while !stop2.load(Ordering::SeqCst) {
                let Ok((_, from)) = sock.recv_from(&mut buf) else {
                    continue;
                };
                let reply = Reply {
                    label: label.clone(),
                    local: sock.local_addr().expect("bound"),
                    from,
                    orig: None,
                };
                let _ = sock.send_to(reply.line().as_bytes(), from);
            }
        });
        IdentityServer {
            addr,
            stop,
            fd,
            thread: Some(thread),
        }
    }
}

impl Drop for IdentityServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes a blocked accept() (it fails with EINVAL).
        let _ = socket::shutdown(self.fd.as_raw_fd(), socket::Shutdown::Both);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Who a client connection claims to be.
#[derive(Debug, Clone, Copy, Default)]
pub struct Client {
    /// The socket is created with this fs uid (what `skuid`/`--uid-owner` see).
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    /// `SO_MARK` on the socket.
    pub mark: Option<u32>,
    /// Bind this source port (to reuse a 4-tuple on purpose).
    pub src_port: Option<u16>,
}

impl Client {
    pub fn uid(uid: u32) -> Self {
        Client {
            uid: Some(uid),
            ..Default::default()
        }
    }

    pub fn gid(gid: u32) -> Self {
        Client {
            gid: Some(gid),
            ..Default::default()
        }
    }

    pub fn mark(mark: u32) -> Self {
        Client {
            mark: Some(mark),
            ..Default::default()
        }
    }

    /// A socket owned by this identity. The owner match of netfilter looks
    /// at the credentials the socket's file was created with, so switching
    /// the (per-thread) fs ids around `socket()` is enough; the thread is
    /// the short-lived one of `Netns::run`.
    fn owned_socket(&self, to: &SocketAddr, ty: SockType) -> std::io::Result<OwnedFd> {
        use nix::unistd::{Gid, Uid, setfsgid, setfsuid};
        if let Some(g) = self.gid {
            setfsgid(Gid::from_raw(g));
        }
        if let Some(u) = self.uid {
            setfsuid(Uid::from_raw(u));
        }
        let fd = new_socket(to, ty);
        setfsuid(Uid::from_raw(0));
        setfsgid(Gid::from_raw(0));
        fd
    }

    fn socket(&self, to: &SocketAddr, ty: SockType) -> std::io::Result<OwnedFd> {
        let fd = self.owned_socket(to, ty)?;
        if let Some(m) = self.mark {
            socket::setsockopt(&fd, sockopt::Mark, &m)?;
        }
        if let Some(p) = self.src_port {
            socket::setsockopt(&fd, sockopt::ReuseAddr, &true)?;
            socket::bind(fd.as_raw_fd(), &SockaddrStorage::from(any(to.is_ipv6(), p)))?;
        }
        let t = TimeVal::milliseconds(IO_TIMEOUT.as_millis() as i64);
        // SO_SNDTIMEO also bounds connect() on Linux.
        socket::setsockopt(&fd, sockopt::SendTimeout, &t)?;
        socket::setsockopt(&fd, sockopt::ReceiveTimeout, &t)?;
        Ok(fd)
    }

    /// Connects from inside `ns` to `to` and reads the server's reply.
    /// Returns the reply and the client's own local address.
    pub fn tcp(&self, ns: &Netns, to: SocketAddr) -> std::io::Result<(Reply, SocketAddr)> {
        let me = *self;
        ns.run(move || -> std::io::Result<(Reply, SocketAddr)> {
            let fd = me.socket(&to, SockType::Stream)?;
            socket::connect(fd.as_raw_fd(), &SockaddrStorage::from(to))?;
            let mut s = TcpStream::from(fd);
            let local = s.local_addr()?;
            let mut text = String::new();
            s.read_to_string(&mut text)?;
            let reply = Reply::parse(&text).ok_or_else(|| {
                std::io::Error::other(format!("unexpected reply {text:?} from {to}"))
            })?;
            Ok((reply, local))
        })
        .map_err(std::io::Error::other)?
    }

    /// Sends one datagram from inside `ns` to `to` and reads the reply.
    pub fn udp(&self, ns: &Netns, to: SocketAddr) -> std::io::Result<Reply> {
        let me = *self;
        ns.run(move || -> std::io::Result<Reply> {
            let fd = me.socket(&to, SockType::Datagram)?;
            let s = UdpSocket::from(fd);
            s.connect(to)?;
            s.send(b"who?")?;
            let mut buf = [0u8; 512];
            let n = s.recv(&mut buf)?;
            let text = String::from_utf8_lossy(&buf[..n]);
            Reply::parse(&text)
                .ok_or_else(|| std::io::Error::other(format!("unexpected reply {text:?}")))
        })
        .map_err(std::io::Error::other)?
    }
}

/// `addr:port` helpers.
pub fn v4(a: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(a), port)
}

pub fn v6(a: Ipv6Addr, port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V6(a), port)
}

/// The unspecified address of `addr`'s family with `port`.
pub fn any(v6: bool, port: u16) -> SocketAddr {
    if v6 {
        SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port)
    } else {
        SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port)
    }
}
