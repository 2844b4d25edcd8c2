//! What the hop's connections share: their records and the indexes that
//! make every check O(1) in the number of connections — which interface
//! names are taken in which namespace, which connections live in a client
//! namespace (TPROXY policy routes are per namespace), and which caller's
//! connection each one is. Kept behind one short lock that is never held
//! across kernel work or I/O.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use super::error::{HopError, Result};
use super::record::HopRecord;
use crate::link::Links;
use crate::netns::Netns;
use crate::rules::spec::Mode;

/// Descriptors of a connection's namespaces, held so undo acts on the very
/// namespaces plumbed (a client's may have no path); the endpoint's through
/// the netlink handle its connections share.
#[derive(Debug)]
pub(crate) struct Held {
    pub client: Netns,
    pub endpoint: Arc<Links>,
}

#[derive(Debug, Default)]
pub(crate) struct Registry {
    /// Every connection recorded: established, adopted, or being plumbed.
    pub records: HashMap<String, HopRecord>,
    /// Namespace descriptors of the connections this process plumbs.
    pub held: HashMap<String, Arc<Held>>,
    /// Recorded by an earlier run and not refreshed since.
    pub adopted: HashSet<String>,
    /// (namespace, interface) → the connection that has (or is plumbing)
    /// it, for both ends of every veth.
    names: HashMap<(String, String), String>,
    /// Client namespace → the connections in it.
    by_client: HashMap<String, BTreeSet<String>>,
    /// (caller's connection id, client namespace) → connection id.
    callers: HashMap<(String, String), String>,
    /// Client namespace → slot → the connection holding it.
    slots: HashMap<String, BTreeMap<u16, String>>,
}

fn ends(rec: &HopRecord) -> [(String, String); 2] {
    [
        (rec.client_netns.clone(), rec.plan.a.name.clone()),
        (rec.endpoint_netns.clone(), rec.plan.b.name.clone()),
    ]
}

fn caller(rec: &HopRecord) -> Option<(String, String)> {
    rec.session
        .caller_id
        .clone()
        .map(|c| (c, rec.client_netns.clone()))
}

/// `(mark, table)` of a TPROXY spec.
pub(crate) fn tproxy(rec: &HopRecord) -> Option<(u32, u32)> {
    rec.rules
        .as_ref()
        .filter(|s| s.mode == Mode::Tproxy)
        .map(|s| (s.tproxy_mark, s.tproxy_route_table))
}

impl Registry {
    /// Refuses what would step on another connection of this hop.
    pub fn conflicts(&self, id: &str, rec: &HopRecord) -> Result<()> {
        for (netns, name) in ends(rec) {
            if let Some(other) = self.names.get(&(netns.clone(), name.clone()))
                && other != id
            {
                return Err(HopError::InUse {
                    name,
                    netns,
                    other: other.clone(),
                });
            }
        }
        let Some(want) = tproxy(rec) else {
            return Ok(());
        };
        for other_id in self.neighbours(id, &rec.client_netns) {
            if let Some(have) = self.records.get(&other_id).and_then(tproxy)
                && have != want
            {
                return Err(HopError::TproxyClash {
                    netns: rec.client_netns.clone(),
                    other: other_id,
                    have_mark: have.0,
                    have_table: have.1,
                    mark: want.0,
                    table: want.1,
                });
            }
        }
        Ok(())
    }

    /// Indexes `rec`'s names, namespace and caller under `id` (in addition
    /// to what `id` already has: a replacement holds both until it is done).
    pub fn index(&mut self, id: &str, rec: &HopRecord) {
        for key in ends(rec) {
            self.names.entry(key).or_insert_with(|| id.to_owned());
        }
        self.by_client
            .entry(rec.client_netns.clone())
            .or_default()
            .insert(id.to_owned());
        if let Some(key) = caller(rec) {
            self.callers.insert(key, id.to_owned());
        }
        if let Some(slot) = rec.slot {
            self.slots
                .entry(rec.client_netns.clone())
                .or_default()
                .entry(slot)
                .or_insert_with(|| id.to_owned());
        }
    }

