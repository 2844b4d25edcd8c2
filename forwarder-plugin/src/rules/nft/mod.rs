//! The default backend: nftables over netlink, in process. We own one table,
//! `inet <owner>`.
//!
//! Apply is check-then-apply on one socket, on one thread inside the
//! namespace: no table → one transaction creating it; a table matching the
//! plan → nothing written; a table that drifted → one transaction flushing
//! its chains, deleting the ones the plan no longer has and its sets, and
//! adding the rest. The kernel applies a transaction entirely or not at
//! all, so a refused apply leaves the previous rules. (Closing a netfilter
//! socket after a transaction that deleted anything waits for the kernel to
//! free it, an RCU grace period of ~10 ms: hence no rewrite when nothing
//! changed, no "delete table + add table" replace, and
//! [`BackendOptions::keep_socket`].) If the policy routing TPROXY needs
//! cannot be set up afterwards, everything of ours is removed again.
//! Cleanup deletes the table.
//!
//! `includeInterfaces` is the set `include_ifaces` (`type ifname`), which
//! one rule per hook tests; [`Backend::update_interfaces`] adds and deletes
//! its elements in a transaction that touches no rule (microseconds of
//! kernel time either way).

mod expr;
mod ffi;
mod netlink;

use std::collections::{BTreeSet, HashMap};
use std::ffi::CString;
use std::sync::Mutex;

use nftnl::set::{Set, SetKey};
use nftnl::{Batch, Chain, ChainType, Hook as NfHook, MsgType, Policy, ProtoFamily, Table};

use crate::netns::{Netns, NetnsId};

use super::drift::{Drift, DriftItem, Have, Want, WantChain, compare_chain};
use super::error::{Result, RulesError};
use super::names::{NFT_INTERFACE_SET, Owner, nft_base, nft_chain};
use super::plan::{ChainId, Family, Hook, Plan};
use super::render::{nft_rule_body, rule_key};
use super::{Backend, BackendOptions, Fault, Outcome, check_membership, policy_route};

use expr::{IFNAMSIZ, INTERFACE_SET_ID, ifname_key};
use netlink::{ElementOp, KernelChain, KernelRule, KernelSet, NlSocket};

/// `(type, hooknum, priority)` of a base chain.
type BaseHook = (String, u32, i32);

/// nft's datatype number of `ifname` (`TYPE_IFNAME`), so `nft list` shows
/// the set as `type ifname` and prints its elements as names.
const IFNAME_TYPE: u32 = 41;

/// The set's user data as nft writes it for `type ifname`: one libnftnl
/// TLV, key byte order (`NFTNL_UDATA_SET_KEYBYTEORDER`, 0) = host endian
/// (1). Without it nft would print the elements byte-reversed.
fn ifname_set_userdata() -> Vec<u8> {
    let mut v = vec![0u8, 4];
    v.extend_from_slice(&1u32.to_ne_bytes());
    v
}

/// An interface name as a set key (zero-padded to IFNAMSIZ).
struct IfnameKey([u8; IFNAMSIZ]);

impl SetKey for IfnameKey {
    const TYPE: u32 = IFNAME_TYPE;
    const LEN: u32 = IFNAMSIZ as u32;

    fn data(&self) -> Box<[u8]> {
        Box::new(self.0)
    }
}

pub struct NftBackend {
    owner: Owner,
    fault: Option<Fault>,
    /// With [`BackendOptions::keep_socket`]: the socket of the namespace
    /// used last, kept open between calls.
    kept: Option<Mutex<Option<(NetnsId, NlSocket)>>>,
}

/// Our table as the kernel has it.
struct TableState {
    chains: Vec<KernelChain>,
    rules: Vec<KernelRule>,
    sets: Vec<KernelSet>,
    /// The members of the interface set, if it exists with an ifname key.
    members: Option<BTreeSet<String>>,
}

/// `None`: no table.
type Current = Option<TableState>;

/// A set key read back as an interface name (up to the first NUL).
fn key_name(key: &[u8]) -> String {
    let end = key.iter().position(|&b| b == 0).unwrap_or(key.len());
    String::from_utf8_lossy(&key[..end]).into_owned()
}

impl NftBackend {
    pub fn new(opts: &BackendOptions) -> Self {
        NftBackend {
            owner: opts.owner.clone(),
            fault: opts.fault,
            kept: opts.keep_socket.then(|| Mutex::new(None)),
        }
    }

    /// Runs `f` with a netfilter socket of `ns`: a fresh one on a thread in
    /// the namespace, or the kept one (opened there on first use; calls on
    /// it are serialised). A kept socket is dropped after an error, which
    /// may have left replies unread.
    fn with_socket<R: Send>(
        &self,
        ns: &Netns,
        f: impl FnOnce(&NlSocket) -> Result<R> + Send,
    ) -> Result<R> {
        let netns = ns.id();
        let Some(kept) = &self.kept else {
            return ns.run(|| f(&socket(netns)?))?;
        };
        let mut slot = kept.lock().unwrap_or_else(|p| p.into_inner());
        let sock = match slot.take() {
            Some((id, sock)) if id == netns => sock,
            _ => ns.run(|| socket(netns))??,
        };
        let res = f(&sock);
        if res.is_ok() {
            *slot = Some((netns, sock));
        }
        res
    }

