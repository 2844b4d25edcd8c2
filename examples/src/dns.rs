//! A minimal DNS server and client over UDP, real wire format (RFC 1035):
//! the lab's "cluster DNS" answers every A query with one address, so a
//! test can tell which server answered a pod's query by the address it got.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::time::Duration;

use crate::namespace::{Namespace, NamespaceError};

#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error(transparent)]
    Namespace(#[from] NamespaceError),
    #[error("DNS query for {name} to {server}: {source}")]
    Io {
        name: String,
        server: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("DNS answer from {server} for {name}: {why}")]
    Answer {
        name: String,
        server: SocketAddr,
        why: String,
    },
}

const TYPE_A: u16 = 1;
const CLASS_IN: u16 = 1;

/// A query for `name`'s A record with id `id`.
pub fn query(id: u16, name: &str) -> Vec<u8> {
    let mut q = Vec::with_capacity(32 + name.len());
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00]); // recursion desired
    q.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]); // one question
    for label in name.trim_end_matches('.').split('.') {
        q.push(label.len().min(63) as u8);
        q.extend_from_slice(&label.as_bytes()[..label.len().min(63)]);
    }
    q.push(0);
    q.extend_from_slice(&TYPE_A.to_be_bytes());
    q.extend_from_slice(&CLASS_IN.to_be_bytes());
    q
}

/// The answer to `query` (one A record `addr` for an A query; NOTIMP for
/// anything that is not one plain question), `None` for what is not a query.
pub fn answer(query: &[u8], addr: Ipv4Addr) -> Option<Vec<u8>> {
    if query.len() < 12 || query[2] & 0x80 != 0 {
        return None;
    }
    // The question: labels, then type and class.
    let mut end = 12;
    while end < query.len() && query[end] != 0 {
        end += 1 + usize::from(query[end]);
    }
    let question = query.get(12..end + 5)?;
    let qtype = u16::from_be_bytes([question[question.len() - 4], question[question.len() - 3]]);
    let mut r = Vec::with_capacity(query.len() + 16);
    r.extend_from_slice(&query[..2]);
    let ok = query[4..6] == [0, 1] && qtype == TYPE_A;
    r.push(0x81); // response, recursion desired
    r.push(if ok { 0x80 } else { 0x84 }); // recursion available; NOTIMP
    r.extend_from_slice(&[0, 1, 0, u8::from(ok), 0, 0, 0, 0]);
    r.extend_from_slice(question);
    if ok {
        r.extend_from_slice(&[0xc0, 12]); // the name, by pointer
        r.extend_from_slice(&TYPE_A.to_be_bytes());
        r.extend_from_slice(&CLASS_IN.to_be_bytes());
        r.extend_from_slice(&30u32.to_be_bytes());
        r.extend_from_slice(&4u16.to_be_bytes());
        r.extend_from_slice(&addr.octets());
    }
    Some(r)
}

/// The first A record of an answer to query `id`.
pub fn parse_a(reply: &[u8], id: u16) -> Result<Ipv4Addr, String> {
    if reply.len() < 12 || reply[..2] != id.to_be_bytes() || reply[2] & 0x80 == 0 {
        return Err("not an answer to our query".into());
    }
    if reply[3] & 0x0f != 0 {
        return Err(format!("rcode {}", reply[3] & 0x0f));
    }
    // Skip the question, then read the first answer (name by pointer).
    let mut i = 12;
    while i < reply.len() && reply[i] != 0 {
        i += 1 + usize::from(reply[i]);
    }
    i += 5;
    let rr = reply.get(i..i + 16).ok_or("no answer record")?;
    if rr[2..4] != TYPE_A.to_be_bytes() || rr[10..12] != [0, 4] {
        return Err("the answer is not an A record".into());
    }
    Ok(Ipv4Addr::new(rr[12], rr[13], rr[14], rr[15]))
}

/// Answers every A query arriving on `sock` with `addr`, until it fails.
pub async fn serve(sock: tokio::net::UdpSocket, addr: Ipv4Addr) -> std::io::Result<()> {
    let mut buf = [0u8; 512];
    loop {
        let (n, peer) = sock.recv_from(&mut buf).await?;
        if let Some(r) = answer(&buf[..n], addr) {
            println!("dns: {peer} asked, answered {addr}");
            sock.send_to(&r, peer).await?;
        }
    }
}

/// Asks `server` for `name`'s A record from inside `ns`, over UDP.
pub fn resolve(
    ns: &Namespace,
    server: SocketAddr,
    name: &str,
    timeout: Duration,
) -> Result<Ipv4Addr, DnsError> {
    let owned = name.to_owned();
    let reply = ns
        .run(move || -> std::io::Result<Vec<u8>> {
            let any: SocketAddr = if server.is_ipv4() {
                "0.0.0.0:0".parse().expect("literal")
            } else {
                "[::]:0".parse().expect("literal")
            };
            let s = UdpSocket::bind(any)?;
            s.set_read_timeout(Some(timeout))?;
            s.connect(server)?;
            s.send(&query(0x4d50, &owned))?;
            let mut buf = [0u8; 512];
            let n = s.recv(&mut buf)?;
            Ok(buf[..n].to_vec())
        })?
        .map_err(|source| DnsError::Io {
            name: name.to_owned(),
            server,
            source,
        })?;
    parse_a(&reply, 0x4d50).map_err(|why| DnsError::Answer {
        name: name.to_owned(),
        server,
        why,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_query_gets_its_a_record() {
        let q = query(7, "kubernetes.default.svc.cluster.local");
        let a = answer(&q, Ipv4Addr::new(198, 19, 54, 1)).unwrap();
        assert_eq!(parse_a(&a, 7), Ok(Ipv4Addr::new(198, 19, 54, 1)));
        assert!(parse_a(&a, 8).is_err(), "another query's id");
        assert!(
            answer(&a, Ipv4Addr::LOCALHOST).is_none(),
            "an answer is no query"
        );
        let mut aaaa = q.clone();
        let n = aaaa.len();
        aaaa[n - 3] = 28;
        let r = answer(&aaaa, Ipv4Addr::LOCALHOST).unwrap();
        assert!(parse_a(&r, 7).unwrap_err().contains("rcode 4"));
        assert!(answer(&q[..10], Ipv4Addr::LOCALHOST).is_none());
    }

    #[tokio::test]
    async fn serves_over_udp() {
        let s = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let at = s.local_addr().unwrap();
        tokio::spawn(serve(s, Ipv4Addr::new(198, 19, 54, 1)));
        let c = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        c.send_to(&query(9, "a.b"), at).await.unwrap();
        let mut buf = [0u8; 512];
        let n = c.recv(&mut buf).await.unwrap();
        assert_eq!(parse_a(&buf[..n], 9), Ok(Ipv4Addr::new(198, 19, 54, 1)));
    }
}
