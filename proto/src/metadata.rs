//! What a caller sends beside the message: its per-RPC token
//! ([`TOKEN_METADATA`], [`TOKEN_EXPIRES_METADATA`] as RFC 3339) and its
//! deadline (`grpc-timeout`). Read by a hop's server side, written by its
//! client side (and by NSM clients).

use std::time::{Duration, SystemTime};

use tonic::metadata::MetadataMap;

use crate::chain::ClientToken;
use crate::token::Token;
use crate::{TOKEN_EXPIRES_METADATA, TOKEN_METADATA};

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
    let (tk, ek) = (TOKEN_METADATA, TOKEN_EXPIRES_METADATA);
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

/// Sends `token` as our per-RPC token on an outgoing request.
pub fn insert_token(md: &mut MetadataMap, token: &Token) {
    // JWTs and RFC 3339 text are plain ASCII, so these parses cannot fail.
    if let Ok(v) = token.jwt.parse() {
        md.insert(TOKEN_METADATA, v);
    }
    if let Ok(v) = rfc3339(token.expires).parse() {
        md.insert(TOKEN_EXPIRES_METADATA, v);
    }
}

/// Go's RFC3339Nano in UTC, as NSM sends `nsm-client-token-expires`.
pub fn rfc3339(t: SystemTime) -> String {
    chrono::DateTime::<chrono::Utc>::from(t).to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
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
    fn token_expiry_metadata_is_rfc3339_utc() {
        let t = UNIX_EPOCH + Duration::new(1_700_000_000, 120_000_000);
        assert_eq!(rfc3339(t), "2023-11-14T22:13:20.120Z");
        let whole = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(rfc3339(whole), "2023-11-14T22:13:20Z");
    }

    #[test]
    fn written_tokens_read_back() {
        let token = Token {
            jwt: "h.p.s".into(),
            expires: UNIX_EPOCH + Duration::new(2_000_000_000, 120_000_000),
        };
        let mut m = MetadataMap::new();
        insert_token(&mut m, &token);
        let back = client_token(&m).unwrap().unwrap();
        assert_eq!((back.token, back.expires), (token.jwt, token.expires));
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
