//! Where a process's SVID comes from, by NSM's settings: the SPIFFE Workload
//! API (`SPIFFE_ENDPOINT_SOCKET`, what SPIRE's agent serves and NSM's pods
//! use), PEM files (`NSM_SVID_CERT_FILE`, `NSM_SVID_KEY_FILE`,
//! `NSM_TRUST_BUNDLE_FILE`, for clusters without SPIRE), or nothing at all
//! with the explicit `NSM_INSECURE=true`. Secure is the default: without an
//! identity and not insecure, a binary refuses to start.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::{Identity, SvidFiles, TlsError, workload};

/// How long a binary waits at start for its first SVID from the Workload
/// API (SPIRE may still be attesting the pod).
pub const IDENTITY_WAIT: Duration = Duration::from_secs(60);

/// How often SVID files are checked for a rotation.
pub const FILE_RELOAD_INTERVAL: Duration = Duration::from_secs(5);

/// NSM's identity settings, each a variable and a flag.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct IdentityArgs {
    /// Run without TLS: plaintext gRPC, tokens signed with an ephemeral key that no peer can verify, no authorization. Only for labs.
    #[arg(
        long,
        env = "NSM_INSECURE",
        default_value = "false",
        num_args = 0..=1,
        default_missing_value = "true",
        value_name = "BOOL"
    )]
    pub insecure: String,

    /// The SPIFFE Workload API (SPIRE agent) socket, e.g. unix:///run/spire/sockets/agent.sock: SVIDs and bundles streamed and rotated.
    #[arg(
        long,
        env = "SPIFFE_ENDPOINT_SOCKET",
        value_name = "URL",
        default_value = ""
    )]
    pub spiffe_endpoint_socket: String,

    /// X.509-SVID certificate chain (PEM, leaf first); with --svid-key-file and --trust-bundle-file instead of the Workload API. Reloaded when it changes.
    #[arg(
        long,
        env = "NSM_SVID_CERT_FILE",
        value_name = "FILE",
        default_value = ""
    )]
    pub svid_cert_file: String,

    /// The SVID's EC P-256 private key (PEM, PKCS#8 or SEC1).
    #[arg(
        long,
        env = "NSM_SVID_KEY_FILE",
        value_name = "FILE",
        default_value = ""
    )]
    pub svid_key_file: String,

    /// The trust domain's CA certificates (PEM).
    #[arg(
        long,
        env = "NSM_TRUST_BUNDLE_FILE",
        value_name = "FILE",
        default_value = ""
    )]
    pub trust_bundle_file: String,
}

/// Where the identity comes from, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// `NSM_INSECURE=true`: no TLS.
    Insecure,
    Files(SvidFiles),
    /// The Workload API at this endpoint (`unix:…` or `tcp:…`).
    WorkloadApi(String),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SourceError {
    #[error("NSM_INSECURE (--insecure): {0:?} is not a boolean (true/false, 1/0, t/f)")]
    Insecure(String),
    #[error("{missing} must be set with {set}: the SVID files come as three")]
    Partial { set: String, missing: String },
    #[error(
        "both SPIFFE_ENDPOINT_SOCKET and NSM_SVID_CERT_FILE are set: choose the Workload API or the files"
    )]
    Both,
    #[error(
        "no identity: set SPIFFE_ENDPOINT_SOCKET (SPIRE's Workload API), or NSM_SVID_CERT_FILE, NSM_SVID_KEY_FILE and NSM_TRUST_BUNDLE_FILE; or NSM_INSECURE=true to run without TLS"
    )]
    None,
}

