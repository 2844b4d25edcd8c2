//! mechanisms + kernel + sendfd (sdk): choose KERNEL, fill its parameters and
//! our `server_interface` metric, and after a successful Request (and on
//! Close) queue our netns fd on the caller's unix connection, so the
//! forwarder can build the interface in our namespace.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use nsm_api::chain::{Ctx, Element, Next, Req, path_mut};
use nsm_api::connection::Connection;
use nsm_api::mechanism::MechanismExt;

use crate::error::NseError;
use crate::mechanism::{
    SERVER_INTERFACE_METRIC, fill_kernel, generate_interface_name, interface_metric, select,
};
use crate::netns::{OwnNetns, has_link};

pub struct KernelMechanism {
    netns: Arc<OwnNetns>,
    /// Generated interface name → the connection holding it. All our
    /// connections' interfaces live in our one netns, so a generated name
    /// must not repeat among live connections (4 random characters collide
    /// within a few thousand connections).
    generated: Mutex<HashMap<String, String>>,
}

impl KernelMechanism {
    pub fn new(netns: Arc<OwnNetns>) -> Self {
        KernelMechanism {
            netns,
            generated: Mutex::new(HashMap::new()),
        }
    }

    /// A fresh name for connection `id`, unused by any other live connection.
    fn reserve_name(&self, id: &str, service: &str) -> String {
        let mut held = self.generated.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            let name = generate_interface_name(service);
            if !held.contains_key(&name) {
                held.insert(name.clone(), id.to_owned());
                return name;
            }
        }
    }

    /// Forgets the generated name `id` holds (if any, and if it holds it).
    fn release_name(&self, id: &str, name: Option<&str>) {
        let Some(name) = name else { return };
        let mut held = self.generated.lock().unwrap_or_else(|p| p.into_inner());
        if held.get(name).is_some_and(|holder| holder == id) {
            held.remove(name);
        }
    }

    /// Queues our netns fd to go out with the response. A failure means the
    /// caller's connection is gone, so the response cannot reach it either.
    fn send_netns(&self, ctx: &Ctx<NseError>, id: &str) -> Result<(), String> {
        let Some(fds) = &ctx.fds else { return Ok(()) };
        match fds.send_fd(self.netns.fd()) {
            Ok(url) if url == self.netns.url() => Ok(()),
            Ok(url) => {
                tracing::warn!(%id, %url, want = %self.netns.url(), "sent netns fd has another inode");
                Ok(())
            }
            Err(e) => Err(e.to_string()),
        }
    }
}

/// How long past its caller's deadline a new connection's interface may
/// take to appear here (scheduling, a slow netlink).
pub const PLUMBING_GRACE: Duration = Duration::from_secs(5);
/// The deadline assumed when the caller sent none (NSM's default request timeout).
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

