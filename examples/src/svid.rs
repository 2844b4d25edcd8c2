//! A SPIFFE CA for the demo and the TLS suites, standing in for SPIRE: a
//! self-signed root for one trust domain that issues X.509-SVIDs (EC P-256,
//! the SPIFFE ID as the only URI SAN, server and client auth) as SPIRE's
//! agent hands them to NSM's pods.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::Duration;

use nsm_api::tls::{Material, SvidFiles, TlsError};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use time::OffsetDateTime;

/// How long an SVID lives unless asked otherwise (SPIRE's default is 1 h).
pub const SVID_LIFETIME: Duration = Duration::from_secs(3600);

#[derive(Debug, thiserror::Error)]
pub enum SvidError {
    #[error("cannot make a certificate: {0}")]
    Cert(#[from] rcgen::Error),
    #[error("`{0}` is not a SPIFFE ID path (`/…`)")]
    Path(String),
    #[error("cannot write {path}: {source}")]
    Write {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Tls(#[from] TlsError),
}

/// A root CA of one trust domain.
pub struct TestCa {
    trust_domain: String,
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl std::fmt::Debug for TestCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestCa")
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

/// One X.509-SVID: its chain and key in PEM.
#[derive(Debug, Clone)]
pub struct Svid {
    pub id: String,
    pub cert_pem: String,
    pub key_pem: String,
}

impl TestCa {
    pub fn new(trust_domain: &str) -> Result<TestCa, SvidError> {
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::OrganizationName, "mesh-proxy test CA");
        params
            .distinguished_name
            .push(DnType::CommonName, trust_domain);
        params
            .subject_alt_names
            .push(SanType::URI(format!("spiffe://{trust_domain}").try_into()?));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + time::Duration::days(7);
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate()?)?;
        Ok(TestCa {
            trust_domain: trust_domain.to_owned(),
            issuer,
        })
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The trust bundle: this CA's certificate.
    pub fn bundle_pem(&self) -> String {
        self.issuer.pem()
    }

    /// `spiffe://<trust domain><path>`, valid from a minute ago for
    /// [`SVID_LIFETIME`].
    pub fn issue(&self, path: &str) -> Result<Svid, SvidError> {
        let now = OffsetDateTime::now_utc();
        self.issue_between(
            path,
            now - time::Duration::minutes(1),
            now + time::Duration::try_from(SVID_LIFETIME).unwrap_or(time::Duration::HOUR),
        )
    }

    /// An SVID that expired an hour ago.
    pub fn issue_expired(&self, path: &str) -> Result<Svid, SvidError> {
        let now = OffsetDateTime::now_utc();
        self.issue_between(
            path,
            now - time::Duration::hours(2),
            now - time::Duration::hours(1),
        )
    }

    pub fn issue_between(
        &self,
        path: &str,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<Svid, SvidError> {
        if !path.starts_with('/') {
            return Err(SvidError::Path(path.to_owned()));
        }
        let id = format!("spiffe://{}{path}", self.trust_domain);
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::OrganizationName, "SPIRE");
        params.subject_alt_names = vec![SanType::URI(id.clone().try_into()?)];
        // basicConstraints cA=false, as the X.509-SVID spec (and SPIRE) has it.
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
            KeyUsagePurpose::KeyAgreement,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.not_before = not_before;
        params.not_after = not_after;
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Svid {
            id,
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// `svid` with this CA's bundle, ready for an [`nsm_api::tls::Identity`].
    pub fn material(&self, svid: &Svid) -> Result<Material, SvidError> {
        Ok(Material::from_pem(
            svid.cert_pem.as_bytes(),
            svid.key_pem.as_bytes(),
            self.bundle_pem().as_bytes(),
        )?)
    }

    /// Writes `svid.pem`, `svid.key` (0600) and `bundle.pem` under `dir`:
    /// what `NSM_SVID_CERT_FILE`, `NSM_SVID_KEY_FILE` and
    /// `NSM_TRUST_BUNDLE_FILE` point at.
    pub fn write(&self, svid: &Svid, dir: &Path) -> Result<SvidFiles, SvidError> {
        let files = SvidFiles {
            cert: dir.join("svid.pem"),
            key: dir.join("svid.key"),
            bundle: dir.join("bundle.pem"),
        };
        write_file(&files.cert, svid.cert_pem.as_bytes(), 0o644)?;
        write_file(&files.key, svid.key_pem.as_bytes(), 0o600)?;
        write_file(&files.bundle, self.bundle_pem().as_bytes(), 0o644)?;
        Ok(files)
    }
}

/// Writes through a temporary name and renames, so a reader never sees half
/// a file (as SPIRE's helper does when it rotates).
fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), SvidError> {
    let tmp = path.with_extension("tmp");
    let io = |source| SvidError::Write {
        path: path.to_owned(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io)?;
    f.write_all(bytes).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_issued_svid_is_read_back_with_its_spiffe_id_and_expiry() {
        let ca = TestCa::new("test.example").unwrap();
        let svid = ca.issue("/ns/default/sa/nse").unwrap();
        let m = ca.material(&svid).unwrap();
        assert_eq!(m.id.to_string(), "spiffe://test.example/ns/default/sa/nse");
        let left = m
            .not_after
            .duration_since(std::time::SystemTime::now())
            .unwrap();
        assert!(left <= SVID_LIFETIME && left > SVID_LIFETIME - Duration::from_secs(60));
    }

    #[test]
    fn a_path_without_a_leading_slash_is_refused() {
        let ca = TestCa::new("test.example").unwrap();
        assert!(matches!(ca.issue("nse"), Err(SvidError::Path(_))));
    }
}
