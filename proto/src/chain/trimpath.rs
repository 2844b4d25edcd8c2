//! trimpath (sdk `common/trimpath`): the returned path ends at our own
//! segment. (A passthrough endpoint would keep the downstream segments.)

use async_trait::async_trait;

use super::{Ctx, Element, Next, Req, path_mut};
use crate::connection::Connection;

pub struct TrimPath;

#[async_trait]
impl<E: Send + 'static> Element<E> for TrimPath {
    async fn request(&self, ctx: &mut Ctx<E>, req: Req, next: Next<E>) -> Result<Connection, E> {
        let mut conn = next.request(ctx, req).await?;
        let path = path_mut(&mut conn);
        path.path_segments.truncate(path.index as usize + 1);
        Ok(conn)
    }

    async fn close(&self, ctx: &mut Ctx<E>, conn: Connection, next: Next<E>) -> Result<(), E> {
        next.close(ctx, conn).await
    }
}
