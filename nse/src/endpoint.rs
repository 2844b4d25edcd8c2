//! The assembled endpoint: NSM's endpoint chain in NSM's order, plus the
//! state the servers and tests look at.

use std::sync::Arc;
use std::time::Duration;

use nsm_api::authorize::Policies;
use nsm_api::chain::authorize::Authorize;
use nsm_api::chain::begin::Begin;
use nsm_api::chain::monitor::Monitor;
use nsm_api::chain::timeout::Timeout;
use nsm_api::chain::trimpath::TrimPath;
use nsm_api::chain::updatepath::UpdatePath;
use nsm_api::chain::updatetoken::UpdateToken;
use nsm_api::chain::{Ctx, Element, Next, Req};
use nsm_api::connection::{Connection, MonitorScopeSelector};
use nsm_api::monitor::MonitorHub;
use nsm_api::tls::Identity;
use nsm_api::token::{TokenError, TokenIssuer};
use tonic::Status;

use crate::chain::functions::{ChainSelector, Fixed, Functions, NetworkFunction};
use crate::chain::ipam::Ipam;
use crate::chain::mechanism::KernelMechanism;
use crate::chain::service::ServiceFilter;
use crate::config::Config;
use crate::error::NseError;
use crate::ipam::{P2pIpam, Policy};
use crate::netns::{NetnsError, OwnNetns};
use crate::validate;

#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error(transparent)]
    Token(#[from] TokenError),
}

/// What the endpoint needs from the configuration.
#[derive(Debug, Clone)]
pub struct EndpointOptions {
    /// Our path-segment name (`NSM_NAME`).
    pub name: String,
    /// The network services we provide (`NSM_SERVICE_NAMES`); Requests for others get NotFound.
    pub service_names: Vec<String>,
    pub cidr_groups: Vec<Vec<ipnet::IpNet>>,
    pub ipam_policy: Policy,
    pub max_token_lifetime: Duration,
    /// Our SVID: tokens are signed with its key (`None`: insecure, an ephemeral key).
    pub identity: Option<Arc<Identity>>,
    /// NSM's policies over each SPIFFE caller's path.
    pub policies: Policies,
}

impl From<&Config> for EndpointOptions {
    fn from(c: &Config) -> Self {
        EndpointOptions {
            name: c.name.clone(),
            service_names: c.service_names.clone(),
            cidr_groups: c.cidr_groups.clone(),
            ipam_policy: c.ipam_policy,
            max_token_lifetime: c.max_token_lifetime,
            identity: None,
            policies: c.server_policies,
        }
    }
}

/// Counters of what the endpoint holds, for diagnostics, tests and benchmarks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointStats {
    pub connections: usize,
    pub timers: usize,
    pub ipam_connections: usize,
    pub monitored: usize,
    pub monitor_subscribers: usize,
}

/// `MonitorConnections` refuses what [`validate::selector`] refuses, with our status.
fn check_selector(selector: &MonitorScopeSelector) -> Result<(), Status> {
    validate::selector(selector).map_err(|e| NseError::from(e).into())
}

pub struct Endpoint {
    head: Next<NseError>,
    begin: Arc<Begin>,
    timeout: Arc<Timeout>,
    ipam: Arc<P2pIpam>,
    monitor: MonitorHub,
    netns: Arc<OwnNetns>,
    metrics: Arc<nsm_api::metrics::CallMetrics>,
}

impl Endpoint {
    /// The endpoint without network functions.
    pub fn new(opts: &EndpointOptions) -> Result<Self, EndpointError> {
        Self::with_functions(opts, Vec::new())
    }

    /// The endpoint with `functions` applied to every connection, in order,
    /// after IPAM and the mechanism.
    pub fn with_functions(
        opts: &EndpointOptions,
        functions: Vec<Arc<dyn NetworkFunction>>,
    ) -> Result<Self, EndpointError> {
        Self::with_chains(opts, Arc::new(Fixed(functions)))
    }