/// A forwarder builds our side of a new connection after our answer and
/// before its own deadline; if it died first (or the answer was lost on
/// the way), no Close will ever name this connection — a retry comes with a
/// new id. So once the caller's deadline has passed, a connection whose
/// interface is not in our netns is closed as at expiry, instead of holding
/// its addresses and rules until then.
fn watch_plumbing(ctx: &Ctx<NseError>, conn: &Connection) {
    let (Some(events), Some(name)) = (
        ctx.events.clone(),
        conn.mechanism
            .as_ref()
            .and_then(|m| m.interface_name())
            .map(str::to_owned),
    ) else {
        return;
    };
    let wait = match ctx.request_timeout {
        t if t.is_zero() => DEFAULT_REQUEST_TIMEOUT,
        t => t,
    } + PLUMBING_GRACE;
    tokio::spawn(async move {
        tokio::time::sleep(wait).await;
        if !has_link(&name) {
            tracing::info!(id = %events.id(), interface = %name, "no forwarder built this connection's interface by its deadline: closing it");
            // Unless it appeared meanwhile.
            if let Err(e) = events.close(|| has_link(&name)).await {
                tracing::warn!(id = %events.id(), error = %e, "closing the unplumbed connection failed");
            }
        }
    });
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
        let id = req.conn.id.clone();
        let reserved = match m.interface_name() {
            Some(_) => None,
            None => {
                let name = self.reserve_name(&id, &req.conn.network_service);
                m.set_param(nsm_api::mechanism::keys::NAME, name.clone());
                Some(name)
            }
        };
        if let Err(e) = fill_kernel(&mut m, &req.conn.network_service, self.netns.url()) {
            self.release_name(&id, reserved.as_deref());
            return Err(e.into());
        }
        let metric = interface_metric(&m);
        let path = path_mut(&mut req.conn);
        let own = path.index as usize;
        if let Some(seg) = path.path_segments.get_mut(own) {
            seg.metrics
                .insert(SERVER_INTERFACE_METRIC.to_owned(), metric);
        }
        req.conn.mechanism = Some(m);
        let conn = match next.request(ctx, req).await {
            Ok(conn) => conn,
            Err(e) => {
                // A refused new connection never held its name.
                self.release_name(&id, reserved.as_deref());
                return Err(e);
            }
        };
        match self.send_netns(ctx, &conn.id) {
            Ok(()) => {
                if ctx.fds.is_some() && !ctx.events.as_ref().is_some_and(|ev| ev.is_refresh()) {
                    watch_plumbing(ctx, &conn);
                }
                Ok(conn)
            }
            // A refresh keeps what was established (its caller asks again);
            // a new connection whose answer cannot go out is undone here, as
            // no Close will ever name it (a retry comes with a new id).
            Err(e) if ctx.events.as_ref().is_some_and(|ev| ev.is_refresh()) => {
                tracing::warn!(id = %conn.id, error = %e, "cannot queue the netns fd to the caller of a refresh");
                Ok(conn)
            }
            Err(e) => {
                tracing::info!(id = %conn.id, error = %e, "the caller went before our answer: rolling the connection back");
                let name = conn
                    .mechanism
                    .as_ref()
                    .and_then(|m| m.interface_name())
                    .map(str::to_owned);
                if let Err(ce) = next.close(&mut Ctx::internal(), conn.clone()).await {
                    tracing::warn!(id = %conn.id, error = %ce, "rolling back the unanswered connection failed");
                }
                self.release_name(&id, name.as_deref());
                Err(NseError::CallerGone(e))
            }
        }
    }

    async fn close(
        &self,
        ctx: &mut Ctx<NseError>,
        conn: Connection,
        next: Next<NseError>,
    ) -> Result<(), NseError> {
        let kernel = conn.mechanism.as_ref().is_some_and(|m| m.is_kernel());
        let id = conn.id.clone();
        let name = conn
            .mechanism
            .as_ref()
            .and_then(|m| m.interface_name())
            .map(str::to_owned);
        self.release_name(&id, name.as_deref());
        let res = next.close(ctx, conn).await;
        if kernel && let Err(e) = self.send_netns(ctx, &id) {
            tracing::warn!(%id, error = %e, "cannot queue the netns fd to the caller of a Close");
        }
        res
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_names_never_repeat_among_live_connections() {
        let k = KernelMechanism::new(Arc::new(OwnNetns::open().unwrap()));
        // 20,000 draws from 62^4 names collide with near certainty (birthday
        // bound), so this fails if reservation does not check live names.
        let mut seen = std::collections::HashSet::new();
        for i in 0..20_000 {
            let name = k.reserve_name(&format!("c{i}"), "mesh-proxy");
            assert!(name.starts_with("mesh-proxy-") && name.len() == 15);
            assert!(seen.insert(name.clone()), "{name} handed out twice");
        }
        // A released name is free again; a name is only released by its holder.
        let name = k.reserve_name("a", "svc");
        k.release_name("someone-else", Some(&name));
        assert_eq!(
            k.generated.lock().unwrap().get(&name).map(String::as_str),
            Some("a")
        );
        k.release_name("a", Some(&name));
        assert!(!k.generated.lock().unwrap().contains_key(&name));
    }
}
