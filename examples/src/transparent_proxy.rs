//! A small transparent TCP proxy, the demo's stand-in for Envoy when HAProxy
//! is not installed: it accepts connections that a NAT REDIRECT rule sent to
//! its port, reads where they were going (`SO_ORIGINAL_DST`), connects there
//! itself, copies bytes both ways and logs one line per connection:
//! `proxy: <client> -> <original destination>`.
//!
//! Its own connections must not be redirected back into it: run it as the
//! uid the rules exclude (1337, istio's proxy uid).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use nix::sys::socket::{getsockopt, sockopt};
use tokio::net::{TcpListener, TcpStream};

/// istio's outbound and inbound capture ports.
pub const DEFAULT_PORTS: [u16; 2] = [15001, 15006];
/// istio's proxy uid and gid, which the redirect rules exclude.
pub const PROXY_UID: u32 = 1337;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("accepted socket: {0}")]
    Socket(#[source] std::io::Error),
    #[error("cannot read SO_ORIGINAL_DST: {0} (was the connection redirected by a NAT rule?)")]
    OriginalDst(#[source] nix::Error),
    #[error("not redirected: the original destination is the proxy itself ({0})")]
    NotRedirected(SocketAddr),
    #[error("cannot connect to {dst}: {source}")]
    Connect {
        dst: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("connecting to {0} timed out")]
    ConnectTimeout(SocketAddr),
}

/// The line logged for a proxied connection.
pub fn log_line(client: SocketAddr, dst: SocketAddr) -> String {
    format!("proxy: {client} -> {dst}")
}

/// `(client, destination)` of a [`log_line`], also HAProxy's with the demo's
/// `log-format "proxy: %ci:%cp -> %si:%sp"` (IPv4 there: HAProxy writes no
/// brackets around IPv6 addresses).
pub fn parse_log_line(line: &str) -> Option<(SocketAddr, SocketAddr)> {
    let rest = line.trim().strip_prefix("proxy: ")?;
    let (client, dst) = rest.split_once(" -> ")?;
    Some((
        parse_addr(client)?,
        parse_addr(dst.split_whitespace().next()?)?,
    ))
}

/// The destination a proxy log (ours or HAProxy's) names for a connection
/// from `client`.
pub fn find_in_log(log: &str, client: SocketAddr) -> Option<SocketAddr> {
    log.lines()
        .filter_map(parse_log_line)
        .find(|(c, _)| unmap(*c) == unmap(client))
        .map(|(_, d)| d)
}

fn parse_addr(s: &str) -> Option<SocketAddr> {
    s.parse().ok().or_else(|| {
        let (ip, port) = s.rsplit_once(':')?;
        Some(SocketAddr::new(ip.parse().ok()?, port.parse().ok()?))
    })
}

/// v4-mapped IPv6 (how a dual-stack listener sees IPv4 clients) as IPv4.
pub fn unmap(a: SocketAddr) -> SocketAddr {
    match a {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), v6.port()),
            None => a,
        },
        SocketAddr::V4(_) => a,
    }
}

/// Where a NAT-redirected connection was going.
pub fn original_dst(s: &TcpStream) -> Result<SocketAddr, ProxyError> {
    let local = s.local_addr().map_err(ProxyError::Socket)?;
    let is_v4 = match local {
        SocketAddr::V4(_) => true,
        // A v4 client on a dual-stack socket appears as ::ffff:a.b.c.d and
        // conntrack holds its v4 tuple.
        SocketAddr::V6(a) => a.ip().to_ipv4_mapped().is_some(),
    };
    if is_v4 {
        let a = getsockopt(s, sockopt::OriginalDst).map_err(ProxyError::OriginalDst)?;
        Ok(SocketAddr::new(
            IpAddr::V4(Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr))),
            u16::from_be(a.sin_port),
        ))
    } else {
        let a = getsockopt(s, sockopt::Ip6tOriginalDst).map_err(ProxyError::OriginalDst)?;
        Ok(SocketAddr::new(
            IpAddr::V6(Ipv6Addr::from(a.sin6_addr.s6_addr)),
            u16::from_be(a.sin6_port),
        ))
    }
}

/// Proxies one accepted connection to its original destination.
async fn relay(mut inbound: TcpStream, client: SocketAddr) -> Result<(u64, u64), ProxyError> {
    let dst = original_dst(&inbound)?;
    if inbound.local_addr().is_ok_and(|l| l == dst) {
        // Connecting there would loop through us forever.
        return Err(ProxyError::NotRedirected(dst));
    }
    println!("{}", log_line(unmap(client), dst));
    let mut outbound = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(dst))
        .await
        .map_err(|_| ProxyError::ConnectTimeout(dst))?
        .map_err(|source| ProxyError::Connect { dst, source })?;
    // Copy errors (a reset by either side) just end the connection.
    Ok(tokio::io::copy_bidirectional(&mut inbound, &mut outbound)
        .await
        .unwrap_or((0, 0)))
}

/// Accepts on every listener until one fails; each connection is relayed on
/// its own task.
pub async fn run(listeners: Vec<TcpListener>) -> std::io::Result<()> {
    let mut tasks = tokio::task::JoinSet::new();
    for l in listeners {
        tasks.spawn(async move {
            loop {
                let (s, client) = l.accept().await?;
                tokio::spawn(async move {
                    if let Err(e) = relay(s, client).await {
                        println!("proxy: {}: {e}", unmap(client));
                    }
                });
            }
            #[allow(unreachable_code)]
            Ok::<(), std::io::Error>(())
        });
    }
    while let Some(res) = tasks.join_next().await {
        res.map_err(std::io::Error::other)??;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_lines_parse_ours_and_haproxys() {
        let c: SocketAddr = "198.18.0.1:40000".parse().unwrap();
        let d: SocketAddr = "198.18.100.2:8080".parse().unwrap();
        assert_eq!(parse_log_line(&log_line(c, d)), Some((c, d)));
        let c6: SocketAddr = "[fd00::1]:40000".parse().unwrap();
        assert_eq!(parse_log_line(&log_line(c6, d)), Some((c6, d)));
        assert_eq!(
            parse_log_line("proxy: 198.18.0.1:40000 -> 198.18.100.2:8080\n"),
            Some((c, d))
        );
        assert_eq!(
            parse_log_line("proxy: 198.18.0.1:40000: not redirected"),
            None
        );
    }

    #[tokio::test]
    async fn a_direct_connection_is_refused_not_looped() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(run(vec![l]));
        let mut c = TcpStream::connect(addr).await.unwrap();
        let mut buf = Vec::new();
        // No NAT entry: the proxy closes without connecting anywhere.
        let n = tokio::io::AsyncReadExt::read_to_end(&mut c, &mut buf)
            .await
            .unwrap_or(0);
        assert_eq!(n, 0);
    }
}
