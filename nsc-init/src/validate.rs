//! `--validate`: does traffic from this netns really go where the endpoint
//! said? Like linkerd's validator and istio-validation we do not inspect the
//! rules, we try them: open a TCP connection to a probe address that only
//! answers through the redirect (e.g. the proxy's port, or a service reached
//! only via the NSM interface) and, if asked, check the first bytes it sends.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::config::Validate;
use crate::exit::Failure;
use crate::request::Backoff;

/// Bound on one connect or read, so one black-holed SYN does not eat the budget.
const ATTEMPT: Duration = Duration::from_secs(1);
/// Even the last attempt gets this long, so its verdict is about the probe
/// and not about a budget cut to nothing.
const MIN_ATTEMPT: Duration = Duration::from_millis(250);

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("connect: {0}")]
    Connect(std::io::Error),
    #[error("connect: no answer within {0:?}")]
    ConnectTimeout(Duration),
    #[error("read: {0}")]
    Read(std::io::Error),
    #[error("expected a response starting with {expect:?}, got {got:?}")]
    Mismatch { expect: String, got: String },
}

/// One probe: connect, then (with `expect`) read until we have as many
/// bytes as `expect`, EOF, or the attempt bound.
pub async fn probe_once(
    addr: SocketAddr,
    expect: Option<&str>,
    bound: Duration,
) -> Result<(), ProbeError> {
    let mut stream = match tokio::time::timeout(bound, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(ProbeError::Connect(e)),
        Err(_) => return Err(ProbeError::ConnectTimeout(bound)),
    };
    let Some(expect) = expect else {
        return Ok(());
    };
    let want = expect.as_bytes();
    let mut got = Vec::with_capacity(want.len());
    let read = async {
        let mut buf = [0u8; 512];
        while got.len() < want.len() {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
        Ok::<_, std::io::Error>(())
    };
    // A read timeout is not an error by itself: compare what did arrive.
    if let Ok(Err(e)) = tokio::time::timeout(bound, read).await {
        return Err(ProbeError::Read(e));
    }
    if got.starts_with(want) {
        Ok(())
    } else {
        Err(ProbeError::Mismatch {
            expect: expect.to_owned(),
            got: String::from_utf8_lossy(&got[..got.len().min(want.len().max(64))]).into_owned(),
        })
    }
}

/// Probes until one attempt succeeds or `v.timeout` has passed.
pub async fn validate(v: &Validate) -> Result<(), Failure> {
    let deadline = Instant::now() + v.timeout;
    let mut backoff = Backoff::new();
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        let left = deadline.saturating_duration_since(Instant::now());
        let err = match probe_once(
            v.probe,
            v.expect.as_deref(),
            ATTEMPT.min(left).max(MIN_ATTEMPT),
        )
        .await
        {
            Ok(()) => {
                tracing::info!(probe = %v.probe, attempts, "redirect validated");
                return Ok(());
            }
            Err(e) => e,
        };
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Failure::Validation {
                probe: format!("tcp://{}", v.probe),
                reason: format!("failed {attempts} times in {:?}, last: {err}", v.timeout),
            });
        }
        tracing::debug!(probe = %v.probe, error = %err, "validation attempt failed");
        tokio::time::sleep(backoff.next_delay().min(left)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    async fn server(reply: &'static [u8]) -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let _ = s.write_all(reply).await;
            }
        });
        addr
    }

    #[tokio::test]
    async fn accepts_a_matching_prefix_and_rejects_others() {
        let addr = server(b"HTTP/1.1 200 OK\r\n\r\n").await;
        let b = Duration::from_secs(1);
        probe_once(addr, None, b).await.unwrap();
        probe_once(addr, Some("HTTP/1.1 200"), b).await.unwrap();
        let err = probe_once(addr, Some("SSH-2.0"), b).await.unwrap_err();
        assert!(
            matches!(&err, ProbeError::Mismatch { got, .. } if got.starts_with("HTTP/1.1")),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_closed_port_fails_with_the_reason() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        let v = Validate {
            probe: addr,
            expect: None,
            timeout: Duration::from_millis(300),
        };
        let err = validate(&v).await.unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("Connection refused") || msg.contains("refused"),
            "{msg}"
        );
        assert_eq!(err.code(), crate::exit::code::VALIDATION);
    }
}