/// Go's strconv.ParseBool, as NSM's settings are read.
fn parse_bool(s: &str) -> Option<bool> {
    match s {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

impl IdentityArgs {
    /// The settings for an insecure lab run (tests, the demo's opt-out).
    pub fn insecure() -> Self {
        IdentityArgs {
            insecure: "true".into(),
            ..Default::default()
        }
    }

    pub fn source(&self) -> Result<Source, SourceError> {
        let insecure = parse_bool(self.insecure.trim())
            .ok_or_else(|| SourceError::Insecure(self.insecure.clone()))?;
        if insecure {
            return Ok(Source::Insecure);
        }
        let files = [
            ("NSM_SVID_CERT_FILE", &self.svid_cert_file),
            ("NSM_SVID_KEY_FILE", &self.svid_key_file),
            ("NSM_TRUST_BUNDLE_FILE", &self.trust_bundle_file),
        ];
        let (set, missing): (Vec<_>, Vec<_>) = files.iter().partition(|(_, v)| !v.is_empty());
        let socket = self.spiffe_endpoint_socket.trim();
        match (set.len(), socket.is_empty()) {
            (0, true) => Err(SourceError::None),
            (0, false) => Ok(Source::WorkloadApi(socket.to_owned())),
            (_, false) => Err(SourceError::Both),
            (3, true) => Ok(Source::Files(SvidFiles {
                cert: PathBuf::from(&self.svid_cert_file),
                key: PathBuf::from(&self.svid_key_file),
                bundle: PathBuf::from(&self.trust_bundle_file),
            })),
            _ => Err(SourceError::Partial {
                set: names(&set),
                missing: names(&missing),
            }),
        }
    }
}

fn names(vars: &[&(&str, &String)]) -> String {
    vars.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
}

impl Source {
    /// The identity, once its first SVID is at hand (`None`: insecure). The
    /// Workload API is waited for up to `wait` (SPIRE may be attesting us).
    pub async fn open(&self, wait: Duration) -> Result<Option<Arc<Identity>>, TlsError> {
        match self {
            Source::Insecure => {
                tracing::warn!(
                    "NSM_INSECURE=true: no TLS, tokens no peer can verify, no authorization"
                );
                Ok(None)
            }
            Source::Files(files) => {
                let identity = Identity::from_files(files.clone(), FILE_RELOAD_INTERVAL)?;
                tracing::info!(id = %identity.current().id, cert = %files.cert.display(), "SVID from files");
                Ok(Some(identity))
            }
            Source::WorkloadApi(endpoint) => {
                let identity = workload::open(endpoint, wait).await?;
                tracing::info!(id = %identity.current().id, %endpoint, "SVID from the SPIFFE Workload API");
                Ok(Some(identity))
            }
        }
    }
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Insecure => f.write_str("insecure"),
            Source::Files(files) => write!(f, "SVID files {}", files.cert.display()),
            Source::WorkloadApi(e) => write!(f, "SPIFFE Workload API {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(insecure: &str, socket: &str, files: [&str; 3]) -> IdentityArgs {
        IdentityArgs {
            insecure: insecure.into(),
            spiffe_endpoint_socket: socket.into(),
            svid_cert_file: files[0].into(),
            svid_key_file: files[1].into(),
            trust_bundle_file: files[2].into(),
        }
    }

    #[test]
    fn secure_by_default_and_insecure_only_when_asked() {
        assert_eq!(
            args("false", "", ["", "", ""]).source(),
            Err(SourceError::None)
        );
        assert_eq!(
            args("true", "", ["", "", ""]).source(),
            Ok(Source::Insecure)
        );
        assert_eq!(
            args("yes", "", ["", "", ""]).source(),
            Err(SourceError::Insecure("yes".into()))
        );
        // Insecure wins over an identity set for the whole cluster.
        assert_eq!(
            args("true", "unix:///run/spire/agent.sock", ["", "", ""]).source(),
            Ok(Source::Insecure)
        );
    }

    #[test]
    fn the_workload_api_or_all_three_files() {
        assert_eq!(
            args("false", "unix:///run/spire/agent.sock", ["", "", ""]).source(),
            Ok(Source::WorkloadApi("unix:///run/spire/agent.sock".into()))
        );
        assert!(matches!(
            args("false", "", ["/c", "/k", "/b"]).source(),
            Ok(Source::Files(_))
        ));
        let e = args("false", "", ["/c", "", "/b"]).source().unwrap_err();
        assert_eq!(
            e.to_string(),
            "NSM_SVID_KEY_FILE must be set with NSM_SVID_CERT_FILE, NSM_TRUST_BUNDLE_FILE: the SVID files come as three"
        );
        assert_eq!(
            args("false", "unix:///a", ["/c", "/k", "/b"]).source(),
            Err(SourceError::Both)
        );
    }
}
