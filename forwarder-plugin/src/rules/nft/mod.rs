//! The default backend: nftables over netlink, in process. We own one table,
//! `inet <owner>`.
//!
//! Apply is check-then-apply on one socket, on one thread inside the
//! namespace: no table → one transaction creating it; a table matching the
//! plan → nothing written; a table that drifted → one transaction flushing
//! its chains, deleting the ones the plan no longer has and adding the rest.
//! The kernel applies a transaction entirely or not at all, so a refused
//! apply leaves the previous rules. (Deleting rules costs the kernel an RCU
//! grace period, ~10 ms: hence no rewrite when nothing changed, and no
//! "delete table + add table" replace.) If the policy routing TPROXY needs
//! cannot be set up afterwards, everything of ours is removed again.
//! Cleanup deletes the table.

mod expr;
mod ffi;
mod netlink;

use std::collections::HashMap;
use std::ffi::CString;

use nftnl::{Batch, Chain, ChainType, Hook as NfHook, MsgType, Policy, ProtoFamily, Table};

use crate::netns::{Netns, NetnsId};

use super::drift::{Drift, DriftItem, Have, Want, WantChain, compare_chain};
use super::error::{Result, RulesError};
use super::names::{Owner, nft_base, nft_chain};
use super::plan::{ChainId, Family, Hook, Plan};
use super::render::{nft_rule_body, rule_key};
use super::{Backend, BackendOptions, Fault, Outcome, policy_route};

use netlink::{KernelChain, KernelRule};

/// `(type, hooknum, priority)` of a base chain.
type BaseHook = (String, u32, i32);

pub struct NftBackend {
    owner: Owner,
    fault: Option<Fault>,
}

/// Our table as the kernel has it (`None`: no table).
type Current = Option<(Vec<KernelChain>, Vec<KernelRule>)>;

impl NftBackend {
    pub fn new(opts: &BackendOptions) -> Self {
        NftBackend {
            owner: opts.owner.clone(),
            fault: opts.fault,
        }
    }

    fn table_label(&self) -> String {
        format!("inet {}", self.owner.nft_table())
    }

    fn chain_label(&self, name: &str) -> String {
        format!("inet {} {name}", self.owner.nft_table())
    }

    fn read(&self, sock: &mnl::Socket, netns: NetnsId) -> Result<Current> {
        let table = self.owner.nft_table();
        let err = |source| RulesError::Netlink {
            op: format!("dump of table {}", self.table_label()),
            netns,
            source,
        };
        if !netlink::table_exists(sock, table).map_err(err)? {
            return Ok(None);
        }
        let chains = netlink::dump_chains(sock, table).map_err(err)?;
        let rules = netlink::dump_rules(sock, table).map_err(err)?;
        Ok(Some((chains, rules)))
    }

    /// The chains the plan wants, with their rules' tags and texts.
    fn want_chains(&self, plan: &Plan) -> Vec<(WantChain, Option<BaseHook>)> {
        plan.chains()
            .into_iter()
            .map(|id| {
                let rules = plan
                    .rules
                    .iter()
                    .filter(|r| r.chain == id)
                    .map(|r| Want {
                        tag: self.owner.tag(&rule_key(r)),
                        text: nft_rule_body(r),
                    })
                    .collect();
                let base = nft_base(id).map(|(ty, hook, prio)| {
                    let num = match hook {
                        Hook::Prerouting => libc::NF_INET_PRE_ROUTING as u32,
                        Hook::Output => libc::NF_INET_LOCAL_OUT as u32,
                    };
                    (ty.to_owned(), num, prio)
                });
                (
                    WantChain {
                        label: self.chain_label(&nft_chain(id)),
                        owned: true,
                        rules,
                    },
                    base,
                )
            })
            .collect()
    }

    /// Differences between our table and the plan's rules.
    fn table_drift(&self, current: &Current, plan: &Plan) -> Vec<DriftItem> {
        let wanted = self.want_chains(plan);
        let mut items = Vec::new();
        let Some((chains, rules)) = current else {
            if !wanted.is_empty() {
                items.push(DriftItem::MissingTable {
                    table: self.table_label(),
                });
            }
            return items;
        };
        for (want, base) in &wanted {
            let have_chain = chains
                .iter()
                .find(|c| self.chain_label(&c.name) == want.label);
            if let Some(c) = have_chain
                && &c.base != base
            {
                items.push(DriftItem::WrongHook {
                    chain: want.label.clone(),
                    expected: describe_hook(base),
                    found: describe_hook(&c.base),
                });
            }
            let have: Option<Vec<Have>> = have_chain.map(|c| {
                rules
                    .iter()
                    .filter(|r| r.chain == c.name)
                    .map(|r| Have {
                        tag: r.comment.clone().filter(|t| self.owner.owns_tag(t)),
                        text: format!(
                            "handle {} [{}]{}",
                            r.handle,
                            r.exprs.join(" "),
                            r.comment
                                .as_deref()
                                .map(|c| format!(" comment {c:?}"))
                                .unwrap_or_default()
                        ),
                    })
                    .collect()
            });
            compare_chain(want, have.as_deref(), &mut items);
        }
        for c in chains {
            if !wanted
                .iter()
                .any(|(w, _)| w.label == self.chain_label(&c.name))
            {
                items.push(DriftItem::ExtraChain {
                    chain: self.chain_label(&c.name),
                });
            }
        }
        items
    }

