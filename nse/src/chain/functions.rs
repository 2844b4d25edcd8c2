//! The network-function slot: what this endpoint does for a connection once
//! it has addresses and a mechanism (filter it, put a mesh proxy in its
//! path), as the chain of function instances its configuration names.
//!
//! A connection's chain applies in order on every Request (first and
//! refresh) and is undone in reverse order on Close and expiry. If a new
//! connection fails part-way, the functions already applied are undone, so
//! nothing is left half-applied; a failed refresh leaves the established
//! state alone.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use nsm_api::chain::{Ctx, Element, Next, Req};
use nsm_api::connection::Connection;
use tracing::Instrument;

use crate::error::NseError;
use crate::metrics::FunctionMetrics;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FunctionError {
    /// The connection asks for something this function cannot do (the caller's fault).
    #[error("network function {function}: {reason}")]
    Rejected { function: String, reason: String },
    /// The function could not do its work.
    #[error("network function {function} failed: {reason}")]
    Failed { function: String, reason: String },
    /// The endpoint lacks what the function needs (e.g. a capability).
    #[error("network function {function} is unavailable: {reason}")]
    Precondition { function: String, reason: String },
    /// What the function needs is not ready now (e.g. its proxy is
    /// restarting): a retry may succeed.
    #[error("network function {function} is not ready: {reason}")]
    NotReady { function: String, reason: String },
}

/// Something a function owns alone: two instances claiming the same one
/// would overwrite each other, so the endpoint refuses to start.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Claim {
    /// A rules table in the endpoint's netns (nft `inet <owner>`, iptables
    /// chains `<OWNER>_*`).
    Table(String),
    /// A key of the connection's `context.extra_context`.
    ContextKey(String),
    /// `context.ip_context.policies` (NSM's policy routes in the client).
    IpPolicies,
    /// A network interface in the endpoint's netns.
    Interface(String),
    /// A UDP port the endpoint listens on.
    UdpPort(u16),
    /// A route (destination prefix) in the endpoint's main table.
    Route(String),
}

impl std::fmt::Display for Claim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Claim::Table(t) => write!(f, "rules table {t}"),
            Claim::ContextKey(k) => write!(f, "extra_context key {k:?}"),
            Claim::IpPolicies => f.write_str("ip_context.policies"),
            Claim::Interface(i) => write!(f, "interface {i}"),
            Claim::UdpPort(p) => write!(f, "UDP port {p}"),
            Claim::Route(r) => write!(f, "route to {r}"),
        }
    }
}

/// One network function instance of the endpoint.
#[async_trait]
pub trait NetworkFunction: Send + Sync + 'static {
    /// Its instance name, for logs and errors.
    fn name(&self) -> &str;

    /// What it owns alone ([`Claim`]).
    fn claims(&self) -> Vec<Claim>;

    /// Applies the function for `conn` (addresses and mechanism already set);
    /// may add to it (e.g. `context.extra_context` for the hop). Called again
    /// on every refresh, so it must be idempotent.
    async fn apply(&self, conn: &mut Connection) -> Result<(), FunctionError>;

    /// Undoes everything `apply` did for this connection. Idempotent.
    async fn undo(&self, conn: &Connection) -> Result<(), FunctionError>;

    /// The connections a previous run left to it and it took over (id,
    /// `src_ip_addrs`, `dst_ip_addrs`): IPAM keeps their addresses.
    fn adopted(&self) -> Vec<(String, Vec<String>, Vec<String>)> {
        Vec::new()
    }

    /// Upkeep, every [`crate::functions::MAINTENANCE_PERIOD`]: repairs what
    /// drifted; returns the adopted connections it let go (their interface
    /// is gone).
    async fn maintain(&self) -> Vec<String> {
        Vec::new()
    }

    /// At exit.
    fn release(&self) {}
}

/// A connection's functions in packet order.
pub type FunctionChain = Vec<Arc<dyn NetworkFunction>>;

/// Chooses a connection's chain (by policy; see `crate::functions`): its
/// name and functions.
pub trait ChainSelector: Send + Sync + 'static {
    fn select(&self, conn: &Connection) -> (String, FunctionChain);
}

