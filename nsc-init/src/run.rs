//! The whole run: request every service, wait for the interfaces, validate,
//! report, then (with --watch) keep the connections until told to stop.

use std::sync::Arc;

use nsm_api::token::TokenIssuer;

use crate::config::{Config, ConnectTo};
use crate::exit::Failure;
use crate::request::{Client, OwnNetns, Service};
use crate::wait::Expected;
use crate::{validate, wait, watch};

pub async fn run(cfg: Config, netns: OwnNetns) -> Result<(), Failure> {
    let cfg = Arc::new(cfg);
    let identity = cfg
        .identity
        .open(nsm_api::tls::IDENTITY_WAIT)
        .await
        .map_err(|e| Failure::Setup(e.to_string()))?;
    let tokens = TokenIssuer::for_identity(identity.as_ref(), &cfg.name, cfg.max_token_lifetime)
        .map_err(|e| Failure::Setup(e.to_string()))?;
    let client = Client {
        cfg: cfg.clone(),
        tokens: Arc::new(tokens),
        tls: identity,
        netns: Arc::new(netns),
    };
    // Before anything can succeed, so no signal slips past unhandled.
    let shutdown = cfg.watch.then(watch::Shutdown::install).transpose()?;
    tracing::info!(
        connect_to = %cfg.connect_to,
        netns = %client.netns.url(),
        services = cfg.services.len(),
        "requesting"
    );

    if matches!(cfg.connect_to, ConnectTo::Tcp(_)) {
        tracing::warn!("tcp: no fd passing; the hop must find our netns by its inode URL");
    }
    // Sequentially, like NSM's init container: on failure the earlier
    // connections stay (a restarted init container refreshes them by id).
    let mut established = Vec::new();
    let mut expected = Vec::new();
    for svc in Service::list(&cfg) {
        let conn = client
            .request(&svc, &svc.new_connection(), cfg.request_timeout)
            .await?;
        tracing::info!(service = %svc.url, id = %conn.id, endpoint = %conn.network_service_endpoint_name, "connected");
        expected.push(Expected::from_answer(&svc, &conn)?);
        established.push((svc, conn));
    }
    wait::wait_all(&expected, cfg.request_timeout).await?;
    if let Some(v) = &cfg.validate {
        validate::validate(v).await?;
    }
    for e in &expected {
        println!("nsc-init: {} up: {}", e.url, e.summary());
    }
    match shutdown {
        Some(shutdown) => watch::run(client, established, shutdown).await,
        None => Ok(()),
    }
}
