//! A hop's own path-segment tokens (endpoint, forwarder, client): ES256
//! JWTs, as NSM's `spiffejwt` issues them. Without SPIFFE (`NSM_INSECURE=true`)
//! the key is an ephemeral P-256 key made at start-up and the subject is
//! `NSM_NAME`: the tokens have NSM's shape and expiry, but no peer can verify
//! who signed them.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use p256::pkcs8::EncodePrivateKey;
use rand::RngCore;

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("cannot make an ephemeral P-256 key: {0}")]
    Key(String),
    #[error("cannot sign a token: {0}")]
    Sign(#[from] jsonwebtoken::errors::Error),
}

#[derive(serde::Serialize)]
struct Claims<'a> {
    sub: &'a str,
    iat: u64,
    exp: u64,
}

/// One token and when it expires (exactly its `exp` claim).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token {
    pub jwt: String,
    pub expires: SystemTime,
}

/// Signs tokens with one key for `lifetime` each.
pub struct TokenIssuer {
    key: EncodingKey,
    header: Header,
    subject: String,
    lifetime: Duration,
}

impl std::fmt::Debug for TokenIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenIssuer")
            .field("subject", &self.subject)
            .field("lifetime", &self.lifetime)
            .finish_non_exhaustive()
    }
}

impl TokenIssuer {
    /// An issuer with a fresh random P-256 key (NSM_INSECURE mode).
    pub fn ephemeral(subject: &str, lifetime: Duration) -> Result<Self, TokenError> {
        // p256 0.13 uses rand_core 0.6; draw the scalar with our rand and
        // retry the (astronomically rare) out-of-range values.
        let mut bytes = [0u8; 32];
        let secret = loop {
            rand::rng().fill_bytes(&mut bytes);
            if let Ok(k) = p256::SecretKey::from_slice(&bytes) {
                break k;
            }
        };
        let der = secret
            .to_pkcs8_der()
            .map_err(|e| TokenError::Key(e.to_string()))?;
        Ok(TokenIssuer {
            key: EncodingKey::from_ec_der(der.as_bytes()),
            header: Header::new(Algorithm::ES256),
            subject: subject.to_owned(),
            lifetime,
        })
    }

    pub fn lifetime(&self) -> Duration {
        self.lifetime
    }

    /// A token valid from now for the configured lifetime (whole seconds, as JWT `exp` is).
    pub fn issue(&self) -> Result<Token, TokenError> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        // Round down so `expires` never lies past now + lifetime and equals `exp`.
        let exp = (now + self.lifetime).as_secs();
        let claims = Claims {
            sub: &self.subject,
            iat: now.as_secs(),
            exp,
        };
        let jwt = jsonwebtoken::encode(&self.header, &claims, &self.key)?;
        Ok(Token {
            jwt,
            expires: UNIX_EPOCH + Duration::from_secs(exp),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn es256_with_exp_equal_to_expires() {
        let issuer = TokenIssuer::ephemeral("nse-1", Duration::from_secs(600)).unwrap();
        let before = SystemTime::now();
        let t = issuer.issue().unwrap();
        let data = jsonwebtoken::dangerous::insecure_decode::<serde_json::Value>(&t.jwt).unwrap();
        assert_eq!(data.header.alg, Algorithm::ES256);
        assert_eq!(data.claims["sub"], "nse-1");
        let exp = data.claims["exp"].as_u64().unwrap();
        assert_eq!(UNIX_EPOCH + Duration::from_secs(exp), t.expires);
        assert!(t.expires <= SystemTime::now() + Duration::from_secs(600));
        assert!(t.expires >= before + Duration::from_secs(599));
        // Signature is the 64-byte raw (r || s) ES256 form, base64url: 86 chars.
        assert_eq!(t.jwt.rsplit('.').next().unwrap().len(), 86);
    }
}