    /// Makes our table hold exactly `plan` (see the module comment).
    fn write_plan(&self, ns: &Netns, plan: &Plan) -> Result<Outcome> {
        let netns = ns.id();
        ns.run(|| {
            let sock = netlink::open().map_err(|source| RulesError::Netlink {
                op: "socket".into(),
                netns,
                source,
            })?;
            let current = self.read(&sock, netns)?;
            if self.fault.is_none()
                && current.is_some()
                && self.table_drift(&current, plan).is_empty()
            {
                return Ok(Outcome::Unchanged);
            }
            let old = current.map(|(chains, _)| chains).unwrap_or_default();
            self.send_plan(&sock, netns, plan, &old)?;
            Ok(Outcome::Applied)
        })?
    }

    /// Builds and sends the transaction. `old`: the chains our table has now
    /// (empty when there is no table).
    fn send_plan(
        &self,
        sock: &mnl::Socket,
        netns: NetnsId,
        plan: &Plan,
        old: &[KernelChain],
    ) -> Result<()> {
        let want = self.want_chains(plan);
        let name = cstring(self.owner.nft_table());
        let table = Table::new(&name, ProtoFamily::Inet);
        let mut batch = Batch::new();
        // What each batch message is, to name the one the kernel refuses.
        let mut what: Vec<String> = Vec::new();
        batch.add(&table, MsgType::Add);
        what.push(format!("table {}", self.table_label()));

        // Flush every existing chain first (jumps into chains about to be
        // deleted go with it), then delete what the plan does not keep.
        let old_names: Vec<CString> = old.iter().map(|c| cstring(&c.name)).collect();
        let old_chains: Vec<Chain<'_>> = old_names.iter().map(|n| Chain::new(n, &table)).collect();
        for (c, k) in old_chains.iter().zip(old) {
            // A rule message without a handle deletes every rule of its chain.
            batch.add(&nftnl::Rule::new(c), MsgType::Del);
            what.push(format!("flush of chain {}", self.chain_label(&k.name)));
        }
        let kept = |label: &str, base: &Option<BaseHook>| {
            old.iter()
                .any(|k| self.chain_label(&k.name) == label && &k.base == base)
        };
        for (c, k) in old_chains.iter().zip(old) {
            let label = self.chain_label(&k.name);
            if !want
                .iter()
                .any(|(w, base)| w.label == label && kept(&label, base))
            {
                batch.add(c, MsgType::Del);
                what.push(format!("deletion of chain {label}"));
            }
        }

        let ids = plan.chains();
        let names: Vec<CString> = ids.iter().map(|id| cstring(&nft_chain(*id))).collect();
        let mut chains: Vec<Chain<'_>> = Vec::with_capacity(ids.len());
        for (id, n) in ids.iter().zip(&names) {
            let mut c = Chain::new(n, &table);
            if let Some((ty, hook, prio)) = nft_base(*id) {
                c.set_type(match ty {
                    "nat" => ChainType::Nat,
                    "route" => ChainType::Route,
                    _ => ChainType::Filter,
                });
                c.set_hook(
                    match hook {
                        Hook::Prerouting => NfHook::PreRouting,
                        Hook::Output => NfHook::Out,
                    },
                    prio,
                );
                c.set_policy(Policy::Accept);
            }
            chains.push(c);
        }
        for ((c, id), (w, base)) in chains.iter().zip(&ids).zip(&want) {
            // Re-adding an existing chain is an (expensive) update: skip it.
            if !kept(&w.label, base) {
                batch.add(c, MsgType::Add);
                what.push(format!("chain {}", self.chain_label(&nft_chain(*id))));
            }
        }
        let index: HashMap<ChainId, usize> =
            ids.iter().enumerate().map(|(i, id)| (*id, i)).collect();
        for r in &plan.rules {
            let chain = &chains[index[&r.chain]];
            let mut rule = nftnl::Rule::new(chain);
            for e in expr::rule_exprs(r) {
                rule.add_expr(&e);
            }
            rule.set_comment(cstring(&self.owner.tag(&rule_key(r))))
                .expect("tags are far below the 128-byte comment limit");
            batch.add(&rule, MsgType::Add);
            what.push(format!(
                "rule in {}: {}",
                self.chain_label(&nft_chain(r.chain)),
                nft_rule_body(r)
            ));
        }
        if self.fault == Some(Fault::RejectLastRule)
            && let Some(chain) = chains.last()
        {
            let mut rule = nftnl::Rule::new(chain);
            for e in expr::rejected_rule_exprs() {
                rule.add_expr(&e);
            }
            batch.add(&rule, MsgType::Add);
            what.push("injected faulty rule (test hook)".into());
        }
        commit(sock, netns, batch, &what)
    }