    /// Removes what [`Registry::index`] added for `rec`, where it is `id`'s.
    pub fn unindex(&mut self, id: &str, rec: &HopRecord) {
        for key in ends(rec) {
            if self.names.get(&key).is_some_and(|o| o == id) {
                self.names.remove(&key);
            }
        }
        if let Some(set) = self.by_client.get_mut(&rec.client_netns) {
            set.remove(id);
            if set.is_empty() {
                self.by_client.remove(&rec.client_netns);
            }
        }
        if let Some(key) = caller(rec)
            && self.callers.get(&key).is_some_and(|o| o == id)
        {
            self.callers.remove(&key);
        }
        if let Some(slot) = rec.slot
            && let Some(taken) = self.slots.get_mut(&rec.client_netns)
        {
            if taken.get(&slot).is_some_and(|o| o == id) {
                taken.remove(&slot);
            }
            if taken.is_empty() {
                self.slots.remove(&rec.client_netns);
            }
        }
    }

    /// The lowest slot (1 ..= `max`) of client namespace `netns` that no
    /// other connection holds.
    pub fn free_slot(&self, id: &str, netns: &str, max: u16) -> Option<u16> {
        let taken = self.slots.get(netns);
        (1..=max).find(|s| taken.and_then(|t| t.get(s)).is_none_or(|o| o == id))
    }

    /// Records `rec` as `id`'s, re-indexed.
    pub fn set(&mut self, id: &str, rec: HopRecord) {
        if let Some(old) = self.records.remove(id) {
            self.unindex(id, &old);
        }
        self.index(id, &rec);
        self.records.insert(id.to_owned(), rec);
    }

    /// Forgets `id`: its record, names, descriptors.
    pub fn forget(&mut self, id: &str) {
        if let Some(old) = self.records.remove(id) {
            self.unindex(id, &old);
        }
        self.held.remove(id);
        self.adopted.remove(id);
    }

    /// The other connections in client namespace `netns`.
    pub fn neighbours(&self, id: &str, netns: &str) -> Vec<String> {
        self.by_client
            .get(netns)
            .map(|set| set.iter().filter(|o| *o != id).cloned().collect())
            .unwrap_or_default()
    }

