//! trimpath (sdk `common/trimpath`): the returned path ends at our own
//! segment. (A passthrough endpoint would keep the downstream segments.)

use async_trait::async_trait;
use nsm_api::connection::Connection;

use super::{Ctx, Element, Next, Req, path_mut};
use crate::error::NseError;

pub struct TrimPath;

#[async_trait]
impl Element for TrimPath {
    async fn request(&self, ctx: &mut Ctx, req: Req, next: Next) -> Result<Connection, NseError> {
        let mut conn = next.request(ctx, req).await?;
        let path = path_mut(&mut conn);
        path.path_segments.truncate(path.index as usize + 1);
        Ok(conn)
    }

    async fn close(&self, ctx: &mut Ctx, conn: Connection, next: Next) -> Result<(), NseError> {
        next.close(ctx, conn).await
    }
}