/// One chain for every connection.
pub struct Fixed(pub FunctionChain);

impl ChainSelector for Fixed {
    fn select(&self, _: &Connection) -> (String, FunctionChain) {
        ("default".into(), self.0.clone())
    }
}

fn contains(chain: &[Arc<dyn NetworkFunction>], f: &Arc<dyn NetworkFunction>) -> bool {
    chain.iter().any(|g| Arc::ptr_eq(g, f))
}

/// Runs each connection's chain.
pub struct Functions {
    selector: Arc<dyn ChainSelector>,
    /// Connections whose chain is applied, with that chain: a Close undoes
    /// what was applied, whatever the policy says by then.
    applied: Mutex<HashMap<String, (String, FunctionChain)>>,
    metrics: FunctionMetrics,
}

impl Functions {
    pub fn new(selector: Arc<dyn ChainSelector>) -> Self {
        Functions {
            selector,
            applied: Mutex::new(HashMap::new()),
            metrics: FunctionMetrics::default(),
        }
    }

    /// Counts connections and failures by function and chain in `metrics`.
    pub fn with_metrics(mut self, metrics: FunctionMetrics) -> Self {
        self.metrics = metrics;
        self
    }

    fn count(&self, (chain, funcs): &(String, FunctionChain), by: i64) {
        self.metrics
            .moved(chain, funcs.iter().map(|f| f.name()), by);
    }