    /// The endpoint with each connection's chain of functions chosen by
    /// `chains`.
    pub fn with_chains(
        opts: &EndpointOptions,
        chains: Arc<dyn ChainSelector>,
    ) -> Result<Self, EndpointError> {
        let netns = Arc::new(OwnNetns::open()?);
        let issuer = Arc::new(TokenIssuer::for_identity(
            opts.identity.as_ref(),
            &opts.name,
            opts.max_token_lifetime,
        )?);
        let begin = Arc::new(Begin::new());
        let timeout = Arc::new(Timeout::new());
        let ipam = Arc::new(P2pIpam::new(&opts.cidr_groups, opts.ipam_policy));
        let monitor = MonitorHub::new().with_selector_check(check_selector);
        let metrics = Arc::new(nsm_api::metrics::CallMetrics::new("nsm_endpoint"));
        let function_metrics = crate::metrics::FunctionMetrics::register(&metrics);
        let elements: Vec<Arc<dyn Element<NseError>>> = vec![
            Arc::new(ServiceFilter::new(opts.service_names.clone())),
            Arc::new(UpdatePath::new(opts.name.clone())),
            Arc::new(Authorize::new(opts.policies, opts.identity.clone())),
            begin.clone(),
            Arc::new(UpdateToken::new(issuer)),
            timeout.clone(),
            Arc::new(Monitor::new(monitor.clone())),
            Arc::new(TrimPath),
            Arc::new(KernelMechanism::new(netns.clone())),
            Arc::new(Ipam::new(ipam.clone())),
            Arc::new(Functions::new(chains).with_metrics(function_metrics)),
        ];
        Ok(Endpoint {
            head: Next::chain(elements),
            begin,
            timeout,
            ipam,
            monitor,
            netns,
            metrics,
        })
    }

    /// What the endpoint counts (served by [`nsm_api::metrics::serve`]).
    pub fn metrics(&self) -> &Arc<nsm_api::metrics::CallMetrics> {
        &self.metrics
    }

    /// Runs a Request through the chain. The chain runs in its own task, so
    /// a caller that goes away (or whose deadline passes) cannot cut it
    /// half-way: it completes or rolls back, as sdk's chain does.
    pub async fn request(&self, ctx: Ctx<NseError>, req: Req) -> Result<Connection, NseError> {
        let started = std::time::Instant::now();
        let head = self.head.clone();
        let res = tokio::spawn(async move {
            let mut ctx = ctx;
            head.request(&mut ctx, req).await
        })
        .await
        .map_err(|e| NseError::Internal(format!("request task failed: {e}")))
        .and_then(|r| r);
        self.observe("Request", res.as_ref().err(), started);
        res
    }

    fn observe(&self, method: &'static str, err: Option<&NseError>, started: std::time::Instant) {
        let code = err.map_or(tonic::Code::Ok, NseError::code);
        self.metrics
            .observe(method, code, started.elapsed(), self.begin.connections());
    }

    /// Runs a Close through the chain (in its own task, as [`Endpoint::request`]).
    pub async fn close(&self, ctx: Ctx<NseError>, conn: Connection) -> Result<(), NseError> {
        let started = std::time::Instant::now();
        let head = self.head.clone();
        let res = tokio::spawn(async move {
            let mut ctx = ctx;
            head.close(&mut ctx, conn).await
        })
        .await
        .map_err(|e| NseError::Internal(format!("close task failed: {e}")))
        .and_then(|r| r);
        self.observe("Close", res.as_ref().err(), started);
        res
    }

    pub fn monitor(&self) -> &MonitorHub {
        &self.monitor
    }

    /// `inode://dev/ino` of the netns we hand out.
    pub fn netns_url(&self) -> nsm_api::inode::InodeUrl {
        self.netns.url()
    }

    /// Gives connection `id` (adopted from a previous run) its addresses
    /// back in IPAM before any new connection can take them; a refresh of it
    /// then keeps them.
    pub fn reserve(
        &self,
        id: &str,
        src: Vec<String>,
        dst: Vec<String>,
    ) -> Result<(), crate::ipam::IpamError> {
        let mut ip = nsm_api::connectioncontext::IpContext {
            src_ip_addrs: src,
            dst_ip_addrs: dst,
            ..Default::default()
        };
        let pending = self.ipam.prepare(id, &mut ip)?;
        self.ipam.commit(pending);
        Ok(())
    }

    /// Forgets an adopted connection that will not come back (its
    /// interface is gone): its addresses return to IPAM.
    pub fn forget(&self, id: &str) {
        self.ipam.release(id);
    }

    pub fn stats(&self) -> EndpointStats {
        EndpointStats {
            connections: self.begin.connections(),
            timers: self.timeout.armed(),
            ipam_connections: self.ipam.connections(),
            monitored: self.monitor.connections().len(),
            monitor_subscribers: self.monitor.subscribers(),
        }
    }
}
