//! ipam: point-to-point addresses for the connection (see [`crate::ipam`]).
//! Addresses taken for a Request that then fails are given back; Close frees
//! them after the later elements (network functions) have undone their work.

use std::sync::Arc;

use async_trait::async_trait;
use nsm_api::chain::{Ctx, Element, Next, Req};
use nsm_api::connection::Connection;

use crate::error::NseError;
use crate::ipam::P2pIpam;

pub struct Ipam {
    ipam: Arc<P2pIpam>,
}

impl Ipam {
    pub fn new(ipam: Arc<P2pIpam>) -> Self {
        Ipam { ipam }
    }
}

#[async_trait]
impl Element<NseError> for Ipam {
    async fn request(
        &self,
        ctx: &mut Ctx<NseError>,
        mut req: Req,
        next: Next<NseError>,
    ) -> Result<Connection, NseError> {
        let id = req.conn.id.clone();
        let ip = req
            .conn
            .context
            .get_or_insert_default()
            .ip_context
            .get_or_insert_default();
        let pending = self.ipam.prepare(&id, ip)?;
        match next.request(ctx, req).await {
            Ok(conn) => {
                self.ipam.commit(pending);
                Ok(conn)
            }
            Err(e) => {
                self.ipam.rollback(pending);
                Err(e)
            }
        }
    }

    async fn close(
        &self,
        ctx: &mut Ctx<NseError>,
        conn: Connection,
        next: Next<NseError>,
    ) -> Result<(), NseError> {
        let id = conn.id.clone();
        let res = next.close(ctx, conn).await;
        self.ipam.release(&id);
        res
    }
}
