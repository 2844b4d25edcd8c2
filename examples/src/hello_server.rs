//! The demo's server: answers every TCP connection with
//! `hello from server, you are <peer address>` — as an HTTP/1.0 response
//! when the request looks like HTTP (so `curl` works), as a bare line
//! otherwise — and logs one line per connection. The peer address is the
//! point: behind the proxy it is the proxy's, not the client's.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub const GREETING: &str = "hello from server, you are ";

/// How long the server waits for a request before answering anyway (a
/// client that only listens still gets its line).
const REQUEST_WAIT: Duration = Duration::from_millis(500);
const MAX_REQUEST: usize = 8 * 1024;

/// The answer's text for a client seen as `peer`.
pub fn greeting(peer: SocketAddr) -> String {
    format!("{GREETING}{peer}")
}

/// The peer address in a greeting (anywhere in `text`, e.g. an HTTP body).
pub fn parse_greeting(text: &str) -> Option<SocketAddr> {
    let rest = &text[text.find(GREETING)? + GREETING.len()..];
    rest.split_whitespace().next()?.parse().ok()
}

/// The line the server logs for a connection.
pub fn log_line(peer: SocketAddr, local: SocketAddr) -> String {
    format!("server: {peer} -> {local}")
}

/// Reads the request head (up to a blank line, [`MAX_REQUEST`] bytes, or
/// [`REQUEST_WAIT`] of silence).
async fn read_head(s: &mut TcpStream) -> Vec<u8> {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while head.len() < MAX_REQUEST {
        match tokio::time::timeout(REQUEST_WAIT, s.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => head.extend_from_slice(&buf[..n]),
            _ => break,
        }
        if head.windows(4).any(|w| w == b"\r\n\r\n") || head.windows(2).any(|w| w == b"\n\n") {
            break;
        }
    }
    head
}

async fn answer(mut s: TcpStream, peer: SocketAddr) -> std::io::Result<()> {
    let head = read_head(&mut s).await;
    let body = format!("{}\n", greeting(peer));
    let http =
        head.starts_with(b"GET ") || head.starts_with(b"HEAD ") || head.starts_with(b"POST ");
    let reply = if http {
        format!(
            "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
    } else {
        body
    };
    s.write_all(reply.as_bytes()).await?;
    s.shutdown().await
}

/// Serves `listener` until an accept fails.
pub async fn serve(listener: TcpListener) -> std::io::Result<()> {
    let local = listener.local_addr()?;
    loop {
        let (s, peer) = listener.accept().await?;
        let local = s.local_addr().unwrap_or(local);
        println!("{}", log_line(peer, local));
        tokio::spawn(async move {
            if let Err(e) = answer(s, peer).await {
                eprintln!("server: {peer}: {e}");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greeting_round_trips_also_inside_http() {
        let a: SocketAddr = "198.18.100.1:40000".parse().unwrap();
        assert_eq!(parse_greeting(&greeting(a)), Some(a));
        let http = format!("HTTP/1.0 200 OK\r\n\r\n{}\n", greeting(a));
        assert_eq!(parse_greeting(&http), Some(a));
        assert_eq!(parse_greeting("hello from nobody"), None);
    }

    #[tokio::test]
    async fn answers_http_and_bare_clients_with_their_address() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(serve(l));
        let mut c = TcpStream::connect(addr).await.unwrap();
        let me = c.local_addr().unwrap();
        c.write_all(b"GET / HTTP/1.0\r\n\r\n").await.unwrap();
        let mut text = String::new();
        c.read_to_string(&mut text).await.unwrap();
        assert!(text.starts_with("HTTP/1.0 200 OK"), "{text}");
        assert_eq!(parse_greeting(&text), Some(me));
        // A client that sends nothing still gets its line.
        let mut c = TcpStream::connect(addr).await.unwrap();
        let me = c.local_addr().unwrap();
        let mut text = String::new();
        c.read_to_string(&mut text).await.unwrap();
        assert_eq!(text, format!("{}\n", greeting(me)));
    }
}
