//! Redirect rules: a [`RedirectSpec`] (istio's options) becomes a backend
//! neutral [`Plan`], which a [`Backend`] applies to, verifies against, or
//! removes from a network namespace.
//!
//! Backends (netavark's firewall-driver shape): `nft` (default; nftables
//! over netlink, one owned table), `iptables` (one `iptables-restore
//! --noflush` per family into owned chains, legacy/nft variant detected) and
//! `render` (prints what would be applied). Every apply is atomic and
//! idempotent, `verify` reports drift, [`reconcile`] re-applies on drift and
//! `cleanup` leaves nothing of ours. A plan whose capture is restricted to
//! an interface set (`includeInterfaces`, [`Plan::for_interfaces`]) changes
//! members with [`Backend::update_interfaces`], which rewrites no rule: an
//! nft set element, or one iptables rule per interface.
//!
//! ```no_run
//! use forwarder_plugin::netns::Netns;
//! use forwarder_plugin::rules::{self, BackendKind, BackendOptions, Plan, RedirectSpec};
//! let spec = RedirectSpec::parse(r#"{"captureDns": true}"#).unwrap();
//! let plan = Plan::new(&spec).unwrap();
//! let backend = rules::get_backend(BackendKind::Nft, BackendOptions::default());
//! let ns = Netns::open("pod1").unwrap();
//! backend.apply(&ns, &plan).unwrap();
//! assert!(backend.verify(&ns, &plan).unwrap().is_empty());
//! backend.cleanup(&ns).unwrap();
//! ```

pub mod capture;
pub mod drift;
pub mod error;
mod exec;
pub mod iptables;
pub mod names;
pub mod nft;
pub mod plan;
mod policy_route;
pub mod render;
/// The redirect spec, part of the endpoint↔hop contract in nsm-api.
pub use nsm_api::contract::redirect as spec;

use std::io::Write;
use std::sync::Mutex;

use crate::netns::Netns;

pub use drift::{Drift, DriftItem};
pub use error::RulesError;
pub use iptables::Variant;
pub use names::Owner;
pub use nsm_api::contract::capture::{CaptureError, CaptureSpec, PortRange};
pub use plan::Plan;
pub use policy_route::RT_PROTO;
pub use spec::{RedirectSpec, SPEC_VERSION, SpecError};

use error::Result;

/// What an apply did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The kernel now holds the plan (nft always replaces its table).
    Applied,
    /// The kernel already matched the plan; nothing was written.
    Unchanged,
    /// Nothing touched the kernel (the render backend).
    Rendered,
}

