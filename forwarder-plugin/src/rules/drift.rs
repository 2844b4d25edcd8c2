//! Kernel state vs plan: what `verify` reports. Rules are compared by their
//! tag (the comment carrying a hash of the rule's full text), so a rule
//! deleted, added or edited by hand shows up as missing or extra.

use std::collections::HashMap;
use std::fmt;

/// One difference between the kernel and the plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DriftItem {
    MissingTable {
        table: String,
    },
    MissingChain {
        chain: String,
    },
    ExtraChain {
        chain: String,
    },
    WrongHook {
        chain: String,
        expected: String,
        found: String,
    },
    MissingRule {
        chain: String,
        rule: String,
    },
    ExtraRule {
        chain: String,
        rule: String,
    },
    /// Same rules, different order (order decides which rule wins).
    OutOfOrder {
        chain: String,
    },
    MissingPolicyRoute {
        what: String,
    },
    ExtraPolicyRoute {
        what: String,
    },
    MissingSet {
        set: String,
    },
    ExtraSet {
        set: String,
    },
    /// The set exists but does not hold what the plan's does (e.g. another
    /// key type).
    WrongSet {
        set: String,
        found: String,
    },
    /// A member of the interface set is not in the kernel's set: traffic
    /// from that interface is not captured.
    MissingElement {
        set: String,
        element: String,
    },
    /// The kernel's set holds a member the plan does not: traffic from that
    /// interface is captured.
    ExtraElement {
        set: String,
        element: String,
    },
}

impl fmt::Display for DriftItem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DriftItem::MissingTable { table } => write!(f, "missing table {table}"),
            DriftItem::MissingChain { chain } => write!(f, "missing chain {chain}"),
            DriftItem::ExtraChain { chain } => write!(f, "extra chain {chain}"),
            DriftItem::WrongHook {
                chain,
                expected,
                found,
            } => write!(f, "chain {chain} is {found}, expected {expected}"),
            DriftItem::MissingRule { chain, rule } => write!(f, "missing rule in {chain}: {rule}"),
            DriftItem::ExtraRule { chain, rule } => write!(f, "extra rule in {chain}: {rule}"),
            DriftItem::OutOfOrder { chain } => write!(f, "rules of {chain} are out of order"),
            DriftItem::MissingPolicyRoute { what } => write!(f, "missing {what}"),
            DriftItem::ExtraPolicyRoute { what } => write!(f, "extra {what}"),
            DriftItem::MissingSet { set } => write!(f, "missing set {set}"),
            DriftItem::ExtraSet { set } => write!(f, "extra set {set}"),
            DriftItem::WrongSet { set, found } => write!(f, "set {set} is {found}"),
            DriftItem::MissingElement { set, element } => {
                write!(f, "missing element {element:?} in set {set}")
            }
            DriftItem::ExtraElement { set, element } => {
                write!(f, "extra element {element:?} in set {set}")
            }
        }
    }
}

/// Everything `verify` found; empty means the kernel matches the plan.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Drift {
    pub items: Vec<DriftItem>,
}

impl Drift {
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
}

impl fmt::Display for Drift {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.items.is_empty() {
            return f.write_str("no drift");
        }
        for (i, item) in self.items.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{item}")?;
        }
        Ok(())
    }
}

/// A rule as the plan wants it.
#[derive(Debug, Clone)]
pub(crate) struct Want {
    pub tag: String,
    pub text: String,
    /// May sit anywhere among our rules of its chain: one member's rule of a
    /// spelled-out interface set, which membership changes append and
    /// delete one by one (they exclude each other, so order means nothing).
    pub unordered: bool,
}

/// A rule as the kernel has it; `tag` is `None` when it carries none of ours.
#[derive(Debug, Clone)]
pub(crate) struct Have {
    pub tag: Option<String>,
    pub text: String,
}

/// A chain in the plan. `owned`: every rule in it must be ours (own chains,
/// nft base chains); otherwise only our rules are compared (iptables'
/// built-in chains, which other software shares).
#[derive(Debug, Clone)]
pub(crate) struct WantChain {
    pub label: String,
    pub owned: bool,
    pub rules: Vec<Want>,
}

