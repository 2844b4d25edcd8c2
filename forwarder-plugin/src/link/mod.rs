//! Links, addresses, routes and neighbours over rtnetlink, one [`Links`]
//! handle per network namespace, plus [`plumb_veth`]/[`unplumb`] that wire a
//! veth pair between two namespaces and take it away again.
//!
//! Mechanism only: what to plumb (names, addresses, routes) is the caller's
//! policy. Every "add" is idempotent — asking again for what already exists is
//! `Ok` — and a different existing object is a clear conflict error.
//!
//! The netlink socket of a handle is created on a short-lived thread inside
//! the namespace ([`Netns::run`]) and then driven from the tokio runtime: a
//! socket stays bound to the namespace it was made in, so no runtime thread
//! ever switches namespace.

mod addr;
mod error;
mod mac;
mod neigh;
mod plumb;
mod route;
mod rule;
mod veth;

pub use addr::AddrOptions;
pub use error::{LinkError, Result};
pub use mac::MacAddr;
pub use plumb::{
    NeighbourSpec, Plumbed, PlumbedEnd, VethEnd, VethPlan, plumb_veth, plumb_veth_in,
    plumb_veth_with, unplumb, unplumb_in, unplumb_with,
};
pub use route::RouteSpec;
pub use rule::{RULE_PRIORITY, RULE_PROTO, RuleSpec};
pub use veth::{LinkState, VethPair, VethSpec};

use futures::StreamExt;
use rtnetlink::packet_core::{
    NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NetlinkMessage, NetlinkPayload,
};
use rtnetlink::packet_route::RouteNetlinkMessage;

use crate::netns::{Netns, NetnsId};

/// A route-netlink connection bound to one network namespace. Dropping it
/// closes the socket (which would otherwise keep the namespace alive).
#[derive(Debug)]
pub struct Links {
    netns: Netns,
    handle: rtnetlink::Handle,
    conn: tokio::task::AbortHandle,
}

impl Links {
    /// Opens a netlink socket inside `netns`; must be called from within a
    /// tokio runtime, which then drives the connection.
    pub fn open(netns: &Netns) -> Result<Links> {
        let rt = tokio::runtime::Handle::try_current().map_err(|_| LinkError::NoRuntime)?;
        let socket_err = |source| LinkError::Socket {
            netns: netns.id(),
            source,
        };
        let netns = netns.try_clone().map_err(socket_err)?;
        // The socket registers with the runtime's reactor on creation, hence
        // `enter` on the namespace thread.
        let (conn, handle, _unsolicited) = netns
            .run(|| {
                let _rt = rt.enter();
                rtnetlink::new_connection()
            })?
            .map_err(socket_err)?;
        let conn = rt.spawn(conn).abort_handle();
        Ok(Links {
            netns,
            handle,
            conn,
        })
    }

    pub fn netns(&self) -> &Netns {
        &self.netns
    }

    pub fn netns_id(&self) -> NetnsId {
        self.netns.id()
    }

    /// Wraps a kernel refusal of `op` with this namespace's identity.
    fn kernel_err(&self, op: impl Into<String>, source: std::io::Error) -> LinkError {
        LinkError::Kernel {
            op: op.into(),
            netns: self.netns.id(),
            source,
        }
    }

    /// Sends one request and waits for the kernel's acknowledgement.
    async fn ack(&self, msg: RouteNetlinkMessage, flags: u16) -> std::io::Result<()> {
        let mut req = NetlinkMessage::from(msg);
        req.header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
        let mut replies = self.handle.clone().request(req).map_err(transport)?;
        while let Some(reply) = replies.next().await {
            if let NetlinkPayload::Error(e) = reply.payload
                && e.code.is_some()
            {
                return Err(e.to_io());
            }
        }
        Ok(())
    }

    /// Sends a get request (`dump` for all objects of a kind) and collects the
    /// replies.
    async fn get(
        &self,
        msg: RouteNetlinkMessage,
        dump: bool,
    ) -> std::io::Result<Vec<RouteNetlinkMessage>> {
        let mut req = NetlinkMessage::from(msg);
        req.header.flags = NLM_F_REQUEST | if dump { NLM_F_DUMP } else { 0 };
        let mut replies = self.handle.clone().request(req).map_err(transport)?;
        let mut out = Vec::new();
        while let Some(reply) = replies.next().await {
            match reply.payload {
                NetlinkPayload::InnerMessage(m) => out.push(m),
                NetlinkPayload::Error(e) if e.code.is_some() => return Err(e.to_io()),
                _ => {}
            }
        }
        Ok(out)
    }
}

impl Drop for Links {
    fn drop(&mut self) {
        self.conn.abort();
    }
}

fn transport(e: rtnetlink::Error) -> std::io::Error {
    std::io::Error::other(format!("netlink connection: {e}"))
}

fn is_errno(e: &std::io::Error, errno: nix::errno::Errno) -> bool {
    e.raw_os_error() == Some(errno as i32)
}
