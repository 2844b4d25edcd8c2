//! The iptables backend: one `iptables-restore --noflush` document per family
//! into chains we own (`<OWNER>_*`), each rule tagged with a comment.
//!
//! Apply is check-then-apply (istio `VerifyIptablesState`): iptables-save,
//! compare with the plan, and only on a difference write one document that
//! flushes our chains, deletes our jumps and re-adds everything. Re-applying
//! the same plan is therefore a no-op. iptables-restore commits table by
//! table, so if a later table (or family) fails, the ones already written
//! are restored from the iptables-save read before: a failed apply leaves
//! the namespace as it was.
//!
//! iptables has no interface sets: `includeInterfaces` becomes one jump per
//! interface, and [`Backend::update_interfaces`] appends or deletes just
//! those rules (`iptables-save` to see which are there, then one
//! `iptables-restore --noflush` per family of only those lines).

mod save;
mod variant;

use std::collections::BTreeMap;

use crate::netns::Netns;

pub use variant::Variant;
use variant::{Tools, tools};

use super::drift::{Drift, DriftItem, Have, Want, WantChain, compare_chain};
use super::error::{Result, RulesError};
use super::exec::Run;
use super::names::Owner;
use super::plan::{Action, ChainRef, Family, Plan, Spelled, Table};
use super::render::{RestoreDoc, RestoreTable, iptables_rule_args, rule_key};
use super::{Backend, BackendOptions, Fault, Outcome, check_membership, policy_route};
use save::{SaveRule, SaveTable};

/// Our own lock file for iptables-legacy: the host's `/run/xtables.lock` is
/// shared with kube-proxy & co. and only protects the host namespace's
/// tables anyway (istio PR #47002: hours of contention in CNI mode).
const LOCK_DIR: &str = "/run/forwarder-plugin";

const TABLES: [Table; 3] = [Table::Mangle, Table::Nat, Table::Raw];
const BUILTIN: [&str; 5] = ["PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"];

pub struct IptablesBackend {
    owner: Owner,
    forced: Option<Variant>,
    fault: Option<Fault>,
}

/// One family's pending change: its tools, its state before, the document.
struct Work {
    tools: Tools,
    before: Vec<SaveTable>,
    doc: RestoreDoc,
}

/// What of ours one family's iptables-save shows, per table.
#[derive(Debug, Default)]
struct Residue {
    own_chains: Vec<String>,
    /// Our rules in chains we do not own (built-in chains, foreign chains).
    shared: Vec<SaveRule>,
}

impl IptablesBackend {
    pub fn new(opts: &BackendOptions) -> Self {
        IptablesBackend {
            owner: opts.owner.clone(),
            forced: opts.iptables_variant,
            fault: opts.fault,
        }
    }

    /// The variant to use, and its IPv4 save output if detection read it.
    fn variant(&self, ns: &Netns) -> Result<(Variant, Option<String>)> {
        if let Some(v) = self.forced {
            if tools(v, Family::V4).is_none() {
                return Err(RulesError::ToolMissing {
                    program: format!("iptables-{v}-restore"),
                });
            }
            return Ok((v, None));
        }
        let avail: Vec<Tools> = [Variant::Nft, Variant::Legacy]
            .into_iter()
            .filter_map(|v| tools(v, Family::V4))
            .collect();
        match avail.len() {
            0 => Err(RulesError::ToolMissing {
                program: "iptables-nft-restore or iptables-legacy-restore".into(),
            }),
            1 => Ok((avail[0].variant, None)),
            _ => {
                // Prefer the variant already holding our chains, then the
                // one with more rules (istio's heuristic); nft on a tie.
                let mut best: Option<(u64, Variant, String)> = None;
                for t in avail {
                    let text = Run::new(&t.save, Vec::<String>::new()).output(ns)?;
                    let tables = save::parse(&text);
                    let ours = tables.iter().any(|tb| {
                        tb.chains
                            .iter()
                            .any(|c| self.owner.iptables_own_chain(c).is_some())
                    });
                    let rules: u64 = tables.iter().map(|tb| tb.rules.len() as u64).sum();
                    let score = if ours { u64::MAX } else { rules };
                    if best.as_ref().is_none_or(|(s, _, _)| score > *s) {
                        best = Some((score, t.variant, text));
                    }
                }
                let (_, v, text) = best.expect("two variants were scored");
                Ok((v, Some(text)))
            }
        }
    }