    fn applied(&self) -> std::sync::MutexGuard<'_, HashMap<String, (String, FunctionChain)>> {
        self.applied.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Undoes `funcs` in reverse order; the first error is returned, every undo still runs.
    async fn undo_all(
        funcs: &[Arc<dyn NetworkFunction>],
        conn: &Connection,
    ) -> Result<(), FunctionError> {
        let mut first = None;
        for f in funcs.iter().rev() {
            let span = tracing::info_span!("undo", id = %conn.id, function = f.name());
            if let Err(e) = f.undo(conn).instrument(span).await {
                tracing::warn!(id = %conn.id, function = f.name(), error = %e, "undo failed");
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }

    /// What functions that left a connection's chain wrote into it: their
    /// claimed context keys and policies, which the client echoes back.
    fn strip(conn: &mut Connection, gone: &[Arc<dyn NetworkFunction>]) {
        let Some(ctx) = conn.context.as_mut() else {
            return;
        };
        for c in gone.iter().flat_map(|f| f.claims()) {
            match c {
                Claim::ContextKey(k) => {
                    ctx.extra_context.remove(&k);
                }
                Claim::IpPolicies => {
                    if let Some(ip) = ctx.ip_context.as_mut() {
                        ip.policies.clear();
                    }
                }
                Claim::Table(_) | Claim::Interface(_) | Claim::UdpPort(_) | Claim::Route(_) => {}
            }
        }
    }
}

#[async_trait]
impl Element<NseError> for Functions {
    /// A new connection gets the chain its policy selects; a refresh keeps
    /// its chain unless the policy now selects another: the new chain is
    /// applied, then what only the old one had is undone. A failure leaves
    /// a new connection nothing and a refreshed one its old chain.
    async fn request(
        &self,
        ctx: &mut Ctx<NseError>,
        mut req: Req,
        next: Next<NseError>,
    ) -> Result<Connection, NseError> {
        let id = req.conn.id.clone();
        let (name, chain) = self.selector.select(&req.conn);
        let old = self.applied().get(&id).cloned();
        let old_chain: FunctionChain = match &old {
            Some((n, c)) if *n != name => {
                tracing::info!(%id, from = %n, to = %name, "the policy selects another chain: moving the connection");
                c.clone()
            }
            Some(_) => chain.clone(),
            None => Vec::new(),
        };
        // What to undo if this Request fails: what the connection did not have.
        let fresh: FunctionChain = chain
            .iter()
            .filter(|f| !contains(&old_chain, f))
            .cloned()
            .collect();
        let gone: FunctionChain = old_chain
            .iter()
            .filter(|f| !contains(&chain, f))
            .cloned()
            .collect();
        for (i, f) in chain.iter().enumerate() {
            // Its log lines (and, with telemetry, its span) name the
            // connection and the function.
            let span = tracing::info_span!("apply", %id, function = f.name());
            if let Err(e) = f.apply(&mut req.conn).instrument(span).await {
                self.metrics.failed(f.name());
                let applied: FunctionChain = chain[..=i]
                    .iter()
                    .filter(|f| contains(&fresh, f))
                    .cloned()
                    .collect();
                let _ = Self::undo_all(&applied, &req.conn).await;
                return Err(e.into());
            }
        }
        Self::strip(&mut req.conn, &gone);
        let undo_conn = req.conn.clone();
        match next.request(ctx, req).await {
            Ok(conn) => {
                let _ = Self::undo_all(&gone, &conn).await;
                let now = (name, chain);
                self.count(&now, 1);
                if let Some(before) = self.applied().insert(id, now) {
                    self.count(&before, -1);
                }
                Ok(conn)
            }
            Err(e) => {
                let _ = Self::undo_all(&fresh, &undo_conn).await;
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
        // Unknown here (e.g. adopted from a previous run): the chain the
        // policy selects for it.
        let removed = self.applied().remove(&conn.id);
        let chain = match removed {
            Some(entry) => {
                self.count(&entry, -1);
                entry.1
            }
            None => self.selector.select(&conn).1,
        };
        let undone = Self::undo_all(&chain, &conn).await;
        let res = next.close(ctx, conn).await;
        undone?;
        res
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records apply/undo calls into a shared log; fails `apply` when told.
    struct Fake {
        name: &'static str,
        log: Arc<Mutex<Vec<String>>>,
        fail: bool,
    }

    #[async_trait]
    impl NetworkFunction for Fake {
        fn name(&self) -> &str {
            self.name
        }
        fn claims(&self) -> Vec<Claim> {
            Vec::new()
        }
        async fn apply(&self, conn: &mut Connection) -> Result<(), FunctionError> {
            self.log
                .lock()
                .unwrap()
                .push(format!("apply {}", self.name));
            if self.fail {
                return Err(FunctionError::Failed {
                    function: self.name.into(),
                    reason: "boom".into(),
                });
            }
            conn.labels.insert(self.name.into(), "on".into());
            Ok(())
        }
        async fn undo(&self, _: &Connection) -> Result<(), FunctionError> {
            self.log.lock().unwrap().push(format!("undo {}", self.name));
            Ok(())
        }
    }

    fn chain(fail_b: bool) -> (Next<NseError>, Arc<Mutex<Vec<String>>>) {
        chain_failing(if fail_b { "b" } else { "" })
    }

    fn chain_failing(which: &str) -> (Next<NseError>, Arc<Mutex<Vec<String>>>) {
        let log = Arc::new(Mutex::new(Vec::new()));
        let f = |name, fail| {
            Arc::new(Fake {
                name,
                log: log.clone(),
                fail,
            }) as Arc<dyn NetworkFunction>
        };
        let funcs = Functions::new(Arc::new(Fixed(vec![
            f("a", which == "a"),
            f("b", which == "b"),
            f("c", which == "c"),
        ])));
        (Next::chain(vec![Arc::new(funcs)]), log)
    }

    fn req() -> Req {
        refresh_of(Connection {
            id: "x".into(),
            ..Default::default()
        })
    }

    /// The Request that refreshes `conn`.
    fn refresh_of(conn: Connection) -> Req {
        Req {
            conn,
            preferences: vec![],
        }
    }

    #[tokio::test]
    async fn apply_in_order_undo_in_reverse() {
        let (chain, log) = chain(false);
        let out = chain.request(&mut Ctx::internal(), req()).await.unwrap();
        assert_eq!(out.labels.len(), 3);
        chain.close(&mut Ctx::internal(), out).await.unwrap();
        assert_eq!(
            *log.lock().unwrap(),
            [
                "apply a", "apply b", "apply c", "undo c", "undo b", "undo a"
            ]
        );
    }

    #[tokio::test]
    async fn a_failing_function_undoes_what_was_applied() {
        let (chain, log) = chain(true);
        let e = chain
            .request(&mut Ctx::internal(), req())
            .await
            .unwrap_err();
        assert!(
            e.to_string().contains("network function b failed: boom"),
            "{e}"
        );
        assert_eq!(
            *log.lock().unwrap(),
            ["apply a", "apply b", "undo b", "undo a"]
        );
    }

    /// The third function failing leaves nothing of the first two.
    #[tokio::test]
    async fn a_failing_third_function_undoes_the_first_two() {
        let (chain, log) = chain_failing("c");
        let e = chain
            .request(&mut Ctx::internal(), req())
            .await
            .unwrap_err();
        assert!(e.to_string().contains("network function c failed"), "{e}");
        assert_eq!(
            *log.lock().unwrap(),
            [
                "apply a", "apply b", "apply c", "undo c", "undo b", "undo a"
            ]
        );
    }

    /// Chooses chain "one" or "two" as told.
    struct Switch {
        to: Mutex<&'static str>,
        one: FunctionChain,
        two: FunctionChain,
    }

    impl ChainSelector for Switch {
        fn select(&self, _: &Connection) -> (String, FunctionChain) {
            let to = *self.to.lock().unwrap();
            let c = if to == "one" { &self.one } else { &self.two };
            (to.into(), c.clone())
        }
    }

    /// A refresh under a policy naming another chain applies the new chain
    /// (first, so the connection is never without its functions) and then
    /// undoes only what the old one had alone; if the new chain fails, the
    /// connection keeps the old one and nothing new stays.
    #[tokio::test]
    async fn a_policy_change_moves_a_connection_at_refresh() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let f = |name, fail| {
            Arc::new(Fake {
                name,
                log: log.clone(),
                fail,
            }) as Arc<dyn NetworkFunction>
        };
        let (fw, proxy, vpn, broken) = (
            f("fw", false),
            f("proxy", false),
            f("vpn", false),
            f("broken", true),
        );
        let switch = Arc::new(Switch {
            to: Mutex::new("one"),
            one: vec![fw.clone(), proxy.clone()],
            two: vec![proxy.clone(), vpn.clone()],
        });
        let chain = Next::chain(vec![
            Arc::new(Functions::new(switch.clone())) as Arc<dyn Element<NseError>>
        ]);
        let conn = chain.request(&mut Ctx::internal(), req()).await.unwrap();
        *switch.to.lock().unwrap() = "two";
        log.lock().unwrap().clear();
        let conn = chain
            .request(&mut Ctx::internal(), refresh_of(conn))
            .await
            .unwrap();
        assert_eq!(
            *log.lock().unwrap(),
            ["apply proxy", "apply vpn", "undo fw"]
        );

        // A new chain that fails part-way: the connection keeps its chain.
        let switch3 = Arc::new(Switch {
            to: Mutex::new("one"),
            one: vec![proxy.clone(), vpn.clone()],
            two: vec![fw.clone(), broken.clone(), proxy.clone()],
        });
        let chain = Next::chain(vec![
            Arc::new(Functions::new(switch3.clone())) as Arc<dyn Element<NseError>>
        ]);
        let conn = chain
            .request(&mut Ctx::internal(), refresh_of(conn))
            .await
            .unwrap();
        *switch3.to.lock().unwrap() = "two";
        log.lock().unwrap().clear();
        let e = chain
            .request(&mut Ctx::internal(), refresh_of(conn.clone()))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("broken failed"), "{e}");
        assert_eq!(
            *log.lock().unwrap(),
            ["apply fw", "apply broken", "undo broken", "undo fw"]
        );
        log.lock().unwrap().clear();
        chain.close(&mut Ctx::internal(), conn).await.unwrap();
        assert_eq!(
            *log.lock().unwrap(),
            ["undo vpn", "undo proxy"],
            "Close undoes the chain it kept"
        );
    }
}
