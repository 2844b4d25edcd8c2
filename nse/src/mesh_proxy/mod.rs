//! The mesh-proxy network function: puts a transparent proxy in the path of
//! a connection's traffic, in one of two placements (policy here, the
//! mechanism in `forwarder_plugin::rules` and the forwarder):
//!
//! * **proxy** (default): the proxy runs beside the NSE, in the NSE's netns.
//!   The client's side sends what the proxy serves — TCP the client starts,
//!   DNS when configured — to the endpoint ([`capture`]: by the forwarder's
//!   rules, or by NSM policy routes), never its replies or its other
//!   traffic; in its own netns the NSE sends everything arriving on the
//!   connection's interface to `proxy.port` (REDIRECT, or TPROXY), refuses
//!   what else arrives there for another host, and captures nothing
//!   outbound, so the proxy's upstream connections leave directly. One
//!   table ([`crate::own_table`]) for all connections, whose interface set holds
//!   their interfaces: a connection coming or going changes one set
//!   member, never the rules.
//! * **sidecar**: the client runs its own proxy; the NSE returns a redirect
//!   spec for the client's netns in `extra_context[`[`CLIENT_REDIRECT_KEY`]`]`,
//!   which the forwarder applies there (istio-cni's job, per connection).
//!
//! Client-side work in `extra_context` is asked only of a forwarder that
//! announces it does it (`forwarder-plugin serve`); otherwise the function
//! uses what NSM itself expresses, or refuses: never a connection whose
//! traffic would silently miss the proxy. A connection's labels may
//! override the placement and add exclusions ([`labels`]). Apply is
//! idempotent (a refresh verifies and repairs), undo removes the
//! connection's interface from the set; the table stays while the NSE runs
//! (empty, it captures nothing) and is removed at start-up and at exit when
//! no connection is left.

pub mod capability;
pub mod capture;
pub mod config;
pub mod labels;
pub mod process;
pub mod shared;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;
use forwarder_plugin::rules::Plan;
use nsm_api::connection::Connection;
use nsm_api::connectioncontext::IpContext;
use nsm_api::contract::{RedirectSpec, SpecError};
use nsm_api::mechanism::MechanismExt;

pub use nsm_api::contract::{CLIENT_CAPTURE_KEY, CLIENT_PROXY_KEY, CLIENT_REDIRECT_KEY};
use nsm_api::contract::{
    FEATURE_CLIENT_CAPTURE, FEATURE_CLIENT_PROXY, FEATURE_CLIENT_REDIRECT, FORWARDER_FEATURES_KEY,
    FORWARDER_PROXIES_KEY, announced_proxies, has_feature,
};

use crate::chain::functions::{Claim, FunctionError, NetworkFunction};
use crate::own_table::state::StateFile;
use crate::own_table::{Live, OwnTable};
use config::{FunctionConfig, Method, Placement};
use labels::Overrides;

/// The function's name in logs and errors.
pub const NAME: &str = "mesh-proxy";

pub struct MeshProxy {
    config: FunctionConfig,
    own: Arc<OwnTable>,
    /// `CAP_NET_ADMIN`: placement proxy can install its rules.
    net_admin: bool,
    /// The shared proxy we run (`proxy.process`).
    proxy: Option<Arc<shared::SharedProxy>>,
}

fn rejected(reason: impl Into<String>) -> FunctionError {
    FunctionError::Rejected {
        function: NAME.into(),
        reason: reason.into(),
    }
}

fn failed(reason: impl Into<String>) -> FunctionError {
    FunctionError::Failed {
        function: NAME.into(),
        reason: reason.into(),
    }
}