    fn save(&self, ns: &Netns, t: &Tools) -> Result<Vec<SaveTable>> {
        Ok(save::parse(
            &Run::new(&t.save, Vec::<String>::new()).output(ns)?,
        ))
    }

    fn is_ours(&self, r: &SaveRule) -> bool {
        r.comment.as_deref().is_some_and(|c| self.owner.owns_tag(c))
            || r.target
                .as_deref()
                .is_some_and(|t| self.owner.iptables_own_chain(t).is_some())
    }

    fn residue(&self, saved: &[SaveTable]) -> BTreeMap<Table, Residue> {
        let mut out: BTreeMap<Table, Residue> = BTreeMap::new();
        for st in saved {
            let Some(table) = TABLES.iter().copied().find(|t| t.name() == st.name) else {
                continue;
            };
            let own: Vec<String> = st
                .chains
                .iter()
                .filter(|c| self.owner.iptables_own_chain(c).is_some())
                .cloned()
                .collect();
            let shared: Vec<SaveRule> = st
                .rules
                .iter()
                .filter(|r| !own.contains(&r.chain) && self.is_ours(r))
                .cloned()
                .collect();
            if !own.is_empty() || !shared.is_empty() {
                out.insert(
                    table,
                    Residue {
                        own_chains: own,
                        shared,
                    },
                );
            }
        }
        out
    }

    /// The chains the plan wants in one table of one family.
    fn wanted(&self, plan: &Plan, family: Family, table: Table) -> Vec<(String, bool, Vec<Want>)> {
        if family == Family::V6 && !plan.ipv6 {
            return Vec::new();
        }
        plan.chains()
            .into_iter()
            .filter(|id| id.table == table)
            .map(|id| {
                let rules = plan
                    .rules_with_members(family)
                    .into_iter()
                    .filter(|s| s.rule.chain == id)
                    .map(|Spelled { rule: r, member }| Want {
                        tag: self.owner.tag(&rule_key(&r)),
                        text: format!(
                            "-A {} {}",
                            self.owner.iptables_chain(id),
                            iptables_rule_args(&self.owner, &r).join(" ")
                        ),
                        unordered: member.is_some(),
                    })
                    .collect();
                (
                    self.owner.iptables_chain(id),
                    matches!(id.chain, ChainRef::Own(_)),
                    rules,
                )
            })
            .collect()
    }

    fn compare(&self, plan: &Plan, t: &Tools, saved: &[SaveTable]) -> Vec<DriftItem> {
        let fam = match t.family {
            Family::V4 => "ip",
            Family::V6 => "ip6",
        };
        let mut items = Vec::new();
        for table in TABLES {
            let st = saved.iter().find(|s| s.name == table.name());
            let wanted = self.wanted(plan, t.family, table);
            let label = |chain: &str| format!("{fam} {} {chain}", table.name());
            let have_of = |chain: &str, owned: bool| -> Option<Vec<Have>> {
                let st = st?;
                if owned && !st.has_chain(chain) {
                    return None;
                }
                Some(
                    st.rules_of(chain)
                        .map(|r| Have {
                            // Untagged jumps into our chains are ours too.
                            tag: match &r.comment {
                                Some(c) if self.owner.owns_tag(c) => Some(c.clone()),
                                _ if owned || self.is_ours(r) => {
                                    Some(format!("untagged {}", r.rest))
                                }
                                _ => None,
                            },
                            text: format!("-A {chain} {}", r.rest),
                        })
                        .collect(),
                )
            };
            for (chain, owned, rules) in &wanted {
                let want = WantChain {
                    label: label(chain),
                    owned: *owned,
                    rules: rules.clone(),
                };
                compare_chain(&want, have_of(chain, *owned).as_deref(), &mut items);
            }
            let Some(st) = st else { continue };
            for c in &st.chains {
                if wanted.iter().any(|(w, _, _)| w == c) {
                    continue;
                }
                if self.owner.iptables_own_chain(c).is_some() {
                    items.push(DriftItem::ExtraChain { chain: label(c) });
                } else {
                    for r in st.rules_of(c).filter(|r| self.is_ours(r)) {
                        items.push(DriftItem::ExtraRule {
                            chain: label(c),
                            rule: format!("-A {c} {}", r.rest),
                        });
                    }
                }
            }
        }
        items
    }

