//! What a caller sends beside the message: its per-RPC token
//! (`nsm-client-token`, `nsm-client-token-expires` as RFC 3339) and its
//! deadline (`grpc-timeout`).

use std::time::{Duration, SystemTime};

use tonic::metadata::MetadataMap;

use crate::chain::ClientToken;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MetadataError {
    #[error("metadata {0} is not printable ASCII")]
    NotText(&'static str),
    #[error("metadata nsm-client-token-expires {0:?} is not an RFC 3339 time")]
    BadExpires(String),
    #[error("metadata {present} is set without {missing}")]
    Unpaired {
        present: &'static str,
        missing: &'static str,
    },
}

fn text<'a>(md: &'a MetadataMap, key: &'static str) -> Result<Option<&'a str>, MetadataError> {
    md.get(key)
        .map(|v| v.to_str().map_err(|_| MetadataError::NotText(key)))
        .transpose()
}

/// The caller's token, if it sent one; both keys or neither.
pub fn client_token(md: &MetadataMap) -> Result<Option<ClientToken>, MetadataError> {
    let (tk, ek) = (nsm_api::TOKEN_METADATA, nsm_api::TOKEN_EXPIRES_METADATA);
    match (text(md, tk)?, text(md, ek)?) {
        (None, None) => Ok(None),
        (Some(_), None) => Err(MetadataError::Unpaired {
            present: tk,
            missing: ek,
        }),
        (None, Some(_)) => Err(MetadataError::Unpaired {
            present: ek,
            missing: tk,
        }),
        (Some(token), Some(expires)) => {
            let t = chrono::DateTime::parse_from_rfc3339(expires)
                .map_err(|_| MetadataError::BadExpires(expires.to_owned()))?;
            let t: SystemTime = t.with_timezone(&chrono::Utc).into();
            Ok(Some(ClientToken {
                token: token.to_owned(),
                expires: t,
            }))
        }
    }
}

/// The caller's `grpc-timeout` (gRPC over HTTP/2: 1–8 digits and a unit); zero if none or malformed.
pub fn request_timeout(md: &MetadataMap) -> Duration {
    md.get("grpc-timeout")
        .and_then(|v| v.to_str().ok())
        .and_then(parse_grpc_timeout)
        .unwrap_or_default()
}

fn parse_grpc_timeout(s: &str) -> Option<Duration> {
    let (digits, unit) = s.split_at(s.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    fn md(pairs: &[(&'static str, &str)]) -> MetadataMap {
        let mut m = MetadataMap::new();
        for (k, v) in pairs {
            m.insert(*k, v.parse().unwrap());
        }
        m
    }

    #[test]
    fn token_pairs() {
        assert_eq!(client_token(&md(&[])), Ok(None));
        let t = client_token(&md(&[
            ("nsm-client-token", "a.b.c"),
            ("nsm-client-token-expires", "2033-05-18T03:33:20.5+00:00"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(t.token, "a.b.c");
        assert_eq!(
            t.expires,
            UNIX_EPOCH + Duration::from_millis(2_000_000_000_500)
        );
        // Go's RFC3339Nano with a zone offset.
        let t = client_token(&md(&[
            ("nsm-client-token", "x"),
            (
                "nsm-client-token-expires",
                "2033-05-18T05:33:20.123456789+02:00",
            ),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(
            t.expires,
            UNIX_EPOCH + Duration::new(2_000_000_000, 123_456_789)
        );
        assert!(matches!(
            client_token(&md(&[("nsm-client-token", "x")])),
            Err(MetadataError::Unpaired { .. })
        ));
        assert_eq!(
            client_token(&md(&[
                ("nsm-client-token", "x"),
                ("nsm-client-token-expires", "tomorrow")
            ])),
            Err(MetadataError::BadExpires("tomorrow".into()))
        );
    }

    #[test]
    fn grpc_timeouts() {
        assert_eq!(
            request_timeout(&md(&[("grpc-timeout", "1000m")])),
            Duration::from_secs(1)
        );
        assert_eq!(
            request_timeout(&md(&[("grpc-timeout", "15S")])),
            Duration::from_secs(15)
        );
        assert_eq!(
            request_timeout(&md(&[("grpc-timeout", "2H")])),
            Duration::from_secs(7200)
        );
        assert_eq!(request_timeout(&md(&[])), Duration::ZERO);
        for bad in ["", "S", "123456789S", "1x", "-1S"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad:?}");
        }
    }
}
