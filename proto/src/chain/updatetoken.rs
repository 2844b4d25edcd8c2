//! updatetoken (sdk `common/updatetoken`): the caller's per-RPC token goes
//! into the previous path segment (that hop's own segment), and a fresh token
//! of ours for the caller, with its `expires`, into our segment.

use std::sync::Arc;

use async_trait::async_trait;

use super::{ChainError, Ctx, Element, HopError, Next, Req, path_mut};
use crate::connection::Connection;
use crate::path::to_timestamp;
use crate::token::TokenIssuer;

pub struct UpdateToken {
    issuer: Arc<TokenIssuer>,
}

impl UpdateToken {
    pub fn new(issuer: Arc<TokenIssuer>) -> Self {
        UpdateToken { issuer }
    }

    fn update<E>(&self, ctx: &Ctx<E>, conn: &mut Connection) -> Result<(), ChainError> {
        let path = path_mut(conn);
        let index = path.index as usize;
        let len = path.path_segments.len();
        if index >= len {
            return Err(ChainError::Internal(format!(
                "path index {index} ≥ {len} segments after updatepath"
            )));
        }
        if let (Some(tok), Some(prev)) = (
            &ctx.client_token,
            index.checked_sub(1).map(|p| &mut path.path_segments[p]),
        ) {
            prev.token = tok.token.clone();
            prev.expires = Some(to_timestamp(tok.expires));
        }
        // For the caller: `aud` its SPIFFE ID (as sdk's updatetoken server).
        let own = self.issuer.issue_for(ctx.peer.as_ref())?;
        let seg = &mut path.path_segments[index];
        seg.token = own.jwt;
        seg.expires = Some(to_timestamp(own.expires));
        Ok(())
    }
}

#[async_trait]
impl<E: HopError> Element<E> for UpdateToken {
    async fn request(
        &self,
        ctx: &mut Ctx<E>,
        mut req: Req,
        next: Next<E>,
    ) -> Result<Connection, E> {
        self.update(ctx, &mut req.conn)?;
        next.request(ctx, req).await
    }

    async fn close(&self, ctx: &mut Ctx<E>, mut conn: Connection, next: Next<E>) -> Result<(), E> {
        self.update(ctx, &mut conn)?;
        next.close(ctx, conn).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chain::ClientToken;
    use crate::connection::{Path, PathSegment};
    use std::time::{Duration, SystemTime};

    #[tokio::test]
    async fn copies_the_callers_token_back_and_issues_ours() {
        let issuer = Arc::new(TokenIssuer::ephemeral("nse", Duration::from_secs(60)).unwrap());
        let chain: Next<ChainError> = Next::chain(vec![Arc::new(UpdateToken::new(issuer))]);
        let seg = |n: &str| PathSegment {
            name: n.into(),
            id: n.into(),
            token: format!("old-{n}"),
            ..Default::default()
        };
        let conn = Connection {
            id: "nse".into(),
            path: Some(Path {
                index: 2,
                path_segments: vec![seg("c"), seg("f"), seg("nse")],
            }),
            ..Default::default()
        };
        let expires = SystemTime::UNIX_EPOCH + Duration::from_secs(2_000_000_000);
        let mut ctx = Ctx {
            client_token: Some(ClientToken {
                token: "from-metadata".into(),
                expires,
            }),
            ..Default::default()
        };
        let out = chain
            .request(
                &mut ctx,
                Req {
                    conn,
                    preferences: vec![],
                },
            )
            .await
            .unwrap();
        let segs = &out.path.unwrap().path_segments;
        assert_eq!(segs[0].token, "old-c");
        assert_eq!(segs[1].token, "from-metadata");
        assert_eq!(segs[1].expires, Some(to_timestamp(expires)));
        assert_eq!(segs[2].token.split('.').count(), 3, "a JWT");
        assert!(segs[2].expires.is_some());
    }
}