    /// The document turning `residue` into exactly `wanted` (a document of
    /// chain declarations and appends).
    fn document(&self, mut wanted: RestoreDoc, residue: &BTreeMap<Table, Residue>) -> RestoreDoc {
        for (table, res) in residue {
            let t = wanted.tables.entry(*table).or_default();
            for c in &res.own_chains {
                if !t.declare.contains(c) {
                    t.declare.push(c.clone());
                    t.delete_chains.push(c.clone());
                }
            }
            t.delete_rules
                .extend(res.shared.iter().map(|r| format!("{} {}", r.chain, r.rest)));
        }
        wanted
    }

    /// What of ours `saved` holds, as a document that re-creates it (used to
    /// roll back to the state before a failed apply).
    fn previous(&self, saved: &[SaveTable]) -> RestoreDoc {
        let mut doc = RestoreDoc::default();
        for st in saved {
            let Some(table) = TABLES.iter().copied().find(|t| t.name() == st.name) else {
                continue;
            };
            let own: Vec<String> = st
                .chains
                .iter()
                .filter(|c| self.owner.iptables_own_chain(c).is_some())
                .cloned()
                .collect();
            let append: Vec<String> = st
                .rules
                .iter()
                .filter(|r| own.contains(&r.chain) || self.is_ours(r))
                .map(|r| format!("{} {}", r.chain, r.rest))
                .collect();
            if !own.is_empty() || !append.is_empty() {
                let t = doc.tables.entry(table).or_default();
                t.declare = own;
                t.append = append;
            }
        }
        doc
    }

    /// Puts every family in `work` back as it was saved before the apply,
    /// including removing iptables-nft tables the apply created.
    fn rollback(&self, ns: &Netns, work: &[Work]) -> Result<()> {
        for w in work {
            let now = self.save(ns, &w.tools)?;
            let doc = self.document(self.previous(&w.before), &self.residue(&now));
            if !doc.is_empty() {
                self.restore(ns, &w.tools, &doc)?;
            }
            let created: Vec<(Family, String)> = self
                .emptied_tables(&w.tools, &now)
                .into_iter()
                .filter(|(_, name)| !w.before.iter().any(|b| &b.name == name))
                .collect();
            super::nft::delete_tables(ns, &created)?;
        }
        Ok(())
    }

    fn restore(&self, ns: &Netns, t: &Tools, doc: &RestoreDoc) -> Result<()> {
        let text = doc.text();
        let mut run = Run::new(&t.restore, ["--noflush"]).stdin(&text);
        if t.variant == Variant::Legacy {
            run.args.extend(["-w".into(), "10".into()]);
            if std::fs::create_dir_all(LOCK_DIR).is_ok() {
                run = run.env("XTABLES_LOCKFILE", format!("{LOCK_DIR}/xtables.lock"));
            }
        }
        run.output(ns).map(|_| ()).map_err(|e| match e {
            RulesError::Command {
                command,
                netns,
                status,
                stderr,
            } => RulesError::Command {
                command: format!("{} ({} input)", command, t.label()),
                netns,
                status,
                stderr: format!("{stderr}\n--- input ---\n{text}"),
            },
            other => other,
        })
    }

    /// Families to look at: IPv4, and IPv6 when the plan wants it or
    /// ip6tables exists (to clear leftovers of an earlier IPv6 plan).
    fn families(&self, plan: Option<&Plan>, variant: Variant) -> Result<Vec<Tools>> {
        let mut out = Vec::new();
        for family in [Family::V4, Family::V6] {
            match tools(variant, family) {
                Some(t) => out.push(t),
                None if family == Family::V6 && !plan.is_some_and(|p| p.ipv6) => {}
                None => {
                    return Err(RulesError::ToolMissing {
                        program: format!(
                            "{}-{variant}-restore",
                            if family == Family::V4 {
                                "iptables"
                            } else {
                                "ip6tables"
                            }
                        ),
                    });
                }
            }
        }
        Ok(out)
    }

