//! The rustls side of SPIFFE mTLS: our SVID served from the current
//! material, and the peer's verified against the current bundle — its chain
//! by webpki, its identity by the SPIFFE ID in its URI SAN, which must be of
//! our trust domain. No DNS name is checked: that is not how SPIFFE peers
//! are named.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, verify_server_cert_signed_by_trust_anchor};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ParsedCertificate, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use super::{Identity, SpiffeId, TlsError, material, provider};

/// The SPIFFE ID of `cert` (exactly one URI SAN, a SPIFFE ID) and when it
/// expires. A CA certificate is no SVID.
pub(super) fn leaf_facts(cert: &CertificateDer<'_>) -> Result<(SpiffeId, SystemTime), TlsError> {
    let (_, x) = X509Certificate::from_der(cert.as_ref())
        .map_err(|e| material("the SVID certificate", e))?;
    if x.is_ca() {
        return Err(material(
            "the SVID certificate",
            "it is a CA certificate, not an X.509-SVID",
        ));
    }
    let uris: Vec<&str> = x
        .subject_alternative_name()
        .map_err(|e| material("the SVID certificate's subjectAltName", e))?
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::URI(u) => Some(*u),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    let [uri] = uris.as_slice() else {
        return Err(material(
            "the SVID certificate",
            format!(
                "an X.509-SVID has exactly one URI SAN, this one has {}",
                uris.len()
            ),
        ));
    };
    let id: SpiffeId = uri.parse()?;
    let secs = u64::try_from(x.validity().not_after.timestamp()).unwrap_or(0);
    Ok((id, UNIX_EPOCH + Duration::from_secs(secs)))
}

/// The SPIFFE ID of an X.509-SVID.
pub fn spiffe_id_of(cert: &CertificateDer<'_>) -> Result<SpiffeId, TlsError> {
    leaf_facts(cert).map(|(id, _)| id)
}

/// The peer of a TLS connection, as its verified X.509-SVID says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerSvid {
    pub id: SpiffeId,
    /// When its certificate expires: our tokens for it expire no later.
    pub not_after: SystemTime,
    /// Its leaf certificate, whose key signs the tokens it sends.
    pub leaf: CertificateDer<'static>,
}

/// The peer's SVID, once a handshake verified it.
pub fn peer_svid(conn: &rustls::CommonState) -> Option<PeerSvid> {
    let leaf = conn.peer_certificates()?.first()?.clone().into_owned();
    let (id, not_after) = leaf_facts(&leaf).ok()?;
    Some(PeerSvid {
        id,
        not_after,
        leaf,
    })
}

/// The peer's leaf is an SVID of our trust domain.
fn check_peer(identity: &Identity, leaf: &CertificateDer<'_>) -> Result<(), rustls::Error> {
    let id = spiffe_id_of(leaf).map_err(|e| rustls::Error::General(e.to_string()))?;
    let ours = identity.current().id.clone();
    if id.trust_domain() != ours.trust_domain() {
        return Err(rustls::Error::General(format!(
            "peer {id} is not of trust domain {}",
            ours.trust_domain()
        )));
    }
    Ok(())
}

/// Serves our current SVID, as server and as client.
#[derive(Debug)]
pub(super) struct Resolver(pub Arc<Identity>);

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.current().certified.clone())
    }
}

impl ResolvesClientCert for Resolver {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.0.current().certified.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Handshake signatures, checked with our provider's algorithms (both sides).
fn signature12(
    message: &[u8],
    cert: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
) -> Result<HandshakeSignatureValid, rustls::Error> {
    verify_tls12_signature(
        message,
        cert,
        dss,
        &provider().signature_verification_algorithms,
    )
}

fn signature13(
    message: &[u8],
    cert: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
) -> Result<HandshakeSignatureValid, rustls::Error> {
    verify_tls13_signature(
        message,
        cert,
        dss,
        &provider().signature_verification_algorithms,
    )
}

fn schemes() -> Vec<SignatureScheme> {
    provider()
        .signature_verification_algorithms
        .supported_schemes()
}

/// Server side: every client presents an SVID of our trust domain.
#[derive(Debug)]
pub(super) struct ClientVerifier {
    identity: Arc<Identity>,
}

impl ClientVerifier {
    pub fn new(identity: Arc<Identity>) -> Self {
        ClientVerifier { identity }
    }
}

impl ClientCertVerifier for ClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let roots = self.identity.current().roots.clone();
        WebPkiClientVerifier::builder_with_provider(roots, provider())
            .build()
            .map_err(|e| rustls::Error::General(e.to_string()))?
            .verify_client_cert(end_entity, intermediates, now)?;
        check_peer(&self.identity, end_entity)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        signature12(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        signature13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        schemes()
    }
}

/// Client side: the server presents an SVID of our trust domain, whatever
/// name we dialled it by.
#[derive(Debug)]
pub(super) struct ServerVerifier {
    identity: Arc<Identity>,
}

impl ServerVerifier {
    pub fn new(identity: Arc<Identity>) -> Self {
        ServerVerifier { identity }
    }
}

impl ServerCertVerifier for ServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let roots = self.identity.current().roots.clone();
        let cert = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &cert,
            &roots,
            intermediates,
            now,
            provider().signature_verification_algorithms.all,
        )?;
        check_peer(&self.identity, end_entity)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        signature12(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        signature13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        schemes()
    }
}
