//! mTLS with SPIFFE X.509-SVIDs, as NSM's hops speak it (even over unix
//! sockets): each side presents its SVID, each verifies the other's chain
//! against the trust bundle and takes the peer's SPIFFE ID from its URI SAN
//! (no DNS names: a hop is who its SPIFFE ID says), accepting any SPIFFE ID
//! of the trust domain (NSM's `tlsconfig.AuthorizeAny()` within the bundle).
//!
//! The material lives in an [`Identity`], read per handshake, so rotated
//! SVIDs and bundles take effect without a restart: from files
//! ([`Identity::from_files`], reloaded when they change) or from whatever
//! keeps calling [`Identity::set`] (a SPIFFE Workload API stream).

mod source;
mod spiffe_id;
mod verify;
mod workload;

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::{Duration, SystemTime};

use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::sign::CertifiedKey;

pub use source::{FILE_RELOAD_INTERVAL, IDENTITY_WAIT, IdentityArgs, Source, SourceError};
pub use spiffe_id::{SpiffeId, SpiffeIdError};
pub use verify::{PeerSvid, peer_svid, spiffe_id_of};

/// ALPN of gRPC over TLS (grpc-go insists on it).
pub const ALPN_H2: &[u8] = b"h2";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}: {why}")]
    Material { what: String, why: String },
    #[error("the SVID {0}")]
    SpiffeId(#[from] SpiffeIdError),
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

fn material(what: impl Into<String>, why: impl std::fmt::Display) -> TlsError {
    TlsError::Material {
        what: what.into(),
        why: why.to_string(),
    }
}

/// The crypto provider every TLS configuration here uses (ring), installed
/// as the process default once.
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| {
            let p = Arc::new(rustls::crypto::ring::default_provider());
            // Another part of the process may have installed one already.
            let _ = CryptoProvider::install_default((*p).clone());
            p
        })
        .clone()
}

/// One SVID and the bundle it is checked against.
pub struct Material {
    /// Our SPIFFE ID (the leaf's URI SAN).
    pub id: SpiffeId,
    /// When our leaf certificate expires.
    pub not_after: SystemTime,
    /// Our chain and key, for TLS.
    pub certified: Arc<CertifiedKey>,
    /// Our key as PKCS#8 DER (EC P-256).
    pub key_pkcs8: Vec<u8>,
    /// The same key, ready to sign tokens (ES256).
    pub signing_key: Arc<ring::signature::EcdsaKeyPair>,
    /// Our leaf certificate, DER.
    pub leaf: CertificateDer<'static>,
    /// Roots of our trust domain's bundle.
    pub roots: Arc<RootCertStore>,
}

impl std::fmt::Debug for Material {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Material")
            .field("id", &self.id)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl Material {
    /// Material from PEM: the SVID chain (leaf first), its key (PKCS#8 or
    /// SEC1, EC P-256) and the trust bundle's CA certificates.
    pub fn from_pem(chain: &[u8], key: &[u8], bundle: &[u8]) -> Result<Material, TlsError> {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain)
            .collect::<Result<_, _>>()
            .map_err(|e| material("the SVID certificate", e))?;
        let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| material("the SVID key", e))?;
        let roots: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(bundle)
            .collect::<Result<_, _>>()
            .map_err(|e| material("the trust bundle", e))?;
        Material::from_der(certs, key, roots)
    }

    /// Material from DER, as the SPIFFE Workload API hands it over.
    pub fn from_der(
        certs: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'_>,
        bundle: Vec<CertificateDer<'static>>,
    ) -> Result<Material, TlsError> {
        let leaf = certs
            .first()
            .cloned()
            .ok_or_else(|| material("the SVID certificate", "no certificate in it"))?;
        let key_pkcs8 = match &key {
            PrivateKeyDer::Pkcs8(k) => k.secret_pkcs8_der().to_vec(),
            PrivateKeyDer::Sec1(k) => {
                use p256::pkcs8::EncodePrivateKey;
                p256::SecretKey::from_sec1_der(k.secret_sec1_der())
                    .and_then(|s| {
                        s.to_pkcs8_der()
                            .map_err(|_| p256::elliptic_curve::Error)
                            .map(|d| d.as_bytes().to_vec())
                    })
                    .map_err(|_| material("the SVID key", "not an EC P-256 key"))?
            }
            _ => {
                return Err(material(
                    "the SVID key",
                    "not an EC P-256 key (PKCS#8 or SEC1)",
                ));
            }
        };
        {
            use p256::pkcs8::DecodePrivateKey;
            p256::SecretKey::from_pkcs8_der(&key_pkcs8).map_err(|_| {
                material(
                    "the SVID key",
                    "not an EC P-256 key: NSM's tokens are ES256",
                )
            })?;
        }
        let certified = CertifiedKey::from_der(
            certs,
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key_pkcs8.clone())),
            &provider(),
        )
        .map_err(|e| material("the SVID certificate and key", e))?;
        let signing_key = Arc::new(
            ring::signature::EcdsaKeyPair::from_pkcs8(
                &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
                &key_pkcs8,
                &ring::rand::SystemRandom::new(),
            )
            .map_err(|e| material("the SVID key", e))?,
        );
        let (id, not_after) = verify::leaf_facts(&leaf)?;
        if bundle.is_empty() {
            return Err(material("the trust bundle", "no CA certificate in it"));
        }
        let mut roots = RootCertStore::empty();
        for cert in bundle {
            roots
                .add(cert)
                .map_err(|e| material("the trust bundle", e))?;
        }
        Ok(Material {
            id,
            not_after,
            certified: Arc::new(certified),
            key_pkcs8,
            signing_key,
            leaf,
            roots: Arc::new(roots),
        })
    }
}

