//! The endpoint's registration with NSM's registry (`NSM_CONNECT_TO`): what
//! it registers — each service with its payload unless
//! `NSM_REGISTER_SERVICE=false`, then the endpoint with its services, its
//! labels (`NSM_LABELS` plus sdk's client info: podName, nodeName,
//! clusterName) and its listening URL — handed to `nsm_api::register`.

use std::sync::Arc;

use nsm_api::register::{Registrar, Registration};
use nsm_api::registry::{NetworkService, NetworkServiceEndpoint, NetworkServiceLabels};
use nsm_api::tls::Identity;
use nsm_api::token::TokenIssuer;
use nsm_api::transport::{Dialer, Target};

use crate::config::Config;
use crate::server::ServeError;

/// Registration of this endpoint with the registry at `url`.
pub fn registrar(
    config: &Config,
    url: &str,
    identity: Option<&Arc<Identity>>,
    metrics: Arc<nsm_api::metrics::CallMetrics>,
) -> Result<Arc<Registrar>, ServeError> {
    let target: Target = url.parse().map_err(ServeError::Register)?;
    let dialer = Dialer::new(target, REGISTRY_DIAL_TIMEOUT).with_tls(identity)?;
    let tokens = Arc::new(TokenIssuer::for_identity(
        identity,
        &config.name,
        config.max_token_lifetime,
    )?);
    let mut labels: std::collections::HashMap<String, String> =
        config.labels.clone().into_iter().collect();
    let mut info = std::collections::BTreeMap::new();
    nsm_api::env::add_client_info(&mut info, |k| std::env::var(k).ok());
    for (k, v) in info {
        labels.entry(k).or_insert(v);
    }
    let endpoint = NetworkServiceEndpoint {
        name: config.name.clone(),
        network_service_names: config.service_names.clone(),
        network_service_labels: config
            .service_names
            .iter()
            .map(|s| {
                (
                    s.clone(),
                    NetworkServiceLabels {
                        labels: labels.clone(),
                    },
                )
            })
            .collect(),
        url: config.listen_on.to_string(),
        ..Default::default()
    };
    let services = if config.register_service {
        config
            .service_names
            .iter()
            .map(|name| NetworkService {
                name: name.clone(),
                payload: config.payload.clone(),
                ..Default::default()
            })
            .collect()
    } else {
        Vec::new()
    };
    Ok(Arc::new(
        Registrar::new(
            dialer,
            tokens,
            Registration {
                endpoint,
                services,
                unregister_on_exit: config.unregister_itself,
            },
        )
        .with_metrics(metrics),
    ))
}

/// Dialing the registry (nsmgr), each attempt.
const REGISTRY_DIAL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
