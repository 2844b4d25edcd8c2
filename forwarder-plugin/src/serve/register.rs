//! The forwarder's registration, as NSM's forwarders register so nsmgr can
//! pick one: an endpoint named `NSM_NAME` providing `NSM_SERVICE_NAME`
//! (`forwarder`) with `NSM_LABELS` (`p2p:true`) plus sdk's client info, at
//! its listening socket (passed by fd), with `NSM_CONNECT_TO`'s registry.

use std::sync::Arc;

use nsm_api::register::{Registrar, Registration};
use nsm_api::registry::{NetworkServiceEndpoint, NetworkServiceLabels};
use nsm_api::tls::{Identity, TlsError};
use nsm_api::token::TokenIssuer;
use nsm_api::transport::{Dialer, Target};

use super::config::ServeConfig;

pub fn registrar(
    cfg: &ServeConfig,
    identity: Option<&Arc<Identity>>,
    tokens: Arc<TokenIssuer>,
    metrics: Arc<nsm_api::metrics::CallMetrics>,
) -> Result<Arc<Registrar>, TlsError> {
    let dialer =
        Dialer::new(Target::Unix(cfg.next_hop.clone()), cfg.dial_timeout).with_tls(identity)?;
    let mut labels = cfg.labels.clone();
    nsm_api::env::add_client_info(&mut labels, |k| std::env::var(k).ok());
    let endpoint = NetworkServiceEndpoint {
        name: cfg.name.clone(),
        network_service_names: vec![cfg.service_name.clone()],
        network_service_labels: [(
            cfg.service_name.clone(),
            NetworkServiceLabels {
                labels: labels.into_iter().collect(),
            },
        )]
        .into(),
        url: cfg.listen_on_url(),
        ..Default::default()
    };
    Ok(Arc::new(
        Registrar::new(
            dialer,
            tokens,
            Registration {
                endpoint,
                services: Vec::new(),
                unregister_on_exit: cfg.unregister_itself,
            },
        )
        .with_metrics(metrics),
    ))
}