/// Where file-based SVIDs come from (`NSM_SVID_CERT_FILE`,
/// `NSM_SVID_KEY_FILE`, `NSM_TRUST_BUNDLE_FILE`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SvidFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub bundle: PathBuf,
}

impl SvidFiles {
    fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
        std::fs::read(path).map_err(|source| TlsError::Read {
            path: path.to_owned(),
            source,
        })
    }

    pub fn load(&self) -> Result<Material, TlsError> {
        Material::from_pem(
            &Self::read(&self.cert)?,
            &Self::read(&self.key)?,
            &Self::read(&self.bundle)?,
        )
    }

    /// The files' modification times: what a reload compares.
    fn stamp(&self) -> Vec<Option<SystemTime>> {
        [&self.cert, &self.key, &self.bundle]
            .into_iter()
            .map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
            .collect()
    }
}

/// This process's SPIFFE identity, current: every TLS handshake and every
/// token reads it anew.
#[derive(Debug)]
pub struct Identity {
    current: RwLock<Arc<Material>>,
}

impl Identity {
    pub fn new(material: Material) -> Arc<Identity> {
        Arc::new(Identity {
            current: RwLock::new(Arc::new(material)),
        })
    }

    /// From files, reloaded every `every` when one of them changed (a
    /// reload that fails keeps the current material and says why).
    pub fn from_files(files: SvidFiles, every: Duration) -> Result<Arc<Identity>, TlsError> {
        let identity = Identity::new(files.load()?);
        let weak = Arc::downgrade(&identity);
        let mut stamp = files.stamp();
        std::thread::Builder::new()
            .name("svid-files".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(every);
                    let Some(identity) = weak.upgrade() else {
                        return;
                    };
                    let now = files.stamp();
                    if now == stamp {
                        continue;
                    }
                    match files.load() {
                        Ok(m) => {
                            tracing::info!(id = %m.id, "reloaded the SVID files");
                            identity.set(m);
                            stamp = now;
                        }
                        Err(e) => tracing::warn!(error = %e, "cannot reload the SVID files; keeping the current SVID"),
                    }
                }
            })
            .map_err(|e| material("the SVID file watcher", e))?;
        Ok(identity)
    }

    /// The material every later handshake and token uses.
    pub fn set(&self, material: Material) {
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(material);
    }

    pub fn current(&self) -> Arc<Material> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The server side: our SVID, client certificates required and checked.
    pub fn server_config(self: &Arc<Self>) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let mut c = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(Arc::new(verify::ClientVerifier::new(self.clone())))
            .with_cert_resolver(Arc::new(verify::Resolver(self.clone())));
        c.alpn_protocols = vec![ALPN_H2.to_vec()];
        // No resumption: every connection proves its current SVID (a resumed
        // session would carry the first certificate past rotation and expiry).
        c.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        c.send_tls13_tickets = 0;
        Ok(Arc::new(c))
    }

    /// The client side: our SVID presented, the server's checked.
    pub fn client_config(self: &Arc<Self>) -> Result<Arc<rustls::ClientConfig>, TlsError> {
        let mut c = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verify::ServerVerifier::new(self.clone())))
            .with_client_cert_resolver(Arc::new(verify::Resolver(self.clone())));
        c.alpn_protocols = vec![ALPN_H2.to_vec()];
        c.resumption = rustls::client::Resumption::disabled();
        Ok(Arc::new(c))
    }
}
