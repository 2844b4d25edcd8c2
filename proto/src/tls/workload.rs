//! SVIDs and bundles from the SPIFFE Workload API (SPIRE's agent), through
//! the maintained `spiffe` crate: the first SVID is awaited, every later one
//! (rotation, a new bundle) replaces the identity's material as it arrives.

use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use spiffe::X509Source;

use super::{Identity, Material, TlsError, material};

/// Our SVID and our trust domain's bundle from `source`'s latest update.
fn current(source: &X509Source) -> Result<Material, TlsError> {
    let svid = source
        .svid()
        .map_err(|e| material("the Workload API's SVID", e))?;
    let bundles = source
        .bundle_set()
        .map_err(|e| material("the Workload API's bundles", e))?;
    let td = svid.spiffe_id().trust_domain();
    let bundle = bundles
        .get(td)
        .ok_or_else(|| material("the Workload API's bundles", format!("none for {td}")))?;
    let chain = svid
        .cert_chain()
        .iter()
        .map(|c| CertificateDer::from(c.as_bytes().to_vec()))
        .collect();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
        svid.private_key().as_bytes().to_vec(),
    ));
    let roots = bundle
        .authorities()
        .iter()
        .map(|c| CertificateDer::from(c.as_bytes().to_vec()))
        .collect();
    Material::from_der(chain, key, roots)
}

/// The identity from the Workload API at `endpoint`, once it handed us an
/// SVID (within `wait`), kept current while the identity lives.
pub(super) async fn open(endpoint: &str, wait: Duration) -> Result<Arc<Identity>, TlsError> {
    let source = X509Source::builder()
        .endpoint(endpoint)
        .initial_sync_timeout(wait)
        .build()
        .await
        .map_err(|e| material(format!("the SPIFFE Workload API at {endpoint}"), e))?;
    let identity = Identity::new(current(&source)?);
    let weak = Arc::downgrade(&identity);
    let mut updates = source.updated();
    tokio::spawn(async move {
        while updates.changed().await.is_ok() {
            let Some(identity) = weak.upgrade() else {
                break;
            };
            match current(&source) {
                Ok(m) => {
                    tracing::info!(id = %m.id, "SVID rotated by the Workload API");
                    identity.set(m);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot use the Workload API's update; keeping the current SVID")
                }
            }
        }
        source.shutdown().await;
    });
    Ok(identity)
}
