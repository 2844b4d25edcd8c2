//! authorize (sdk `common/authorize` server): NSM's policies over the path
//! up to our segment, with the caller's certificate, the caller's segment
//! holding the token it signed for us (as updatetoken will put it) — and the
//! connection kept to the client that made it: a refresh or Close naming
//! its id must come down a path that starts with the same SPIFFE ID (a
//! refresh through another forwarder is still that client's). It runs right
//! after updatepath, before begin, so a denied call touches no connection
//! state. Denials are `PermissionDenied` with the policy and the reason.
//! Callers without TLS are not checked (insecure mode has no certificates
//! to check against).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use async_trait::async_trait;

use super::{ChainError, Ctx, Element, HopError, Next, Req};
use crate::authorize::{Policies, check_server, decode};
use crate::connection::Connection;
use crate::tls::Identity;

pub struct Authorize {
    policies: Policies,
    /// Ours: the SPIFFE ID the caller's token must be for.
    identity: Option<Arc<Identity>>,
    /// Connection id → SPIFFE ID of the client that made it (`sub` of
    /// segment 0's token). Bounded by the connections the hop holds: an
    /// entry goes with the connection's Close or expiry.
    owners: Mutex<HashMap<String, String>>,
}

impl Authorize {
    pub fn new(policies: Policies, identity: Option<Arc<Identity>>) -> Self {
        Authorize {
            policies,
            identity,
            owners: Mutex::default(),
        }
    }

    /// Checks the caller's path; returns the connection's client.
    fn admit<E>(&self, ctx: &Ctx<E>, conn: &Connection) -> Result<Option<String>, ChainError> {
        let (Some(peer), Some(identity)) = (&ctx.peer, &self.identity) else {
            return Ok(None);
        };
        let path = conn
            .path
            .as_ref()
            .ok_or_else(|| ChainError::Internal("no path after updatepath".into()))?;
        let upto = (path.index as usize).min(path.path_segments.len());
        let mut callers = path.path_segments[..upto].to_vec();
        if let (Some(prev), Some(tok)) = (callers.last_mut(), &ctx.client_token) {
            prev.token = tok.token.clone();
        }
        let me = identity.current().id.to_string();
        check_server(&self.policies, &callers, &me, peer, SystemTime::now())
            .map_err(|d| ChainError::Denied(d.to_string()))?;
        let client = path
            .path_segments
            .first()
            .and_then(|s| decode(&s.token).ok())
            .map(|c| c.sub)
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| peer.id.to_string());
        let owners = self.owners.lock().unwrap_or_else(|p| p.into_inner());
        match owners.get(&conn.id) {
            Some(owner) if *owner != client => Err(ChainError::Denied(format!(
                "connection {} was made by {owner}; {client} may not refresh or close it",
                conn.id
            ))),
            _ => Ok(Some(client)),
        }
    }

    pub fn owners(&self) -> usize {
        self.owners.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

#[async_trait]
impl<E: HopError> Element<E> for Authorize {
    async fn request(&self, ctx: &mut Ctx<E>, req: Req, next: Next<E>) -> Result<Connection, E> {
        let client = self.admit(ctx, &req.conn)?;
        let id = req.conn.id.clone();
        let conn = next.request(ctx, req).await?;
        if let Some(client) = client {
            self.owners
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(id, client);
        }
        Ok(conn)
    }

    async fn close(&self, ctx: &mut Ctx<E>, conn: Connection, next: Next<E>) -> Result<(), E> {
        self.admit(ctx, &conn)?;
        let id = conn.id.clone();
        let res = next.close(ctx, conn).await;
        self.owners
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
        res
    }
}
