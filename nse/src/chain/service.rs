//! Refuses Requests for network services this endpoint does not provide
//! (`NSM_SERVICE_NAMES`), first in the chain so nothing is allocated for
//! them. NSM's registry never routes such a Request here; a client talking
//! to the endpoint directly (the local setup) gets NotFound, which
//! nsc-init reports as an unknown service. Close passes: closing what was
//! never served is already a quiet no-op further down.

use async_trait::async_trait;
use nsm_api::chain::{Ctx, Element, Next, Req};
use nsm_api::connection::Connection;

use crate::error::NseError;

pub struct ServiceFilter {
    names: Vec<String>,
}

impl ServiceFilter {
    pub fn new(names: Vec<String>) -> Self {
        ServiceFilter { names }
    }
}

#[async_trait]
impl Element<NseError> for ServiceFilter {
    async fn request(
        &self,
        ctx: &mut Ctx<NseError>,
        req: Req,
        next: Next<NseError>,
    ) -> Result<Connection, NseError> {
        let service = &req.conn.network_service;
        if !self.names.iter().any(|n| n == service) {
            return Err(NseError::UnknownService {
                service: service.clone(),
                serves: self.names.join(", "),
            });
        }
        next.request(ctx, req).await
    }

    async fn close(
        &self,
        ctx: &mut Ctx<NseError>,
        conn: Connection,
        next: Next<NseError>,
    ) -> Result<(), NseError> {
        next.close(ctx, conn).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn req(service: &str) -> Req {
        Req {
            conn: Connection {
                id: "x".into(),
                network_service: service.into(),
                ..Default::default()
            },
            preferences: vec![],
        }
    }

    #[tokio::test]
    async fn only_configured_services_pass() {
        let chain = Next::chain(vec![Arc::new(ServiceFilter::new(vec![
            "mesh-proxy".into(),
            "other".into(),
        ])) as Arc<dyn Element<NseError>>]);
        let ok = chain
            .request(&mut Ctx::internal(), req("other"))
            .await
            .unwrap();
        assert_eq!(ok.network_service, "other");
        let e = chain
            .request(&mut Ctx::internal(), req("icmp-responder"))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::NotFound);
        assert_eq!(
            e.to_string(),
            "network service \"icmp-responder\" is not served by this endpoint (serves: mesh-proxy, other)"
        );
    }
}
