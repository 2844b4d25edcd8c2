//! mechanisms + kernel + sendfd (sdk): choose KERNEL, fill its parameters and
//! our `server_interface` metric, and after a successful Request (and on
//! Close) queue our netns fd on the caller's unix connection, so the
//! forwarder can build the interface in our namespace.

use std::sync::Arc;

use async_trait::async_trait;
use nsm_api::chain::{Ctx, Element, Next, Req, path_mut};
use nsm_api::connection::Connection;
use nsm_api::mechanism::MechanismExt;

use crate::error::NseError;
use crate::mechanism::{SERVER_INTERFACE_METRIC, fill_kernel, interface_metric, select};
use crate::netns::OwnNetns;

pub struct KernelMechanism {
    netns: Arc<OwnNetns>,
}

impl KernelMechanism {
    pub fn new(netns: Arc<OwnNetns>) -> Self {
        KernelMechanism { netns }
    }

    /// Queues our netns fd to go out with the response. A failure means the
    /// caller's connection is gone, so the response cannot reach it either:
    /// log it and let expiry clean up, as for any lost response.
    fn send_netns(&self, ctx: &Ctx<NseError>, id: &str) {
        let Some(fds) = &ctx.fds else { return };
        match fds.send_fd(self.netns.fd()) {
            Ok(url) if url == self.netns.url() => {}
            Ok(url) => {
                tracing::warn!(%id, %url, want = %self.netns.url(), "sent netns fd has another inode")
            }
            Err(e) => tracing::warn!(%id, error = %e, "cannot queue the netns fd to the caller"),
        }
    }
}

#[async_trait]
impl Element<NseError> for KernelMechanism {
    async fn request(
        &self,
        ctx: &mut Ctx<NseError>,
        mut req: Req,
        next: Next<NseError>,
    ) -> Result<Connection, NseError> {
        let mut m = select(req.conn.mechanism.as_ref(), &req.preferences)?;
        fill_kernel(&mut m, &req.conn.network_service, self.netns.url())?;
        let metric = interface_metric(&m);
        let path = path_mut(&mut req.conn);
        let own = path.index as usize;
        if let Some(seg) = path.path_segments.get_mut(own) {
            seg.metrics
                .insert(SERVER_INTERFACE_METRIC.to_owned(), metric);
        }
        req.conn.mechanism = Some(m);
        let conn = next.request(ctx, req).await?;
        self.send_netns(ctx, &conn.id);
        Ok(conn)
    }

    async fn close(
        &self,
        ctx: &mut Ctx<NseError>,
        conn: Connection,
        next: Next<NseError>,
    ) -> Result<(), NseError> {
        let kernel = conn.mechanism.as_ref().is_some_and(|m| m.is_kernel());
        let id = conn.id.clone();
        let res = next.close(ctx, conn).await;
        if kernel {
            self.send_netns(ctx, &id);
        }
        res
    }
}