    fn table_label(&self) -> String {
        format!("inet {}", self.owner.nft_table())
    }

    fn chain_label(&self, name: &str) -> String {
        format!("inet {} {name}", self.owner.nft_table())
    }

    fn read(&self, sock: &NlSocket, netns: NetnsId) -> Result<Current> {
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
        let sets = netlink::dump_sets(sock, table).map_err(err)?;
        let members = match sets.iter().find(|s| s.name == NFT_INTERFACE_SET) {
            Some(s) if s.key_type == IFNAME_TYPE && s.key_len == IFNAMSIZ as u32 => Some(
                netlink::dump_elements(sock, table, NFT_INTERFACE_SET)
                    .map_err(err)?
                    .iter()
                    .map(|k| key_name(k))
                    .collect(),
            ),
            _ => None,
        };
        Ok(Some(TableState {
            chains,
            rules,
            sets,
            members,
        }))
    }

    /// [`Self::read`] and the drift from `plan`. A member seen missing is
    /// looked for again (up to twice) before it counts: a dump spans several
    /// messages, each a fresh walk of the kernel's hash set skipping what was
    /// sent, and a rehash of a set that just grew (the kernel does it later,
    /// in a worker) can reorder the walk between two messages.
    fn read_drift(
        &self,
        sock: &NlSocket,
        netns: NetnsId,
        plan: &Plan,
    ) -> Result<(Current, Vec<DriftItem>)> {
        let mut current = self.read(sock, netns)?;
        let mut items = self.table_drift(&current, plan);
        for _ in 0..2 {
            let missing = |i: &DriftItem| matches!(i, DriftItem::MissingElement { .. });
            let Some(members) = current.as_mut().and_then(|st| st.members.as_mut()) else {
                break;
            };
            if !items.iter().any(missing) {
                break;
            }
            let again = netlink::dump_elements(sock, self.owner.nft_table(), NFT_INTERFACE_SET)
                .map_err(|source| RulesError::Netlink {
                    op: format!("dump of set {}", self.set_label(NFT_INTERFACE_SET)),
                    netns,
                    source,
                })?;
            members.extend(again.iter().map(|k| key_name(k)));
            items = self.table_drift(&current, plan);
        }
        Ok((current, items))
    }

    fn set_label(&self, name: &str) -> String {
        format!("inet {} {name}", self.owner.nft_table())
    }

