//! What a token costs: signing (ES256 with the SVID key, as every hop does
//! per call) and the policy checks (decode, ES256 verify with the peer's
//! certificate) — ours (ring) beside the pure-Rust path (jsonwebtoken's
//! rust_crypto, the p256 crate) that the first version used.
//!
//! `cargo bench -p nsm-api --bench tokens`

use std::sync::Arc;
use std::time::{Duration, Instant};

use nsm_api::tls::{Identity, Material, PeerSvid};
use nsm_api::token::TokenIssuer;

fn identity(ca: &rcgen::CertifiedIssuer<'static, rcgen::KeyPair>, uri: &str) -> Arc<Identity> {
    let mut p = rcgen::CertificateParams::default();
    p.subject_alt_names = vec![rcgen::SanType::URI(uri.try_into().unwrap())];
    p.is_ca = rcgen::IsCa::ExplicitNoCa;
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = p.signed_by(&key, ca).unwrap();
    Identity::new(
        Material::from_pem(
            cert.pem().as_bytes(),
            key.serialize_pem().as_bytes(),
            ca.pem().as_bytes(),
        )
        .unwrap(),
    )
}

fn per_op(n: u32, mut f: impl FnMut()) -> Duration {
    for _ in 0..n / 10 {
        f();
    }
    let t = Instant::now();
    for _ in 0..n {
        f();
    }
    t.elapsed() / n
}

fn main() {
    let mut p = rcgen::CertificateParams::default();
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = rcgen::CertifiedIssuer::self_signed(p, rcgen::KeyPair::generate().unwrap()).unwrap();
    let (a, b) = (
        identity(&ca, "spiffe://td/a"),
        identity(&ca, "spiffe://td/b"),
    );
    let m = b.current();
    let peer = PeerSvid {
        id: m.id.clone(),
        not_after: m.not_after,
        leaf: m.leaf.clone(),
    };
    let issuer = TokenIssuer::svid(a.clone(), Duration::from_secs(600));
    let sign = per_op(2_000, || {
        issuer.issue_for(Some(&peer)).unwrap();
    });
    let tok = issuer.issue_for(Some(&peer)).unwrap().jwt;
    let leaf = a.current().leaf.clone();
    let verify = per_op(2_000, || {
        nsm_api::authorize::verify_es256(&tok, &leaf).unwrap();
    });
    let decode = per_op(20_000, || {
        nsm_api::authorize::decode(&tok).unwrap();
    });
    // Baseline: the same claims with jsonwebtoken (rust_crypto) and p256.
    let key = jsonwebtoken::EncodingKey::from_ec_der(&a.current().key_pkcs8);
    let header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    let claims = nsm_api::authorize::decode(&tok).unwrap();
    let body = serde_json::json!({"sub": claims.sub, "aud": claims.aud, "exp": claims.exp});
    let sign_base = per_op(500, || {
        jsonwebtoken::encode(&header, &body, &key).unwrap();
    });
    let verify_base = per_op(500, || {
        use p256::ecdsa::signature::Verifier;
        use x509_parser::prelude::FromDer;
        let (_, x) = x509_parser::prelude::X509Certificate::from_der(leaf.as_ref()).unwrap();
        let vk =
            p256::ecdsa::VerifyingKey::from_sec1_bytes(&x.public_key().subject_public_key.data)
                .unwrap();
        let (signed, sig) = tok.rsplit_once('.').unwrap();
        use base64::Engine;
        let sig = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(sig)
            .unwrap();
        vk.verify(
            signed.as_bytes(),
            &p256::ecdsa::Signature::from_slice(&sig).unwrap(),
        )
        .unwrap();
    });
    println!("\nES256 tokens (one core)\n");
    println!(
        "{:<30} {:>12} {:>16}",
        "operation", "ring µs/op", "pure Rust µs/op"
    );
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    println!(
        "{:<30} {:>12.1} {:>16.1}",
        "sign a token",
        us(sign),
        us(sign_base)
    );
    println!(
        "{:<30} {:>12.1} {:>16.1}",
        "verify with a certificate",
        us(verify),
        us(verify_base)
    );
    println!("{:<30} {:>12.1} {:>16}", "decode claims", us(decode), "-");
}