/// Compares one chain's rules. `have == None`: the chain does not exist.
pub(crate) fn compare_chain(want: &WantChain, have: Option<&[Have]>, out: &mut Vec<DriftItem>) {
    let Some(have) = have else {
        if want.owned {
            out.push(DriftItem::MissingChain {
                chain: want.label.clone(),
            });
        } else {
            for w in &want.rules {
                out.push(DriftItem::MissingRule {
                    chain: want.label.clone(),
                    rule: w.text.clone(),
                });
            }
        }
        return;
    };
    let relevant: Vec<&Have> = have
        .iter()
        .filter(|h| want.owned || h.tag.is_some())
        .collect();
    // Multiset difference by tag.
    let mut counts: HashMap<&str, i64> = HashMap::new();
    for h in &relevant {
        if let Some(t) = &h.tag {
            *counts.entry(t.as_str()).or_default() += 1;
        }
    }
    let before = out.len();
    for w in &want.rules {
        match counts.get_mut(w.tag.as_str()) {
            Some(n) if *n > 0 => *n -= 1,
            _ => out.push(DriftItem::MissingRule {
                chain: want.label.clone(),
                rule: w.text.clone(),
            }),
        }
    }
    for h in &relevant {
        let extra = match &h.tag {
            None => true,
            Some(t) => match counts.get_mut(t.as_str()) {
                Some(n) if *n > 0 => {
                    *n -= 1;
                    true
                }
                _ => false,
            },
        };
        if extra {
            out.push(DriftItem::ExtraRule {
                chain: want.label.clone(),
                rule: h.text.clone(),
            });
        }
    }
    if out.len() == before {
        let unordered: std::collections::HashSet<&str> = want
            .rules
            .iter()
            .filter(|w| w.unordered)
            .map(|w| w.tag.as_str())
            .collect();
        let order_have: Vec<&str> = relevant
            .iter()
            .filter_map(|h| h.tag.as_deref())
            .filter(|t| !unordered.contains(t))
            .collect();
        let order_want: Vec<&str> = want
            .rules
            .iter()
            .filter(|w| !w.unordered)
            .map(|w| w.tag.as_str())
            .collect();
        if order_have != order_want {
            out.push(DriftItem::OutOfOrder {
                chain: want.label.clone(),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn want(tags: &[&str]) -> WantChain {
        WantChain {
            label: "c".into(),
            owned: true,
            rules: tags
                .iter()
                .map(|t| Want {
                    tag: (*t).into(),
                    text: format!("rule {t}"),
                    unordered: false,
                })
                .collect(),
        }
    }

    fn have(tags: &[Option<&str>]) -> Vec<Have> {
        tags.iter()
            .map(|t| Have {
                tag: t.map(str::to_owned),
                text: format!("have {t:?}"),
            })
            .collect()
    }

    #[test]
    fn detects_missing_extra_and_order() {
        let mut out = Vec::new();
        compare_chain(
            &want(&["a", "b"]),
            Some(&have(&[Some("a"), Some("b")])),
            &mut out,
        );
        assert!(out.is_empty());
        compare_chain(&want(&["a", "b"]), Some(&have(&[Some("a")])), &mut out);
        assert_eq!(
            out,
            vec![DriftItem::MissingRule {
                chain: "c".into(),
                rule: "rule b".into()
            }]
        );
        out.clear();
        compare_chain(
            &want(&["a"]),
            Some(&have(&[None, Some("a"), Some("a")])),
            &mut out,
        );
        assert_eq!(out.len(), 2, "{out:?}");
        out.clear();
        compare_chain(
            &want(&["a", "b"]),
            Some(&have(&[Some("b"), Some("a")])),
            &mut out,
        );
        assert_eq!(out, vec![DriftItem::OutOfOrder { chain: "c".into() }]);
    }

    #[test]
    fn unordered_rules_may_sit_anywhere() {
        let mut w = want(&["a", "m1", "m2", "b"]);
        for r in &mut w.rules[1..3] {
            r.unordered = true;
        }
        let mut out = Vec::new();
        compare_chain(
            &w,
            Some(&have(&[Some("a"), Some("b"), Some("m2"), Some("m1")])),
            &mut out,
        );
        assert!(out.is_empty(), "{out:?}");
        // The ordered ones still count.
        compare_chain(
            &w,
            Some(&have(&[Some("b"), Some("m1"), Some("a"), Some("m2")])),
            &mut out,
        );
        assert_eq!(out, vec![DriftItem::OutOfOrder { chain: "c".into() }]);
    }

    #[test]
    fn shared_chains_ignore_foreign_rules() {
        let mut w = want(&["a"]);
        w.owned = false;
        let mut out = Vec::new();
        compare_chain(&w, Some(&have(&[None, Some("a"), None])), &mut out);
        assert!(out.is_empty(), "{out:?}");
        compare_chain(&w, None, &mut out);
        assert_eq!(out.len(), 1);
    }
}
