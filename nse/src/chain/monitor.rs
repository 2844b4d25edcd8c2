//! monitor (sdk `common/monitor` server): UPDATE after every successful
//! Request, DELETE after every Close, with the connection as the endpoint
//! sees it (our segment's id and index).

use async_trait::async_trait;
use nsm_api::connection::Connection;

use super::{Ctx, Element, Next, Req};
use crate::error::NseError;
use crate::monitor::MonitorHub;

pub struct Monitor {
    hub: MonitorHub,
}

impl Monitor {
    pub fn new(hub: MonitorHub) -> Self {
        Monitor { hub }
    }
}

#[async_trait]
impl Element for Monitor {
    async fn request(&self, ctx: &mut Ctx, req: Req, next: Next) -> Result<Connection, NseError> {
        let conn = next.request(ctx, req).await?;
        self.hub.update(&conn);
        Ok(conn)
    }

    async fn close(&self, ctx: &mut Ctx, conn: Connection, next: Next) -> Result<(), NseError> {
        let res = next.close(ctx, conn.clone()).await;
        self.hub.delete(&conn);
        res
    }
}