    /// One family's document of a membership change: member rules of `add`
    /// that `saved` lacks appended, those of `remove` it has deleted.
    fn membership_doc(
        &self,
        ns: &Netns,
        plan: &Plan,
        family: Family,
        saved: &[SaveTable],
        add: &[String],
        remove: &[String],
    ) -> Result<RestoreDoc> {
        let mut doc = RestoreDoc::default();
        for template in plan.rules_for(family).filter(|r| r.uses_interface_set()) {
            let table = template.chain.table;
            let chain = self.owner.iptables_chain(template.chain);
            let st = saved.iter().find(|s| s.name == table.name());
            // The rules jump into our chain: without it the plan is not there.
            if let Action::Jump(target) = template.action {
                let target = self.owner.iptables_chain(super::plan::ChainId {
                    table,
                    chain: ChainRef::Own(target),
                });
                if !st.is_some_and(|st| st.has_chain(&target)) {
                    return Err(RulesError::NotApplied {
                        what: format!("chain {} {target}", table.name()),
                        netns: ns.id(),
                    });
                }
            }
            let tagged = |name: &String| {
                let tag = self.owner.tag(&rule_key(&Plan::for_member(template, name)));
                st.into_iter()
                    .flat_map(|st| st.rules_of(&chain))
                    .filter(move |r| r.comment.as_deref() == Some(tag.as_str()))
            };
            let t = doc.tables.entry(table).or_default();
            for name in add {
                if tagged(name).next().is_none() {
                    let r = Plan::for_member(template, name);
                    t.append.push(format!(
                        "{chain} {}",
                        iptables_rule_args(&self.owner, &r).join(" ")
                    ));
                }
            }
            for name in remove {
                t.delete_rules
                    .extend(tagged(name).map(|r| format!("{} {}", r.chain, r.rest)));
            }
        }
        doc.tables
            .retain(|_, t| !t.append.is_empty() || !t.delete_rules.is_empty());
        Ok(doc)
    }

    fn try_apply(&self, ns: &Netns, plan: &Plan) -> Result<Outcome> {
        let (variant, mut v4_save) = self.variant(ns)?;
        let mut work: Vec<Work> = Vec::new();
        for t in self.families(Some(plan), variant)? {
            let saved = match (t.family, v4_save.take()) {
                (Family::V4, Some(text)) => save::parse(&text),
                _ => self.save(ns, &t)?,
            };
            if self.compare(plan, &t, &saved).is_empty() {
                continue;
            }
            let wanted = super::render::iptables_restore(plan, &self.owner, t.family);
            let doc = self.document(wanted, &self.residue(&saved));
            if !doc.is_empty() {
                work.push(Work {
                    tools: t,
                    before: saved,
                    doc,
                });
            }
        }
        if work.is_empty() {
            policy_route::ensure(ns, &plan.policy_routes)?;
            return Ok(Outcome::Unchanged);
        }
        if self.fault == Some(Fault::RejectLastRule) {
            let w = work.last_mut().expect("not empty");
            if let Some((_, t)) = w.doc.tables.iter_mut().next_back() {
                t.append.push(format!(
                    "{}_DOES_NOT_EXIST -j RETURN",
                    self.owner.iptables_prefix()
                ));
            }
        }
        let written = work
            .iter()
            .try_for_each(|w| self.restore(ns, &w.tools, &w.doc))
            .and_then(|()| policy_route::ensure(ns, &plan.policy_routes));
        match written {
            Ok(()) => Ok(Outcome::Applied),
            Err(cause) => Err(super::rolled_back(ns, cause, self.rollback(ns, &work))),
        }
    }

    /// Removes our chains and rules from one variant and family; with
    /// iptables-nft also the tables left empty (mangle, nat, raw), which
    /// iptables-nft created on our behalf and would otherwise linger as nft
    /// tables.
    fn cleanup_one(&self, ns: &Netns, t: &Tools) -> Result<()> {
        let saved = self.save(ns, t)?;
        let residue = self.residue(&saved);
        let empty_after = self.emptied_tables(t, &saved);
        self.cleanup_residue(ns, t, residue)?;
        super::nft::delete_tables(ns, &empty_after)
    }

    /// iptables-nft tables (mangle/nat/raw) that hold nothing but built-in
    /// chains and our chains and rules: empty once ours are gone.
    fn emptied_tables(&self, t: &Tools, saved: &[SaveTable]) -> Vec<(Family, String)> {
        if t.variant != Variant::Nft {
            return Vec::new();
        }
        saved
            .iter()
            .filter(|st| TABLES.iter().any(|tb| tb.name() == st.name))
            .filter(|st| {
                st.rules
                    .iter()
                    .all(|r| self.is_ours(r) || self.owner.iptables_own_chain(&r.chain).is_some())
                    && st.chains.iter().all(|c| {
                        BUILTIN.contains(&c.as_str()) || self.owner.iptables_own_chain(c).is_some()
                    })
            })
            .map(|st| (t.family, st.name.clone()))
            .collect()
    }