    /// The connection of caller `caller_id` in client namespace `netns`.
    pub fn by_caller(&self, caller_id: &str, netns: &str) -> Option<&str> {
        self.callers
            .get(&(caller_id.to_owned(), netns.to_owned()))
            .map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hop::record::Session;
    use crate::hop::redirect::BackendName;
    use crate::link::{VethEnd, VethPlan};
    use crate::rules::RedirectSpec;

    fn rec(client_ns: &str, client_if: &str, endpoint_if: &str, caller: &str) -> HopRecord {
        let end = |ns: &str, name: &str| VethEnd {
            netns: ns.into(),
            name: name.into(),
            mac: None,
            addresses: vec![],
            routes: vec![],
            neighbours: vec![],
        };
        HopRecord {
            proxy: None,
            proxy_alt: false,
            labels: Default::default(),
            plan: VethPlan {
                a: end(client_ns, client_if),
                b: end("inode://4/2", endpoint_if),
                mtu: None,
                ipv6_nodad: true,
            },
            rules: None,
            capture: None,
            policies: vec![],
            slot: None,
            backend: BackendName::Nft,
            owner: "fp_0123456789abc".into(),
            client_netns: client_ns.into(),
            endpoint_netns: "inode://4/2".into(),
            client_cookie: None,
            endpoint_cookie: None,
            session: Session {
                caller_id: Some(caller.into()),
                ..Default::default()
            },
        }
    }

    fn tproxy_rec(client_if: &str, endpoint_if: &str, mark: u32) -> HopRecord {
        let mut r = rec("inode://4/1", client_if, endpoint_if, client_if);
        r.rules = Some(RedirectSpec {
            mode: Mode::Tproxy,
            tproxy_mark: mark,
            ..Default::default()
        });
        r
    }

    #[test]
    fn names_are_taken_per_namespace_until_forgotten() {
        let mut reg = Registry::default();
        let a = rec("inode://4/1", "nsm-1", "nse-a", "client-a");
        reg.set("A", a.clone());
        // Same client name, same namespace: taken.
        let e = reg
            .conflicts("B", &rec("inode://4/1", "nsm-1", "nse-b", "client-b"))
            .unwrap_err();
        assert!(
            matches!(&e, HopError::InUse { other, .. } if other == "A"),
            "{e}"
        );
        // Same endpoint name: taken.
        assert!(
            reg.conflicts("B", &rec("inode://4/9", "nsm-1", "nse-a", "client-b"))
                .is_err()
        );
        // Same client name in another namespace: free; A itself may re-plumb.
        reg.conflicts("B", &rec("inode://4/9", "nsm-1", "nse-b", "client-b"))
            .unwrap();
        reg.conflicts("A", &a).unwrap();
        assert_eq!(reg.by_caller("client-a", "inode://4/1"), Some("A"));
        assert_eq!(reg.by_caller("client-a", "inode://4/9"), None);

        reg.forget("A");
        reg.conflicts("B", &rec("inode://4/1", "nsm-1", "nse-a", "client-b"))
            .unwrap();
        assert_eq!(reg.by_caller("client-a", "inode://4/1"), None);
        assert!(reg.neighbours("B", "inode://4/1").is_empty());
    }

    #[test]
    fn a_replacement_holds_old_and_new_names_until_settled() {
        let mut reg = Registry::default();
        let old = rec("inode://4/1", "nsm-1", "nse-a", "c");
        let new = rec("inode://4/1", "nsm-2", "nse-a", "c");
        reg.set("A", old.clone());
        reg.conflicts("A", &new).unwrap();
        reg.index("A", &new);
        for taken in ["nsm-1", "nsm-2"] {
            assert!(
                reg.conflicts("B", &rec("inode://4/1", taken, "nse-b", "b"))
                    .is_err(),
                "{taken}"
            );
        }
        reg.set("A", new);
        reg.conflicts("B", &rec("inode://4/1", "nsm-1", "nse-b", "b"))
            .unwrap();
        assert_eq!(reg.by_caller("c", "inode://4/1"), Some("A"));
    }

    #[test]
    fn slots_are_distinct_per_client_namespace_and_freed_with_the_record() {
        let mut reg = Registry::default();
        assert_eq!(reg.free_slot("A", "inode://4/1", 2), Some(1));
        let mut a = rec("inode://4/1", "nsm-1", "nse-a", "a");
        a.slot = Some(1);
        reg.set("A", a);
        assert_eq!(reg.free_slot("A", "inode://4/1", 2), Some(1), "its own");
        assert_eq!(reg.free_slot("B", "inode://4/1", 2), Some(2));
        assert_eq!(
            reg.free_slot("B", "inode://4/9", 2),
            Some(1),
            "another namespace"
        );
        let mut b = rec("inode://4/1", "nsm-2", "nse-b", "b");
        b.slot = Some(2);
        reg.set("B", b);
        assert_eq!(reg.free_slot("C", "inode://4/1", 2), None, "all taken");
        reg.forget("A");
        assert_eq!(reg.free_slot("C", "inode://4/1", 2), Some(1));
    }

    #[test]
    fn tproxy_specs_in_one_namespace_must_agree() {
        let mut reg = Registry::default();
        reg.set("A", tproxy_rec("nsm-1", "nse-a", 1337));
        reg.conflicts("B", &tproxy_rec("nsm-2", "nse-b", 1337))
            .unwrap();
        let e = reg
            .conflicts("B", &tproxy_rec("nsm-2", "nse-b", 7))
            .unwrap_err();
        assert!(matches!(e, HopError::TproxyClash { mark: 7, .. }), "{e}");
        assert_eq!(reg.neighbours("B", "inode://4/1"), ["A"]);
    }
}
