//! A hop's path-segment and per-RPC tokens, as NSM's `spiffejwt` issues
//! them: ES256 JWTs signed with the X.509-SVID's key, `sub` our SPIFFE ID,
//! `aud` the peer's (the TLS peer of the connection the token is for), `exp`
//! no later than now + the lifetime, our certificate's expiry and the peer's.
//! Without SPIFFE (`NSM_INSECURE=true`) the key is an ephemeral P-256 key
//! made at start-up and the subject is `NSM_NAME`: the tokens have NSM's
//! shape and expiry, but no peer can verify who signed them.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};

use crate::tls::{Identity, PeerSvid};

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("cannot make an ephemeral P-256 key: {0}")]
    Key(String),
    #[error("cannot sign a token: {0}")]
    Sign(String),
    #[error("cannot sign a token: our SVID expired at {0}")]
    Expired(String),
}

#[derive(serde::Serialize)]
struct Claims<'a> {
    sub: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    aud: Option<[&'a str; 1]>,
    iat: u64,
    exp: u64,
}

/// One token and when it expires (exactly its `exp` claim).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token {
    pub jwt: String,
    pub expires: SystemTime,
}

/// Who signs: an ephemeral key under a name, or our current SVID.
enum Signer {
    Ephemeral {
        key: Arc<EcdsaKeyPair>,
        subject: String,
    },
    Svid(Arc<Identity>),
}

/// Signs tokens for `lifetime` each.
pub struct TokenIssuer {
    signer: Signer,
    lifetime: Duration,
    rng: SystemRandom,
}

impl std::fmt::Debug for TokenIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenIssuer")
            .field("subject", &self.subject())
            .field("lifetime", &self.lifetime)
            .finish_non_exhaustive()
    }
}

/// `{"alg":"ES256","typ":"JWT"}`, base64url: every token's header.
const HEADER: &str = "eyJhbGciOiJFUzI1NiIsInR5cCI6IkpXVCJ9";

impl TokenIssuer {
    /// An issuer with a fresh random P-256 key (NSM_INSECURE mode).
    pub fn ephemeral(subject: &str, lifetime: Duration) -> Result<Self, TokenError> {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .map_err(|e| TokenError::Key(e.to_string()))?;
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
            .map_err(|e| TokenError::Key(e.to_string()))?;
        Ok(TokenIssuer {
            signer: Signer::Ephemeral {
                key: Arc::new(key),
                subject: subject.to_owned(),
            },
            lifetime,
            rng,
        })
    }

    /// An issuer signing with `identity`'s current SVID key (read per token,
    /// so rotation takes effect at once).
    pub fn svid(identity: Arc<Identity>, lifetime: Duration) -> Self {
        TokenIssuer {
            signer: Signer::Svid(identity),
            lifetime,
            rng: SystemRandom::new(),
        }
    }

    /// Ephemeral under `name` without an identity, else the SVID's.
    pub fn for_identity(
        identity: Option<&Arc<Identity>>,
        name: &str,
        lifetime: Duration,
    ) -> Result<Self, TokenError> {
        match identity {
            Some(i) => Ok(TokenIssuer::svid(i.clone(), lifetime)),
            None => TokenIssuer::ephemeral(name, lifetime),
        }
    }

    pub fn lifetime(&self) -> Duration {
        self.lifetime
    }

    /// Our `sub`: the SPIFFE ID, or the name in insecure mode.
    pub fn subject(&self) -> String {
        match &self.signer {
            Signer::Ephemeral { subject, .. } => subject.clone(),
            Signer::Svid(i) => i.current().id.to_string(),
        }
    }

    /// A token for no one in particular (our own path segment before a peer
    /// is known), valid from now for the lifetime.
    pub fn issue(&self) -> Result<Token, TokenError> {
        self.issue_for(None)
    }

    /// A token for `peer`: `aud` its SPIFFE ID, expiring no later than its
    /// certificate (nor ours).
    pub fn issue_for(&self, peer: Option<&PeerSvid>) -> Result<Token, TokenError> {
        let now = SystemTime::now();
        let mut until = now + self.lifetime;
        let (key, subject) = match &self.signer {
            Signer::Ephemeral { key, subject } => (key.clone(), subject.clone()),
            Signer::Svid(identity) => {
                let m = identity.current();
                until = until.min(m.not_after);
                (m.signing_key.clone(), m.id.to_string())
            }
        };
        if let Some(p) = peer {
            until = until.min(p.not_after);
        }
        // Whole seconds, rounded down, so `expires` equals `exp` and never
        // lies past any bound.
        let exp = until
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let iat = now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
        if exp <= iat {
            return Err(TokenError::Expired(crate::metadata::rfc3339(until)));
        }
        let aud = peer.map(|p| p.id.to_string());
        let claims = Claims {
            sub: &subject,
            aud: aud.as_deref().map(|a| [a]),
            iat,
            exp,
        };
        let body = serde_json::to_vec(&claims).map_err(|e| TokenError::Sign(e.to_string()))?;
        let signed = format!("{HEADER}.{}", URL_SAFE_NO_PAD.encode(body));
        // ES256 in JWS is the fixed 64-byte r || s form.
        let sig = key
            .sign(&self.rng, signed.as_bytes())
            .map_err(|e| TokenError::Sign(e.to_string()))?;
        Ok(Token {
            jwt: format!("{signed}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref())),
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
        assert_eq!(data.header.alg, jsonwebtoken::Algorithm::ES256);
        assert_eq!(data.claims["sub"], "nse-1");
        let exp = data.claims["exp"].as_u64().unwrap();
        assert_eq!(UNIX_EPOCH + Duration::from_secs(exp), t.expires);
        assert!(t.expires <= SystemTime::now() + Duration::from_secs(600));
        assert!(t.expires >= before + Duration::from_secs(599));
        // Signature is the 64-byte raw (r || s) ES256 form, base64url: 86 chars.
        assert_eq!(t.jwt.rsplit('.').next().unwrap().len(), 86);
    }
}