    fn cleanup_residue(
        &self,
        ns: &Netns,
        t: &Tools,
        residue: BTreeMap<Table, Residue>,
    ) -> Result<()> {
        if residue.is_empty() {
            return Ok(());
        }
        let mut doc = RestoreDoc::default();
        for (table, res) in residue {
            doc.tables.insert(
                table,
                RestoreTable {
                    declare: res.own_chains.clone(),
                    delete_rules: res
                        .shared
                        .iter()
                        .map(|r| format!("{} {}", r.chain, r.rest))
                        .collect(),
                    append: Vec::new(),
                    delete_chains: res.own_chains,
                },
            );
        }
        self.restore(ns, t, &doc)
    }
}

impl Backend for IptablesBackend {
    fn name(&self) -> &'static str {
        "iptables"
    }

    fn apply(&self, ns: &Netns, plan: &Plan) -> Result<Outcome> {
        plan.check()?;
        self.try_apply(ns, plan)
    }

    fn verify(&self, ns: &Netns, plan: &Plan) -> Result<Drift> {
        let (variant, mut v4_save) = self.variant(ns)?;
        let mut items = Vec::new();
        for t in self.families(Some(plan), variant)? {
            let saved = match (t.family, v4_save.take()) {
                (Family::V4, Some(text)) => save::parse(&text),
                _ => self.save(ns, &t)?,
            };
            items.extend(self.compare(plan, &t, &saved));
        }
        // Our rules in the other variant are active too, and drift.
        let other = match variant {
            Variant::Legacy => Variant::Nft,
            Variant::Nft => Variant::Legacy,
        };
        for family in [Family::V4, Family::V6] {
            let Some(t) = tools(other, family) else {
                continue;
            };
            for (table, res) in self.residue(&self.save(ns, &t)?) {
                let label = |c: &str| format!("{} {} {c}", t.label(), table.name());
                for c in &res.own_chains {
                    items.push(DriftItem::ExtraChain { chain: label(c) });
                }
                for r in &res.shared {
                    items.push(DriftItem::ExtraRule {
                        chain: label(&r.chain),
                        rule: format!("-A {} {}", r.chain, r.rest),
                    });
                }
            }
        }
        items.extend(policy_route::drift(ns, &plan.policy_routes)?);
        Ok(Drift { items })
    }

    fn reconcile(&self, ns: &Netns, plan: &Plan) -> Result<Drift> {
        let drift = super::reconcile_default(self, ns, plan)?;
        if !drift.is_empty() {
            // Our rules left in the other variant are active too: remove them.
            let (variant, _) = self.variant(ns)?;
            let other = match variant {
                Variant::Legacy => Variant::Nft,
                Variant::Nft => Variant::Legacy,
            };
            for family in [Family::V4, Family::V6] {
                if let Some(t) = tools(other, family) {
                    self.cleanup_one(ns, &t)?;
                }
            }
        }
        Ok(drift)
    }

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
        let (variant, mut v4_save) = self.variant(ns)?;
        let mut work: Vec<Work> = Vec::new();
        for t in self.families(Some(plan), variant)? {
            if t.family == Family::V6 && !plan.ipv6 {
                continue;
            }
            let saved = match (t.family, v4_save.take()) {
                (Family::V4, Some(text)) => save::parse(&text),
                _ => self.save(ns, &t)?,
            };
            let doc = self.membership_doc(ns, plan, t.family, &saved, add, remove)?;
            if !doc.is_empty() {
                work.push(Work {
                    tools: t,
                    before: saved,
                    doc,
                });
            }
        }
        // All or nothing across families: a later family failing puts the
        // earlier ones back as they were saved.
        match work
            .iter()
            .try_for_each(|w| self.restore(ns, &w.tools, &w.doc))
        {
            Ok(()) => Ok(()),
            Err(cause) => Err(super::rolled_back(ns, cause, self.rollback(ns, &work))),
        }
    }

    fn cleanup(&self, ns: &Netns) -> Result<()> {
        // Both variants and both families: leftovers anywhere stay active.
        let mut first_err = None;
        for variant in [Variant::Nft, Variant::Legacy] {
            for family in [Family::V4, Family::V6] {
                if let Some(t) = tools(variant, family)
                    && let Err(e) = self.cleanup_one(ns, &t)
                {
                    first_err.get_or_insert(e);
                }
            }
        }
        if let Err(e) = policy_route::cleanup(ns) {
            first_err.get_or_insert(e);
        }
        first_err.map_or(Ok(()), Err)
    }
}