/// The table of placement proxy: `config`'s redirect rules for the
/// connections' interfaces, to the ports of the shared proxy's slot `alt`
/// (the configured ones unless an upgrade moved it).
fn own_table(
    config: &FunctionConfig,
    alt: Arc<AtomicBool>,
) -> Result<OwnTable, forwarder_plugin::netns::NetnsError> {
    let a = config.clone();
    let mut b = config.clone();
    // Checked at load when a process may move there.
    if let Some(p) = shared::slot_ports(&config.proxy, true) {
        b.proxy = p;
    }
    OwnTable::new(
        config.rules.backend.kind(),
        config.rules.owner.clone(),
        Box::new(move |members, ipv6| {
            let c = if alt.load(Ordering::SeqCst) { &b } else { &a };
            c.own_plan(members, ipv6)
        }),
    )
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Netns(#[from] forwarder_plugin::netns::NetnsError),
    #[error(transparent)]
    State(#[from] crate::own_table::state::StateError),
    #[error("proxy.process: {0}")]
    Process(String),
}

impl MeshProxy {
    /// The function for `config`. Its table in the NSE's netns is adopted
    /// from the state file under `state_dir` (the connections a previous run
    /// recorded whose interfaces still exist keep their capture, so a
    /// restart never lets their traffic past the proxy), or removed when
    /// nothing is recorded. Without `CAP_NET_ADMIN` only placement sidecar
    /// works (and there is nothing to adopt).
    pub fn start(
        config: FunctionConfig,
        state_dir: Option<&Path>,
    ) -> Result<MeshProxy, StartError> {
        tracing::info!(
            placement = %config.placement,
            proxy_port = %config.proxy.port,
            proxy_mode = ?config.proxy.mode,
            capture_method = %config.capture.method,
            capture_cidrs = ?config.capture.cidrs,
            capture_excluded = config.capture.exclude_cidrs.len(),
            capture_dns = config.capture.dns,
            backend = %config.rules.backend,
            table = %config.rules.owner,
            "mesh-proxy function"
        );
        // Checked when the configuration was loaded; again for one built in
        // code. Started first: its recorded slot decides the rules' port.
        let alt = Arc::new(AtomicBool::new(false));
        let proxy = match &config.proxy.process {
            Some(p) => Some(Arc::new(
                shared::SharedProxy::start(
                    p.clone(),
                    config.proxy.clone(),
                    state_dir,
                    config.rules.owner.nft_table(),
                    alt.clone(),
                )
                .map_err(StartError::Process)?,
            )),
            None => None,
        };
        let mut own = own_table(&config, alt)?;
        let net_admin = capability::effective(capability::CAP_NET_ADMIN);
        if let Some(dir) = state_dir.filter(|_| net_admin) {
            let table = own.table();
            own = own.with_state(StateFile::open(dir, &table)?);
        }
        let own = Arc::new(own);
        if net_admin {
            match own.adopt() {
                Ok(0) => {}
                Ok(n) => {
                    tracing::info!(table = %own.table(), connections = n, "adopted the connections a previous run left in the table");
                }
                Err(e) => {
                    tracing::warn!(table = %own.table(), error = %e, "cannot adopt or remove the redirect rules of a previous run");
                }
            }
        } else {
            tracing::warn!(
                "no CAP_NET_ADMIN: placement proxy is unavailable (its Requests fail with FailedPrecondition); placement sidecar works"
            );
        }
        if let Some(p) = &proxy {
            let (p, own) = (p.clone(), own.clone());
            tokio::spawn(async move { p.upgrade_if_stale(&own).await });
        }
        Ok(MeshProxy {
            config,
            own,
            net_admin,
            proxy,
        })
    }

    /// A reloaded configuration's `proxy.process`: a changed definition is
    /// upgraded to without dropping traffic ([`shared::SharedProxy::upgrade`]);
    /// adding or removing the process takes a restart (logged).
    pub async fn reload_process(&self, def: Option<process::ProcessConfig>) {
        match (&self.proxy, def) {
            (Some(p), Some(def)) => {
                p.upgrade(def, &self.own).await;
            }
            (None, None) => {}
            _ => tracing::warn!(
                "proxy.process added or removed: that takes effect when the endpoint restarts"
            ),
        }
    }

    /// The interfaces whose traffic the NSE's netns hands to the proxy now.
    pub fn captured_interfaces(&self) -> Vec<String> {
        self.own.interfaces()
    }

    async fn update(&self, id: &str, entry: Option<Live>) -> Result<(), FunctionError> {
        self.own.set(id, entry).await.map_err(failed)
    }

    /// The client's spec: the configured one plus the connection's exclusions.
    fn sidecar_spec(&self, o: &Overrides) -> Result<RedirectSpec, FunctionError> {
        let mut s = self.config.sidecar.clone();
        s.exclude_outbound_cidrs
            .extend(o.exclude_outbound_cidrs.iter().copied());
        s.exclude_outbound_ports
            .extend(o.exclude_outbound_ports.iter().copied());
        s.exclude_inbound_ports
            .extend(o.exclude_inbound_ports.iter().copied());
        Plan::new(&s).map_err(|e| {
            // The configured spec is valid, so a label made it invalid.
            let label = match &e {
                SpecError::Ipv6Disabled { .. } => labels::EXCLUDE_OUTBOUND_CIDRS,
                _ => "proxy-*",
            };
            rejected(format!(
                "label {label:?}: the client's redirect spec would be invalid: {e}"
            ))
        })?;
        Ok(s)
    }
}

fn ip_context(conn: &mut Connection) -> Result<&mut IpContext, FunctionError> {
    conn.context
        .as_mut()
        .and_then(|c| c.ip_context.as_mut())
        .ok_or_else(|| failed("connection.context.ip_context is missing after IPAM"))
}

/// The keys of the contract this function writes (each placement and
/// method writes its own, and removes the others).
fn set_extra(conn: &mut Connection, keys: impl IntoIterator<Item = (&'static str, String)>) {
    let extra = &mut conn.context.get_or_insert_default().extra_context;
    extra.remove(CLIENT_REDIRECT_KEY);
    extra.remove(CLIENT_CAPTURE_KEY);
    extra.remove(CLIENT_PROXY_KEY);
    // What the forwarder announced is for us, not to be echoed back.
    extra.remove(FORWARDER_FEATURES_KEY);
    extra.remove(FORWARDER_PROXIES_KEY);
    for (k, v) in keys {
        extra.insert(k.to_owned(), v);
    }
}

impl MeshProxy {
    /// Placement sidecar with `sidecarProxy`: the name, if this
    /// connection's forwarder announces it can start that proxy in the
    /// client (else the client's traffic would be sent to a port where
    /// nothing listens: refused, with what is missing).
    fn injected_proxy(&self, conn: &Connection) -> Result<Option<String>, FunctionError> {
        let Some(name) = &self.config.sidecar_proxy else {
            return Ok(None);
        };
        let offered = announced_proxies(conn);
        if offered.contains(&name.as_str()) {
            return Ok(Some(name.clone()));
        }
        let why = if has_feature(conn, FEATURE_CLIENT_PROXY) {
            format!("it offers only {}", offered.join(", "))
        } else {
            format!(
                "it does not announce {FEATURE_CLIENT_PROXY} ({FORWARDER_FEATURES_KEY}): \
                 run forwarder-plugin serve with --proxies naming {name:?}"
            )
        };
        Err(FunctionError::Precondition {
            function: NAME.into(),
            reason: format!(
                "sidecarProxy {name:?} is to be started in the client's namespace by its \
                 forwarder, but {why}"
            ),
        })
    }

    /// The capture method for `conn`: `auto` follows what its forwarder
    /// announces; `rules` behind a forwarder that does not apply them would
    /// leave the client's traffic beside the proxy, so it is refused.
    fn method(&self, conn: &Connection) -> Result<Method, FunctionError> {
        let ours = has_feature(conn, FEATURE_CLIENT_CAPTURE);
        match self.config.capture.method {
            Method::Auto if ours => Ok(Method::Rules),
            Method::Auto => Ok(Method::Policies),
            Method::Rules if !ours => Err(FunctionError::Precondition {
                function: NAME.into(),
                reason: format!(
                    "capture.method rules needs a forwarder that applies {CLIENT_CAPTURE_KEY} \
                     (forwarder-plugin serve); this connection's forwarder does not announce it \
                     ({FORWARDER_FEATURES_KEY}): use method auto or policies"
                ),
            }),
            m => Ok(m),
        }
    }
}

/// What a mesh-proxy configured so owns: its table, the contract keys it
/// writes for the hop, and NSM's policy routes (method policies).
pub fn claims(config: &FunctionConfig) -> Vec<Claim> {
    vec![
        Claim::Table(config.rules.owner.as_str().to_owned()),
        Claim::ContextKey(CLIENT_REDIRECT_KEY.to_owned()),
        Claim::ContextKey(CLIENT_CAPTURE_KEY.to_owned()),
        Claim::ContextKey(CLIENT_PROXY_KEY.to_owned()),
        Claim::IpPolicies,
    ]
}

#[async_trait]
impl NetworkFunction for MeshProxy {
    fn name(&self) -> &str {
        NAME
    }

    fn claims(&self) -> Vec<Claim> {
        claims(&self.config)
    }

    /// The connections adopted at start, whose addresses IPAM must keep.
    fn adopted(&self) -> Vec<(String, Vec<String>, Vec<String>)> {
        self.own.adopted()
    }

    /// Drops adopted connections whose interface is gone
    /// ([`OwnTable::prune_adopted`]) and repairs the table if it drifted
    /// ([`OwnTable::reconcile`]: fail closed).
    async fn maintain(&self) -> Vec<String> {
        if !self.net_admin {
            return Vec::new();
        }
        self.own.upkeep().await
    }

    /// At exit: removes the table if no connection is left
    /// ([`OwnTable::release`]).
    fn release(&self) {
        if self.net_admin
            && let Err(e) = self.own.release()
        {
            tracing::warn!(table = %self.own.table(), error = %e, "cannot remove the redirect rules at exit");
        }
        // Connections left: their rules stay, and so does the proxy they
        // lead to (the next start adopts both).
        if let Some(p) = &self.proxy {
            let left = if self.net_admin {
                self.own.interfaces().len()
            } else {
                0
            };
            p.release(left);
        }
    }

    async fn apply(&self, conn: &mut Connection) -> Result<(), FunctionError> {
        let o = Overrides::from_labels(&conn.labels).map_err(|e| rejected(e.to_string()))?;
        let placement = o.placement.unwrap_or(self.config.placement);
        match placement {
            Placement::Proxy => {
                if let Some(label) = o.sidecar_only().first() {
                    return Err(rejected(format!(
                        "label {label:?} applies to placement sidecar only: in placement proxy \
                         exclude destinations with {} or the config's capture.excludeCidrs",
                        labels::EXCLUDE_OUTBOUND_CIDRS
                    )));
                }
                if !self.net_admin {
                    return Err(FunctionError::Precondition {
                        function: NAME.into(),
                        reason: "placement proxy needs CAP_NET_ADMIN in the endpoint's network \
                                 namespace to install its redirect rules: grant it to \
                                 mesh-proxy-nse, or use placement sidecar (config \
                                 `placement: sidecar` or label proxy-placement=sidecar)"
                            .into(),
                    });
                }
                if let Some(p) = &self.proxy {
                    // Nothing is applied for a proxy that cannot serve.
                    p.ready().await.map_err(|e| FunctionError::NotReady {
                        function: NAME.into(),
                        reason: e.to_string(),
                    })?;
                }
                let method = self.method(conn)?;
                let interface = conn
                    .mechanism
                    .as_ref()
                    .and_then(|m| m.interface_name())
                    .ok_or_else(|| failed("the KERNEL mechanism has no interface name"))?
                    .to_owned();
                let ip = ip_context(conn)?;
                let entry = Live {
                    interface,
                    ipv6: capture::has_ipv6(ip),
                    src: ip.src_ip_addrs.clone(),
                    dst: ip.dst_ip_addrs.clone(),
                };
                let exclude = &o.exclude_outbound_cidrs;
                if exclude.len() > nsm_api::contract::capture::MAX_EXCLUDE_CIDRS {
                    return Err(rejected(format!(
                        "label {:?}: {} CIDRs, at most {}",
                        labels::EXCLUDE_OUTBOUND_CIDRS,
                        exclude.len(),
                        nsm_api::contract::capture::MAX_EXCLUDE_CIDRS
                    )));
                }
                // Everything that can be refused is decided before the rules change.
                let (policies, extra) = match method {
                    Method::Policies => (
                        capture::policies(ip, &self.config.capture, exclude).map_err(rejected)?,
                        None,
                    ),
                    _ => {
                        let spec = capture::spec(&self.config.capture, exclude);
                        spec.validate().map_err(|e| rejected(e.to_string()))?;
                        (Vec::new(), Some((CLIENT_CAPTURE_KEY, spec.to_json())))
                    }
                };
                self.update(&conn.id, Some(entry)).await?;
                ip_context(conn)?.policies = policies;
                set_extra(conn, extra);
                tracing::debug!(id = %conn.id, %placement, %method, "mesh-proxy applied");
            }
            Placement::Sidecar => {
                if !has_feature(conn, FEATURE_CLIENT_REDIRECT) {
                    return Err(FunctionError::Precondition {
                        function: NAME.into(),
                        reason: format!(
                            "placement sidecar needs a forwarder that applies \
                             {CLIENT_REDIRECT_KEY} in the client's namespace (forwarder-plugin \
                             serve); this connection's forwarder does not announce it \
                             ({FORWARDER_FEATURES_KEY}), so the client's traffic would miss \
                             its proxy: use placement proxy"
                        ),
                    });
                }
                let spec = self.sidecar_spec(&o)?;
                let proxy = self.injected_proxy(conn)?;
                // Checked before the rules change, so nothing fails after it.
                ip_context(conn)?;
                // A connection that was in placement proxy until this refresh.
                self.update(&conn.id, None).await?;
                ip_context(conn)?.policies.clear();
                set_extra(
                    conn,
                    [(CLIENT_REDIRECT_KEY, spec.to_json())]
                        .into_iter()
                        .chain(proxy.map(|p| (CLIENT_PROXY_KEY, p))),
                );
                tracing::debug!(id = %conn.id, %placement, "mesh-proxy applied");
            }
        }
        Ok(())
    }

    async fn undo(&self, conn: &Connection) -> Result<(), FunctionError> {
        self.update(&conn.id, None).await
    }
}

#[cfg(test)]
mod tests;