    /// Differences between our table's sets and the plan's interface set.
    fn set_drift(&self, state: &TableState, plan: &Plan, items: &mut Vec<DriftItem>) {
        for s in &state.sets {
            if s.name != NFT_INTERFACE_SET || plan.interfaces.is_none() {
                items.push(DriftItem::ExtraSet {
                    set: self.set_label(&s.name),
                });
            }
        }
        let Some(want) = &plan.interfaces else {
            return;
        };
        let label = self.set_label(NFT_INTERFACE_SET);
        let Some(have_set) = state.sets.iter().find(|s| s.name == NFT_INTERFACE_SET) else {
            items.push(DriftItem::MissingSet { set: label });
            return;
        };
        let Some(have) = &state.members else {
            items.push(DriftItem::WrongSet {
                set: label,
                found: format!(
                    "of key type {} length {} instead of ifname",
                    have_set.key_type, have_set.key_len
                ),
            });
            return;
        };
        for m in want.difference(have) {
            items.push(DriftItem::MissingElement {
                set: label.clone(),
                element: m.clone(),
            });
        }
        for m in have.difference(want) {
            items.push(DriftItem::ExtraElement {
                set: label.clone(),
                element: m.clone(),
            });
        }
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
                        unordered: false,
                    })
                    .collect();
                let base = nft_base(id).map(|(ty, hook, prio)| {
                    let num = match hook {
                        Hook::Prerouting => libc::NF_INET_PRE_ROUTING as u32,
                        Hook::Output => libc::NF_INET_LOCAL_OUT as u32,
                        Hook::Postrouting => libc::NF_INET_POST_ROUTING as u32,
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
        let Some(state) = current else {
            if !wanted.is_empty() || plan.interfaces.is_some() {
                items.push(DriftItem::MissingTable {
                    table: self.table_label(),
                });
            }
            return items;
        };
        let (chains, rules) = (&state.chains, &state.rules);
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
        self.set_drift(state, plan, &mut items);
        items
    }

    /// Makes our table hold exactly `plan` (see the module comment).
    fn write_plan(&self, ns: &Netns, plan: &Plan) -> Result<Outcome> {
        let netns = ns.id();
        self.with_socket(ns, |sock| {
            let (current, drift) = self.read_drift(sock, netns, plan)?;
            if self.fault.is_none() && current.is_some() && drift.is_empty() {
                return Ok(Outcome::Unchanged);
            }
            let (old, old_sets) = current.map(|st| (st.chains, st.sets)).unwrap_or_default();
            self.send_plan(sock, netns, plan, &old, &old_sets)?;
            Ok(Outcome::Applied)
        })
    }

    /// Builds and sends the transaction. `old`, `old_sets`: the chains and
    /// sets our table has now (empty when there is no table).
    fn send_plan(
        &self,
        sock: &NlSocket,
        netns: NetnsId,
        plan: &Plan,
        old: &[KernelChain],
        old_sets: &[KernelSet],
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
        // Sets go too (no rule refers to them after the flushes) and the
        // plan's is made anew: simpler than patching its elements, and this
        // path only runs when the table drifted or the rules changed.
        let old_set_names: Vec<CString> = old_sets.iter().map(|s| cstring(&s.name)).collect();
        for (n, k) in old_set_names.iter().zip(old_sets) {
            let set = Set::<IfnameKey>::new_named(n, 0, &table, ProtoFamily::Inet);
            batch.add(&set, MsgType::Del);
            what.push(format!("deletion of set {}", self.set_label(&k.name)));
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
                        Hook::Postrouting => NfHook::PostRouting,
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
        let set_name = cstring(NFT_INTERFACE_SET);
        let mut set =
            Set::<IfnameKey>::new_named(&set_name, INTERFACE_SET_ID, &table, ProtoFamily::Inet);
        if let Some(members) = &plan.interfaces {
            ffi::set_userdata(&set, &ifname_set_userdata());
            batch.add(&set, MsgType::Add);
            what.push(format!("set {}", self.set_label(NFT_INTERFACE_SET)));
            for m in members {
                set.add(&IfnameKey(ifname_key(m)));
            }
            for msg in set.elems_iter() {
                batch.add(&msg, MsgType::Add);
                what.push(format!(
                    "elements of set {}",
                    self.set_label(NFT_INTERFACE_SET)
                ));
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
        self.with_socket(ns, |sock| {
            let exists = netlink::table_exists(sock, self.owner.nft_table()).map_err(|source| {
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
            commit(sock, netns, batch, &what)
        })
    }
}

fn socket(netns: NetnsId) -> Result<NlSocket> {
    netlink::open().map_err(|source| RulesError::Netlink {
        op: "socket".into(),
        netns,
        source,
    })
}

fn commit(sock: &NlSocket, netns: NetnsId, batch: Batch, what: &[String]) -> Result<()> {
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
        plan.check()?;
        let outcome = self.write_plan(ns, plan)?;
        if let Err(cause) = policy_route::ensure(ns, &plan.policy_routes) {
            return Err(super::rolled_back(ns, cause, self.cleanup(ns)));
        }
        Ok(outcome)
    }

    fn verify(&self, ns: &Netns, plan: &Plan) -> Result<Drift> {
        let netns = ns.id();
        let (_, mut items) = self.with_socket(ns, |sock| self.read_drift(sock, netns, plan))?;
        items.extend(policy_route::drift(ns, &plan.policy_routes)?);
        Ok(Drift { items })
    }

    fn cleanup(&self, ns: &Netns) -> Result<()> {
        let table = self.delete_table(ns);
        let routes = policy_route::cleanup(ns);
        table.and(routes)
    }

    /// One transaction on the set's elements: `add` and `remove` added
    /// (without NLM_F_EXCL, so present ones are no error), then `remove`
    /// deleted — removing an absent member thus changes nothing.
    fn update_interfaces(
        &self,
        ns: &Netns,
        plan: &Plan,
        add: &[String],
        remove: &[String],
    ) -> Result<()> {
        check_membership(plan, add, remove)?;
        if add.is_empty() && remove.is_empty() {
            return Ok(());
        }
        let keys = |names: &mut dyn Iterator<Item = &String>| -> Vec<Vec<u8>> {
            names.map(|n| ifname_key(n).to_vec()).collect()
        };
        let mut ops = vec![(ElementOp::Add, keys(&mut add.iter().chain(remove)))];
        if !remove.is_empty() {
            ops.push((ElementOp::Delete, keys(&mut remove.iter())));
        }
        let label = self.set_label(NFT_INTERFACE_SET);
        let netns = ns.id();
        self.with_socket(ns, |sock| {
            netlink::send_elements(sock, self.owner.nft_table(), NFT_INTERFACE_SET, &ops).map_err(
                |e| match e.index {
                    _ if e.error.raw_os_error() == Some(libc::ENOENT) => RulesError::NotApplied {
                        what: format!("set {label}"),
                        netns,
                    },
                    Some(i) => RulesError::Rejected {
                        what: match ops[i].0 {
                            ElementOp::Add => format!("addition of elements to set {label}"),
                            ElementOp::Delete => format!("deletion of elements from set {label}"),
                        },
                        netns,
                        source: e.error,
                    },
                    None => RulesError::Netlink {
                        op: "transaction".into(),
                        netns,
                        source: e.error,
                    },
                },
            )
        })
    }
}