/// A firewall backend. Implementations validate no spec themselves (a
/// [`Plan`] is built from a valid one, or by hand); `apply` and
/// `update_interfaces` refuse a plan failing [`Plan::check`] before
/// writing anything.
pub trait Backend: Send + Sync {
    fn name(&self) -> &'static str;
    /// Makes the namespace hold exactly `plan` (of ours), all or nothing.
    fn apply(&self, ns: &Netns, plan: &Plan) -> Result<Outcome>;
    /// Differences between the namespace and `plan`.
    fn verify(&self, ns: &Netns, plan: &Plan) -> Result<Drift>;
    /// Removes everything of ours: tables, chains, rules, ip rules, routes.
    fn cleanup(&self, ns: &Netns) -> Result<()>;
    /// Adds `add` to and removes `remove` from the interface set of `plan`
    /// ([`Plan::interfaces`]) in one all-or-nothing step that rewrites no
    /// rule and no chain: how an endpoint follows its connections' links
    /// coming and going. The namespace must hold `plan`'s rules already
    /// (apply it first; `plan`'s own members are ignored). Adding a member
    /// that is there, or removing one that is not, changes nothing. Refused
    /// before anything is written: a plan without an interface set or
    /// failing [`Plan::check`], an invalid name, a name in both lists, and
    /// `lo` (whose membership shapes the rules: apply a plan with or
    /// without it instead).
    fn update_interfaces(
        &self,
        ns: &Netns,
        plan: &Plan,
        add: &[String],
        remove: &[String],
    ) -> Result<()>;
    /// Verifies, and re-applies when the namespace drifted from `plan`.
    /// Returns the drift that was found (empty: nothing was done).
    fn reconcile(&self, ns: &Netns, plan: &Plan) -> Result<Drift> {
        reconcile_default(self, ns, plan)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendKind {
    Nft,
    Iptables,
    /// Prints the nft script (`Render(Nft)`) or iptables-restore documents.
    Render(RenderFormat),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RenderFormat {
    Nft,
    Iptables,
}

/// Test hooks: make the kernel refuse the last part of an apply.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    RejectLastRule,
}

#[derive(Debug, Clone, Default)]
pub struct BackendOptions {
    /// Names our table/chains/tags (default `mesh_proxy`).
    pub owner: Owner,
    /// iptables only: force `legacy` or `nft` instead of detecting.
    pub iptables_variant: Option<Variant>,
    /// nft only: keep the namespace's netlink socket open between calls
    /// instead of opening one (on a thread of its own in the namespace) per
    /// call. Closing a netfilter socket after a transaction that deleted
    /// anything waits for the kernel to free what it deleted (an RCU grace
    /// period, ~10 ms), so this is what makes removing an interface-set
    /// member cheap. For a process managing one long-lived namespace (its
    /// own): the open socket keeps the namespace alive.
    pub keep_socket: bool,
    #[doc(hidden)]
    pub fault: Option<Fault>,
}

/// The backend called `kind`.
pub fn get_backend(kind: BackendKind, opts: BackendOptions) -> Box<dyn Backend> {
    match kind {
        BackendKind::Nft => Box::new(nft::NftBackend::new(&opts)),
        BackendKind::Iptables => Box::new(iptables::IptablesBackend::new(&opts)),
        BackendKind::Render(format) => Box::new(RenderBackend::new(
            format,
            opts.owner,
            Box::new(std::io::stdout()),
        )),
    }
}

/// Verifies, and re-applies when the kernel drifted from `plan`. Returns the
/// drift that was found (empty: nothing was done).
pub fn reconcile(backend: &dyn Backend, ns: &Netns, plan: &Plan) -> Result<Drift> {
    backend.reconcile(ns, plan)
}

/// [`Backend::reconcile`]'s default: verify, then apply on drift and fix
/// policy routes (apply only lists those when TPROXY needs them).
pub fn reconcile_default<B: Backend + ?Sized>(
    backend: &B,
    ns: &Netns,
    plan: &Plan,
) -> Result<Drift> {
    let drift = backend.verify(ns, plan)?;
    if !drift.is_empty() {
        backend.apply(ns, plan)?;
        if drift.items.iter().any(|i| {
            matches!(
                i,
                DriftItem::ExtraPolicyRoute { .. } | DriftItem::MissingPolicyRoute { .. }
            )
        }) {
            policy_route::prune(ns, &plan.policy_routes)?;
        }
    }
    Ok(drift)
}

/// What [`Backend::update_interfaces`] refuses before touching anything.
pub(crate) fn check_membership(plan: &Plan, add: &[String], remove: &[String]) -> Result<()> {
    plan.check()?;
    let refuse = |why: String| Err(RulesError::Membership(why));
    if plan.interfaces.is_none() {
        return refuse(
            "the plan captures on every interface: it has no interface set (build it with \
             Plan::for_interfaces or a non-empty includeInterfaces)"
                .into(),
        );
    }
    for name in add.iter().chain(remove) {
        spec::validate_interface(name).map_err(RulesError::Membership)?;
        if name == "lo" {
            return refuse(
                "\"lo\" decides whether the proxy's hairpin rules exist: apply a plan with or \
                 without it instead"
                    .into(),
            );
        }
        if add.contains(name) && remove.contains(name) {
            return refuse(format!("{name:?} is both added and removed"));
        }
    }
    Ok(())
}

/// Wraps an apply error with the outcome of the rollback (a cleanup).
pub(crate) fn rolled_back(ns: &Netns, cause: RulesError, rollback: Result<()>) -> RulesError {
    match rollback {
        Ok(()) => RulesError::RolledBack {
            netns: ns.id(),
            cause: Box::new(cause),
        },
        Err(e) => RulesError::RollbackFailed {
            cause: Box::new(cause),
            rollback: Box::new(e),
        },
    }
}

/// Prints what would be applied instead of applying it.
pub struct RenderBackend {
    format: RenderFormat,
    owner: Owner,
    out: Mutex<Box<dyn Write + Send>>,
}

impl RenderBackend {
    pub fn new(format: RenderFormat, owner: Owner, out: Box<dyn Write + Send>) -> Self {
        RenderBackend {
            format,
            owner,
            out: Mutex::new(out),
        }
    }

    /// The text `apply` prints for `plan`.
    pub fn text(&self, plan: &Plan) -> String {
        let mut s = match self.format {
            RenderFormat::Nft => render::nft_script(plan, &self.owner),
            RenderFormat::Iptables => {
                let mut s = String::new();
                for (family, tool) in [
                    (plan::Family::V4, "iptables"),
                    (plan::Family::V6, "ip6tables"),
                ] {
                    let doc = render::iptables_restore(plan, &self.owner, family);
                    if !doc.is_empty() {
                        s.push_str(&format!("# {tool}-restore --noflush\n{}", doc.text()));
                    }
                }
                s
            }
        };
        for r in &plan.policy_routes {
            let f = match r.family {
                plan::Family::V4 => "-4",
                plan::Family::V6 => "-6",
            };
            s.push_str(&format!(
                "# ip {f} route replace local default dev lo table {t} proto {p}\n\
                 # ip {f} rule add fwmark {m} lookup {t} proto {p}\n",
                t = r.table,
                m = r.mark,
                p = RT_PROTO
            ));
        }
        s
    }

    fn write(&self, text: &str) -> Result<()> {
        let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
        out.write_all(text.as_bytes())
            .and_then(|()| out.flush())
            .map_err(RulesError::Output)
    }
}

impl Backend for RenderBackend {
    fn name(&self) -> &'static str {
        "render"
    }

    fn apply(&self, _ns: &Netns, plan: &Plan) -> Result<Outcome> {
        plan.check()?;
        self.write(&self.text(plan))?;
        Ok(Outcome::Rendered)
    }

    fn verify(&self, _ns: &Netns, _plan: &Plan) -> Result<Drift> {
        Err(RulesError::Unsupported {
            backend: "render",
            op: "verify (it has no kernel state to compare)",
        })
    }

    fn update_interfaces(
        &self,
        _ns: &Netns,
        plan: &Plan,
        add: &[String],
        remove: &[String],
    ) -> Result<()> {
        check_membership(plan, add, remove)?;
        let text = match self.format {
            RenderFormat::Nft => render::nft_membership_script(&self.owner, add, remove),
            RenderFormat::Iptables => {
                let mut s = String::new();
                for (family, tool) in [
                    (plan::Family::V4, "iptables"),
                    (plan::Family::V6, "ip6tables"),
                ] {
                    let doc = render::iptables_membership(plan, &self.owner, family, add, remove);
                    if !doc.is_empty() {
                        s.push_str(&format!(
                            "# {tool}-restore --noflush (appends only missing rules, deletes \
                             only present ones)\n{}",
                            doc.text()
                        ));
                    }
                }
                s
            }
        };
        self.write(&text)
    }

    fn cleanup(&self, _ns: &Netns) -> Result<()> {
        let text = match self.format {
            RenderFormat::Nft => render::nft_cleanup_script(&self.owner),
            RenderFormat::Iptables => format!(
                "# iptables cleanup works from iptables-save of the namespace (legacy and nft,\n\
                 # IPv4 and IPv6): it deletes every rule commented \"{o}:…\" or jumping to a\n\
                 # {p}_* chain, then flushes and deletes those chains.\n",
                o = self.owner,
                p = self.owner.iptables_prefix()
            ),
        };
        self.write(&format!(
            "{text}# ip rules and routes with proto {RT_PROTO} are deleted\n"
        ))
    }
}