    /// Deletes our table if it exists (add + delete: idempotent). Without
    /// a table nothing is written, so cleaning up a namespace that holds
    /// nothing of ours leaves its ruleset untouched.
    fn delete_table(&self, ns: &Netns) -> Result<()> {
        let netns = ns.id();
        let name = cstring(self.owner.nft_table());
        ns.run(|| {
            let sock = socket(netns)?;
            let exists =
                netlink::table_exists(&sock, self.owner.nft_table()).map_err(|source| {
                    RulesError::Netlink {
                        op: format!("lookup of table {}", self.table_label()),
                        netns,
                        source,
                    }
                })?;
            if !exists {
                return Ok(());
            }
            let table = Table::new(&name, ProtoFamily::Inet);
            let mut batch = Batch::new();
            batch.add(&table, MsgType::Add);
            batch.add(&table, MsgType::Del);
            let what = [
                format!("table {}", self.table_label()),
                format!("deletion of table {}", self.table_label()),
            ];
            commit(&sock, netns, batch, &what)
        })?
    }
}

fn socket(netns: NetnsId) -> Result<mnl::Socket> {
    netlink::open().map_err(|source| RulesError::Netlink {
        op: "socket".into(),
        netns,
        source,
    })
}

fn commit(sock: &mnl::Socket, netns: NetnsId, batch: Batch, what: &[String]) -> Result<()> {
    let batch = batch.finalize();
    netlink::send_batch(sock, &batch, what.len()).map_err(|e| match e.index {
        Some(i) => RulesError::Rejected {
            what: what[i].clone(),
            netns,
            source: e.error,
        },
        None => RulesError::Netlink {
            op: "transaction".into(),
            netns,
            source: e.error,
        },
    })
}

/// Deletes the given tables if they exist (used by the iptables backend for
/// the empty `ip nat`/`ip6 mangle`… tables iptables-nft created for us).
pub(crate) fn delete_tables(ns: &Netns, tables: &[(Family, String)]) -> Result<()> {
    if tables.is_empty() {
        return Ok(());
    }
    let netns = ns.id();
    ns.run(|| {
        let objects: Vec<Table> = tables
            .iter()
            .map(|(f, name)| {
                let family = match f {
                    Family::V4 => ProtoFamily::Ipv4,
                    Family::V6 => ProtoFamily::Ipv6,
                };
                Table::new(cstring(name), family)
            })
            .collect();
        let mut batch = Batch::new();
        let mut what = Vec::new();
        for (t, (_, name)) in objects.iter().zip(tables) {
            // add + delete: succeeds whether or not the table exists.
            batch.add(t, MsgType::Add);
            batch.add(t, MsgType::Del);
            what.push(format!("iptables-nft table {name}"));
            what.push(format!("deletion of iptables-nft table {name}"));
        }
        commit(&socket(netns)?, netns, batch, &what)
    })?
}

fn cstring(s: &str) -> CString {
    CString::new(s).expect("validated names contain no NUL")
}

fn describe_hook(base: &Option<BaseHook>) -> String {
    match base {
        None => "a regular chain".into(),
        Some((ty, num, prio)) => format!("type {ty} hook {num} priority {prio}"),
    }
}

impl Backend for NftBackend {
    fn name(&self) -> &'static str {
        "nft"
    }

    fn apply(&self, ns: &Netns, plan: &Plan) -> Result<Outcome> {
        let outcome = self.write_plan(ns, plan)?;
        if let Err(cause) = policy_route::ensure(ns, &plan.policy_routes) {
            return Err(super::rolled_back(ns, cause, self.cleanup(ns)));
        }
        Ok(outcome)
    }

    fn verify(&self, ns: &Netns, plan: &Plan) -> Result<Drift> {
        let netns = ns.id();
        let current = ns.run(|| self.read(&socket(netns)?, netns))??;
        let mut items = self.table_drift(&current, plan);
        items.extend(policy_route::drift(ns, &plan.policy_routes)?);
        Ok(Drift { items })
    }

    fn cleanup(&self, ns: &Netns) -> Result<()> {
        let table = self.delete_table(ns);
        let routes = policy_route::cleanup(ns);
        table.and(routes)
    }
}
