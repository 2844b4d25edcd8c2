//! monitor (sdk `common/monitor` server): UPDATE after every successful
//! Request, DELETE after every Close, with the connection as the hop
//! sees it (our segment's id and index).

use async_trait::async_trait;

use super::{Ctx, Element, Next, Req};
use crate::connection::Connection;
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
impl<E: Send + 'static> Element<E> for Monitor {
    async fn request(&self, ctx: &mut Ctx<E>, req: Req, next: Next<E>) -> Result<Connection, E> {
        let conn = next.request(ctx, req).await?;
        self.hub.update(&conn);
        Ok(conn)
    }

    async fn close(&self, ctx: &mut Ctx<E>, conn: Connection, next: Next<E>) -> Result<(), E> {
        let res = next.close(ctx, conn.clone()).await;
        self.hub.delete(&conn);
        res
    }
}
