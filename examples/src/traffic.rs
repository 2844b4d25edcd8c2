//! Requests from inside a namespace to the hello server, and what they show:
//! the client's own address, and the address the server saw.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use crate::hello_server::parse_greeting;
use crate::namespace::{Namespace, NamespaceError};

#[derive(Debug, thiserror::Error)]
pub enum TrafficError {
    #[error(transparent)]
    Namespace(#[from] NamespaceError),
    #[error("from {ns} to {to}: {source}")]
    Io {
        ns: String,
        to: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("from {ns} to {to}: the answer is not a greeting: {reply:?}")]
    Reply {
        ns: String,
        to: SocketAddr,
        reply: String,
    },
}

/// One request and its answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exchange {
    /// The client's end of the connection.
    pub local: SocketAddr,
    /// The peer address the server reported: the proxy's when it is in the path.
    pub server_saw: SocketAddr,
    pub reply: String,
}

/// `GET /` over HTTP/1.0 from inside `ns` to `to`.
pub fn http_get(
    ns: &Namespace,
    to: SocketAddr,
    timeout: Duration,
) -> Result<Exchange, TrafficError> {
    let io = |source| TrafficError::Io {
        ns: ns.name().to_owned(),
        to,
        source,
    };
    let (local, reply) = ns
        .run(move || -> std::io::Result<(SocketAddr, String)> {
            let mut s = TcpStream::connect_timeout(&to, timeout)?;
            s.set_read_timeout(Some(timeout))?;
            s.set_write_timeout(Some(timeout))?;
            let local = s.local_addr()?;
            write!(
                s,
                "GET / HTTP/1.0\r\nHost: {to}\r\nUser-Agent: mesh-proxy-demo\r\n\r\n"
            )?;
            let mut reply = String::new();
            s.read_to_string(&mut reply)?;
            Ok((local, reply))
        })?
        .map_err(io)?;
    let server_saw = parse_greeting(&reply).ok_or_else(|| TrafficError::Reply {
        ns: ns.name().to_owned(),
        to,
        reply: reply.clone(),
    })?;
    Ok(Exchange {
        local,
        server_saw,
        reply,
    })
}
