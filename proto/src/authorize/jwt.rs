//! The two JWT operations NSM's policies use: decode a token's claims
//! (`io.jwt.decode`) and verify an ES256 signature with a certificate's key
//! (`io.jwt.verify_es256`), over P-256 directly.

use ring::signature::{ECDSA_P256_SHA256_FIXED, UnparsedPublicKey};
use rustls::pki_types::CertificateDer;
use x509_parser::prelude::{FromDer, X509Certificate};

/// A token's claims as NSM's policies read them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    pub sub: String,
    /// A string `aud` reads as a one-element list, as JWT allows.
    pub aud: Vec<String>,
    pub exp: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    #[error("not a JWT (header.payload.signature)")]
    Shape,
    #[error("the JWT's {0} is not base64url")]
    Base64(&'static str),
    #[error("the JWT's {0} is not JSON")]
    Json(&'static str),
    #[error("the JWT is signed with {0}, not ES256")]
    Alg(String),
    #[error("the certificate's key is not EC P-256: {0}")]
    Key(String),
    #[error("the signature does not verify with the certificate's key")]
    Signature,
}

struct Parts<'a> {
    signed: &'a str,
    header: &'a str,
    payload: &'a str,
    signature: &'a str,
}

fn parts(token: &str) -> Result<Parts<'_>, JwtError> {
    let mut it = token.splitn(3, '.');
    let (Some(header), Some(payload), Some(signature)) = (it.next(), it.next(), it.next()) else {
        return Err(JwtError::Shape);
    };
    if header.is_empty() || payload.is_empty() || signature.contains('.') {
        return Err(JwtError::Shape);
    }
    Ok(Parts {
        signed: &token[..header.len() + 1 + payload.len()],
        header,
        payload,
        signature,
    })
}

fn b64(part: &str, what: &'static str) -> Result<Vec<u8>, JwtError> {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(part.trim_end_matches('='))
        .map_err(|_| JwtError::Base64(what))
}

/// The claims of `token`, signature unchecked.
pub fn decode(token: &str) -> Result<Claims, JwtError> {
    let p = parts(token)?;
    let header: serde_json::Value =
        serde_json::from_slice(&b64(p.header, "header")?).map_err(|_| JwtError::Json("header"))?;
    if !header.is_object() {
        return Err(JwtError::Json("header"));
    }
    let body: serde_json::Value = serde_json::from_slice(&b64(p.payload, "payload")?)
        .map_err(|_| JwtError::Json("payload"))?;
    let sub = body["sub"].as_str().unwrap_or_default().to_owned();
    let aud = match &body["aud"] {
        serde_json::Value::String(s) => vec![s.clone()],
        serde_json::Value::Array(a) => a
            .iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect(),
        _ => Vec::new(),
    };
    let exp = body["exp"]
        .as_u64()
        .or_else(|| body["exp"].as_f64().map(|f| f.max(0.0) as u64))
        .unwrap_or(0);
    Ok(Claims { sub, aud, exp })
}

/// Whether `token` is ES256-signed by the key of `cert`.
pub fn verify_es256(token: &str, cert: &CertificateDer<'_>) -> Result<(), JwtError> {
    let p = parts(token)?;
    let header: serde_json::Value =
        serde_json::from_slice(&b64(p.header, "header")?).map_err(|_| JwtError::Json("header"))?;
    match header["alg"].as_str() {
        Some("ES256") => {}
        other => return Err(JwtError::Alg(other.unwrap_or("nothing").to_owned())),
    }
    let (_, x) =
        X509Certificate::from_der(cert.as_ref()).map_err(|e| JwtError::Key(e.to_string()))?;
    let spki = x.public_key();
    if spki.algorithm.algorithm != x509_parser::oid_registry::OID_KEY_TYPE_EC_PUBLIC_KEY {
        return Err(JwtError::Key(format!(
            "{} is not an EC key",
            spki.algorithm.algorithm
        )));
    }
    let sig = b64(p.signature, "signature")?;
    UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, &spki.subject_public_key.data)
        .verify(p.signed.as_bytes(), &sig)
        .map_err(|_| JwtError::Signature)
}
